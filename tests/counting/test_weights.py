"""`--dataset-weight W [W ...]`: the counts are the weighted sum of each path's counts, exactly (as if
each path appeared W times in SpecForge's one training file), and the kept set at a fixed k is the
top k of that sum."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DATA, run_cli

from specforge_vocab.choosing.holdout import HoldoutTally
from specforge_vocab.cli.main import main
from specforge_vocab.counting.cache import cached_count
from specforge_vocab.counting.count import count_dataset, count_tokens
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.counting.engine import CountSettings

GSM8K = str(DATA / "gsm8k_train_sample.jsonl")
HUMANEVAL = str(DATA / "humaneval_sample.jsonl")
CODEGEN = str(DATA / "gpteacher_codegen_sample.jsonl")


def settings(llama3_dir, paths, weights, **extra):
    return CountSettings(
        dataset_paths=list(paths),
        dataset_weights=list(weights),
        tokenizer_path=llama3_dir,
        chat_template="llama3",
        **extra,
    )


@pytest.fixture(scope="module")
def per_file(llama3_dir):
    return {p: count_tokens(p, llama3_dir, chat_template="llama3") for p in (GSM8K, HUMANEVAL, CODEGEN)}


@pytest.mark.parametrize("workers", [1, 2])
def test_weighted_counts_are_the_weighted_sum_of_each_files_counts(llama3_dir, per_file, workers):
    weights = [1, 5, 2]
    result = count_dataset(settings(llama3_dir, [GSM8K, HUMANEVAL, CODEGEN], weights, num_workers=workers))
    expected = per_file[GSM8K] + 5 * per_file[HUMANEVAL] + 2 * per_file[CODEGEN]
    assert result.counts.dtype == np.int64 and np.array_equal(result.counts, expected)
    assert result.tokens_counted == int(expected.sum())
    assert [f["weight"] for f in result.files] == weights


def test_a_directory_weight_applies_to_every_file_in_it(tmp_path, llama3_dir, per_file):
    folder = tmp_path / "code"
    folder.mkdir()
    shutil.copy(HUMANEVAL, folder / "a.jsonl")
    shutil.copy(CODEGEN, folder / "b.jsonl")
    result = count_dataset(settings(llama3_dir, [GSM8K, str(folder)], [2, 3]))
    assert np.array_equal(result.counts, 2 * per_file[GSM8K] + 3 * (per_file[HUMANEVAL] + per_file[CODEGEN]))


def test_weight_one_everywhere_is_the_plain_count_and_keeps_its_cache_entry(tmp_path, llama3_dir, per_file):
    plain, _ = cached_count(settings(llama3_dir, [GSM8K, HUMANEVAL], []), cache_dir=str(tmp_path))
    ones, hit = cached_count(settings(llama3_dir, [GSM8K, HUMANEVAL], [1, 1]), cache_dir=str(tmp_path))
    assert hit and np.array_equal(ones.counts, plain.counts)
    weighted, hit = cached_count(settings(llama3_dir, [GSM8K, HUMANEVAL], [1, 4]), cache_dir=str(tmp_path))
    assert not hit and np.array_equal(weighted.counts, per_file[GSM8K] + 4 * per_file[HUMANEVAL])
    again, hit = cached_count(settings(llama3_dir, [GSM8K, HUMANEVAL], [1, 4]), cache_dir=str(tmp_path))
    assert hit and np.array_equal(again.counts, weighted.counts)


def test_tallies_see_each_weighted_record_as_its_copies(tmp_path, llama3_dir, per_file):
    tally = HoldoutTally(128256, 0.3)
    result = count_dataset(settings(llama3_dir, [GSM8K, HUMANEVAL], [3, 1]), tallies=[tally])
    merged = result.tallies[0]
    assert np.array_equal(merged.train + merged.held_out, result.counts)
    plain = HoldoutTally(128256, 0.3)
    copies = []  # the same file three times (naming one file twice is refused, so as three copies)
    for i in range(3):
        copies.append(str(tmp_path / f"gsm8k_copy{i}.jsonl"))
        shutil.copy(GSM8K, copies[-1])
    count_dataset(settings(llama3_dir, [*copies, HUMANEVAL], []), tallies=[plain])
    assert np.array_equal(plain.held_out, merged.held_out)  # equal to the file repeated 3 times


def test_optimize_keeps_the_top_k_of_the_weighted_sum_and_reports_each_path(tmp_path, llama3_dir, per_file):
    weighted = per_file[GSM8K] + 7 * per_file[HUMANEVAL]
    out = tmp_path / "out"
    argv = ["-q", "optimize", "--dataset-path", GSM8K, HUMANEVAL, "--dataset-weight", "1", "7"]
    argv += ["--tokenizer-path", llama3_dir, "--output-dir", str(out), "--draft-vocab-size", "600"]
    assert main(argv + ["--no-pin-special-tokens", "--no-cache", "--export", "ids"]) == 0
    kept = json.loads((out / "kept_ids.json").read_text())["kept_ids"]
    top = sorted(sorted(range(weighted.size), key=lambda t: (-int(weighted[t]), t))[:600])
    assert kept == top
    counts, meta = load_counts(str(out / "token_counts.safetensors"))
    assert np.array_equal(counts, weighted)
    assert [f["weight"] for f in json.loads(meta["files"])] == [1, 7]
    datasets = json.loads((out / "summary.json").read_text())["datasets"]
    assert [(d["path"], d["weight"], d["tokens"]) for d in datasets] == [
        (GSM8K, 1, int(per_file[GSM8K].sum())),
        (HUMANEVAL, 7, int(per_file[HUMANEVAL].sum())),
    ]
    assert sum(d["weighted_tokens"] for d in datasets) == int(weighted.sum())


def test_count_writes_weights_and_merge_of_weighted_shards_equals_the_whole(tmp_path, llama3_dir, per_file, capsys):
    base = ["count", "--dataset-path", GSM8K, HUMANEVAL, "--dataset-weight", "2", "3", "--tokenizer-path", llama3_dir]
    code, out, _ = run_cli(base + ["--output", str(tmp_path / "all.safetensors")], capsys)
    assert code == 0 and "weight 3, 40 records" in out
    for i in range(2):
        assert run_cli(base + ["--shard", f"{i}/2", "--output", str(tmp_path / f"s{i}.safetensors")], capsys)[0] == 0
    code, _, _ = run_cli(
        [
            "merge",
            str(tmp_path / "s0.safetensors"),
            str(tmp_path / "s1.safetensors"),
            "--output",
            str(tmp_path / "m.safetensors"),
        ],
        capsys,
    )
    assert code == 0
    whole, meta = load_counts(str(tmp_path / "all.safetensors"))
    assert np.array_equal(whole, 2 * per_file[GSM8K] + 3 * per_file[HUMANEVAL])
    assert np.array_equal(load_counts(str(tmp_path / "m.safetensors"))[0], whole)
    unweighted = ["count", "--dataset-path", GSM8K, HUMANEVAL, "--tokenizer-path", llama3_dir, "--shard", "1/2"]
    assert run_cli(unweighted + ["--output", str(tmp_path / "u1.safetensors")], capsys)[0] == 0
    code, _, err = run_cli(
        [
            "merge",
            str(tmp_path / "s0.safetensors"),
            str(tmp_path / "u1.safetensors"),
            "--output",
            str(tmp_path / "x.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "--dataset-weight 2" in err


@pytest.mark.parametrize(
    "weights,message",
    [
        (
            ["1"],
            r"--dataset-weight must be one weight per --dataset-path value \(2, in the same order\), but got \[1\]",
        ),
        (["1", "0.5"], r"--dataset-weight must be whole numbers >= 1 .* but got 0\.5\. Scale fractional weights"),
        (["0", "1"], r"--dataset-weight must be whole numbers >= 1 .* but got 0\."),
    ],
)
def test_bad_weights_are_refused_before_any_work(tmp_path, llama3_dir, capsys, weights, message):
    import re

    out = tmp_path / "out"
    argv = ["optimize", "--dataset-path", GSM8K, HUMANEVAL, "--dataset-weight", *weights]
    code, _, err = run_cli(argv + ["--tokenizer-path", llama3_dir, "--output-dir", str(out)], capsys)
    assert code == 2 and re.search(message, err), err
    assert not out.exists()


def test_a_file_named_twice_with_weights_is_refused(tmp_path, llama3_dir, capsys):
    argv = ["count", "--dataset-path", GSM8K, str(DATA), "--dataset-weight", "1", "2", "--tokenizer-path", llama3_dir]
    code, _, err = run_cli(argv + ["--output", str(tmp_path / "c.safetensors")], capsys)
    assert code == 2 and "names" in err and "twice" in err and "gsm8k_train_sample.jsonl" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_weights_with_a_counts_file_are_refused(tmp_path, llama3_dir, capsys):
    counts = tmp_path / "c.safetensors"
    assert (
        run_cli(["count", "--dataset-path", GSM8K, "--tokenizer-path", llama3_dir, "--output", str(counts)], capsys)[0]
        == 0
    )
    code, _, err = run_cli(
        ["optimize", "--counts", str(counts), "--dataset-weight", "2", "--output-dir", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "--dataset-weight weights the files counted from --dataset-path" in err
