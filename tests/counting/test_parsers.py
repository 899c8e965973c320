"""SpecForge's per-parser rules that are easy to get wrong, each checked on its own (docs/SPECFORGE.md
sections 3 and 3b); the parity tests check them all together against the plain rule."""

from __future__ import annotations

import pytest
from conftest import DATA, LLAMA3_DIR, read_jsonl, run_cli, template_tokenizer_dir, with_chat_template, write_jsonl

from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.masking import render_record
from specforge_vocab.counting.parsers import (
    DatasetError,
    message_list,
    record_tools,
    sanitize_message,
)
from specforge_vocab.counting.templates import get_template
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError

# Prints each message's role and the tools it was given: what reaches the chat template.
ECHO = (
    "{% for m in messages %}[{{ m.role }}:{{ m.content }}"
    "{% if m.reasoning_content is defined %}|r={{ m.reasoning_content }}{% endif %}]{% endfor %}"
    "{% if tools is not none %}<tools {{ tools | length }}>{% endif %}"
    "{% if source is defined %}<source={{ source }}>{% endif %}"
)
QA = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    return load_tokenizer(with_chat_template(LLAMA3_DIR, tmp_path_factory.mktemp("echo"), ECHO))


def render(record, tokenizer, template="qwen3-thinking", **options):
    return render_record(record, template=get_template(template), tokenizer=tokenizer, is_preformatted=False, **options)


def test_unknown_roles_reach_the_chat_template(echo):
    conversation = [QA[0], {"role": "observation", "content": "o"}, {"role": "user", "content": "u"}, QA[1]]
    assert render({"conversations": conversation}, echo, "qwen").startswith(
        "[system:You are a helpful assistant.][user:q][observation:o][user:u][assistant:a]"
    )


def test_thinking_keeps_reasoning_general_and_glm_drop_it(echo):
    assert "|r=r]" in render({"conversations": QA}, echo, "qwen3-thinking")
    assert "|r=" not in render({"conversations": QA}, echo, "qwen")
    assert "|r=" not in render({"conversations": QA}, echo, "glm-5.2")
    kept = sanitize_message(
        {"role": "tool", "content": "x", "name": "f", "tool_call_id": "1", "w": 2},
        ("role", "content", "name", "tool_call_id"),
    )
    assert kept == {"role": "tool", "content": "x", "name": "f", "tool_call_id": "1"}


def test_tool_calls_are_cleaned_as_specforge_does():
    calls = [{"function": {"name": "f", "arguments": '{"x": 1}'}, "extra": 1}, "junk", {"id": "c", "function": "f"}]
    assert sanitize_message({"role": "assistant", "tool_calls": calls}, ("role", "tool_calls"))["tool_calls"] == [
        {"id": "", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "c", "type": "function"},
    ]
    assert "tool_calls" not in sanitize_message({"role": "assistant", "tool_calls": "{broken"}, ("tool_calls",))


def test_tools_none_when_empty_and_a_dict_from_json_text_falls_back(echo):
    assert "<tools" not in render({"conversations": QA, "tools": []}, echo)  # tools=None, not []
    assert "<tools 2>" in render({"conversations": QA, "tools": '[{"a": 1}, {"b": 2}]'}, echo)
    assert record_tools('{"name": "f"}') == {"name": "f"} and record_tools({"name": "f"}) == []
    # A dict of tools makes transformers raise ValueError: SpecForge renders that record by its fallback.
    qwen = get_template("qwen")
    text = render({"conversations": QA, "tools": '{"type": "function"}'}, echo, "qwen")
    assert text == qwen.system_prompt + "<|im_start|>user\nq<|im_start|>assistant\na<|im_end|>\n"


def test_columns_are_template_variables(echo):
    assert render({"conversations": QA, "source": "web"}, echo).endswith("<source=web>")
    assert "<source=None>" in render({"conversations": QA}, echo, fill=("source",))  # another record has it
    # A column named like an argument of SpecForge's rendering call: TypeError there, fallback rendering.
    assert render({"conversations": QA, "messages": "x"}, echo).startswith("You are a helpful assistant.<|im_start|>")
    assert render({"conversations": QA, "tokenize": True}, echo).startswith("You are a helpful assistant.<|im_start|>")


