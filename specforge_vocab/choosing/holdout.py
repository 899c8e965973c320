"""Honest coverage: a held-out split by record hash, evaluation sets, and a Poisson bootstrap.

Coverage measured on the records the vocabulary was chosen from is optimistic: a small set's
rare tail is noise, and other domains differ. Three tools, all filled in the counting pass
(they are :class:`specforge_vocab.counting.engine.Tally` subclasses, so multi-process counting can
fill ``fresh()`` copies and ``merge`` them):

- :class:`HoldoutTally`: each record goes to the held-out side when the first 8 bytes of
  ``sha256(json.dumps(record, sort_keys=True))`` (as a fraction of 2**64) fall below
  ``--holdout-fraction``. The split depends only on the record's content (not its position,
  file or the worker that read it), so it is the same on every run, and exact duplicates land
  on the same side. k is chosen on the train side.
- Evaluation sets (``--eval-dataset-path``) are counted with the same settings; coverage at k
  of the kept ids is reported for each.
- :class:`BootstrapTally` (``--bootstrap N``): a Poisson bootstrap over conversations. Each
  train record gets N weights ~ Poisson(1), drawn from a generator seeded by (``--random-state``,
  record hash), so the weights do not depend on reading order or on how records were split
  among workers. It accumulates, for every replicate b, the weighted counts (in-bag) and the
  counts of the records whose weight is 0 (out-of-bag, about e**-1 = 37% of records): two
  [V, N] arrays, int32 (promoted to int64 before any replicate could overflow), so memory is
  8 * V * N bytes, e.g. 103 MB for V = 128,256 and N = 100. :func:`bootstrap_analysis` then
  re-chooses k on each replicate (the exact search, vectorised) and reports percentile
  intervals for the chosen k and for coverage at k seen three ways (:class:`BootstrapResult`):
  in-sample (optimistic), out-of-bag (pessimistic) and, between them, what unseen
  conversations of the same kind should see.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.choosing.domains import domain_problems, parse_domains
from specforge_vocab.counting.engine import Tally, add_ids
from specforge_vocab.errors import ValidatedSettings, must

logger = logging.getLogger(__name__)


INT32_HEADROOM = 2**31 - 1


def record_digest(data: Any) -> bytes:
    """sha256 of the record's canonical JSON (sorted keys, no whitespace, UTF-8)."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).digest()


