"""`--ladder K [K ...]`: ladder/k<K>/ entries equal separate `optimize --draft-vocab-size K` runs byte for
byte (mapping, exports, patched config), from one counting pass, with a table per K."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA, LLAMA3_CONFIG, run_cli

from specforge_vocab.cli.main import main
from specforge_vocab.counting import count as count_module
from specforge_vocab.counting.counts_file import load_counts

FIXTURES = [str(DATA / "gsm8k_train_sample.jsonl"), str(DATA / "humaneval_sample.jsonl")]
LADDER = [300, 700, 1500]
EXPORTS = ["sglang-token-map", "speculators", "ids"]


@pytest.fixture()
def passes(monkeypatch):
    """Counts the counting passes: every in-process count goes through count.count_records."""
    calls = []
    real = count_module.count_records

    def counted(settings, **kwargs):
        calls.append(list(settings.dataset_paths))
        return real(settings, **kwargs)

    monkeypatch.setattr(count_module, "count_records", counted)
    return calls


def optimize_into(tmp_path, name, llama3_dir, *extra):
    config = tmp_path / f"{name}.json"
    config.write_text(LLAMA3_CONFIG.read_text())
    out = tmp_path / name
    argv = ["-q", "optimize", "--dataset-path", *FIXTURES, "--tokenizer-path", llama3_dir, "--chat-template"]
    argv += ["llama3", "--config-path", str(config), "--output-dir", str(out), "--no-cache", "--n-calls", "15"]
    argv += ["--max-vocab-size", "3000", "--export", *EXPORTS, *extra]
    assert main(argv) == 0
    return out, config


def test_ladder_entries_equal_separate_runs_byte_for_byte_from_one_counting_pass(tmp_path, llama3_dir, passes):
    out, _ = optimize_into(tmp_path, "ladder", llama3_dir, "--ladder", *map(str, LADDER))
    assert len(passes) == 1, passes  # one pass for the chosen k and every rung
    summary = json.loads((out / "summary.json").read_text())
    for k in LADDER:
        passes.clear()
        single, config = optimize_into(tmp_path, f"single{k}", llama3_dir, "--draft-vocab-size", str(k))
        assert len(passes) == 1  # the wrapper sees each run's pass
        entry = out / "ladder" / f"k{k}"
        names = sorted(p.name for p in entry.iterdir())
        expected = ["d2t.npy", "draft_config.json", "kept_ids.json", "t2d.npy", "token_freq.pt", "token_map.pt"]
        assert names == sorted(expected + ["vocab_mapping.pt", "vocab_mapping.safetensors"])
        for name in names:
            theirs = config if name == "draft_config.json" else single / name
            assert (entry / name).read_bytes() == theirs.read_bytes(), (k, name)
        fingerprint = json.loads((single / "kept_ids.json").read_text())["mapping_fingerprint"]
        (row,) = [r for r in summary["ladder"] if r["draft_vocab_size"] == k]
        assert row["mapping_fingerprint"] == fingerprint and row["directory"] == f"ladder/k{k}"


def test_ladder_table_holds_coverage_latency_and_speedup_per_k(tmp_path, llama3_dir, capsys):
    extra = ["--eval-dataset-path", str(DATA / "gsm8k_test_sample.jsonl"), "--holdout-fraction", "0.2"]
    out, _ = optimize_into(tmp_path, "table", llama3_dir, "--ladder", "400", "900", *extra)
    summary = json.loads((out / "summary.json").read_text())
    counts, _ = load_counts(str(out / "token_counts.safetensors"))
    rows = summary["ladder"]
    assert [r["draft_vocab_size"] for r in rows] == [400, 900]
    for row in rows:
        mapping_ids = json.loads((out / row["directory"] / "kept_ids.json").read_text())["kept_ids"]
        cov = row["coverage"]
        assert set(cov) == {"train", "held_out", "eval", "domains"} and set(cov["eval"]) == {"gsm8k_test_sample"}
        assert 0 < cov["held_out"] <= 1 and 0 < cov["eval"]["gsm8k_test_sample"] <= 1
        # Train coverage here is the held-out split's train side; on all counts it is a bit higher.
        assert cov["train"] > 0.8 and counts[mapping_ids].sum() / counts.sum() > 0.8
        assert 0 < row["latency_reduction"] < 1 and 0 < row["relative_draft_time"] < 1
        assert row["predicted_speedup"] > 1
    low, high = rows
    assert low["coverage"]["train"] < high["coverage"]["train"]
    assert low["latency_reduction"] > high["latency_reduction"]


def test_ladder_sizes_are_checked_before_anything_is_written(tmp_path, llama3_dir, capsys):
    config = tmp_path / "draft.json"
    config.write_text(LLAMA3_CONFIG.read_text())
    argv = ["optimize", "--dataset-path", *FIXTURES, "--tokenizer-path", llama3_dir, "--config-path", str(config)]
    argv += ["--output-dir", str(tmp_path / "out"), "--no-cache"]
    code, _, err = run_cli(argv + ["--ladder", "500", "500"], capsys)
    assert code == 2 and "--ladder must list each size once, but got 500 more than once" in err
    code, _, err = run_cli(argv + ["--ladder", "500", "200000"], capsys)
    assert code == 2 and "--ladder sizes must be in [1, 128256]" in err and "200000" in err
    assert not (tmp_path / "out").exists() and config.read_text() == LLAMA3_CONFIG.read_text()


def test_a_rerun_with_other_sizes_replaces_the_whole_ladder(tmp_path, llama3_dir):
    out, _ = optimize_into(tmp_path, "again", llama3_dir, "--ladder", "300", "600")
    counts = str(out / "token_counts.safetensors")
    config = tmp_path / "again.json"
    argv = ["-q", "optimize", "--counts", counts, "--config-path", str(config), "--output-dir", str(out)]
    assert main(argv + ["--ladder", "600", "800", "--draft-vocab-size", "500"]) == 0
    assert sorted(p.name for p in (out / "ladder").iterdir()) == ["k600", "k800"]
    assert sorted(p.name for p in (out / "ladder" / "k600").iterdir()) == [
        "draft_config.json",
        "vocab_mapping.pt",
        "vocab_mapping.safetensors",
    ]  # this run exports nothing: the earlier run's exports in k600 are gone too
    assert main(argv + ["--draft-vocab-size", "500"]) == 0
    assert not (out / "ladder").exists()
    assert np.array_equal(load_counts(counts)[0], load_counts(str(out / "token_counts.safetensors"))[0])
