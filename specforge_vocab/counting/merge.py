"""`specforge-vocab merge`: sum the shard counts of one `count` run into the counts of the whole data.

Shards come from ``specforge-vocab count ... --shard i/n`` (on one machine or many). Merging
refuses, naming the field and both values, inputs that are not the shards of one count:
another tokenizer (by content), V, chat template, max_length, mask option, sample size,
--skip-invalid or data files (by size, sha256 and --dataset-weight, in order); and a set of shards that mixes
sharded and unsharded files, mixes shard counts, holds a shard twice or leaves one out.
The result is the counts file of an unsharded count of the same data: the same bytes
`specforge-vocab count` without --shard writes (given the same paths), so ``optimize
--counts`` takes it as it is.

>>> merge_shard_numbers(["0/2", "1/2"], ["a", "b"])
2
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Dict, List, Sequence

import numpy as np

from specforge_vocab.counting.count import CountResult, check_not_empty
from specforge_vocab.counting.counts_file import load_counts, save_counts, settings_from_metadata
from specforge_vocab.counting.data import Shard
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import output_file_problem

logger = logging.getLogger(__name__)


FIX = (
    "Only the shard files of one `specforge-vocab count` run (the same data, tokenizer and options, "
    "each with its own --shard i/n) can be merged"
)


# (metadata key, what the message calls it)
SAME_FIELDS = [
    ("tokenizer_length", "tokenizer length"),
    ("vocab_size", "vocabulary size V"),
    ("chat_template", "chat_template"),
    ("chat_template_fields", "chat template fields"),
    ("max_length", "max_length"),
    ("is_preformatted", "mask option is_preformatted"),
    ("train_only_last_turn", "mask option train_only_last_turn"),
    ("legacy_reader", "record reader (legacy_reader)"),
    ("sample_size", "sample_size"),
    ("skip_invalid", "skip_invalid"),
]


def _differ(a: str, b: str, what: str, va: object, vb: object, fix: str = "") -> InputError:
    return InputError(
        f"merge: {a} and {b} differ in {what}: {va} vs {vb}. {FIX}; {fix or f'recount {b} with the settings of {a}.'}"
    )


def check_same_count(paths: Sequence[str], metadatas: Sequence[Dict[str, str]]) -> None:
    """Refuse inputs that are not from one count run (see the module docstring)."""
    a, first = paths[0], metadatas[0]
    for b, meta in zip(paths[1:], metadatas[1:]):
        ta, tb = first.get("tokenizer_sha256", ""), meta.get("tokenizer_sha256", "")
        if ta and tb:
            if ta != tb:
                raise _differ(
                    a,
                    b,
                    "tokenizer (sha256 of its files)",
                    f"{ta[:16]}... at {first.get('tokenizer_path')}",
                    f"{tb[:16]}... at {meta.get('tokenizer_path')}",
                    "count every shard with the same --tokenizer-path.",
                )
        elif first.get("tokenizer_path") != meta.get("tokenizer_path"):
            raise _differ(a, b, "tokenizer_path", repr(first.get("tokenizer_path")), repr(meta.get("tokenizer_path")))
        for key, what in SAME_FIELDS:
            if first.get(key) != meta.get(key):
                raise _differ(a, b, what, first.get(key), meta.get(key))
        files_a, files_b = json.loads(first["files"]), json.loads(meta["files"])
        if len(files_a) != len(files_b):
            raise _differ(
                a,
                b,
                "data files",
                f"{len(files_a)} files ({_names(files_a)})",
                f"{len(files_b)} files ({_names(files_b)})",
                "count every shard with the same --dataset-path.",
            )
        for n, (fa, fb) in enumerate(zip(files_a, files_b), start=1):
            if (fa["size"], fa["sha256"], fa.get("weight", 1)) != (fb["size"], fb["sha256"], fb.get("weight", 1)):
                raise _differ(
                    a,
                    b,
                    f"data file {n}",
                    _file(fa),
                    _file(fb),
                    "count every shard from the same, unchanged data files in the same order.",
                )


def _names(files: List[dict]) -> str:
    return ", ".join(str(f["path"]) for f in files[:3]) + (", ..." if len(files) > 3 else "")


def _file(info: dict) -> str:
    weight = f", --dataset-weight {info['weight']}" if "weight" in info else ""
    return f"{info['path']} ({info['size']:,} bytes, sha256 {str(info['sha256'])[:16]}...{weight})"


def merge_shard_numbers(shards: Sequence[str], paths: Sequence[str]) -> int:
    """Check the ``shard`` fields form one complete set 0/n ... n-1/n; return n."""
    unsharded = [p for p, s in zip(paths, shards) if not s]
    if unsharded and len(unsharded) < len(paths):
        sharded = next(p for p, s in zip(paths, shards) if s)
        shard = shards[list(paths).index(sharded)]
        raise InputError(
            f"merge: {unsharded[0]} is an unsharded count (of every record) but {sharded} is shard {shard}: the "
            f"inputs mix sharded and unsharded counts, so records would be counted twice. {FIX}; merge only the "
            "files of --shard 0/N ... N-1/N."
        )
    if unsharded:
        if len(paths) == 1:
            raise InputError(
                f"merge: {paths[0]} is an unsharded count already; there is nothing to merge. "
                "Use it as it is (optimize --counts)."
            )
        raise InputError(
            f"merge: {paths[0]} and {paths[1]} are both unsharded counts of the same data: they overlap, every record "
            f"would be counted twice. {FIX}."
        )
    parsed = [Shard.parse(s, flag=f"{p}: shard") for p, s in zip(paths, shards)]
    n = parsed[0].count
    for p, s in zip(paths, parsed):
        if s.count != n:
            raise InputError(
                f"merge: {paths[0]} and {p} differ in the number of shards: shard {parsed[0]} vs shard {s}. {FIX}; "
                f"merge the {n} files of --shard 0/{n} ... {n - 1}/{n}."
            )
    seen: Dict[int, str] = {}
    for p, s in zip(paths, parsed):
        if s.index in seen:
            raise InputError(
                f"merge: {seen[s.index]} and {p} are both shard {s}: they overlap, the records of shard {s} would be "
                f"counted twice. Pass each shard once."
            )
        seen[s.index] = p
    missing = [i for i in range(n) if i not in seen]
    if missing:
        have = ", ".join(f"{i}/{n}" for i in sorted(seen))
        need = ", ".join(f"{i}/{n}" for i in missing)
        raise InputError(
            f"merge: shard {need} {'is' if len(missing) == 1 else 'are'} missing (got {have}); the merge would leave "
            f"out their records. Count {'it' if len(missing) == 1 else 'them'} with `specforge-vocab count ... "
            f"--shard {missing[0]}/{n}` and pass every shard."
        )
    return n


def merge_counts(paths: Sequence[str]) -> "CountResult":
    """Sum the shard counts files ``paths`` (any order) into the result of an unsharded count."""

    if not paths:
        raise InputError("merge needs the counts files of every shard, but got none.")
    loaded = [load_counts(p, flag="merge input") for p in paths]
    for path, (_, meta) in zip(paths, loaded):
        if meta.get("format") != "specforge-vocab-counts":
            raise InputError(
                f"merge: {path} is not a counts file of `specforge-vocab count` (format "
                f"{meta.get('format')!r}, expected 'specforge-vocab-counts'). Pass the --output files of "
                "`specforge-vocab count --shard i/n`."
            )
        if "count_source" in meta:
            raise InputError(
                f"merge: {path} holds counts of {meta.get('source', 'prompts or feature files')}, which are counted "
                "whole (--shard splits --dataset-path records only); there is nothing to merge. Use it directly."
            )
        for key in ["files", "tokenizer_path", "records_read", "tokens_counted"] + [k for k, _ in SAME_FIELDS]:
            if key not in meta:
                raise InputError(
                    f"merge: {path} has no metadata field {key!r}; it was written by another tool or "
                    "version. Recount it with `specforge-vocab count`."
                )
    metadatas = [meta for _, meta in loaded]
    check_same_count(paths, metadatas)
    merge_shard_numbers([meta.get("shard", "") for meta in metadatas], paths)
    order = sorted(range(len(paths)), key=lambda i: Shard.parse(metadatas[i]["shard"]).index)
    parts = [CountResult.from_metadata(loaded[i][0], metadatas[i], source=paths[i]) for i in order]
    counts = np.zeros_like(parts[0].counts)
    for part in parts:
        counts += part.counts
    examples = sorted(
        ((i, m) for part in parts for i, m in zip(part.invalid_example_indices, part.invalid_examples)),
        key=lambda pair: pair[0],
    )[:5]
    first = parts[0]
    merged = CountResult(
        counts=counts,
        settings=replace(settings_from_metadata(metadatas[order[0]], source=paths[order[0]]), shard=None),
        tokenizer_length=first.tokenizer_length,
        records_read=sum(p.records_read for p in parts),
        records_counted=sum(p.records_counted for p in parts),
        records_skipped_empty=sum(p.records_skipped_empty for p in parts),
        records_invalid_skipped=sum(p.records_invalid_skipped for p in parts),
        invalid_examples=[m for _, m in examples],
        invalid_example_indices=[i for i, _ in examples],
        tokens_counted=sum(p.tokens_counted for p in parts),
        files=first.files,
        tokenizer_sha256=first.tokenizer_sha256,
        template_fields=first.template_fields,
    )
    check_not_empty(
        [str(f["path"]) for f in first.files],
        merged.records_read,
        merged.records_counted,
        merged.records_invalid_skipped,
    )
    return merged


def merge_to_file(paths: Sequence[str], *, output: str) -> "CountResult":
    """Merge ``paths`` (see :func:`merge_counts`) and write the counts file ``output`` atomically."""
    problem = output_file_problem(output)
    if problem:
        raise InputError(problem)
    result = merge_counts(paths)
    save_counts(output, result.counts, result.metadata())
    logger.info("wrote %s", output)
    return result
