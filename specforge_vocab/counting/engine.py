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

import contextlib
import copy
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.counting.data import RawRecord, ReadStats, Record, Shard, dataset_files
from specforge_vocab.counting.masking import MaskEngine, render_record
from specforge_vocab.counting.parsers import DatasetError
from specforge_vocab.counting.pretokenized import prompts_file_kind
from specforge_vocab.counting.templates import ChatTemplate, resolve_template, template_names
from specforge_vocab.counting.tokenizer import tokenizer_path_problem
from specforge_vocab.errors import InputError, SpecForgeVocabError, ValidatedSettings, is_int, must

logger = logging.getLogger(__name__)


# Bumped whenever a change to counting changes what is counted: cached counts then miss.
COUNTING_VERSION = "2"


# What to check when nothing was counted (optimize, trim, count).
NO_TOKENS = (
    "No loss-masked tokens were counted, so coverage is undefined. Check that the dataset has assistant "
    "replies, that --chat-template matches it, and that --max-length leaves room for them: SpecForge "
    "truncates each conversation to max_length tokens before the mask, so a long system prompt or first "
    "question can leave no reply inside it (raise --max-length, SpecForge's data.max_length)."
)


# Records per chunk sent to a worker (also cut at CHUNK_BYTES of raw JSON).
CHUNK_RECORDS = 512


CHUNK_BYTES = 1 << 20


# What the counts are of (--count-source): the data's loss-masked tokens, or the target's own argmax at
# the positions SpecForge trains on (offline features and the target's LM head; counting/target_counts.py).
COUNT_SOURCES = ("tokens", "target-argmax")


# Where the target's logits are computed (--device).
DEVICES = ("auto", "cpu", "cuda")


# The three data sources SpecForge trains from, by flag (exactly one is given).
DATA_FLAGS = ("--dataset-path", "--prompts-path", "--hidden-states-path")