def test_system_message_and_order_rules():
    template = get_template("qwen3-thinking")
    conversation = [
        {"role": "assistant", "content": "dropped"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "system", "content": "mid"},  # kept
        {"role": "assistant", "content": "cut here"},  # assistant after system: the conversation ends
        {"role": "user", "content": "never"},
    ]
    assert [m["content"] for m in message_list(conversation, template)] == [template.system_prompt, "q", "a", "mid"]


@pytest.mark.parametrize("column", ["tool", "max_length", "conversation"])
def test_a_column_named_like_a_parser_parameter_is_a_dataset_error(tmp_path, capsys, column):
    rows = [{"conversations": QA}, {"conversations": QA, column: 1}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = run_cli(
        [
            "count",
            "--dataset-path",
            str(data),
            "--tokenizer-path",
            LLAMA3_DIR,
            "--chat-template",
            "qwen3-thinking",
            "--skip-invalid",
            "--num-workers",
            "1",
            "--output",
            str(tmp_path / "c.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and f"line 2: the column(s) '{column}' have the names of parameters" in err
    assert not (tmp_path / "c.safetensors").exists()  # --skip-invalid does not skip what stops SpecForge


def test_harmony_refuses_extra_columns_and_unknown_roles(family_tokenizer):
    tok = load_tokenizer(template_tokenizer_dir("gpt-oss", family_tokenizer))
    harmony = [{"role": "user", "content": "q"}, {"role": "assistant_final", "content": None}]
    assert render({"conversations": harmony, "id": 3}, tok, "gpt-oss").endswith("<|message|>None<|end|>")
    with pytest.raises(DatasetError, match="openai-harmony parser, whose parse\\(\\) takes no extra arguments"):
        render({"conversations": harmony, "source": "web"}, tok, "gpt-oss")
    with pytest.raises(InputError, match=r"field 'conversations\[1\]\.role': .*knows the roles .*but got 'assistant'"):
        render({"conversations": [harmony[0], {"role": "assistant", "content": "a"}]}, tok, "gpt-oss")
    with pytest.raises(InputError, match=r"field 'conversations\[0\]': .*no ShareGPT from/value"):
        render({"conversations": [{"from": "human", "value": "q"}]}, tok, "gpt-oss")


def test_the_older_train_eagle3_reader_passes_no_columns(echo, family_tokenizer):
    assert "<source=" not in render({"conversations": QA, "source": "web"}, echo, legacy_reader=True)
    tok = load_tokenizer(template_tokenizer_dir("gpt-oss", family_tokenizer))
    harmony = [{"role": "user", "content": "q"}, "not a message", {"role": "assistant_final", "content": "a"}]
    text = render({"conversations": harmony, "source": "web"}, tok, "gpt-oss", legacy_reader=True)
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>a<|end|>")
    assert record_tools({"name": "f"}, legacy_reader=True) == {"name": "f"}  # it JSON-encoded a dict first


def test_a_chat_template_error_names_the_record_and_can_be_skipped(tmp_path, family_tokenizer):
    """Qwen3.5's template raises for a system message that is not first: SpecForge stops there."""
    tok_dir = template_tokenizer_dir("qwen3.5", family_tokenizer)
    good = read_jsonl(DATA / "reasoning_conversations.jsonl")[0]
    bad = {"conversations": [QA[0], {"role": "system", "content": "late"}, {"role": "user", "content": "u"}, QA[1]]}
    data = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    settings = CountSettings(dataset_paths=[str(data)], tokenizer_path=tok_dir, chat_template="qwen3.5", num_workers=1)
    with pytest.raises(
        InputError,
        match=r"d\.jsonl, line 2: the tokenizer's chat template fails on this record "
        r"\(TemplateError: System message must be at the beginning",
    ):
        count_dataset(settings)
    settings.skip_invalid = True
    result = count_dataset(settings)
    assert result.records_invalid_skipped == 1 and result.records_counted == 2
