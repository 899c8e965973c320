"""Streamed readers: .jsonl, .json lists, .gz, directories, sample sizes and bad lines."""

from __future__ import annotations

import gzip
import json
import logging

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


def test_directories_follow_symlinked_folders_once_and_any_case_of_extension(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "far.JSONL").write_text('{"text": "far"}\n')
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "A.Json").write_text('[{"text": "A"}]')
    (root / "sub" / "s.jsonl.GZ").write_bytes(gzip.compress(b'{"text": "s"}\n'))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop
    texts = [r.data["text"] for r in iter_records([str(root)])]
    assert texts == ["A", "far", "s"]


def test_other_files_in_a_dataset_folder_are_listed_with_a_conversion_that_works(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "a"}\n')
    (root / "train-00000.parquet").write_bytes(b"PAR1")
    (root / "cache.arrow").write_bytes(b"ARROW1")
    (root / ".hidden").write_text("x")
    assert dataset_files([str(root)]) == [str(root / "a.jsonl")]
    dataset_files([str(root)])  # read again (the cache and the count both list the folder): said once
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    text = warnings[0]
    assert "2 file(s) are not .jsonl/.json(.gz) and are not read: cache.arrow, train-00000.parquet" in text
    assert f"pandas.read_parquet('{root / 'train-00000.parquet'}').to_json('{root / 'train-00000.jsonl'}'" in text
    assert f"datasets.Dataset.from_file('{root / 'cache.arrow'}').to_json('{root / 'cache.jsonl'}'" in text
    assert ".hidden" not in text


@pytest.mark.parametrize("how", ["same file twice", "folder and a file in it", "two links to one file"])
def test_a_file_named_twice_is_an_error(tmp_path, how):
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "a.jsonl"
    data.write_text('{"text": "a"}\n')
    (tmp_path / "link.jsonl").symlink_to(data)
    paths = {
        "same file twice": [data, data],
        "folder and a file in it": [tmp_path / "d", data],
        "two links to one file": [data, tmp_path / "link.jsonl"],
    }[how]
    with pytest.raises(InputError, match=r"\.jsonl would be counted twice, as it is named by both .* Name each file"):
        dataset_files([str(p) for p in paths])


def test_a_byte_order_mark_is_accepted(tmp_path):
    records = [{"text": "a"}, {"text": "b"}]
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "b.json").write_text(bom + json.dumps(records), encoding="utf-8")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((bom + json.dumps(records[0]) + "\n").encode("utf-8")))
    assert [r.data for r in iter_records([str(tmp_path / "a.jsonl")])] == records
    assert [r.data for r in iter_records([str(tmp_path / "b.json")])] == records
    assert [r.data for r in iter_records([str(tmp_path / "c.jsonl.gz")])] == records[:1]


def test_json_nested_past_the_parser_is_an_input_error_or_skipped(tmp_path):
    deep = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "ok"}\n' + deep + '\n{"text": "ok"}\n')
    with pytest.raises(InputError, match=r"deep.jsonl, line 2: malformed JSON: nested deeper than the JSON parser"):
        list(iter_records([str(path)]))
    stats = ReadStats()
    assert len(list(iter_records([str(path)], skip_invalid=True, stats=stats))) == 2 and stats.invalid_skipped == 1
    array = tmp_path / "deep.json"
    array.write_text("[" + '{"text": "ok"},\n' + deep + "]")
    with pytest.raises(InputError, match=r"deep.json, line 2: malformed JSON: a record nested deeper"):
        list(iter_records([str(array)]))


def test_a_json_file_holding_one_object_says_it_must_be_a_list(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}, indent=2))
    with pytest.raises(InputError, match=r"one.json, line 1: .*a \.json dataset must be a list of records"):
        list(iter_records([str(path)]))
