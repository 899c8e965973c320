"""The pre-training hook in one process: prepare, pre-step, scripts/train_eagle3.py, before_training.

SpecForge's side is tests/specforge_wing/specforge_standin.py (written from SpecForge's documented behaviour,
without importing specforge_vocab): if it finds and installs the mapping, SpecForge would.
Multi-rank runs are in test_prepare_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import specforge_standin as standin
import torch
import yaml
from conftest import (
    CONFIG_YAMLS,
    CONFIGS,
    DATA,
    DEEPSEEK_DIR,
    LLAMA3_CONFIG,
    LLAMA3_DIR,
    REPO,
    masked_examples,
    read_jsonl,
    write_features,
    write_jsonl,
)

from specforge_vocab import before_training
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli import training
from specforge_vocab.cli.flags import settings_from
from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.errors import InputError
from specforge_vocab.specforge import prepare as prepare_module

CONVERSATIONS = DATA / "gsm8k_test_sample.jsonl"
MULTITURN = DATA / "hh_rlhf_multiturn_sample.jsonl"
TOKENIZER_FOR_V = {128256: (LLAMA3_DIR, "llama3"), 129280: (DEEPSEEK_DIR, "deepseek-v3")}
MAX_LENGTH = 512
FAST = ["--n-calls", "8", "--max-vocab-size", "3000"]
FAST_SEARCH = SearchSettings(n_calls=8, max_vocab_size=3000)


# ---------------------------------------------------------------- helpers


def counts_by_hand(examples, vocab_size):
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids, mask in examples:
        for token, m in zip(ids, mask):
            counts[token] += m
    return counts


def assert_top_k(counts, d2t):
    """The kept ids are k ids none of which is rarer than any id left out."""
    k = d2t.numel()
    kept = (torch.arange(k) + d2t).numpy()
    left = np.setdiff1d(np.arange(counts.size), kept)
    assert counts[kept].min() >= counts[left].max()


def changed_lines(before: str, after: str):
    a, b = before.splitlines(), after.splitlines()
    return [line for line in b if line not in a], [line for line in a if line not in b]


def snapshot(*paths):
    return {str(p): (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in paths}


RUN_YAML = """\
# Hook test run (paths relative to the directory training runs in)
model:
  target_model_path: "{tokenizer}"   # tokenizer used for counting
  draft_model_config: "configs/draft.json"
  vocab_mapping_path: ""
  torch_dtype: "bfloat16"

data:
  train_data_path: "data/train.jsonl"
  max_length: {max_length}
  chat_template: "llama3"   # decides the loss mask
  cache_dir: "./cache"

training:
  strategy: "eagle3"
"""


@pytest.fixture()
def llama_run(tmp_path, monkeypatch):
    """A run directory: configs/draft.json (Llama-3 8B draft), data/train.jsonl (60 GSM8K rows) and run.yaml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(LLAMA3_CONFIG, tmp_path / "configs" / "draft.json")
    (tmp_path / "data").mkdir()
    shutil.copy(CONVERSATIONS, tmp_path / "data" / "train.jsonl")
    run = tmp_path / "run.yaml"
    run.write_text(RUN_YAML.format(tokenizer=LLAMA3_DIR, max_length=MAX_LENGTH), encoding="utf-8")
    return tmp_path