@dataclass
class CountSettings(ValidatedSettings):
    """What to count and how; one field per `specforge-vocab count` flag."""

    dataset_paths: List[str] = field(default_factory=list)
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
    dataset_weights: List[int] = field(default_factory=list)  # one per dataset path; empty: every weight 1
    # SpecForge's other two data sources (instead of dataset_paths) and what to count from them
    prompts_path: Optional[str] = None
    hidden_states_path: Optional[str] = None
    count_source: str = "tokens"
    target_model_path: Optional[str] = None
    lm_head_key: str = "lm_head.weight"
    device: str = "auto"
    chat_template_file: Optional[str] = None  # a template registered in code: SpecForge's fields, JSON or YAML
    # Read records as the older scripts/train_eagle3.py did (no flag: pre-step sets it): only conversations
    # and tools reach the parser, messages that are not objects are dropped.
    legacy_reader: bool = False

    def shard_spec(self) -> Optional[Shard]:
        """The parsed ``shard`` ("i/n"), or None when counting every record."""
        return None if self.shard in (None, "") else Shard.parse(self.shard)

    def template(self) -> ChatTemplate:
        """The chat template: ``chat_template_file``'s when set, else SpecForge's ``chat_template``."""
        return resolve_template(self.chat_template, self.chat_template_file)

    @property
    def source_flag(self) -> str:
        """The data flag in use: --dataset-path, --prompts-path or --hidden-states-path."""
        if self.hidden_states_path:
            return "--hidden-states-path"
        return "--prompts-path" if self.prompts_path else "--dataset-path"

    @property
    def reads_conversations(self) -> bool:
        """True when records are rendered and tokenized: --dataset-path, or a --prompts-path whose first
        record has no input_ids/loss_mask (SpecForge then reads raw conversations). Pre-tokenized prompts
        and feature files hold token ids already."""
        if self.source_flag == "--prompts-path":
            with contextlib.suppress(InputError, OSError):
                return prompts_file_kind(self.prompts_path) == "conversations"
            return False
        return self.source_flag == "--dataset-path"

    def problems(self, *, vocab_size_known: bool = False) -> List[str]:
        """Every invalid field, named by its flag; ``vocab_size_known``: V comes from elsewhere (a checkpoint)."""
        out = self._source_problems() + self._weight_problems()
        self._prompts_kind(out)
        raw = self.reads_conversations
        if raw or self.tokenizer_path:
            out += self._tokenizer_problems()
        if not raw:
            out += self._raw_only_problems()
        if self.count_source not in COUNT_SOURCES:
            out.append(must("--count-source", f"one of {', '.join(COUNT_SOURCES)}", self.count_source))
        out += self._target_problems(vocab_size_known, raw)
        out += self._template_problems()
        for flag, value in (("--max-length", self.max_length), ("--batch-size", self.batch_size)):
            if not is_int(value) or value < 1:
                out.append(must(flag, "a positive integer", value))
        for flag, value in (("--sample-size", self.sample_size), ("--target-vocab-size", self.target_vocab_size)):
            if value is not None and (not is_int(value) or value < 1):
                out.append(must(flag, "a positive integer", value))
        if self.num_workers is not None and (not is_int(self.num_workers) or self.num_workers < 1):
            out.append(must("--num-workers", "a positive integer (1 counts in this process)", self.num_workers))
        for flag, value in (
            ("--is-preformatted", self.is_preformatted),
            ("--train-only-last-turn", self.train_only_last_turn),
            ("--skip-invalid", self.skip_invalid),
            ("--trust-remote-code", self.trust_remote_code),
        ):
            if not isinstance(value, bool):
                out.append(must(flag, "True or False", value))
        if self.shard not in (None, ""):
            try:
                Shard.parse(self.shard)
            except InputError as exc:
                out.append(str(exc))
            if not raw:
                out.append(f"--shard splits the records of --dataset-path; it cannot be used with {self.source_flag}.")
        return out

    def _source_problems(self) -> List[str]:
        paths = self.dataset_paths
        if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, (list, tuple)):
            return [must("--dataset-path", "a list of files or directories", paths)]
        if not all(isinstance(path, (str, os.PathLike)) for path in paths):
            return [must("--dataset-path", "a list of paths", paths)]
        given = [flag for flag, value in zip(DATA_FLAGS, self._sources()) if value]
        if len(given) != 1:
            return [
                "Exactly one of --dataset-path (raw conversations), --prompts-path (pre-tokenized input_ids and "
                "loss_mask) and --hidden-states-path (offline feature files), as SpecForge's data section has them, "
                f"must be given, but got {' and '.join(given) if given else 'none'}."
            ]
        out = []
        for path in self.dataset_paths:
            if not os.path.exists(path):
                out.append(f"--dataset-path {path} does not exist; check the path (relative to {os.getcwd()}).")
        for flag, path in (("--prompts-path", self.prompts_path), ("--hidden-states-path", self.hidden_states_path)):
            if path and not os.path.exists(path):
                out.append(f"{flag} {path} does not exist; check the path (relative to {os.getcwd()}).")
        return out

    def _template_problems(self) -> List[str]:
        if not isinstance(self.chat_template, str):
            return [must("--chat-template", f"one of {', '.join(template_names())}", self.chat_template)]
        if self.chat_template_file is not None and not isinstance(self.chat_template_file, (str, os.PathLike)):
            return [must("--chat-template-file", "a path to a JSON or YAML file", self.chat_template_file)]
        try:
            return self.template().problems()
        except InputError as exc:
            return [str(exc)]

    def _sources(self):
        return (self.dataset_paths, self.prompts_path, self.hidden_states_path)

    def _prompts_kind(self, out: List[str]) -> Optional[str]:
        """What --prompts-path holds (SpecForge decides from the first record); a problem is added to ``out``."""
        if not self.prompts_path or not os.path.isfile(self.prompts_path):
            return None
        try:
            kind = prompts_file_kind(self.prompts_path)
        except InputError as exc:
            out.append(str(exc))
            return None
        if kind == "empty":
            out.append(
                f"--prompts-path {self.prompts_path} holds no records; point it at the prompts file SpecForge trains on."
            )
        return kind

    def _raw_only_problems(self) -> List[str]:
        """Flags that shape how raw conversations are rendered mean nothing for token ids: refuse, never drop them."""
        defaults = CountSettings()
        raw_only = [
            ("--sample-size", "sample_size"),
            ("--is-preformatted", "is_preformatted"),
            ("--train-only-last-turn", "train_only_last_turn"),
            ("--skip-invalid", "skip_invalid"),
            ("--num-workers", "num_workers"),
            ("--chat-template-file", "chat_template_file"),
        ]
        given = [flag for flag, name in raw_only if getattr(self, name) != getattr(defaults, name)]
        if not given:
            return []
        return [
            f"{', '.join(given)} shape(s) how raw conversations are rendered, but {self.source_flag} holds token ids "
            "already; drop them (SpecForge ignores them for this source too)."
        ]

    def _tokenizer_problems(self) -> List[str]:
        if not isinstance(self.tokenizer_path, (str, os.PathLike)):
            return [must("--tokenizer-path", "a path", self.tokenizer_path)]
        if not self.tokenizer_path:
            return ["--tokenizer-path must name the target model's tokenizer directory, but got nothing."]
        problem = tokenizer_path_problem(self.tokenizer_path)
        return [problem] if problem else []

    def _target_problems(self, vocab_size_known: bool, reads_conversations: bool) -> List[str]:
        out = []
        if self.count_source == "target-argmax":
            if not self.hidden_states_path:
                out.append(
                    "--count-source target-argmax must read SpecForge's offline features (the target's hidden "
                    f"states), but got {self.source_flag}. Pass --hidden-states-path, or count --count-source tokens."
                )
            if not self.target_model_path:
                out.append(
                    "--count-source target-argmax must have the target's LM head, but got no --target-model-path. "
                    "Pass the target model's directory (only the LM head is read)."
                )
        if self.target_model_path and not self.hidden_states_path:
            out.append(
                f"--target-model-path is used with --hidden-states-path only (the target's argmax needs its hidden "
                f"states), but got {self.source_flag}. Drop it, or count offline features."
            )
        defaults = CountSettings()
        unused = [
            flag
            for flag, name in (("--lm-head-key", "lm_head_key"), ("--device", "device"))
            if getattr(self, name) != getattr(defaults, name) and not self.target_model_path
        ]
        if unused:
            out.append(
                f"{' and '.join(unused)} apply to the target's LM head, but got no --target-model-path; drop them."
            )
        if not isinstance(self.lm_head_key, str) or not self.lm_head_key:
            out.append(must("--lm-head-key", "a tensor name such as lm_head.weight", self.lm_head_key))
        if self.device not in DEVICES:
            out.append(must("--device", f"one of {', '.join(DEVICES)}", self.device))
        elif self.device == "cuda" and self.target_model_path:
            import torch

            if not torch.cuda.is_available():
                out.append(
                    "--device cuda must have a CUDA GPU that torch can see, but none is available. Use --device cpu."
                )
        needs_vocab = not (
            vocab_size_known
            or reads_conversations
            or self.target_vocab_size
            or self.tokenizer_path
            or self.target_model_path
        )
        if needs_vocab:
            out.append(
                f"{self.source_flag} holds token ids only, so the vocabulary size V must come from elsewhere, but got "
                "none. Pass --target-vocab-size, --config-path (the draft config's vocab_size), --tokenizer-path or "
                "--target-model-path."
            )
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


def add_ids(counts: np.ndarray, ids: np.ndarray, weight: int = 1) -> np.ndarray:
    """Add ``weight`` times a histogram of ``ids`` to ``counts`` in place (and return it)."""
    if ids.size:
        histogram = np.bincount(ids, minlength=counts.shape[0])[: counts.shape[0]]
        counts += histogram if weight == 1 else weight * histogram
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
        self.weights = settings.file_weights()  # None: every record counts once
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
            add_ids(self.counts, joined, weight)


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
