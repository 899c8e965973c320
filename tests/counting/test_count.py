"""Counting parity with a plain implementation of SpecForge's rule, on real tokenizers and data."""

from __future__ import annotations

import gzip
import io
import sys

import numpy as np
import pytest
from conftest import DATA, TOKENIZER_CASES, assert_same_counts, read_jsonl, shared_data_or_skip, write_jsonl
from specforge_reference import reference_counts

from specforge_vocab.counting.count import count_dataset, count_tokens
from specforge_vocab.counting.counts_file import load_counts, save_counts
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.tokenizer import load_tokenizer

FIXTURES = [
    "gsm8k_train_sample.jsonl",
    "hh_rlhf_multiturn_sample.jsonl",
    "mt_bench_gpt4_reference.jsonl",
    "humaneval_sample.jsonl",
    "edge_cases.jsonl",
]


@pytest.mark.parametrize("fixture_name,template", TOKENIZER_CASES)
@pytest.mark.parametrize("max_length", [2048, 160])
def test_parity_on_fixtures(request, fixture_name, template, max_length):
    tok_dir = request.getfixturevalue(fixture_name)
    tok = load_tokenizer(tok_dir)
    paths = [str(DATA / f) for f in FIXTURES]
    records = [r for p in paths for r in read_jsonl(p)]
    ref = reference_counts(records, tok, template, max_length=max_length)
    ours = count_tokens(paths, tok_dir, chat_template=template, max_length=max_length)
    assert ref.sum() > 1000
    assert_same_counts(ours, ref)


@pytest.mark.parametrize("fixture_name,template", TOKENIZER_CASES)
def test_parity_train_only_last_turn(request, fixture_name, template):
    tok_dir = request.getfixturevalue(fixture_name)
    tok = load_tokenizer(tok_dir)
    paths = [str(DATA / "hh_rlhf_multiturn_sample.jsonl"), str(DATA / "edge_cases.jsonl")]
    records = [r for p in paths for r in read_jsonl(p)]
    ref = reference_counts(records, tok, template, train_only_last_turn=True)
    ours = count_tokens(paths, tok_dir, chat_template=template, train_only_last_turn=True)
    assert_same_counts(ours, ref)
    # Only the last turn counts, so fewer tokens than with every turn.
    assert ours.sum() < count_tokens(paths, tok_dir, chat_template=template).sum()


@pytest.mark.parametrize(
    "template",
    [
        "qwen",
        "phi3",
        "gemma",
        "deepseek-v2",
        "qwen3-instruct",
        "longcat",
        "llama4",
        "gpt-oss-naive",
        "kimi-k2-instruct",
    ],
)
def test_parity_other_templates(llama3_dir, template):
    """Templates whose markers are not special tokens of the tokenizer take the slow exact path."""
    tok = load_tokenizer(llama3_dir)
    path = str(DATA / "edge_cases.jsonl")
    ref = reference_counts(read_jsonl(path), tok, template, max_length=512)
    ours = count_tokens([path], llama3_dir, chat_template=template, max_length=512)
    assert_same_counts(ours, ref)


@pytest.mark.parametrize("fixture_name,template", TOKENIZER_CASES[:1] + TOKENIZER_CASES[2:3])
def test_parity_preformatted(request, tmp_path, fixture_name, template):
    from specforge_reference import load_template, render

    tok_dir = request.getfixturevalue(fixture_name)
    tok = load_tokenizer(tok_dir)
    records = read_jsonl(DATA / "hh_rlhf_multiturn_sample.jsonl")[:20]
    texts = [{"text": render(r, load_template(template), tok)} for r in records] + [{"text": ""}]
    path = write_jsonl(tmp_path / "pre.jsonl", texts)
    ref = reference_counts(texts, tok, template, is_preformatted=True, max_length=300)
    ours = count_tokens([str(path)], tok_dir, chat_template=template, is_preformatted=True, max_length=300)
    assert_same_counts(ours, ref)
    # The same texts as conversations give the same counts.
    conv = count_tokens(
        [str(DATA / "hh_rlhf_multiturn_sample.jsonl")], tok_dir, chat_template=template, sample_size=20, max_length=300
    )
    assert_same_counts(ours, conv)


