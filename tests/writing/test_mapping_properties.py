"""Property-based tests (hypothesis) of the mapping: random counts give mappings that keep every
rule of contract section 1, with the kept ids derived independently here (sort by count
descending, then id), and corrupted mappings are refused.

The counting properties are in tests/counting/test_count_properties.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from specforge_vocab.errors import InputError
from specforge_vocab.writing.mapping import build_mapping, check_mapping, kept_token_ids, mapping_from_counts


def expected_kept(counts: np.ndarray, k: int, pinned) -> np.ndarray:
    """The rule, written out: pinned ids, then the most frequent others (ties: smaller id), ascending."""
    pinned = sorted(set(int(p) for p in pinned))
    others = sorted((i for i in range(len(counts)) if i not in set(pinned)), key=lambda i: (-int(counts[i]), i))
    return np.array(sorted(pinned + others[: k - len(pinned)]), dtype=np.int64)


def assert_section_1(d2t, t2d, k: int, V: int) -> np.ndarray:
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert tuple(d2t.shape) == (k,) and tuple(t2d.shape) == (V,)
    kept = np.arange(k) + d2t.numpy()
    assert np.all(np.diff(kept) > 0), "kept ids must be strictly ascending (and so unique)"
    assert kept.min() >= 0 and kept.max() < V
    assert int(t2d.sum()) == k and bool(t2d[torch.from_numpy(kept)].all())
    return kept


count_arrays = st.integers(1, 400).flatmap(
    lambda V: arrays(np.int64, V, elements=st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 10**12)))
)


@settings(max_examples=150, deadline=None)
@given(counts=count_arrays, data=st.data())
def test_every_mapping_keeps_the_section_1_rules(counts, data):
    V = counts.shape[0]
    k = data.draw(st.integers(1, V), label="k")
    pinned = data.draw(st.lists(st.integers(0, V - 1), max_size=min(k, 4), unique=True), label="pinned")
    d2t, t2d = mapping_from_counts(counts, k, pinned_ids=pinned)
    kept = assert_section_1(d2t, t2d, k, V)
    assert np.array_equal(kept, expected_kept(counts, k, pinned))
    assert np.array_equal(kept_token_ids(counts, k, pinned_ids=pinned), kept)
    # SpecForge's file format and safetensors keep int64 d2t exactly (never through a float).
    buffer = io.BytesIO()
    torch.save({"d2t": d2t, "t2d": t2d}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["d2t"], d2t) and loaded["d2t"].dtype == torch.int64
    from safetensors.torch import load, save

    again = load(save({"d2t": d2t, "t2d": t2d}))
    assert torch.equal(again["d2t"], d2t) and torch.equal(again["t2d"], t2d)


@settings(max_examples=150, deadline=None)
@given(V=st.integers(2, 3000), data=st.data())
def test_build_mapping_round_trips_and_corruptions_are_refused(V, data):
    kept = np.array(sorted(data.draw(st.sets(st.integers(0, V - 1), min_size=2, max_size=min(V, 64)))), dtype=np.int64)
    k = kept.size
    d2t, t2d = build_mapping(kept, V)
    assert np.array_equal(assert_section_1(d2t, t2d, k, V), kept)
    check_mapping(d2t, t2d, draft_vocab_size=k, vocab_size=V)

    corruption = data.draw(
        st.sampled_from(["float", "bf16", "swap", "t2d_false", "t2d_extra", "out_of_range", "short", "int32"])
    )
    bad_d2t, bad_t2d = d2t.clone(), t2d.clone()
    if corruption == "float":
        bad_d2t = d2t.to(torch.float32)
    elif corruption == "bf16":
        bad_d2t = d2t.to(torch.bfloat16)
    elif corruption == "swap":
        i = data.draw(st.integers(0, k - 2))
        bad_d2t[i], bad_d2t[i + 1] = d2t[i + 1] + 1, d2t[i] - 1  # rows i, i+1 now map to kept[i+1], kept[i]
    elif corruption == "t2d_false":
        bad_t2d[int(kept[data.draw(st.integers(0, k - 1))])] = False
    elif corruption == "t2d_extra":
        free = np.setdiff1d(np.arange(V), kept)
        assume(free.size > 0)
        bad_t2d[int(free[0])] = True
    elif corruption == "out_of_range":
        bad_d2t[-1] = V - (k - 1)  # last row maps to V
    elif corruption == "short":
        bad_d2t = d2t[:-1]
    elif corruption == "int32":
        bad_d2t = d2t.to(torch.int32)
    with pytest.raises(InputError):
        check_mapping(bad_d2t, bad_t2d, draft_vocab_size=k, vocab_size=V)
