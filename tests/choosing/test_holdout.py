"""Held-out split by record hash, evaluation sets and the Poisson bootstrap: unit checks, the
fixture-size gsm8k check, and the full gsm8k check on ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
from conftest import DATA, optimize_summary, read_jsonl, shared_data_or_skip

from specforge_vocab.choosing.holdout import (
    WEIGHT_632,
    BootstrapTally,
    EvaluationSettings,
    HoldoutTally,
    bootstrap_analysis,
    coverage_of,
    holdout_unit,
    is_held_out,
    pinned_frequency_order,
    poisson_weights,
    record_digest,
)
from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.data import Record
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.writing.mapping import kept_token_ids

V = 1000


def records_with_ids(n: int = 200, seed: int = 0):
    """Synthetic records (distinct JSON) with masked ids drawn from a skewed distribution."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = {"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        ids = np.minimum(rng.zipf(1.3, size=rng.integers(5, 40)) - 1, V - 1).astype(np.int64)
        out.append((Record("synthetic", i + 1, i, data), ids))
    return out


# --------------------------------------------------------------------------- the split


def test_record_digest_is_canonical_json_sha256():
    import hashlib

    a = {"b": 1, "a": [1, "é"]}
    b = {"a": [1, "é"], "b": 1}
    assert record_digest(a) == record_digest(b)  # key order does not matter
    expected = hashlib.sha256('{"a":[1,"é"],"b":1}'.encode("utf-8")).digest()
    assert record_digest(a) == expected
    assert 0.0 <= holdout_unit(expected) < 1.0
    assert holdout_unit(b"\x80" + bytes(31)) == 0.5


def test_split_is_deterministic_disjoint_and_independent_of_order():
    records = records_with_ids(400)
    first, second = HoldoutTally(V, 0.25), HoldoutTally(V, 0.25)
    for record, ids in records:
        first.add(record, ids)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    for i, (record, ids) in enumerate(shuffled):  # another order, other positions
        second.add(Record("elsewhere", 1, i, record.data), ids)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.held_out, second.held_out)
    # disjoint and complete: each record on exactly one side
    sides = [is_held_out(record_digest(r.data), 0.25) for r, _ in records]
    assert first.held_out_records == sum(sides) and first.train_records == len(records) - sum(sides)
    total = sum(np.bincount(ids, minlength=V) for _, ids in records)
    assert np.array_equal(first.train + first.held_out, total)
    held = sum(np.bincount(ids, minlength=V) for (_, ids), side in zip(records, sides) if side)
    assert np.array_equal(first.held_out, held)
    assert 0.15 < sum(sides) / len(records) < 0.35
    # merge of fresh copies filled separately equals one pass
    a, b = first.fresh(), first.fresh()
    for i, (record, ids) in enumerate(records):
        (a if i % 2 else b).add(record, ids)
    a.merge(b)
    assert np.array_equal(a.train, first.train) and a.held_out_records == first.held_out_records


def test_split_of_real_records_with_the_counter(llama3_dir):
    settings = CountSettings(
        dataset_paths=[str(DATA / "gsm8k_train_sample.jsonl")],
        tokenizer_path=llama3_dir,
        chat_template="llama3",
        num_workers=1,
    )
    tally = HoldoutTally(128256, 0.3)
    result = count_dataset(settings, tallies=[tally])
    assert np.array_equal(tally.train + tally.held_out, result.counts)
    rows = read_jsonl(DATA / "gsm8k_train_sample.jsonl")
    expected = sum(is_held_out(record_digest(r), 0.3) for r in rows)
    assert tally.held_out_records == expected and tally.train_records == len(rows) - expected
    again = HoldoutTally(128256, 0.3)
    count_dataset(settings, tallies=[again])
    assert np.array_equal(again.held_out, tally.held_out)


# --------------------------------------------------------------------------- the bootstrap tally


def test_poisson_weights_are_fixed_by_seed_and_record():
    d = record_digest({"x": 1})
    assert np.array_equal(poisson_weights(d, 42, 50), poisson_weights(d, 42, 50))
    assert not np.array_equal(poisson_weights(d, 42, 50), poisson_weights(d, 43, 50))
    many = np.concatenate([poisson_weights(record_digest({"x": i}), 7, 200) for i in range(200)])
    assert abs(many.mean() - 1.0) < 0.02 and abs(np.mean(many == 0) - np.exp(-1)) < 0.01


