"""d2t/t2d: selection rule, SpecForge parity, section 1 rules, file round trips."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import LLAMA3_CONFIG, REPO, shared_data_or_skip, shipped_config, zipf_counts
from hypothesis import given, settings
from hypothesis import strategies as st

from specforge_vocab.errors import InputError
from specforge_vocab.writing.mapping import (
    build_mapping,
    check_mapping,
    kept_ids_from_d2t,
    kept_token_ids,
    load_mapping,
    mapping_from_counts,
    save_mapping,
    save_mapping_safetensors,
)

# --------------------------------------------------------------------------- a plain SpecForge builder


def specforge_counter(counts: np.ndarray) -> Counter:
    """A Counter like SpecForge's, with ids inserted in ascending id order."""
    token_dict = Counter()
    for token_id in range(len(counts)):
        if counts[token_id] > 0:
            token_dict[token_id] = int(counts[token_id])
    return token_dict


def specforge_builder(
    token_dict: Counter, draft_vocab_size: int, target_vocab_size: int, *, fast_membership=False, set_order=False
):
    """SpecForge's rule, re-implemented plainly: pad with unseen ids from range(k), take
    most_common(k) (ties in insertion order), sort, d2t[i] = used[i] - i, and t2d by
    list membership (a set when ``fast_membership``, which gives the same booleans)."""
    token_dict = Counter(token_dict)
    if len(token_dict) < draft_vocab_size:
        # SpecForge iterates a set here (``set_order``: so does this model), which for small ints is
        # usually ascending; by default the plain model pads with the smallest unseen ids.
        missing = set(range(draft_vocab_size)) - set(token_dict.keys())
        missing = list(missing) if set_order else sorted(missing)
        for token in missing:
            token_dict[token] = 0
            if len(token_dict) >= draft_vocab_size:
                break
    used = sorted(key for key, _ in token_dict.most_common(draft_vocab_size))
    d2t = [used[i] - i for i in range(len(used))]
    members = set(used) if fast_membership else used
    t2d = [i in members for i in range(target_vocab_size)]
    return torch.tensor(d2t), torch.tensor(t2d)


def assert_same_mapping(ours, theirs):
    (d2t, t2d), (ref_d2t, ref_t2d) = ours, theirs
    assert d2t.dtype == ref_d2t.dtype == torch.int64
    assert t2d.dtype == ref_t2d.dtype == torch.bool
    assert torch.equal(d2t, ref_d2t)
    assert torch.equal(t2d, ref_t2d)


# --------------------------------------------------------------------------- selection


def test_small_example_by_hand():
    counts = np.array([5, 0, 9, 5, 1, 5])
    # 9 (id 2), then the three 5s tie: ids 0, 3, 5 in that order; k = 3 keeps 2, 0, 3.
    assert kept_token_ids(counts, 3).tolist() == [0, 2, 3]
    d2t, t2d = build_mapping(np.array([0, 2, 3]), 6)
    assert d2t.tolist() == [0, 1, 1]
    assert t2d.tolist() == [True, False, True, True, False, False]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=60),
    st.data(),
)
def test_kept_ids_are_top_k_with_smaller_id_on_ties(values, data):
    counts = np.array(values, dtype=np.int64)
    k = data.draw(st.integers(min_value=1, max_value=len(values)))
    expected = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])
    assert kept_token_ids(counts, k).tolist() == expected
    # Equals SpecForge's builder when counts are inserted in id order (padding included).
    assert_same_mapping(mapping_from_counts(counts, k), specforge_builder(specforge_counter(counts), k, len(values)))


def test_pinned_ids_are_kept_and_count_toward_k():
    counts = np.array([10, 9, 8, 7, 0, 0])
    kept = kept_token_ids(counts, 3, pinned_ids=[5])
    assert kept.tolist() == [0, 1, 5]
    with pytest.raises(InputError, match="pinned"):
        kept_token_ids(counts, 1, pinned_ids=[4, 5])
    with pytest.raises(InputError, match=r"\[0, 6\)"):
        kept_token_ids(counts, 2, pinned_ids=[6])


