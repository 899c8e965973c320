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


# ---------------------------------------------------------------- count


def add_count_parser(sub) -> None:
    from .counting import CountSettings

    parser = sub.add_parser("count", help="count the loss-masked tokens of a dataset",
                            description="Count exactly the token ids SpecForge puts loss on into a safetensors file.")
    CountSettings.add_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="counts file to write (.safetensors)")
    parser.set_defaults(run=run_count_command)


def run_count_command(args: argparse.Namespace) -> int:
    from .counting import CountSettings
    from .pipeline import count_to_file

    result = count_to_file(CountSettings.from_args(args), output=args.output, progress=not args.quiet)
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
