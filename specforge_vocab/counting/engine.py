"""The counting engine: settings, and the streaming counter shared by every path.

:class:`Counter` takes records through render -> batch tokenize -> mask -> histogram; the
in-process path (count.py) and every worker process (workers.py) use it, so both count the same.
With ``--dataset-weight`` a record of a path weighted w adds its ids w times (counts stay int64, and
equal those of the training file with that path repeated w times). :class:`Tally` is the extension point for anything else computed from each record's masked ids in
the same pass (held-out splits and bootstrap replicates in choosing/holdout.py).

>>> add_ids(np.zeros(5, dtype=np.int64), np.array([1, 1, 4]))
array([0, 2, 0, 0, 1])
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.counting.data import RawRecord, ReadStats, Record, Shard, dataset_files
from specforge_vocab.counting.masking import MaskEngine, render_record
from specforge_vocab.counting.templates import canonical_template_name, get_template, template_names
from specforge_vocab.errors import InputError, SpecForgeVocabError, ValidatedSettings, must

logger = logging.getLogger(__name__)


# Bumped whenever a change to counting changes what is counted: cached counts then miss.
COUNTING_VERSION = "1"


# Records per chunk sent to a worker (also cut at CHUNK_BYTES of raw JSON).
CHUNK_RECORDS = 512


CHUNK_BYTES = 1 << 20


@dataclass
class CountSettings(ValidatedSettings):
    """What to count and how; one field per `specforge-vocab count` flag."""

    dataset_paths: List[str] = field(default_factory=list)
    dataset_weights: List[int] = field(default_factory=list)  # one per dataset path; empty: every weight 1
    tokenizer_path: str = ""
    chat_template: str = "llama3"
    max_length: int = 2048
    is_preformatted: bool = False
    train_only_last_turn: bool = False
    sample_size: Optional[int] = None
    target_vocab_size: Optional[int] = None
    skip_invalid: bool = False
    trust_remote_code: bool = False
    batch_size: int = 256
    num_workers: Optional[int] = None
    shard: Optional[str] = None

    def shard_spec(self) -> Optional[Shard]:
        """The parsed ``shard`` ("i/n"), or None when counting every record."""
        return None if self.shard in (None, "") else Shard.parse(self.shard)

    def problems(self) -> List[str]:
        out = []
        if not self.dataset_paths:
            out.append("--dataset-path must name at least one file or directory, but got none.")
        for path in self.dataset_paths:
            if not os.path.exists(path):
                out.append(f"--dataset-path {path} does not exist; check the path (relative to {os.getcwd()}).")
        out += self._weight_problems()
        if not self.tokenizer_path:
            out.append("--tokenizer-path must name the target model's tokenizer directory, but got nothing.")
        elif not os.path.isdir(self.tokenizer_path):
            out.append(
                f"--tokenizer-path {self.tokenizer_path} must be a directory holding tokenizer.json, but it "
                "does not exist. Point it at the target model's tokenizer folder."
            )
        if canonical_template_name(self.chat_template) not in template_names():
            out.append(must("--chat-template", f"one of {', '.join(template_names())}", self.chat_template))
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

    def _weight_problems(self) -> List[str]:
        if not self.dataset_weights:
            return []
        out = []
        if len(self.dataset_weights) != len(self.dataset_paths):
            out.append(
                must(
                    "--dataset-weight",
                    f"one weight per --dataset-path value ({len(self.dataset_paths)}, in the same order)",
                    list(self.dataset_weights),
                )
            )
        for weight in self.dataset_weights:
            if not is_whole_weight(weight):
                out.append(
                    must(
                        "--dataset-weight",
                        "whole numbers >= 1 (weight w counts each record of that path w times, as if the path "
                        "were repeated w times in SpecForge's single training file)",
                        weight,
                        "Scale fractional weights to whole numbers (0.5 and 1 -> 1 and 2).",
                    )
                )
        if not out:
            owners: Dict[str, str] = {}
            for path in self.dataset_paths:
                try:
                    files = dataset_files([path])
                except InputError:
                    continue  # reported above (missing path, empty directory)
                for file in files:
                    real = os.path.realpath(file)
                    if real in owners and owners[real] != path:
                        out.append(
                            f"--dataset-path names {file} twice (under {owners[real]} and {path}), but with "
                            "--dataset-weight every file must be named once so it has one weight. Give it "
                            "one path and one weight (the sum of the two)."
                        )
                    owners.setdefault(real, path)
        return out

    def file_weights(self) -> Optional[Dict[str, int]]:
        """{data file (as reading names it): weight} when a weight other than 1 was given, else None."""
        if not self.dataset_weights or all(int(w) == 1 for w in self.dataset_weights):
            return None
        return {
            file: int(weight)
            for path, weight in zip(self.dataset_paths, self.dataset_weights)
            for file in dataset_files([path])
        }


def is_whole_weight(value) -> bool:
    """True for a whole number >= 1 (an int, or a float such as 2.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return float(value) >= 1 and float(value).is_integer()


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

    def add_copies(self, record: Record, ids: np.ndarray, copies: int) -> None:
        """A record of a path weighted ``copies`` (--dataset-weight): by default it is added that many
        times, exactly as if it appeared that often in the data."""
        for _ in range(copies):
            self.add(record, ids)

    def fresh(self) -> "Tally":
        """An empty tally with the same settings (default: a deep copy; override if large)."""

        return copy.deepcopy(self)


class Counter:
    """Streams records through render -> batch tokenize -> mask -> histogram (and tallies).

    Errors come out in record order: before a record's error is raised, the records
    batched ahead of it are counted (and may raise first), so the first bad record
    in file order is always the one reported, however the records are batched.
    """

    def __init__(self, tokenizer, settings: CountSettings, *, vocab_size: int, tallies: Sequence[Tally] = ()):
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = get_template(settings.chat_template)
        self.engine = MaskEngine(
            tokenizer,
            max_length=settings.max_length,
            template=self.template,
            train_only_last_turn=settings.train_only_last_turn,
        )
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.weights = settings.file_weights()  # None: every record counts once
        self.tallies = list(tallies)
        self.records_read = 0
        self.records_counted = 0
        self.records_skipped_empty = 0
        self.tokens_counted = 0
        self._texts: List[str] = []
        self._records: List[Record] = []

    def _invalid(self, exc: InputError, index: int, stats: ReadStats) -> None:
        if not self.settings.skip_invalid:
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
        pieces: Dict[int, List[np.ndarray]] = {}  # weight -> masked ids of the records with that weight
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
            weight = self.weights.get(record.source, 1) if self.weights else 1
            for tally in self.tallies:
                if weight == 1:
                    tally.add(record, ids)
                else:
                    tally.add_copies(record, ids, weight)
            pieces.setdefault(weight, []).append(ids)
        self.records_counted += len(texts)
        for weight, group in pieces.items():
            joined = np.concatenate(group)
            self.tokens_counted += weight * int(joined.size)  # = counts.sum(): weighted
            if weight == 1:
                add_ids(self.counts, joined)
            elif joined.size:
                self.counts += weight * np.bincount(joined, minlength=V)[:V]


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
