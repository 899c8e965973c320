"""The command line's flag rules, on every parser: repeated multi-value flags keep every value,
a single-value flag given twice is an error, no abbreviations, every default in --help."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from conftest import DATA, LLAMA3_DIR, run_cli

from specforge_vocab.cli.flags import HelpFormatter, flags_given
from specforge_vocab.cli.main import build_parser
from specforge_vocab.cli.training import handover_parser
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.counting.templates import template_names


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def every_parser():
    """(name, parser) of every command: each subcommand and scripts/train_eagle3.py's own flags
    (with no flag required, so that one flag can be parsed on its own)."""
    parsers = [*subparsers(build_parser()).items(), ("train_eagle3.py", handover_parser())]
    for _, parser in parsers:
        for action in parser._actions:
            action.required = False
    return parsers


PARSERS = every_parser()


def optionals(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def value_of(action) -> str:
    if action.choices:
        return str(list(action.choices)[-1])
    if action.type is not None:  # a value the flag's type accepts
        try:
            action.type("7")
            return "7"
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            pass
    return "x"


@pytest.mark.parametrize("name, parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_repeating_a_multi_value_flag_keeps_every_value(name, parser):
    several = [a for a in optionals(parser) if a.nargs in ("+", "*") or isinstance(a, argparse._AppendAction)]
    for action in several:
        flag = action.option_strings[0]
        # values the flag's type accepts (numbers for --dataset-weight, names for --domain ...)
        a, b, c = ("1", "2", "3") if value_of(action) == "7" else ("a", "b", "c")
        if isinstance(action, argparse._AppendAction):  # one value per flag (--set a=1 --set b=2)
            argv, expected = [flag, a, flag, c], [a, c]
        else:
            argv, expected = [flag, a, b, flag, c], [a, b, c]
        args, _ = parser.parse_known_args(argv)
        values = getattr(args, action.dest)
        if values and isinstance(values[0], list):  # --domain NAME=PATH [PATH ...]: one group per flag
            values = [v for group in values for v in group]
        kept = [str(v) if not isinstance(v, float) else f"{v:g}" for v in values]
        assert kept == expected, f"{name} {flag}"


def test_the_multi_value_flags_are_the_ones_the_issue_names():
    names = {o for _, p in PARSERS for a in optionals(p) if a.nargs in ("+", "*") for o in a.option_strings}
    assert {"--dataset-path", "--eval-dataset-path", "--pin-token"} <= names


@pytest.mark.parametrize("name, parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_a_single_value_flag_given_twice_is_an_error_naming_it(name, parser, capsys):
    singles = [a for a in optionals(parser) if a.nargs is None and not isinstance(a, argparse._AppendAction)]
    assert singles
    for action in singles:
        flag = action.option_strings[0]
        with pytest.raises(SystemExit) as info:
            parser.parse_known_args([flag, value_of(action), flag, value_of(action)])
        assert info.value.code == 2
        assert f"{flag} was given twice" in capsys.readouterr().err


@pytest.mark.parametrize("name, parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_no_flag_is_abbreviated(name, parser, capsys):
    for action in optionals(parser):
        flag = action.option_strings[-1]
        if not flag.startswith("--") or len(flag) < 5:
            continue
        prefix = flag[:-1]
        if any(o == prefix for a in parser._actions for o in a.option_strings):
            continue
        args, rest = parser.parse_known_args([prefix, value_of(action)] if action.nargs != 0 else [prefix])
        assert prefix in rest, f"{name}: {prefix} was taken as {flag}"


def test_output_is_not_output_dir(tmp_path, capsys):
    code, _, err = run_cli(["optimize", "--counts", "c.safetensors", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "unrecognized arguments: --output" in err
    assert not (tmp_path / "o").exists()


def test_two_dataset_paths_count_both_whichever_way_they_are_given(tmp_path, capsys):
    first, second = str(DATA / "gsm8k_test_sample.jsonl"), str(DATA / "humaneval_sample.jsonl")
    common = ["--tokenizer-path", LLAMA3_DIR, "--max-length", "256", "--num-workers", "1"]
    outs = {}
    for label, paths in (
        ("repeated", ["--dataset-path", first, "--dataset-path", second]),
        ("together", ["--dataset-path", first, second]),
    ):
        out = tmp_path / f"{label}.safetensors"
        code, _, err = run_cli(["-q", "count", *paths, *common, "--output", str(out)], capsys)
        assert code == 0, err
        outs[label] = load_counts(str(out))[0]
    both = count_tokens([first, second], LLAMA3_DIR, chat_template="llama3", max_length=256)
    only_second = count_tokens([second], LLAMA3_DIR, chat_template="llama3", max_length=256)
    assert np.array_equal(outs["repeated"], both) and np.array_equal(outs["together"], both)
    assert both.sum() > only_second.sum()


def test_flags_given_records_only_what_was_typed():
    parser = subparsers(build_parser())["optimize"]
    args = parser.parse_args(["--max-length", "2048", "--dataset-path", "a"])
    assert flags_given(args) == {"max_length", "dataset_paths"}
    assert flags_given(parser.parse_args([])) == frozenset()


@pytest.mark.parametrize("name, parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_help_shows_every_default(name, parser):
    formatter = HelpFormatter(prog="x")
    for action in optionals(parser):
        default = action.default
        if action.nargs == 0 or default is None or default in ("", []) or default is argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
        if "(default: " in text:
            assert f"(default: {default})" in text
        assert "(default: None)" not in text and "(default: False)" not in text


def test_help_lists_every_template_name():
    parser = subparsers(build_parser())["count"]
    text = parser.format_help().replace("\n", " ")
    text = " ".join(text.split())
    for name in template_names():
        assert name in text


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from specforge_vocab.cli.main import main\ntry: main(['optimize', '--help'])\n"
    code += "except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
