"""The flags of the commands on trained drafts: `trim`, `verify`, and --remap of prepare / pre-step.

Defined once like every flag (cli/flags.py): defaults come from TrimSettings and VerifySettings, and
the counting and search flags are the ones `optimize` has.
"""

from __future__ import annotations

import argparse
import dataclasses

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.cli.flags import add_count_flags, add_export_flag, add_search_flags, settings_from
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.drafts.trim import TRIM_EXPORT_FORMATS, TrimSettings
from specforge_vocab.drafts.verify import VerifySettings

# ---------------------------------------------------------------- trim


def add_trim_flags(parser: argparse.ArgumentParser) -> None:
    """The `specforge-vocab trim` flags: the checkpoint, then counting's and the search's own flags
    (as `optimize` has them; --draft-vocab-size among the latter)."""
    t = TrimSettings
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="trained draft directory: config.json plus model.safetensors (sharded or not) or pytorch_model.bin",
    )
    ckpt.add_argument(
        "--vocab-mapping",
        metavar="FILE",
        default=t.vocab_mapping,
        help="d2t/t2d the draft was trained with (.pt or .safetensors); needed when the checkpoint holds "
        "none and draft_vocab_size < vocab_size",
    )
    ckpt.add_argument(
        "--counts",
        dest="counts_path",
        default=t.counts_path,
        metavar="FILE",
        help="token counts from `specforge-vocab count`, instead of --dataset-path",
    )
    ckpt.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory for the trimmed draft (safetensors, index if sharded, config.json)",
    )
    ckpt.add_argument(
        "--overwrite",
        action="store_true",
        default=t.overwrite,
        help="write into an existing, non-empty --output directory",
    )
    add_export_flag(ckpt, formats=TRIM_EXPORT_FORMATS)
    add_count_flags(parser, shard=False)
    add_search_flags(parser)


def counting_asked(args: argparse.Namespace) -> bool:
    """True when any data source flag was given (the other counting flags then apply to it)."""
    return bool(args.dataset_paths or args.prompts_path or args.hidden_states_path)


def trim_settings(args: argparse.Namespace) -> TrimSettings:
    search = settings_from(SearchSettings, args)
    return TrimSettings(
        checkpoint=args.checkpoint,
        output=args.output,
        vocab_mapping=args.vocab_mapping,
        draft_vocab_size=search.draft_vocab_size,
        count=settings_from(CountSettings, args) if counting_asked(args) else None,
        counts_path=args.counts_path,
        search=search,
        overwrite=args.overwrite,
        exports=args.exports,
    )


# ---------------------------------------------------------------- verify and --remap


def add_verify_flags(parser: argparse.ArgumentParser) -> None:
    """The `specforge-vocab verify` flags: the draft, what to check it against, and the data flags."""
    v = VerifySettings
    parser.add_argument(
        "draft",
        metavar="DRAFT",
        help="the draft: a directory (config.json + model.safetensors, sharded or not, or pytorch_model.bin), a "
        "SpecForge checkpoint directory or its training_state.pt, or a run's output_dir",
    )
    group = parser.add_argument_group("what to check it against")
    group.add_argument(
        "--vocab-mapping",
        default=v.vocab_mapping,
        metavar="FILE",
        help="the mapping the draft was trained with (.pt or .safetensors): its contents must equal the draft's d2t",
    )
    group.add_argument(
        "--counts",
        dest="counts_path",
        default=v.counts_path,
        metavar="FILE",
        help="token counts from `specforge-vocab count`: report the kept set's coverage of them",
    )
    group.add_argument("--json", dest="as_json", action="store_true", default=False, help="print the report as JSON")
    add_count_flags(parser, shard=False)


def verify_settings(args: argparse.Namespace) -> VerifySettings:
    count = None
    if args.dataset_paths:
        count = settings_from(CountSettings, args)
        if not count.hidden_states_path:  # here the target gives the tokenizer, not an LM head to count with
            count = dataclasses.replace(count, target_model_path=None)
        if not count.tokenizer_path and args.target_model_path:
            count = dataclasses.replace(count, tokenizer_path=args.target_model_path)
    return VerifySettings(
        draft=args.draft,
        vocab_mapping=args.vocab_mapping,
        target_model_path=args.target_model_path,
        count=count,
        counts_path=args.counts_path,
    )


def add_remap_flag(group, *, name: str = "--remap") -> None:
    """prepare / pre-step: move a checkpoint's draft onto a new vocabulary instead of keeping its own."""
    group.add_argument(
        name,
        dest="remap",
        action="store_true",
        default=False,
        help="when training continues from a checkpoint: choose a new kept set for this data and write a warm-start "
        "checkpoint (trained rows kept byte for byte, new tokens from the target's lm_head) instead of keeping the "
        "checkpoint's own mapping",
    )
