"""Streamed readers: .jsonl, .json lists, .gz, directories, sample sizes and bad lines."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import DATA, read_jsonl

from specforge_vocab.counting.data import ReadStats, dataset_files, iter_records
from specforge_vocab.errors import InputError


def test_jsonl_json_and_gz_give_the_same_records(tmp_path):
    records = read_jsonl(DATA / "mt_bench_gpt4_reference.jsonl")
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as handle:
        json.dump(records, handle)
    for name in ("a.json", "b.jsonl.gz", "c.json.gz"):
        got = [r.data for r in iter_records([str(tmp_path / name)])]
        assert got == records, name


def test_json_list_reports_lines_and_streams_across_chunks(tmp_path, monkeypatch):
    import specforge_vocab.counting.data as data

    monkeypatch.setattr(data, "_CHUNK", 7)  # force many chunk boundaries, mid-number and mid-string
    records = [{"text": "x" * i, "n": 12345 + i} for i in range(20)]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    got = list(iter_records([str(tmp_path / "a.json")]))
    assert [r.data for r in got] == records
    assert [r.line for r in got] == list(range(2, 22))


def test_directories_are_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.jsonl").write_text('{"text": "b2"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.data["text"] for r in iter_records([str(tmp_path)])] == ["a", "b2"]


def test_sample_size_counts_records_across_files(tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(3)))
    got = [r.data["text"] for r in iter_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], sample_size=4)]
    assert got == ["a0", "a1", "a2", "b0"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "cut\n{"text": "ok"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl, line 3: malformed JSON .*--skip-invalid"):
        list(iter_records([str(path)]))
    stats = ReadStats()
    assert len(list(iter_records([str(path)], skip_invalid=True, stats=stats))) == 2
    assert stats.invalid_skipped == 1 and "line 3" in stats.examples[0]


def test_truncated_json_list_is_an_error(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"text": "a"}, {"text": "b"')
    with pytest.raises(InputError, match=r"cut.json, line 1: malformed JSON: expected a complete JSON record"):
        list(iter_records([str(path)]))


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        dataset_files([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match=r"must be a .jsonl, .json, .jsonl.gz or .json.gz file"):
        dataset_files([str(tmp_path / "x.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="directory with no dataset files"):
        dataset_files([str(tmp_path / "empty")])
