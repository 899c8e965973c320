"""Count the loss-masked token ids of a dataset into a dense int64 array of length V.

:func:`count_dataset` reads the records (data.py), renders and masks them as SpecForge does
(masking.py) and adds each record's masked ids to the histogram, in this process or in worker
processes (workers.py) with the same result; :func:`count_tokens` is the Python API's shortcut.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from specforge_vocab.counting.columns import columns_to_fill
from specforge_vocab.counting.counts_file import FORMAT_VERSION, settings_from_metadata
from specforge_vocab.counting.data import ReadStats, Record, Shard, dataset_files, iter_raw_records
from specforge_vocab.counting.engine import CountAborted, Counter, CountSettings, Tally, Totals, resolve_vocab_size
from specforge_vocab.counting.file_tally import weighted_source_lines
from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.counting.tokenizer import load_tokenizer, tokenizer_sha256
from specforge_vocab.counting.workers import count_in_workers
from specforge_vocab.errors import InputError, SettingsError
from specforge_vocab.fileio import sha256_file

logger = logging.getLogger(__name__)


# Below this much data (bytes read by one shard) an automatic --num-workers counts in-process:
# starting workers (each imports transformers and loads the tokenizer) costs a few seconds.
AUTO_WORKERS_MIN_BYTES = 4 << 20


AUTO_WORKERS_MIN_RECORDS = 5000


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
    sources: List[Dict[str, object]] = field(default_factory=list)  # per --dataset-path of a weighted count
    template_fields: Optional[Dict[str, object]] = None  # SpecForge's eight fields of the template counted with

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def weighted(self) -> bool:
        """True when --dataset-weight gave some file a weight other than 1."""
        return any(int(f.get("weight", 1)) != 1 for f in self.files)

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
            "chat_template_file": os.path.abspath(s.chat_template_file) if s.chat_template_file else "",
            "chat_template_fields": json.dumps(
                self.template_fields if self.template_fields is not None else s.template().fields(), ensure_ascii=False
            ),
            "max_length": str(s.max_length),
            "is_preformatted": json.dumps(s.is_preformatted),
            "train_only_last_turn": json.dumps(s.train_only_last_turn),
            "legacy_reader": json.dumps(s.legacy_reader),
            "sample_size": json.dumps(s.sample_size),
            "skip_invalid": json.dumps(s.skip_invalid),
            "shard": "" if s.shard in (None, "") else str(Shard.parse(s.shard)),
            "files": json.dumps(self.files, ensure_ascii=False),
            "records_read": str(self.records_read),
            "records_counted": str(self.records_counted),
            "records_skipped_empty": str(self.records_skipped_empty),
            "records_invalid_skipped": str(self.records_invalid_skipped),
            "invalid_examples": json.dumps(
                [[i, m] for i, m in zip(self.invalid_example_indices, self.invalid_examples)], ensure_ascii=False
            ),
            "tokens_counted": str(self.tokens_counted),
            "unique_tokens": str(self.unique_tokens),
        }

    @classmethod
    def from_metadata(
        cls,
        counts: np.ndarray,
        metadata: Dict[str, str],
        *,
        settings: Optional[CountSettings] = None,
        source: str = "counts file",
    ) -> "CountResult":
        """Rebuild a result from a counts file (``settings`` default: those the metadata records).

        Raises InputError naming ``source`` and the field when the metadata lacks one.
        """
        try:
            examples = json.loads(metadata.get("invalid_examples") or "[]")
            result = cls(
                counts=counts,
                settings=settings if settings is not None else settings_from_metadata(metadata, source=source),
                tokenizer_length=int(metadata["tokenizer_length"]),
                records_read=int(metadata["records_read"]),
                records_counted=int(metadata["records_counted"]),
                records_skipped_empty=int(metadata["records_skipped_empty"]),
                records_invalid_skipped=int(metadata["records_invalid_skipped"]),
                invalid_examples=[str(m) for _, m in examples],
                invalid_example_indices=[int(i) for i, _ in examples],
                tokens_counted=int(metadata["tokens_counted"]),
                files=json.loads(metadata["files"]),
                tokenizer_sha256=metadata.get("tokenizer_sha256", ""),
                template_fields=json.loads(metadata["chat_template_fields"])
                if metadata.get("chat_template_fields")
                else None,
            )
        except KeyError as exc:
            raise InputError(
                f"{source}: metadata field {exc.args[0]!r} is missing; the file was not written by "
                "`specforge-vocab count` (or by an older version). Recount it."
            ) from None
        except (ValueError, TypeError) as exc:
            raise InputError(f"{source}: the metadata is malformed ({exc}); the file is corrupt. Recount it.") from None
        return result

    def summary_lines(self) -> List[str]:
        lines = [
            f"records read: {self.records_read:,}  counted: {self.records_counted:,}  "
            f"skipped (empty, as SpecForge): {self.records_skipped_empty:,}",
            f"loss-masked tokens counted: {self.tokens_counted:,}{' (weighted)' if self.weighted else ''}  "
            f"unique ids: {self.unique_tokens:,} of V={self.vocab_size:,}",
        ]
        shard = self.settings.shard_spec()
        if shard is not None:
            lines.insert(
                0,
                f"shard {shard} (records at position % {shard.count} == {shard.index}; "
                "`specforge-vocab merge` sums the shards)",
            )
        if self.sources:
            lines += weighted_source_lines(self.sources)
        return lines  # invalid records skipped are reported once, by report_skipped

    def skipped_summary(self, shown: int = 3) -> Optional[str]:
        """One paragraph on the invalid records --skip-invalid skipped: the first few, then a count."""
        n = self.records_invalid_skipped
        if not n:
            return None
        first = self.invalid_examples[:shown]
        more = n - len(first)
        return (
            f"--skip-invalid skipped {n:,} invalid record{'s' if n != 1 else ''}"
            + (f", the first {len(first)}" if n > len(first) else "")
            + ": "
            + " | ".join(first)
            + (f" | and {more:,} more (-v lists every one)" if more > 0 else "")
        )


def report_skipped(result: CountResult) -> None:
    """Log the one warning about the records --skip-invalid skipped (nothing when none were)."""
    summary = result.skipped_summary()
    if summary:
        logger.warning("%s", summary)


def file_infos(
    paths: Sequence[str], *, sha256: Callable[[str], str] = sha256_file, weights: Optional[Dict[str, int]] = None
) -> List[Dict[str, object]]:
    """Each dataset file with its size and sha256, in reading order (``sha256`` may be memoised), and
    its weight when ``weights`` ({file: weight}, from --dataset-weight) is given."""
    infos: List[Dict[str, object]] = [
        {"path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": sha256(p)} for p in paths
    ]
    if weights is not None:
        for info, path in zip(infos, paths):
            info["weight"] = int(weights.get(path, 1))
    return infos


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
            size += os.path.getsize(path) * (4 if path.lower().endswith(".gz") else 1)
        except OSError:
            pass
    return 1 if size / parts < AUTO_WORKERS_MIN_BYTES else cores


def count_dataset(
    settings: CountSettings,
    *,
    progress: bool = False,
    tallies: Sequence[Tally] = (),
    records: Optional[Iterable[Record]] = None,
    sha256: Callable[[str], str] = sha256_file,
    stop: Optional[Callable[[], bool]] = None,
) -> CountResult:
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
    return count_records(
        settings,
        shard=settings.shard_spec(),
        progress=progress,
        tallies=tallies,
        records=records,
        sha256=sha256,
        stop=stop,
    )


def count_records(
    settings: CountSettings,
    *,
    shard: Optional[Shard],
    progress: bool = False,
    tallies: Sequence[Tally] = (),
    records: Optional[Iterable[Record]] = None,
    sha256: Callable[[str], str] = sha256_file,
    stop: Optional[Callable[[], bool]] = None,
    check_empty: bool = True,
    report: bool = True,
) -> CountResult:
    """:func:`count_dataset` with the shard given explicitly (the distributed path splits one shard
    further by rank, with ``check_empty`` and ``report`` off: it checks and reports the sum); the
    result carries ``settings`` as given."""
    files = dataset_files(settings.dataset_paths)
    template = settings.template()
    template_fields = template.fields()
    stats = ReadStats()
    workers = 1 if records is not None else resolve_num_workers(settings, files, shard)
    bar = _progress_bar(progress, files, settings.sample_size, shard)
    tallies = list(tallies)
    fill = fill_columns(settings, files, template) if records is None else ()
    try:
        if workers > 1:
            totals = count_in_workers(
                settings,
                files,
                workers=workers,
                shard=shard,
                tallies=tallies,
                stats=stats,
                bar=bar,
                stop=stop,
                fill_columns=fill,
            )
        else:
            totals = _count_in_process(
                settings,
                files,
                shard=shard,
                tallies=tallies,
                stats=stats,
                records=records,
                bar=bar,
                stop=stop,
                fill_columns=fill,
            )
    finally:
        if bar is not None:
            bar.close()
    if check_empty and (shard is None or shard.count == 1 or stats.records_seen == 0):
        check_not_empty(files, totals.records_read, totals.records_counted, stats.invalid_skipped)
    if totals.counts is None:  # an empty shard counted by workers: nobody loaded the tokenizer yet
        tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
        totals.tokenizer_length = len(tokenizer)
        totals.counts = np.zeros(resolve_vocab_size(tokenizer, settings.target_vocab_size), dtype=np.int64)
    result = CountResult(
        counts=totals.counts,
        settings=settings,
        tokenizer_length=totals.tokenizer_length,
        records_read=totals.records_read,
        records_counted=totals.records_counted,
        records_skipped_empty=totals.records_skipped_empty,
        records_invalid_skipped=stats.invalid_skipped,
        invalid_examples=list(stats.examples),
        invalid_example_indices=list(stats.example_indices),
        tokens_counted=totals.tokens_counted,
        files=file_infos(files, sha256=sha256, weights=settings.file_weights()),
        tallies=totals.tallies,
        tokenizer_sha256=tokenizer_sha256(
            settings.tokenizer_path, trust_remote_code=settings.trust_remote_code, sha256=sha256
        ),
        template_fields=template_fields,
    )
    if report:
        report_skipped(result)
    return result


def fill_columns(settings: CountSettings, files: Sequence[str], template: ChatTemplate) -> Tuple[str, ...]:
    """The columns SpecForge gives every record as None where it lacks them (counting/columns.py);
    none for preformatted text and for the older train_eagle3.py's reader (it passes no column)."""
    if settings.is_preformatted or settings.legacy_reader:
        return ()
    tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
    fill = columns_to_fill(files, template, tokenizer)
    if fill:
        logger.info("columns passed to the chat template (None where a record lacks them): %s", ", ".join(fill))
    return fill


