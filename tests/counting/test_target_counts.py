"""Target-argmax counts are exact: equal, id for id, to the plain reference of SpecForge's offline path
(tests/specforge_reference.py: full logits from the same operands, bfloat16 rounding, argmax, SpecForge's
positions), on feature files and target heads written here in SpecForge's formats.

The features cover hidden states whose argmax is known by construction (including exact ties and
near-ties at a bfloat16 rounding boundary, and an all-zero hidden state where every id ties) and
random ones; .ckpt and .ckpt.gz, with and without a batch dimension, truncated by max_length.
"""

from __future__ import annotations

import numpy as np
import pytest
import specforge_reference as reference
import torch
from conftest import (
    DATA,
    LLAMA3_DIR,
    masked_examples,
    read_jsonl,
    run_cli,
    write_feature_sample,
    write_target_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from specforge_vocab.counting.counts_file import read_counts_file
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.features import iter_feature_files, list_feature_files
from specforge_vocab.counting.pretokenized import count_masked_ids
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.counting.target_counts import ArgmaxCounter, TargetArgmax, round_to_bf16

V, H = 3000, 64


def random_head(seed: int, vocab: int = V, hidden: int = H):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, hidden, generator=generator) * 0.05).to(torch.bfloat16)


# ---------------------------------------------------------------- crafted heads: the argmax known by construction

# Ids with a large basis row (the argmax of hidden states pointing along that axis), and the ids of the
# crafted ties: 1500 and 2900 are equal rows (an exact tie: the lower id wins); 1200 and 2200 have logits
# 1.0 and 1.0 + 2**-8 on the tie probe (the latter is the midpoint between the bfloat16 numbers 1.0 and
# 1.0078125, which rounds to even, so both are 1.0 and the lower id 1200 wins although its exact logit is
# larger); on the near-tie probe 2200 has 1.0 + 2**-8 + 2**-20, which rounds up to 1.0078125 and wins.
BASIS_IDS = [7, 2999, 123, 1024, 2500, 42, 0, 1999]
TIE_A, TIE_B = 1500, 2900
MID_LOW, MID_HIGH = 1200, 2200


def crafted_head():
    weight = random_head(1).float() * 0.2
    for axis, token in enumerate(BASIS_IDS):
        weight[token] = 0
        weight[token, axis] = 8.0
    weight[TIE_B] = weight[TIE_A] = 0
    weight[TIE_A, 10] = weight[TIE_B, 10] = 4.0
    for token in (MID_LOW, MID_HIGH):
        weight[token] = 0
        weight[token, 20] = 1.0
    weight[MID_HIGH, 21] = 2.0**-8
    weight[MID_HIGH, 22] = 2.0**-20
    return weight.to(torch.bfloat16)


def probe(*entries):
    h = torch.zeros(H)
    for axis, value in entries:
        h[axis] = value
    return h


KNOWN = [
    (probe((0, 1.0)), 7),
    (probe((1, 2.0), (50, 0.1)), 2999),
    (probe((2, 1.0), (3, 0.5)), 123),
    (probe((10, 1.0)), TIE_A),  # exact tie: the lower id
    (probe((20, 1.0), (21, 1.0)), MID_LOW),  # 1.0 vs the midpoint 1.0 + 2**-8: both round to 1.0, lower id
    (probe((20, 1.0), (21, 1.0), (22, 1.0)), MID_HIGH),  # just above the midpoint: rounds up, wins
    (probe(), 0),  # all-zero hidden state: every logit is 0, id 0
    (probe((7, 3.0)), 1999),
]