class Spy:
    """Wraps a function and records its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def forbid(monkeypatch, target, name):
    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{name} must not run")

    monkeypatch.setattr(target, name, refuse)


# ---------------------------------------------------------------- every run config under configs/


def place_data(workdir: Path, raw: dict, V: int):
    """Create the data a configs/ YAML names, from tests/data; return (source, expected counts, overrides)."""
    tokenizer_dir, template = TOKENIZER_FOR_V[V]
    data = raw["data"]
    records = read_jsonl(CONVERSATIONS)[:24] + read_jsonl(MULTITURN)[:8]
    examples = masked_examples(records, tokenizer_dir, data.get("chat_template", "llama3"), MAX_LENGTH)
    overrides = [f"data.max_length={MAX_LENGTH}"]
    if data.get("train_data_path"):
        target = workdir / data["train_data_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(target, records)
        overrides.append(f"model.target_model_path={tokenizer_dir}")
        return "train_data_path", counts_by_hand(examples, V), overrides
    if data.get("hidden_states_path"):
        write_features(workdir / data["hidden_states_path"], examples)
        # A local target model directory: SpecForge reads V from its config.json (nested text_config here).
        target = workdir / "target-model"
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"text_config": {"vocab_size": V}}), encoding="utf-8")
        overrides.append(f"model.target_model_path={target}")
        return "hidden_states_path", counts_by_hand(examples, V), overrides
    target = workdir / data["prompts_path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, [{"input_ids": i, "loss_mask": m} for i, m in examples])
    overrides.append(f"model.target_model_path={tokenizer_dir}")
    return "prompts_path", counts_by_hand(examples, V), overrides


@pytest.mark.parametrize("yaml_path", CONFIG_YAMLS, ids=lambda p: p.name)
def test_every_run_config_hands_specforge_our_mapping(yaml_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    for draft_json in CONFIGS.glob("*.json"):
        shutil.copy(draft_json, tmp_path / "configs" / draft_json.name)
    config = tmp_path / "configs" / yaml_path.name
    shutil.copy(yaml_path, config)
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    draft = tmp_path / raw["model"]["draft_model_config"]
    k_before, V = standin.draft_sizes(str(draft))
    source, expected, overrides = place_data(tmp_path, raw, V)
    original_yaml, original_draft = config.read_text(encoding="utf-8"), draft.read_text(encoding="utf-8")

    # SpecForge's override form (positional section.field=value), relative config path as a user types it.
    assert main(["-q", "prepare", "--config", f"configs/{yaml_path.name}", *overrides, *FAST]) == 0

    path, d2t, t2d = standin.run_config_mapping(f"configs/{yaml_path.name}", overrides)
    k, vocab = standin.draft_sizes(str(draft))
    assert os.path.isabs(path) and (d2t.numel(), t2d.numel(), vocab) == (k, V, V)
    assert_top_k(expected, d2t)
    # The YAML: only model.vocab_mapping_path changed (comments and everything else kept); a .bak holds the original.
    assert Path(str(config) + ".bak").read_text(encoding="utf-8") == original_yaml
    added, removed = changed_lines(original_yaml, config.read_text(encoding="utf-8"))
    assert len(added) == 1 and "vocab_mapping_path:" in added[0] and path in added[0]
    assert all("vocab_mapping_path" in line for line in removed) and len(removed) <= 1
    # The draft config: only draft_vocab_size changed.
    assert draft.read_text(encoding="utf-8") == original_draft.replace(
        f'"draft_vocab_size": {k_before}', f'"draft_vocab_size": {k}'
    )
    counts, _meta = load_counts(str(Path(path).parent / "token_counts.safetensors"))
    assert np.array_equal(counts, expected)
    if source == "hidden_states_path":
        # Newer SpecForge also finds it without vocab_mapping_path, at its offline sha256 cache path.
        cached, cached_d2t, _ = standin.offline_cache_mapping(f"configs/{yaml_path.name}", overrides)
        assert Path(cached).read_bytes() == Path(path).read_bytes() and torch.equal(cached_d2t, d2t)


# ---------------------------------------------------------------- offline features and prompts


def test_feature_files_and_prompts_count_like_the_conversations_they_came_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = read_jsonl(MULTITURN)[:16] + read_jsonl(CONVERSATIONS)[:16]
    raw = write_jsonl(tmp_path / "raw.jsonl", records)
    examples = masked_examples(records, DEEPSEEK_DIR, "deepseek-v3", MAX_LENGTH)
    write_features(tmp_path / "features", examples)
    write_jsonl(tmp_path / "prompts.jsonl", [{"input_ids": ids, "loss_mask": mask} for ids, mask in examples])
    shutil.copy(CONFIGS / "deepseek-v3-671b-eagle3.json", tmp_path / "draft.json")
    V = standin.draft_sizes(str(tmp_path / "draft.json"))[1]
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"target_model_path": DEEPSEEK_DIR, "draft_model_config": "draft.json"},
                "data": {"hidden_states_path": "features", "max_length": MAX_LENGTH, "chat_template": "deepseek-v3"},
            }
        ),
        encoding="utf-8",
    )
    # The raw conversations, counted by our own fast path (MaskEngine).
    expected = count_tokens(
        [str(raw)], DEEPSEEK_DIR, chat_template="deepseek-v3", max_length=MAX_LENGTH, target_vocab_size=V
    )
    assert expected.sum() > 1000

    features = before_training(str(config), search=FAST_SEARCH)
    counts, meta = load_counts(os.path.join(features.output_dir, "token_counts.safetensors"))
    assert np.array_equal(counts, expected)
    assert meta["records_counted"] == str(len(records)) and "offline feature files" in meta["source"]
    assert sum(1 for _ in (tmp_path / "features").rglob("*.ckpt.gz")) == len(records) // 2

    prompts = before_training(
        str(config), overrides=["data.hidden_states_path=", "data.prompts_path=prompts.jsonl"], search=FAST_SEARCH
    )
    counts, meta = load_counts(os.path.join(prompts.output_dir, "token_counts.safetensors"))
    assert np.array_equal(counts, expected) and prompts.output_dir != features.output_dir
    assert prompts.k == features.k  # same counts, same search: same choice


def test_prompts_file_of_raw_conversations_is_counted_like_train_data(tmp_path, monkeypatch, llama_run):
    shutil.copy(CONVERSATIONS, llama_run / "data" / "prompts.jsonl")
    result = before_training(
        "run.yaml", overrides=["data.train_data_path=", "data.prompts_path=data/prompts.jsonl"], search=FAST_SEARCH
    )
    counts, _ = load_counts(os.path.join(result.output_dir, "token_counts.safetensors"))
    assert np.array_equal(
        counts, count_tokens([str(CONVERSATIONS)], LLAMA3_DIR, chat_template="llama3", max_length=MAX_LENGTH)
    )


def test_bad_feature_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LLAMA3_CONFIG, tmp_path / "draft.json")
    write_features(tmp_path / "features", [([1, 2, 3], [0, 1, 1]), ([5, 128256, 7], [1, 1, 1])])
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"target_model_path": LLAMA3_DIR, "draft_model_config": "draft.json"},
                "data": {"hidden_states_path": "features"},
            }
        )
    )
    with pytest.raises(InputError, match=r"data_1\.ckpt\.gz holds the token id 128256, outside the target vocabulary"):
        before_training(str(config), search=FAST_SEARCH)


# ---------------------------------------------------------------- reuse and what triggers recomputing


def test_second_prepare_with_unchanged_inputs_counts_nothing(llama_run, monkeypatch, capsys):
    first = before_training("run.yaml", search=FAST_SEARCH)
    assert first.action == "count" and not first.reused
    out = Path(first.output_dir)
    assert out.parent == llama_run / "cache" / "vocab_optimization"
    watched = [
        out / name for name in ("vocab_mapping.pt", "token_counts.safetensors", "summary.json", "fingerprint.json")
    ] + [llama_run / "configs" / "draft.json", llama_run / "run.yaml"]
    before = snapshot(*watched)
    from specforge_vocab.counting import cache
    from specforge_vocab.counting import count as counting

    forbid(monkeypatch, prepare_module, "count_data")
    forbid(monkeypatch, counting, "count_dataset")
    forbid(monkeypatch, cache, "count_dataset")
    forbid(monkeypatch, prepare_module, "optimize")
    second = before_training("run.yaml", search=FAST_SEARCH)
    assert second.reused and second.action == "reuse"
    assert (second.k, second.mapping_path, second.summary) == (first.k, first.mapping_path, first.summary)
    assert snapshot(*watched) == before  # not even rewritten
    # Touched but unchanged data: judged by content, still reused.
    data = llama_run / "data" / "train.jsonl"
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 5_000_000_000))
    assert before_training("run.yaml", search=FAST_SEARCH).reused
    # The CLI says so; --set gives the value already in the file, so nothing changed.
    capsys.readouterr()
    assert main(["prepare", "--config", "run.yaml", "--set", f"data.max_length={MAX_LENGTH}", *FAST]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("reused (inputs unchanged)") and f"data.max_length={MAX_LENGTH}" in printed


def test_each_fingerprinted_input_triggers_recomputing(llama_run, monkeypatch):
    run, draft, data = llama_run / "run.yaml", llama_run / "configs" / "draft.json", llama_run / "data" / "train.jsonl"
    counted = Spy(prepare_module.count_data)
    searched = Spy(prepare_module.optimize)
    monkeypatch.setattr(prepare_module, "count_data", counted)
    monkeypatch.setattr(prepare_module, "optimize", searched)

    def prepare(expected_action, search=FAST_SEARCH, **kw):
        calls = (counted.calls, searched.calls)
        result = before_training("run.yaml", search=search, **kw)
        assert result.action == expected_action, result.reason
        assert (counted.calls - calls[0], searched.calls - calls[1]) == {
            "count": (1, 1),
            "search": (0, 1),
            "reuse": (0, 0),
        }[expected_action]
        standin.run_config_mapping("run.yaml")  # SpecForge loads whatever was written last
        return result, load_counts(os.path.join(result.output_dir, "token_counts.safetensors"))[0]

    _, counts0 = prepare("count")
    # Data file content.
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(read_jsonl(MULTITURN)[0]) + "\n")
    _, counts1 = prepare("count")
    assert counts1.sum() > counts0.sum()
    prepare("reuse")
    # Template (llama3 -> qwen: other headers, another mask).
    run.write_text(run.read_text().replace('chat_template: "llama3"', 'chat_template: "qwen"'))
    result, counts2 = prepare("count")
    assert "chat_template" in result.reason and not np.array_equal(counts2, counts1)
    # max_length.
    run.write_text(run.read_text().replace(f"max_length: {MAX_LENGTH}", "max_length: 64"))
    result, counts3 = prepare("count")
    assert "max_length" in result.reason and counts3.sum() < counts2.sum()
    # Draft config (another architecture; our own draft_vocab_size patch alone never counts as a change).
    text = draft.read_text()
    draft.write_text(text.replace('"intermediate_size": 14336', '"intermediate_size": 8192'))
    result, counts4 = prepare("search")
    assert np.array_equal(counts4, counts3)
    # A search setting.
    result, _ = prepare("search", search=SearchSettings(n_calls=8, max_vocab_size=3000, coverage_weight=0.8))
    assert "coverage_weight" in result.reason
    prepare("reuse", search=SearchSettings(n_calls=8, max_vocab_size=3000, coverage_weight=0.8))
    # --force.
    prepare("count", search=SearchSettings(n_calls=8, max_vocab_size=3000, coverage_weight=0.8), force=True)
    # A damaged output is recomputed from the stored counts.
    result, _ = prepare("reuse", search=SearchSettings(n_calls=8, max_vocab_size=3000, coverage_weight=0.8))
    Path(result.mapping_path).write_bytes(b"broken")
    result, _ = prepare("search", search=SearchSettings(n_calls=8, max_vocab_size=3000, coverage_weight=0.8))
    assert "vocab_mapping.pt" in result.reason


def test_keep_draft_vocab_size_writes_only_the_mapping(llama_run):
    draft = llama_run / "configs" / "draft.json"
    original = draft.read_bytes()
    assert main(["-q", "prepare", "--config", "run.yaml", "--keep-draft-vocab-size", *FAST]) == 0
    assert draft.read_bytes() == original and not Path(str(draft) + ".bak").exists()
    path, d2t, t2d = standin.run_config_mapping("run.yaml")
    assert d2t.numel() == 32000 and t2d.numel() == 128256
    summary = json.loads((Path(path).parent / "summary.json").read_text())
    assert summary["optimal_draft_vocab_size"] == 32000 and summary["method"] == "fixed"
    with pytest.raises(InputError, match="--keep-draft-vocab-size keeps draft_vocab_size 32000 .* asks for 1000"):
        before_training("run.yaml", keep_draft_vocab_size=True, search=SearchSettings(draft_vocab_size=1000))


def test_output_config_leaves_the_run_config_alone(llama_run):
    original = (llama_run / "run.yaml").read_bytes()
    result = before_training("run.yaml", output_config="run.prepared.yaml", search=FAST_SEARCH)
    assert (llama_run / "run.yaml").read_bytes() == original
    assert result.run_config == str(llama_run / "run.prepared.yaml")
    path, d2t, _ = standin.run_config_mapping("run.prepared.yaml")
    assert path == result.mapping_path and d2t.numel() == result.k
    assert "next: specforge train --config " + str(llama_run / "run.prepared.yaml") in result.summary_lines()


FLOW_RUN_YAML = """\
model: {{target_model_path: "{tokenizer}", draft_model_config: configs/draft.json}}  # flow style
data:
  train_data_path: data/train.jsonl
  max_length: {max_length}
