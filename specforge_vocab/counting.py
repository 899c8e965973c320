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

from .data import RawRecord, ReadStats, Record, Shard, dataset_files, iter_raw_records
from .errors import InputError, SpecForgeVocabError, ValidatedSettings, must
from .fileio import atomic_write, sha256_file
from .masking import MaskEngine, render_record
from .templates import canonical_template_name, get_template, template_names
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

COUNTS_TENSOR = "counts"
FORMAT_VERSION = "1"
# Bumped whenever a change to counting changes what is counted: cached counts then miss.
COUNTING_VERSION = "1"
# Below this much data (bytes read by one shard) an automatic --num-workers counts in-process:
# starting workers (each imports transformers and loads the tokenizer) costs a few seconds.
AUTO_WORKERS_MIN_BYTES = 4 << 20
AUTO_WORKERS_MIN_RECORDS = 5000
# Records per chunk sent to a worker (also cut at CHUNK_BYTES of raw JSON).
CHUNK_RECORDS = 512
CHUNK_BYTES = 1 << 20


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
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 1):
            out.append(must("--num-workers", "a positive integer (1 counts in this process)", self.num_workers))
        if self.shard not in (None, ""):
            try:
                Shard.parse(self.shard)
            except InputError as exc:
                out.append(str(exc))
        return out

    @staticmethod
    def add_arguments(parser, *, datasets_required: bool = True, shard: bool = True) -> None:
        """The data, tokenizer and parallelism flags (one per field), in argparse groups.

        ``shard=False`` leaves out ``--shard`` (for commands that need every record, e.g. optimize).
        """
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
        par = parser.add_argument_group("parallelism")
        par.add_argument("--num-workers", type=positive_int, default=None,
                         help="worker processes counting in parallel (default: one per core, or in this process "
                              "for small data; 1 = count in this process)")
        if shard:
            par.add_argument("--shard", default=None, metavar="I/N",
                             help="count only the I-th of N deterministic shards of the records (0-based: record "
                                  "position %% N == I, after --sample-size); merge the N files with "
                                  "`specforge-vocab merge`")

    @classmethod
    def from_args(cls, args) -> "CountSettings":
        return cls(
            dataset_paths=list(args.dataset_path or []), tokenizer_path=args.tokenizer_path or "",
            chat_template=args.chat_template, max_length=args.max_length, is_preformatted=args.is_preformatted,
            train_only_last_turn=args.train_only_last_turn, sample_size=args.sample_size,
            target_vocab_size=args.target_vocab_size, skip_invalid=args.skip_invalid,
            trust_remote_code=args.trust_remote_code, num_workers=getattr(args, "num_workers", None),
            shard=getattr(args, "shard", None),
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
    invalid_example_indices: List[int] = field(default_factory=list)
    tokenizer_sha256: str = ""

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
            "tokenizer_sha256": self.tokenizer_sha256,
            "tokenizer_length": str(self.tokenizer_length),
            "vocab_size": str(self.vocab_size),
            "chat_template": s.chat_template,
            "max_length": str(s.max_length),
            "is_preformatted": json.dumps(s.is_preformatted),
            "train_only_last_turn": json.dumps(s.train_only_last_turn),
            "sample_size": json.dumps(s.sample_size),
            "skip_invalid": json.dumps(s.skip_invalid),
            "shard": "" if s.shard in (None, "") else str(Shard.parse(s.shard)),
            "files": json.dumps(self.files, ensure_ascii=False),
            "records_read": str(self.records_read),
            "records_counted": str(self.records_counted),
            "records_skipped_empty": str(self.records_skipped_empty),
            "records_invalid_skipped": str(self.records_invalid_skipped),
            "invalid_examples": json.dumps([[i, m] for i, m in zip(self.invalid_example_indices, self.invalid_examples)],
                                           ensure_ascii=False),
            "tokens_counted": str(self.tokens_counted),
            "unique_tokens": str(self.unique_tokens),
        }

    @classmethod
    def from_metadata(cls, counts: np.ndarray, metadata: Dict[str, str], *,
                      settings: Optional[CountSettings] = None, source: str = "counts file") -> "CountResult":
        """Rebuild a result from a counts file (``settings`` default: those the metadata records).

        Raises InputError naming ``source`` and the field when the metadata lacks one.
        """
        try:
            examples = json.loads(metadata.get("invalid_examples") or "[]")
            result = cls(
                counts=counts, settings=settings if settings is not None else settings_from_metadata(metadata, source=source),
                tokenizer_length=int(metadata["tokenizer_length"]),
                records_read=int(metadata["records_read"]), records_counted=int(metadata["records_counted"]),
                records_skipped_empty=int(metadata["records_skipped_empty"]),
                records_invalid_skipped=int(metadata["records_invalid_skipped"]),
                invalid_examples=[str(m) for _, m in examples], invalid_example_indices=[int(i) for i, _ in examples],
                tokens_counted=int(metadata["tokens_counted"]), files=json.loads(metadata["files"]),
                tokenizer_sha256=metadata.get("tokenizer_sha256", ""),
            )
        except KeyError as exc:
            raise InputError(f"{source}: metadata field {exc.args[0]!r} is missing; the file was not written by "
                             "`specforge-vocab count` (or by an older version). Recount it.") from None
        except (ValueError, TypeError) as exc:
            raise InputError(f"{source}: the metadata is malformed ({exc}); the file is corrupt. Recount it.") from None
        return result

    def summary_lines(self) -> List[str]:
        lines = [
            f"records read: {self.records_read:,}  counted: {self.records_counted:,}  "
            f"skipped (empty, as SpecForge): {self.records_skipped_empty:,}",
            f"loss-masked tokens counted: {self.tokens_counted:,}  unique ids: {self.unique_tokens:,} of V={self.vocab_size:,}",
        ]
        shard = self.settings.shard_spec()
        if shard is not None:
            lines.insert(0, f"shard {shard} (records at position % {shard.count} == {shard.index}; "
                            "`specforge-vocab merge` sums the shards)")
        if self.records_invalid_skipped:
            lines.append(f"invalid records skipped (--skip-invalid): {self.records_invalid_skipped:,}")
            lines.extend(f"  e.g. {m}" for m in self.invalid_examples[:3])
        return lines


