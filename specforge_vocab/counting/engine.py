"""The counting engine: settings, and the streaming counter shared by every path.

:class:`Counter` takes records through render -> batch tokenize -> mask -> histogram; the
in-process path (count.py) and every worker process (workers.py) use it, so both count the same.
:class:`Tally` is the extension point for anything else computed from each record's masked ids in
the same pass (held-out splits and bootstrap replicates in choosing/holdout.py).

>>> add_ids(np.zeros(5, dtype=np.int64), np.array([1, 1, 4]))
array([0, 2, 0, 0, 1])
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from specforge_vocab.counting.data import RawRecord, ReadStats, Record, Shard
from specforge_vocab.counting.masking import MaskEngine, render_record
from specforge_vocab.counting.parsers import DatasetError
from specforge_vocab.counting.templates import ChatTemplate, resolve_template
from specforge_vocab.errors import InputError, SpecForgeVocabError, ValidatedSettings, must

logger = logging.getLogger(__name__)


# Bumped whenever a change to counting changes what is counted: cached counts then miss.
COUNTING_VERSION = "2"


# Records per chunk sent to a worker (also cut at CHUNK_BYTES of raw JSON).
CHUNK_RECORDS = 512


CHUNK_BYTES = 1 << 20


@dataclass
class CountSettings(ValidatedSettings):
    """What to count and how; one field per `specforge-vocab count` flag."""

    dataset_paths: List[str] = field(default_factory=list)
    tokenizer_path: str = ""
    chat_template: str = "llama3"
    chat_template_file: Optional[str] = None
    max_length: int = 2048
    is_preformatted: bool = False
    train_only_last_turn: bool = False
    sample_size: Optional[int] = None
    target_vocab_size: Optional[int] = None
    skip_invalid: bool = False
    trust_remote_code: bool = False
    # Read records as the older scripts/train_eagle3.py did (no flag: pre-step sets it): only conversations
    # and tools reach the parser, messages that are not objects are dropped.
    legacy_reader: bool = False
    batch_size: int = 256
    num_workers: Optional[int] = None
    shard: Optional[str] = None

    def shard_spec(self) -> Optional[Shard]:
        """The parsed ``shard`` ("i/n"), or None when counting every record."""
        return None if self.shard in (None, "") else Shard.parse(self.shard)

    def template(self) -> ChatTemplate:
        """The chat template: ``chat_template_file``'s when set, else SpecForge's ``chat_template``."""
        return resolve_template(self.chat_template, self.chat_template_file)

    def problems(self) -> List[str]:
        out = []
        if not self.dataset_paths:
            out.append("--dataset-path must name at least one file or directory, but got none.")
        for path in self.dataset_paths:
            if not os.path.exists(path):
                out.append(f"--dataset-path {path} does not exist; check the path (relative to {os.getcwd()}).")
        if not self.tokenizer_path:
            out.append("--tokenizer-path must name the target model's tokenizer directory, but got nothing.")
        elif not os.path.isdir(self.tokenizer_path):
            out.append(
                f"--tokenizer-path {self.tokenizer_path} must be a directory holding tokenizer.json, but it "
                "does not exist. Point it at the target model's tokenizer folder."
            )
        try:
            out.extend(self.template().problems())
        except InputError as exc:
            out.append(str(exc))
        if not isinstance(self.max_length, int) or self.max_length < 1:
            out.append(must("--max-length", "a positive integer", self.max_length))
        if self.sample_size is not None and (not isinstance(self.sample_size, int) or self.sample_size < 1):
            out.append(must("--sample-size", "a positive integer", self.sample_size))
        if self.target_vocab_size is not None and (
            not isinstance(self.target_vocab_size, int) or self.target_vocab_size < 1
        ):
            out.append(must("--target-vocab-size", "a positive integer", self.target_vocab_size))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            out.append(must("--batch-size", "a positive integer", self.batch_size))
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 1):
            out.append(must("--num-workers", "a positive integer (1 counts in this process)", self.num_workers))
        if self.shard not in (None, ""):
            try:
                Shard.parse(self.shard)
            except InputError as exc:
                out.append(str(exc))
        return out


def add_ids(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Add a histogram of ``ids`` to ``counts`` in place (and return it)."""
    if ids.size:
        counts += np.bincount(ids, minlength=counts.shape[0])[: counts.shape[0]]
    return counts