def check_not_empty(files: Sequence[str], records_read: int, records_counted: int, invalid_skipped: int) -> None:
    """The error for data with nothing to count (no records, or every one invalid)."""
    if records_read == 0 or (records_counted == 0 and invalid_skipped == records_read):
        raise InputError(
            f"--dataset-path {', '.join(files)}: no records to count (read {records_read}, "
            f"{invalid_skipped} invalid). Check that the files hold conversation records."
        )


def _count_in_process(
    settings: CountSettings,
    files: Sequence[str],
    *,
    shard: Optional[Shard],
    tallies: List[Tally],
    stats: ReadStats,
    records: Optional[Iterable[Record]],
    bar,
    stop: Optional[Callable[[], bool]],
    fill_columns: Sequence[str] = (),
) -> Totals:
    tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
    counter = Counter(
        tokenizer,
        settings,
        vocab_size=resolve_vocab_size(tokenizer, settings.target_vocab_size),
        tallies=tallies,
        fill_columns=fill_columns,
    )
    if records is not None:
        add, items = counter.add, (r for r in records if shard is None or shard.contains(r.index))
    else:
        add, items = (
            counter.add_raw,
            iter_raw_records(files, sample_size=settings.sample_size, shard=shard, stats=stats),
        )
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
    return Totals(
        counts=counter.counts,
        tokenizer_length=len(tokenizer),
        records_read=counter.records_read,
        records_counted=counter.records_counted,
        records_skipped_empty=counter.records_skipped_empty,
        tokens_counted=counter.tokens_counted,
        tallies=tallies,
    )


