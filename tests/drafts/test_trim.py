"""`trim`: slicing a trained EAGLE-3 draft's LM head to the rows a workload uses (issue 7).

The drafts are built here with every tensor SpecForge's LlamaForCausalLMEagle3 saves
(embed_tokens, fc, midlayer.{self_attn,mlp,norms}, norm, lm_head, d2t, t2d), shapes from
configs/llama3-8B-eagle3.json scaled down (hidden 64, 4 heads of 16, 2 KV heads, V = 4096,
k = 1024), random bf16 weights. Expected values are derived independently: kept ids by a
Python sort, logits by an explicit RMSNorm + matmul, FLOPs by the contract's formula.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, eagle3_config, eagle3_tensors, write_draft_dir
from safetensors import safe_open
from safetensors.torch import load_file

from specforge_vocab.choosing.cost import paper_latency_reduction
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.drafts.checkpoint import verify_checkpoint, write_safetensors
from specforge_vocab.drafts.trim import (
    TrimSettings,
    choose_kept_ids,
    restricted_coverage_curve,
    slice_rows,
    trim_checkpoint,
    trim_tensors,
)
from specforge_vocab.errors import InputError, SettingsError
from specforge_vocab.writing.mapping import build_mapping, check_mapping, mapping_fingerprint, save_mapping

V, K, H, HEADS, KV, INTER = 4096, 1024, 64, 4, 2, 224
HEAD_DIM = H // HEADS
EPS = 1e-5


# --------------------------------------------------------------------------- building drafts


draft_config = functools.partial(eagle3_config, vocab_size=V, draft_vocab_size=K)
draft_tensors = functools.partial(eagle3_tensors, vocab_size=V)
write_checkpoint = write_draft_dir


def zipf_like_counts(seed, vocab_size=V, zero_share=0.3):
    """Deterministic Zipf-like token counts over a random permutation of the ids, some ids never seen."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(vocab_size)
    counts = np.floor(2_000_000 / (ranks + 1.0) ** 1.1).astype(np.int64)
    counts[rng.random(vocab_size) < zero_share] = 0
    return counts


def top_ids(counts, k, among=None):
    """The k most frequent ids (ties: smaller id), ascending -- a plain Python sort, independent of mapping.py."""
    pool = range(len(counts)) if among is None else [int(i) for i in among]
    return np.array(sorted(sorted(pool, key=lambda i: (-int(counts[i]), i))[:k]), dtype=np.int64)


OLD_KEPT = top_ids(zipf_like_counts(1), K)  # the ids a "general-data" draft was trained with
WORKLOAD = zipf_like_counts(2)  # the workload to trim for: a different distribution


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(
        tmp_path / "draft",
        draft_tensors(OLD_KEPT),
        draft_config(),
        extra_files={"generation_config.json": '{"do_sample": false}\n'},
    )


def trim(checkpoint, output, counts=WORKLOAD, **kwargs):
    search = kwargs.pop("search", None) or SearchSettings(search=kwargs.pop("method", "exact"), n_calls=5)
    settings = TrimSettings(checkpoint=str(checkpoint), output=str(output), search=search, **kwargs)
    return trim_checkpoint(settings, counts=counts)