def test_padding_with_smallest_unseen_ids_warns(caplog):
    counts = np.zeros(20, dtype=np.int64)
    counts[[3, 7, 15]] = [4, 2, 9]
    with caplog.at_level(logging.WARNING, logger="specforge_vocab.writing.mapping"):
        kept = kept_token_ids(counts, 6)
    assert kept.tolist() == [0, 1, 2, 3, 7, 15]
    assert "Only 3 token ids were seen" in caplog.text
    assert_same_mapping(mapping_from_counts(counts, 6), specforge_builder(specforge_counter(counts), 6, 20))


def test_no_warning_when_enough_ids_seen(caplog):
    with caplog.at_level(logging.WARNING, logger="specforge_vocab.writing.mapping"):
        kept_token_ids(np.array([3, 1, 2, 0]), 3)
    assert caplog.text == ""


@pytest.mark.parametrize("bad_k", [0, 5, -1, 2.5, True])
def test_bad_k_is_input_error(bad_k):
    with pytest.raises(InputError, match="draft_vocab_size"):
        kept_token_ids(np.array([1, 2, 3, 4]), bad_k)


def test_bad_counts_are_input_errors():
    with pytest.raises(InputError, match="1-D"):
        kept_token_ids(np.ones((2, 2), dtype=np.int64), 1)
    with pytest.raises(InputError, match=">= 0"):
        kept_token_ids(np.array([1, -2, 3]), 1)


def test_specforge_builder_parity_on_zipf_with_many_ties_list_membership():
    # Small enough for SpecForge's list-membership t2d; many equal low counts exercise ties.
    counts = zipf_counts(6000, 40_000, 1.2, seed=1)
    assert len(np.unique(counts)) < 0.2 * counts.size
    for k in (1, 37, 500, 2999, 6000):
        assert_same_mapping(mapping_from_counts(counts, k), specforge_builder(specforge_counter(counts), k, 6000))


def test_specforge_builder_parity_full_llama3_size():
    V, k = 128_256, 32_000
    counts = zipf_counts(V, 2_000_000, 1.1, seed=7)
    ref = specforge_builder(specforge_counter(counts), k, V, fast_membership=True)
    assert_same_mapping(mapping_from_counts(counts, k), ref)


# --------------------------------------------------------------------------- section 1 rules


def good_mapping():
    return build_mapping(np.array([1, 4, 5, 9]), 12)


def test_good_mapping_passes_and_round_trips_kept_ids():
    d2t, t2d = good_mapping()
    check_mapping(d2t, t2d, draft_vocab_size=4, vocab_size=12)
    assert kept_ids_from_d2t(d2t).tolist() == [1, 4, 5, 9]
    # How SGLang reads it: hot_token_id = d2t + arange(k).
    assert (d2t + torch.arange(4)).tolist() == [1, 4, 5, 9]


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d, t: (d.to(torch.bfloat16), t), "never a float"),
        (lambda d, t: (d.to(torch.float32), t), "never a float"),
        (lambda d, t: (d.to(torch.int32), t), "torch.int64"),
        (lambda d, t: (d, t.to(torch.uint8)), "torch.bool"),
        (lambda d, t: (d[:3], t), r"shape \[4\]"),
        (lambda d, t: (d, t[:11]), r"shape \[12\]"),
        (lambda d, t: (torch.tensor([4, 0, 3, 6]), t), "strictly ascending"),  # kept 4, 1, 5, 9
        (lambda d, t: (torch.tensor([1, 3, 3, 9]), t), r"in \[0, 12\)"),  # kept 1, 4, 5, 12
        (lambda d, t: (torch.tensor([-1, 3, 3, 6]), t), r"in \[0, 12\)"),
        (lambda d, t: (d, torch.ones(12, dtype=torch.bool)), "exactly draft_vocab_size = 4"),
    ],
)
def test_each_broken_rule_is_a_clear_error(mutate, pattern):
    d2t, t2d = good_mapping()
    bad_d2t, bad_t2d = mutate(d2t.clone(), t2d.clone())
    with pytest.raises(InputError, match=pattern) as info:
        check_mapping(bad_d2t, bad_t2d, draft_vocab_size=4, vocab_size=12, source="x.pt")
    assert str(info.value).startswith("x.pt: ")


