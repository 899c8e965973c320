"""Count the loss-masked token ids of a dataset into a dense int64 array of length V.

>>> import numpy as np
>>> add_ids(np.zeros(5, dtype=np.int64), np.array([1, 1, 4]))
array([0, 2, 0, 0, 1])
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .data import ReadStats, Record, dataset_files, iter_records
from .errors import InputError, SettingsError, must
from .fileio import atomic_write, sha256_file
from .masking import MaskEngine, render_record
from .templates import canonical_template_name, get_template, template_names
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

COUNTS_TENSOR = "counts"
FORMAT_VERSION = "1"


@dataclass
class CountSettings:
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
            out.append(f"--tokenizer-path {self.tokenizer_path} must be a directory holding tokenizer.json, but it "
                       "does not exist. Point it at the target model's tokenizer folder.")
        if canonical_template_name(self.chat_template) not in template_names():
            out.append(must("--chat-template", f"one of {', '.join(template_names())}", self.chat_template))
        if not isinstance(self.max_length, int) or self.max_length < 1:
            out.append(must("--max-length", "a positive integer", self.max_length))
        if self.sample_size is not None and (not isinstance(self.sample_size, int) or self.sample_size < 1):
            out.append(must("--sample-size", "a positive integer", self.sample_size))
        if self.target_vocab_size is not None and (not isinstance(self.target_vocab_size, int) or self.target_vocab_size < 1):
            out.append(must("--target-vocab-size", "a positive integer", self.target_vocab_size))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            out.append(must("--batch-size", "a positive integer", self.batch_size))
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError(problems)

    @staticmethod
    def add_arguments(parser, *, datasets_required: bool = True) -> None:
        """The data and tokenizer flags (one per field), in argparse groups."""
        from .cli import positive_int

        data = parser.add_argument_group("data (what SpecForge trains on)")
        data.add_argument("--dataset-path", nargs="+", required=datasets_required, default=None, metavar="PATH",
                          help="dataset files (.jsonl, .json, optionally .gz) or directories, read in order")
        data.add_argument("--is-preformatted", action="store_true",
                          help="records hold rendered 'text' instead of 'conversations'")
        data.add_argument("--train-only-last-turn", action="store_true", help="count only the last assistant turn")
        data.add_argument("--sample-size", type=positive_int, default=None, help="count only the first N records")
        data.add_argument("--skip-invalid", action="store_true",
                          help="skip malformed records (reported) instead of stopping at the first")
        tok = parser.add_argument_group("tokenizer and template")
        tok.add_argument("--tokenizer-path", default=None, help="the target model's tokenizer directory")
        tok.add_argument("--chat-template", default="llama3", help="SpecForge chat template name (default llama3)")
        tok.add_argument("--max-length", type=positive_int, default=2048, help="truncation length (SpecForge: 2048)")
        tok.add_argument("--target-vocab-size", type=positive_int, default=None,
                         help="V, the target vocabulary size (default: the tokenizer's length)")
        tok.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer to run its own code")

    @classmethod
    def from_args(cls, args) -> "CountSettings":
        return cls(
            dataset_paths=list(args.dataset_path or []), tokenizer_path=args.tokenizer_path or "",
            chat_template=args.chat_template, max_length=args.max_length, is_preformatted=args.is_preformatted,
            train_only_last_turn=args.train_only_last_turn, sample_size=args.sample_size,
            target_vocab_size=args.target_vocab_size, skip_invalid=args.skip_invalid,
            trust_remote_code=args.trust_remote_code,
        )


@dataclass
class CountResult:
    """Counts plus what was read; ``metadata()`` is what the counts file stores."""

    counts: np.ndarray
    settings: CountSettings
    tokenizer_length: int
    records_read: int = 0
    records_counted: int = 0
    records_skipped_empty: int = 0
    records_invalid_skipped: int = 0
    invalid_examples: List[str] = field(default_factory=list)
    tokens_counted: int = 0
    files: List[Dict[str, object]] = field(default_factory=list)
    tallies: List["Tally"] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def unique_tokens(self) -> int:
        return int(np.count_nonzero(self.counts))

    def metadata(self) -> Dict[str, str]:
        s = self.settings
        return {
            "format": "specforge-vocab-counts",
            "format_version": FORMAT_VERSION,
            "tokenizer_path": os.path.abspath(s.tokenizer_path),
            "tokenizer_length": str(self.tokenizer_length),
            "vocab_size": str(self.vocab_size),
            "chat_template": s.chat_template,
            "max_length": str(s.max_length),
            "is_preformatted": json.dumps(s.is_preformatted),
            "train_only_last_turn": json.dumps(s.train_only_last_turn),
            "sample_size": json.dumps(s.sample_size),
            "files": json.dumps(self.files, ensure_ascii=False),
            "records_read": str(self.records_read),
            "records_counted": str(self.records_counted),
            "records_skipped_empty": str(self.records_skipped_empty),
            "records_invalid_skipped": str(self.records_invalid_skipped),
            "tokens_counted": str(self.tokens_counted),
            "unique_tokens": str(self.unique_tokens),
        }

    def summary_lines(self) -> List[str]:
        lines = [
            f"records read: {self.records_read:,}  counted: {self.records_counted:,}  "
            f"skipped (empty, as SpecForge): {self.records_skipped_empty:,}",
            f"loss-masked tokens counted: {self.tokens_counted:,}  unique ids: {self.unique_tokens:,} of V={self.vocab_size:,}",
        ]
        if self.records_invalid_skipped:
            lines.append(f"invalid records skipped (--skip-invalid): {self.records_invalid_skipped:,}")
            lines.extend(f"  e.g. {m}" for m in self.invalid_examples[:3])
        return lines


def add_ids(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Add a histogram of ``ids`` to ``counts`` in place (and return it)."""
    if ids.size:
        counts += np.bincount(ids, minlength=counts.shape[0])[: counts.shape[0]]
    return counts


