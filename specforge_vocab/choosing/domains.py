"""Per-domain coverage: ``--domain NAME=PATH [PATH ...]`` and the floor ``--min-domain-coverage C``.

A draft serving several domains (chat and code, English and Swedish) loses acceptance on the
smaller one when k is chosen on the pooled counts alone. Each domain's files are counted
separately (in the training pass when they are training files, see counting/file_tally.py), and
the coverage of the draft vocabulary on each domain is followed along k: the vocabulary at k is
always the first k ids of the pooled order (pinned ids first, then by count, ties to the smaller id),
so a domain's coverage never falls as k grows, and "every domain has coverage >= C" holds exactly
for the k from some k_needed up. The search (choosing/search.py) keeps only those k. A domain
*binds* when its k_needed is the largest and lies above the k the objective picks without the
floors: its floor, not the objective, moved k up (to k_needed, for the exact search).

>>> parse_domains([["code=a.jsonl", "b.jsonl"], ["math=c.jsonl"]])
{'code': ['a.jsonl', 'b.jsonl'], 'math': ['c.jsonl']}
>>> curve = coverage_curve_in_order(np.array([2, 0, 1]), np.array([1, 1, 2]))  # order: id 2, then 0, then 1
>>> curve.tolist()
[0.0, 0.5, 0.75, 1.0]
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from specforge_vocab.errors import InputError, short

NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _parse_group(group: Sequence[str]):
    """(name, paths, problem) of one use of ``--domain``; the problem is None when the syntax is right."""
    group = list(group)
    if not group:
        return None, [], "--domain must be followed by NAME=PATH [PATH ...], but got nothing."
    name, sep, first = group[0].partition("=")
    name = name.strip()
    if not sep or not name or not first:
        return (
            None,
            [],
            (f"--domain must start with NAME=PATH (e.g. --domain code=data/code.jsonl), but got {short(group[0])}."),
        )
    if not NAME_RE.match(name):
        return (
            None,
            [],
            (
                "--domain names must use letters, digits and _ . + - only (they label the summary and plots), "
                f"but got {name!r}."
            ),
        )
    return name, [first] + group[1:], None


def domain_problems(values: Sequence[Sequence[str]]) -> List[str]:
    """Every problem with the ``--domain`` values (a list per use of the flag), each naming the flag."""
    out: List[str] = []
    seen = set()
    for group in values:
        name, paths, problem = _parse_group(group)
        if problem:
            out.append(problem)
            continue
        if name in seen:
            out.append(f"--domain {name} is given twice; give each domain once, with all of its paths.")
        seen.add(name)
        for path in paths:
            if not os.path.exists(path):
                other, sep, _ = path.partition("=")
                hint = (
                    f" To name a second domain, repeat the flag: --domain {name}=... --domain {path}."
                    if sep and NAME_RE.match(other)
                    else ""
                )
                out.append(f"--domain {name}: {path} does not exist (relative to {os.getcwd()}).{hint}")
    return out


def parse_domains(values: Sequence[Sequence[str]]) -> Dict[str, List[str]]:
    """{name: paths} from the ``--domain`` values, in the order given (see :func:`domain_problems`)."""
    out: Dict[str, List[str]] = {}
    for group in values:
        name, paths, problem = _parse_group(group)
        if problem:
            raise InputError(problem)
        out[name] = paths
    return out


def coverage_curve_in_order(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Coverage of the first k ids of ``order`` on ``counts``, for every k in [0, V] (length V + 1)."""
    prefix = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64)[order])])
    total = int(prefix[-1])
    return prefix / total if total else np.full(prefix.shape, np.nan)


def domain_curves(order: np.ndarray, domain_counts: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """:func:`coverage_curve_in_order` of every domain, by name; a domain with no tokens is refused."""
    out = {}
    for name, counts in domain_counts.items():
        if int(np.sum(counts)) == 0:
            raise InputError(
                f"--domain {name}: no loss-masked tokens were counted in its files, so its coverage is undefined. "
                "Check that its records have assistant replies and that --chat-template matches them."
            )
        out[name] = coverage_curve_in_order(order, counts)
    return out


def meets_floor(curves: Mapping[str, np.ndarray], ks: np.ndarray, floor: float) -> np.ndarray:
    """Boolean per k in ``ks``: every domain's coverage at k is at least ``floor``."""
    ok = np.ones(np.shape(ks), dtype=bool)
    for curve in curves.values():
        ok &= curve[ks] >= floor
    return ok


def first_meeting(curve: np.ndarray, ks: np.ndarray, floor: float) -> Optional[int]:
    """The smallest k of ``ks`` (ascending) where ``curve`` reaches ``floor``, or None."""
    hits = np.flatnonzero(curve[ks] >= floor)
    return int(ks[hits[0]]) if hits.size else None


@dataclasses.dataclass
class DomainCounts:
    """Each domain's counts [V] (its records counted once each), its paths, and which domains were
    counted in the training pass (the others in a pass of their own)."""

    counts: Dict[str, np.ndarray]
    paths: Dict[str, List[str]]
    in_pass: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DomainCoverage:
    """One domain at the chosen k."""

    name: str
    paths: List[str]
    tokens: int
    coverage_at_k: float
    k_needed: Optional[int]  # smallest candidate k meeting the floor (None: none in range, or no floor)
    binding: bool  # its floor moved k above the objective's own pick
    counted_in_training_pass: bool

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def domain_report(
    curves: Mapping[str, np.ndarray],
    ks: np.ndarray,
    k: int,
    *,
    floor: float,
    paths: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    in_pass: Sequence[str] = (),
    k_without_floor: Optional[int] = None,
) -> List[DomainCoverage]:
    """Coverage at ``k`` of every domain, the smallest candidate k meeting ``floor``, and which domain
    binds (``k_without_floor``: the objective's best k without the domain floors; None: nothing binds)."""
    needed = {name: first_meeting(curve, ks, floor) if floor > 0 else None for name, curve in curves.items()}
    known = [n for n in needed.values() if n is not None]
    top = max(known) if known else None
    binds = top is not None and k_without_floor is not None and top > k_without_floor
    out = []
    for name, curve in curves.items():
        out.append(
            DomainCoverage(
                name=name,
                paths=list(paths.get(name, [])),
                tokens=int(tokens.get(name, 0)),
                coverage_at_k=float(curve[k]),
                k_needed=needed[name],
                binding=binds and needed[name] == top,
                counted_in_training_pass=name in in_pass,
            )
        )
    return out


def domain_lines(report: Sequence[DomainCoverage], floor: float, k_without_floor: Optional[int] = None) -> List[str]:
    """The printed summary of :func:`domain_report`."""
    parts = []
    for d in report:
        needed = f", needs k >= {d.k_needed:,}" if d.k_needed is not None else ""
        parts.append(f"{d.name} {d.coverage_at_k:.4%}{needed}{' (binds)' if d.binding else ''}")
    head = f"domains (floor {floor:g})" if floor > 0 else "domains"
    binding = [d.name for d in report if d.binding]
    free = f" (without the floor the objective picks k = {k_without_floor:,})" if k_without_floor is not None else ""
    tail = f"; binding: {', '.join(binding)}{free}" if binding else (f"; no domain binds{free}" if floor > 0 else "")
    return [f"{head}: " + ", ".join(parts) + tail]
