"""Counting on every core: worker processes fed chunks of raw records through a bounded queue.

The parent only reads lines (no JSON decoding, no tokenizer) and sends chunks of raw
records (file, line, position, raw JSON text) to worker processes. Workers are forked
from a clean "forkserver" process that has imported transformers but never tokenized
(forking a process whose Rust tokenizer has started threads can deadlock), so only the
first pool of a process pays for the imports; "spawn" where there is no forkserver.
Each worker loads the tokenizer once, single-threaded, and counts a chunk with the same :class:`Counter`
as the in-process path, returning the chunk's counts sparsely (ids, counts), its
tallies and the messages of the invalid records it skipped. The parent merges chunks in
record order, so everything it reports is what the in-process path reports:

* the error of the first bad record in file order (a later chunk failing first waits
  for the earlier chunks still running, and a reading error in the parent counts as
  coming after every chunk already sent);
* ``--skip-invalid``'s count and its first examples, and the warnings, in order.

At most ``2 * workers + 2`` chunks are in flight or waiting to be merged, so memory does not grow with the data.
No worker outlives :func:`count_in_workers`: on success, error or interrupt the pool is
shut down and joined. Nor does one outlive the process that started it, even one killed with
SIGKILL (which runs no cleanup): each worker asks Linux for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``) and watches that parent and the starting process from a thread
(other systems too). The forkserver ends when every copy of the starting process's end of its
"alive" pipe is closed (the workers hold copies, so once they are gone), and multiprocessing's
resource tracker when the last process holding its pipe has gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.counting import engine
from specforge_vocab.counting.data import RawRecord, ReadStats, Shard, iter_raw_records
from specforge_vocab.counting.engine import CountAborted, Counter, CountSettings, Tally, Totals, resolve_vocab_size
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError, SpecForgeVocabError
from specforge_vocab.fileio import pid_alive

logger = logging.getLogger(__name__)


# (source, parsed, [(line, position, payload), ...]): one file's consecutive records.
Chunk = Tuple[str, bool, List[Tuple[int, int, Any]]]


def iter_chunks(
    raws: Iterator[RawRecord], *, records: Optional[int] = None, size: Optional[int] = None
) -> Iterator[Chunk]:
    """Group raw records into chunks of one file, at most ``records`` long or about ``size`` bytes
    (default: engine.CHUNK_RECORDS and CHUNK_BYTES)."""

    records = records or engine.CHUNK_RECORDS
    size = size or engine.CHUNK_BYTES
    source, parsed, items, used = None, False, [], 0
    for raw in raws:
        if items and (raw.source != source or len(items) >= records or used >= size):
            yield source, parsed, items
            items, used = [], 0
        source, parsed = raw.source, raw.parsed
        items.append((raw.line, raw.index, raw.payload))
        used += len(raw.payload) if isinstance(raw.payload, str) else 256
    if items:
        yield source, parsed, items


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk (counts as sorted ids and their counts)."""

    ids: np.ndarray
    counts: np.ndarray
    records_read: int = 0
    records_counted: int = 0
    records_skipped_empty: int = 0
    tokens_counted: int = 0
    skips: List[Tuple[int, str]] = field(default_factory=list)
    tallies: List[Tally] = field(default_factory=list)
    error: Optional[str] = None
    tokenizer_length: int = 0
    vocab_size: int = 0


class _SkipLog(ReadStats):
    """Keeps every skipped record (position, message) for the parent to replay in order."""

    def __init__(self) -> None:
        super().__init__()
        self.all: List[Tuple[int, str]] = []

    def skip(self, message: str, index: Optional[int] = None, *, log: bool = True) -> None:
        self.all.append((-1 if index is None else int(index), message))


_SETTINGS: Optional[CountSettings] = None


_TALLIES: List[Tally] = []


_COUNTER: Optional[Counter] = None


_FILL: Tuple[str, ...] = ()


# Linux prctl option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


# Seconds between two looks at whether the parent and the starting process still run.
PARENT_WATCH_INTERVAL = 0.5


