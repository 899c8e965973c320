"""Training that continues from a trained draft: prepare and pre-step hand SpecForge the checkpoint's own
mapping, --remap moves the draft onto a new vocabulary keeping its trained rows, resume changes nothing.

The draft: tiny hidden size, the real Llama-3 vocabulary (128,256), kept set = the 2,048 most frequent ids of
general data (hh-rlhf dialogues, GPTeacher code); it continues on math data (GSM8K). SpecForge's side is
tests/specforge_wing/specforge_standin.py (its warm start, mapping install and resume, written from its code
without importing specforge_vocab).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import specforge_standin as standin
import torch
import yaml
from conftest import (
    GENERAL_DATA,
    LLAMA3_V,
    MATH_DATA,
    eagle3_config,
    eagle3_tensors,
    general_kept_ids,
    llama3_counts,
    tiny_llama3_target,
    tree_bytes,
    write_draft_dir,
    write_runtime_checkpoint,
)
from safetensors.torch import load_file

from specforge_vocab import before_training
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli import training
from specforge_vocab.cli.main import main
from specforge_vocab.errors import InputError

K_OLD = 2048
MAX_LENGTH = 2048
FAST = SearchSettings(n_calls=8, max_vocab_size=6000)
FAST_FLAGS = ["--n-calls", "8", "--max-vocab-size", "6000"]

RUN_YAML = """\
# continue the general-data draft on math (comments must survive prepare)
model:
  target_model_path: "target"   # tokenizer, target config, target lm_head
  draft_checkpoint_path: "outputs"
  torch_dtype: "bfloat16"

data:
  train_data_path: "data/math.jsonl"
  max_length: 2048
  chat_template: "llama3"
  cache_dir: "./cache"

training:
  strategy: "eagle3"
"""


def trained_tensors(seed=11):
    return eagle3_tensors(general_kept_ids(K_OLD), vocab_size=LLAMA3_V, embed=False, seed=seed)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A run directory: target/ (Llama-3 tokenizer, tiny config, lm_head), data/math.jsonl (GSM8K) and a
    SpecForge runtime checkpoint of the general-data draft under outputs/."""
    monkeypatch.chdir(tmp_path)
    tiny_llama3_target(tmp_path / "target")
    (tmp_path / "data").mkdir()
    shutil.copy(MATH_DATA, tmp_path / "data" / "math.jsonl")
    write_runtime_checkpoint(tmp_path / "outputs", trained_tensors(), step=40)
    (tmp_path / "run.yaml").write_text(RUN_YAML, encoding="utf-8")
    return tmp_path


def kept_of(d2t) -> np.ndarray:
    return np.arange(d2t.numel()) + d2t.numpy()


def math_counts():
    return llama3_counts(str(MATH_DATA))


# ---------------------------------------------------------------- warm start, newer SpecForge


