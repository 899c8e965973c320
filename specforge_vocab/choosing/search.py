"""Choose draft_vocab_size: the paper's Optuna TPE search and an exact vectorised one.

Everything works on arrays indexed by candidate k:

- ``coverage_curve(counts)[k]``: share of counted tokens held by the k most
  frequent ids (a prefix sum of the sorted counts);
- ``latency`` (any latency model: one value per candidate k, e.g.
  :func:`specforge_vocab.choosing.cost.latency_reduction` over the candidates);
- ``utility = a * coverage + (1 - a) * latency_reduction`` (or another
  objective, see :class:`Objective`, e.g. the chain speed-up of
  :mod:`specforge_vocab.objectives`).

Candidates are every k in [--min-vocab-size, --max-vocab-size] (max clipped to V),
or only the multiples of ``--vocab-multiple`` there (TPE then suggests with that
step). With ``--min-domain-coverage C`` and per-domain counts, a candidate is feasible only
where every domain's coverage reaches C (choosing/domains.py): the exact search maximises over
those, and TPE scores any other trial -1.0 as it does below ``--min-coverage``. Pinned ids
(always kept, counting toward k) shift the coverage curve
(:func:`coverage_curve` with ``pinned_ids``) and raise the smallest candidate to
their number.

:func:`exact_search` scores every candidate in one pass; :func:`tpe_search`
replays the paper's tool (TPESampler(seed), one integer parameter, an
infeasible trial scores -1.0, then its fallback), looking values up in the
same arrays, so both see bit-identical utilities.

Example::

    >>> curve = coverage_curve(np.array([6, 3, 1, 0]))
    >>> curve.tolist()
    [0.0, 0.6, 0.9, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture, latency_reduction
from specforge_vocab.choosing.domains import domain_curves, first_meeting, meets_floor
from specforge_vocab.choosing.holdout import pinned_frequency_order
from specforge_vocab.choosing.studies import best_of, check_storage_settings, run_tpe_trials
from specforge_vocab.counting.engine import NO_TOKENS
from specforge_vocab.errors import InputError, SettingsError, must

logger = logging.getLogger(__name__)


SEARCH_METHODS = ("tpe", "exact")


INFEASIBLE_SCORE = -1.0


#: latency model: candidate ks (int64 array) -> latency reduction per k (float64 array)
LatencyModel = Callable[[np.ndarray], np.ndarray]


#: objective: (coverage, latency_reduction, coverage_weight) arrays/scalars -> utility
Objective = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def coverage_curve(counts: np.ndarray, *, pinned_ids: Sequence[int] = ()) -> np.ndarray:
    """Coverage at every k in [0, V] (float64, length V + 1): top-k count sum / total.

    With ``pinned_ids`` (ids always kept, counting toward k: see
    :func:`specforge_vocab.mapping.kept_token_ids`), entry k >= len(pinned) is the
    coverage of the pinned ids plus the k - len(pinned) most frequent other ids;
    entries below len(pinned) are not valid picks. When every pinned id is among
    the j most frequent ids, entries k >= j equal the unpinned curve bit for bit.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise InputError(f"Token counts must be a non-empty 1-D array, but got shape {counts.shape}.")
    if not np.issubdtype(counts.dtype, np.integer):
        raise InputError(f"Token counts must be integers, but got dtype {counts.dtype}.")
    if counts.min() < 0:
        raise InputError(f"Token counts must be >= 0, but token id {int(np.argmin(counts))} has {int(counts.min())}.")
    ordered = _pinned_first_order_counts(counts.astype(np.int64), pinned_ids)
    prefix = np.concatenate([[0], np.cumsum(ordered)])
    total = int(prefix[-1])
    if total == 0:
        raise InputError(NO_TOKENS)
    # int64 / int: each entry is the exact quotient rounded once, as the paper's int / int.
    return prefix / total


def _pinned_first_order_counts(counts: np.ndarray, pinned_ids: Sequence[int]) -> np.ndarray:
    """Counts sorted descending, with the pinned ids' counts moved to the front."""
    pinned = np.unique(np.asarray(list(pinned_ids), dtype=np.int64))
    if pinned.size == 0:
        return np.sort(counts)[::-1]
    if pinned[0] < 0 or pinned[-1] >= counts.size:
        bad = int(pinned[0] if pinned[0] < 0 else pinned[-1])
        raise InputError(f"Pinned token ids must be in [0, {counts.size}), but got {bad}.")
    rest = np.delete(counts, pinned)
    return np.concatenate([np.sort(counts[pinned])[::-1], np.sort(rest)[::-1]])


