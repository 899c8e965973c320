"""The pre-training hook under torchrun: 2 CPU ranks on gloo.

* the ranks write byte-identical outputs to one process (raw conversations, offline features;
  safetensors files compared by tensors and metadata, see safetensors_content);
* a bad dataset line (raw or pre-tokenized) fails every rank with the same message, and the CLI
  exits on every rank;
* scripts/train_eagle3.py under torchrun hands over to a SpecForge script that starts its own
  process group afterwards (the pre-step's group must not get in its way).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import specforge_standin as standin
import yaml
from conftest import (
    DATA,
    LLAMA3_CONFIG,
    LLAMA3_DIR,
    REPO,
    child_env,
    masked_examples,
    read_jsonl,
    write_features,
    write_jsonl,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU")

MULTITURN = DATA / "hh_rlhf_multiturn_sample.jsonl"
MAX_LENGTH = 512

DRIVER = """\
import json, os, sys
import torch, torch.distributed as dist
from specforge_vocab import before_training
from specforge_vocab.errors import SpecForgeVocabError
from specforge_vocab.choosing.search import SearchSettings

rank = int(os.environ.get("RANK", "0"))
out = {}
for name, kwargs in json.loads(sys.argv[1]):
    try:
        r = before_training(search=SearchSettings(n_calls=8, max_vocab_size=3000), **kwargs)
        out[name] = {"k": r.k, "mapping": r.mapping_path, "action": r.action, "rank": r.rank}
    except SpecForgeVocabError as exc:
        out[name] = {"error": str(exc), "type": type(exc).__name__}
if "WORLD_SIZE" in os.environ:
    # What the training script does next: its own process group, in the same torchrun job.
    dist.init_process_group("gloo")
    t = torch.ones(2) * (rank + 1)
    dist.all_reduce(t)
    out["training_group"] = t.tolist()
    dist.destroy_process_group()
json.dump(out, open(f"result-{rank}.json", "w"))
"""

OUTPUTS = (
    "vocab_mapping.pt",
    "vocab_mapping.safetensors",
    "token_counts.safetensors",
    "summary.json",
    "full_results.json",
)


def torchrun(args, cwd, *, log_dir=None, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if log_dir is not None:
        command += ["--log-dir", str(log_dir), "--redirects", "3"]
    env = child_env(TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rank_logs(log_dir: Path):
    logs = {}
    for path in log_dir.rglob("stderr.log"):
        logs[int(path.parent.name)] = path.read_text()
    return logs


@pytest.fixture()
def workspace(tmp_path):
    """run.yaml (raw conversations), features.yaml (offline features), prompts_bad.yaml, raw_bad.yaml."""
    shutil.copy(LLAMA3_CONFIG, tmp_path / "draft.json")
    shutil.copy(LLAMA3_CONFIG, tmp_path / "draft_features.json")
    records = read_jsonl(DATA / "gsm8k_test_sample.jsonl")[:40] + read_jsonl(MULTITURN)[:10]
    write_jsonl(tmp_path / "train.jsonl", records)
    lines = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[6] = lines[6][:40] + "\n"  # a truncated record on line 7
    (tmp_path / "bad.jsonl").write_text("".join(lines), encoding="utf-8")
    examples = masked_examples(records[:24], LLAMA3_DIR, "llama3", MAX_LENGTH)
    write_features(tmp_path / "features", examples)
    prompts = [json.dumps({"input_ids": ids, "loss_mask": mask}) for ids, mask in examples]
    prompts[4] = json.dumps({"input_ids": [1, 2, 3], "loss_mask": [0, 2, 1]})
    (tmp_path / "prompts_bad.jsonl").write_text("\n".join(prompts) + "\n")

    def config(name, draft, **data):
        (tmp_path / name).write_text(
            yaml.safe_dump(
                {
                    "model": {"target_model_path": LLAMA3_DIR, "draft_model_config": draft},
                    "data": {"max_length": MAX_LENGTH, "chat_template": "llama3", **data},
                }
            ),
            encoding="utf-8",
        )

    config("run.yaml", "draft.json", train_data_path="train.jsonl")
    config("features.yaml", "draft_features.json", hidden_states_path="features")
    config("prompts_bad.yaml", "draft.json", prompts_path="prompts_bad.jsonl")
    config("raw_bad.yaml", "draft.json", train_data_path="bad.jsonl")
    (tmp_path / "driver.py").write_text(DRIVER)
    return tmp_path


def safetensors_content(path: Path):
    """Tensors and metadata: safetensors writes its metadata keys in a random order in each process
    (a Rust HashMap), so its bytes differ between any two processes even for equal content."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).tobytes() for key in handle.keys()}


