"""`specforge-vocab`: the command line. It parses flags into settings and calls the pipeline.

Subcommands: count, merge, optimize, prepare, pre-step, trim, demo.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Dict, List, Optional, Sequence

from .errors import SpecForgeVocabError

logger = logging.getLogger("specforge_vocab")


# ---------------------------------------------------------------- shared flag groups


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, but got {value}")
    return value


def add_count_arguments(parser: argparse.ArgumentParser, *, datasets_required: bool = True,
                        chat_template_default: str = "llama3") -> None:
    """The data and tokenizer flags shared by count, optimize and trim (fields of CountSettings)."""
    data = parser.add_argument_group("data (what SpecForge trains on)")
    data.add_argument("--dataset-path", nargs="+", required=datasets_required, default=None, metavar="PATH",
                      help="dataset files (.jsonl, .json, optionally .gz) or directories, read in order")
    data.add_argument("--is-preformatted", action="store_true",
                      help="records hold rendered 'text' instead of 'conversations'")
    data.add_argument("--train-only-last-turn", action="store_true", help="count only the last assistant turn")
    data.add_argument("--sample-size", type=positive_int, default=None, help="count only the first N records")
    data.add_argument("--skip-invalid", action="store_true",
                      help="skip malformed records (reported) instead of stopping at the first")
    tok = parser.add_argument_group("tokenizer and template")
    tok.add_argument("--tokenizer-path", default=None, help="the target model's tokenizer directory")
    tok.add_argument("--chat-template", default=chat_template_default, help="SpecForge chat template name")
    tok.add_argument("--max-length", type=positive_int, default=2048, help="truncation length (SpecForge: 2048)")
    tok.add_argument("--target-vocab-size", type=positive_int, default=None,
                     help="V, the target vocabulary size (default: the tokenizer's length)")
    tok.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer to run its own code")


def count_settings_from_args(args: argparse.Namespace):
    from .counting import CountSettings

    return CountSettings(
        dataset_paths=list(args.dataset_path or []), tokenizer_path=args.tokenizer_path or "",
        chat_template=args.chat_template, max_length=args.max_length, is_preformatted=args.is_preformatted,
        train_only_last_turn=args.train_only_last_turn, sample_size=args.sample_size,
        target_vocab_size=args.target_vocab_size, skip_invalid=args.skip_invalid,
        trust_remote_code=args.trust_remote_code,
    )


# ---------------------------------------------------------------- count


def add_count_parser(sub) -> None:
    parser = sub.add_parser("count", help="count the loss-masked tokens of a dataset",
                            description="Count exactly the token ids SpecForge puts loss on into a safetensors file.")
    add_count_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="counts file to write (.safetensors)")
    parser.set_defaults(run=run_count_command)


def run_count_command(args: argparse.Namespace) -> int:
    from .pipeline import count_to_file

    result = count_to_file(count_settings_from_args(args), output=args.output, progress=not args.quiet)
    _say(args, *result.summary_lines(), f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- main


SUBCOMMANDS: List[Callable] = [add_count_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specforge-vocab",
        description="Choose an EAGLE-3 draft vocabulary from exactly the tokens SpecForge trains on.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.run(args) or 0)
    except SpecForgeVocabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: no output was half-written (each file is replaced only when complete).", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