"""

ALIAS_RUN_YAML = """\
defaults: &model
  target_model_path: "{tokenizer}"
  draft_model_config: configs/draft.json
model: *model
data:
  train_data_path: data/train.jsonl
  max_length: {max_length}
"""


def test_a_flow_mapping_model_section_is_patched(llama_run):
    run = llama_run / "run.yaml"
    run.write_text(FLOW_RUN_YAML.format(tokenizer=LLAMA3_DIR, max_length=MAX_LENGTH))
    result = before_training("run.yaml", search=FAST_SEARCH)
    path, d2t, _ = standin.run_config_mapping("run.yaml")
    assert path == result.mapping_path and d2t.numel() == result.k
    assert run.read_text().startswith(f'model: {{target_model_path: "{LLAMA3_DIR}", draft_model_config: ')
    assert run.read_text().splitlines()[0].endswith(f'vocab_mapping_path: "{result.mapping_path}"}}  # flow style')


def test_a_layout_that_cannot_be_patched_is_refused_before_any_work(llama_run, monkeypatch, capsys):
    """The model section is an alias: prepare refuses before counting, and changes no file; the
    suggested --output-config works."""
    run = llama_run / "run.yaml"
    run.write_text(ALIAS_RUN_YAML.format(tokenizer=LLAMA3_DIR, max_length=MAX_LENGTH))
    before = {p: p.read_bytes() for p in llama_run.rglob("*") if p.is_file()}
    forbid(monkeypatch, prepare_module, "count_data")
    forbid(monkeypatch, prepare_module, "optimize")
    code = main(["prepare", "--config", "run.yaml", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "'model:' is followed by an alias of another section" in err and "Nothing was changed" in err
    after = {p: p.read_bytes() for p in llama_run.rglob("*") if p.is_file()}
    assert after == before and not (llama_run / "cache").exists()
    monkeypatch.undo()
    monkeypatch.chdir(llama_run)
    assert main(["prepare", "--config", "run.yaml", "--output-config", "run.prepared.yaml", *FAST]) == 0
    path, d2t, _ = standin.run_config_mapping("run.prepared.yaml")
    assert (
        os.path.isfile(path)
        and d2t.numel() == json.loads((llama_run / "configs" / "draft.json").read_text())["draft_vocab_size"]
    )
    assert run.read_bytes() == before[run]


# ---------------------------------------------------------------- older SpecForge: train_eagle3 flags


TRAIN_FLAGS = [
    "--target-model-path",
    LLAMA3_DIR,
    "--draft-model-config",
    "configs/draft.json",
    "--train-data-path",
    "data/train.jsonl",
    "--max-length",
    str(MAX_LENGTH),
    "--chat-template",
    "llama3",
    "--num-epochs",
    "2",
    "--learning-rate",
    "1e-4",
    "--output-dir",
    "outputs/eagle3",
]


def test_pre_step_writes_the_mapping_at_both_md5_cache_paths(llama_run):
    assert main(["-q", "pre-step", *FAST, "--", *TRAIN_FLAGS]) == 0
    current, d2t, t2d = standin.train_eagle3_mapping(TRAIN_FLAGS)
    legacy, legacy_d2t, _ = standin.train_eagle3_mapping(TRAIN_FLAGS, legacy=True)
    assert current != legacy and Path(current).read_bytes() == Path(legacy).read_bytes()
    assert Path(current).resolve().parent == llama_run / "cache" / "vocab_mapping"
    k = standin.draft_sizes("configs/draft.json")[0]
    assert d2t.numel() == k < 32000 and t2d.numel() == 128256
    expected = count_tokens(["data/train.jsonl"], LLAMA3_DIR, chat_template="llama3", max_length=MAX_LENGTH)
    assert_top_k(expected, d2t)
    # Unchanged: reused, and the cache copies are still in place.
    result = before_training(train_eagle3_args=TRAIN_FLAGS, search=FAST_SEARCH)
    assert result.reused and result.cache_paths == [os.path.abspath(current), os.path.abspath(legacy)]


def test_resume_without_a_checkpoint_is_a_fresh_run_and_a_ckpt_dir_needs_weights(llama_run):
    """Continuing runs are in test_continuing.py; here the cases where nothing is continued."""
    (llama_run / "outputs" / "eagle3" / "not_a_checkpoint").mkdir(parents=True)
    result = before_training(train_eagle3_args=[*TRAIN_FLAGS, "--resume"], search=FAST_SEARCH)
    assert result.k < 32000 and "continuing" not in result.summary  # train_eagle3.py trains from scratch here
    standin.train_eagle3_mapping([*TRAIN_FLAGS, "--resume"])
    ckpt = llama_run / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((llama_run / "configs" / "draft.json").read_text())
    with pytest.raises(InputError, match="--ckpt-dir .*ckpt holds no model.safetensors"):
        before_training(train_eagle3_args=[*TRAIN_FLAGS, "--ckpt-dir", "ckpt"], search=FAST_SEARCH)


def fake_specforge(tmp_path: Path, exit_code: int = 0) -> Path:
    script = tmp_path / "SpecForge" / "scripts" / "train_eagle3.py"
    script.parent.mkdir(parents=True)
    script.write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(os.environ['FAKE_RECORD'], 'w'))\n"
        f"sys.exit({exit_code})\n"
    )
    return script


def run_script(args, cwd, **env):
    environment = dict(os.environ, **env)
    environment.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_eagle3.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_script_runs_the_pre_step_then_hands_over_with_the_same_flags(llama_run):
    fake = fake_specforge(llama_run, exit_code=7)
    record = llama_run / "argv.json"
    ours_mixed_in = [
        TRAIN_FLAGS[0],
        TRAIN_FLAGS[1],
        "--vocab-n-calls",
        "8",
        *TRAIN_FLAGS[2:6],
        f"--specforge-script={fake}",
        "--vocab-max-vocab-size",
        "3000",
        *TRAIN_FLAGS[6:],
    ]
    done = run_script(ours_mixed_in, llama_run, FAKE_RECORD=str(record))
    assert done.returncode == 7, done.stderr  # SpecForge's exit status is the script's
    handed = json.loads(record.read_text())
    assert handed == {"argv": TRAIN_FLAGS, "cwd": str(llama_run)}
    assert "handing over to" in done.stdout
    _, d2t, _ = standin.train_eagle3_mapping(handed["argv"])
    _, legacy_d2t, _ = standin.train_eagle3_mapping(handed["argv"], legacy=True)
    assert torch.equal(d2t, legacy_d2t) and d2t.numel() == standin.draft_sizes("configs/draft.json")[0] < 3001


def test_script_without_specforge_says_how_to_point_at_it(llama_run):
    done = run_script(TRAIN_FLAGS, llama_run, FAKE_RECORD=str(llama_run / "never.json"))
    assert done.returncode == 2
    assert "--specforge-script /path/to/SpecForge/scripts/train_eagle3.py" in done.stderr
    assert not (llama_run / "cache").exists()  # it stopped before doing any work


def test_split_handover_flags_keeps_order_and_values():
    own, rest = training.split_handover_flags(
        [
            "--a",
            "1",
            "--vocab-n-calls",
            "5",
            "--specforge-script=x.py",
            "--b",
            "--keep-draft-vocab-size",
            "--vocab-search",
            "exact",
            "--c=3",
        ]
    )
    assert own == [
        "--vocab-n-calls",
        "5",
        "--specforge-script=x.py",
        "--keep-draft-vocab-size",
        "--vocab-search",
        "exact",
    ]
    assert rest == ["--a", "1", "--b", "--c=3"]
    args = training.handover_parser().parse_args(own)
    assert (
        settings_from(SearchSettings, args).n_calls == 5 and args.search == "exact" and args.specforge_script == "x.py"
    )


# ---------------------------------------------------------------- clear errors


def test_errors_name_the_field_and_the_fix(llama_run, monkeypatch):
    with pytest.raises(InputError, match=r"field 'data.train_data_path' is 'data/nope.jsonl', but .* does not exist"):
        before_training("run.yaml", overrides=["data.train_data_path=data/nope.jsonl"])
    with pytest.raises(InputError, match="sets model.vocab_mapping_path, which prepare writes itself"):
        before_training("run.yaml", overrides=["model.vocab_mapping_path=x.pt"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(llama_run / "empty-hub-cache"))
    with pytest.raises(InputError, match=r"'model.target_model_path' is 'meta-llama/Nope-8B': no local directory"):
        before_training("run.yaml", overrides=["model.target_model_path=meta-llama/Nope-8B"])
    with pytest.raises(InputError, match="exactly one of run_config"):
        before_training()
    assert main(["pre-step"]) == 2
    with pytest.raises(InputError, match="--draft-model-config is not given"):
        before_training(train_eagle3_args=["--target-model-path", LLAMA3_DIR, "--train-data-path", "data/train.jsonl"])


def test_json_run_config_is_patched_in_place(llama_run):
    config = yaml.safe_load((llama_run / "run.yaml").read_text())
    (llama_run / "run.json").write_text(json.dumps(config, indent=4) + "\n")
    result = before_training("run.json", search=FAST_SEARCH)
    patched = json.loads((llama_run / "run.json").read_text())
    assert patched["model"]["vocab_mapping_path"] == result.mapping_path
    assert list(patched["model"]) == list(config["model"]) and patched["data"] == config["data"]
    _, d2t, _ = standin.run_config_mapping("run.json")
    assert d2t.numel() == result.k


def test_pre_step_skips_malformed_lines_as_train_eagle3_does(llama_run):
    lines = (llama_run / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (llama_run / "data" / "clean.jsonl").write_text("".join(lines[:5] + lines[6:]), encoding="utf-8")
    lines[5] = lines[5][:30] + "\n"  # train_eagle3.py's safe_conversations_generator logs and skips this line
    (llama_run / "data" / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    result = before_training(train_eagle3_args=TRAIN_FLAGS, search=FAST_SEARCH)
    counts, meta = load_counts(os.path.join(result.output_dir, "token_counts.safetensors"))
    assert meta["records_invalid_skipped"] == "1"
    assert np.array_equal(
        counts, count_tokens(["data/clean.jsonl"], LLAMA3_DIR, chat_template="llama3", max_length=MAX_LENGTH)
    )
    # Newer SpecForge refuses such a file, and so does prepare.
    with pytest.raises(InputError, match="train.jsonl, line 6: malformed JSON"):
        before_training("run.yaml", search=FAST_SEARCH)
