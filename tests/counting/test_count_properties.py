"""Property-based tests (hypothesis) of counting.

Random conversations (random Unicode without surrogates, the templates' own marker strings
inside content, end-of-turn strings in replies, empty and null turns, every valid role,
OpenAI and ShareGPT keys, system messages anywhere) give the same counts through the fast
path (specforge_vocab.counting.engine.Counter: one tokenisation, cached prefix lengths) as the
plain SpecForge-rule implementation in tests/specforge_reference.py, for both real
tokenizers with and without a chat template, at small and default max_length.

The same for the other parser types (thinking, glm, openai-harmony) on the test-built family
tokenizers: random reasoning conversations (reasoning_content present, empty, null or missing; tool
calls as lists or JSON text; tool, system and unknown roles; <think>, tool-call and harmony markers
inside content; tools lists) give the same ids and loss mask record by record, or both refuse the
record (where SpecForge's rendering raises).

The mapping properties are in tests/writing/test_mapping_properties.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOKENIZER_CASES, fast_example, hf_tokenizer, template_tokenizer_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specforge_reference import reference_counts, reference_example

from specforge_vocab.counting.data import ReadStats, Record
from specforge_vocab.counting.engine import Counter, CountSettings
from specforge_vocab.counting.tokenizer import load_tokenizer

# The markers of both templates (and the chat templates' tool markers), as they appear in rendered text.
MARKERS = [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|start_header_id|>user<|end_header_id|>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "assistant",
    "user",
    "\n\n",
    " ",
    "\n",
    "<|",
    "|>",
    "｜",
]
ROLES = ["system", "user", "assistant", "tool", "human", "gpt"]

text_piece = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    st.sampled_from(MARKERS),
)
content = st.one_of(st.none(), st.just(""), st.lists(text_piece, max_size=5).map("".join))


@st.composite
def messages(draw):
    role, value = draw(st.sampled_from(ROLES)), draw(content)
    style = draw(st.sampled_from(["openai", "sharegpt", "both"]))
    if style == "openai":
        return {"role": role, "content": value}
    if style == "sharegpt":
        return {"from": role, "value": value}
    # An empty/null content falls through to value (SpecForge: content or value or "").
    return {"role": role, "content": draw(st.sampled_from([None, ""])), "value": value}


@st.composite
def conversations(draw):
    body = draw(st.lists(messages(), max_size=6))
    if draw(st.booleans()):  # mostly well-formed dialogues, so spans are common
        body = []
        for _ in range(draw(st.integers(1, 3))):
            body += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
        if draw(st.booleans()):
            body.insert(0, {"role": "system", "content": draw(content)})
        if draw(st.booleans()):
            body.insert(draw(st.integers(0, len(body))), draw(messages()))
    return {"conversations": body}


def fast_counts(records, tok_dir, template, max_length, train_only_last_turn=False):
    tokenizer = load_tokenizer(tok_dir)
    counter = Counter(
        tokenizer,
        CountSettings(
            tokenizer_path=tok_dir,
            chat_template=template,
            max_length=max_length,
            train_only_last_turn=train_only_last_turn,
            batch_size=2,
        ),
        vocab_size=len(tokenizer),
    )
    stats = ReadStats()
    for i, record in enumerate(records):
        counter.add(Record("hypothesis", i + 1, i, record), stats)
    counter.flush()
    return counter.counts


PARITY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)


@pytest.mark.parametrize("fixture_name,template", TOKENIZER_CASES)
@PARITY
@given(
    records=st.lists(conversations(), min_size=1, max_size=3),
    max_length=st.one_of(st.integers(1, 48), st.just(2048)),
    last_turn=st.booleans(),
)
def test_fast_counting_equals_the_specforge_rule(request, fixture_name, template, records, max_length, last_turn):
    tok_dir = request.getfixturevalue(fixture_name)
    tokenizer = load_tokenizer(tok_dir)
    ours = fast_counts(records, tok_dir, template, max_length, last_turn)
    ref = reference_counts(records, tokenizer, template, max_length=max_length, train_only_last_turn=last_turn)
    diff = np.flatnonzero(ours != ref)
    assert diff.size == 0, f"ids {diff[:5].tolist()}: ours {ours[diff[:5]].tolist()} vs rule {ref[diff[:5]].tolist()}"


# ---------------------------------------------------------------- thinking, glm and harmony parsers

REASONING_MARKERS = [
    "<think>",
    "</think>",
    "<think>\n\n</think>\n\n",
    "<|im_end|>",
    "<|im_end|>\n",
    "<|im_start|>assistant\n",
    "<tool_call>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|message_user|>",
    "<|message_model|>",
    "<|content_model_end_sampling|>",
    "<|open|>",
    "<|sep|>",
    "<|end_of_msg|>",
    "<|start|>assistant",
    "<|start|>user<|message|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "\n",
    "\n\n",
    " ",
]
reasoning_text = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), st.sampled_from(REASONING_MARKERS)),
    max_size=5,
).map("".join)
tool_call = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {
                "name": st.sampled_from(["f", "get_weather"]),
                "arguments": st.dictionaries(st.sampled_from(["x", "city"]), st.integers(0, 9), max_size=2),
            }
        ),
    },
    optional={"id": st.sampled_from(["c1", "c2"])},
)


@st.composite
def reasoning_message(draw, role=None):
    role = role or draw(st.sampled_from(["user", "assistant", "assistant", "tool", "system", "gpt", "observation"]))
    message = {"role": role, "content": draw(st.one_of(st.none(), reasoning_text))}
    if role in ("assistant", "gpt"):
        reasoning = draw(st.sampled_from(["missing", "none", "empty", "text"]))
        if reasoning != "missing":
            message["reasoning_content"] = {"none": None, "empty": ""}.get(reasoning) or draw(reasoning_text)
        if draw(st.integers(0, 3)) == 0:
            calls = draw(st.lists(tool_call, min_size=1, max_size=2))
            message["tool_calls"] = __import__("json").dumps(calls) if draw(st.booleans()) else calls
    if role == "tool" and draw(st.booleans()):
        message["tool_call_id"] = "c1"
    return message


@st.composite
def reasoning_record(draw):
    body = []
    for _ in range(draw(st.integers(1, 3))):
        body += [draw(reasoning_message("user")), draw(reasoning_message("assistant"))]
        if draw(st.integers(0, 3)) == 0:
            body += [draw(reasoning_message("tool")), draw(reasoning_message("assistant"))]
    if draw(st.booleans()):
        body.insert(draw(st.integers(0, len(body))), draw(reasoning_message()))
    record = {"conversations": body}
    if draw(st.integers(0, 3)) == 0:
        record["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    return record


HARMONY_ROLES = ["user", "assistant_analysis", "assistant_commentary", "assistant_final", "system"]


@st.composite
def harmony_record(draw):
    body = []
    if draw(st.booleans()):
        body.append({"role": "assistant_reasoning_effort", "content": draw(st.sampled_from(["low", "HIGH"]))})
    for _ in range(draw(st.integers(1, 6))):
        body.append({"role": draw(st.sampled_from(HARMONY_ROLES)), "content": draw(reasoning_text)})
    return {"conversations": body}


def outcome(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - both must refuse the same records
        return "error"
    return None if result is None else (list(result[0]), list(result[1]))


PARSER_CASES = ["qwen3-thinking", "qwen3.5", "kimi-k3-thinking", "inkling-thinking", "glm-5.2", "gpt-oss"]


@pytest.mark.parametrize("template", PARSER_CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(data=st.data(), max_length=st.one_of(st.integers(1, 40), st.just(2048)), last_turn=st.booleans())
def test_other_parsers_equal_the_specforge_rule(family_tokenizer, template, data, max_length, last_turn):
    tok_dir = template_tokenizer_dir(template, family_tokenizer)
    record = data.draw(harmony_record() if template == "gpt-oss" else reasoning_record())
    options = dict(max_length=max_length, train_only_last_turn=last_turn)
    ours = outcome(fast_example, record, load_tokenizer(tok_dir), template, **options)
    assert ours == outcome(reference_example, record, hf_tokenizer(tok_dir), template, **options)