def test_prepare_warm_start_hands_specforge_the_checkpoints_own_mapping(workdir, capsys):
    checkpoint_before = tree_bytes(workdir / "outputs")
    assert main(["prepare", "--config", "run.yaml", *FAST_FLAGS]) == 0
    printed = capsys.readouterr().out

    # SpecForge: derived config (now the one prepare wrote), warm start, then model.vocab_mapping_path.
    model = standin.run_config_draft("run.yaml")
    trained = trained_tensors()
    assert np.array_equal(kept_of(model["d2t"]), general_kept_ids(K_OLD))
    assert torch.equal(model["t2d"], trained["t2d"]) and torch.equal(model["lm_head.weight"], trained["lm_head.weight"])
    # A fresh choice on the math data keeps other ids: handing that over would have repointed the rows.
    run = yaml.safe_load((workdir / "run.yaml").read_text())
    summary = json.loads((Path(run["model"]["vocab_mapping_path"]).parent / "summary.json").read_text())
    counts = math_counts()
    fresh_top = np.argsort(-counts, kind="stable")[:K_OLD]
    assert not np.array_equal(np.sort(fresh_top), general_kept_ids(K_OLD))
    # The summary: k stays, the checkpoint's coverage of the new data next to a fresh choice.
    assert summary["method"] == "checkpoint" and summary["optimal_draft_vocab_size"] == K_OLD
    expected = counts[general_kept_ids(K_OLD)].sum() / counts.sum()
    assert summary["coverage"] == pytest.approx(expected, abs=1e-12)
    assert summary["continuing"]["coverage"] == pytest.approx(expected, abs=1e-12)
    fresh = summary["fresh_choice"]
    assert fresh["coverage_of_the_top_k_at_the_checkpoints_k"] == pytest.approx(
        np.sort(counts)[::-1][:K_OLD].sum() / counts.sum(), abs=1e-12
    )
    assert fresh["coverage_of_the_top_k_at_the_checkpoints_k"] > expected and fresh["draft_vocab_size"] != K_OLD
    assert "SpecForge gets the checkpoint's own mapping" in printed and "a fresh choice: k" in printed
    # No draft_model_config: the derived config (k = the checkpoint's) was written and named, comments kept.
    text = (workdir / "run.yaml").read_text()
    assert text.startswith("# continue the general-data draft on math") and "# tokenizer, target config" in text
    assert json.loads(Path(run["model"]["draft_model_config"]).read_text())["draft_vocab_size"] == K_OLD
    assert tree_bytes(workdir / "outputs") == checkpoint_before  # the checkpoint is never modified
    # The mapping's fingerprint (sha256 of V, then the kept ids, each 8 bytes little-endian) in summary.json and
    # fingerprint.json.
    kept = general_kept_ids(K_OLD)
    expected_fp = hashlib.sha256(struct.pack("<Q", LLAMA3_V) + struct.pack(f"<{K_OLD}q", *kept)).hexdigest()
    stored = json.loads((Path(run["model"]["vocab_mapping_path"]).parent / "fingerprint.json").read_text())
    assert summary["mapping_fingerprint"] == stored["result"]["mapping_fingerprint"] == expected_fp
    # Unchanged inputs: reused, SpecForge still gets the same.
    again = before_training("run.yaml", search=FAST)
    assert again.reused and np.array_equal(
        kept_of(standin.run_config_draft("run.yaml")["d2t"]), general_kept_ids(K_OLD)
    )


def test_a_configured_mapping_of_another_draft_is_replaced_and_said(workdir):
    other = workdir / "other.pt"
    d2t = torch.from_numpy(np.sort(np.argsort(-math_counts(), kind="stable")[:K_OLD]) - np.arange(K_OLD))
    torch.save({"d2t": d2t, "t2d": torch.zeros(LLAMA3_V, dtype=torch.bool)}, other)
    text = (workdir / "run.yaml").read_text()
    (workdir / "run.yaml").write_text(text.replace('  torch_dtype: "bfloat16"\n', f'  vocab_mapping_path: "{other}"\n'))
    result = before_training("run.yaml", search=FAST)
    assert any("named another mapping" in note for note in result.notes)
    assert np.array_equal(kept_of(standin.run_config_draft("run.yaml")["d2t"]), general_kept_ids(K_OLD))


def test_without_prepare_specforge_would_repoint_or_fail(workdir):
    """The hazard prepare exists for: the stand-in shows SpecForge's behaviour on the raw run file."""
    with pytest.raises(standin.SpecForgeWouldFail, match="derive one with draft_vocab_size 32000"):
        standin.run_config_draft("run.yaml")
    # With a config of the right k but another mapping of the same size, the trained rows are silently repointed.
    config = workdir / "draft.json"
    config.write_text(json.dumps(eagle3_config(LLAMA3_V, K_OLD)))
    other = workdir / "other.pt"
    counts = math_counts()
    ids = np.sort(np.argsort(-counts, kind="stable")[:K_OLD])
    torch.save({"d2t": torch.from_numpy(ids - np.arange(K_OLD)), "t2d": torch.zeros(LLAMA3_V, dtype=torch.bool)}, other)
    model = standin.run_config_draft(
        "run.yaml", [f"model.draft_model_config={config}", f"model.vocab_mapping_path={other}"]
    )
    assert not np.array_equal(kept_of(model["d2t"]), general_kept_ids(K_OLD))


def test_asking_for_another_k_while_continuing_needs_remap(workdir):
    before = tree_bytes(workdir)
    with pytest.raises(InputError, match=r"whose 2048 trained LM-head rows fix k.*--remap"):
        before_training("run.yaml", search=SearchSettings(draft_vocab_size=3000))
    assert tree_bytes(workdir) == before


def test_a_checkpoint_without_d2t_is_refused_naming_the_problem(workdir):
    tensors = trained_tensors()
    del tensors["d2t"]
    write_runtime_checkpoint(workdir / "outputs", tensors, step=80)
    before = tree_bytes(workdir)
    with pytest.raises(InputError, match=r"\[no_d2t\]"):
        before_training("run.yaml", search=FAST)
    assert tree_bytes(workdir) == before


# ---------------------------------------------------------------- --remap


