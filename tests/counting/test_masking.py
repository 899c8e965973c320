"""Rendering and span rules, checked on small hand-made conversations."""

from __future__ import annotations

import pytest

from specforge_vocab.counting.masking import assistant_char_spans, ignore_char_spans, render_record
from specforge_vocab.counting.parsers import message_list, normalize_message, render_fallback
from specforge_vocab.counting.templates import get_template, template_names
from specforge_vocab.errors import InputError


def test_sharegpt_and_null_content_normalise():
    msgs = [
        normalize_message(m) for m in ({"from": "human", "value": "q"}, {"from": "gpt", "value": None, "content": ""})
    ]
    assert msgs == [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(
    "bad,field,what",
    [
        ({"role": 5, "content": "x"}, "conversations[0].role", "the role must be a string"),
        ({"role": "user", "content": ["a"]}, "conversations[0].content", "content must be a string or null"),
        ({"role": "user", "content": 3}, "conversations[0].content", "content must be a string or null"),
        ("hello", "conversations[0]'", "must be an object"),
    ],
)
def test_bad_messages_name_the_field(bad, field, what):
    with pytest.raises(InputError) as info:
        normalize_message(bad, source="d.jsonl", line=7)
    assert "d.jsonl, line 7" in str(info.value) and field in str(info.value) and what in str(info.value)


def test_conversations_must_be_a_list():
    with pytest.raises(InputError, match=r"d.jsonl, line 7, field 'conversations': must be a list of messages"):
        render_record(
            {"conversations": {"role": "user"}},
            template=get_template("llama3"),
            tokenizer=None,
            is_preformatted=False,
            source="d.jsonl",
            line=7,
        )


def test_system_prompt_rules():
    t = get_template("llama3")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert message_list(conv, t)[0] == {"role": "system", "content": t.system_prompt}
    own = [{"role": "system", "content": "mine"}] + conv
    assert message_list(own, t)[0] == {"role": "system", "content": "mine"}
    assert message_list(conv, get_template("lfm"))[0]["role"] == "user"  # empty system prompt: none added


def test_fallback_has_no_end_of_turn_after_user_turns():
    t = get_template("qwen")
    text = render_fallback([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], t, "<s>")
    assert text == "<s><|im_start|>user\nq<|im_start|>assistant\na<|im_end|>\n"


def test_spans_include_end_of_turn_and_run_to_the_end_when_cut():
    t = get_template("llama3")
    h = t.assistant_header
    text = f"x{h}one<|eot_id|>y{h}two"
    spans = assistant_char_spans(text, t)
    assert [text[s:e] for s, e in spans] == ["one<|eot_id|>", "two"]
    assert [text[s:e] for s, e in assistant_char_spans(text, t, train_only_last_turn=True)] == ["two"]


def test_ignore_spans_are_non_overlapping_left_to_right():
    t = get_template("qwen3-instruct")
    token = t.ignore_tokens[0]
    text = f"a{token}b{token}"
    assert [text[s:e] for s, e in ignore_char_spans(text, t)] == [token, token]


def test_empty_conversation_is_skipped_and_wrong_record_shapes_are_errors():
    t = get_template("llama3")

    class NoTemplate:
        chat_template = None
        bos_token = None

    assert render_record({"conversations": []}, template=t, tokenizer=NoTemplate(), is_preformatted=False) is None
    with pytest.raises(InputError, match=r"needs a 'conversations' field.*Pass --is-preformatted"):
        render_record({"text": "x"}, template=t, tokenizer=NoTemplate(), is_preformatted=False, source="f", line=2)
    with pytest.raises(InputError, match=r"needs a 'text' field"):
        render_record({"conversations": []}, template=t, tokenizer=NoTemplate(), is_preformatted=True)


def test_unknown_template_lists_valid_names():
    with pytest.raises(InputError) as info:
        get_template("llama-3")
    assert "llama3" in str(info.value) and "deepseek-v3" in str(info.value) and "gpt-oss" in str(info.value)
    assert len(template_names()) == 26
