"""`optimize` end to end with a thinking template (qwen3-thinking), the harmony one (gpt-oss) and a
custom template file: counts equal the plain rule, the structural tokens training puts loss on are
pinned and kept, the mapping and config are written. Uses the shared tokenizers when present, else
the test-built ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import (
    CONFIGS,
    DATA,
    assert_same_counts,
    e2e_tokenizer_dir,
    hf_tokenizer,
    read_jsonl,
)
from specforge_reference import reference_counts

from specforge_vocab.cli.main import main
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.counting.templates import get_template

CASES = {
    "qwen3-thinking": ("qwen3-8b-eagle3.json", DATA / "reasoning_conversations.jsonl", ["</think>", "<tool_call>"]),
    "gpt-oss": ("gpt-oss-20B-eagle3.json", DATA / "harmony_conversations.jsonl", ["<|channel|>", "<|message|>"]),
}
FAST = ["--n-calls", "8", "--min-vocab-size", "64", "--max-vocab-size", "2000"]


def optimize(tmp_path, tok_dir, config_name, data, *template_flags, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "draft.json"
    shutil.copy(CONFIGS / config_name, config)
    out = tmp_path / "out"
    argv = ["-q", "optimize", "--dataset-path", str(data), "--tokenizer-path", tok_dir, *template_flags]
    assert main([*argv, "--config-path", str(config), "--output-dir", str(out), *FAST, *extra]) == 0
    return json.loads((out / "summary.json").read_text()), out, config


def kept_ids(out):
    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    return set((torch.arange(mapping["d2t"].numel()) + mapping["d2t"]).tolist())


@pytest.mark.parametrize("template", list(CASES))
def test_optimize_counts_pins_and_writes_for_the_template(tmp_path, family_tokenizer, template):
    config_name, data, markers = CASES[template]
    tok_dir = e2e_tokenizer_dir(template, family_tokenizer)
    summary, out, config = optimize(tmp_path, tok_dir, config_name, data, "--chat-template", template)
    counts, meta = load_counts(str(out / "token_counts.safetensors"))
    V = json.loads((CONFIGS / config_name).read_text())["vocab_size"]
    assert_same_counts(counts, reference_counts(read_jsonl(data), hf_tokenizer(tok_dir), template, vocab_size=V))
    assert meta["chat_template"] == template
    assert json.loads(meta["chat_template_fields"]) == get_template(template).fields()
    k = summary["optimal_draft_vocab_size"]
    assert json.loads(config.read_text())["draft_vocab_size"] == k
    tokenizer = hf_tokenizer(tok_dir)
    sources = {t["id"]: t["source"] for t in summary["pinned_tokens"]}
    for marker in markers:
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert sources[marker_id] == f"trained marker {marker!r} ({template})"
        assert marker_id in kept_ids(out) and counts[marker_id] > 0  # training puts loss on it


def test_optimize_with_a_custom_template_file(tmp_path, family_tokenizer):
    """A template registered in code (here: qwen3-thinking's fields under another name) counts like
    SpecForge's own, and `optimize --counts` later finds the template in the counts' metadata."""
    tok_dir = e2e_tokenizer_dir("qwen3-thinking", family_tokenizer)
    config_name, data, _ = CASES["qwen3-thinking"]
    template_file = tmp_path / "my_template.yaml"
    template_file.write_text(yaml.safe_dump(get_template("qwen3-thinking").fields()), encoding="utf-8")
    flags = ["--chat-template", "my-reasoner", "--chat-template-file", str(template_file)]
    summary, out, _ = optimize(tmp_path / "a", tok_dir, config_name, data, *flags)
    reference, ref_out, _ = optimize(tmp_path / "b", tok_dir, config_name, data, "--chat-template", "qwen3-thinking")
    counts, meta = load_counts(str(out / "token_counts.safetensors"))
    assert_same_counts(counts, load_counts(str(ref_out / "token_counts.safetensors"))[0])
    assert meta["chat_template"] == "my-reasoner" and meta["chat_template_file"] == str(template_file)
    assert summary["optimal_draft_vocab_size"] == reference["optimal_draft_vocab_size"]
    think = hf_tokenizer(tok_dir).convert_tokens_to_ids("</think>")
    assert think in summary["pinned_token_ids"]
    again, _, _ = optimize(
        tmp_path / "c", tok_dir, config_name, data, extra=["--counts", str(out / "token_counts.safetensors")]
    )
    assert again["optimal_draft_vocab_size"] == summary["optimal_draft_vocab_size"]
    assert think in again["pinned_token_ids"]  # the template's markers, from the counts' metadata


def test_a_bad_template_file_stops_optimize_before_anything_is_written(tmp_path, family_tokenizer, capsys):
    tok_dir = e2e_tokenizer_dir("qwen3-thinking", family_tokenizer)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"assistant_header": "<|im_start|>assistant\n", "parser_type": "thinkng"}))
    config = tmp_path / "draft.json"
    shutil.copy(CONFIGS / "qwen3-8b-eagle3.json", config)
    original = config.read_bytes()
    argv = ["optimize", "--dataset-path", str(CASES["qwen3-thinking"][1]), "--tokenizer-path", tok_dir]
    argv += ["--chat-template-file", str(bad), "--config-path", str(config), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--chat-template-file {bad}: parser_type must be one of general, thinking, glm, openai-harmony" in err
    assert "end_of_turn_token must be a string" in err  # every problem at once
    assert config.read_bytes() == original and not (tmp_path / "out" / "summary.json").exists()