def test_remap_keeps_every_trained_row_byte_for_byte(workdir):
    checkpoint_before = tree_bytes(workdir / "outputs")
    result = before_training("run.yaml", search=FAST, remap=True)
    run = yaml.safe_load((workdir / "run.yaml").read_text())
    warm = Path(run["model"]["draft_checkpoint_path"])
    assert str(warm) == result.warm_start and run["model"]["draft_model_config"] == str(warm / "config.json")
    new_kept = kept_of(torch.load(run["model"]["vocab_mapping_path"], weights_only=True)["d2t"])
    assert new_kept.size == result.k != K_OLD

    # Loaded the way SpecForge does (warm start from the new checkpoint, then the mapping): for every kept target
    # id, its trained row if the old head had one, else the target's lm_head row.
    model = standin.run_config_draft("run.yaml")
    trained = trained_tensors()
    old_kept = general_kept_ids(K_OLD)
    old_row = {int(t): i for i, t in enumerate(old_kept)}
    target_head = load_file(str(workdir / "target" / "model-00002-of-00002.safetensors"))["lm_head.weight"]
    kept = kept_of(model["d2t"])
    assert np.array_equal(kept, new_kept) and int(model["t2d"].sum()) == result.k
    retained = 0
    for row, target_id in enumerate(kept):
        got = model["lm_head.weight"][row]
        if int(target_id) in old_row:
            want = trained["lm_head.weight"][old_row[int(target_id)]]
            retained += 1
        else:
            want = target_head[int(target_id)]
        assert got.view(torch.int16).equal(want.view(torch.int16)), (row, int(target_id))
    assert 0 < retained < result.k
    # Every other tensor is the checkpoint's, byte for byte.
    for name in trained:
        if name not in ("lm_head.weight", "d2t", "t2d"):
            assert model[name].view(torch.uint8).equal(trained[name].view(torch.uint8)), name
    assert tree_bytes(workdir / "outputs") == checkpoint_before
    # The warm start carries the new mapping's fingerprint; verify accepts it.
    assert main(["-q", "verify", str(warm), "--target-model-path", "target"]) == 0
    # The next prepare continues from the warm start: its own mapping, the same one, and the warm start stays.
    mapping_bytes, warm_before = Path(result.mapping_path).read_bytes(), tree_bytes(warm)
    again = before_training("run.yaml", search=FAST)
    assert again.k == result.k and Path(again.mapping_path).read_bytes() == mapping_bytes
    assert "SpecForge gets the checkpoint's own mapping" in "\n".join(again.summary_lines())
    assert tree_bytes(warm) == warm_before


def test_remap_under_resume_is_refused(workdir):
    text = (workdir / "run.yaml").read_text().replace('  draft_checkpoint_path: "outputs"\n', "")
    (workdir / "run.yaml").write_text(text + '  resume_from: "outputs"\n')
    with pytest.raises(InputError, match="--remap needs a warm start"):
        before_training("run.yaml", search=FAST, remap=True)


# ---------------------------------------------------------------- resume


def test_resume_changes_nothing_specforge_reads(workdir):
    # A first run: prepare (fresh), then training wrote a checkpoint holding that mapping.
    text = (workdir / "run.yaml").read_text().replace('  draft_checkpoint_path: "outputs"\n', "")
    text = text.replace(
        '  torch_dtype: "bfloat16"\n', '  torch_dtype: "bfloat16"\n  draft_model_config: "draft.json"\n'
    )
    (workdir / "run.yaml").write_text(text)
    (workdir / "draft.json").write_text(json.dumps(eagle3_config(LLAMA3_V, 32000), indent=2))
    first = before_training("run.yaml", search=FAST)
    mapping = torch.load(first.mapping_path, weights_only=True)
    tensors = eagle3_tensors(kept_of(mapping["d2t"]), vocab_size=LLAMA3_V, embed=False, seed=5)
    write_runtime_checkpoint(workdir / "runs", tensors, step=300)
    (workdir / "run.yaml").write_text((workdir / "run.yaml").read_text() + '  resume_from: "runs"\n')
    watched = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (workdir / "run.yaml", workdir / "draft.json")}
    watched[Path(first.mapping_path)] = (Path(first.mapping_path).read_bytes(), os.stat(first.mapping_path).st_mtime_ns)
    # More data since: the mapping must still not change (SpecForge compares size and mtime_ns on resume).
    with open(workdir / "data" / "math.jsonl", "a", encoding="utf-8") as handle:
        handle.write(Path(GENERAL_DATA[0]).read_text().splitlines()[0] + "\n")

    result = before_training("run.yaml", search=FAST)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == watched
    assert result.run_config is None and result.k == first.k
    assert any("holds this same mapping" in note for note in result.notes)
    model = standin.run_config_draft("run.yaml")
    assert torch.equal(model["d2t"], tensors["d2t"]) and torch.equal(model["lm_head.weight"], tensors["lm_head.weight"])


