"""The training commands: `prepare` (specforge train), `pre-step` and scripts/train_eagle3.py (the
hand-over to SpecForge's own train_eagle3.py). They build settings, call
:func:`~specforge_vocab.specforge.prepare.before_training` and print its result."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli.console import say
from specforge_vocab.cli.draft_flags import add_remap_flag
from specforge_vocab.cli.flags import (
    Parser,
    add_chat_template_file_flag,
    add_count_source_flags,
    add_lock_timeout_flag,
    add_search_flags,
    settings_from,
)
from specforge_vocab.errors import InputError, SpecForgeVocabError
from specforge_vocab.specforge.prepare import PrepareResult, before_training
from specforge_vocab.specforge.train_eagle3 import find_specforge_train_script, train_eagle3_parser

logger = logging.getLogger(__name__)


def add_prepare_flags(parser: argparse.ArgumentParser) -> None:
    """What prepare and pre-step write, and the search flags."""
    group = parser.add_argument_group("what prepare writes")
    group.add_argument(
        "--keep-draft-vocab-size",
        action="store_true",
        help="keep draft_vocab_size as the draft config has it; write only the mapping",
    )
    group.add_argument("--force", action="store_true", help="recount and search again even if nothing changed")
    group.add_argument(
        "--output-dir", default=None, help="results directory (default: <cache_dir>/vocab_optimization/<data>-<hash>)"
    )
    group.add_argument(
        "--no-backup",
        dest="backup",
        action="store_false",
        help="do not keep <file>.bak copies of the configs it changes",
    )
    add_lock_timeout_flag(group)
    add_remap_flag(group)
    add_chat_template_file_flag(parser.add_argument_group("chat template"))
    add_search_flags(parser)


def add_prepare_parser(sub) -> None:
    parser = sub.add_parser(
        "prepare",
        help="before `specforge train --config`: choose k, write the mapping, set vocab_mapping_path",
        description="Count the tokens a SpecForge run config trains on (data.train_data_path, data.prompts_path or "
        "data.hidden_states_path), choose draft_vocab_size, patch the draft config, write the d2t/t2d "
        "mapping and set model.vocab_mapping_path in the run config. A second run with unchanged inputs "
        "reuses the results.",
    )
    parser.add_argument("--config", required=True, help="the run config (YAML, or JSON) given to `specforge train`")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="overrides, as given to `specforge train` (pass it the same ones)",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="section.field=value",
        help="an override (repeatable; applied after the positional ones)",
    )
    parser.add_argument(
        "--output-config",
        default=None,
        help="write the run config with vocab_mapping_path here instead of changing --config",
    )
    add_prepare_flags(parser)
    add_count_source_flags(parser, head_flags=False)  # the LM head: model.target_model_path, model.lm_head_key
    parser.set_defaults(run=run_prepare_command)


def _say_result(args: argparse.Namespace, result: PrepareResult) -> None:

    if result.rank == 0:
        say(args, *result.summary_lines())


def run_prepare_command(args: argparse.Namespace) -> int:
    result = before_training(
        args.config,
        overrides=[*args.overrides, *args.set_overrides],
        output_config=args.output_config,
        count_source=args.count_source,
        device=args.device,
        keep_draft_vocab_size=args.keep_draft_vocab_size,
        force=args.force,
        search=settings_from(SearchSettings, args),
        output_dir=args.output_dir,
        backup=args.backup,
        lock_timeout=args.lock_timeout,
        progress=not args.quiet,
        remap=args.remap,
        chat_template_file=args.chat_template_file,
    )
    _say_result(args, result)
    return 0


def add_pre_step_parser(sub) -> None:
    parser = sub.add_parser(
        "pre-step",
        help="before scripts/train_eagle3.py: choose k and write the mapping at its cache path",
        description="Run only the pre-step of scripts/train_eagle3.py: count --train-data-path, choose "
        "draft_vocab_size, patch --draft-model-config and write the mapping at "
        "<cache-dir>/vocab_mapping/<md5 key>.pt (both key versions), where train_eagle3.py loads it. "
        "Usage: specforge-vocab pre-step [options] -- <train_eagle3 flags>.",
    )
    add_prepare_flags(parser)
    parser.add_argument(
        "train_eagle3_args",
        nargs=argparse.REMAINDER,
        metavar="-- FLAGS",
        help="SpecForge's train_eagle3.py flags, after --",
    )
    parser.set_defaults(run=run_pre_step_command, own_flags=own_option_strings(parser))


def own_option_strings(parser: argparse.ArgumentParser) -> Tuple[str, ...]:
    """The flags of ``parser`` itself (not --help)."""
    return tuple(o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help"))


def misplaced_own_flags(flags: Sequence[str], own: Sequence[str]) -> List[str]:
    """This tool's flags in the train_eagle3 part (after --) that train_eagle3.py does not have.

    >>> misplaced_own_flags(["--max-length", "512", "--n-calls=5"], ["--n-calls", "--output-dir"])
    ['--n-calls']
    """
    theirs = set(own_option_strings(train_eagle3_parser()))
    names = [token.split("=", 1)[0] for token in flags if token.startswith("--")]
    return [name for name in names if name in own and name not in theirs]


def run_pre_step_command(args: argparse.Namespace) -> int:
    flags = list(args.train_eagle3_args)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    misplaced = misplaced_own_flags(flags, args.own_flags)
    if misplaced:
        raise InputError(
            f"{', '.join(misplaced)} after -- would go to SpecForge's train_eagle3.py, which has no such flag, so "
            "this pre-step would never see it. Put it before --: specforge-vocab pre-step "
            f"{misplaced[0]} VALUE -- <train_eagle3 flags>."
        )
    if not flags:
        raise InputError(
            "pre-step needs SpecForge's train_eagle3 flags after --, for example: specforge-vocab "
            "pre-step -- --target-model-path ./Llama-3.1-8B-Instruct --draft-model-config "
            "configs/llama3-8B-eagle3.json --train-data-path train.jsonl"
        )
    result = before_training(
        train_eagle3_args=flags,
        keep_draft_vocab_size=args.keep_draft_vocab_size,
        force=args.force,
        search=settings_from(SearchSettings, args),
        output_dir=args.output_dir,
        backup=args.backup,
        lock_timeout=args.lock_timeout,
        progress=not args.quiet,
        remap=args.remap,
        chat_template_file=args.chat_template_file,
    )
    _say_result(args, result)
    return 0


HANDOVER_PREFIX = "--vocab-"


def handover_parser() -> argparse.ArgumentParser:
    """scripts/train_eagle3.py's own flags; every other flag goes to SpecForge's train_eagle3.py.

    The search flags carry a ``--vocab-`` prefix there (``--vocab-n-calls 100``) so that they can never
    clash with SpecForge's flags.
    """
    parser = Parser(
        prog="scripts/train_eagle3.py",
        description="SpecForge's scripts/train_eagle3.py with the specforge-vocab pre-step: count --train-data-path, "
        "choose draft_vocab_size, patch --draft-model-config, write the mapping at train_eagle3.py's "
        "cache path, then run SpecForge's train_eagle3.py with all other flags unchanged. Under "
        "torchrun every rank runs it; rank 0 writes.",
    )
    parser.add_argument(
        "--specforge-script",
        default=None,
        metavar="PATH",
        help="SpecForge's scripts/train_eagle3.py (default: found next to an installed source checkout of SpecForge)",
    )
    parser.add_argument(
        "--keep-draft-vocab-size",
        action="store_true",
        help="keep draft_vocab_size as the draft config has it; write only the mapping",
    )
    parser.add_argument(
        HANDOVER_PREFIX + "force",
        dest="force",
        action="store_true",
        help="recount and search again even if nothing changed",
    )
    parser.add_argument(
        HANDOVER_PREFIX + "output-dir",
        dest="output_dir",
        default=None,
        help="results directory (default: <cache-dir>/vocab_optimization/<data>-<hash>)",
    )
    parser.add_argument(
        HANDOVER_PREFIX + "no-backup",
        dest="backup",
        action="store_false",
        help="do not keep a .bak of the draft config",
    )
    add_remap_flag(parser, name=HANDOVER_PREFIX + "remap")
    add_chat_template_file_flag(parser)
    add_search_flags(parser, prefix=HANDOVER_PREFIX)
    return parser


def split_handover_flags(
    argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None
) -> Tuple[List[str], List[str]]:
    """(our flags, SpecForge's flags), each in the given order; ``--flag value`` and ``--flag=value``."""
    parser = parser or handover_parser()
    takes_value = {}
    for action in parser._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    own: List[str] = []
    rest: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in takes_value and name not in ("-h", "--help"):
            own.append(token)
            if takes_value[name] and "=" not in token:
                if i + 1 >= len(argv):
                    raise InputError(f"{name} needs a value, but it is the last flag. Write {name} VALUE.")
                own.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    return own, rest


def replace_flag_value(flags: Sequence[str], name: str, value: str) -> List[str]:
    """``flags`` with every value of ``name`` (``--name v`` or ``--name=v``) replaced by ``value``.

    >>> replace_flag_value(["--a", "1", "--ckpt-dir", "old", "--ckpt-dir=x"], "--ckpt-dir", "new")
    ['--a', '1', '--ckpt-dir', 'new', '--ckpt-dir=new']
    """
    out: List[str] = []
    skip = False
    for token in flags:
        if skip:
            out.append(value)
            skip = False
        elif token == name:
            out.append(token)
            skip = True
        elif token.startswith(name + "="):
            out.append(f"{name}={value}")
        else:
            out.append(token)
    return out


def hand_over(script: str, flags: Sequence[str]) -> None:  # pragma: no cover - replaces the process
    """Replace this process with ``python <script> <flags>`` (same interpreter, environment, rank)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    argv = [sys.executable, script, *flags]
    if os.name == "nt":
        sys.exit(subprocess.call(argv))
    os.execv(sys.executable, argv)


def train_eagle3_main(argv: Optional[Sequence[str]] = None) -> int:
    """scripts/train_eagle3.py: the pre-step, then SpecForge's train_eagle3.py with the other flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = handover_parser()
    if any(token in ("-h", "--help") for token in argv):
        parser.print_help()
        print("\nEvery other flag is passed to SpecForge's train_eagle3.py unchanged.")
        return 0
    logging.basicConfig(level=logging.WARNING, format="specforge-vocab: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        own, flags = split_handover_flags(argv, parser)
        try:
            args = parser.parse_args(own)
        except SystemExit as exc:  # argparse already printed the problem
            return int(exc.code or 2)
        script = find_specforge_train_script(args.specforge_script)
        result = before_training(
            train_eagle3_args=flags,
            keep_draft_vocab_size=args.keep_draft_vocab_size,
            force=args.force,
            search=settings_from(SearchSettings, args),
            output_dir=args.output_dir,
            backup=args.backup,
            progress=True,
            remap=args.remap,
            chat_template_file=args.chat_template_file,
        )
        if result.warm_start:
            flags = replace_flag_value(flags, "--ckpt-dir", result.warm_start)
    except SpecForgeVocabError as exc:
        print(f"specforge-vocab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.rank == 0:
        for line in result.summary_lines():
            print(f"specforge-vocab: {line}")
        print(f"specforge-vocab: handing over to {script}")
    hand_over(script, flags)
    return 0  # pragma: no cover - hand_over does not return