def holdout_unit(digest: bytes) -> float:
    """The digest's first 8 bytes as a number in [0, 1)."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(digest: bytes, fraction: float) -> bool:
    return fraction > 0.0 and holdout_unit(digest) < fraction


def poisson_weights(digest: bytes, seed: int, replicates: int) -> np.ndarray:
    """``replicates`` Poisson(1) weights for one record, fixed by (seed, record digest)."""
    words = [int.from_bytes(digest[i : i + 4], "big") for i in range(0, 16, 4)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *words])))
    return rng.poisson(1.0, replicates).astype(np.int64)


class HoldoutTally(Tally):
    """Masked-id counts of the train and the held-out records (split by record hash)."""

    def __init__(self, vocab_size: int, fraction: float):
        self.vocab_size = int(vocab_size)
        self.fraction = float(fraction)
        self.train = np.zeros(self.vocab_size, dtype=np.int64)
        self.held_out = np.zeros(self.vocab_size, dtype=np.int64)
        self.train_records = 0
        self.held_out_records = 0

    def add(self, record, ids: np.ndarray) -> None:
        if is_held_out(record_digest(record.data), self.fraction):
            add_ids(self.held_out, ids)
            self.held_out_records += 1
        else:
            add_ids(self.train, ids)
            self.train_records += 1

    def merge(self, other: "HoldoutTally") -> None:
        self.train += other.train
        self.held_out += other.held_out
        self.train_records += other.train_records
        self.held_out_records += other.held_out_records

    def fresh(self) -> "HoldoutTally":
        return HoldoutTally(self.vocab_size, self.fraction)


class BootstrapTally(Tally):
    """Poisson-bootstrap replicate counts of the train records: in-bag (weighted) and out-of-bag, [V, N]."""

    def __init__(self, vocab_size: int, replicates: int, seed: int, *, holdout_fraction: float = 0.0):
        self.vocab_size = int(vocab_size)
        self.replicates = int(replicates)
        self.seed = int(seed)
        self.holdout_fraction = float(holdout_fraction)
        self.in_bag = np.zeros((self.vocab_size, self.replicates), dtype=np.int32)
        self.out_of_bag = np.zeros((self.vocab_size, self.replicates), dtype=np.int32)
        self.in_bag_totals = np.zeros(self.replicates, dtype=np.int64)
        self.out_of_bag_totals = np.zeros(self.replicates, dtype=np.int64)
        self.records = 0

    def _room(self, extra_in: np.ndarray, extra_out: np.ndarray) -> None:
        """Promote to int64 before any replicate's total (which bounds every entry) could pass int32."""
        if self.in_bag.dtype == np.int32 and np.max(self.in_bag_totals + extra_in, initial=0) > INT32_HEADROOM:
            self.in_bag = self.in_bag.astype(np.int64)
        if self.out_of_bag.dtype == np.int32 and np.max(self.out_of_bag_totals + extra_out, initial=0) > INT32_HEADROOM:
            self.out_of_bag = self.out_of_bag.astype(np.int64)

    def add(self, record, ids: np.ndarray) -> None:
        digest = record_digest(record.data)
        if is_held_out(digest, self.holdout_fraction) or ids.size == 0:
            return
        weights = poisson_weights(digest, self.seed, self.replicates)
        unique, counts = np.unique(ids, return_counts=True)
        zero = weights == 0
        self._room(weights * ids.size, zero * ids.size)
        self.in_bag[unique] += (counts[:, None] * weights[None, :]).astype(self.in_bag.dtype)
        if zero.any():
            columns = np.flatnonzero(zero)
            self.out_of_bag[np.ix_(unique, columns)] += counts[:, None].astype(self.out_of_bag.dtype)
        self.in_bag_totals += weights * ids.size
        self.out_of_bag_totals += zero * ids.size
        self.records += 1

    def merge(self, other: "BootstrapTally") -> None:
        self._room(other.in_bag_totals, other.out_of_bag_totals)
        if other.in_bag.dtype == np.int64:
            self.in_bag = self.in_bag.astype(np.int64)
        if other.out_of_bag.dtype == np.int64:
            self.out_of_bag = self.out_of_bag.astype(np.int64)
        self.in_bag += other.in_bag
        self.out_of_bag += other.out_of_bag
        self.in_bag_totals += other.in_bag_totals
        self.out_of_bag_totals += other.out_of_bag_totals
        self.records += other.records

    def fresh(self) -> "BootstrapTally":
        return BootstrapTally(self.vocab_size, self.replicates, self.seed, holdout_fraction=self.holdout_fraction)

    # Pickled (sent between worker processes) as the touched rows only: a chunk of records
    # touches a few thousand ids, so a copy costs megabytes, not 8 * V * N bytes.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        rows = np.flatnonzero(self.in_bag.any(axis=1) | self.out_of_bag.any(axis=1))
        state["rows"] = rows
        state["in_bag"] = self.in_bag[rows]
        state["out_of_bag"] = self.out_of_bag[rows]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        rows = state.pop("rows")
        for name in ("in_bag", "out_of_bag"):
            part = state[name]
            full = np.zeros((state["vocab_size"], state["replicates"]), dtype=part.dtype)
            full[rows] = part
            state[name] = full
        self.__dict__.update(state)

    def replicate(self, b: int) -> np.ndarray:
        """In-bag (weighted) counts of replicate ``b`` as int64 [V]."""
        return self.in_bag[:, b].astype(np.int64)

    def replicate_out_of_bag(self, b: int) -> np.ndarray:
        return self.out_of_bag[:, b].astype(np.int64)