def file_infos(paths: Sequence[str]) -> List[Dict[str, object]]:
    """Each dataset file with its size and sha256, in reading order."""
    return [{"path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": sha256_file(p)} for p in paths]


class Tally:
    """Something else computed from each counted record's masked ids, in the same pass.

    Subclasses (held-out splits, bootstrap replicates, per-shard stats) implement ``add``
    and ``merge``; a tally must be picklable and ``merge`` must be a sum, so workers can
    each fill an empty copy (``fresh()``) and the parent merges them in record order.
    """

    def add(self, record: Record, ids: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, other: "Tally") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def fresh(self) -> "Tally":
        """An empty tally with the same settings (default: a deep copy; override if large)."""
        import copy

        return copy.deepcopy(self)


class Counter:
    """Streams records through render -> batch tokenize -> mask -> histogram (and tallies)."""

    def __init__(self, tokenizer, settings: CountSettings, *, vocab_size: int, tallies: Sequence[Tally] = ()):
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = get_template(settings.chat_template)
        self.engine = MaskEngine(tokenizer, max_length=settings.max_length, template=self.template,
                                 train_only_last_turn=settings.train_only_last_turn)
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.tallies = list(tallies)
        self.records_read = 0
        self.records_counted = 0
        self.records_skipped_empty = 0
        self.tokens_counted = 0
        self._texts: List[str] = []
        self._records: List[Record] = []

    def add(self, record: Record, stats: ReadStats) -> None:
        self.records_read += 1
        try:
            text = render_record(record.data, template=self.template, tokenizer=self.tokenizer,
                                 is_preformatted=self.settings.is_preformatted, source=record.source, line=record.line)
        except InputError as exc:
            if not self.settings.skip_invalid:
                raise
            stats.skip(str(exc))
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


