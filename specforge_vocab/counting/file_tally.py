"""Counts of named groups of data files, filled in the counting pass (a :class:`Tally`).

Each group is a list of files or directories (expanded as ``--dataset-path`` is); a record counts
toward every group holding its file. Records are counted once each, whatever their
``--dataset-weight``: a group's counts are its files' own distribution. Two uses:

- per-domain counts (``--domain NAME=PATH ...``) when the domain's files are training files, so
  the domains cost no second pass (choosing/domains.py);
- the per-path report of a weighted count: records, tokens and weighted share of each
  ``--dataset-path`` value (:func:`weighted_sources`).

>>> import tempfile, os
>>> d = tempfile.mkdtemp(); a = os.path.join(d, "a.jsonl"); _ = open(a, "w").write("{}\\n")
>>> tally = FileGroupTally({"a": [a]}, vocab_size=4)
>>> from specforge_vocab.counting.data import Record
>>> tally.add(Record(a, 1, 0, {}), np.array([1, 1, 3]))
>>> tally.counts_of("a").tolist(), tally.tokens.tolist()
([0, 2, 0, 1], [3])
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.counting.data import Record, dataset_files
from specforge_vocab.counting.engine import CountSettings, Tally


class FileGroupTally(Tally):
    """Masked-id counts [G, V], records [G] and tokens [G] of G named groups of data files."""

    def __init__(self, groups: Dict[str, Sequence[str]], vocab_size: int, *, flag: str = "--domain"):
        self.names: List[str] = list(groups)
        self.groups = {name: list(paths) for name, paths in groups.items()}
        self.vocab_size = int(vocab_size)
        self.flag = flag
        self.members: Dict[str, List[int]] = {}  # real path of a file -> indices of its groups
        for index, name in enumerate(self.names):
            for file in dataset_files(self.groups[name], flag=flag):
                owners = self.members.setdefault(os.path.realpath(file), [])
                if index not in owners:
                    owners.append(index)
        self.counts = np.zeros((len(self.names), self.vocab_size), dtype=np.int64)
        self.records = np.zeros(len(self.names), dtype=np.int64)
        self.tokens = np.zeros(len(self.names), dtype=np.int64)
        self._seen: Dict[str, List[int]] = {}  # source as reading names it -> group indices

    def files(self) -> List[str]:
        """The real paths of every file of every group."""
        return list(self.members)

    def _groups_of(self, source: str) -> List[int]:
        found = self._seen.get(source)
        if found is None:
            found = self._seen[source] = self.members.get(os.path.realpath(source), [])
        return found

    def add(self, record: Record, ids: np.ndarray) -> None:
        groups = self._groups_of(record.source)
        if not groups:
            return
        unique, counts = np.unique(ids, return_counts=True)  # O(len(ids)), not O(V), per record
        for index in groups:
            self.counts[index, unique] += counts
            self.records[index] += 1
            self.tokens[index] += int(ids.size)

    def add_copies(self, record: Record, ids: np.ndarray, copies: int) -> None:
        self.add(record, ids)  # a group's own distribution: each record once, whatever its weight

    def merge(self, other: "FileGroupTally") -> None:
        self.counts += other.counts
        self.records += other.records
        self.tokens += other.tokens

    def fresh(self) -> "FileGroupTally":
        empty = FileGroupTally.__new__(FileGroupTally)
        empty.__dict__.update(self.__dict__)
        empty.counts = np.zeros_like(self.counts)
        empty.records = np.zeros_like(self.records)
        empty.tokens = np.zeros_like(self.tokens)
        empty._seen = {}
        return empty

    def counts_of(self, name: str) -> np.ndarray:
        return self.counts[self.names.index(name)]

    # Sent between worker processes as the touched ids only (a chunk touches a few thousand).
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        columns = np.flatnonzero(self.counts.any(axis=0))
        state["columns"] = columns
        state["counts"] = self.counts[:, columns]
        state["_seen"] = {}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        columns = state.pop("columns")
        full = np.zeros((len(state["names"]), state["vocab_size"]), dtype=np.int64)
        full[:, columns] = state["counts"]
        state["counts"] = full
        self.__dict__.update(state)


def dataset_path_tally(settings: CountSettings, vocab_size: int) -> Optional[FileGroupTally]:
    """The per-path tally of a weighted count (one group per --dataset-path value), else None."""
    if settings.file_weights() is None:
        return None
    return FileGroupTally({path: [path] for path in settings.dataset_paths}, vocab_size, flag="--dataset-path")


def weighted_sources(settings: CountSettings, tally: FileGroupTally) -> List[Dict[str, Any]]:
    """Per --dataset-path value: weight, records, tokens as read, weighted tokens and their share."""
    weights = [int(w) for w in settings.dataset_weights]
    weighted = [int(w * t) for w, t in zip(weights, tally.tokens.tolist())]
    total = sum(weighted)
    return [
        {
            "path": path,
            "weight": weight,
            "records": int(records),
            "tokens": int(tokens),
            "weighted_tokens": wt,
            "share": wt / total if total else None,
        }
        for path, weight, records, tokens, wt in zip(
            settings.dataset_paths, weights, tally.records.tolist(), tally.tokens.tolist(), weighted
        )
    ]


def weighted_source_lines(sources: List[Dict[str, Any]]) -> List[str]:
    """The printed form of :func:`weighted_sources`."""
    lines = ["weighted data (counts = sum of weight x each path's counts):"]
    for s in sources:
        share = f"{s['share']:.1%}" if s["share"] is not None else "n/a"
        lines.append(
            f"  {s['path']}: weight {s['weight']}, {s['records']:,} records, {s['tokens']:,} tokens "
            f"-> {s['weighted_tokens']:,} weighted ({share})"
        )
    return lines