def pinned_frequency_order(counts: np.ndarray, pinned_ids: Sequence[int] = ()) -> np.ndarray:
    """Token ids in the order the draft vocabulary takes them: pinned ids, then the rest by count
    (descending, ties to the smaller id). The first k are exactly ``kept_token_ids(counts, k, pinned_ids=...)``."""
    counts = np.asarray(counts)
    order = np.argsort(-counts.astype(np.int64), kind="stable")
    pinned = np.unique(np.asarray(list(pinned_ids), dtype=np.int64))
    if pinned.size == 0:
        return order
    free = np.ones(counts.shape[0], dtype=bool)
    free[pinned] = False
    return np.concatenate([pinned, order[free[order]]])


def coverage_of(kept_ids: np.ndarray, counts: np.ndarray) -> float:
    """Share of ``counts`` held by ``kept_ids`` (NaN when ``counts`` is empty)."""
    total = int(np.sum(counts))
    return float(np.sum(counts[kept_ids])) / total if total else float("nan")


#: weight of the out-of-bag estimate in Efron's .632 estimator (1 - e**-1: the share of distinct records in a replicate)
WEIGHT_632 = 1.0 - math.exp(-1.0)


@dataclasses.dataclass
class BootstrapResult:
    """Per-replicate values and their percentile intervals.

    Three views of coverage at k, because the k ids were chosen from the same records:

    - ``in_sample``: each replicate's own top-k on itself. Its percentile interval is the classic
      bootstrap interval of the train coverage, and it is optimistic for new conversations (the
      ids were picked because they are frequent in these records).
    - ``out_of_bag``: the top-k of each replicate's in-bag records on its out-of-bag records,
      conversations that did not take part in the choice. It is pessimistic: the choice saw only
      about 63% distinct conversations.
    - ``unseen``: Efron's .632 estimate ``0.368 * train + 0.632 * out_of_bag`` (per replicate)
      as the point, and an interval from the out-of-bag lower bound to the .632 upper bound: the
      coverage unseen conversations of this kind see lies between the pessimistic and the blended
      estimate (on gsm8k the .632 point alone is slightly optimistic, the out-of-bag one pessimistic;
      see tests/test_holdout.py and benchmarks/bench_holdout.py).
    """

    replicates: int
    seed: int
    confidence: float
    records: int
    k: int
    train_coverage: float  # the apparent coverage at k (the data k was chosen on)
    chosen_k: np.ndarray  # k re-chosen on each replicate (exact search)
    coverage_in_sample: np.ndarray  # coverage at k on each replicate, its own top-k
    coverage_out_of_bag: np.ndarray  # coverage at k on each replicate's out-of-bag records, in-bag top-k

    def interval(self, values: np.ndarray, *, integer: bool = False) -> List[float]:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return [float("nan"), float("nan")]
        tail = (1.0 - self.confidence) / 2.0
        if integer:
            return [int(np.quantile(finite, tail, method="lower")), int(np.quantile(finite, 1 - tail, method="higher"))]
        return [float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))]

    @property
    def coverage_632(self) -> np.ndarray:
        return (1.0 - WEIGHT_632) * self.train_coverage + WEIGHT_632 * self.coverage_out_of_bag

    @property
    def unseen_estimate(self) -> float:
        values = self.coverage_632[np.isfinite(self.coverage_632)]
        return float(np.mean(values)) if values.size else float("nan")

    @property
    def unseen_interval(self) -> List[float]:
        return [self.interval(self.coverage_out_of_bag)[0], self.interval(self.coverage_632)[1]]

    def as_dict(self) -> Dict[str, Any]:
        def median(values: np.ndarray) -> Optional[float]:
            finite = values[np.isfinite(values)]
            return float(np.median(finite)) if finite.size else None

        return {
            "replicates": self.replicates,
            "seed": self.seed,
            "confidence": self.confidence,
            "records": self.records,
            "method": "Poisson(1) weights per conversation from (seed, record sha256); percentile intervals",
            "chosen_k": {
                "median": int(np.median(self.chosen_k)),
                "interval": self.interval(self.chosen_k, integer=True),
                "note": "k re-chosen by the exact search on each replicate",
            },
            "coverage_at_k": {
                "train": self.train_coverage,
                "in_sample": {
                    "median": median(self.coverage_in_sample),
                    "interval": self.interval(self.coverage_in_sample),
                    "note": "each replicate's top k on itself: optimistic for new conversations",
                },
                "out_of_bag": {
                    "median": median(self.coverage_out_of_bag),
                    "interval": self.interval(self.coverage_out_of_bag),
                    "note": "top k of each replicate's in-bag records on its out-of-bag records: "
                    "pessimistic (the choice saw ~63% distinct conversations)",
                },
                "unseen": {
                    "estimate": self.unseen_estimate,
                    "interval": self.unseen_interval,
                    "note": ".632 estimate (0.368 * train + 0.632 * out-of-bag); interval from the "
                    "out-of-bag lower to the .632 upper percentile",
                },
            },
        }


