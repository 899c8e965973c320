"""`prepare` and `pre-step` end to end with qwen3-thinking, gpt-oss and a custom template file
(--chat-template-file): SpecForge's side (specforge_standin.py) finds and installs the mapping, the
counts equal the plain rule, and a changed template file recounts. Uses the shared tokenizers when
present, else the test-built ones."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import specforge_standin as standin
import yaml
from conftest import (
    CONFIGS,
    DATA,
    assert_same_counts,
    e2e_tokenizer_dir,
    hf_tokenizer,
    read_jsonl,
    write_jsonl,
)
from specforge_reference import reference_counts

from specforge_vocab import before_training
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli.main import main
from specforge_vocab.cli.training import split_handover_flags
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.counting.templates import get_template
from specforge_vocab.errors import InputError

FAST = ["--n-calls", "8", "--min-vocab-size", "64", "--max-vocab-size", "2000"]
FAST_SEARCH = SearchSettings(n_calls=8, min_vocab_size=64, max_vocab_size=2000)
MAX_LENGTH = 1024
CASES = {
    "qwen3-thinking": ("qwen3-8b-eagle3.json", DATA / "reasoning_conversations.jsonl"),
    "gpt-oss": ("gpt-oss-20B-eagle3.json", DATA / "harmony_conversations.jsonl"),
}

RUN_YAML = """\
model:
  target_model_path: "{tokenizer}"
  draft_model_config: "configs/draft.json"
  vocab_mapping_path: ""
data:
  train_data_path: "data/train.jsonl"
  max_length: {max_length}
  chat_template: "{template}"
  cache_dir: "./cache"
training:
  strategy: "eagle3"
"""


def train_flags(tok_dir: str, template: str):
    """scripts/train_eagle3.py's flags for the run make_run lays out."""
    return ["--target-model-path", tok_dir, "--draft-model-config", "configs/draft.json", "--train-data-path"] + [
        "data/train.jsonl",
        "--max-length",
        str(MAX_LENGTH),
        "--chat-template",
        template,
    ]


def make_run(root: Path, template: str, tok_dir: str, config_name: str, data: Path) -> Path:
    """root/configs/draft.json, root/data/train.jsonl, root/run.yaml; the current directory becomes root."""
    (root / "configs").mkdir(parents=True)
    shutil.copy(CONFIGS / config_name, root / "configs" / "draft.json")
    (root / "data").mkdir()
    shutil.copy(data, root / "data" / "train.jsonl")
    text = RUN_YAML.format(tokenizer=tok_dir, max_length=MAX_LENGTH, template=template)
    (root / "run.yaml").write_text(text, encoding="utf-8")
    os.chdir(root)
    return root


def run_for(root: Path, template: str, family_tokenizer):
    """make_run for one of CASES; (tokenizer directory, draft config name, data file)."""
    config_name, data = CASES[template]
    tok_dir = e2e_tokenizer_dir(template, family_tokenizer)
    make_run(root, template, tok_dir, config_name, data)
    return tok_dir, config_name, data


def expected_counts(template, tok_dir, data, config_name):
    V = json.loads((CONFIGS / config_name).read_text())["vocab_size"]
    return reference_counts(read_jsonl(data), hf_tokenizer(tok_dir), template, max_length=MAX_LENGTH, vocab_size=V)


def stored_counts(result):
    return load_counts(os.path.join(result.output_dir, "token_counts.safetensors"))[0]


@pytest.mark.parametrize("template", list(CASES))
def test_prepare_installs_the_mapping_for_the_template(tmp_path, monkeypatch, family_tokenizer, template):
    monkeypatch.chdir(tmp_path)
    tok_dir, config_name, data = run_for(tmp_path, template, family_tokenizer)
    assert main(["-q", "prepare", "--config", "run.yaml", *FAST]) == 0
    path, d2t, t2d = standin.run_config_mapping("run.yaml")
    k, V = standin.draft_sizes("configs/draft.json")
    assert d2t.numel() == k <= 2000 and t2d.numel() == V
    result = before_training("run.yaml", search=FAST_SEARCH)
    assert result.reused and result.mapping_path == path
    assert_same_counts(stored_counts(result), expected_counts(template, tok_dir, data, config_name))


@pytest.mark.parametrize("template", list(CASES))
def test_pre_step_installs_the_mapping_for_the_template(tmp_path, monkeypatch, family_tokenizer, template):
    monkeypatch.chdir(tmp_path)
    tok_dir, config_name, data = run_for(tmp_path, template, family_tokenizer)
    flags = train_flags(tok_dir, template)
    assert main(["-q", "pre-step", *FAST, "--", *flags]) == 0
    _, d2t, _ = standin.train_eagle3_mapping(flags)
    assert d2t.numel() == standin.draft_sizes("configs/draft.json")[0]
    result = before_training(train_eagle3_args=flags, search=FAST_SEARCH)
    assert_same_counts(stored_counts(result), expected_counts(template, tok_dir, data, config_name))


