"""Counting SpecForge's already-tokenized sources: pre-tokenized prompts (``--prompts-path``) and
offline feature files (``--hidden-states-path``), across ranks when asked.

Prompts give the data tokens. Feature files give the data tokens (SpecForge's own builder rule)
and, with the target's LM head (``--target-model-path``), the target's argmax at every position
training puts loss on (counting/features.py, counting/target_counts.py), in the same pass over
the files. :func:`count_tokenized` returns the counts ``--count-source`` names plus every source
it counted, for the coverage report. Record/file ``i`` goes to rank ``i % world_size``; the
ranks' counts are summed with all_reduce, and an error on any rank is raised on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
from tqdm import tqdm

from specforge_vocab.counting.cache import FINGERPRINT_KEY, cache_entry_path, canonical_json
from specforge_vocab.counting.count import available_cores
from specforge_vocab.counting.counts_file import FORMAT_VERSION, read_counts_file, save_counts
from specforge_vocab.counting.distributed import distributed_session
from specforge_vocab.counting.engine import COUNTING_VERSION, CountAborted, CountSettings
from specforge_vocab.counting.features import iter_feature_samples, list_feature_files
from specforge_vocab.counting.pretokenized import count_masked_ids, iter_prompt_records
from specforge_vocab.counting.target_counts import ArgmaxCounter, TargetArgmax, full_precision_matmul, resolve_device
from specforge_vocab.counting.target_head import TargetHead, head_file_identity, load_target_head
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError

logger = logging.getLogger(__name__)


SOURCE_NAMES = {"--prompts-path": "pre-tokenized prompts", "--hidden-states-path": "offline feature files"}


@dataclasses.dataclass
class TokenizedCount:
    """Counts by count source ("tokens", and "target-argmax" when the target's head was given), the
    metadata a counts file stores, and what was read."""

    by_source: Dict[str, np.ndarray]
    count_source: str
    metadata: Dict[str, str]
    records: int
    cache_hit: bool = False

    @property
    def counts(self) -> np.ndarray:
        return self.by_source[self.count_source]

    def summary_lines(self) -> List[str]:
        return summary_lines(self.metadata)


def summary_lines(metadata: Dict[str, str]) -> List[str]:
    """What a count of prompts or features read, from its counts file metadata."""
    tokens = int(metadata.get("data_tokens", metadata.get("tokens_counted", 0)))
    lines = [
        f"{metadata.get('source', 'data')}: {int(metadata.get('records_counted', 0)):,} records; loss-masked "
        f"tokens counted: {tokens:,}  unique ids: {int(metadata.get('data_unique_tokens', 0)):,} of "
        f"V={int(metadata.get('vocab_size', 0)):,}"
    ]
    if "target_positions" in metadata:
        lines.append(
            f"target argmax at the trained positions: {int(metadata['target_positions']):,} positions  unique ids: "
            f"{int(metadata.get('target_unique_ids', 0)):,}  (LM head {metadata.get('lm_head_key')} of "
            f"{metadata.get('target_model_path')})"
        )
    lines.append(f"counts used for the choice: {metadata.get('count_source', 'tokens')}")
    return lines


def vocab_size_for(settings: CountSettings, head: Optional[TargetHead]) -> int:
    """V: --target-vocab-size, else the LM head's rows, else the tokenizer's length."""
    if head is not None:
        if settings.target_vocab_size is not None and settings.target_vocab_size != head.vocab_size:
            raise InputError(
                f"The target's LM head ({head.file}, {head.key!r}) has {head.vocab_size:,} rows, but the vocabulary "
                f"size is {settings.target_vocab_size:,} (--target-vocab-size or the draft config's vocab_size). "
                "SpecForge's t2d has one entry per LM-head row; make them agree."
            )
        return head.vocab_size
    if settings.target_vocab_size is not None:
        return int(settings.target_vocab_size)
    return len(load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code))


def _files(settings: CountSettings, field: str) -> List[str]:
    if settings.hidden_states_path:
        return list_feature_files(settings.hidden_states_path, field=field)
    return [os.path.abspath(settings.prompts_path)]


def _device(settings: CountSettings) -> str:
    device = resolve_device(settings.device)
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local_rank)}" if device == "cuda" and local_rank else device


def _count_here(
    settings: CountSettings,
    head: Optional[TargetHead],
    vocab_size: int,
    *,
    field: str,
    rank: int = 0,
    world_size: int = 1,
    stop: Optional[Callable[[], bool]] = None,
    progress: bool = False,
) -> np.ndarray:
    """This rank's counts: [tokens V | target argmax V (with a head) | records, positions]."""
    records = 0
    argmax = None
    bar = (
        tqdm(unit=" positions", desc="target argmax", dynamic_ncols=True, disable=None, leave=False)
        if progress and head
        else None
    )

    def stopped() -> None:
        if stop is not None and stop():
            raise CountAborted("another rank failed")

    def prompt_ids() -> Iterator[np.ndarray]:
        nonlocal records
        for ids in iter_prompt_records(
            settings.prompts_path, settings.max_length, vocab_size=vocab_size, rank=rank, world_size=world_size
        ):
            stopped()
            records += 1
            yield ids

    def feature_ids() -> Iterator[np.ndarray]:
        nonlocal records
        for sample in iter_feature_samples(
            settings.hidden_states_path,
            settings.max_length,
            vocab_size=vocab_size,
            rank=rank,
            world_size=world_size,
            hidden=argmax is not None,
            field=field,
        ):
            stopped()
            if argmax is not None:
                argmax.add(sample.teacher_hidden, source=sample.path)
            records += 1
            yield sample.masked_ids

    try:
        if settings.prompts_path:
            tokens = count_masked_ids(prompt_ids(), vocab_size)
        else:
            if head is not None:
                engine = TargetArgmax(head.weight, device=_device(settings))
                argmax = ArgmaxCounter(engine, progress=bar)
            threads = available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            with full_precision_matmul(max(1, threads)):
                tokens = count_masked_ids(feature_ids(), vocab_size)
                if argmax is not None:
                    argmax.flush()
    finally:
        if bar is not None:
            bar.close()
    parts = [tokens] + ([argmax.counts] if argmax is not None else [])
    positions = argmax.positions if argmax is not None else 0
    return np.concatenate(parts + [np.array([records, positions], dtype=np.int64)])


def _metadata(
    settings: CountSettings, by_source: Dict[str, np.ndarray], records: int, head: Optional[TargetHead], field: str
) -> Dict[str, str]:
    paths = _files(settings, field)
    data_path = settings.hidden_states_path or settings.prompts_path
    chosen = by_source[settings.count_source]
    metadata = {
        "format": "specforge-vocab-counts",
        "format_version": FORMAT_VERSION,
        "source": f"{field} ({SOURCE_NAMES[settings.source_flag]})",
        "data_path": os.path.abspath(data_path),
        "files": json.dumps([{"path": p, "size": os.path.getsize(p)} for p in paths], ensure_ascii=False),
        "max_length": str(settings.max_length),
        "vocab_size": str(int(chosen.shape[0])),
        "count_source": settings.count_source,
        "records_counted": str(records),
        "tokens_counted": str(int(chosen.sum())),
        "unique_tokens": str(int(np.count_nonzero(chosen))),
        "data_tokens": str(int(by_source["tokens"].sum())),
        "data_unique_tokens": str(int(np.count_nonzero(by_source["tokens"]))),
    }
    if head is not None:
        metadata.update(
            target_positions=str(int(by_source["target-argmax"].sum())),
            target_unique_ids=str(int(np.count_nonzero(by_source["target-argmax"]))),
            target_model_path=head.model_dir,
            lm_head_key=head.key,
            lm_head_file=head.file,
            lm_head_dtype=head.stored_dtype,
            target_rule="argmax of bf16(W[v] . hidden_state[t+1]) at t with loss_mask[t] != 0, t < min(L, max_length) - 1",
        )
    return metadata


def tokenized_fingerprint(settings: CountSettings, field: str) -> Dict[str, object]:
    """What decides the counts of prompts or features: the files by path, size and mtime (the identity
    SpecForge gives features), max_length, V, the count source and the LM head's file and key."""
    files = []
    for path in _files(settings, field):
        stat = os.stat(path)
        files.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    head = None
    if settings.hidden_states_path and settings.target_model_path:
        head = head_file_identity(settings.target_model_path, settings.lm_head_key)
    return {
        "kind": "specforge-vocab-tokenized",
        "counting_version": COUNTING_VERSION,
        "source": settings.source_flag,
        "files": files,
        "max_length": int(settings.max_length),
        "target_vocab_size": settings.target_vocab_size,
        "count_source": settings.count_source,
        "target_head": head,
    }


def _cached(path: str, fingerprint: Dict[str, object], count_source: str) -> Optional[TokenizedCount]:
    if not os.path.isfile(path):
        return None
    try:
        counts, metadata, companions = read_counts_file(path, flag="cache entry")
    except InputError as exc:
        logger.warning("ignoring unreadable cache entry (%s); recounting", exc)
        return None
    if metadata.get(FINGERPRINT_KEY) != canonical_json(fingerprint):
        return None
    by_source = companions or {count_source: counts}
    return TokenizedCount(by_source, count_source, metadata, int(metadata.get("records_counted", 0)), cache_hit=True)


def count_tokenized(
    settings: CountSettings,
    *,
    distributed: bool = False,
    progress: bool = False,
    field: Optional[str] = None,
    cache_dir: Optional[str] = None,
    force: bool = False,
) -> TokenizedCount:
    """Counts of ``settings.prompts_path`` or ``settings.hidden_states_path`` (see the module docstring).

    ``field`` names the source in messages and metadata (default: its flag, e.g. --hidden-states-path;
    prepare passes data.hidden_states_path). ``distributed`` splits the files over the ranks of a
    torch.distributed job; every rank returns the same result. ``cache_dir`` (one process only) reuses
    and stores the counts under ``<cache_dir>/counts/`` by :func:`tokenized_fingerprint`; ``force`` recounts.
    """
    settings.validate()
    field = field or settings.source_flag
    entry = fingerprint = None
    if cache_dir is not None and not distributed:
        fingerprint = tokenized_fingerprint(settings, field)
        entry = cache_entry_path(cache_dir, fingerprint)
        hit = None if force else _cached(entry, fingerprint, settings.count_source)
        if hit is not None:
            return hit
    counted = _count(settings, distributed=distributed, progress=progress, field=field)
    if entry is not None and tokenized_fingerprint(settings, field) == fingerprint:  # unchanged while counted
        metadata = dict(counted.metadata, **{FINGERPRINT_KEY: canonical_json(fingerprint)})
        try:
            save_counts(entry, counted.counts, metadata, counted.by_source)
        except InputError as exc:
            logger.warning("could not store the counts cache entry: %s", exc)
    return counted


def _count(settings: CountSettings, *, distributed: bool, progress: bool, field: str) -> TokenizedCount:
    head = None
    if settings.hidden_states_path and settings.target_model_path:
        head = load_target_head(settings.target_model_path, settings.lm_head_key)
    vocab_size = vocab_size_for(settings, head)
    with distributed_session() as session:
        if not distributed or session is None:
            total = _count_here(settings, head, vocab_size, field=field, progress=progress)
        else:
            key = session.broadcast_object(f"specforge_vocab/tokenized-abort/{uuid.uuid4().hex}")
            local, _ = session.agree(
                lambda: _count_here(
                    settings,
                    head,
                    vocab_size,
                    field=field,
                    rank=session.rank,
                    world_size=session.world_size,
                    stop=session.stop_flag(key),
                    progress=progress and session.rank == 0,
                ),
                abort_key=key,
            )
            total = session.all_reduce_int64(local)
    by_source = {"tokens": total[:vocab_size].copy()}
    if head is not None:
        by_source["target-argmax"] = total[vocab_size : 2 * vocab_size].copy()
    records = int(total[-2])
    data_path = settings.hidden_states_path or settings.prompts_path
    if records == 0 or by_source["tokens"].sum() == 0:
        raise InputError(
            f"{field} {data_path}: no loss-masked tokens to count ({records} records read), so SpecForge would "
            "train on nothing. Check that loss_mask marks the assistant tokens, or point at the right data."
        )
    if head is not None and by_source["target-argmax"].sum() == 0:
        raise InputError(
            f"{field} {data_path}: no position SpecForge trains on (every loss-masked position is the last of its "
            "sample), so there is no target argmax to count. Check the features' loss_mask."
        )
    return TokenizedCount(
        by_source, settings.count_source, _metadata(settings, by_source, records, head, field), records
    )