def bootstrap_analysis(
    tally: BootstrapTally,
    *,
    k: int,
    train_coverage: float,
    choose_k: Callable[[np.ndarray], int],
    pinned_ids: Sequence[int] = (),
    confidence: float = 0.95,
) -> BootstrapResult:
    """Re-choose k on every replicate (``choose_k(in-bag counts) -> k``) and measure coverage at ``k``."""
    n = tally.replicates
    chosen = np.zeros(n, dtype=np.int64)
    in_sample = np.full(n, np.nan)
    out_of_bag = np.full(n, np.nan)
    for b in range(n):
        counts = tally.replicate(b)
        if counts.sum() == 0:
            continue
        kept = pinned_frequency_order(counts, pinned_ids)[:k]
        in_sample[b] = coverage_of(kept, counts)
        out_of_bag[b] = coverage_of(kept, tally.replicate_out_of_bag(b))
        chosen[b] = choose_k(counts)
    return BootstrapResult(
        n, tally.seed, float(confidence), tally.records, int(k), float(train_coverage), chosen, in_sample, out_of_bag
    )


@dataclasses.dataclass
class EvaluationSettings(ValidatedSettings):
    """How the choice is checked; one field per flag."""

    holdout_fraction: float = 0.0
    eval_dataset_paths: List[str] = dataclasses.field(default_factory=list)
    bootstrap: int = 0
    confidence: float = 0.95
    min_token_count: int = 5
    domains: List[List[str]] = dataclasses.field(default_factory=list)  # --domain NAME=PATH [PATH ...], per use

    @property
    def domain_paths(self) -> Dict[str, List[str]]:
        """{domain name: its paths}, in the order given."""
        return parse_domains(self.domains)

    @property
    def needs_records(self) -> bool:
        """True when the counting pass must see the records (a split or a bootstrap)."""
        return self.holdout_fraction > 0 or self.bootstrap > 0

    def problems(self) -> List[str]:
        out = []
        real = isinstance(self.holdout_fraction, numbers.Real) and not isinstance(self.holdout_fraction, bool)
        if not real or not math.isfinite(self.holdout_fraction) or not 0.0 <= self.holdout_fraction < 1.0:
            out.append(must("--holdout-fraction", "a number in [0, 1)", self.holdout_fraction))
        for path in self.eval_dataset_paths:
            if not os.path.exists(path):
                out.append(f"--eval-dataset-path {path} does not exist; check the path (relative to {os.getcwd()}).")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            out.append(must("--bootstrap", "a non-negative integer (0 = off)", self.bootstrap))
        elif self.bootstrap == 1:
            out.append(must("--bootstrap", "0 (off) or at least 2 replicates", self.bootstrap))
        if not isinstance(self.confidence, float) or not 0.0 < self.confidence < 1.0:
            out.append(must("--bootstrap-confidence", "a number in (0, 1)", self.confidence))
        if (
            isinstance(self.min_token_count, bool)
            or not isinstance(self.min_token_count, int)
            or self.min_token_count < 0
        ):
            out.append(must("--min-token-count", "a non-negative integer", self.min_token_count))
        out += domain_problems(self.domains)
        return out
