"""`verify`: sound drafts are accepted (trained, trimmed, remapped; every storage layout), and each way a draft
can be served wrong is rejected with its problem named (exit 1); unreadable input is exit 2.

Drafts: tiny hidden size, the real Llama-3 vocabulary, kept set = the 2,048 most frequent ids of general data.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
from conftest import (
    LLAMA3_DIR,
    LLAMA3_V,
    MATH_DATA,
    eagle3_config,
    eagle3_tensors,
    general_kept_ids,
    llama3_counts,
    run_cli,
    tiny_llama3_target,
    write_draft_dir,
    write_runtime_checkpoint,
)

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.drafts.remap import write_warm_start
from specforge_vocab.drafts.runtime_checkpoint import open_draft
from specforge_vocab.drafts.trim import TrimSettings, trim_checkpoint
from specforge_vocab.drafts.verify import PROBLEMS, VerifySettings, data_coverage, verify_draft
from specforge_vocab.writing.mapping import build_mapping, mapping_fingerprint

K = 2048
KEPT = general_kept_ids(K)


def tensors(**changes):
    out = eagle3_tensors(KEPT, vocab_size=LLAMA3_V, embed=False, seed=21)
    for name, value in changes.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def math_top(k):
    counts = llama3_counts(str(MATH_DATA))
    return np.sort(np.argsort(-counts, kind="stable")[:k])


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """name -> (path, extra verify flags) for every case below."""
    root = tmp_path_factory.mktemp("verify")
    config = eagle3_config(LLAMA3_V, K)
    made = {}

    def hf(name, tensor_set=None, cfg=None, layout="single", flags=()):
        made[name] = (
            str(write_draft_dir(root / name, tensor_set or tensors(), cfg or config, layout=layout)),
            list(flags),
        )

    hf("trained safetensors")
    hf("trained sharded", layout="sharded")
    hf("trained pytorch_model.bin", layout="bin")
    hf("trained sharded bin", layout="sharded-bin")
    write_runtime_checkpoint(root / "runtime", tensors(), step=7)
    made["runtime checkpoint (run root)"] = (str(root / "runtime"), [])
    made["runtime checkpoint (training_state.pt)"] = (
        str(root / "runtime" / "specforge-run-step7" / "training_state.pt"),
        [],
    )
    counts = llama3_counts(str(MATH_DATA))
    trim_checkpoint(
        TrimSettings(
            checkpoint=made["trained safetensors"][0],
            output=str(root / "trimmed"),
            search=SearchSettings(search="exact", max_vocab_size=1500),
        ),
        counts=counts,
    )
    made["trimmed"] = (str(root / "trimmed"), [])
    target = tiny_llama3_target(root / "target")
    write_warm_start(
        open_draft(str(root / "runtime")),
        KEPT,
        math_top(3000),
        output=str(root / "remapped"),
        config=config,
        config_text=None,
        vocab_size=LLAMA3_V,
        target_model_path=str(target),
    )
    made["remapped"] = (str(root / "remapped"), ["--target-model-path", str(target)])

    # Rejected: each problem by itself.
    hf("no d2t", tensors(d2t=None, t2d=None))
    hf("all-zero d2t", tensors(d2t=torch.zeros(K, dtype=torch.int64)))
    other = root / "other_mapping.pt"
    d2t, t2d = build_mapping(math_top(K), LLAMA3_V)
    torch.save({"d2t": d2t, "t2d": t2d}, other)
    made["same-size different mapping"] = (made["trained safetensors"][0], ["--vocab-mapping", str(other)])
    hf("lm_head rows != k", tensors(**{"lm_head.weight": tensors()["lm_head.weight"][:2000]}))
    hf("float d2t", tensors(d2t=tensors()["d2t"].to(torch.float32)))
    qwen = root / "qwen-target"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"vocab_size": 151936, "hidden_size": 64}))
    made["vocab_size mismatch"] = (made["trained safetensors"][0], ["--target-model-path", str(qwen)])
    bad_t2d = tensors()["t2d"].clone()  # one kept id swapped for one not kept: the count still matches k
    bad_t2d[int(KEPT[5])] = False
    bad_t2d[int(np.setdiff1d(np.arange(LLAMA3_V), KEPT)[0])] = True
    hf("t2d disagrees", tensors(t2d=bad_t2d))
    hf("tied embeddings", cfg=eagle3_config(LLAMA3_V, K, tie_word_embeddings=True))
    hf(
        "hidden mismatch",
        flags=["--target-model-path", str(tiny_llama3_target(root / "wide-target", hidden=96, lm_head=False))],
    )
    hf("d2t out of range", tensors(d2t=tensors()["d2t"] + 200000))
    rare = np.arange(100000, 100000 + K)
    rare_tensors = eagle3_tensors(rare, vocab_size=LLAMA3_V, embed=False, seed=2)
    hf("collapsed on the data", rare_tensors, flags=["--counts-from-math"])
    return made


SOUND = [
    "trained safetensors",
    "trained sharded",
    "trained pytorch_model.bin",
    "trained sharded bin",
    "runtime checkpoint (run root)",
    "runtime checkpoint (training_state.pt)",
    "trimmed",
    "remapped",
]


REJECTED = [
    ("no d2t", "no_d2t", "draft row i is served as target id i"),
    ("all-zero d2t", "no_mapping_saved", "no mapping was saved"),
    ("same-size different mapping", "mapping_differs", r"draft row \d+ predicts target id \d+ in the draft but \d+"),
    ("lm_head rows != k", "lm_head_rows", "has 2000 rows, but draft_vocab_size is 2048"),
    ("float d2t", "d2t_dtype", "d2t is float32, but must be int64"),
    ("vocab_size mismatch", "vocab_size", "vocab_size is 128256, but the target .* has 151936"),
    ("t2d disagrees", "t2d", "t2d"),
    ("tied embeddings", "tied_embeddings", "tie_word_embeddings is true"),
    ("hidden mismatch", "hidden_size", "target hidden states of size 64, but the target .* hidden_size 96"),
    ("d2t out of range", "kept_ids", "outside \\[0, 128256\\)"),
    ("collapsed on the data", "frequent_tokens_missing", "most frequent tokens have no draft row"),
]


def verify(drafts, name, capsys, *more):
    path, flags = drafts[name]
    if "--counts-from-math" in flags:
        flags = [f for f in flags if f != "--counts-from-math"]
        more = (*more, "--dataset-path", str(MATH_DATA), "--tokenizer-path", LLAMA3_DIR, "--chat-template", "llama3")
    return run_cli(["verify", path, *flags, *more], capsys)


@pytest.mark.parametrize("name", SOUND)
def test_sound_drafts_pass(drafts, name, capsys):
    code, out, err = verify(drafts, name, capsys, "--json")
    report = json.loads(out)
    assert code == 0, report["problems"]
    assert report["sound"] and report["problems"] == [] and report["vocab_size"] == LLAMA3_V
    assert report["mapping_fingerprint"] == mapping_fingerprint(
        np.arange(report["draft_vocab_size"]) + np.asarray(_d2t(drafts[name][0])), LLAMA3_V
    )


def _d2t(path):
    draft = open_draft(path)
    return draft.get("d2t").numpy()


@pytest.mark.parametrize("name, problem, says", REJECTED, ids=[r[0] for r in REJECTED])
def test_each_problem_is_rejected_and_named(drafts, name, problem, says, capsys):
    assert problem in PROBLEMS
    code, out, _ = verify(drafts, name, capsys)
    assert code == 1
    assert f"[{problem}]" in out
    assert re.search(says, out), out
    code, out, _ = verify(drafts, name, capsys, "--json")
    assert code == 1 and problem in {p["name"] for p in json.loads(out)["problems"]}


def test_data_flags_report_the_kept_sets_coverage(drafts):
    counts = llama3_counts(str(MATH_DATA))
    report = verify_draft(VerifySettings(draft=drafts["trained safetensors"][0]), counts=counts)
    assert report.sound
    assert report.coverage == pytest.approx(counts[KEPT].sum() / counts.sum(), abs=1e-12)
    top = np.argsort(-counts, kind="stable")[:100]
    missing = counts[top][~np.isin(top, KEPT)].sum() / counts[top].sum()
    assert report.top_tokens_missing == pytest.approx(missing, abs=1e-12) and report.top_tokens_missing < 0.5
    assert data_coverage(np.array([5, 0, 3, 2]), np.array([0, 3]), top=2) == (0.7, 0.375)


def test_bad_input_is_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["verify", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err
    # A training_state.pt that needs arbitrary objects unpickled (an argparse.Namespace, as train_eagle3.py saved
    # them) is refused, never loaded.
    step = tmp_path / "run" / "specforge-run-step3"
    step.mkdir(parents=True)
    torch.save({"draft_state_dict": tensors(), "args": argparse.Namespace(lr=1e-4)}, step / "training_state.pt")
    code, _, err = run_cli(["verify", str(tmp_path / "run")], capsys)
    assert code == 2 and "weights_only=True" in err and "Namespace" in err
