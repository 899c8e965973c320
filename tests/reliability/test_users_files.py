"""The user's own files: a backup keeps the original however often the tool runs, and a symlinked
config, run config or counts file stays a symlink (its target is written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import DATA, LLAMA3_CONFIG, LLAMA3_DIR, run_cli, zipf_counts
from reliability_helpers import leftovers

from specforge_vocab.counting.counts_file import load_counts, save_counts
from specforge_vocab.specforge.yaml_patch import set_vocab_mapping_path
from specforge_vocab.writing.draft_config import patch_draft_vocab_size

V = 128_256


@pytest.fixture()
def counts_file(tmp_path) -> str:
    path = str(tmp_path / "counts.safetensors")
    save_counts(
        path, zipf_counts(V, 400_000, 1.1, seed=5), {"format": "specforge-vocab-counts", "tokenizer_length": str(V)}
    )
    return path


def optimize(capsys, counts: str, config: str, out: str, k: int, *extra: str) -> None:
    argv = ["-q", "optimize", "--counts", counts, "--config-path", config, "--output-dir", out]
    code, _, err = run_cli([*argv, "--draft-vocab-size", str(k), "--n-calls", "5", *extra], capsys)
    assert code == 0, err


def draft_vocab_size(path) -> int:
    return json.loads(Path(path).read_text())["draft_vocab_size"]


def test_the_config_backup_keeps_the_original_across_runs(tmp_path, counts_file, capsys):
    config = tmp_path / "draft.json"
    original = LLAMA3_CONFIG.read_bytes()
    config.write_bytes(original)
    for k in (1000, 2000, 3000):
        optimize(capsys, counts_file, str(config), str(tmp_path / "out"), k)
        assert draft_vocab_size(config) == k
        assert (tmp_path / "draft.json.bak").read_bytes() == original  # never the previous run's result
    assert leftovers(str(tmp_path)) == []


def test_patching_the_draft_config_twice_keeps_the_original(tmp_path):
    config = tmp_path / "draft.json"
    original = LLAMA3_CONFIG.read_bytes()
    config.write_bytes(original)
    assert patch_draft_vocab_size(str(config), 100) == str(config) + ".bak"
    assert patch_draft_vocab_size(str(config), 200) == str(config) + ".bak"
    assert draft_vocab_size(config) == 200 and Path(str(config) + ".bak").read_bytes() == original


def test_the_run_config_backup_keeps_the_original(tmp_path):
    run = tmp_path / "run.yaml"
    original = "model:\n  target_model_path: m  # the target\n  draft_model_config: d.json\n"
    run.write_text(original)
    for mapping in ("/maps/a.pt", "/maps/b.pt"):
        result = set_vocab_mapping_path(str(run), mapping)
        assert result.backup_path == str(run) + ".bak"
        assert yaml.safe_load(run.read_text())["model"]["vocab_mapping_path"] == mapping
        assert (tmp_path / "run.yaml.bak").read_text() == original


def test_a_symlinked_config_stays_a_symlink_and_its_target_is_written(tmp_path, counts_file, capsys):
    real = tmp_path / "configs" / "draft.json"
    real.parent.mkdir()
    real.write_bytes(LLAMA3_CONFIG.read_bytes())
    link = tmp_path / "run" / "draft.json"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(real, link.parent))
    optimize(capsys, counts_file, str(link), str(tmp_path / "out"), 1234)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert draft_vocab_size(real) == 1234
    assert draft_vocab_size(Path(str(link) + ".bak")) == 32000  # the original, kept next to the link
    optimize(capsys, counts_file, str(real), str(tmp_path / "out"), 1500)  # the same file by its own name
    assert link.is_symlink() and draft_vocab_size(link) == 1500
    assert leftovers(str(tmp_path)) == []


def test_a_symlinked_run_config_stays_a_symlink(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("model:\n  target_model_path: m\n")
    link = tmp_path / "run.yaml"
    link.symlink_to(real.name)
    set_vocab_mapping_path(str(link), "/maps/v.pt", backup=False)
    assert link.is_symlink() and yaml.safe_load(real.read_text())["model"]["vocab_mapping_path"] == "/maps/v.pt"


def test_a_symlinked_counts_output_stays_a_symlink(tmp_path, capsys):
    real = tmp_path / "store" / "counts.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "counts.safetensors"
    link.symlink_to(real)
    argv = ["-q", "count", "--dataset-path", str(DATA / "gsm8k_test_sample.jsonl"), "--tokenizer-path", LLAMA3_DIR]
    code, _, err = run_cli([*argv, "--max-length", "512", "--output", str(link)], capsys)
    assert code == 0, err
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    counts, metadata = load_counts(str(real))
    assert counts.sum() > 0 and metadata["max_length"] == "512"
    assert leftovers(str(tmp_path)) == []


def run_as_other_user(argv, stderr_path: Path) -> int:
    """main(argv) in a forked child running as the unprivileged user nobody (when this is root, for
    whom a folder's permissions do not stop writes), or as this user; returns the exit status."""
    import matplotlib.pyplot  # noqa: F401 - what the child may import lazily, loaded while it still can
    import torch  # noqa: F401

    from specforge_vocab.cli.main import build_parser, main

    build_parser()  # reads the template names through importlib.resources, which imports lazily
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 2)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            import sys

            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is printed to stderr_path, then the status says so
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_config_in_a_read_only_folder_is_refused_before_any_work(counts_file):
    """As an ordinary user, --config-path in a folder they cannot write: exit 2, the reason, nothing
    written (not even a lock file)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="readonly-config-"))
    try:
        os.chmod(work, 0o777)
        folder = work / "configs"
        folder.mkdir()
        config = folder / "draft.json"
        config.write_bytes(LLAMA3_CONFIG.read_bytes())
        counts = work / "counts.safetensors"
        shutil.copy(counts_file, counts)
        os.chmod(counts, 0o644)
        os.chmod(config, 0o644)
        os.chmod(folder, 0o555)
        err = work / "stderr.txt"
        out = work / "out"
        argv = ["-q", "optimize", "--counts", str(counts), "--config-path", str(config), "--output-dir", str(out)]
        code = run_as_other_user([*argv, "--n-calls", "5"], err)
        message = err.read_text()
        assert code == 2, message
        assert "Traceback" not in message
        assert f"--config-path {config} cannot be changed: its folder {folder} is not writable" in message
        assert sorted(os.listdir(folder)) == ["draft.json"] and not out.exists()
        assert config.read_bytes() == LLAMA3_CONFIG.read_bytes()
    finally:
        os.chmod(work / "configs", 0o755)
        shutil.rmtree(work)
