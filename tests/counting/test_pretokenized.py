"""Pre-tokenized prompts (data.prompts_path / --prompts-path): each record's loss-masked ids,
truncated as SpecForge truncates, and bad records named by line and field."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import masked_by_hand, write_jsonl, write_text

from specforge_vocab.counting.pretokenized import (
    RawConversationsFile,
    count_masked_ids,
    iter_prompt_records,
    prompts_file_kind,
)
from specforge_vocab.errors import InputError


@pytest.mark.parametrize("max_length", [8, 25, 2048])
def test_prompt_records_match_a_hand_count(tmp_path, tokenized_records, max_length):
    rows = [{"input_ids": ids, "loss_mask": mask, "extra": 1} for ids, mask in tokenized_records]
    rows[1] = {"input_ids": [rows[1]["input_ids"]], "loss_mask": [rows[1]["loss_mask"]]}  # batch dim of 1
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_lines=True)
    got = list(iter_prompt_records(str(path), max_length, vocab_size=128256))
    expected = [masked_by_hand(ids, mask, max_length) for ids, mask in tokenized_records]
    assert [g.tolist() for g in got] == expected and all(g.dtype == np.int64 for g in got)
    counts = count_masked_ids(got, 128256)
    hand = Counter(t for e in expected for t in e)
    assert counts.sum() == sum(hand.values()) and all(counts[t] == n for t, n in hand.items())
    split = [list(iter_prompt_records(str(path), max_length, rank=r, world_size=2)) for r in (0, 1)]
    assert [a.tolist() for a in split[0]] == expected[0::2] and [a.tolist() for a in split[1]] == expected[1::2]


def test_prompt_records_in_a_json_array(tmp_path, tokenized_records):
    path = write_text(tmp_path / "p.json", json.dumps([{"input_ids": i, "loss_mask": m} for i, m in tokenized_records]))
    got = [a.tolist() for a in iter_prompt_records(str(path), 2048)]
    assert got == [masked_by_hand(i, m, 2048) for i, m in tokenized_records]


def test_raw_conversations_and_empty_prompt_files(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"conversations": [{"role": "user", "content": "hi"}]}])
    assert prompts_file_kind(str(raw)) == "conversations"
    with pytest.raises(RawConversationsFile) as info:
        list(iter_prompt_records(str(raw), 10))
    assert info.value.path == str(raw) and isinstance(info.value, InputError)
    empty = write_text(tmp_path / "empty.jsonl", "\n  \n")
    assert prompts_file_kind(str(empty)) == "empty" and list(iter_prompt_records(str(empty), 10)) == []


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"input_ids": [1, 2]}], "line 1 has input_ids but no loss_mask"),
        ([{"loss_mask": [1, 0]}], "line 1 has loss_mask but no input_ids"),
        ([{"input_ids": [1], "loss_mask": [1]}, {"input_ids": [1, 2]}], "line 2 has no loss_mask"),
        ([{"input_ids": [1, 2], "loss_mask": [1]}], "input_ids has 2 entries but loss_mask has 1"),
        ([{"input_ids": [1, 2.5], "loss_mask": [1, 1]}], "'input_ids[1]' must be an integer, but got 2.5"),
        ([{"input_ids": [1, True], "loss_mask": [1, 1]}], "'input_ids[1]' must be an integer, but got True"),
        ([{"input_ids": [1, 2], "loss_mask": [1, 2]}], "'loss_mask[1]' must be 0 or 1, but got 2"),
        ([{"input_ids": [], "loss_mask": []}], "empty token sequence"),
        ([{"input_ids": [[1], [2]], "loss_mask": [1, 1]}], "nested or ragged"),
        ([{"input_ids": "1 2", "loss_mask": [1, 1]}], "must be a list of integers"),
        ([{"input_ids": [5, 200000], "loss_mask": [1, 1]}], "token id 200000, outside the target vocabulary of 128256"),
        ([{"input_ids": [-3, 2], "loss_mask": [1, 1]}], "negative token id -3"),
        ([{"input_ids": [1], "loss_mask": [1]}, [1, 2]], "line 2 must be a JSON object"),
    ],
)
def test_bad_prompt_records_are_named(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as info:
        list(iter_prompt_records(str(path), 2048, vocab_size=128256))
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_bad_json_line_and_missing_prompts_file(tmp_path):
    path = write_text(tmp_path / "p.jsonl", '{"input_ids": [1], "loss_mask": [1]}\n{"input_ids": [1,\n')
    with pytest.raises(InputError, match=r"line 2: invalid JSON"):
        list(iter_prompt_records(str(path), 10))
    with pytest.raises(InputError, match="does not exist"):
        list(iter_prompt_records(str(tmp_path / "nope.jsonl"), 10))


def test_count_masked_ids_chunks_and_checks():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 50, size=n) for n in (0, 3, 7, 1, 20)]
    expected = np.zeros(50, dtype=np.int64)
    for a in arrays:
        for t in a:
            expected[t] += 1
    assert np.array_equal(count_masked_ids(arrays, 50, chunk=4), expected)
    assert np.array_equal(count_masked_ids(iter(arrays), 50), expected)
    assert np.array_equal(count_masked_ids([], 5), np.zeros(5, dtype=np.int64))
    with pytest.raises(InputError, match="token id 50, outside"):
        count_masked_ids([np.array([1, 50])], 50)
    with pytest.raises(InputError, match="negative token id"):
        count_masked_ids([np.array([-2])], 50)
    with pytest.raises(InputError, match="must be integers"):
        count_masked_ids([np.array([1.5])], 50)
    with pytest.raises(InputError, match="vocab_size must be a positive integer"):
        count_masked_ids([np.array([1])], 0)
