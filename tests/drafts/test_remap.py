"""--remap's pieces: trained rows copied byte for byte, the target's lm_head rows read as SpecForge finds them,
SpecForge runtime checkpoints located and read (weights_only) as SpecForge does."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import (
    LLAMA3_V,
    eagle3_config,
    eagle3_tensors,
    general_kept_ids,
    tiny_llama3_target,
    tree_bytes,
    write_draft_dir,
    write_runtime_checkpoint,
)
from safetensors.torch import load_file, save_file

from specforge_vocab.counting.target_head import read_lm_head_rows
from specforge_vocab.drafts.remap import remap_rows, write_warm_start
from specforge_vocab.drafts.runtime_checkpoint import (
    RuntimeCheckpoint,
    checkpoint_config_file,
    open_draft,
    resolve_checkpoint_dir,
    runtime_state_file,
)
from specforge_vocab.errors import InputError

# ---------------------------------------------------------------- rows


def test_retained_rows_are_copied_bit_for_bit_new_rows_come_from_the_target():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**15), 2**15, (6, 5), generator=gen, dtype=torch.int16)
    bits[0, 0] = 0x7FC1  # a NaN with a payload: only a byte copy keeps it
    bits[1, 1] = -(2**15)  # -0.0
    old_rows = bits.view(torch.bfloat16)
    old_kept = np.array([3, 10, 11, 40, 41, 90])
    new_kept = np.array([2, 10, 40, 41, 77])
    fresh = torch.tensor([[1.5] * 5, [-2.25] * 5], dtype=torch.float32)  # ids 2 and 77, cast to bf16
    rows, retained = remap_rows(old_rows, old_kept, new_kept, fresh)
    assert retained.tolist() == [False, True, True, True, False]
    for new_row, old_row in ((1, 1), (2, 3), (3, 4)):
        assert rows[new_row].view(torch.int16).equal(bits[old_row])
    assert rows[0].tolist() == [1.5] * 5 and rows[4].tolist() == [-2.25] * 5 and rows.dtype == torch.bfloat16
    zeros, _ = remap_rows(old_rows, old_kept, new_kept, None)
    assert zeros[0].abs().sum() == 0 and zeros[4].abs().sum() == 0
    with pytest.raises(InputError, match="hidden size differs"):
        remap_rows(old_rows, old_kept, new_kept, torch.zeros(2, 7))


@pytest.mark.parametrize("layout", ["index", "single", "bin", "tied"])
def test_lm_head_rows_are_read_where_specforge_finds_them(tmp_path, layout):
    gen = torch.Generator().manual_seed(1)
    head = torch.randn(300, 8, generator=gen).to(torch.bfloat16)
    target = tmp_path / "target"
    target.mkdir()
    config = {"vocab_size": 300, "hidden_size": 8, "tie_word_embeddings": layout == "tied"}
    (target / "config.json").write_text(json.dumps(config))
    if layout == "index":  # SpecForge's TargetHead: the one *.index.json names the shard
        save_file({"lm_head.weight": head}, str(target / "model-00002.safetensors"))
        save_file({"model.norm.weight": head[0].clone()}, str(target / "model-00001.safetensors"))
        index = {
            "weight_map": {"lm_head.weight": "model-00002.safetensors", "model.norm.weight": "model-00001.safetensors"}
        }
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "single":
        save_file({"lm_head.weight": head, "model.norm.weight": head[0].clone()}, str(target / "model.safetensors"))
    elif layout == "bin":
        torch.save({"lm_head.weight": head}, target / "pytorch_model.bin")
    else:  # tied: the embedding is the head
        save_file({"model.embed_tokens.weight": head}, str(target / "model.safetensors"))
    ids = [299, 0, 17, 17]
    assert read_lm_head_rows(str(target), ids).view(torch.int16).equal(head[ids].view(torch.int16))
    with pytest.raises(InputError, match="has 300 rows, but row 300"):
        read_lm_head_rows(str(target), [300])
    assert read_lm_head_rows(str(tmp_path / "absent"), ids) is None


# ---------------------------------------------------------------- the warm-start writer


def test_warm_start_without_target_weights_uses_zeros_and_warns(tmp_path, caplog):
    old = general_kept_ids(512)
    write_runtime_checkpoint(tmp_path / "run", eagle3_tensors(old, vocab_size=LLAMA3_V, embed=False, seed=4))
    before = tree_bytes(tmp_path / "run")
    new = np.union1d(old[:400], np.arange(100000, 100050))
    target = tiny_llama3_target(tmp_path / "target", lm_head=False)

    def warm_start():
        return write_warm_start(
            open_draft(str(tmp_path / "run")),
            old,
            new,
            output=str(tmp_path / "warm"),
            config=eagle3_config(LLAMA3_V, 512),
            config_text=None,
            vocab_size=LLAMA3_V,
            target_model_path=str(target),
        )

    with caplog.at_level(logging.WARNING, logger="specforge_vocab.drafts.remap"):
        result = warm_start()
    assert "start at zeros" in caplog.text and result.added_rows_from == "zeros"
    assert (result.retained, result.added, result.new_draft_vocab_size) == (400, 50, 450)
    out = load_file(str(tmp_path / "warm" / "model.safetensors"))
    rows = out["lm_head.weight"][np.isin(new, np.arange(100000, 100050))]
    assert rows.abs().sum() == 0
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["draft_vocab_size"] == 450
    assert tree_bytes(tmp_path / "run") == before
    # The same warm start again: nothing rewritten.
    mtime = os.stat(tmp_path / "warm" / "model.safetensors").st_mtime_ns
    again = warm_start()
    assert not again.written and os.stat(tmp_path / "warm" / "model.safetensors").st_mtime_ns == mtime


def test_warm_start_is_never_written_into_the_checkpoint_and_is_checked_first(tmp_path):
    old = general_kept_ids(256)
    draft_dir = write_draft_dir(
        tmp_path / "draft", eagle3_tensors(old, vocab_size=LLAMA3_V), eagle3_config(LLAMA3_V, 256)
    )
    common = dict(config=eagle3_config(LLAMA3_V, 256), config_text=None, vocab_size=LLAMA3_V)
    with pytest.raises(InputError, match="inside the checkpoint"):
        write_warm_start(open_draft(str(draft_dir)), old, old[:100], output=str(draft_dir / "warm"), **common)
    # A config that does not fit the weights (hidden size) is caught by verify's checks before anything is written.
    with pytest.raises(InputError, match=r"would fail verify.*\[lm_head_columns\]"):
        write_warm_start(
            open_draft(str(draft_dir)),
            old,
            old[:100],
            output=str(tmp_path / "warm"),
            config=eagle3_config(LLAMA3_V, 256, hidden=32),
            config_text=None,
            vocab_size=LLAMA3_V,
        )
    assert not (tmp_path / "warm").exists()


# ---------------------------------------------------------------- SpecForge runtime checkpoints


def test_checkpoints_are_found_as_specforge_finds_them(tmp_path):
    tensors = eagle3_tensors(general_kept_ids(64), vocab_size=LLAMA3_V, embed=False)
    run = tmp_path / "out"
    for step in (50, 200, 100):
        write_runtime_checkpoint(run, tensors, step=step, latest=False)
    # No *-latest link (a file system without symlinks): the highest step.
    assert resolve_checkpoint_dir(str(run)) == str(run / "specforge-run-step200")
    write_runtime_checkpoint(run, tensors, step=150)  # -latest now points here
    assert resolve_checkpoint_dir("file://" + str(run)) == str(run / "specforge-run-step150")
    assert resolve_checkpoint_dir(str(run / "specforge-run-step50" / "training_state.pt")) == str(
        run / "specforge-run-step50"
    )
    write_runtime_checkpoint(run, tensors, run_id="other", step=10)
    with pytest.raises(InputError, match="several complete \\*-latest"):
        resolve_checkpoint_dir(str(run))
    os.unlink(run / "other-latest")
    os.unlink(run / "specforge-run-latest")
    with pytest.raises(InputError, match="checkpoints of several runs"):
        resolve_checkpoint_dir(str(run))
    with pytest.raises(InputError, match="no complete checkpoint"):
        resolve_checkpoint_dir(str(tmp_path))
    # An old train_eagle3.py epoch directory holds training_state.pt next to model.safetensors: a pretrained draft.
    old = write_draft_dir(tmp_path / "epoch_0_step_5", tensors, eagle3_config(LLAMA3_V, 64))
    torch.save({"epoch": 0, "global_step": 5}, old / "training_state.pt")
    assert runtime_state_file(str(old)) is None and not isinstance(open_draft(str(old)), RuntimeCheckpoint)
    assert checkpoint_config_file(str(old)) == str(old / "config.json")
    assert checkpoint_config_file(str(run / "specforge-run-step50")) is None  # runtime checkpoints have none


def test_runtime_checkpoint_tensors_load_with_weights_only(tmp_path):
    tensors = eagle3_tensors(general_kept_ids(64), vocab_size=LLAMA3_V, embed=False, seed=8)
    step = write_runtime_checkpoint(tmp_path / "out", tensors, step=9)
    draft = open_draft(str(tmp_path / "out"))
    assert isinstance(draft, RuntimeCheckpoint) and draft.global_step == 9 and draft.config is None
    assert draft.state_path == str(step / "training_state.pt")
    assert set(draft.tensors) == set(tensors) and all(torch.equal(draft.get(n), t) for n, t in tensors.items())
    assert draft.tensors["d2t"].dtype == "I64" and draft.tensors["lm_head.weight"].shape == (64, 64)
    torch.save({"draft_state_dict": tensors, "strategy": "dflash"}, step / "training_state.pt")
    with pytest.raises(InputError, match="strategy 'dflash', not 'eagle3'"):
        open_draft(str(step))
