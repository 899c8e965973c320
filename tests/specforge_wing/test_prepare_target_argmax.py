"""prepare with data.hidden_states_path and --count-source target-argmax: the target's LM head comes from
model.target_model_path and model.lm_head_key, the counts equal the reference of SpecForge's offline path,
both coverages are reported, and switching the count source recounts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import specforge_reference as reference
import torch
import yaml
from conftest import llama3_config_text, run_cli, write_feature_sample, write_target_model

from specforge_vocab import before_training
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.counting.counts_file import read_counts_file
from specforge_vocab.counting.features import list_feature_files
from specforge_vocab.errors import InputError

V, H = 2500, 48
FAST_SEARCH = SearchSettings(n_calls=6, max_vocab_size=2000)


@pytest.fixture()
def offline_run(tmp_path, monkeypatch):
    """A run config over feature files and a target whose head is stored under a non-default key."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((V, H)) * 0.1).to(torch.bfloat16)
    write_target_model(tmp_path / "target", weight, key="output.weight")
    for i in range(12):
        length = int(rng.integers(10, 50))
        mask = (np.arange(length) >= length // 3).astype(np.int64)
        hidden = torch.from_numpy(rng.standard_normal((length, H)) * 2).to(torch.bfloat16)
        ids = rng.integers(0, V, size=length)
        name = f"rows_0-2000/data_{i}.ckpt" + (".gz" if i % 2 else "")
        write_feature_sample(tmp_path / "features" / name, ids, mask, hidden, compress=i % 2 == 1)
    (tmp_path / "draft.json").write_text(llama3_config_text(vocab_size=V, draft_vocab_size=1000))
    run = {
        "model": {"target_model_path": "target", "draft_model_config": "draft.json", "lm_head_key": "output.weight"},
        "data": {"hidden_states_path": "features", "max_length": 40},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    return tmp_path, weight


def test_prepare_counts_the_targets_argmax_with_the_run_configs_head(offline_run):
    root, weight = offline_run
    result = before_training("run.yaml", count_source="target-argmax", search=FAST_SEARCH)
    counts, metadata, by_source = read_counts_file(os.path.join(result.output_dir, "token_counts.safetensors"))
    expected = reference.target_argmax_counts(list_feature_files(str(root / "features")), weight, 40)
    assert np.array_equal(counts, expected) and np.array_equal(by_source["target-argmax"], expected)
    assert metadata["lm_head_key"] == "output.weight" and metadata["source"].startswith("data.hidden_states_path")
    coverage = result.summary["coverage_at_draft_vocab_size"]
    assert {"data_tokens", "target_argmax", "target_positions_dropped"} <= set(coverage)
    assert any(line.startswith("coverage at k: data tokens") for line in result.summary_lines())

    again = before_training("run.yaml", count_source="target-argmax", search=FAST_SEARCH)
    assert again.action == "reuse"
    tokens = before_training("run.yaml", search=FAST_SEARCH)
    assert tokens.action == "count" and "count_source" in tokens.reason
    counts, metadata, by_source = read_counts_file(os.path.join(tokens.output_dir, "token_counts.safetensors"))
    assert metadata["count_source"] == "tokens" and by_source == {} and not np.array_equal(counts, expected)


def test_prepare_cli_flag_and_refusals(offline_run, capsys):
    root, _ = offline_run
    code, stdout, stderr = run_cli(
        [
            "prepare",
            "--config",
            "run.yaml",
            "--count-source",
            "target-argmax",
            "--n-calls",
            "6",
            "--max-vocab-size",
            "2000",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "SpecForge drops" in stdout
    raw = root / "raw.yaml"
    raw.write_text(yaml.safe_dump({"model": {"target_model_path": "target"}, "data": {"train_data_path": "x.jsonl"}}))
    with pytest.raises(InputError, match="trains from data.train_data_path"):
        before_training(str(raw), count_source="target-argmax")
    with pytest.raises(InputError, match="--count-source must be one of tokens, target-argmax"):
        before_training("run.yaml", count_source="target-probability")
    with pytest.raises(InputError, match="train_eagle3.py's mapping comes from --train-data-path"):
        before_training(train_eagle3_args=["--train-data-path", "x"], count_source="target-argmax")