def test_crafted_hidden_states_give_the_argmax_they_were_built_for():
    weight = crafted_head()
    hidden = torch.stack([h for h, _ in KNOWN]).to(torch.bfloat16)
    expected = [token for _, token in KNOWN]
    exact = reference.bf16_round_by_bits((hidden.double() @ weight.double().T).numpy()).argmax(axis=1)
    assert exact.tolist() == expected  # the construction holds in the reference
    assert (hidden.double() @ weight.double().T).numpy()[4].argmax() == MID_HIGH  # rounding decides probe 4
    for keep, tile in [(32, 8192), (1, 7), (2, 1000), (V, 512)]:  # keep=1: every tie goes through the full scan
        assert TargetArgmax(weight, vocab_tile=tile, keep=keep)(hidden).tolist() == expected


def test_random_hidden_states_match_the_reference_for_any_tiling():
    weight = random_head(2)
    hidden = (torch.randn(700, H, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    expected = reference.bf16_round_by_bits((hidden.double() @ weight.double().T).numpy()).argmax(axis=1)
    for tile, keep in [(8192, 32), (333, 4), (29, 1)]:
        assert np.array_equal(TargetArgmax(weight, vocab_tile=tile, keep=keep)(hidden), expected)
    counter = ArgmaxCounter(TargetArgmax(weight), block=97)
    for start in range(0, 700, 130):
        counter.add(hidden[start : start + 130], source="x")
    counter.flush()
    assert np.array_equal(counter.counts, np.bincount(expected, minlength=V)) and counter.positions == 700


def test_fp32_accumulation_differs_only_at_genuine_near_ties():
    """SpecForge's own arithmetic (an fp32 GEMM rounded to bfloat16) agrees except where two exact logits round
    within one bfloat16 step of each other: the only place accumulation order can move the argmax."""
    weight = random_head(4)
    hidden = (torch.randn(2000, H, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    ours = TargetArgmax(weight)(hidden)
    fp32 = (hidden.float() @ weight.float().T).to(torch.bfloat16).float().argmax(dim=1).numpy()
    exact = (hidden.double() @ weight.double().T).numpy()
    for row in np.flatnonzero(ours != fp32):
        a, b = exact[row, ours[row]], exact[row, fp32[row]]
        assert abs(a - b) <= 2.0 ** (np.floor(np.log2(max(abs(a), abs(b)))) - 7)
    assert np.mean(ours == fp32) > 0.99


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32))
def test_round_to_bf16_matches_torch_on_fp32_values(value):
    expected = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16).double().numpy()
    assert round_to_bf16(np.array([value], dtype=np.float64)).tolist() == expected.tolist()


def test_round_to_bf16_rounds_once_from_float64():
    # 1 + 2**-8 + 2**-40 lies just above the midpoint of 1.0 and 1.0078125; via float32 it would first
    # round to the midpoint itself and then to even (1.0).
    assert round_to_bf16(np.array([1 + 2**-8 + 2**-40])).tolist() == [1.0078125]
    assert reference.bf16_round_by_bits(np.array([1 + 2**-8 + 2**-40])).tolist() == [1.0078125]


# ---------------------------------------------------------------- SpecForge-format files, end to end


def feature_files(root, weight, seed: int, *, ids_high: int = V, records=None):
    """Feature files of known and random hidden states: nested rows_* folders, every third gzipped, every
    other one without the batch dimension; capture-padded tails (id 0, mask 0) on some."""
    rng = np.random.default_rng(seed)
    known = torch.stack([h for h, _ in KNOWN]).to(torch.bfloat16)
    samples = records or []
    if records is None:
        for _ in range(12):
            length = int(rng.integers(8, 40))
            ids = rng.integers(0, ids_high, size=length)
            mask = (rng.random(length) < 0.6).astype(np.int64)
            samples.append((ids, mask))
    paths = []
    for i, (ids, mask) in enumerate(samples):
        ids, mask = np.asarray(ids, dtype=np.int64), np.array(mask, dtype=np.int64)
        length = len(ids)
        hidden = torch.from_numpy(rng.standard_normal((length, weight.shape[1])) * 2).to(torch.bfloat16)
        if i % 3 == 0 and weight.shape[1] == H:  # put the crafted probes at the teachers of the first positions
            rows = min(length - 1, len(KNOWN))
            hidden[1 : rows + 1] = known[:rows]
            mask[:rows] = 1
        if i % 4 == 1:  # capture padding: pad ids and mask 0 after the real tokens
            ids, mask = np.concatenate([ids, np.zeros(5, np.int64)]), np.concatenate([mask, np.zeros(5, np.int64)])
            pad = torch.from_numpy(rng.standard_normal((5, weight.shape[1])) * 2).to(torch.bfloat16)
            hidden = torch.cat([hidden, pad])
        name = f"rows_{i // 4 * 4}-{i // 4 * 4 + 4}/data_{i}.ckpt" + (".gz" if i % 3 == 2 else "")
        paths.append(write_feature_sample(root / name, ids, mask, hidden, batch_dim=i % 2 == 0, compress=i % 3 == 2))
    return sorted(str(p) for p in paths)


@pytest.mark.parametrize("max_length", [2048, 17])
def test_count_command_equals_the_reference_on_a_sharded_target(tmp_path, capsys, max_length):
    weight = crafted_head()
    target = write_target_model(tmp_path / "target", weight, shards=3)
    paths = feature_files(tmp_path / "features", weight, seed=6)
    assert list_feature_files(str(tmp_path / "features")) == paths
    out = tmp_path / "counts.safetensors"
    argv = ["count", "--hidden-states-path", str(tmp_path / "features"), "--target-model-path", str(target)]
    code, stdout, stderr = run_cli(
        [*argv, "--count-source", "target-argmax", "--max-length", str(max_length), "--output", str(out)], capsys
    )
    assert code == 0, stderr
    counts, metadata, by_source = read_counts_file(str(out))
    expected = reference.target_argmax_counts(paths, weight, max_length)
    assert np.array_equal(counts, expected) and expected.sum() > 60
    assert expected[[t for _, t in KNOWN if t]].all()  # the crafted winners were counted
    tokens = count_masked_ids(iter_feature_files(str(tmp_path / "features"), max_length), V)
    assert np.array_equal(by_source["tokens"], tokens) and np.array_equal(by_source["target-argmax"], expected)
    assert metadata["count_source"] == "target-argmax" and metadata["target_positions"] == str(expected.sum())
    assert "target argmax at the trained positions" in stdout

    out_tokens = tmp_path / "tokens.safetensors"
    code, _, stderr = run_cli(
        ["count", "--hidden-states-path", str(tmp_path / "features"), "--target-vocab-size", str(V)]
        + ["--max-length", str(max_length), "--output", str(out_tokens)],
        capsys,
    )
    assert code == 0, stderr
    counts, metadata, by_source = read_counts_file(str(out_tokens))
    assert np.array_equal(counts, tokens) and by_source == {} and metadata["count_source"] == "tokens"


def test_real_llama3_vocabulary_with_real_token_ids(tmp_path):
    """V = 128,256 (Llama-3) with a small hidden size; the input ids are real tokenized conversations."""
    records = read_jsonl(DATA / "gsm8k_test_sample.jsonl")[:6]
    examples = masked_examples(records, LLAMA3_DIR, "llama3", 2048)
    weight = random_head(7, vocab=128256, hidden=16)
    target = write_target_model(tmp_path / "target", weight, index=False)
    paths = feature_files(tmp_path / "features", weight, seed=8, records=examples)
    settings_ = CountSettings(
        hidden_states_path=str(tmp_path / "features"),
        target_model_path=str(target),
        count_source="target-argmax",
        max_length=300,
    )
    counted = obtain_counts(settings_)
    assert np.array_equal(counted.counts, reference.target_argmax_counts(paths, weight, 300))
    assert np.array_equal(
        counted.by_source["tokens"], count_masked_ids(iter_feature_files(str(tmp_path / "features"), 300), 128256)
    )
    assert counted.counts.sum() > 300
