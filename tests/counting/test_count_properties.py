"""Property-based tests (hypothesis) of counting.

Random conversations (random Unicode without surrogates, the templates' own marker strings
inside content, end-of-turn strings in replies, empty and null turns, every valid role,
OpenAI and ShareGPT keys, system messages anywhere) give the same counts through the fast
path (specforge_vocab.counting.engine.Counter: one tokenisation, cached prefix lengths) as the
plain SpecForge-rule implementation in tests/specforge_reference.py, for both real
tokenizers with and without a chat template, at small and default max_length.

The mapping properties are in tests/writing/test_mapping_properties.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOKENIZER_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specforge_reference import reference_counts

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