def coverage_at(curve: np.ndarray, k: Union[int, np.ndarray]) -> Union[float, np.ndarray]:
    """Coverage of the k most frequent ids (k may be an array)."""
    if np.ndim(k) == 0:
        return float(curve[int(k)])
    return curve[np.asarray(k, dtype=np.int64)]


def k_for_coverage(curve: np.ndarray, min_coverage: float) -> Optional[int]:
    """Smallest k whose coverage reaches ``min_coverage``, or None if none does."""
    hits = np.flatnonzero(curve >= min_coverage)
    return int(hits[0]) if hits.size else None


def weighted_utility(coverage, latency, coverage_weight: float):
    """The paper's utility ``a * coverage + (1 - a) * latency_reduction`` (same operation order)."""
    latency_weight = 1.0 - coverage_weight
    return coverage_weight * coverage + latency_weight * latency


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class SearchSettings:
    """Search options; defaults are the paper tool's."""

    coverage_weight: float = 0.5
    min_coverage: float = 0.0
    min_vocab_size: int = 50
    max_vocab_size: int = 50000
    n_calls: int = 30
    random_state: int = 42
    search: str = "tpe"
    draft_vocab_size: Optional[int] = None
    vocab_multiple: int = 1
    storage: Optional[str] = None
    study_name: Optional[str] = None
    min_domain_coverage: float = 0.0  # every --domain's coverage must reach it (0 = no floor)

    def problems(self, vocab_size: Optional[int] = None) -> List[str]:
        """Every invalid field, each as one message naming its flag."""
        out: List[str] = []
        for flag, value in (
            ("--coverage-weight", self.coverage_weight),
            ("--min-coverage", self.min_coverage),
            ("--min-domain-coverage", self.min_domain_coverage),
        ):
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                out.append(must(flag, "a number in [0, 1]", value))
        sizes_ok = True
        for flag, value in (("--min-vocab-size", self.min_vocab_size), ("--max-vocab-size", self.max_vocab_size)):
            if not _is_int(value) or value < 1:
                out.append(must(flag, "a positive integer", value))
                sizes_ok = False
        if sizes_ok and self.min_vocab_size > self.max_vocab_size:
            out.append(
                must("--min-vocab-size", f"at most --max-vocab-size ({self.max_vocab_size})", self.min_vocab_size)
            )
        if sizes_ok and vocab_size is not None and self.min_vocab_size > vocab_size:
            out.append(must("--min-vocab-size", f"at most the target vocab_size ({vocab_size})", self.min_vocab_size))
        if not _is_int(self.n_calls) or self.n_calls < 1:
            out.append(must("--n-calls", "a positive integer", self.n_calls))
        if not _is_int(self.random_state) or not 0 <= self.random_state < 2**32:
            out.append(must("--random-state", "an integer in [0, 2**32)", self.random_state))
        if self.search not in SEARCH_METHODS:
            out.append(must("--search", f"one of {', '.join(SEARCH_METHODS)}", self.search))
        if self.draft_vocab_size is not None:
            upper = vocab_size if vocab_size is not None else None
            if (
                not _is_int(self.draft_vocab_size)
                or self.draft_vocab_size < 1
                or (upper is not None and self.draft_vocab_size > upper)
            ):
                expected = f"an integer in [1, {upper}] (the target vocab_size)" if upper else "a positive integer"
                out.append(must("--draft-vocab-size", expected, self.draft_vocab_size))
        if not _is_int(self.vocab_multiple) or self.vocab_multiple < 1:
            out.append(must("--vocab-multiple", "a positive integer", self.vocab_multiple))

        out += check_storage_settings(self.storage, self.study_name)
        return out

    def validate(self, vocab_size: Optional[int] = None) -> None:
        found = self.problems(vocab_size)
        if found:
            raise SettingsError(found)

    def search_range(self, vocab_size: int) -> Tuple[int, int]:
        """[min, max] searched; max is clipped to vocab_size as in the paper's tool."""
        return int(self.min_vocab_size), int(min(self.max_vocab_size, vocab_size))

    def candidate_range(self, vocab_size: int, *, at_least: int = 0) -> Tuple[int, int]:
        """[low, high] of the candidates: :meth:`search_range`, raised to ``at_least`` (the number of
        pinned ids) and rounded inward to multiples of ``vocab_multiple``; a clear error if empty."""
        low, high = self.search_range(vocab_size)
        low = max(low, int(at_least))
        step = int(self.vocab_multiple)
        first, last = -(-low // step) * step, (high // step) * step
        if first > last:
            pinned = f" (raised to {low} by the pinned tokens)" if at_least > self.min_vocab_size else ""
            if step > 1:
                raise InputError(
                    f"--vocab-multiple {step} must leave at least one candidate in [--min-vocab-size, "
                    f"--max-vocab-size] = [{low}{pinned}, {high}] (max clipped to the target vocab_size), but no "
                    f"multiple of {step} lies in it. Widen the range to include {first} or lower --vocab-multiple."
                )
            raise InputError(
                f"--min-vocab-size must be at most --max-vocab-size (clipped to the target vocab_size {vocab_size}), "
                f"but the range is [{low}{pinned}, {high}]. Raise --max-vocab-size or pin fewer tokens."
            )
        return first, last

    def candidate_ks(self, vocab_size: int, *, at_least: int = 0) -> np.ndarray:
        """Every candidate k (int64, ascending): the multiples of ``vocab_multiple`` in :meth:`candidate_range`."""
        low, high = self.candidate_range(vocab_size, at_least=at_least)
        return np.arange(low, high + 1, int(self.vocab_multiple), dtype=np.int64)


@dataclasses.dataclass
class Candidates:
    """Scores of every candidate k, aligned arrays (for the exact search and plots)."""

    ks: np.ndarray
    coverage: np.ndarray
    latency_reduction: np.ndarray
    utility: np.ndarray
    feasible: np.ndarray

    def index_of(self, k: int) -> int:
        i = int(np.searchsorted(self.ks, k))
        if i >= self.ks.size or self.ks[i] != k:
            raise KeyError(k)
        return i

    def point(self, k: int) -> "Evaluation":
        i = self.index_of(k)
        return Evaluation(int(k), float(self.coverage[i]), float(self.latency_reduction[i]), float(self.utility[i]))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    k: int
    coverage: float
    latency_reduction: float
    utility: float

    def as_dict(self) -> Dict[str, float]:
        return {"coverage": self.coverage, "latency_reduction": self.latency_reduction, "utility": self.utility}


@dataclasses.dataclass(frozen=True)
class Trial:
    number: int
    k: int
    value: float  # what the objective returned (-1.0 when infeasible)
    coverage: float
    latency_reduction: float
    utility: float


@dataclasses.dataclass
class TPEResult:
    pick: Evaluation
    trials: List[Trial]
    evaluations: Dict[int, Evaluation]  # first-evaluation order, like the paper's cache
    fallback: Optional[str] = None  # None, "best-feasible-evaluated" or "max-vocab-size"


@dataclasses.dataclass
class ExactResult:
    pick: Evaluation
    candidates: Candidates


@dataclasses.dataclass
class SearchResult:
    method: str  # "tpe", "exact" or "fixed"
    pick: Evaluation
    vocab_size: int
    settings: SearchSettings
    exact: Optional[ExactResult] = None
    tpe: Optional[TPEResult] = None
    candidates: Optional[Candidates] = None  # every k in [min, max] scored (for plots), in every mode
    objective: str = "utility"  # what ``utility`` holds: the paper's weighted utility, or e.g. "speedup"
    pinned_ids: Tuple[int, ...] = ()  # ids always kept (they count toward k and the coverage)
    curve: Optional[np.ndarray] = None  # the coverage curve searched (pinned ids first), length V + 1
    domain_curves: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> length V + 1

    @property
    def k(self) -> int:
        return self.pick.k

    @property
    def utility_gap(self) -> Optional[float]:
        """Exact optimum's utility minus TPE pick's (>= 0), or None when not both ran."""
        if self.exact is None or self.tpe is None:
            return None
        return self.exact.pick.utility - self.tpe.pick.utility

    @property
    def relative_utility_gap(self) -> Optional[float]:
        gap = self.utility_gap
        if gap is None or self.exact.pick.utility == 0:
            return None
        return gap / abs(self.exact.pick.utility)


def score_candidates(
    curve: np.ndarray,
    ks: np.ndarray,
    latency: np.ndarray,
    *,
    coverage_weight: float,
    min_coverage: float = 0.0,
    objective: Objective = weighted_utility,
    domain_curves: Optional[Mapping[str, np.ndarray]] = None,
    min_domain_coverage: float = 0.0,
) -> Candidates:
    """Coverage, latency reduction, utility and feasibility (coverage >= min_coverage and, with
    ``domain_curves``, every domain's coverage >= min_domain_coverage) for every candidate k."""
    ks = np.asarray(ks, dtype=np.int64)
    latency = np.asarray(latency, dtype=np.float64)
    if latency.shape != ks.shape:
        raise ValueError(f"latency must have one value per candidate k ({ks.shape}), but got {latency.shape}")
    coverage = curve[ks]
    utility = np.asarray(objective(coverage, latency, coverage_weight), dtype=np.float64)
    feasible = coverage >= min_coverage
    if domain_curves and min_domain_coverage > 0:
        feasible &= meets_floor(domain_curves, ks, min_domain_coverage)
    return Candidates(ks, coverage, latency, utility, feasible)


def _unreachable_coverage(curve: np.ndarray, high: int, min_coverage: float) -> InputError:
    best = float(curve[high])
    k_needed = k_for_coverage(curve, min_coverage)
    where = (
        f"it is first met at k = {k_needed}: raise --max-vocab-size to at least {k_needed}"
        if k_needed is not None
        else "no draft vocabulary reaches it, even the full one"
    )
    return InputError(
        f"--min-coverage must be reachable within [--min-vocab-size, --max-vocab-size], but got {min_coverage!r}: "
        f"the best coverage in range is {best:.6f} (at k = {high}); {where}, or lower --min-coverage."
    )


def _unreachable_domain_floor(curves: Mapping[str, np.ndarray], ks: np.ndarray, floor: float) -> InputError:
    parts = []
    for name, curve in curves.items():
        k_needed = first_meeting(curve, np.arange(curve.size, dtype=np.int64), floor)
        if float(curve[ks[-1]]) < floor:
            where = f"first met at k = {k_needed:,}" if k_needed is not None else "never met, even at V"
            parts.append(f"'{name}' reaches {float(curve[ks[-1]]):.6f} at k = {int(ks[-1]):,} ({where})")
    return InputError(
        f"--min-domain-coverage must be reachable by every --domain within [--min-vocab-size, --max-vocab-size], "
        f"but got {floor!r}: domain {'; '.join(parts) or 'coverage and the domain floors never hold together'}. "
        "Raise --max-vocab-size or lower --min-domain-coverage."
    )


def exact_search(candidates: Candidates) -> ExactResult:
    """The feasible candidate with the highest utility (smallest k on ties)."""
    if not candidates.feasible.any():
        raise InputError("No candidate draft_vocab_size meets --min-coverage (and --min-domain-coverage); lower them.")
    masked = np.where(candidates.feasible, candidates.utility, -np.inf)
    best = int(np.argmax(masked))
    return ExactResult(candidates.point(int(candidates.ks[best])), candidates)


def tpe_search(
    evaluate: Callable[[int], Evaluation],
    *,
    low: int,
    high: int,
    n_trials: int,
    random_state: int,
    min_coverage: float = 0.0,
    step: int = 1,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    fingerprint: Optional[str] = None,
    is_feasible: Optional[Callable[[int], bool]] = None,
) -> TPEResult:
    """The paper's search: Optuna TPESampler(seed=random_state), ``n_trials`` integer trials
    in [low, high]; an infeasible trial (below min_coverage, or ``is_feasible(k)`` False: the
    domain floors) scores -1.0; if the best trial is infeasible, the best feasible evaluated k is
    taken, else ``high``. With ``storage`` and ``study_name`` the study is kept in an Optuna RDB
    storage and resumes (see choosing/studies.py)."""

    evaluations: Dict[int, Evaluation] = {}

    def cached(k: int) -> Evaluation:
        if k not in evaluations:
            evaluations[k] = evaluate(k)
        return evaluations[k]

    def feasible(point: Evaluation) -> bool:
        return point.coverage >= min_coverage and (is_feasible is None or is_feasible(point.k))

    def value(k: int) -> float:
        point = cached(k)
        return point.utility if feasible(point) else INFEASIBLE_SCORE

    pairs = run_tpe_trials(
        value,
        low=low,
        high=high,
        step=step,
        n_trials=n_trials,
        random_state=random_state,
        storage=storage,
        study_name=study_name,
        fingerprint=fingerprint,
        user_attrs=lambda k: {"coverage": cached(k).coverage, "latency_reduction": cached(k).latency_reduction},
    )
    best_k = best_of(pairs)[0]
    trials = [Trial(i, k, v, *_triple(cached(k))) for i, (k, v) in enumerate(pairs)]
    evaluations = {k: cached(k) for k, _ in pairs}  # in trial order, as an uninterrupted run

    pick = cached(best_k)
    fallback = None
    if not feasible(pick):
        valid = [e for e in evaluations.values() if feasible(e)]
        if valid:
            valid.sort(key=lambda e: e.utility, reverse=True)  # stable: first evaluated wins ties
            pick, fallback = valid[0], "best-feasible-evaluated"
        else:
            pick, fallback = cached(high), "max-vocab-size"
        logger.warning(
            "The best TPE trial misses --min-coverage %s (or a domain floor); taking k = %d (%s).",
            min_coverage,
            pick.k,
            fallback,
        )
    return TPEResult(pick, trials, evaluations, fallback)


def _triple(e: Evaluation) -> Tuple[float, float, float]:
    return e.coverage, e.latency_reduction, e.utility


def _as_curve(counts_or_curve: np.ndarray) -> np.ndarray:
    data = np.asarray(counts_or_curve)
    if np.issubdtype(data.dtype, np.floating):
        if data.ndim != 1 or data.size < 2 or data[0] != 0.0 or np.any(np.diff(data) < 0) or data[-1] > 1.0 + 1e-12:
            raise InputError(
                "A coverage curve must be a 1-D float array of length V + 1 that starts at 0, never decreases "
                "and ends at 1; pass integer token counts instead."
            )
        return data
    return coverage_curve(data)


def search(
    counts_or_curve: np.ndarray,
    arch: DraftArchitecture,
    settings: SearchSettings,
    *,
    latency_model: Optional[LatencyModel] = None,
    objective: Objective = weighted_utility,
    objective_name: str = "utility",
    pinned_ids: Sequence[int] = (),
    domain_counts: Optional[Mapping[str, np.ndarray]] = None,
) -> SearchResult:
    """Choose k: TPE pick and exact optimum (both computed, ``settings.search`` picks which
    is used), or only the fixed ``settings.draft_vocab_size``.

    ``counts_or_curve``: integer counts [V] or a float coverage curve [V + 1].
    ``latency_model``: candidate ks -> latency reduction (default: the draft FLOPs model).
    ``objective``: (coverage, latency_reduction, coverage_weight) -> score to maximise (default: the
    paper's utility); ``objective_name`` says what it is in the result.
    ``pinned_ids``: ids always kept (needs counts): coverage is that of the pinned ids plus the
    k - len(pinned) most frequent others, and no candidate is below len(pinned).
    ``domain_counts``: {name: counts [V]} of each --domain (needs counts): their coverage curves
    along the same order are kept in the result, and ``settings.min_domain_coverage`` > 0 makes
    only the k where every domain reaches it feasible.
    Candidates are the multiples of ``settings.vocab_multiple`` in range.
    """
    pinned = tuple(sorted({int(i) for i in pinned_ids}))
    if pinned:
        data = np.asarray(counts_or_curve)
        if np.issubdtype(data.dtype, np.floating):
            raise InputError("Pinned token ids need integer token counts, but a coverage curve was given.")
        curve = coverage_curve(data, pinned_ids=pinned)
    else:
        curve = _as_curve(counts_or_curve)
    vocab_size = curve.size - 1
    if arch.vocab_size != vocab_size:
        raise InputError(
            f"The draft config's vocab_size must equal the number of token ids counted, but the config says "
            f"{arch.vocab_size} and the counts cover {vocab_size} ids. Use the draft config made for this target "
            "model (or recount with --target-vocab-size matching it)."
        )
    settings.validate(vocab_size)
    model = latency_model or (lambda ks: latency_reduction(arch, ks))
    step = int(settings.vocab_multiple)
    curves: Dict[str, np.ndarray] = {}
    if domain_counts:
        data = np.asarray(counts_or_curve)
        if np.issubdtype(data.dtype, np.floating):
            raise InputError("Per-domain coverage needs integer token counts, but a coverage curve was given.")
        curves = domain_curves(pinned_frequency_order(data, pinned), domain_counts)
    floor = float(settings.min_domain_coverage)

    def score(ks: np.ndarray) -> Candidates:
        return score_candidates(
            curve,
            ks,
            model(ks),
            coverage_weight=settings.coverage_weight,
            min_coverage=settings.min_coverage,
            objective=objective,
            domain_curves=curves,
            min_domain_coverage=floor,
        )

    def result(method: str, pick: Evaluation, **parts: Any) -> SearchResult:
        return SearchResult(
            method,
            pick,
            vocab_size,
            settings,
            objective=objective_name,
            pinned_ids=pinned,
            curve=curve,
            domain_curves=curves,
            **parts,
        )

    if pinned and len(pinned) > settings.min_vocab_size:
        logger.info("%d pinned token ids: candidates start at k = %d.", len(pinned), len(pinned))

    if settings.draft_vocab_size is not None:
        k = int(settings.draft_vocab_size)
        if k < len(pinned):
            raise InputError(
                f"--draft-vocab-size must be at least the number of pinned token ids ({len(pinned)}), but got {k}. "
                "Raise it or pin fewer tokens."
            )
        if k % step:
            logger.warning(
                "--draft-vocab-size %d is not a multiple of --vocab-multiple %d; using it as given.", k, step
            )
        fixed = score(np.array([k], dtype=np.int64))
        if not fixed.feasible[0]:
            below = [n for n, c in curves.items() if floor > 0 and c[k] < floor]
            logger.warning(
                "--draft-vocab-size %d covers %.4f of tokens (--min-coverage %s)%s.",
                k,
                fixed.coverage[0],
                settings.min_coverage,
                f"; domains below --min-domain-coverage {floor:g}: {', '.join(below)}" if below else "",
            )
        context = score(settings.candidate_ks(vocab_size, at_least=len(pinned)))  # only drawn, never used to choose
        return result("fixed", fixed.point(k), candidates=context)

    low, high = settings.candidate_range(vocab_size, at_least=len(pinned))
    candidates = score(np.arange(low, high + 1, step, dtype=np.int64))
    if not candidates.feasible.any():
        if curve[high] < settings.min_coverage:
            raise _unreachable_coverage(curve, high, settings.min_coverage)
        raise _unreachable_domain_floor(curves, candidates.ks, floor)
    exact = exact_search(candidates)
    fingerprint = None
    if settings.storage:
        digest = hashlib.sha256(curve.tobytes())
        digest.update(
            repr(
                (
                    settings.coverage_weight,
                    settings.min_coverage,
                    objective_name,
                    arch,
                    model(np.array([low, high], dtype=np.int64)).tolist(),
                )
            ).encode()
        )
        if curves and floor > 0:  # the floors decide which trials are feasible: another floor, another study
            digest.update(repr(floor).encode())
            for name, domain in curves.items():
                digest.update(name.encode() + domain.tobytes())
        fingerprint = digest.hexdigest()
    tpe = tpe_search(
        candidates.point,
        low=low,
        high=high,
        n_trials=settings.n_calls,
        random_state=settings.random_state,
        min_coverage=settings.min_coverage,
        step=step,
        storage=settings.storage,
        study_name=settings.study_name,
        fingerprint=fingerprint,
        is_feasible=lambda k: bool(candidates.feasible[candidates.index_of(k)]),
    )
    pick = tpe.pick if settings.search == "tpe" else exact.pick
    return result(settings.search, pick, exact=exact, tpe=tpe, candidates=candidates)
