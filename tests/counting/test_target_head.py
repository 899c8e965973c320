"""The target's LM head is read alone (through the weight index, or a single model.safetensors), cast to
bfloat16 as SpecForge's TargetHead casts it; bad targets, features and flag combinations are refused
before any counting, with the file, key or flag named and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, save_feature, write_feature_sample, write_target_model
from safetensors.torch import save_file

from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.counting.target_head import load_target_head
from specforge_vocab.errors import InputError

V, H = 500, 32


def head(seed: int = 0, dtype=torch.bfloat16):
    return (torch.randn(V, H, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype)


def test_head_comes_from_the_shard_the_index_names(tmp_path):
    weight = head()
    target = write_target_model(tmp_path / "t", weight, shards=4)
    loaded = load_target_head(str(target))
    assert torch.equal(loaded.weight, weight) and loaded.file.endswith("model-00004-of-00004.safetensors")
    assert (loaded.vocab_size, loaded.hidden_size, loaded.stored_dtype) == (V, H, "bfloat16")
    # only the named shard is read: the others may be damaged
    (target / "model-00001-of-00004.safetensors").write_bytes(b"not safetensors")
    assert torch.equal(load_target_head(str(target)).weight, weight)


def test_single_file_and_float32_heads(tmp_path):
    weight = head(1, torch.float32)
    target = write_target_model(tmp_path / "t", weight, index=False)
    loaded = load_target_head(str(target))
    assert loaded.weight.dtype == torch.bfloat16 and loaded.stored_dtype == "float32"
    assert torch.equal(loaded.weight, weight.to(torch.bfloat16))  # SpecForge: copy into fp32, then .to(bfloat16)


def test_tied_embedding_target_is_told_which_key_to_pass(tmp_path):
    weight = head(2)
    target = write_target_model(tmp_path / "t", weight, key="model.embed_tokens.weight")
    with pytest.raises(InputError) as info:
        load_target_head(str(target))
    message = str(info.value)
    assert "has no tensor 'lm_head.weight'" in message and "--lm-head-key model.embed_tokens.weight" in message
    assert "model.lm_head_key: model.embed_tokens.weight" in message
    assert torch.equal(load_target_head(str(target), "model.embed_tokens.weight").weight, weight)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda t: (t / "second.index.json").write_text("{}"), "holds 2 *.index.json files"),
        (lambda t: (t / "model.safetensors.index.json").write_text("[1]"), "not a readable weight index"),
        (lambda t: (t / "model-00002-of-00002.safetensors").unlink(), "does not exist. Download that shard"),
        (
            lambda t: (t / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 16),
            "is not a readable safetensors file",
        ),
        (
            lambda t: (t / "config.json").write_text(json.dumps({"vocab_size": V + 64, "hidden_size": H})),
            "config.json says vocab_size 564",
        ),
        (
            lambda t: [p.unlink() for p in t.glob("*.safetensors*")],
            "has no *.index.json and no model.safetensors",
        ),
    ],
)
def test_broken_targets_are_named(tmp_path, damage, fragment):
    target = write_target_model(tmp_path / "t", head())
    damage(target)
    with pytest.raises(InputError) as info:
        load_target_head(str(target))
    assert fragment in str(info.value)


def test_a_damaged_head_is_refused(tmp_path):
    weight = head(3)
    weight[7, 3] = float("inf")
    with pytest.raises(InputError, match="holds NaN or infinite values"):
        load_target_head(str(write_target_model(tmp_path / "t", weight)))


def test_a_matrix_of_integers_or_a_vector_is_not_a_head(tmp_path):
    save_file({"lm_head.weight": torch.zeros(V, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"must be a floating-point matrix \[vocab_size, hidden_size\]"):
        load_target_head(str(tmp_path))
    with pytest.raises(InputError, match="must be the target model's local directory"):
        load_target_head(str(tmp_path / "model.safetensors"))


# ---------------------------------------------------------------- features that cannot be counted by the target


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"input_ids": torch.arange(6), "loss_mask": torch.ones(6, dtype=torch.int64)}, "has no 'hidden_state'"),
        (
            {"input_ids": torch.arange(6), "loss_mask": torch.ones(6), "hidden_state": torch.zeros(1, 5, H).bfloat16()},
            "must have shape [1, 6, H] or [6, H]",
        ),
        (
            {"input_ids": torch.arange(6), "loss_mask": torch.ones(6), "hidden_state": torch.zeros(1, 6, H)},
            "must be bfloat16, but is torch.float32",
        ),
        (
            {"input_ids": torch.arange(6), "loss_mask": torch.ones(6), "hidden_state": torch.zeros(6, 8).bfloat16()},
            "the stored hidden states have size 8, but the target's LM head has hidden size 32",
        ),
        (
            {
                "input_ids": torch.arange(6),
                "loss_mask": torch.ones(6),
                "hidden_state": torch.full((6, H), float("nan")).bfloat16(),
            },
            "NaN or infinite values",
        ),
    ],
)
def test_bad_features_are_named(tmp_path, record, fragment):
    target = write_target_model(tmp_path / "t", head())
    path = save_feature(tmp_path / "f" / "data_0.ckpt", record)
    settings = CountSettings(
        hidden_states_path=str(tmp_path / "f"), target_model_path=str(target), count_source="target-argmax"
    )
    with pytest.raises(InputError) as info:
        obtain_counts(settings)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_head_and_vocabulary_size_must_agree(tmp_path):
    target = write_target_model(tmp_path / "t", head())
    write_feature_sample(tmp_path / "f" / "data_0.ckpt", [1, 2, 3], [0, 1, 1], torch.zeros(3, H).bfloat16())
    settings = CountSettings(
        hidden_states_path=str(tmp_path / "f"), target_model_path=str(target), target_vocab_size=V + 1
    )
    with pytest.raises(InputError, match="has 500 rows, but the vocabulary size is 501"):
        obtain_counts(settings)


# ---------------------------------------------------------------- flag combinations, all refused at once


@pytest.fixture()
def features_and_target(tmp_path):
    target = write_target_model(tmp_path / "t", head())
    write_feature_sample(tmp_path / "f" / "data_0.ckpt", [1, 2, 3, 4], [0, 1, 1, 1], torch.ones(4, H).bfloat16())
    return str(tmp_path / "f"), str(target)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["--count-source", "target-argmax", "--target-vocab-size", "500"],
            ["must have the target's LM head, but got no --target-model-path"],
        ),
        (
            ["--dataset-path", "{f}", "--count-source", "target-argmax", "--target-model-path", "{t}"],
            ["Exactly one of --dataset-path"],
        ),
        (
            ["--lm-head-key", "x", "--device", "cpu", "--target-vocab-size", "500", "--sample-size", "3"],
            ["--lm-head-key and --device apply to the target's LM head", "--sample-size shape(s) how raw"],
        ),
        ([], ["the vocabulary size V must come from elsewhere"]),
    ],
)
def test_combinations_that_cannot_work_are_refused_before_any_work(
    tmp_path, capsys, features_and_target, argv, fragments
):
    features, target = features_and_target
    argv = [a.format(f=features, t=target) for a in argv]
    out = tmp_path / "c.safetensors"
    code, _, stderr = run_cli(["count", "--hidden-states-path", features, *argv, "--output", str(out)], capsys)
    assert code == 2 and "Traceback" not in stderr and not out.exists()
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_target_argmax_needs_features(tmp_path, capsys, features_and_target):
    _, target = features_and_target
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"input_ids": [1, 2], "loss_mask": [1, 1]}) + "\n")
    code, _, stderr = run_cli(
        ["count", "--prompts-path", str(prompts), "--count-source", "target-argmax", "--target-model-path", target]
        + ["--output", str(tmp_path / "c.safetensors")],
        capsys,
    )
    assert code == 2
    assert "must read SpecForge's offline features" in stderr and "is used with --hidden-states-path only" in stderr


def test_device_cuda_without_a_gpu_is_refused(features_and_target):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    features, target = features_and_target
    problems = CountSettings(hidden_states_path=features, target_model_path=target, device="cuda").problems()
    assert any("--device cuda must have a CUDA GPU" in p for p in problems)


def test_prompts_count_like_the_existing_reader(tmp_path, capsys):
    rows = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}, {"input_ids": [9, 5], "loss_mask": [1, 1]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counted = obtain_counts(CountSettings(prompts_path=str(prompts), target_vocab_size=10))
    assert counted.counts.tolist() == np.bincount([6, 7, 8, 9, 5], minlength=10).tolist()
    assert counted.metadata["source"] == "--prompts-path (pre-tokenized prompts)"
