"""SpecForge's 26 templates and custom templates from a file (--chat-template-file)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import DATA, REASONING_TEMPLATES, SHARED, assert_same_counts, template_tokenizer_dir

from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.templates import (
    FIELDS,
    get_template,
    load_template_file,
    template_names,
    trained_markers,
    usable_template,
)
from specforge_vocab.errors import InputError

PARSERS = {
    "thinking": {
        "qwen3-thinking",
        "qwen3-next-thinking",
        "kimi-k2-thinking",
        "kimi-k3-thinking",
        "deepseek-v32",
        "qwen3.5",
        "inkling-thinking",
    },
    "glm": {"glm-5.2"},
    "openai-harmony": {"gpt-oss"},
}


def test_all_26_templates_with_their_parser_types():
    names = template_names()
    assert len(names) == 26 and names[0] == "llama3" and names[-1] == "inkling-thinking"
    for parser, expected in PARSERS.items():
        assert {n for n in names if get_template(n).parser_type == parser} == expected
    general = [n for n in names if get_template(n).parser_type == "general"]
    assert len(general) == 17 and set(REASONING_TEMPLATES) == set().union(*PARSERS.values())


def test_registry_matches_the_shared_copy_of_specforges_registry():
    shared = SHARED / "docs" / "specforge_templates.json"
    if not shared.is_file():
        pytest.skip(f"{shared} is absent (../shared/docs)")
    theirs = json.loads(shared.read_text(encoding="utf-8"))["templates"]
    assert list(theirs) == list(template_names())
    for name, fields in theirs.items():
        assert get_template(name).fields() == {key: fields[key] for key in FIELDS}, name


def test_unknown_name_lists_every_template():
    with pytest.raises(InputError) as info:
        get_template("qwen4-thinking")
    message = str(info.value)
    assert all(name in message for name in template_names()) and "--chat-template-file" in message


def test_deepseek_r1_distill_is_refused_as_specforge_fails_with_it(tmp_path, llama3_dir):
    settings = CountSettings(
        dataset_paths=[str(tmp_path)], tokenizer_path=llama3_dir, chat_template="deepseek-r1-distill"
    )
    problems = " ".join(settings.problems())
    assert "--chat-template deepseek-r1-distill: end_of_turn_token must be a string" in problems
    assert "re.escape(None)" in problems


def write_template(path, fields):
    text = yaml.safe_dump(fields) if path.suffix in (".yaml", ".yml") else json.dumps(fields)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_template_file_counts_like_the_registered_template(tmp_path, family_tokenizer, suffix):
    tok_dir = template_tokenizer_dir("qwen3-thinking", family_tokenizer)
    path = write_template(tmp_path / f"mine{suffix}", get_template("qwen3-thinking").fields())
    template = load_template_file(path, name="my-qwen")
    assert template.fields() == get_template("qwen3-thinking").fields() and template.name == "my-qwen"
    data = [str(DATA / "reasoning_conversations.jsonl")]
    common = dict(dataset_paths=data, tokenizer_path=tok_dir, num_workers=1)
    registered = count_dataset(CountSettings(chat_template="qwen3-thinking", **common))
    custom = count_dataset(CountSettings(chat_template="my-qwen", chat_template_file=path, **common))
    assert_same_counts(custom.counts, registered.counts)
    assert custom.metadata()["chat_template_fields"] == registered.metadata()["chat_template_fields"]
    assert custom.metadata()["chat_template_file"] == path


def test_defaults_and_nulls_are_specforges(tmp_path):
    path = write_template(tmp_path / "t.json", {"assistant_header": "<A>", "end_of_turn_token": "</A>"})
    template = load_template_file(path, name="t")
    assert template.fields() == {
        "assistant_header": "<A>",
        "user_header": None,
        "system_prompt": None,
        "end_of_turn_token": "</A>",
        "parser_type": "general",
        "assistant_pattern_type": "general",
        "enable_thinking": False,
        "ignore_token": None,
    }


def test_every_bad_field_is_named_at_once(tmp_path):
    path = write_template(
        tmp_path / "bad.yaml",
        {
            "assistant_header": 3,
            "end_of_turn_tokn": "</s>",
            "enable_thinking": "yes",
            "ignore_token": ["", "<x>"],
            "parser_type": ["thinking"],
        },
    )
    with pytest.raises(InputError) as info:
        load_template_file(path, name="t")
    message = str(info.value)
    for field in (
        "'assistant_header': must be a string or null",
        "'end_of_turn_tokn': not a ChatTemplate field",
        "'enable_thinking': must be true or false",
        "'ignore_token': must be a list of non-empty strings",
        "'parser_type': must be a string",
    ):
        assert f"--chat-template-file {path}, field {field}" in message


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"assistant_header": "<A>", "end_of_turn_token": "</A>", "parser_type": "reasoning"},
            r"parser_type must be one of general, thinking, glm, openai-harmony, but got 'reasoning'",
        ),
        (
            {"assistant_header": "<A>", "end_of_turn_token": "</A>", "assistant_pattern_type": "glmm"},
            r"assistant_pattern_type must be one of .*silently uses the general pattern",
        ),
        ({"end_of_turn_token": "</A>"}, r"assistant_header must be a non-empty string .*literal text 'None'"),
        ({"assistant_header": "<A>"}, r"end_of_turn_token must be a string .*re\.escape\(None\)"),
        (["not", "a", "mapping"], r"must hold a mapping of SpecForge's ChatTemplate fields"),
    ],
)
def test_templates_specforge_cannot_train_with_are_refused(tmp_path, fields, message):
    path = write_template(tmp_path / "t.json", fields)
    with pytest.raises(InputError, match=message):
        usable_template("t", path)


def test_harmony_and_longcat_need_no_end_of_turn(tmp_path):
    assert not load_template_file(
        write_template(tmp_path / "h.json", {"parser_type": "openai-harmony"}), name="h"
    ).problems()
    inkling = {"assistant_header": "<|message_model|>", "assistant_pattern_type": "inkling", "parser_type": "thinking"}
    assert not load_template_file(write_template(tmp_path / "i.json", inkling), name="i").problems()


@pytest.mark.parametrize("text,kind", [("{oops", "JSON"), ("a: [b", "YAML")])
def test_unreadable_template_files_say_why(tmp_path, text, kind):
    path = tmp_path / ("t.yaml" if kind == "YAML" else "t.json")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=rf"--chat-template-file {path} is not valid {kind}"):
        load_template_file(str(path), name="t")
    with pytest.raises(InputError, match="does not exist"):
        load_template_file(str(tmp_path / "absent.json"), name="t")


def test_trained_markers_of_registered_and_custom_templates(tmp_path):
    assert trained_markers(get_template("qwen3-thinking"))[:2] == ("<think>", "</think>")
    assert "<think>" not in trained_markers(get_template("qwen3-next-thinking"))  # part of its header
    assert trained_markers(get_template("gpt-oss")) == ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")
    assert trained_markers(get_template("llama3")) == ()
    fields = get_template("qwen3-thinking").fields()
    same = load_template_file(write_template(tmp_path / "same.json", fields), name="qwen3-thinking")
    assert trained_markers(same) == trained_markers(get_template("qwen3-thinking"))
    other = load_template_file(write_template(tmp_path / "c.json", dict(fields, system_prompt="Hi")), name="mine")
    assert trained_markers(other) == ("<think>", "</think>")  # another template: the markers of its parser type
