"""writing.outputs.commit_outputs keeps the draft config and the mapping in agreement, and
refuses before writing anything (how fileio commits a group is in tests/reliability/test_fileio.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import leftovers

from specforge_vocab import fileio
from specforge_vocab.errors import InputError
from specforge_vocab.writing.outputs import (
    check_outputs_match_config,
    commit_outputs,
    config_disagreement,
    recorded_draft_vocab_size,
)


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv(fileio.GROUP_WRITE_ENV, raising=False)


def optimize_like_outputs(out: Path, k: int, V: int = 1000):
    import io

    import torch
    from safetensors.torch import save

    from specforge_vocab.writing.mapping import mapping_from_counts

    d2t, t2d = mapping_from_counts(np.arange(V, dtype=np.int64), k)
    buffer = io.BytesIO()
    torch.save({"d2t": d2t, "t2d": t2d}, buffer)
    return {
        str(out / "summary.json"): json.dumps({"optimal_draft_vocab_size": k, "target_vocab_size": V}),
        str(out / "vocab_mapping.pt"): buffer.getvalue(),
        str(out / "vocab_mapping.safetensors"): save(
            {"d2t": d2t, "t2d": t2d}, metadata={"draft_vocab_size": str(k), "vocab_size": str(V)}
        ),
    }


def test_commit_outputs_keeps_config_and_mapping_in_agreement(tmp_path, caplog):
    out, config = tmp_path / "out", tmp_path / "draft.json"
    config.write_text('{\n  "vocab_size": 1000,\n  "hidden_size": 64,\n  "draft_vocab_size": 500\n}\n')
    original = config.read_text()
    backup = commit_outputs(
        optimize_like_outputs(out, 120), output_dir=str(out), config_path=str(config), draft_vocab_size=120
    )
    assert backup == str(config) + ".bak" and Path(backup).read_text() == original
    assert json.loads(config.read_text())["draft_vocab_size"] == 120
    assert recorded_draft_vocab_size(str(out))[:2] == (120, 1000)
    assert config_disagreement(str(out), str(config)) is None
    check_outputs_match_config(str(out), str(config))
    # Someone edits the config by hand: the next check says so, the next run warns and rewrites both.
    config.write_text(config.read_text().replace('"draft_vocab_size": 120', '"draft_vocab_size": 32000'))
    problem = config_disagreement(str(out), str(config))
    assert "has draft_vocab_size 32000, but the mapping" in problem and "has 120 rows" in problem
    with pytest.raises(InputError, match=r"they disagree.*Rerun `specforge-vocab optimize`"):
        check_outputs_match_config(str(out), str(config))
    with caplog.at_level(logging.WARNING, logger="specforge_vocab.writing.outputs"):
        commit_outputs(
            optimize_like_outputs(out, 130),
            output_dir=str(out),
            config_path=str(config),
            draft_vocab_size=130,
            backup=False,
        )
    assert "they disagree" in caplog.text and "This run rewrites both" in caplog.text
    assert config_disagreement(str(out), str(config)) is None
    assert leftovers(str(tmp_path)) == []


def test_commit_outputs_refuses_before_writing_anything(tmp_path):
    out, config = tmp_path / "out", tmp_path / "draft.json"
    config.write_text('{"vocab_size": 100, "draft_vocab_size": 50}')
    with pytest.raises(InputError, match=r"draft_vocab_size must be at most vocab_size \(100\), but got 120"):
        commit_outputs(
            optimize_like_outputs(out, 120, V=1000), output_dir=str(out), config_path=str(config), draft_vocab_size=120
        )
    assert not out.exists() or os.listdir(out) == []
    assert (
        config.read_text() == '{"vocab_size": 100, "draft_vocab_size": 50}' and not Path(str(config) + ".bak").exists()
    )


def test_one_config_for_two_output_directories_is_named_as_the_cause(tmp_path):
    """Two real optimize runs share a config: the first one's outputs then disagree with it, and the
    message names the second output directory instead of blaming an edit by hand."""
    from conftest import LLAMA3_CONFIG, zipf_counts

    from specforge_vocab.cli.main import main
    from specforge_vocab.counting.counts_file import save_counts

    counts = str(tmp_path / "counts.safetensors")
    save_counts(counts, zipf_counts(128_256, 300_000, 1.1, seed=3), {"tokenizer_length": "128256"})
    config = tmp_path / "draft.json"
    config.write_bytes(LLAMA3_CONFIG.read_bytes())
    for name, k in (("first", 1000), ("second", 2000)):
        argv = ["-q", "optimize", "--counts", counts, "--config-path", str(config), "--draft-vocab-size", str(k)]
        assert main([*argv, "--n-calls", "5", "--output-dir", str(tmp_path / "runs" / name)]) == 0
    problem = config_disagreement(str(tmp_path / "runs" / "first"), str(config))
    assert "has draft_vocab_size 2000, but the mapping" in problem and "has 1000 rows" in problem
    assert (
        f"the run that wrote {tmp_path / 'runs' / 'second'} (another output directory with the same config)" in problem
    )
    assert "by hand" not in problem