def test_t2d_disagreeing_with_d2t_is_an_error():
    d2t, t2d = good_mapping()
    t2d = t2d.clone()
    t2d[4], t2d[0] = False, True  # same count, wrong ids
    with pytest.raises(InputError, match=r"t2d\[4\]"):
        check_mapping(d2t, t2d, draft_vocab_size=4, vocab_size=12)


def test_repeated_kept_id_is_an_error():
    # kept = arange(4) + d2t = [1, 4, 4, 9]
    d2t = torch.tensor([1, 3, 2, 6])
    t2d = torch.zeros(12, dtype=torch.bool)
    t2d[[1, 4, 9, 10]] = True
    with pytest.raises(InputError, match="repeats"):
        check_mapping(d2t, t2d, draft_vocab_size=4, vocab_size=12)


# --------------------------------------------------------------------------- files


class SpecForgeDraftBuffers(torch.nn.Module):
    """The two buffers a SpecForge EAGLE-3 draft registers, shaped by its config."""

    def __init__(self, config: dict):
        super().__init__()
        self.register_buffer("t2d", torch.ones(config["vocab_size"], dtype=torch.bool))
        self.register_buffer("d2t", torch.zeros(config["draft_vocab_size"], dtype=torch.int64))


def test_written_mapping_loads_into_patched_config_buffers(tmp_path):
    from specforge_vocab.writing.draft_config import patch_draft_vocab_size

    config_path = tmp_path / "llama3-8B-eagle3.json"
    config_path.write_bytes(LLAMA3_CONFIG.read_bytes())
    counts = zipf_counts(128_256, 1_000_000, 1.1, seed=3)
    k = 13_264
    d2t, t2d = mapping_from_counts(counts, k)
    save_mapping(str(tmp_path / "vocab_mapping.pt"), d2t, t2d)
    patch_draft_vocab_size(str(config_path), k)

    # As SpecForge does: torch.load, then copy_ into buffers shaped by the (patched) config.
    config = json.loads(config_path.read_text())
    draft = SpecForgeDraftBuffers(config)
    loaded = torch.load(tmp_path / "vocab_mapping.pt", weights_only=True)
    draft.t2d.copy_(loaded["t2d"])
    draft.d2t.copy_(loaded["d2t"])
    check_mapping(draft.d2t, draft.t2d, draft_vocab_size=config["draft_vocab_size"], vocab_size=config["vocab_size"])
    assert torch.equal(draft.d2t, d2t) and torch.equal(draft.t2d, t2d)

    # The unpatched config's shapes do not fit: why the config must be patched.
    stale = SpecForgeDraftBuffers(shipped_config())
    with pytest.raises(RuntimeError):
        stale.d2t.copy_(loaded["d2t"])


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open

    d2t, t2d = mapping_from_counts(zipf_counts(5000, 20_000, 1.0, seed=2), 700)
    path = str(tmp_path / "vocab_mapping.safetensors")
    save_mapping_safetensors(path, d2t, t2d, metadata={"draft_vocab_size": 700, "source": "test"})
    back_d2t, back_t2d = load_mapping(path, draft_vocab_size=700, vocab_size=5000)
    assert torch.equal(back_d2t, d2t) and back_d2t.dtype == torch.int64
    assert torch.equal(back_t2d, t2d) and back_t2d.dtype == torch.bool
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"draft_vocab_size": "700", "source": "test"}