def tree_digest(directory: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_output(directory: Path):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def head_logits(tensors, hidden_states):
    """SpecForge compute_logits: RMSNorm with norm.weight, then lm_head, in float32."""
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * tensors["norm.weight"].float()
    return x @ tensors["lm_head.weight"].float().T


def full_vocab_logits(logits, d2t, vocab_size):
    """vLLM's compute_logits: scatter draft logits to target ids arange(k) + d2t, -inf elsewhere."""
    out = torch.full((logits.shape[0], vocab_size), float("-inf"))
    out[:, torch.arange(d2t.shape[0]) + d2t] = logits
    return out


# --------------------------------------------------------------------------- what the trimmed head computes


def test_trimmed_logits_equal_the_originals_on_kept_tokens_and_argmax_maps_to_same_target(ckpt, tmp_path):
    result = trim(ckpt, tmp_path / "out", draft_vocab_size=300)
    before = load_file(str(ckpt / "model.safetensors"))
    after = read_output(tmp_path / "out")
    new_kept = top_ids(WORKLOAD, 300, among=OLD_KEPT)
    assert np.array_equal(result.kept_token_ids, new_kept)

    hidden = torch.randn(32, H, generator=torch.Generator().manual_seed(7))
    old_logits, new_logits = head_logits(before, hidden), head_logits(after, hidden)
    # The old draft's logits for exactly the kept ids, located through the old d2t:
    old_rows = [int(np.flatnonzero(OLD_KEPT == t)[0]) for t in new_kept]
    assert torch.allclose(new_logits, old_logits[:, old_rows], rtol=0, atol=1e-5)
    # ... and the same through both drafts' own mappings, in the target vocabulary (as vLLM serves them).
    old_full = full_vocab_logits(old_logits, before["d2t"], V)
    new_full = full_vocab_logits(new_logits, after["d2t"], V)
    on_kept = torch.zeros(V, dtype=torch.bool)
    on_kept[torch.from_numpy(new_kept)] = True
    assert torch.allclose(new_full[:, on_kept], old_full[:, on_kept], rtol=0, atol=1e-5)
    assert torch.isinf(new_full[:, ~on_kept]).all()
    # argmax over the kept tokens: the same target id either way.
    new_target = torch.argmax(new_logits, -1) + after["d2t"][torch.argmax(new_logits, -1)]
    old_target = torch.argmax(old_full.masked_fill(~on_kept, float("-inf")), -1)
    assert torch.equal(new_target, old_target)
    assert torch.equal(torch.argmax(new_full, -1), old_target)


def test_output_keeps_every_name_and_dtype_and_untouched_bytes_and_passes_section_1(ckpt, tmp_path):
    before_digest = tree_digest(ckpt)
    result = trim(ckpt, tmp_path / "out", draft_vocab_size=300)
    out = tmp_path / "out"
    before = load_file(str(ckpt / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))

    assert set(after) == set(before)
    assert {n: t.dtype for n, t in after.items()} == {n: t.dtype for n, t in before.items()}
    assert after["lm_head.weight"].dtype == torch.bfloat16 and after["lm_head.weight"].shape == (300, H)
    assert after["d2t"].dtype == torch.int64 and after["d2t"].shape == (300,)
    assert after["t2d"].dtype == torch.bool and after["t2d"].shape == (V,)
    changed = {"lm_head.weight", "d2t", "t2d"}
    for name in set(before) - changed:
        assert raw_bytes(after[name]) == raw_bytes(before[name]), name
        assert after[name].shape == before[name].shape
    # The kept rows are the old rows, byte for byte.
    old_rows = np.searchsorted(OLD_KEPT, result.kept_token_ids)
    assert raw_bytes(after["lm_head.weight"]) == raw_bytes(before["lm_head.weight"][torch.from_numpy(old_rows)])

    check_mapping(after["d2t"], after["t2d"], draft_vocab_size=300, vocab_size=V)
    assert np.array_equal(np.arange(300) + after["d2t"].numpy(), result.kept_token_ids)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {
            "format": "pt",
            "mapping_fingerprint": mapping_fingerprint(result.kept_token_ids, V),
        }

    # config.json: only draft_vocab_size changed, text otherwise identical.
    old_text = (ckpt / "config.json").read_text(encoding="utf-8")
    new_text = (out / "config.json").read_text(encoding="utf-8")
    assert new_text == old_text.replace('"draft_vocab_size": 1024', '"draft_vocab_size": 300')
    assert (out / "generation_config.json").read_bytes() == (ckpt / "generation_config.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

    verify_checkpoint(str(out))
    assert tree_digest(ckpt) == before_digest  # the input is never touched
    assert result.sliced_tensors == ["lm_head.weight"] and result.added_tensors == []


def test_new_kept_are_the_most_frequent_old_ids_and_report_has_coverage_and_flops(ckpt, tmp_path):
    result = trim(ckpt, tmp_path / "out", draft_vocab_size=512)
    expected = top_ids(WORKLOAD, 512, among=OLD_KEPT)
    assert np.array_equal(result.kept_token_ids, expected)
    assert set(expected) <= set(OLD_KEPT.tolist())
    # ids outside the old draft are never chosen, however frequent
    outside = np.setdiff1d(np.arange(V), OLD_KEPT)
    assert WORKLOAD[outside].max() > np.sort(WORKLOAD[expected])[0]

    total = int(WORKLOAD.sum())
    assert result.tokens_counted == total
    assert result.old_coverage == pytest.approx(sum(int(WORKLOAD[i]) for i in OLD_KEPT) / total, abs=1e-12)
    assert result.new_coverage == pytest.approx(sum(int(WORKLOAD[i]) for i in expected) / total, abs=1e-12)

    def flops(k):  # contract section 5 with d = h / n_heads, 3 fused layers of width h
        d = H // HEADS
        return (
            2 * 3 * H * H
            + 2 * 2 * H * HEADS * d
            + 2 * (2 * 2 * H * KV * d)
            + 2 * HEADS * d * H
            + 3 * 2 * H * INTER
            + 2 * H * k
        )

    assert (result.old_draft_vocab_size, result.new_draft_vocab_size) == (K, 512)
    assert (result.old_flops, result.new_flops, result.full_vocab_flops) == (flops(K), flops(512), flops(V))
    assert result.flops_reduction == pytest.approx(1 - flops(512) / flops(K))
    text = "\n".join(result.summary_lines())
    assert "1,024 -> 512 of V=4,096" in text and f"{flops(K):,} -> {flops(512):,}" in text
    assert result.as_dict()["new_draft_vocab_size"] == 512 and result.method == "fixed"


def test_export_ids_writes_the_trimmed_drafts_kept_ids_beside_it(ckpt, tmp_path):
    result = trim(ckpt, tmp_path / "out", draft_vocab_size=512, exports=["ids"])
    data = json.loads((tmp_path / "out" / "kept_ids.json").read_text())
    d2t = read_output(tmp_path / "out")["d2t"]
    assert data["kept_ids"] == (torch.arange(512) + d2t).tolist() == result.kept_token_ids.tolist()
    assert data["vocab_size"] == V and "kept_ids.json" in result.files_written


@pytest.mark.parametrize("name", ["sglang-token-map", "speculators"])
def test_exports_that_do_not_fit_a_trimmed_draft_are_refused(ckpt, tmp_path, name):
    with pytest.raises(SettingsError, match=f"--export {name} does not fit trim"):
        trim(ckpt, tmp_path / "out", draft_vocab_size=512, exports=[name])
    assert not (tmp_path / "out").exists()


def test_exact_search_picks_the_best_utility_among_ks_up_to_the_old_k(ckpt, tmp_path):
    search = SearchSettings(search="exact", coverage_weight=0.9, min_vocab_size=50, max_vocab_size=50_000, n_calls=5)
    result = trim(ckpt, tmp_path / "out", search=search)
    total = int(WORKLOAD.sum())
    ordered = sorted((int(WORKLOAD[i]) for i in OLD_KEPT), reverse=True)
    prefix = np.cumsum([0] + ordered)
    best_k, best_u = None, -np.inf
    for k in range(50, K + 1):  # brute force, capped at the old k; latency from the paper's own formula
        utility = 0.9 * (prefix[k] / total) + (1 - 0.9) * paper_latency_reduction(H, INTER, HEADS, KV, V, k)
        if utility > best_u + 1e-12:
            best_k, best_u = k, utility
    assert result.new_draft_vocab_size == best_k and result.method == "exact"
    assert result.search.exact.pick.utility == pytest.approx(best_u, abs=1e-12)
    assert result.search.tpe.trials and all(t.k <= K for t in result.search.tpe.trials)  # TPE searched [50, old k]
    assert np.array_equal(result.kept_token_ids, top_ids(WORKLOAD, best_k, among=OLD_KEPT))


def test_restricted_coverage_curve_stops_at_old_k_below_one():
    counts = np.array([10, 0, 5, 7, 3, 0])
    curve = restricted_coverage_curve(counts, np.array([0, 2, 5]))
    assert curve.tolist() == pytest.approx([0, 10 / 25, 15 / 25, 15 / 25, 15 / 25, 15 / 25, 15 / 25])
    # unseen old ids fill up, smallest first; never an id outside the old set
    assert choose_kept_ids(counts, np.array([0, 1, 4, 5]), 3).tolist() == [0, 1, 4]


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["sharded", "sharded-bin"])
def test_sharded_checkpoint_keeps_its_layout_and_a_consistent_index(tmp_path, layout):
    tensors = draft_tensors(OLD_KEPT, seed=3)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config(), layout=layout)
    trim(src, tmp_path / "out", draft_vocab_size=256)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    old_index = json.loads(next(src.glob("*.index.json")).read_text(encoding="utf-8"))
    # same shards (bin shards become model-0000i-of-0000n.safetensors), same names in each
    assert index["weight_map"] == {
        n: f.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        for n, f in old_index["weight_map"].items()
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {*index["weight_map"].values(), "config.json", "model.safetensors.index.json"}
    )
    assert index["metadata"]["note"] == "kept"
    seen = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / file), framework="pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == file
                seen[name] = handle.get_tensor(name)
    assert set(seen) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in seen.values())
    assert seen["lm_head.weight"].shape == (256, H) and seen["d2t"].shape == (256,)
    for name in set(tensors) - {"lm_head.weight", "d2t", "t2d"}:
        assert raw_bytes(seen[name]) == raw_bytes(tensors[name]), name
    check_mapping(seen["d2t"], seen["t2d"], draft_vocab_size=256, vocab_size=V)
    verify_checkpoint(str(out))


