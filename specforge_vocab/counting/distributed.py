"""Counting under torch.distributed: ranks split the records, counts are summed with all_reduce.

Under torchrun (or any initialised process group) rank r of w counts shard r/w of the records
(of shard i/n, when ``settings.shard`` is set: positions % (n*w) == i + n*r), and the counts,
record totals, skipped-record examples and tallies are summed over the ranks: every rank
returns the same :class:`CountResult`, equal to a single process's.

Errors never hang a rank. Each rank catches its own failure, tells the others through the
process group's store (so they stop counting within about a second), and then joins the
status exchange (``all_gather_object``); if any rank failed, every rank raises the first
failing rank's error with the same message (an :class:`InputError` for bad input).

All collectives run on a gloo group (a new one when the default group is NCCL), so this works
on CPU. Without a process group but with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) a gloo group is initialised here and destroyed when done, so the training script
can initialise its own afterwards. Without either, counting is the ordinary single-process one.

>>> rank_shard(None, 1, 4)
Shard(index=1, count=4)
>>> rank_shard(Shard(1, 2), 1, 3)
Shard(index=3, count=6)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.counting import cache
from specforge_vocab.counting.count import (
    CountResult,
    check_not_empty,
    count_dataset,
    count_records,
    report_skipped,
)
from specforge_vocab.counting.data import Shard
from specforge_vocab.counting.engine import CountAborted, CountSettings, Tally
from specforge_vocab.errors import InputError, SpecForgeVocabError

logger = logging.getLogger(__name__)


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


ABORT_POLL_SECONDS = 0.5


def rank_shard(shard: Optional[Shard], rank: int, world_size: int) -> Shard:
    """The records rank ``rank`` of ``world_size`` counts: its part of ``shard`` (or of everything)."""
    return (shard or Shard(0, 1)).split(rank, world_size)


class RankFailed(SpecForgeVocabError):
    """Another rank failed with something other than bad input (a bug, a crash); names that rank."""


@dataclass
class Session:
    """This process's place in a torch.distributed job and the gloo group our collectives use."""

    rank: int
    world_size: int
    group: Any = None  # None: the default group (already gloo)
    store: Any = None

    # -- collectives
    def all_gather_object(self, value: Any) -> List[Any]:
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def broadcast_object(self, value: Any, *, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def all_reduce_int64(self, array: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64).copy())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.numpy()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)

    # -- errors
    def agree(
        self, fn: Callable[[], Any], *, abort_key: Optional[str] = None, info: Callable[[Any], Any] = lambda value: None
    ) -> Tuple[Any, List[Any]]:
        """Run ``fn`` here, then exchange statuses: (fn's value, every rank's ``info(value)``).

        If any rank failed, every rank raises the first failing rank's error (same message). A
        failure here also sets ``abort_key`` in the store, so ranks still counting stop early.
        """
        value, status, error = None, None, None
        try:
            value = fn()
            status = ("ok", info(value))
        except CountAborted:
            status = ("aborted", None)
            logger.warning("rank %d stopped counting early: another rank failed", self.rank)
        except SpecForgeVocabError as exc:
            error, status = exc, ("input", str(exc))
        except Exception as exc:  # a bug or an environment failure: still join the exchange
            error, status = exc, ("crash", f"{type(exc).__name__}: {exc}")
            logger.error("rank %d failed:\n%s", self.rank, traceback.format_exc())
        if error is not None:
            self.signal(abort_key)
        statuses = self.all_gather_object(status)
        for r, (kind, detail) in enumerate(statuses):
            if kind in ("input", "crash"):
                if r == self.rank:
                    raise error
                if kind == "input":
                    raise InputError(detail)
                raise RankFailed(
                    f"rank {r} of {self.world_size} failed: {detail} (see that rank's log for the traceback)."
                )
        if any(kind == "aborted" for kind, _ in statuses):  # pragma: no cover - a stale abort flag
            raise RankFailed("a rank stopped counting because another signalled a failure that none reported.")
        return value, [detail for _, detail in statuses]

    def on_rank_zero(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``fn`` (e.g. writes the outputs); its return value (picklable) reaches every
        rank after it finished, and so does its error (every rank raises it)."""
        value, _ = self.agree(fn if self.rank == 0 else (lambda: None))
        return self.broadcast_object(value)

    def signal(self, key: Optional[str]) -> None:
        if key and self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(key, "1")

    def stop_flag(self, key: Optional[str]) -> Optional[Callable[[], bool]]:
        """A cheap ``stop()`` for the counting loop: True once another rank set ``key`` (polled at most
        every ABORT_POLL_SECONDS)."""
        if not key or self.store is None:
            return None
        store, last = self.store, [0.0]

        def stop() -> bool:
            now = time.monotonic()
            if now - last[0] < ABORT_POLL_SECONDS:
                return False
            last[0] = now
            try:
                return bool(store.check([key]))
            except Exception:  # pragma: no cover - a store that cannot be asked: count on
                return False

        return stop


_ACTIVE: Optional[Session] = None


def torchrun_environment() -> bool:
    return all(os.environ.get(name) for name in TORCHRUN_VARS)


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - private API moved: no early stop, still no hang
        return None


@contextlib.contextmanager
def distributed_session(*, timeout_s: float = 1800.0) -> Iterator[Optional[Session]]:
    """The distributed job this process is in, or None when it runs alone.

    Uses an initialised default group (adding a gloo group for our collectives when it is not gloo),
    else initialises gloo from torchrun's environment and destroys it on exit. Nested uses share one
    session. ``timeout_s`` is the collective timeout of a group created here.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        yield None
        return
    if not dist.is_available():  # pragma: no cover
        yield None
        return
    created_default = created_group = False
    group = None

    if not dist.is_initialized():
        if not torchrun_environment() or int(os.environ["WORLD_SIZE"]) <= 1:
            yield None
            return
        try:
            dist.init_process_group(backend="gloo", init_method="env://", timeout=timedelta(seconds=timeout_s))
        except Exception as exc:
            raise InputError(
                f"torchrun's environment (RANK={os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}) is set, "
                f"but a gloo process group cannot be started ({type(exc).__name__}: {exc}). Launch with torchrun, "
                "or unset these variables to count in one process."
            ) from None
        created_default = True
    if dist.get_world_size() <= 1:
        try:
            yield None
        finally:
            if created_default:
                dist.destroy_process_group()
        return
    if dist.get_backend() != "gloo":
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        created_group = True
    session = Session(rank=dist.get_rank(), world_size=dist.get_world_size(), group=group, store=_default_store())
    _ACTIVE = session
    try:
        yield session
    finally:
        _ACTIVE = None
        if created_group:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
        if created_default:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def on_rank_zero(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (every rank waits), returning its value on every rank; an error
    in ``fn`` is raised on every rank. Runs ``fn`` directly outside a distributed job."""
    with distributed_session() as session:
        if session is None:
            return fn()
        return session.on_rank_zero(fn)


def count_dataset_distributed(
    settings: CountSettings,
    *,
    progress: bool = False,
    tallies: Sequence[Tally] = (),
    cache_dir: Optional[str] = None,
    force: bool = False,
) -> CountResult:
    """``count_dataset(settings)`` split over the ranks of a torch.distributed job; same result on every rank.

    With ``cache_dir``, rank 0 looks the counts up in the counts cache (see counting/cache.py); a hit is
    sent to every rank, a miss is counted by all ranks and stored by rank 0. Outside a distributed
    job this is :func:`count_dataset` (or :func:`~specforge_vocab.counting.cache.cached_count`).
    """

    with distributed_session() as session:
        if session is None:
            if cache_dir is not None:
                return cache.cached_count(
                    settings, cache_dir=cache_dir, progress=progress, force=force, tallies=tallies
                )[0]
            return count_dataset(settings, progress=progress, tallies=tallies)
        show = progress and session.rank == 0
        session.agree(settings.validate)
        abort_key = session.broadcast_object(f"specforge_vocab/abort/{uuid.uuid4().hex}")
        fingerprint = memo = None
        if cache_dir is not None:

            def look_up():
                nonlocal fingerprint, memo
                memo = cache.memo_for(cache_dir)
                fingerprint = cache.counting_fingerprint(settings, memo=memo)
                if force or tallies:
                    return None
                hit = cache.load_cached(settings, cache.cache_entry_path(cache_dir, fingerprint), fingerprint, memo)
                memo.save()
                return None if hit is None else (hit.counts, hit.metadata())

            found = session.on_rank_zero(look_up)
            if found is not None:
                logger.info("counts cache hit (rank 0)")
                return CountResult.from_metadata(found[0], found[1], settings=settings, source="counts cache")
        mine = rank_shard(settings.shard_spec(), session.rank, session.world_size)

        def count_mine() -> CountResult:
            return count_records(
                settings,
                shard=mine,
                progress=show,
                tallies=tallies,
                check_empty=False,
                report=False,
                stop=session.stop_flag(abort_key),
            )

        local, identities = session.agree(
            count_mine, abort_key=abort_key, info=lambda r: (r.vocab_size, r.tokenizer_sha256, r.files)
        )
        _check_same_inputs(identities, session.rank)
        result = _sum_over_ranks(session, settings, local, tallies)
        if session.rank == 0:
            report_skipped(result)
        if cache_dir is not None:

            def store() -> None:
                cache.store_cached(cache.cache_entry_path(cache_dir, fingerprint), result, fingerprint)
                memo.save()

            session.on_rank_zero(store)
        return result


def _check_same_inputs(identities: List[Tuple[int, str, list]], rank: int) -> None:
    """Every rank must have counted the same data with the same tokenizer and V (else sums are meaningless)."""
    first = identities[0]
    for r, other in enumerate(identities[1:], start=1):
        for position, what in ((0, "vocabulary size V"), (1, "tokenizer (sha256 of its files)")):
            if other[position] != first[position]:
                raise InputError(
                    f"rank 0 and rank {r} counted with different {what}: {first[position]} vs "
                    f"{other[position]}. Every rank must see the same --tokenizer-path contents."
                )
        sums_0 = [(f["size"], f["sha256"]) for f in first[2]]
        sums_r = [(f["size"], f["sha256"]) for f in other[2]]
        if sums_0 != sums_r:
            raise InputError(
                f"rank 0 and rank {r} read different data files: {[f['path'] for f in first[2]]} vs "
                f"{[f['path'] for f in other[2]]} (sizes or sha256 differ). Every rank must read the "
                "same, unchanged --dataset-path files."
            )


def _sum_over_ranks(
    session: Session, settings: CountSettings, local: CountResult, tallies: Sequence[Tally]
) -> CountResult:
    counts = session.all_reduce_int64(local.counts)
    totals = session.all_reduce_int64(
        np.array(
            [
                local.records_read,
                local.records_counted,
                local.records_skipped_empty,
                local.records_invalid_skipped,
                local.tokens_counted,
            ],
            dtype=np.int64,
        )
    )
    gathered = session.all_gather_object(
        (
            list(zip(local.invalid_example_indices, local.invalid_examples)),
            local.tallies if tallies else [],
            local.files,
        )
    )
    examples = sorted((pair for ex, _, _ in gathered for pair in ex), key=lambda pair: pair[0])[:5]
    for r, (_, theirs, _) in enumerate(gathered):
        if r != session.rank:
            for mine, other in zip(local.tallies, theirs):
                mine.merge(other)
    records_read, records_counted, skipped_empty, invalid, tokens = (int(x) for x in totals)
    files = gathered[0][2]  # rank 0's paths, so every rank returns the same result
    check_not_empty([str(f["path"]) for f in files], records_read, records_counted, invalid)
    return CountResult(
        counts=counts,
        settings=settings,
        tokenizer_length=local.tokenizer_length,
        records_read=records_read,
        records_counted=records_counted,
        records_skipped_empty=skipped_empty,
        records_invalid_skipped=invalid,
        invalid_examples=[m for _, m in examples],
        invalid_example_indices=[i for i, _ in examples],
        tokens_counted=tokens,
        files=files,
        tallies=local.tallies,
        tokenizer_sha256=local.tokenizer_sha256,
        template_fields=local.template_fields,
    )
