"""Streamed dataset reading: .jsonl, .json (a list of records) and their .gz.

Records are yielded one at a time with their file and line, so a bad line can
be named and memory stays flat however large the data is.

>>> import json, tempfile, os
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.jsonl")
>>> _ = open(p, "w").write(json.dumps({"text": "hi"}) + "\\n")
>>> [(r.line, r.data) for r in iter_records([p])]
[(1, {'text': 'hi'})]
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from specforge_vocab.errors import InputError, short

logger = logging.getLogger(__name__)


SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """One dataset record: its file, 1-based line, position among all records, and JSON value."""

    source: str
    line: int
    index: int
    data: Any


@dataclass(frozen=True)
class RawRecord:
    """A record before JSON decoding: cheap to read and to send to a worker process.

    ``payload`` is the raw line of a .jsonl file (``parsed`` False) or the value already
    decoded from a .json list (``parsed`` True). ``decode()`` gives the :class:`Record`, or
    raises the same "malformed JSON" :class:`InputError` whoever decodes it.
    """

    source: str
    line: int
    index: int
    payload: Any
    parsed: bool = False

    def decode(self) -> Record:
        value = self.payload if self.parsed else parse_json_line(self.payload, self.source, self.line)
        return Record(self.source, self.line, self.index, value)


def parse_json_line(text: str, path: str, number: int) -> Any:
    """``json.loads`` of one .jsonl line; malformed JSON is an InputError naming file and line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(
            f"{path}, line {number}: malformed JSON: nested deeper than the JSON parser allows "
            f"({sys.getrecursionlimit()} levels). No conversation is nested like this; fix or remove this line, "
            "or pass --skip-invalid to skip bad lines."
        ) from None
    except json.JSONDecodeError as exc:
        if number == 1 and text.lstrip().startswith("{") and path.lower().endswith((".json", ".json.gz")):
            raise InputError(
                f"{path}, line 1: malformed JSON ({exc.msg} at column {exc.colno}): a .json dataset must be a list "
                "of records ([{...}, {...}]) or hold one record per line (JSON Lines), but this file starts "
                "with an object that does not end on its first line. Wrap the records in [ ] (or write one "
                "per line)."
            ) from None
        raise InputError(
            f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}). "
            "Each line of a .jsonl file must be one complete JSON object; fix or remove this line, "
            "or pass --skip-invalid to skip bad lines."
        ) from None


@dataclass(frozen=True)
class Shard:
    """The ``index``-th of ``count`` deterministic shards: records whose position % count == index.

    Positions are those of :func:`iter_raw_records` (every non-blank record, invalid ones too),
    taken after ``sample_size``: the first N records overall are split, so shards of a sample
    merge to exactly that sample.

    >>> s = Shard.parse("1/4"); (s.index, s.count, str(s), s.contains(5), s.contains(6))
    (1, 4, '1/4', True, False)
    >>> str(Shard.parse("1/2").split(1, 3))  # rank 1 of 3 within shard 1/2: positions % 6 == 3
    '3/6'
    """

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def contains(self, position: int) -> bool:
        return position % self.count == self.index

    def split(self, part: int, parts: int) -> "Shard":
        """The ``part``-th of ``parts`` sub-shards of this shard (still a position % m == j rule)."""
        return Shard(self.index + self.count * part, self.count * parts)

    @classmethod
    def parse(cls, text: Any, *, flag: str = "--shard") -> "Shard":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text)) if text is not None else None
        if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
            raise InputError(
                f"{flag} must be i/n with 0 <= i < n (0-based: --shard 0/4 ... --shard 3/4 cover the data), "
                f"but got {text!r}."
            )
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass
class ReadStats:
    """What reading saw: invalid records skipped under ``skip_invalid`` (with the first few named).

    ``records_seen`` counts every record position read (all shards), ``example_indices`` are the
    positions of ``examples`` so skipped records from several shards can be put back in order.
    """

    invalid_skipped: int = 0
    examples: List[str] = field(default_factory=list)
    example_indices: List[int] = field(default_factory=list)
    records_seen: int = 0
    max_examples: int = 5

    def skip(self, message: str, index: Optional[int] = None, *, log: bool = True) -> None:
        """Note one skipped record (logged at debug level; the count reports them all at once)."""
        self.invalid_skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)
            self.example_indices.append(-1 if index is None else int(index))
        if log:
            logger.debug("skipped: %s", message)