def settings_from_metadata(metadata: Dict[str, str], *, source: str = "counts file") -> CountSettings:
    """The CountSettings a counts file was written with (dataset paths = its files, in order)."""
    try:
        return CountSettings(
            dataset_paths=[str(f["path"]) for f in json.loads(metadata["files"])],
            tokenizer_path=metadata["tokenizer_path"], chat_template=metadata["chat_template"],
            max_length=int(metadata["max_length"]), is_preformatted=bool(json.loads(metadata["is_preformatted"])),
            train_only_last_turn=bool(json.loads(metadata["train_only_last_turn"])),
            sample_size=json.loads(metadata.get("sample_size") or "null"),
            skip_invalid=bool(json.loads(metadata.get("skip_invalid") or "false")),
            shard=metadata.get("shard") or None,
        )
    except KeyError as exc:
        raise InputError(f"{source}: metadata field {exc.args[0]!r} is missing; the file was not written by "
                         "`specforge-vocab count` (or by an older version). Recount it.") from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: the metadata is malformed ({exc}); the file is corrupt. Recount it.") from None


def add_ids(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Add a histogram of ``ids`` to ``counts`` in place (and return it)."""
    if ids.size:
        counts += np.bincount(ids, minlength=counts.shape[0])[: counts.shape[0]]
    return counts


def file_infos(paths: Sequence[str], *, sha256: Callable[[str], str] = sha256_file) -> List[Dict[str, object]]:
    """Each dataset file with its size and sha256, in reading order (``sha256`` may be memoised)."""
    return [{"path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": sha256(p)} for p in paths]


# Files of a tokenizer directory that decide how it tokenizes and renders (weights never are).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "tiktoken.model")


def tokenizer_files(path: str, *, trust_remote_code: bool = False) -> List[str]:
    """The files of ``path`` that identify its tokenizer (its own .py code too under trust_remote_code)."""
    names = set(TOKENIZER_FILES)
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return []
    out = []
    for name in entries:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name in names or name.endswith(".tiktoken") or (trust_remote_code and name.endswith(".py")):
            out.append(full)
    return out


def tokenizer_sha256(path: str, *, trust_remote_code: bool = False, sha256: Callable[[str], str] = sha256_file) -> str:
    """One sha256 over the tokenizer's identifying files (names and contents), independent of where it lives."""
    import hashlib

    digest = hashlib.sha256()
    for full in tokenizer_files(path, trust_remote_code=trust_remote_code):
        digest.update(f"{os.path.basename(full)}\0{sha256(full)}\n".encode("utf-8"))
    return digest.hexdigest()


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
        import copy

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
            text = render_record(record.data, template=self.template, tokenizer=self.tokenizer,
                                 is_preformatted=self.settings.is_preformatted, source=record.source, line=record.line)
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


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(settings: CountSettings, files: Sequence[str], shard: Optional[Shard] = None) -> int:
    """``settings.num_workers`` if set; else one per core (shared among the torchrun ranks of this
    node, LOCAL_WORLD_SIZE), or 1 (in-process) when the data one shard reads is small."""
    if settings.num_workers is not None:
        return int(settings.num_workers)
    cores = available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if cores <= 1:
        return 1
    parts = shard.count if shard is not None else 1
    if settings.sample_size is not None and settings.sample_size / parts < AUTO_WORKERS_MIN_RECORDS:
        return 1
    size = 0
    for path in files:
        try:
            size += os.path.getsize(path) * (4 if path.endswith(".gz") else 1)
        except OSError:
            pass
    return 1 if size / parts < AUTO_WORKERS_MIN_BYTES else cores


class CountAborted(SpecForgeVocabError):
    """Counting stopped early because ``stop()`` said so (another rank failed)."""


def count_dataset(settings: CountSettings, *, progress: bool = False, tallies: Sequence[Tally] = (),
                  records: Optional[Iterable[Record]] = None, sha256: Callable[[str], str] = sha256_file,
                  stop: Optional[Callable[[], bool]] = None) -> CountResult:
    """Count ``settings.dataset_paths`` (or the given ``records``) and report what was read.

    Uses ``settings.num_workers`` processes (default: every core; see :func:`resolve_num_workers`);
    the result, the error for a bad record (the first in file order) and ``--skip-invalid``'s
    report are the same for any number. With ``settings.shard`` = "i/n" only the records at
    positions % n == i are counted (an empty shard of non-empty data gives zero counts).
    ``tallies`` are filled in the same pass (see :class:`Tally`) and returned in ``result.tallies``.

    Worker processes are started with the "spawn" method, so a script calling this at its
    top level must guard it with ``if __name__ == "__main__":`` (or pass ``num_workers=1``).
    """
    settings.validate()
    return count_records(settings, shard=settings.shard_spec(), progress=progress, tallies=tallies,
                         records=records, sha256=sha256, stop=stop)


def count_records(settings: CountSettings, *, shard: Optional[Shard], progress: bool = False,
                  tallies: Sequence[Tally] = (), records: Optional[Iterable[Record]] = None,
                  sha256: Callable[[str], str] = sha256_file, stop: Optional[Callable[[], bool]] = None,
                  check_empty: bool = True) -> CountResult:
    """:func:`count_dataset` with the shard given explicitly (the distributed path splits one shard
    further by rank); the result carries ``settings`` as given."""
    files = dataset_files(settings.dataset_paths)
    stats = ReadStats()
    workers = 1 if records is not None else resolve_num_workers(settings, files, shard)
    bar = _progress_bar(progress, files, settings.sample_size)
    tallies = list(tallies)
    try:
        if workers > 1:
            from .parallel import count_in_workers

            totals = count_in_workers(settings, files, workers=workers, shard=shard, tallies=tallies, stats=stats,
                                      bar=bar, stop=stop)
        else:
            totals = _count_in_process(settings, files, shard=shard, tallies=tallies, stats=stats, records=records,
                                       bar=bar, stop=stop)
    finally:
        if bar is not None:
            bar.close()
    if check_empty and (shard is None or shard.count == 1 or stats.records_seen == 0):
        check_not_empty(files, totals.records_read, totals.records_counted, stats.invalid_skipped)
    if totals.counts is None:  # an empty shard counted by workers: nobody loaded the tokenizer yet
        tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
        totals.tokenizer_length = len(tokenizer)
        totals.counts = np.zeros(resolve_vocab_size(tokenizer, settings.target_vocab_size), dtype=np.int64)
    return CountResult(
        counts=totals.counts, settings=settings, tokenizer_length=totals.tokenizer_length,
        records_read=totals.records_read, records_counted=totals.records_counted,
        records_skipped_empty=totals.records_skipped_empty, records_invalid_skipped=stats.invalid_skipped,
        invalid_examples=list(stats.examples), invalid_example_indices=list(stats.example_indices),
        tokens_counted=totals.tokens_counted, files=file_infos(files, sha256=sha256),
        tallies=totals.tallies, tokenizer_sha256=tokenizer_sha256(
            settings.tokenizer_path, trust_remote_code=settings.trust_remote_code, sha256=sha256),
    )


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


def check_not_empty(files: Sequence[str], records_read: int, records_counted: int, invalid_skipped: int) -> None:
    """The error for data with nothing to count (no records, or every one invalid)."""
    if records_read == 0 or (records_counted == 0 and invalid_skipped == records_read):
        raise InputError(
            f"--dataset-path {', '.join(files)}: no records to count (read {records_read}, "
            f"{invalid_skipped} invalid). Check that the files hold conversation records."
        )


def _count_in_process(settings: CountSettings, files: Sequence[str], *, shard: Optional[Shard],
                      tallies: List[Tally], stats: ReadStats, records: Optional[Iterable[Record]], bar,
                      stop: Optional[Callable[[], bool]]) -> Totals:
    tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
    counter = Counter(tokenizer, settings, vocab_size=resolve_vocab_size(tokenizer, settings.target_vocab_size),
                      tallies=tallies)
    if records is not None:
        add, items = counter.add, (r for r in records if shard is None or shard.contains(r.index))
    else:
        add, items = counter.add_raw, iter_raw_records(files, sample_size=settings.sample_size, shard=shard,
                                                       stats=stats)
    n = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except InputError:
            counter.flush()  # records read before a reading error are checked first
            raise
        add(item, stats)
        n += 1
        if bar is not None:
            bar.update(1)
        if stop is not None and n % 256 == 0 and stop():
            raise CountAborted("counting stopped: another rank failed")
    counter.flush()
    return Totals(counts=counter.counts, tokenizer_length=len(tokenizer), records_read=counter.records_read,
                  records_counted=counter.records_counted, records_skipped_empty=counter.records_skipped_empty,
                  tokens_counted=counter.tokens_counted, tallies=tallies)


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


SAFETENSORS_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
                      "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16",
                      "float32": "F32", "float64": "F64"}


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """A safetensors file's bytes, deterministically: the same tensors and metadata always give the
    same bytes (``safetensors.numpy.save`` orders the metadata by a per-process hash, so two
    processes writing the same counts would write different files).

    >>> from safetensors.numpy import load
    >>> load(safetensors_bytes({"x": np.arange(3)}, {"b": "1", "a": "2"}))["x"].tolist()
    [0, 1, 2]
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} must have one of the dtypes {sorted(SAFETENSORS_DTYPES)}, but got {array.dtype}")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def save_counts(path: str, counts: np.ndarray, metadata: Dict[str, str]) -> None:
    """Write ``counts`` (int64 [V]) and string metadata to a safetensors file, atomically and
    deterministically (equal counts and metadata give byte-identical files)."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, but got shape {counts.shape}")
    atomic_write(path, safetensors_bytes({COUNTS_TENSOR: counts}, {k: str(v) for k, v in metadata.items()}))


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