def test_trim_lists_everything_it_did_not_copy(tmp_path):
    """Folders, hidden files, another weight layout and training state are not copied, and each is
    named (with why) in the result and the printed summary; other small files are copied."""
    tensors = draft_tensors(OLD_KEPT, seed=6)
    src = write_checkpoint(
        tmp_path / "draft",
        tensors,
        draft_config(),
        extra_files={"optimizer.pt": "state", "generation_config.json": "{}", ".gitattributes": "*.bin lfs"},
    )
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    (src / "runs").mkdir()
    (src / "runs" / "events.out").write_text("log")
    result = trim(src, tmp_path / "out", draft_vocab_size=200)
    assert result.files_not_copied == [
        ".gitattributes (hidden)",
        "optimizer.pt (weights or training state)",
        "pytorch_model.bin (another weight layout; model.safetensors was read)",
        "runs/ (a folder)",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    line = [x for x in result.summary_lines() if x.startswith("not copied from ")]
    assert line == [f"not copied from {src}: " + ", ".join(result.files_not_copied)]


def test_pytorch_model_bin_is_read_with_weights_only_and_written_as_safetensors(tmp_path):
    tensors = draft_tensors(OLD_KEPT, dtype=torch.float16, embed=False, seed=4)
    src = write_checkpoint(
        tmp_path / "draft",
        tensors,
        draft_config(torch_dtype="float16"),
        layout="bin",
        extra_files={"training_args.bin": "not weights"},
    )
    result = trim(src, tmp_path / "out", draft_vocab_size=200)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert result.files_not_copied == ["training_args.bin (weights or training state)"]
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(tensors)
    assert {n: t.dtype for n, t in after.items()} == {n: t.dtype for n, t in tensors.items()}
    for name in set(tensors) - {"lm_head.weight", "d2t", "t2d"}:
        assert raw_bytes(after[name]) == raw_bytes(tensors[name]), name
    hidden = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    rows = np.searchsorted(OLD_KEPT, result.kept_token_ids)
    assert torch.allclose(head_logits(after, hidden), head_logits(tensors, hidden)[:, rows], rtol=0, atol=1e-4)


def test_pickled_objects_in_pytorch_model_bin_are_refused(tmp_path):
    src = tmp_path / "draft"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(draft_config()), encoding="utf-8")
    torch.save({"lm_head.weight": torch.zeros(K, H), "args": argparse.Namespace(a=1)}, src / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"Cannot read .*pytorch_model.bin with torch.load\(weights_only=True\)"):
        trim(src, tmp_path / "out", draft_vocab_size=10)
    assert not (tmp_path / "out").exists()