def is_dataset_file(path: str) -> bool:
    """A name ending in .jsonl, .json, .jsonl.gz or .json.gz, in any case (``DATA.JSONL`` too)."""
    return os.path.basename(path).lower().endswith(SUFFIXES)


def is_gzip(path: str) -> bool:
    return path.lower().endswith(".gz")


# Conversions that work for the formats people most often keep next to their JSON data.
_CONVERT = {
    ".parquet": "pandas.read_parquet('{f}').to_json('{j}', orient='records', lines=True, force_ascii=False)",
    ".arrow": "datasets.Dataset.from_file('{f}').to_json('{j}', force_ascii=False)",
    ".csv": "pandas.read_csv('{f}').to_json('{j}', orient='records', lines=True, force_ascii=False)",
}


_reported_skips: set = set()


def _walk_dataset_dir(directory: str, flag: str) -> Tuple[List[str], List[str]]:
    """(dataset files, other files) below ``directory``, following symlinked folders (each folder
    once, so a link back up is no loop); hidden entries are left out."""
    found: List[str] = []
    others: List[str] = []
    seen = set()

    def visit(folder: str) -> None:
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                return
            seen.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise InputError(
                f"{flag} {directory}: cannot read {folder} ({exc.strerror}). Check its permissions."
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # a symlinked folder too
                visit(entry.path)
            elif entry.is_file() and is_dataset_file(entry.name):
                found.append(entry.path)
            else:
                others.append(entry.path)

    visit(directory)
    return sorted(found), sorted(others)


def _report_skipped(directory: str, skipped: List[str], flag: str) -> None:
    """One warning listing the files of a dataset folder that are not read, with a conversion that works."""
    key = (directory, tuple(skipped))
    if not skipped or key in _reported_skips:
        return
    _reported_skips.add(key)
    names = [os.path.relpath(p, directory) for p in skipped]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    hints = []
    for suffix, template in _CONVERT.items():
        example = next((p for p in skipped if p.lower().endswith(suffix)), None)
        if example:
            target = example[: -len(suffix)] + ".jsonl"
            hints.append(
                'python -c "import ' + template.split(".")[0] + "; " + template.format(f=example, j=target) + '"'
            )
    fix = (" Convert them to JSON Lines to count them, e.g. " + "; ".join(hints) + ".") if hints else ""
    logger.warning(
        "%s %s: %d file(s) are not .jsonl/.json(.gz) and are not read: %s.%s",
        flag,
        directory,
        len(names),
        shown,
        fix,
    )


def dataset_files(paths: Sequence[str], *, flag: str = "--dataset-path") -> List[str]:
    """Expand files and directories (searched recursively, symlinked folders followed, sorted) into
    data files, in order. Other files in a directory are listed in a warning; a file named twice
    (or a folder and a file in it) is an error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[str] = []
    named_by: Dict[str, str] = {}
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found, others = _walk_dataset_dir(path, flag)
            if not found:
                raise InputError(
                    f"{flag} {path} is a directory with no dataset files; expected files ending in "
                    f"{', '.join(SUFFIXES)}"
                    + (f" (it holds {short(sorted(os.path.relpath(o, path) for o in others), 120)})" if others else "")
                    + f". Point {flag} at your .jsonl/.json files."
                )
            _report_skipped(path, others, flag)
        elif os.path.isfile(path):
            if not is_dataset_file(path):
                raise InputError(
                    f"{flag} {path} must be a .jsonl, .json, .jsonl.gz or .json.gz file, but its name ends "
                    f"in {os.path.splitext(path)[1] or 'nothing'}. Rename it or convert it to JSON Lines."
                )
            found = [path]
        else:
            raise InputError(f"{flag} {path} does not exist. Check the path (relative paths start at {os.getcwd()}).")
        for file in found:
            real = os.path.realpath(file)
            if real in named_by:
                raise InputError(
                    f"{flag}: {file} would be counted twice, as it is named by both {named_by[real]!r} and {path!r} "
                    f"(the same file, or a folder and a file in it). Name each file once."
                )
            named_by[real] = path
            files.append(file)
    if not files:
        raise InputError(f"{flag} must name at least one dataset file or directory, but got none.")
    return files


def _open_text(path: str) -> io.TextIOBase:
    """The file as text, a UTF-8 byte order mark dropped."""
    try:
        if is_gzip(path):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"Cannot read dataset {path}: {exc.strerror}. Check the file's permissions.") from exc


def _iter_jsonl_lines(handle) -> Iterator[tuple]:
    """(line number, raw line) for each non-blank line; decoding is left to the consumer."""
    for number, line in enumerate(handle, start=1):
        if line.strip():
            yield number, line


def _iter_json_array(handle, path: str) -> Iterator[tuple]:
    """Yield (line, value) for each element of a top-level JSON list, reading in chunks."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = handle.read(_CHUNK)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buf) or not fill():
                return

    def fail(expected: str) -> None:
        found = repr(buf[pos]) if pos < len(buf) else "the end of the file"
        raise InputError(
            f"{path}, line {line}: malformed JSON: expected {expected} but found {found}. A .json dataset "
            "must be one list of records ([{...}, {...}]); fix the file or convert it to JSON Lines."
        )

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        fail("'[' opening a list of records")
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        if not first:
            if pos >= len(buf) or buf[pos] != ",":
                fail("',' or ']'")
            pos += 1
            skip_ws()
        first = False
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                # A number or literal cut by the chunk edge decodes "successfully": make sure it is whole.
                if end >= len(buf) and not eof:
                    raise ValueError
                break
            except RecursionError:
                raise InputError(
                    f"{path}, line {line}: malformed JSON: a record nested deeper than the JSON parser allows "
                    f"({sys.getrecursionlimit()} levels). Fix or remove that record."
                ) from None
            except (json.JSONDecodeError, ValueError):
                if not fill():
                    fail("a complete JSON record")
        yield line, value
        line += buf.count("\n", pos, end)
        pos = end


def iter_raw_records(
    paths: Sequence[str],
    *,
    sample_size: Optional[int] = None,
    shard: Optional[Shard] = None,
    stats: Optional[ReadStats] = None,
    flag: str = "--dataset-path",
) -> Iterator[RawRecord]:
    """Yield every record of ``paths`` undecoded, in order: the first ``sample_size`` overall if
    given, then only those of ``shard``. Every non-blank .jsonl line is a record position, a
    malformed one too (it fails in :meth:`RawRecord.decode`), so positions do not depend on
    which process decodes. ``stats.records_seen`` counts all positions read (every shard).
    """
    index = 0
    for path in dataset_files(paths, flag=flag):
        with _open_text(path) as handle:
            try:
                is_array = path.lower().endswith((".json", ".json.gz")) and _peek_is_array(handle)
                values = _iter_json_array(handle, path) if is_array else _iter_jsonl_lines(handle)
                for line, value in values:
                    if sample_size is not None and index >= sample_size:
                        return
                    if stats is not None:
                        stats.records_seen += 1
                    if shard is None or shard.contains(index):
                        yield RawRecord(path, line, index, value, is_array)
                    index += 1
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start} of a chunk). "
                    "Datasets must be UTF-8 JSON; re-encode the file."
                ) from None
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InputError(
                    f"{path}: cannot be read to the end ({exc}). The file may be truncated or corrupt."
                ) from None


def iter_records(
    paths: Sequence[str],
    *,
    sample_size: Optional[int] = None,
    skip_invalid: bool = False,
    stats: Optional[ReadStats] = None,
    flag: str = "--dataset-path",
    shard: Optional[Shard] = None,
) -> Iterator[Record]:
    """Yield every decoded record of ``paths`` in order (the first ``sample_size`` overall if given).

    A malformed line is an error, or with ``skip_invalid`` is skipped and noted in ``stats``
    (it still takes its record position, see :func:`iter_raw_records`).
    """
    stats = stats if stats is not None else ReadStats()
    for raw in iter_raw_records(paths, sample_size=sample_size, shard=shard, stats=stats, flag=flag):
        try:
            record = raw.decode()
        except InputError as exc:
            if not skip_invalid:
                raise
            stats.skip(str(exc), raw.index)
            continue
        yield record


def _peek_is_array(handle) -> bool:
    """True if the first non-space character is '['; the handle is rewound."""
    start = handle.read(4096).lstrip()
    handle.seek(0)
    return start.startswith("[")