def count_dataset(settings: CountSettings, *, progress: bool = False, tallies: Sequence[Tally] = (),
                  records: Optional[Iterable[Record]] = None) -> CountResult:
    """Count ``settings.dataset_paths`` (or the given ``records``) and report what was read.

    ``tallies`` are filled in the same pass (see :class:`Tally`) and returned in ``result.tallies``.
    """
    settings.validate()
    files = dataset_files(settings.dataset_paths)
    tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
    vocab_size = resolve_vocab_size(tokenizer, settings.target_vocab_size)
    counter = Counter(tokenizer, settings, vocab_size=vocab_size, tallies=tallies)
    stats = ReadStats()
    if records is None:
        records = iter_records(files, sample_size=settings.sample_size, skip_invalid=settings.skip_invalid, stats=stats)
    bar = _progress_bar(progress, files, settings.sample_size)
    try:
        for record in records:
            counter.add(record, stats)
            if bar is not None:
                bar.update(1)
        counter.flush()
    finally:
        if bar is not None:
            bar.close()
    if counter.records_read == 0 or (counter.records_counted == 0 and stats.invalid_skipped == counter.records_read):
        raise InputError(
            f"--dataset-path {', '.join(files)}: no records to count (read {counter.records_read}, "
            f"{stats.invalid_skipped} invalid). Check that the files hold conversation records."
        )
    return CountResult(
        counts=counter.counts, settings=settings, tokenizer_length=len(tokenizer),
        records_read=counter.records_read, records_counted=counter.records_counted,
        records_skipped_empty=counter.records_skipped_empty, records_invalid_skipped=stats.invalid_skipped,
        invalid_examples=list(stats.examples), tokens_counted=counter.tokens_counted, files=file_infos(files),
        tallies=list(tallies),
    )


def _progress_bar(enabled: bool, files: Sequence[str], sample_size: Optional[int]):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
    return tqdm(total=sample_size, unit=" records", desc="counting", dynamic_ncols=True, mininterval=0.5,
                disable=None, leave=False)


def count_tokens(dataset_paths, tokenizer_path: str, *, chat_template: str, max_length: int = 2048,
                 is_preformatted: bool = False, train_only_last_turn: bool = False,
                 sample_size: Optional[int] = None, target_vocab_size: Optional[int] = None) -> np.ndarray:
    """Loss-masked token counts of a SpecForge dataset: int64 array of length V.

    ``dataset_paths`` is a path or a list of files/directories, read in order.
    """
    if isinstance(dataset_paths, (str, os.PathLike)):
        dataset_paths = [os.fspath(dataset_paths)]
    settings = CountSettings(
        dataset_paths=list(dataset_paths), tokenizer_path=os.fspath(tokenizer_path), chat_template=chat_template,
        max_length=max_length, is_preformatted=is_preformatted, train_only_last_turn=train_only_last_turn,
        sample_size=sample_size, target_vocab_size=target_vocab_size,
    )
    return count_dataset(settings).counts


# ---------------------------------------------------------------- counts files


def save_counts(path: str, counts: np.ndarray, metadata: Dict[str, str]) -> None:
    """Write ``counts`` (int64 [V]) and string metadata to a safetensors file, atomically."""
    from safetensors.numpy import save

    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, but got shape {counts.shape}")
    payload = save({COUNTS_TENSOR: counts}, metadata={k: str(v) for k, v in metadata.items()})
    atomic_write(path, payload)


def load_counts(path: str, *, flag: str = "--counts") -> Tuple[np.ndarray, Dict[str, str]]:
    """Read a counts file written by :func:`save_counts`; a bad file is a clear error."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise InputError(f"{flag} {path} does not exist. Write one with `specforge-vocab count ... --output {path}`.")
    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            if COUNTS_TENSOR not in handle.keys():
                raise InputError(
                    f"{flag} {path} must hold a tensor named 'counts', but it holds {list(handle.keys())}. "
                    "Use a file written by `specforge-vocab count`."
                )
            counts = handle.get_tensor(COUNTS_TENSOR)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{flag} {path} is not a readable safetensors file ({exc}). Recount with `specforge-vocab count`.") from None
    if counts.dtype != np.int64 or counts.ndim != 1:
        raise InputError(f"{flag} {path}: 'counts' must be int64 with shape [V], but got {counts.dtype} {list(counts.shape)}.")
    if (counts < 0).any():
        raise InputError(f"{flag} {path}: 'counts' must be non-negative, but holds negative values; the file is corrupt.")
    return counts, metadata
