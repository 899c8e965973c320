"""Parity, id for id, with the plain SpecForge rule (tests/specforge_reference.py) for the nine templates
beyond the general parser: thinking (qwen3-thinking, qwen3-next-thinking, qwen3.5, kimi-k2-thinking,
kimi-k3-thinking, deepseek-v32, inkling-thinking), glm (glm-5.2) and openai-harmony (gpt-oss).

Data: the project's own reasoning conversations (tests/data/reasoning_conversations.jsonl: reasoning in
several turns, empty and missing reasoning, tool calls with a tools list, tool messages, multi-turn,
<think> inside content, ShareGPT keys, a long trace that max_length 256 cuts) and harmony conversations
(tests/data/harmony_conversations.jsonl), at max_length 2048 and 256, with and without
train_only_last_turn. Tokenizers: built at test time from the Llama-3 BPE with each family's control
tokens and chat template (always), and the shared ones in ../shared/tokenizers (real rebuilt qwen3,
qwen3-next-thinking, qwen3.5, gpt-oss; synthetic kimi, glm, inkling) when present.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    DATA,
    REASONING_TEMPLATES,
    assert_same_counts,
    fast_example,
    hf_tokenizer,
    read_jsonl,
    shared_tokenizers_or_skip,
    template_tokenizer_dir,
    write_jsonl,
)
from specforge_reference import reference_counts, reference_example

from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.tokenizer import load_tokenizer

REASONING = DATA / "reasoning_conversations.jsonl"
HARMONY = DATA / "harmony_conversations.jsonl"
CORNERS = DATA / "template_corner_cases.jsonl"
TEMPLATES = list(REASONING_TEMPLATES)
SETTINGS = [(2048, False), (256, False), (2048, True), (256, True)]  # (max_length, train_only_last_turn)


def data_for(template):
    return HARMONY if template == "gpt-oss" else REASONING


def check_template(template, tok_dir, path):
    """For every setting: each record's ids and mask equal the reference's, and the counts of the whole
    file through the counter (render -> batch tokenize -> mask -> histogram) equal the reference's
    histogram. Returns the number of trained tokens."""
    ours_tok, ref_tok = load_tokenizer(tok_dir), hf_tokenizer(tok_dir)
    records = read_jsonl(path)
    trained = 0
    for max_length, last_turn in SETTINGS:
        expected = np.zeros(len(ours_tok), dtype=np.int64)
        for i, record in enumerate(records):
            ref = reference_example(record, ref_tok, template, max_length=max_length, train_only_last_turn=last_turn)
            ours = fast_example(record, ours_tok, template, max_length=max_length, train_only_last_turn=last_turn)
            assert ours == (None if ref is None else (ref[0], ref[1])), (
                f"record {i} (max_length {max_length}, last turn {last_turn}): the fast path differs from the rule"
            )
            if ref is not None:
                np.add.at(expected, np.asarray(ref[0], dtype=np.int64)[np.asarray(ref[1], dtype=bool)], 1)
        settings = CountSettings(
            dataset_paths=[str(path)],
            tokenizer_path=tok_dir,
            chat_template=template,
            max_length=max_length,
            train_only_last_turn=last_turn,
            num_workers=1,
            batch_size=3,
        )
        assert_same_counts(count_dataset(settings).counts, expected)
        trained += int(expected.sum())
    return trained


@pytest.mark.parametrize("template", TEMPLATES)
def test_records_and_counts_match_the_rule(family_tokenizer, template):
    trained = check_template(template, template_tokenizer_dir(template, family_tokenizer), data_for(template))
    assert trained > 100, "the fixture must put loss on tokens, or the comparison shows nothing"


def test_truncation_at_256_cuts_the_long_trace(family_tokenizer):
    tok_dir = template_tokenizer_dir("qwen3-thinking", family_tokenizer)
    long = [r for r in read_jsonl(REASONING) if r.get("id") == "r9"]
    tok = load_tokenizer(tok_dir)
    full = fast_example(long[0], tok, "qwen3-thinking", max_length=4096)
    cut = fast_example(long[0], tok, "qwen3-thinking", max_length=256)
    assert len(full[0]) > 600 and len(cut[0]) == 256 and sum(cut[1]) < sum(full[1])


def corner_outcome(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as a comparable value: (ids, mask), None (skipped), or "error" where the rule
    (SpecForge) raises or the fast path refuses the record (InputError)."""
    try:
        result = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - whatever SpecForge raises, the reference raises too
        return "error"
    return None if result is None else (list(result[0]), list(result[1]))


def check_corners(template, tok_dir):
    ours_tok, ref_tok = load_tokenizer(tok_dir), hf_tokenizer(tok_dir)
    for row in read_jsonl(CORNERS):
        for max_length, last_turn in ((2048, False), (23, True)):
            options = dict(max_length=max_length, train_only_last_turn=last_turn)
            ref = corner_outcome(reference_example, row["record"], ref_tok, template, **options)
            ours = corner_outcome(fast_example, row["record"], ours_tok, template, **options)
            assert ours == ref, f"{row['case']} (max_length {max_length}): the fast path differs from the rule"


@pytest.mark.parametrize("template", TEMPLATES)
def test_corner_cases_match_the_rule(family_tokenizer, template):
    """System messages anywhere, unknown roles, tools as JSON text holding a dict, tools=None, columns
    that are template variables or collide with SpecForge's arguments, harmony's replacing roles, ..."""
    check_corners(template, template_tokenizer_dir(template, family_tokenizer))


def test_columns_missing_from_some_records_reach_the_template_as_none(tmp_path, family_tokenizer):
    """Kimi-K3's template reads `thinking`: where a record lacks the column another record has, SpecForge
    passes None (no think block, nothing trained); the count must do the same, in-process and in workers."""
    tok_dir = template_tokenizer_dir("kimi-k3-thinking", family_tokenizer)
    records = read_jsonl(REASONING)[:6]
    records[1] = dict(records[1], thinking=True)
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    ref = reference_counts(records, hf_tokenizer(tok_dir), "kimi-k3-thinking")
    no_fill = reference_counts(
        [dict(r, thinking=r.get("thinking", True)) for r in records], hf_tokenizer(tok_dir), "kimi-k3-thinking"
    )
    assert ref.sum() < no_fill.sum()  # the None-filled records train nothing
    for workers in (1, 2):
        settings = CountSettings(
            dataset_paths=[str(path)], tokenizer_path=tok_dir, chat_template="kimi-k3-thinking", num_workers=workers
        )
        assert_same_counts(count_dataset(settings).counts, ref)


# ---------------------------------------------------------------- the shared tokenizers (../shared/tokenizers)


@pytest.mark.parametrize("template", TEMPLATES)
def test_shared_tokenizers_match_the_rule(template):
    """The larger check: the real rebuilt Qwen3 / Qwen3-Next / Qwen3.5 / gpt-oss tokenizers and the
    synthetic Kimi, GLM and Inkling ones, every setting, the fixtures and the corner cases."""
    shared_tokenizers_or_skip()
    tok_dir = template_tokenizer_dir(template, None, shared=True)
    assert check_template(template, tok_dir, data_for(template)) > 100
    check_corners(template, tok_dir)