def test_gpt_oss_records_with_extra_columns_work_with_the_older_reader_only(tmp_path, monkeypatch, family_tokenizer):
    """SpecForge's harmony parser takes no extra arguments: `specforge train` (datasets passes every column)
    fails on such a file, the older train_eagle3.py (it keeps only conversations and tools) does not."""
    monkeypatch.chdir(tmp_path)
    tok_dir = e2e_tokenizer_dir("gpt-oss", family_tokenizer)
    rows = [dict(r, source="mine") for r in read_jsonl(DATA / "harmony_conversations.jsonl")]
    data = write_jsonl(tmp_path / "harmony_with_source.jsonl", rows)
    make_run(tmp_path / "run", "gpt-oss", tok_dir, "gpt-oss-20B-eagle3.json", data)
    with pytest.raises(InputError, match=r"train\.jsonl, line 1: the column\(s\) 'source' are passed to SpecForge's "):
        before_training("run.yaml", search=FAST_SEARCH)
    flags = train_flags(tok_dir, "gpt-oss")
    result = before_training(train_eagle3_args=flags, search=FAST_SEARCH)
    plain = read_jsonl(DATA / "harmony_conversations.jsonl")
    V = json.loads((CONFIGS / "gpt-oss-20B-eagle3.json").read_text())["vocab_size"]
    expected = reference_counts(plain, hf_tokenizer(tok_dir), "gpt-oss", max_length=MAX_LENGTH, vocab_size=V)
    assert_same_counts(stored_counts(result), expected)


def test_prepare_and_pre_step_with_a_custom_template_file(tmp_path, monkeypatch, family_tokenizer, capsys):
    """A run whose data.chat_template names a template registered in code: refused without its fields,
    counted with them (like SpecForge's own qwen3-thinking here), recounted when the file changes."""
    monkeypatch.chdir(tmp_path)
    config_name, data = CASES["qwen3-thinking"]
    tok_dir = e2e_tokenizer_dir("qwen3-thinking", family_tokenizer)
    make_run(tmp_path, "my-reasoner", tok_dir, config_name, data)
    assert main(["prepare", "--config", "run.yaml", *FAST]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: data.chat_template must be one of llama3," in err and "--chat-template-file" in err
    fields = get_template("qwen3-thinking").fields()
    Path("my_template.yaml").write_text(yaml.safe_dump(fields), encoding="utf-8")
    assert main(["-q", "prepare", "--config", "run.yaml", "--chat-template-file", "my_template.yaml", *FAST]) == 0
    standin.run_config_mapping("run.yaml")
    result = before_training("run.yaml", chat_template_file="my_template.yaml", search=FAST_SEARCH)
    assert result.reused
    counts = stored_counts(result)
    assert_same_counts(counts, expected_counts("qwen3-thinking", tok_dir, data, config_name))
    # Another template in the same file: the counts cache and the outputs do not match it any more.
    Path("my_template.yaml").write_text(yaml.safe_dump(dict(fields, ignore_token=["</think>"])), encoding="utf-8")
    result = before_training("run.yaml", chat_template_file="my_template.yaml", search=FAST_SEARCH)
    assert result.action == "count" and "ignore_token" in result.reason
    think = hf_tokenizer(tok_dir).convert_tokens_to_ids("</think>")
    assert counts[think] > 0 and stored_counts(result)[think] == 0
    # pre-step: the same file for train_eagle3.py's --chat-template.
    flags = train_flags(tok_dir, "my-reasoner")
    argv = ["-q", "pre-step", "--chat-template-file", "my_template.yaml", *FAST, "--", *flags]
    assert main(argv) == 0
    standin.train_eagle3_mapping(flags)
    assert np.array_equal(
        stored_counts(
            before_training(train_eagle3_args=flags, chat_template_file="my_template.yaml", search=FAST_SEARCH)
        ),
        stored_counts(result),
    )
    # scripts/train_eagle3.py keeps the flag for itself; SpecForge's script never sees it.
    own, rest = split_handover_flags(["--chat-template-file", "my_template.yaml", *flags])
    assert own == ["--chat-template-file", "my_template.yaml"] and rest == flags


def test_chat_template_file_is_refused_for_pre_tokenized_data(tmp_path, monkeypatch, family_tokenizer):
    monkeypatch.chdir(tmp_path)
    tok_dir = e2e_tokenizer_dir("qwen3-thinking", family_tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}])
    make_run(tmp_path / "run", "qwen3-thinking", tok_dir, "qwen3-8b-eagle3.json", prompts)
    Path("run.yaml").write_text(Path("run.yaml").read_text().replace("train_data_path", "prompts_path"))
    Path("t.json").write_text(json.dumps(get_template("qwen3-thinking").fields()))
    with pytest.raises(InputError, match="--chat-template-file applies to raw conversations, but .*data.prompts_path"):
        before_training("run.yaml", chat_template_file="t.json", search=FAST_SEARCH)