def expected_records(files: Sequence[str], sample_size: Optional[int], shard: Optional[Shard] = None) -> Optional[int]:
    """How many records a count will read, when that is known without decoding: ``sample_size``, or
    the lines of plain .jsonl files (blank lines, which are not records, make it a little high);
    None for .json lists and .gz files. Divided among the shards."""
    total = sample_size
    if total is None:
        if not all(p.lower().endswith(".jsonl") for p in files):
            return None
        total = 0
        for path in files:
            try:
                with open(path, "rb") as handle:
                    last = b"\n"
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        total += block.count(b"\n")
                        last = block[-1:]
                    total += last != b"\n"
            except OSError:
                return None
    if shard is not None:
        total = len(range(shard.index, total, shard.count))
    return total


def _progress_bar(enabled: bool, files: Sequence[str], sample_size: Optional[int], shard: Optional[Shard] = None):
    """A progress bar on stderr (none when it is not a terminal: CI logs, pipes), with a total and an
    ETA when the number of records is known (see :func:`expected_records`)."""
    if not enabled or not sys.stderr.isatty():
        return None
    return tqdm(
        total=expected_records(files, sample_size, shard),
        unit=" records",
        desc="counting",
        dynamic_ncols=True,
        mininterval=0.5,
        leave=False,
    )