def test_mapping_file_is_used_when_the_checkpoint_has_none_and_d2t_t2d_are_added(tmp_path):
    tensors = draft_tensors(OLD_KEPT, mapping=False, seed=5)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    d2t, t2d = build_mapping(OLD_KEPT, V)
    save_mapping(str(tmp_path / "vocab_mapping.pt"), d2t, t2d)
    result = trim(src, tmp_path / "out", draft_vocab_size=128, vocab_mapping=str(tmp_path / "vocab_mapping.pt"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(tensors) | {"d2t", "t2d"}
    assert result.added_tensors == ["d2t", "t2d"] and result.mapping_source.startswith("--vocab-mapping")
    assert np.array_equal(np.arange(128) + after["d2t"].numpy(), top_ids(WORKLOAD, 128, among=OLD_KEPT))
    check_mapping(after["d2t"], after["t2d"], draft_vocab_size=128, vocab_size=V)


def test_a_checkpoint_with_d2t_but_no_t2d_gets_a_rebuilt_t2d(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    del tensors["t2d"]
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    result = trim(src, tmp_path / "out", draft_vocab_size=64)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(tensors) | {"t2d"} and result.added_tensors == ["t2d"]
    assert after["t2d"].nonzero().flatten().tolist() == top_ids(WORKLOAD, 64, among=OLD_KEPT).tolist()
    check_mapping(after["d2t"], after["t2d"], draft_vocab_size=64, vocab_size=V)


def test_full_vocabulary_draft_without_mapping_is_the_identity(tmp_path):
    small_v = 1500
    tensors = draft_tensors(np.arange(small_v), vocab_size=small_v, mapping=False, embed=False, seed=6)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config(vocab_size=small_v, draft_vocab_size=None))
    counts = zipf_like_counts(3, vocab_size=small_v)
    result = trim(src, tmp_path / "out", counts=counts, draft_vocab_size=100)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = top_ids(counts, 100)
    assert result.mapping_source.startswith("identity")
    assert np.array_equal(np.arange(100) + after["d2t"].numpy(), expected)
    assert raw_bytes(after["lm_head.weight"]) == raw_bytes(tensors["lm_head.weight"][torch.from_numpy(expected)])
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["draft_vocab_size"] == 100  # added right after vocab_size, as draft_config does
    assert list(config).index("draft_vocab_size") == list(config).index("vocab_size") + 1


def test_overwrite_replaces_a_previous_output(ckpt, tmp_path):
    trim(ckpt, tmp_path / "out", draft_vocab_size=300)
    with pytest.raises(InputError, match=r"--output .* already exists and is not empty .* pass --overwrite"):
        trim(ckpt, tmp_path / "out", draft_vocab_size=200)
    trim(ckpt, tmp_path / "out", draft_vocab_size=200, overwrite=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["draft_vocab_size"] == 200
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["d2t"].shape == (200,)


def test_tensors_that_only_look_draft_sized_are_reported_and_left_alone(tmp_path):
    tensors = draft_tensors(OLD_KEPT, embed=False)
    tensors["midlayer.extra_scale"] = torch.arange(K, dtype=torch.float32)  # size equals k by coincidence
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    result = trim(src, tmp_path / "out", draft_vocab_size=100)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert result.unsliced_draft_sized == ["midlayer.extra_scale"]
    assert raw_bytes(after["midlayer.extra_scale"]) == raw_bytes(tensors["midlayer.extra_scale"])
    assert "left unchanged although a dimension equals 1024: midlayer.extra_scale" in "\n".join(result.summary_lines())


def test_pytorch_model_bin_with_shared_storage_is_written(tmp_path):
    tensors = draft_tensors(OLD_KEPT, embed=False, dtype=torch.float32)
    tensors["midlayer.alias"] = tensors["fc.weight"][:8]  # a view: torch.save keeps the sharing
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config(), layout="bin")
    trim(src, tmp_path / "out", draft_vocab_size=100)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(after["midlayer.alias"], tensors["fc.weight"][:8])
    assert torch.equal(after["fc.weight"], tensors["fc.weight"])


# --------------------------------------------------------------------------- refusals


def refuse(src, tmp_path, message, **kwargs):
    with pytest.raises(InputError, match=message):
        trim(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists(), "a refused trim must write nothing"


def test_refuses_a_trimmed_draft_without_any_mapping(tmp_path):
    src = write_checkpoint(tmp_path / "draft", draft_tensors(OLD_KEPT, mapping=False), draft_config())
    refuse(
        src,
        tmp_path,
        r"draft_vocab_size is 1024 but vocab_size is 4096, and the checkpoint holds no d2t/t2d, so "
        r"which target id each LM-head row stands for is unknown\. Pass --vocab-mapping",
        draft_vocab_size=100,
    )


def test_refuses_a_requested_k_above_the_old_k(ckpt, tmp_path):
    refuse(
        ckpt,
        tmp_path,
        r"--draft-vocab-size must be at most the checkpoint's draft_vocab_size \(1024\), but got "
        r"2000\. .*cannot be added without retraining",
        draft_vocab_size=2000,
    )


def test_refuses_a_search_that_cannot_stay_below_the_old_k(ckpt, tmp_path):
    refuse(
        ckpt,
        tmp_path,
        r"--min-vocab-size must be at most the checkpoint's draft_vocab_size \(1024\), but got 2000",
        search=SearchSettings(min_vocab_size=2000, max_vocab_size=3000),
    )
    reachable = sum(int(WORKLOAD[i]) for i in OLD_KEPT) / WORKLOAD.sum()
    refuse(
        ckpt,
        tmp_path,
        rf"--min-coverage must be reachable with the checkpoint's 1024 kept tokens, but got 0\.99: "
        rf"they cover only {reachable:.6f}",
        search=SearchSettings(min_coverage=0.99),
    )


def test_refuses_lm_head_rows_that_disagree_with_the_config(tmp_path):
    src = write_checkpoint(tmp_path / "draft", draft_tensors(OLD_KEPT), draft_config(draft_vocab_size=2048))
    refuse(
        src,
        tmp_path,
        r"config.json says draft_vocab_size = 2048, but lm_head.weight has shape \[1024, 64\]; its "
        r"rows must equal draft_vocab_size",
        draft_vocab_size=100,
    )


def test_refuses_a_config_without_draft_vocab_size_for_a_trimmed_head(tmp_path):
    src = write_checkpoint(tmp_path / "draft", draft_tensors(OLD_KEPT), draft_config(draft_vocab_size=None))
    refuse(
        src,
        tmp_path,
        r"config.json has no draft_vocab_size, so vLLM and SGLang take vocab_size = 4096, but "
        r"lm_head.weight has shape \[1024, 64\]",
        draft_vocab_size=100,
    )


def test_refuses_a_hidden_size_that_disagrees_with_the_head(tmp_path):
    src = write_checkpoint(tmp_path / "draft", draft_tensors(OLD_KEPT), draft_config(hidden=128))
    refuse(src, tmp_path, r"config.json says hidden_size = 128, but lm_head.weight has 64 columns", draft_vocab_size=10)


def test_refuses_a_d2t_whose_length_differs_from_the_head_rows(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    tensors["d2t"], tensors["t2d"] = build_mapping(OLD_KEPT[:1000], V)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    refuse(
        src,
        tmp_path,
        r"d2t has shape \[1000\] but the LM head has 1024 rows; d2t must have one entry per row",
        draft_vocab_size=100,
    )


def test_refuses_a_t2d_for_another_vocabulary(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    tensors["t2d"] = torch.cat([tensors["t2d"], torch.zeros(10, dtype=torch.bool)])
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    refuse(src, tmp_path, r"t2d has shape \[4106\] but config.json says vocab_size = 4096", draft_vocab_size=100)


def test_refuses_never_filled_mapping_buffers(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    tensors["d2t"], tensors["t2d"] = torch.zeros(K, dtype=torch.int64), torch.zeros(V, dtype=torch.bool)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    refuse(src, tmp_path, r"t2d must mark exactly draft_vocab_size = 1024 ids True, but marks 0", draft_vocab_size=100)


def test_refuses_a_bf16_d2t(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    tensors["d2t"] = tensors["d2t"].to(torch.bfloat16)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    refuse(src, tmp_path, r"d2t must be int64, never a float type, but got torch.bfloat16", draft_vocab_size=100)


def test_refuses_a_mapping_file_that_disagrees_with_the_checkpoint(ckpt, tmp_path):
    other = np.sort(np.concatenate([OLD_KEPT[:-1], [np.setdiff1d(np.arange(V), OLD_KEPT)[-1]]]))
    d2t, t2d = build_mapping(other, V)
    save_mapping(str(tmp_path / "m.pt"), d2t, t2d)
    refuse(
        ckpt,
        tmp_path,
        r"--vocab-mapping .*m\.pt disagrees with the d2t stored in .*: draft row \d+ maps to target "
        r"id \d+ in the file but to \d+ in the checkpoint \(\d+ rows differ\)",
        vocab_mapping=str(tmp_path / "m.pt"),
        draft_vocab_size=100,
    )


def test_refuses_counts_for_another_vocabulary(ckpt, tmp_path):
    refuse(
        ckpt,
        tmp_path,
        r"vocab_size is 4096 but the token counts cover 4000 ids",
        counts=WORKLOAD[:4000],
        draft_vocab_size=100,
    )


def test_refuses_a_quantised_head_it_cannot_slice(tmp_path):
    tensors = draft_tensors(OLD_KEPT)
    tensors["lm_head.weight_scale"] = torch.ones(K, 1)
    src = write_checkpoint(tmp_path / "draft", tensors, draft_config())
    refuse(
        src,
        tmp_path,
        r"tensor 'lm_head.weight_scale' belongs to the LM head but is not lm_head.weight or "
        r"lm_head.bias",
        draft_vocab_size=100,
    )


def test_refuses_to_write_over_the_input_or_without_counts(ckpt, tmp_path):
    with pytest.raises(SettingsError, match=r"--output must be a directory other than --checkpoint"):
        trim_checkpoint(TrimSettings(checkpoint=str(ckpt), output=str(ckpt)), counts=WORKLOAD)
    with pytest.raises(SettingsError, match=r"Token counts are needed .* --dataset-path .* or --counts FILE"):
        trim_checkpoint(TrimSettings(checkpoint=str(ckpt), output=str(tmp_path / "out")))


def test_refuses_a_missing_checkpoint_and_a_directory_without_weights(tmp_path):
    refuse(tmp_path / "nope", tmp_path, r"--checkpoint .*nope must be a draft checkpoint directory", draft_vocab_size=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(draft_config()), encoding="utf-8")
    refuse(
        tmp_path / "empty",
        tmp_path,
        r"holds no model.safetensors, model.safetensors.index.json, pytorch_model.bin",
        draft_vocab_size=1,
    )


def test_refuses_an_index_that_disagrees_with_its_shards(tmp_path):
    src = write_checkpoint(tmp_path / "draft", draft_tensors(OLD_KEPT), draft_config(), layout="sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["fc.weight"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refuse(
        src,
        tmp_path,
        r"tensor 'fc.weight' is stored in model-00002-of-00002.safetensors but the index says "
        r"'model-00001-of-00002.safetensors'",
        draft_vocab_size=100,
    )


# --------------------------------------------------------------------------- the pure core


def test_trim_tensors_slices_rows_and_rebuilds_the_mapping():
    old = np.array([1, 3, 5, 7])
    d2t, t2d = build_mapping(old, 9)
    weight = torch.arange(8.0, dtype=torch.bfloat16).reshape(4, 2)
    bias = torch.tensor([10.0, 11.0, 12.0, 13.0])
    other = torch.ones(4, 4)
    out = trim_tensors(
        {"model.lm_head.weight": weight, "model.lm_head.bias": bias, "x": other, "d2t": d2t, "t2d": t2d},
        old,
        np.array([3, 7]),
    )
    assert out["model.lm_head.weight"].tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert out["model.lm_head.bias"].tolist() == [11.0, 13.0]
    assert out["x"] is other
    assert out["d2t"].tolist() == [3 - 0, 7 - 1] and out["t2d"].nonzero().flatten().tolist() == [3, 7]
    with pytest.raises(
        InputError,
        match=r"Token id 4 is not in the checkpoint's draft vocabulary, so it has no trained "
        r"LM-head row",
    ):
        trim_tensors({"lm_head.weight": weight, "d2t": d2t, "t2d": t2d}, old, np.array([3, 4]))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_slice_rows_copies_bytes_for_any_dtype():
    base = torch.randn(6, 5)
    rows = np.array([0, 4, 5])
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.bool):
        tensor = base.to(dtype)
        picked = slice_rows(tensor, rows)
        assert picked.dtype == dtype and picked.shape == (3, 5)
        for i, r in enumerate(rows):
            assert raw_bytes(picked[i]) == raw_bytes(tensor[r])


def test_write_safetensors_streams_a_file_the_safetensors_library_reads_back(tmp_path):
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a.mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as handle:
        write_safetensors(handle, tensors, metadata={"format": "pt", "n": 3})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "n": "3"}
        back = {name: handle.get_tensor(name) for name in handle.keys()}
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name


# --------------------------------------------------------------------------- end to end: real tokenizer and data


def test_cli_trim_reads_a_counts_file(ckpt, tmp_path, capsys):
    save_counts(str(tmp_path / "counts.safetensors"), WORKLOAD, {"format": "specforge-vocab-counts"})
    assert (
        main(
            [
                "trim",
                "--checkpoint",
                str(ckpt),
                "--counts",
                str(tmp_path / "counts.safetensors"),
                "--draft-vocab-size",
                "100",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(np.arange(100) + after["d2t"].numpy(), top_ids(WORKLOAD, 100, among=OLD_KEPT))
    assert "draft_vocab_size: 1,024 -> 100 of V=4,096" in printed and "k chosen by: fixed" in printed


def test_cli_trim_counts_a_real_dataset_with_a_real_tokenizer(tmp_path, llama3_dir, capsys):
    """A draft whose vocabulary came from GSM8K, trimmed for code (HumanEval + GPTeacher codegen), Llama 3 tokenizer."""
    vocab_size = 128_256
    general = count_dataset(
        CountSettings(
            dataset_paths=[str(DATA / "gsm8k_train_sample.jsonl"), str(DATA / "hh_rlhf_multiturn_sample.jsonl")],
            tokenizer_path=llama3_dir,
            chat_template="llama3",
        )
    ).counts
    assert general.shape == (vocab_size,)
    old_k = 4096
    old_kept = top_ids(general, old_k)
    tensors = draft_tensors(old_kept, vocab_size=vocab_size, hidden=32, embed=False, seed=9)
    config = draft_config(vocab_size=vocab_size, draft_vocab_size=old_k, hidden=32)
    src = write_checkpoint(tmp_path / "draft", tensors, config)

    code = [str(DATA / "humaneval_sample.jsonl"), str(DATA / "gpteacher_codegen_sample.jsonl")]
    assert (
        main(
            [
                "trim",
                "--checkpoint",
                str(src),
                "--dataset-path",
                *code,
                "--tokenizer-path",
                llama3_dir,
                "--chat-template",
                "llama3",
                "--search",
                "exact",
                "--n-calls",
                "5",
                "--coverage-weight",
                "0.95",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out

    workload = count_dataset(
        CountSettings(dataset_paths=code, tokenizer_path=llama3_dir, chat_template="llama3")
    ).counts
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    new_k = after["d2t"].shape[0]
    assert 50 <= new_k <= old_k
    kept = np.arange(new_k) + after["d2t"].numpy()
    assert np.array_equal(kept, top_ids(workload, new_k, among=old_kept))
    check_mapping(after["d2t"], after["t2d"], draft_vocab_size=new_k, vocab_size=vocab_size)
    hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    rows = np.searchsorted(old_kept, kept)
    assert torch.allclose(head_logits(after, hidden), head_logits(tensors, hidden)[:, rows], rtol=0, atol=1e-5)

    text = printed
    total = int(workload.sum())
    old_cov = sum(int(workload[i]) for i in old_kept) / total
    new_cov = sum(int(workload[i]) for i in kept) / total
    assert f"draft_vocab_size: 4,096 -> {new_k:,} of V=128,256" in text
    assert f"coverage of {total:,} counted tokens: {old_cov:.4%} -> {new_cov:.4%}" in text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["draft_vocab_size"] == new_k


def test_cli_trim_counts_pre_tokenized_prompts(ckpt, tmp_path, capsys):
    """--prompts-path (like --hidden-states-path) is a data source for trim too, never silently dropped."""
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(40):
        ids = rng.choice(OLD_KEPT, size=30).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 10 + [1] * 20})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["trim", "--checkpoint", str(ckpt), "--prompts-path", str(prompts), "--draft-vocab-size", "50"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    counts = np.bincount([t for r in rows for t, m in zip(r["input_ids"], r["loss_mask"]) if m], minlength=V)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(np.arange(50) + after["d2t"].numpy(), top_ids(counts, 50, among=OLD_KEPT))