def test_pt_round_trip_and_no_temp_files(tmp_path):
    d2t, t2d = good_mapping()
    path = tmp_path / "m.pt"
    save_mapping(str(path), d2t, t2d)
    back = load_mapping(str(path), draft_vocab_size=4, vocab_size=12)
    assert torch.equal(back[0], d2t) and torch.equal(back[1], t2d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_load_mapping_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_mapping(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="garbage.pt"):
        load_mapping(str(garbage))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="bad.safetensors"):
        load_mapping(str(bad_st))
    only_d2t = tmp_path / "only_d2t.pt"
    torch.save({"d2t": torch.zeros(3, dtype=torch.int64)}, only_d2t)
    with pytest.raises(InputError, match="'t2d' is missing"):
        load_mapping(str(only_d2t))
    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    with pytest.raises(InputError, match="must hold a dict"):
        load_mapping(str(a_list))
    d2t, t2d = good_mapping()
    save_mapping(str(tmp_path / "ok.pt"), d2t, t2d)
    with pytest.raises(InputError, match=r"ok.pt: d2t must have shape \[5\]"):
        load_mapping(str(tmp_path / "ok.pt"), draft_vocab_size=5, vocab_size=12)


def test_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"d2t": Evil(), "t2d": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="evil.pt"):
        load_mapping(str(path))


# --------------------------------------------------------------------------- real data (needs counting)


def test_gsm8k_llama3_mapping_matches_specforge_builder(llama3_dir, tmp_path):
    """Issue 3 'Must show': the two gsm8k train files, Llama-3 tokenizer, Llama-3-8B draft:
    TPE (seed 42, 100 trials) and exact agree within 0.01% utility, and the mapping at the
    chosen k equals SpecForge's builder bit for bit."""
    from specforge_vocab.choosing.cost import DraftArchitecture
    from specforge_vocab.choosing.search import SearchSettings, search
    from specforge_vocab.counting import count as counting
    from specforge_vocab.writing.draft_config import read_draft_config

    data = shared_data_or_skip()
    files = [str(data / "gsm8k_train_part1.jsonl"), str(data / "gsm8k_train_part2.jsonl")]
    counts = counting.count_tokens(files, llama3_dir, chat_template="llama3", max_length=2048)
    config_path = str(LLAMA3_CONFIG)
    arch = DraftArchitecture.from_config(read_draft_config(config_path), source=config_path)
    assert counts.shape == (arch.vocab_size,)

    result = search(counts, arch, SearchSettings(n_calls=100, random_state=42))
    assert result.relative_utility_gap <= 1e-4
    k = result.k
    assert_same_mapping(
        mapping_from_counts(counts, k), specforge_builder(specforge_counter(counts), k, arch.vocab_size)
    )


def test_equal_to_specforges_builder_exactly_under_the_documented_condition():
    """README and docs/SPECFORGE.md section 9: equal bit for bit when tied counts at the cut are ordered
    by id; SpecForge keeps the tied id its counter saw first, and pads in set order."""
    counts = np.zeros(10, dtype=np.int64)
    counts[[9, 7, 2]] = [5, 1, 1]
    ours = mapping_from_counts(counts, 2)
    assert_same_mapping(ours, specforge_builder(specforge_counter(counts), 2, 10))  # inserted in id order
    seen_7_first = Counter({9: 5, 7: 1, 2: 1})  # the tie at the cut (2 and 7) first seen in another order
    d2t, _ = specforge_builder(seen_7_first, 2, 10)
    assert (torch.arange(2) + d2t).tolist() == [7, 9] and kept_token_ids(counts, 2).tolist() == [2, 9]
    # Fewer than k ids seen, two of them >= k: SpecForge pads from a set (35 first), we with the smallest (3).
    seen = [i for i in range(40) if i not in (3, 35, 37)] + [100, 101]
    sparse = np.zeros(128, dtype=np.int64)
    sparse[seen] = 1
    d2t, _ = specforge_builder(Counter({i: 1 for i in seen}), 40, 128, set_order=True)
    theirs = set((torch.arange(40) + d2t).tolist())
    mine = set(kept_token_ids(sparse, 40).tolist())
    assert theirs - mine == {35} and mine - theirs == {3}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bit for bit when tied counts at the cut are ordered by id" in readme
    assert "(docs/SPECFORGE.md#9-tie-breaking-and-padding-when-our-mapping-equals-specforges-builder)" in readme
    assert "It equals, bit for bit, what SpecForge's own builder gives" not in readme
