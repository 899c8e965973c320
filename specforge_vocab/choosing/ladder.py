"""A ladder of draft vocabulary sizes (``--ladder K [K ...]``): what each size would give.

Every rung is the first K ids of the same order the chosen k takes (pinned ids, then by count,
ties to the smaller id), so a rung is exactly what ``optimize --draft-vocab-size K`` on the same
counts keeps. For each K the table holds coverage on the train records, the held-out records,
each evaluation set and each domain, the predicted latency reduction, the draft's time relative
to the full vocabulary and the predicted chain speed-up (choosing/objectives.py).

>>> ladder_problems([1024, 0, 1024])
['--ladder must be positive integers, but got 0.', '--ladder must list each size once, but got 1024 more than once.']
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from specforge_vocab.choosing.holdout import coverage_of, pinned_frequency_order
from specforge_vocab.errors import InputError, must


def ladder_problems(sizes: Sequence[Any]) -> List[str]:
    """Every problem with the ``--ladder`` sizes (their upper bound V is checked by :func:`check_ladder`)."""
    out = [
        must("--ladder", "positive integers", k)
        for k in sizes
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1
    ]
    times = collections.Counter(int(k) for k in sizes if isinstance(k, numbers.Integral))
    repeated = sorted(k for k, n in times.items() if n > 1)
    if repeated:
        out.append(f"--ladder must list each size once, but got {', '.join(map(str, repeated))} more than once.")
    return out


def check_ladder(sizes: Sequence[int], *, vocab_size: int, pinned: int) -> List[int]:
    """The sizes, each checked against V and the number of pinned ids (an InputError naming --ladder)."""
    bad = [int(k) for k in sizes if not max(1, pinned) <= int(k) <= vocab_size]
    if bad:
        raise InputError(
            f"--ladder sizes must be in [{max(1, pinned)}, {vocab_size}] (at least the {pinned} pinned ids, at most "
            f"the target vocab_size), but got {', '.join(map(str, bad))}. Drop them or pin fewer tokens."
        )
    return [int(k) for k in sizes]


@dataclasses.dataclass
class LadderRow:
    """One rung: coverage on every split, predicted latency reduction and speed-up at K."""

    k: int
    coverage: Dict[str, Any]  # train, held_out, eval {name: c}, domains {name: c}
    latency_reduction: float
    relative_draft_time: float
    predicted_speedup: float  # chain speed-up at the train coverage
    objective_value: float

    def as_dict(self) -> Dict[str, Any]:
        return {"draft_vocab_size": self.k, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}}


def ladder_rows(
    sizes: Sequence[int],
    *,
    search_counts: np.ndarray,
    pinned_ids: Sequence[int],
    latency_reduction: Callable[[np.ndarray], np.ndarray],
    relative_time: Callable[[np.ndarray], np.ndarray],
    speedup: Callable[[float, float], float],
    objective: Callable,
    coverage_weight: float,
    held_out: Optional[np.ndarray] = None,
    eval_counts: Optional[Mapping[str, np.ndarray]] = None,
    domain_counts: Optional[Mapping[str, np.ndarray]] = None,
) -> List[LadderRow]:
    """The table of :class:`LadderRow` for ``sizes`` (in the order given)."""
    order = pinned_frequency_order(search_counts, pinned_ids)
    ks = np.asarray(sizes, dtype=np.int64)
    reductions = np.asarray(latency_reduction(ks), dtype=np.float64)
    times = np.asarray(relative_time(ks), dtype=np.float64)
    rows = []
    for i, k in enumerate(ks.tolist()):
        kept = order[:k]
        train = coverage_of(kept, search_counts)
        coverage: Dict[str, Any] = {
            "train": train,
            "held_out": coverage_of(kept, held_out) if held_out is not None and held_out.sum() else None,
            "eval": {name: coverage_of(kept, c) for name, c in (eval_counts or {}).items()},
            "domains": {name: coverage_of(kept, c) for name, c in (domain_counts or {}).items()},
        }
        value = float(np.asarray(objective(np.array([train]), np.array([reductions[i]]), coverage_weight))[0])
        rows.append(
            LadderRow(k, coverage, float(reductions[i]), float(times[i]), float(speedup(train, times[i])), value)
        )
    return rows


def ladder_lines(rows: Sequence[LadderRow]) -> List[str]:
    """The printed table: one line per K."""
    if not rows:
        return []

    def pct(value) -> str:
        return f"{value:.2%}" if value is not None and np.isfinite(value) else "n/a"

    lines = ["ladder (ladder/k<K>/):"]
    for row in rows:
        c = row.coverage
        parts = [f"train {pct(c['train'])}"]
        if c["held_out"] is not None:
            parts.append(f"held-out {pct(c['held_out'])}")
        parts += [f"{name} {pct(v)}" for name, v in c["eval"].items()]
        parts += [f"domain {name} {pct(v)}" for name, v in c["domains"].items()]
        lines.append(
            f"  k {row.k:>7,}: coverage {', '.join(parts)}; latency reduction {row.latency_reduction:.2%}; "
            f"speed-up {row.predicted_speedup:.3f}x"
        )
    return lines