def test_bootstrap_tally_equals_a_direct_computation_and_merges():
    records = records_with_ids(150, seed=2)
    tally = BootstrapTally(V, 20, seed=5, holdout_fraction=0.2)
    for record, ids in records:
        tally.add(record, ids)
    in_bag = np.zeros((V, 20), dtype=np.int64)
    out_of_bag = np.zeros((V, 20), dtype=np.int64)
    used = 0
    for record, ids in records:
        digest = record_digest(record.data)
        if is_held_out(digest, 0.2):
            continue
        used += 1
        hist = np.bincount(ids, minlength=V)
        w = poisson_weights(digest, 5, 20)
        in_bag += hist[:, None] * w[None, :]
        out_of_bag += hist[:, None] * (w == 0)[None, :]
    assert tally.records == used
    assert np.array_equal(tally.in_bag, in_bag) and np.array_equal(tally.out_of_bag, out_of_bag)
    assert tally.in_bag.dtype == np.int32
    # chunks filled in fresh copies and merged (as worker processes do, via pickle) equal one pass
    parts = [tally.fresh() for _ in range(3)]
    for i, (record, ids) in enumerate(records):
        parts[i % 3].add(record, ids)
    merged = pickle.loads(pickle.dumps(parts[0]))
    for part in parts[1:]:
        merged.merge(pickle.loads(pickle.dumps(part)))
    assert np.array_equal(merged.in_bag, in_bag) and np.array_equal(merged.out_of_bag, out_of_bag)
    assert merged.records == used
    assert len(pickle.dumps(parts[0])) < tally.in_bag.nbytes  # only touched rows travel


def test_bootstrap_tally_promotes_before_int32_overflow():
    tally = BootstrapTally(10, 3, seed=0)
    tally.in_bag_totals[:] = 2**31 - 5
    record = Record("x", 1, 0, {"big": True})
    tally.add(record, np.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.int64))
    weights = poisson_weights(record_digest({"big": True}), 0, 3)
    if weights.max() > 0:
        assert tally.in_bag.dtype == np.int64


def test_bootstrap_analysis_by_hand():
    records = records_with_ids(300, seed=4)
    tally = BootstrapTally(V, 30, seed=1)
    counts = np.zeros(V, dtype=np.int64)
    for record, ids in records:
        tally.add(record, ids)
        counts += np.bincount(ids, minlength=V)
    k = 40
    train = coverage_of(kept_token_ids(counts, k), counts)
    result = bootstrap_analysis(
        tally, k=k, train_coverage=train, choose_k=lambda c: int(np.count_nonzero(c)), confidence=0.9
    )
    for b in (0, 7, 29):
        c = tally.in_bag[:, b].astype(np.int64)
        kept = kept_token_ids(c, k)
        assert result.coverage_in_sample[b] == c[kept].sum() / c.sum()
        oob = tally.out_of_bag[:, b].astype(np.int64)
        assert result.coverage_out_of_bag[b] == oob[kept].sum() / oob.sum()
        assert result.chosen_k[b] == np.count_nonzero(c)
    assert np.allclose(result.coverage_632, (1 - WEIGHT_632) * train + WEIGHT_632 * result.coverage_out_of_bag)
    low, high = result.unseen_interval
    assert low == pytest.approx(np.quantile(result.coverage_out_of_bag, 0.05))
    assert high == pytest.approx(np.quantile(result.coverage_632, 0.95))
    summary = result.as_dict()
    assert summary["coverage_at_k"]["train"] == train and summary["replicates"] == 30
    json.dumps(summary, allow_nan=False)
    # pinned ids come first in the kept order
    assert pinned_frequency_order(counts, [V - 1])[0] == V - 1


def test_evaluation_settings_problems(tmp_path):
    assert EvaluationSettings().problems() == []
    bad = EvaluationSettings(
        holdout_fraction=1.0,
        eval_dataset_paths=[str(tmp_path / "none.jsonl")],
        bootstrap=1,
        confidence=1.5,
        min_token_count=-1,
    )
    assert [p.split()[0] for p in bad.problems()] == [
        "--holdout-fraction",
        "--eval-dataset-path",
        "--bootstrap",
        "--bootstrap-confidence",
        "--min-token-count",
    ]


# --------------------------------------------------------------------------- end to end


def run(tmp_path, llama3_dir, *extra, name="out"):
    n_calls = [] if "--n-calls" in extra else ["--n-calls", "10"]
    summary, _ = optimize_summary(
        tmp_path, "--tokenizer-path", llama3_dir, "--chat-template", "llama3", *n_calls, *extra, name=name
    )
    return summary


