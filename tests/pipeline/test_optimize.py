"""`specforge-vocab optimize` end to end: outputs, config patch, mapping as SpecForge loads it."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONFIGS, DATA, LLAMA3_CONFIG, LLAMA3_DIR, PAPER_KEYS, REPO, child_env, optimize_summary

from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.writing.mapping import check_mapping, kept_token_ids

FIXTURES = [str(DATA / "gsm8k_train_sample.jsonl"), str(DATA / "gpteacher_codegen_sample.jsonl")]


@pytest.fixture()
def llama_config(tmp_path):
    path = tmp_path / "draft.json"
    shutil.copy(LLAMA3_CONFIG, path)
    return path


def run_optimize(tmp_path, llama3_dir, config, *extra):
    out = tmp_path / "out"
    argv = [
        "optimize",
        "--dataset-path",
        *FIXTURES,
        "--tokenizer-path",
        llama3_dir,
        "--chat-template",
        "llama3",
        "--config-path",
        str(config),
        "--output-dir",
        str(out),
        "--n-calls",
        "25",
        "--max-vocab-size",
        "4000",
        *extra,
    ]
    assert main(argv) == 0
    return out


def test_optimize_writes_every_output_and_patches_only_draft_vocab_size(tmp_path, llama3_dir, llama_config, capsys):
    original = llama_config.read_text()
    out = run_optimize(tmp_path, llama3_dir, llama_config)
    stdout = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:7] == PAPER_KEYS
    k = summary["optimal_draft_vocab_size"]
    assert summary["method"] == "optuna" and 50 <= k <= 4000
    assert summary["exact_optimum"]["utility"] >= summary["utility"]
    assert f"draft_vocab_size: {k:,}" in stdout and "draft FLOPs per token" in stdout
    for name in (
        "full_results.json",
        "optimization_results.png",
        "token_counts.safetensors",
        "vocab_mapping.pt",
        "vocab_mapping.safetensors",
    ):
        assert (out / name).stat().st_size > 0, name
    # The config: only draft_vocab_size changed, a backup holds the original.
    assert (tmp_path / "draft.json.bak").read_text() == original
    patched = llama_config.read_text()
    assert patched == original.replace('"draft_vocab_size": 32000', f'"draft_vocab_size": {k}')
    # The counts file equals a fresh count; the mapping keeps the k most frequent ids.
    counts, meta = load_counts(str(out / "token_counts.safetensors"))
    assert np.array_equal(counts, count_tokens(FIXTURES, llama3_dir, chat_template="llama3"))
    assert summary["tokens_counted"] == counts.sum() and summary["unique_tokens"] == np.count_nonzero(counts)


def test_mapping_loads_into_buffers_shaped_by_the_patched_config(tmp_path, llama3_dir, llama_config):
    out = run_optimize(tmp_path, llama3_dir, llama_config, "--search", "exact")
    config = json.loads(llama_config.read_text())
    k, V = config["draft_vocab_size"], config["vocab_size"]
    # SpecForge: buffers from the config, then copy_ from torch.load.
    d2t_buf, t2d_buf = torch.zeros(k, dtype=torch.int64), torch.ones(V, dtype=torch.bool)
    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    d2t_buf.copy_(mapping["d2t"])
    t2d_buf.copy_(mapping["t2d"])
    check_mapping(d2t_buf, t2d_buf, draft_vocab_size=k, vocab_size=V)
    counts, _ = load_counts(str(out / "token_counts.safetensors"))
    kept = (torch.arange(k) + d2t_buf).numpy()
    assert np.array_equal(kept, kept_token_ids(counts, k))
    from safetensors.torch import load_file

    st = load_file(str(out / "vocab_mapping.safetensors"))
    assert torch.equal(st["d2t"], mapping["d2t"]) and torch.equal(st["t2d"], mapping["t2d"])
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["method"] == "exact"
        and summary["optimal_draft_vocab_size"] == summary["exact_optimum"]["draft_vocab_size"]
    )


def test_counts_file_reuse_gives_the_same_pick(tmp_path, llama3_dir, llama_config, capsys):
    out = run_optimize(tmp_path, llama3_dir, llama_config)
    first = json.loads((out / "summary.json").read_text())
    shutil.copy(tmp_path / "draft.json.bak", llama_config)
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "optimize",
                "--counts",
                str(out / "token_counts.safetensors"),
                "--config-path",
                str(llama_config),
                "--output-dir",
                str(out2),
                "--n-calls",
                "25",
                "--max-vocab-size",
                "4000",
            ]
        )
        == 0
    )
    second = json.loads((out2 / "summary.json").read_text())
    assert second["optimal_draft_vocab_size"] == first["optimal_draft_vocab_size"]
    assert (out2 / "vocab_mapping.pt").read_bytes() == (out / "vocab_mapping.pt").read_bytes()


def test_fixed_draft_vocab_size_skips_the_search(tmp_path, llama3_dir, llama_config):
    out = run_optimize(tmp_path, llama3_dir, llama_config, "--draft-vocab-size", "1024")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimal_draft_vocab_size"] == 1024 and summary["method"] == "fixed"
    assert json.loads(llama_config.read_text())["draft_vocab_size"] == 1024


def test_config_for_another_tokenizer_is_refused_before_writing(tmp_path, deepseek_dir, llama_config, capsys):
    original = llama_config.read_text()
    out = tmp_path / "out"
    code = main(
        [
            "optimize",
            "--dataset-path",
            FIXTURES[0],
            "--tokenizer-path",
            deepseek_dir,
            "--chat-template",
            "deepseek-v3",
            "--config-path",
            str(llama_config),
            "--output-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "vocab_size" in err and "128256" in err and "129280" in err
    assert llama_config.read_text() == original and not out.exists()


def test_unreachable_min_coverage_is_a_clear_error(tmp_path, llama3_dir, llama_config, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "optimize",
            "--dataset-path",
            FIXTURES[0],
            "--tokenizer-path",
            llama3_dir,
            "--config-path",
            str(llama_config),
            "--output-dir",
            str(out),
            "--min-coverage",
            "0.999999",
            "--max-vocab-size",
            "100",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--min-coverage" in err and "best" in err.lower()
    assert not out.exists()


def test_paper_command_line_runs_unchanged(tmp_path, llama3_dir):
    """The paper's flags (including its 'deepseek' template name) are accepted by the script as they are."""
    out = tmp_path / "paper"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "optimize_vocab_size.py"),
            "--dataset-path",
            FIXTURES[0],
            "--tokenizer-path",
            llama3_dir,
            "--chat-template",
            "llama3",
            "--n-calls",
            "10",
            "--random-state",
            "42",
            "--coverage-weight",
            "0.5",
            "--min-coverage",
            "0.0",
            "--min-vocab-size",
            "50",
            "--max-vocab-size",
            "3000",
            "--sample-size",
            "100",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["method"] == "optuna"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "optimize_vocab_size.py"),
            "--dataset-path",
            FIXTURES[0],
            "--tokenizer-path",
            llama3_dir,
            "--chat-template",
            "deepseek",
            "--n-calls",
            "5",
            "--sample-size",
            "20",
            "--output-dir",
            str(tmp_path / "ds"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_demo_runs_from_any_directory_and_says_each_thing_once(tmp_path):
    """`specforge-vocab demo` from a folder that is not the repository, as a user runs it: it finds
    its config, writes its outputs, and no line of what it prints (stdout and stderr) repeats."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "specforge_vocab.cli", "demo", "--output-dir", str(out), "--n-calls", "10"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "records read: 6,018" in proc.stdout and "draft_vocab_size" in proc.stdout
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, f"printed more than once: {repeated}"
    # a warning is said once, in one place (logging or the summary, not both)
    assert "--min-token-count" in proc.stdout + proc.stderr
    assert sum(text.count("--min-token-count") for text in (proc.stdout, proc.stderr)) == 1
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "--min-token-count" in warnings[0], warnings  # nothing else to warn about
    assert (
        json.loads((out / "draft_config.json").read_text())["draft_vocab_size"]
        == json.loads((out / "summary.json").read_text())["optimal_draft_vocab_size"]
    )
    assert json.loads((CONFIGS / "deepseek-v3-671b-eagle3.json").read_text())["draft_vocab_size"] == 32000


def test_counting_flags_with_counts_are_accepted_only_when_they_match(tmp_path, capsys, llama3_dir):
    """--counts fixes what was counted: the same counting flags typed again are fine, another value
    (a default typed out included) is refused before any work."""
    counts = tmp_path / "c.safetensors"
    data = str(DATA / "gsm8k_test_sample.jsonl")
    flags = ["--dataset-path", data, "--tokenizer-path", llama3_dir, "--chat-template", "llama3", "--max-length", "256"]
    assert main(["-q", "count", *flags, "--output", str(counts)]) == 0
    summary, _ = optimize_summary(tmp_path, "--counts", str(counts), *flags, "--n-calls", "5")
    assert summary["settings"]["counting"]["max_length"] == "256"
    capsys.readouterr()
    code = main(["optimize", "--counts", str(counts), "--max-length", "2048", "--output-dir", str(tmp_path / "o2")])
    assert code == 2 and "--max-length 2048 conflicts with --counts" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_verbose_shows_this_packages_debug_lines_not_matplotlibs(tmp_path):
    counts = tmp_path / "c.safetensors"
    data = str(DATA / "gsm8k_test_sample.jsonl")
    assert (
        main(["-q", "count", "--dataset-path", data, "--tokenizer-path", str(LLAMA3_DIR), "--output", str(counts)]) == 0
    )
    env = child_env(MPLCONFIGDIR=str(tmp_path / "mpl"))  # a fresh font cache: matplotlib logs its font search
    argv = ["-v", "optimize", "--counts", str(counts), "--n-calls", "5", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "specforge_vocab.cli", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "INFO: wrote 7 file(s)" in proc.stderr  # this package's own detail
    assert not [line for line in proc.stderr.splitlines() if "font" in line.lower() or "matplotlib" in line.lower()]


def test_a_counts_cache_hit_is_reported_in_the_summary_not_as_a_warning(tmp_path, capsys, caplog, llama3_dir):
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    argv = ["optimize", "--dataset-path", FIXTURES[0], "--tokenizer-path", llama3_dir, "--max-length", "512"]
    argv += ["--n-calls", "5", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "counts reused from the counts cache" not in capsys.readouterr().out
    caplog.clear()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("counts reused from the counts cache")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "cache" in r.getMessage()]