def outputs_of(result):
    folder = Path(result["mapping"]).parent
    return {
        name: safetensors_content(folder / name) if name.endswith(".safetensors") else (folder / name).read_bytes()
        for name in OUTPUTS
    }


def test_two_ranks_write_what_one_process_writes_and_fail_together(workspace, monkeypatch):
    monkeypatch.chdir(workspace)  # relative paths in the configs start here, as in SpecForge
    scenarios = [
        ["raw", {"run_config": "run.yaml", "force": True}],
        ["features", {"run_config": "features.yaml", "force": True}],
        ["prompts_bad", {"run_config": "prompts_bad.yaml"}],
        ["raw_bad", {"run_config": "raw_bad.yaml"}],
    ]
    env = child_env()
    single = subprocess.run(
        [sys.executable, "driver.py", json.dumps(scenarios)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr
    alone = json.loads((workspace / "result-0.json").read_text())
    expected = {name: outputs_of(alone[name]) for name in ("raw", "features")}

    for draft in ("draft.json", "draft_features.json"):  # the same starting point as the single process
        shutil.copy(workspace / f"{draft}.bak", workspace / draft)
    done = torchrun(["driver.py", json.dumps(scenarios)], workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((workspace / f"result-{r}.json").read_text()) for r in (0, 1)]
    for name in ("raw", "features"):
        assert [ranks[r][name]["rank"] for r in (0, 1)] == [0, 1]
        assert ranks[0][name]["action"] == ranks[1][name]["action"] == "count"  # --force: the ranks counted
        assert ranks[0][name]["k"] == ranks[1][name]["k"] == alone[name]["k"]
        written = outputs_of(ranks[0][name])
        for output in OUTPUTS:
            assert written[output] == expected[name][output], f"{name}: {output} differs from one process's"
    _, d2t, _ = standin.run_config_mapping("run.yaml")
    assert d2t.numel() == ranks[0]["raw"]["k"]
    # A bad line: every rank raised InputError with one and the same message, naming file and line.
    for name, expected_text in (
        ("prompts_bad", "prompts_bad.jsonl, line 5, field 'loss_mask[1]' must be 0 or 1"),
        ("raw_bad", "bad.jsonl, line 7: malformed JSON"),
    ):
        errors = [ranks[r][name] for r in (0, 1)]
        assert errors[0] == errors[1] == alone[name]
        assert errors[0]["type"] == "InputError" and expected_text in errors[0]["error"]
    # The training script's own gloo group starts fine after ours (same torchrun store).
    assert ranks[0]["training_group"] == ranks[1]["training_group"] == [3.0, 3.0]


def test_cli_exits_on_every_rank_with_the_same_message(workspace):
    log_dir = workspace / "logs"
    done = torchrun(
        ["-m", "specforge_vocab.cli", "prepare", "--config", "raw_bad.yaml", "--n-calls", "8"],
        workspace,
        log_dir=log_dir,
    )
    assert done.returncode != 0
    logs = rank_logs(log_dir)
    assert sorted(logs) == [0, 1]
    messages = [[line for line in logs[r].splitlines() if line.startswith("error: ")] for r in (0, 1)]
    assert len(messages[0]) == 1 and messages[0] == messages[1]
    assert "bad.jsonl, line 7: malformed JSON" in messages[0][0] and "Traceback" not in logs[0] + logs[1]


FAKE_SPECFORGE = """\
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")  # SpecForge starts its own group (NCCL on GPUs) after the pre-step
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
json.dump({"argv": sys.argv[1:], "sum": t.item()}, open(f"handed-{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def test_script_under_torchrun_hands_over_on_every_rank(workspace, monkeypatch):
    fake = workspace / "SpecForge" / "scripts" / "train_eagle3.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_SPECFORGE)
    flags = [
        "--target-model-path",
        LLAMA3_DIR,
        "--draft-model-config",
        "draft.json",
        "--train-data-path",
        "train.jsonl",
        "--max-length",
        str(MAX_LENGTH),
        "--num-epochs",
        "1",
    ]
    done = torchrun(
        [
            str(REPO / "scripts" / "train_eagle3.py"),
            "--specforge-script",
            str(fake),
            "--vocab-n-calls",
            "8",
            "--vocab-max-vocab-size",
            "3000",
            *flags,
        ],
        workspace,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    handed = [json.loads((workspace / f"handed-{r}.json").read_text()) for r in (0, 1)]
    assert handed[0] == handed[1] == {"argv": flags, "sum": 3.0}
    monkeypatch.chdir(workspace)
    _, d2t, _ = standin.train_eagle3_mapping(flags)
    _, legacy, _ = standin.train_eagle3_mapping(flags, legacy=True)
    assert d2t.numel() == legacy.numel() == standin.draft_sizes(str(workspace / "draft.json"))[0] <= 3000