def test_count_result_reports_what_was_read(llama3_dir):
    result = count_dataset(
        CountSettings(dataset_paths=[str(DATA / "edge_cases.jsonl")], tokenizer_path=llama3_dir, chat_template="llama3")
    )
    records = read_jsonl(DATA / "edge_cases.jsonl")
    assert result.records_read == len(records)
    assert result.records_skipped_empty == sum(1 for r in records if not r["conversations"])
    assert result.tokens_counted == int(result.counts.sum())
    assert result.files[0]["size"] == (DATA / "edge_cases.jsonl").stat().st_size
    assert len(result.files[0]["sha256"]) == 64


def test_target_vocab_size_sets_length_and_rejects_small_v(llama3_dir):
    from specforge_vocab.errors import InputError

    path = [str(DATA / "gsm8k_train_sample.jsonl")]
    counts = count_tokens(path, llama3_dir, chat_template="llama3", target_vocab_size=130_000, sample_size=5)
    assert counts.shape == (130_000,) and counts.dtype == np.int64
    with pytest.raises(
        InputError, match=r"gsm8k_train_sample.jsonl, line 1: token id \d+ is at or above the vocabulary size V=1,000"
    ):
        count_tokens(path, llama3_dir, chat_template="llama3", target_vocab_size=1000, sample_size=5)


def test_sample_size_takes_first_records_across_files(llama3_dir):
    a, b = str(DATA / "gsm8k_train_sample.jsonl"), str(DATA / "gsm8k_test_sample.jsonl")
    n_a = len(read_jsonl(a))
    both = count_tokens([a, b], llama3_dir, chat_template="llama3", sample_size=n_a + 3)
    expected = count_tokens([a], llama3_dir, chat_template="llama3") + count_tokens(
        [b], llama3_dir, chat_template="llama3", sample_size=3
    )
    assert_same_counts(both, expected)


def test_counts_file_round_trip(tmp_path):
    counts = np.arange(10, dtype=np.int64)
    save_counts(str(tmp_path / "c.safetensors"), counts, {"chat_template": "llama3"})
    loaded, meta = load_counts(str(tmp_path / "c.safetensors"))
    assert (loaded == counts).all() and meta["chat_template"] == "llama3"


def test_parity_on_all_shared_data(llama3_dir, deepseek_dir, llama3_chat_dir, deepseek_chat_dir):
    """The larger check: every shared file, both tokenizers and their chat-template variants."""
    shared = shared_data_or_skip()
    dirs = {
        "llama3_dir": llama3_dir,
        "llama3_chat_dir": llama3_chat_dir,
        "deepseek_dir": deepseek_dir,
        "deepseek_chat_dir": deepseek_chat_dir,
    }
    files = sorted(shared.glob("*.jsonl"))
    assert files
    for fixture_name, template in TOKENIZER_CASES:
        tok = load_tokenizer(dirs[fixture_name])
        for path in files:
            records = read_jsonl(path)
            ref = reference_counts(records, tok, template, max_length=2048)
            ours = count_tokens([str(path)], dirs[fixture_name], chat_template=template)
            assert_same_counts(ours, ref)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_has_a_total_when_the_data_size_is_known(tmp_path, monkeypatch, llama3_dir):
    """On a terminal, counting plain .jsonl shows records done out of a known total (hence an ETA),
    and the bar ends at that total; where the size is not known (.gz) it has none."""
    from tqdm import tqdm

    from specforge_vocab.counting import count as count_module
    from specforge_vocab.counting.count import expected_records
    from specforge_vocab.counting.data import Shard

    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(count_module, "tqdm", Recorded)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    source = DATA / "gsm8k_test_sample.jsonl"
    records = len(read_jsonl(source))
    count_dataset(CountSettings([str(source)], llama3_dir, max_length=256, num_workers=1), progress=True)
    assert bars[-1].total == records and bars[-1].n == records
    assert "/" + str(records) in sys.stderr.getvalue() and "<" in sys.stderr.getvalue()  # n/total [elapsed<eta]
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    assert expected_records([str(gz)], None) is None
    assert expected_records([str(gz)], 7) == 7
    assert expected_records([str(source)], None, Shard(1, 3)) == len(range(1, records, 3))
