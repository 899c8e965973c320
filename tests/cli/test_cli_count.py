"""`specforge-vocab count`: output file, summary and every bad-input case (exit 2, no output)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, run_cli

from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import load_counts


def test_count_writes_counts_and_metadata(tmp_path, capsys, deepseek_dir):
    out = tmp_path / "counts.safetensors"
    path = str(DATA / "edge_cases.jsonl")
    code, stdout, _ = run_cli(
        [
            "count",
            "--dataset-path",
            path,
            "--tokenizer-path",
            deepseek_dir,
            "--chat-template",
            "deepseek-v3",
            "--max-length",
            "512",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    counts, meta = load_counts(str(out))
    expected = count_tokens([path], deepseek_dir, chat_template="deepseek-v3", max_length=512)
    assert np.array_equal(counts, expected)
    assert counts.shape == (129_280,)
    files = json.loads(meta["files"])
    assert files[0]["size"] == (DATA / "edge_cases.jsonl").stat().st_size and len(files[0]["sha256"]) == 64
    assert meta["chat_template"] == "deepseek-v3" and meta["max_length"] == "512"
    assert meta["tokenizer_length"] == "129280" and int(meta["tokens_counted"]) == counts.sum()
    assert meta["records_skipped_empty"] == "1" and meta["records_read"] == "16"
    assert "skipped (empty, as SpecForge): 1" in stdout


GOOD = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}

BAD_LINES = [
    ("malformed", '{"conversations": [', r"bad.jsonl, line 2: malformed JSON"),
    (
        "no_conversations",
        json.dumps({"messages": []}),
        r"bad.jsonl, line 2: every record needs a 'conversations' field",
    ),
    (
        "non_string_content",
        json.dumps({"conversations": [{"role": "user", "content": {"a": 1}}]}),
        r"bad.jsonl, line 2, field 'conversations\[0\].content': content must be a string or null",
    ),
    (
        "role_not_a_string",
        json.dumps({"conversations": [{"role": ["narrator"], "content": "x"}]}),
        r"bad.jsonl, line 2, field 'conversations\[0\].role': the role must be a string",
    ),
    ("not_an_object", json.dumps(["user", "hi"]), r"bad.jsonl, line 2: each record must be a JSON object"),
]


@pytest.mark.parametrize("name,line,message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_record_exits_2_names_file_and_line_and_writes_nothing(
    tmp_path, capsys, caplog, llama3_dir, name, line, message
):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    out = tmp_path / "counts.safetensors"
    argv = ["count", "--dataset-path", str(data), "--tokenizer-path", llama3_dir, "--output", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]
    # --skip-invalid skips the line, counts the rest, and reports how many were skipped.
    code, stdout, _ = run_cli(argv + ["--skip-invalid"], capsys)
    assert code == 0 and out.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("--skip-invalid skipped 1 invalid record: ")
    assert load_counts(str(out))[1]["records_invalid_skipped"] == "1"


@pytest.mark.parametrize(
    "case",
    ["unknown_template", "missing_tokenizer", "missing_dataset", "empty_dataset", "bad_max_length", "two_problems"],
)
def test_bad_settings_exit_2_with_a_clear_message(tmp_path, capsys, llama3_dir, case):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    argv = {"dataset": str(data), "tok": llama3_dir, "tpl": "llama3", "extra": []}
    expected = {
        "unknown_template": ("tpl", "llama-3", r"--chat-template must be one of llama3, .*but got 'llama-3'"),
        "missing_tokenizer": ("tok", str(tmp_path / "no_tok"), r"--tokenizer-path .*no_tok must be a directory"),
        "missing_dataset": ("dataset", str(tmp_path / "none.jsonl"), r"--dataset-path .*none.jsonl does not exist"),
        "empty_dataset": ("dataset", str(tmp_path / "empty.jsonl"), r"no records to count"),
        "bad_max_length": ("extra", ["--max-length", "0"], r"--max-length: must be a positive integer, but got 0"),
        "two_problems": ("tok", str(tmp_path / "no_tok"), r"2 settings are invalid"),
    }[case]
    (tmp_path / "empty.jsonl").write_text("\n")
    argv[expected[0]] = expected[1]
    if case == "two_problems":
        argv["tpl"] = "nope"
    out = tmp_path / "c.safetensors"
    full = [
        "count",
        "--dataset-path",
        argv["dataset"],
        "--tokenizer-path",
        argv["tok"],
        "--chat-template",
        argv["tpl"],
        "--output",
        str(out),
    ] + argv["extra"]
    if case == "bad_max_length":
        with pytest.raises(SystemExit) as info:
            main(full)
        assert info.value.code == 2
        err = capsys.readouterr().err
    else:
        code, _, err = run_cli(full, capsys)
        assert code == 2
    assert __import__("re").search(expected[2], err), err
    assert not out.exists()


def test_console_script_exit_status(tmp_path, llama3_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specforge_vocab.cli",
            "count",
            "--dataset-path",
            str(tmp_path / "missing.jsonl"),
            "--tokenizer-path",
            llama3_dir,
            "--output",
            str(tmp_path / "c.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "missing.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_skip_invalid_reports_the_first_few_then_a_count(tmp_path, capsys, caplog, llama3_dir):
    data = tmp_path / "many_bad.jsonl"
    rows = [json.dumps(GOOD)] + [f'{{"conversations": [{i}' for i in range(10)] + [json.dumps(GOOD)]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    argv = ["count", "--dataset-path", str(data), "--tokenizer-path", llama3_dir, "--skip-invalid"]
    code, _, _ = run_cli([*argv, "--output", str(tmp_path / "c.safetensors")], capsys)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("--skip-invalid skipped 10 invalid records, the first 3: ")
    assert "many_bad.jsonl, line 2:" in warnings[0] and "line 4:" in warnings[0] and "line 5:" not in warnings[0]
    assert warnings[0].endswith("and 7 more (-v lists every one)")


def test_count_warns_once_when_the_template_does_not_fit_the_tokenizer(tmp_path, capsys, caplog, deepseek_dir):
    """The default llama3 template on a DeepSeek tokenizer counts nothing; `count` says why before counting
    and names the template that fits, once, and still writes the (empty) counts."""
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    out = tmp_path / "counts.safetensors"
    argv = ["count", "--dataset-path", str(DATA / "gsm8k_test_sample.jsonl"), "--tokenizer-path", deepseek_dir]
    code, _, _ = run_cli([*argv, "--output", str(out)], capsys)
    assert code == 0 and out.exists()
    unfit = [r.getMessage() for r in caplog.records if "does not fit this tokenizer" in r.getMessage()]
    assert len(unfit) == 1, unfit
    assert unfit[0].startswith("--chat-template llama3 does not fit this tokenizer: '<|eot_id|>'")
    assert "a template that fits it: --chat-template deepseek-v3" in unfit[0]
    caplog.clear()
    code, _, _ = run_cli([*argv, "--chat-template", "deepseek-v3", "--output", str(out)], capsys)
    assert code == 0 and not [r for r in caplog.records if "does not fit" in r.getMessage()]