def count_tokens(
    dataset_paths,
    tokenizer_path: str,
    *,
    chat_template: str,
    max_length: int = 2048,
    is_preformatted: bool = False,
    train_only_last_turn: bool = False,
    sample_size: Optional[int] = None,
    target_vocab_size: Optional[int] = None,
    chat_template_file: Optional[str] = None,
) -> np.ndarray:
    """Loss-masked token counts of a SpecForge dataset: int64 array of length V.

    ``dataset_paths`` is a path or a list of files/directories, read in order. An argument of the
    wrong type is refused with a message naming it (``max_length=True`` is not a length).
    ``chat_template_file``: the fields of a template registered in code (JSON or YAML), named ``chat_template``.
    """
    if isinstance(dataset_paths, (str, os.PathLike)):
        dataset_paths = [os.fspath(dataset_paths)]
    elif isinstance(dataset_paths, (list, tuple)):
        dataset_paths = list(dataset_paths)
    settings = CountSettings(
        dataset_paths=dataset_paths,
        tokenizer_path=os.fspath(tokenizer_path) if isinstance(tokenizer_path, os.PathLike) else tokenizer_path,
        chat_template=chat_template,
        chat_template_file=chat_template_file,
        max_length=max_length,
        is_preformatted=is_preformatted,
        train_only_last_turn=train_only_last_turn,
        sample_size=sample_size,
        target_vocab_size=target_vocab_size,
    )
    problems = settings.problems()
    if problems:
        raise SettingsError([f"count_tokens: {named_as_argument(p)}" for p in problems])
    return count_dataset(settings).counts


def named_as_argument(problem: str) -> str:
    """A settings problem worded for the Python API: its leading flag also named as the argument.

    >>> named_as_argument("--max-length must be a positive integer, but got True.")
    'max_length (--max-length) must be a positive integer, but got True.'
    """
    flag = problem.split(" ", 1)[0]
    if not flag.startswith("--"):
        return problem
    name = {"--dataset-path": "dataset_paths"}.get(flag, flag[2:].replace("-", "_"))
    return f"{name} ({flag}){problem[len(flag) :]}"