def test_fixture_gsm8k_test_coverage_falls_in_the_bootstrap_interval(tmp_path, llama3_dir):
    evals = [
        str(DATA / n) for n in ("gsm8k_test_sample.jsonl", "humaneval_sample.jsonl", "mt_bench_gpt4_reference.jsonl")
    ]
    summary = run(
        tmp_path,
        llama3_dir,
        "--dataset-path",
        str(DATA / "gsm8k_train_sample.jsonl"),
        "--search",
        "exact",
        "--max-vocab-size",
        "4000",
        "--bootstrap",
        "40",
        "--eval-dataset-path",
        *evals,
    )
    coverage = summary["coverage_at_draft_vocab_size"]
    assert coverage["train"] == summary["coverage"]
    evaluated = coverage["eval"]
    assert set(evaluated) == {"gsm8k_test_sample", "humaneval_sample", "mt_bench_gpt4_reference"}
    low, high = summary["bootstrap"]["coverage_at_k"]["unseen"]["interval"]
    assert low <= evaluated["gsm8k_test_sample"] <= high
    # out-of-domain sets are covered worse than the in-domain test set
    assert evaluated["humaneval_sample"] < evaluated["gsm8k_test_sample"]
    assert evaluated["mt_bench_gpt4_reference"] < evaluated["gsm8k_test_sample"]
    assert (tmp_path / "out" / "coverage_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_holdout_picks_on_the_train_side(tmp_path, llama3_dir):
    summary = run(
        tmp_path,
        llama3_dir,
        "--dataset-path",
        str(DATA / "gsm8k_train_sample.jsonl"),
        "--search",
        "exact",
        "--max-vocab-size",
        "4000",
        "--holdout-fraction",
        "0.3",
    )
    rows = read_jsonl(DATA / "gsm8k_train_sample.jsonl")
    held = sum(is_held_out(record_digest(r), 0.3) for r in rows)
    assert summary["holdout"]["held_out_records"] == held and summary["holdout"]["train_records"] == len(rows) - held
    assert summary["tokens_counted"] == summary["holdout"]["train_tokens"] + summary["holdout"]["held_out_tokens"]
    coverage = summary["coverage_at_draft_vocab_size"]
    assert coverage["held_out"] < coverage["train"]
    # the mapping keeps the train side's top k
    import torch

    mapping = torch.load(tmp_path / "out" / "vocab_mapping.pt", weights_only=True)
    assert int(mapping["t2d"].sum()) == summary["optimal_draft_vocab_size"]


def test_an_empty_held_out_side_is_reported_not_divided_by(tmp_path, llama3_dir):
    rows = read_jsonl(DATA / "gsm8k_train_sample.jsonl")
    assert not any(is_held_out(record_digest(r), 0.0001) for r in rows)
    summary = run(
        tmp_path,
        llama3_dir,
        "--dataset-path",
        str(DATA / "gsm8k_train_sample.jsonl"),
        "--max-vocab-size",
        "2000",
        "--holdout-fraction",
        "0.0001",
    )
    assert summary["holdout"]["held_out_records"] == 0
    assert summary["coverage_at_draft_vocab_size"]["held_out"] is None
    assert any("held-out split is empty" in w for w in summary["warnings"])


def test_split_and_bootstrap_need_the_records(tmp_path, llama3_dir, capsys):
    run(tmp_path, llama3_dir, "--dataset-path", str(DATA / "gsm8k_train_sample.jsonl"), "--max-vocab-size", "2000")
    code = main(
        [
            "optimize",
            "--counts",
            str(tmp_path / "out" / "token_counts.safetensors"),
            "--output-dir",
            str(tmp_path / "again"),
            "--holdout-fraction",
            "0.2",
        ]
    )
    assert code == 2 and "--holdout-fraction and --bootstrap must see each record" in capsys.readouterr().err


def test_full_gsm8k_test_coverage_falls_in_the_bootstrap_interval(tmp_path, llama3_dir):
    """Pick k on the two gsm8k train files; gsm8k test (unseen, same kind) lands in the interval;
    humaneval and mt_bench (other domains) are reported and covered worse."""
    shared = shared_data_or_skip()
    summary = run(
        tmp_path,
        llama3_dir,
        "--dataset-path",
        str(shared / "gsm8k_train_part1.jsonl"),
        str(shared / "gsm8k_train_part2.jsonl"),
        "--bootstrap",
        "60",
        "--eval-dataset-path",
        str(shared / "gsm8k_test.jsonl"),
        str(shared / "humaneval.jsonl"),
        str(shared / "mt_bench_gpt4_reference.jsonl"),
        "--n-calls",
        "30",
    )
    coverage = summary["coverage_at_draft_vocab_size"]["eval"]
    boot = summary["bootstrap"]["coverage_at_k"]
    low, high = boot["unseen"]["interval"]
    assert low <= coverage["gsm8k_test"] <= high
    # the train coverage is optimistic, the out-of-bag estimate pessimistic
    assert boot["out_of_bag"]["interval"][1] < coverage["gsm8k_test"] < summary["coverage"]
    assert coverage["humaneval"] < coverage["mt_bench_gpt4_reference"] < coverage["gsm8k_test"]
    k_low, k_high = summary["bootstrap"]["chosen_k"]["interval"]
    assert k_low <= summary["exact_optimum"]["draft_vocab_size"] <= k_high