# ---------------------------------------------------------------- older SpecForge: train_eagle3.py


def old_flags(*extra):
    return [
        "--target-model-path",
        "target",
        "--train-data-path",
        "data/math.jsonl",
        "--chat-template",
        "llama3",
        "--output-dir",
        "outputs/eagle3",
        *extra,
    ]


def test_pre_step_ckpt_dir_writes_the_checkpoints_own_mapping(workdir, capsys):
    write_draft_dir(workdir / "general-draft", trained_tensors(), eagle3_config(LLAMA3_V, K_OLD))
    flags = old_flags("--ckpt-dir", "general-draft")
    before = tree_bytes(workdir / "general-draft")
    assert main(["-q", "pre-step", *FAST_FLAGS, "--", *flags]) == 0
    for legacy in (False, True):
        model = standin.train_eagle3_draft(flags, legacy=legacy)
        assert np.array_equal(kept_of(model["d2t"]), general_kept_ids(K_OLD))
        assert torch.equal(model["lm_head.weight"], trained_tensors()["lm_head.weight"])
    assert tree_bytes(workdir / "general-draft") == before
    with pytest.raises(InputError, match="--remap"):
        before_training(train_eagle3_args=flags, search=SearchSettings(draft_vocab_size=1000))

    # --resume takes the newest epoch_* checkpoint under --output-dir, and wins over --ckpt-dir.
    resumed = eagle3_tensors(general_kept_ids(1500), vocab_size=LLAMA3_V, embed=False, seed=3)
    write_draft_dir(workdir / "outputs" / "eagle3" / "epoch_1_step_20", resumed, eagle3_config(LLAMA3_V, 1500))
    write_draft_dir(
        workdir / "outputs" / "eagle3" / "epoch_0_step_90", trained_tensors(), eagle3_config(LLAMA3_V, K_OLD)
    )
    (workdir / "draft.json").write_text(json.dumps(eagle3_config(LLAMA3_V, 32000)))
    flags = old_flags("--draft-model-config", "draft.json", "--resume")
    assert main(["-q", "pre-step", *FAST_FLAGS, "--", *flags]) == 0
    assert json.loads((workdir / "draft.json").read_text())["draft_vocab_size"] == 1500  # k follows the checkpoint
    assert np.array_equal(kept_of(standin.train_eagle3_draft(flags)["d2t"]), general_kept_ids(1500))


def test_scripts_train_eagle3_remap_hands_over_the_warm_start_as_ckpt_dir(workdir, monkeypatch):
    write_draft_dir(workdir / "general-draft", trained_tensors(), eagle3_config(LLAMA3_V, K_OLD))
    handed = {}
    monkeypatch.setattr(training, "find_specforge_train_script", lambda explicit: "/SpecForge/scripts/train_eagle3.py")
    monkeypatch.setattr(training, "hand_over", lambda script, flags: handed.update(flags=list(flags)))
    flags = old_flags("--ckpt-dir", "general-draft")
    ours = ["--vocab-remap", "--vocab-n-calls", "8", "--vocab-max-vocab-size", "6000"]
    assert training.train_eagle3_main([*ours, *flags]) == 0
    at = handed["flags"].index("--ckpt-dir")
    warm = handed["flags"][at + 1]
    assert warm.endswith("-warm-start") and handed["flags"][:at] + handed["flags"][at + 2 :] == flags[:-2]
    # train_eagle3.py with the warm start: its weights, then the mapping at the md5 path keyed on its config.
    model = standin.train_eagle3_draft(handed["flags"])
    k = json.loads((Path(warm) / "config.json").read_text())["draft_vocab_size"]
    assert model["lm_head.weight"].shape[0] == k == model["d2t"].numel() != K_OLD
    old_row = {int(t): i for i, t in enumerate(general_kept_ids(K_OLD))}
    trained = trained_tensors()["lm_head.weight"]
    kept = kept_of(model["d2t"])
    assert any(int(t) in old_row for t in kept)
    for row, target_id in enumerate(kept):
        if int(target_id) in old_row:
            assert (
                model["lm_head.weight"][row].view(torch.int16).equal(trained[old_row[int(target_id)]].view(torch.int16))
            )