def exit_with_parent(starter_pid: int) -> None:
    """End this process when its parent or the process ``starter_pid`` (which started the pool) ends.

    A worker blocks reading its task queue, whose writing end it holds itself, so without this a
    SIGKILL of the starting process leaves it waiting forever (and, holding the resource tracker's
    pipe, keeps that alive too).
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # best effort: the watching thread below covers the rest
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def gone() -> bool:
        return os.getppid() != parent or not pid_alive(starter_pid)

    if gone():  # the parent died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(PARENT_WATCH_INTERVAL)
        os._exit(1)

    threading.Thread(target=watch, name="specforge-vocab-parent-watch", daemon=True).start()


def _init_worker(
    settings: CountSettings, tallies: List[Tally], starter_pid: int, fill_columns: Sequence[str] = ()
) -> None:
    """Pool initializer: end with the starting process, and remember the settings; the tokenizer is
    loaded by the first chunk (so a tokenizer error comes back as that chunk's error message, not a
    broken pool)."""
    exit_with_parent(starter_pid)
    global _SETTINGS, _TALLIES, _FILL
    # One single-threaded tokenizer per worker; workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _SETTINGS, _TALLIES, _FILL = settings, list(tallies), tuple(fill_columns)


def _counter() -> Counter:
    global _COUNTER
    if _COUNTER is None:
        settings = _SETTINGS
        tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
        _COUNTER = Counter(
            tokenizer,
            settings,
            vocab_size=resolve_vocab_size(tokenizer, settings.target_vocab_size),
            fill_columns=_FILL,
        )
    return _COUNTER


def count_chunk(chunk: Chunk) -> ChunkResult:
    """Count one chunk in this worker; an InputError becomes ``error`` (records before it are counted)."""
    source, parsed, items = chunk
    skips = _SkipLog()
    try:
        counter = _counter()
    except SpecForgeVocabError as exc:
        return ChunkResult(np.zeros(0, np.int64), np.zeros(0, np.int64), error=str(exc))
    counter.records_read = counter.records_counted = counter.records_skipped_empty = counter.tokens_counted = 0
    counter.tallies = [t.fresh() for t in _TALLIES]
    error = None
    try:
        for line, index, payload in items:
            counter.add_raw(RawRecord(source, line, index, payload, parsed), skips)
        counter.flush()
    except InputError as exc:
        error = str(exc)
        counter._texts, counter._records = [], []
    ids = np.flatnonzero(counter.counts)
    values = counter.counts[ids].copy()
    counter.counts[ids] = 0
    return ChunkResult(
        ids,
        values,
        counter.records_read,
        counter.records_counted,
        counter.records_skipped_empty,
        counter.tokens_counted,
        skips.all,
        counter.tallies,
        error,
        len(counter.tokenizer),
        int(counter.counts.shape[0]),
    )


def worker_context():
    """The multiprocessing context for workers: forkserver (preloading transformers), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["specforge_vocab.counting._preload"])  # no effect once the server runs
        return context
    return multiprocessing.get_context("spawn")  # pragma: no cover - platforms without forkserver


def _merge(totals: Totals, result: ChunkResult, stats: ReadStats) -> None:
    if totals.counts is None:
        totals.counts = np.zeros(result.vocab_size, dtype=np.int64)
        totals.tokenizer_length = result.tokenizer_length
    totals.counts[result.ids] += result.counts
    totals.records_read += result.records_read
    totals.records_counted += result.records_counted
    totals.records_skipped_empty += result.records_skipped_empty
    totals.tokens_counted += result.tokens_counted
    for index, message in result.skips:
        stats.skip(message, index)
    for mine, theirs in zip(totals.tallies, result.tallies):
        mine.merge(theirs)


def count_in_workers(
    settings: CountSettings,
    files: Sequence[str],
    *,
    workers: int,
    shard: Optional[Shard],
    tallies: Sequence[Tally],
    stats: ReadStats,
    bar=None,
    stop: Optional[Callable[[], bool]] = None,
    fill_columns: Sequence[str] = (),
) -> Totals:
    """Count ``files`` with ``workers`` processes; see the module docstring for the guarantees.

    ``fill_columns``: columns each record lacking them gets as None (counting/columns.py)."""
    totals = Totals(tallies=list(tallies))
    templates = [t.fresh() for t in tallies]
    chunks = iter_chunks(iter_raw_records(files, sample_size=settings.sample_size, shard=shard, stats=stats))
    max_in_flight = 2 * workers + 2
    pending: Dict[Any, int] = {}
    finished: Dict[int, ChunkResult] = {}
    error: Optional[Tuple[int, BaseException]] = None  # (chunk number, error): the earliest wins
    sent = merged = 0
    exhausted = aborted = False
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=worker_context(),
        initializer=_init_worker,
        initargs=(settings, templates, os.getpid(), tuple(fill_columns)),
    )
    try:
        while True:
            while not exhausted and error is None and len(pending) + len(finished) < max_in_flight:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    exhausted = True
                    break
                except InputError as exc:  # a reading error comes after every chunk already sent
                    error, exhausted = (sent, exc), True
                    break
                pending[pool.submit(count_chunk, chunk)] = sent
                sent += 1
            if not pending:
                break
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                number = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise SpecForgeVocabError(
                        "A counting worker process died (killed for memory, or a crash; a script that starts "
                        'counting at its top level needs `if __name__ == "__main__":`). Rerun with '
                        "--num-workers 1 to count in this process, or with fewer workers."
                    ) from None
                finished[number] = result
                if result.error is not None and (error is None or number < error[0]):
                    error = (number, InputError(result.error))
            if error is not None:
                for future, number in list(pending.items()):
                    if number > error[0] and future.cancel():
                        del pending[future]
            while merged in finished and (error is None or merged < error[0]):
                result = finished.pop(merged)
                _merge(totals, result, stats)
                if bar is not None:
                    bar.update(result.records_read + len(result.skips))
                merged += 1
            if stop is not None and error is None and stop():
                aborted, exhausted = True, True
                for future in list(pending):
                    if future.cancel():
                        del pending[future]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error[1]
    if aborted:
        raise CountAborted("counting stopped: another rank failed")
    return totals