class Tally:
    """Something else computed from each counted record's masked ids, in the same pass.

    Subclasses (held-out splits, bootstrap replicates, per-shard stats) implement ``add``
    and ``merge``; a tally must be picklable and ``merge`` must be a sum (order-free), so
    worker processes and distributed ranks can each fill an empty copy (``fresh()``) and
    the parent merges them: with workers, one fresh copy per chunk of records, merged in
    record order; across ranks, in rank order.
    """

    def add(self, record: Record, ids: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, other: "Tally") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def fresh(self) -> "Tally":
        """An empty tally with the same settings (default: a deep copy; override if large)."""

        return copy.deepcopy(self)


class Counter:
    """Streams records through render -> batch tokenize -> mask -> histogram (and tallies).

    Errors come out in record order: before a record's error is raised, the records
    batched ahead of it are counted (and may raise first), so the first bad record
    in file order is always the one reported, however the records are batched.
    """

    def __init__(
        self,
        tokenizer,
        settings: CountSettings,
        *,
        vocab_size: int,
        tallies: Sequence[Tally] = (),
        fill_columns: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.fill_columns = tuple(fill_columns)
        self.settings = settings
        self.template = settings.template()
        self.engine = MaskEngine(
            tokenizer,
            max_length=settings.max_length,
            template=self.template,
            train_only_last_turn=settings.train_only_last_turn,
        )
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.tallies = list(tallies)
        self.records_read = 0
        self.records_counted = 0
        self.records_skipped_empty = 0
        self.tokens_counted = 0
        self._texts: List[str] = []
        self._records: List[Record] = []

    def _invalid(self, exc: InputError, index: int, stats: ReadStats) -> None:
        if not self.settings.skip_invalid or isinstance(exc, DatasetError):
            self.flush()  # an earlier record of the batch may be bad too: it goes first
            raise exc
        stats.skip(str(exc), index)

    def add_raw(self, raw: RawRecord, stats: ReadStats) -> None:
        """Decode a raw record (a malformed line is invalid) and add it."""
        try:
            record = raw.decode()
        except InputError as exc:
            self._invalid(exc, raw.index, stats)
            return
        self.add(record, stats)

    def add(self, record: Record, stats: ReadStats) -> None:
        self.records_read += 1
        try:
            text = render_record(
                record.data,
                template=self.template,
                tokenizer=self.tokenizer,
                is_preformatted=self.settings.is_preformatted,
                fill=self.fill_columns,
                legacy_reader=self.settings.legacy_reader,
                source=record.source,
                line=record.line,
            )
        except InputError as exc:
            self._invalid(exc, record.index, stats)
            return
        if text is None:
            self.records_skipped_empty += 1
            return
        self._texts.append(text)
        self._records.append(record)
        if len(self._texts) >= self.settings.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._texts:
            return
        texts, records = self._texts, self._records
        self._texts, self._records = [], []
        encodings = self.engine.encode_batch(texts)
        pieces = []
        V = self.counts.shape[0]
        for text, encoding, record in zip(texts, encodings, records):
            ids = self.engine.masked_ids(text, encoding)
            if ids.size and int(ids.max()) >= V:
                bad = int(ids.max())
                raise InputError(
                    f"{record.source}, line {record.line}: token id {bad} is at or above the vocabulary size "
                    f"V={V:,}. --target-vocab-size (or the draft config's vocab_size) must cover the tokenizer's "
                    f"{len(self.tokenizer):,} ids; raise it or use the target model's own tokenizer."
                )
            for tally in self.tallies:
                tally.add(record, ids)
            pieces.append(ids)
        self.records_counted += len(texts)
        if pieces:
            joined = np.concatenate(pieces)
            self.tokens_counted += int(joined.size)
            add_ids(self.counts, joined)


def resolve_vocab_size(tokenizer, target_vocab_size: Optional[int]) -> int:
    return int(target_vocab_size) if target_vocab_size else len(tokenizer)


class CountAborted(SpecForgeVocabError):
    """Counting stopped early because ``stop()`` said so (another rank failed)."""


@dataclass
class Totals:
    """What one counting pass (in-process, or all workers together) adds up to."""

    counts: Optional[np.ndarray] = None
    tokenizer_length: int = 0
    records_read: int = 0
    records_counted: int = 0
    records_skipped_empty: int = 0
    tokens_counted: int = 0
    tallies: List[Tally] = field(default_factory=list)
