"""Choosing k by what serving gains: the serving settings together, and what they report.

:class:`ServingSettings` bundles the evaluation (held-out split, evaluation sets, bootstrap),
latency-model, objective and pinned-token settings; :func:`choose_objective` turns them into
the objective the search maximises, and :func:`analyse` computes, after the search, coverage at
k on every split, the bootstrap intervals, the best k of each objective, the predicted
speed-ups and the rare-token check. ``optimize`` (pipeline.py) calls these.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture
from specforge_vocab.choosing.domains import (
    DomainCounts,
    DomainCoverage,
    coverage_curve_in_order,
    domain_curves,
    domain_lines,
    domain_report,
    meets_floor,
)
from specforge_vocab.choosing.holdout import (
    BootstrapResult,
    BootstrapTally,
    EvaluationSettings,
    HoldoutTally,
    bootstrap_analysis,
    coverage_of,
    pinned_frequency_order,
)
from specforge_vocab.choosing.latency import DraftLatencyModel, LatencySettings
from specforge_vocab.choosing.objectives import ObjectiveSettings, chain_speedup, speedup_objective
from specforge_vocab.choosing.pins import PinnedToken, PinSettings
from specforge_vocab.choosing.search import (
    Candidates,
    Evaluation,
    SearchResult,
    SearchSettings,
    coverage_curve,
    weighted_utility,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServingSettings:
    """The serving settings: evaluation, latency model, objective, pinned tokens (one field per flag each)."""

    evaluation: EvaluationSettings = dataclasses.field(default_factory=EvaluationSettings)
    latency: LatencySettings = dataclasses.field(default_factory=LatencySettings)
    objective: ObjectiveSettings = dataclasses.field(default_factory=ObjectiveSettings)
    pins: PinSettings = dataclasses.field(default_factory=PinSettings)

    def problems(self) -> List[str]:
        return self.evaluation.problems() + self.latency.problems() + self.objective.problems() + self.pins.problems()

    def as_dict(self) -> Dict[str, Any]:
        return {
            name: dataclasses.asdict(getattr(self, name)) for name in ("evaluation", "latency", "objective", "pins")
        }


@dataclasses.dataclass
class ObjectiveChoice:
    """The objective the search maximises and the speed-up model's parameters."""

    name: str
    function: Callable
    p_full: float
    draft_steps: int
    cost_ratio: float
    cost_ratio_source: str

    def speedup(self, coverage, relative_time):
        return chain_speedup(
            coverage, relative_time, p_full=self.p_full, draft_steps=self.draft_steps, cost_ratio=self.cost_ratio
        )

    def speedup_function(self) -> Callable:
        return speedup_objective(p_full=self.p_full, draft_steps=self.draft_steps, cost_ratio=self.cost_ratio)


def choose_objective(settings: ObjectiveSettings, arch: DraftArchitecture, *, latency_model: str) -> ObjectiveChoice:
    ratio, source = settings.resolve_cost_ratio(arch, latency_model=latency_model)
    choice = ObjectiveChoice(
        settings.objective, weighted_utility, float(settings.p_full), int(settings.draft_steps), float(ratio), source
    )
    if settings.objective == "speedup":
        choice.function = choice.speedup_function()
    return choice


def exact_best(candidates: Candidates, scores: np.ndarray) -> Optional[int]:
    """The feasible candidate k with the highest score (smallest k on ties), or None."""
    if not candidates.feasible.any():
        return None
    return int(candidates.ks[int(np.argmax(np.where(candidates.feasible, scores, -np.inf)))])


@dataclasses.dataclass
class ServingAnalysis:
    """What :func:`analyse` found; ``summary()`` is what summary.json adds."""

    k: int
    vocab_size: int
    objective: ObjectiveChoice
    latency: Dict[str, Any]
    pinned: List[PinnedToken]
    pin_notes: List[str]
    coverage_at_k: Dict[str, Any]
    curves: Dict[str, np.ndarray]  # label -> coverage at every candidate k (for the plot)
    ks: np.ndarray
    latency_reduction: np.ndarray
    picks: Dict[str, Evaluation]  # best k of each objective over the same candidates
    speedup: Dict[str, Any]
    rare_tokens: Dict[str, Any]
    holdout: Optional[Dict[str, Any]] = None
    bootstrap: Optional[BootstrapResult] = None
    warnings: List[str] = dataclasses.field(default_factory=list)
    domains: List[DomainCoverage] = dataclasses.field(default_factory=list)
    min_domain_coverage: float = 0.0
    k_without_floor: Optional[int] = None  # the objective's best k without the domain floors
    count_source: str = "tokens"  # what k was chosen on (--count-source)

    def summary(self) -> Dict[str, Any]:
        """JSON-ready: NaN (an empty split, no out-of-bag records) becomes null."""
        return _json_ready(
            {
                "objective": self.objective.name,
                "count_source": self.count_source,
                "latency_model": self.latency,
                "pinned_tokens": [t.as_dict() for t in self.pinned],
                "pinned_tokens_note": "; ".join(self.pin_notes) or None,
                "coverage_at_draft_vocab_size": self.coverage_at_k,
                "holdout": self.holdout,
                "bootstrap": self.bootstrap.as_dict() if self.bootstrap is not None else None,
                "picks_by_objective": {
                    name: {
                        "draft_vocab_size": e.k,
                        "coverage": e.coverage,
                        "latency_reduction": e.latency_reduction,
                        name: e.utility,
                    }
                    for name, e in self.picks.items()
                },
                "speedup": self.speedup,
                "rare_tokens": self.rare_tokens,
                "domains": {d.name: d.as_dict() for d in self.domains} or None,
                "min_domain_coverage": self.min_domain_coverage,
                "binding_domains": [d.name for d in self.domains if d.binding],
                "draft_vocab_size_without_domain_floor": self.k_without_floor,
                "warnings": list(self.warnings),
            }
        )

    def summary_lines(self) -> List[str]:
        lines = []
        cov = self.coverage_at_k

        def percent(value) -> str:
            return f"{value:.4%}" if value is not None and np.isfinite(value) else "n/a (no tokens)"

        parts = [f"train {percent(cov['train'])}"]
        if cov.get("target_argmax") is not None:
            parts = [f"data tokens {percent(cov['data_tokens'])}", f"target argmax {percent(cov['target_argmax'])}"]
        if cov.get("held_out") is not None:
            parts.append(f"held-out {percent(cov['held_out'])}")
        parts += [f"{name} {percent(value)}" for name, value in (cov.get("eval") or {}).items()]
        lines.append(f"coverage at k = {self.k:,}: " + ", ".join(parts))
        if self.domains:
            lines += domain_lines(self.domains, self.min_domain_coverage, self.k_without_floor)
        if cov.get("target_positions_dropped") is not None:
            lines.append(
                f"SpecForge drops {percent(cov['target_positions_dropped'])} of the trained positions at this k "
                "(their target argmax is not kept)"
            )
        if self.bootstrap is not None:
            b = self.bootstrap.as_dict()
            level = f"{self.bootstrap.confidence:.0%}"
            cov = b["coverage_at_k"]
            oob, ins, unseen = cov["out_of_bag"]["interval"], cov["in_sample"]["interval"], cov["unseen"]
            kk = b["chosen_k"]["interval"]
            lines.append(
                f"bootstrap ({self.bootstrap.replicates} replicates, {level}): chosen k in [{kk[0]:,}, {kk[1]:,}]; "
                f"coverage at k on unseen conversations {unseen['estimate']:.4%} in [{unseen['interval'][0]:.4%}, "
                f"{unseen['interval'][1]:.4%}] (in-sample [{ins[0]:.4%}, {ins[1]:.4%}], "
                f"out-of-bag [{oob[0]:.4%}, {oob[1]:.4%}])"
            )
        s = self.speedup
        lines.append(
            f"predicted chain speed-up (p_full {s['p_full']}, g {s['draft_steps']}, R {s['target_cost_ratio']:.2f}): "
            f"{s['at_draft_vocab_size']:.4f}x at k vs {s['at_full_vocab']:.4f}x at V "
            f"({self.latency['name']} latency model)"
            + (
                f"; {s['at_draft_vocab_size_target_argmax']:.4f}x at k on the target-argmax coverage"
                if "at_draft_vocab_size_target_argmax" in s
                else ""
            )
        )
        picks = ", ".join(f"{name} {e.k:,}" for name, e in self.picks.items())
        lines.append(f"best k by objective (exact): {picks}")
        if self.latency.get("fit"):
            fit = self.latency["fit"]
            lines.append(
                f"measured draft time on {fit['device']} ({fit['dtype']}): {fit['intercept_s'] * 1e6:.1f} us + "
                f"{fit['slope_s_per_row'] * 1e9:.3f} ns * k (R^2 {fit['r_squared']:.3f}"
                f"{', cached' if fit.get('cached') else ''})"
            )
        if self.pinned:
            lines.append(
                "pinned: " + ", ".join(f"{t.id} {t.token!r}" if t.token is not None else str(t.id) for t in self.pinned)
            )
        return lines  # the warnings were logged when found (each is said once)


def _kept(order: np.ndarray, k: int) -> np.ndarray:
    return order[:k]


SOURCE_LABELS = {"tokens": "data tokens", "target-argmax": "target argmax"}


def source_coverage(order: np.ndarray, kept: np.ndarray, by_source: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Coverage of the kept ids on each count source, and the share of trained positions SpecForge drops.

    >>> counts = {"tokens": np.array([5, 3, 2]), "target-argmax": np.array([2, 6, 2])}
    >>> out = source_coverage(np.array([0, 1, 2]), np.array([0]), counts)
    >>> out["data_tokens"], out["target_argmax"], out["target_positions_dropped"]
    (0.5, 0.2, 0.8)
    """
    out: Dict[str, Any] = {}
    for name, counts in by_source.items():
        out[SOURCE_LABELS[name].replace(" ", "_")] = coverage_of(kept, counts)
    if "target-argmax" in by_source:
        out["target_positions_dropped"] = 1.0 - out["target_argmax"]
    return out


def _json_ready(value: Any) -> Any:
    """Plain Python values with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def analyse(
    result: SearchResult,
    *,
    arch: DraftArchitecture,
    search_settings: SearchSettings,
    settings: ServingSettings,
    latency_model: DraftLatencyModel,
    objective: ObjectiveChoice,
    search_counts: np.ndarray,
    pinned: Sequence[PinnedToken] = (),
    pin_notes: Sequence[str] = (),
    holdout: Optional[HoldoutTally] = None,
    bootstrap: Optional[BootstrapTally] = None,
    eval_counts: Optional[Dict[str, np.ndarray]] = None,
    domains: Optional[DomainCounts] = None,
    by_source: Optional[Dict[str, np.ndarray]] = None,
    count_source: str = "tokens",
) -> ServingAnalysis:
    """Everything the serving analysis reports about the pick ``result`` (k chosen on ``search_counts``).

    ``by_source``: the counts of every count source of the same data ("tokens", "target-argmax");
    with two, the coverage of the kept set is reported on each, with the share of trained positions
    SpecForge drops at k (those whose target argmax is not kept).
    """
    k, V = result.k, result.vocab_size
    pins = [t.id for t in pinned]
    order = pinned_frequency_order(search_counts, pins)
    kept = _kept(order, k)
    candidates = result.candidates
    ks = candidates.ks
    warnings: List[str] = []

    # coverage at k and curves over the candidates
    coverage = {"train": coverage_of(kept, search_counts), "held_out": None, "eval": {}}
    curves = {"train": result.curve[ks]}
    if by_source and len(by_source) > 1:
        coverage.update(source_coverage(order, kept, by_source))
        curves = {f"{SOURCE_LABELS[count_source]} (k chosen on these)": result.curve[ks]}
        for name, counts in by_source.items():
            if name != count_source:
                curves[SOURCE_LABELS[name]] = coverage_curve_in_order(order, counts)[ks]
    if holdout is not None:
        if holdout.held_out.sum():
            coverage["held_out"] = coverage_of(kept, holdout.held_out)
            curves["held-out"] = coverage_curve_in_order(order, holdout.held_out)[ks]
        else:
            warnings.append(
                "the held-out split is empty (no record hashed below --holdout-fraction, or its records "
                "have no loss-masked tokens); raise --holdout-fraction"
            )
    for name, counts in (eval_counts or {}).items():
        coverage["eval"][name] = coverage_of(kept, counts)
        curves[name] = coverage_curve_in_order(order, counts)[ks]
    floor = float(search_settings.min_domain_coverage)
    domain_coverage: List[DomainCoverage] = []
    k_without_floor = None
    if domains is not None and result.domain_curves:
        if floor > 0 and result.method != "fixed":
            without = dataclasses.replace(candidates, feasible=candidates.coverage >= search_settings.min_coverage)
            k_without_floor = exact_best(without, candidates.utility)
        domain_coverage = domain_report(
            result.domain_curves,
            ks,
            k,
            floor=floor,
            paths=domains.paths,
            tokens={name: int(c.sum()) for name, c in domains.counts.items()},
            in_pass=domains.in_pass,
            k_without_floor=k_without_floor,
        )
        for d in domain_coverage:
            label = f"domain {d.name}" + (f" (binds: k >= {d.k_needed:,})" if d.binding else "")
            curves[label] = result.domain_curves[d.name][ks]

    # the best k of each objective, exactly, over the same candidates
    utility_scores = weighted_utility(
        candidates.coverage, candidates.latency_reduction, search_settings.coverage_weight
    )
    speedup_scores = objective.speedup(candidates.coverage, 1.0 - candidates.latency_reduction)
    picks = {}
    for name, scores in (("utility", utility_scores), ("speedup", speedup_scores)):
        best = exact_best(candidates, scores)
        if best is not None:
            i = candidates.index_of(best)
            picks[name] = Evaluation(
                best, float(candidates.coverage[i]), float(candidates.latency_reduction[i]), float(scores[i])
            )

    # predicted speed-ups
    relative_k = float(latency_model.relative_time(np.array([k]))[0])
    speedup = {
        "p_full": objective.p_full,
        "draft_steps": objective.draft_steps,
        "target_cost_ratio": objective.cost_ratio,
        "target_cost_ratio_source": objective.cost_ratio_source,
        "model": "T(p) * R / (g * t_draft(k)/t_draft(V) + R), T(p) = (1 - p^(g+1)) / (1 - p), p = p_full * coverage",
        "at_draft_vocab_size": objective.speedup(result.pick.coverage, relative_k),
        "at_full_vocab": objective.speedup(1.0, 1.0),
        "relative_draft_time_at_k": relative_k,
    }
    if coverage["held_out"] is not None and np.isfinite(coverage["held_out"]):
        speedup["at_draft_vocab_size_held_out"] = objective.speedup(coverage["held_out"], relative_k)
    if coverage.get("target_argmax") is not None:
        speedup["at_draft_vocab_size_target_argmax"] = objective.speedup(coverage["target_argmax"], relative_k)
    if coverage["eval"]:
        speedup["at_draft_vocab_size_eval"] = {
            name: objective.speedup(c, relative_k) for name, c in coverage["eval"].items() if np.isfinite(c)
        }
    if domain_coverage:
        speedup["at_draft_vocab_size_domain"] = {
            d.name: objective.speedup(d.coverage_at_k, relative_k) for d in domain_coverage
        }

    # rare tokens at the edge of the vocabulary
    pinned_mask = np.zeros(V, dtype=bool)
    pinned_mask[pins] = True
    free_kept = kept[~pinned_mask[kept]]
    kth = int(search_counts[free_kept].min()) if free_kept.size else None
    threshold = int(settings.evaluation.min_token_count)
    rare = int(np.count_nonzero(search_counts[free_kept] < threshold)) if free_kept.size else 0
    rare_tokens = {"min_token_count": threshold, "kth_token_count": kth, "kept_ids_below_min_token_count": rare}
    if kth is not None and kth < threshold:
        message = (
            f"the chosen k = {k:,} keeps {rare:,} ids seen fewer than --min-token-count {threshold} times "
            f"(the k-th most frequent id was seen {kth} times): which of these rare ids make the cut is noise "
            "at this data size; count more data, or prefer a smaller k or the held-out/bootstrap figures"
        )
        warnings.append(message)

    holdout_summary = None
    if holdout is not None:
        holdout_summary = {
            "fraction": holdout.fraction,
            "train_records": holdout.train_records,
            "held_out_records": holdout.held_out_records,
            "train_tokens": int(holdout.train.sum()),
            "held_out_tokens": int(holdout.held_out.sum()),
            "split": "sha256 of each record's canonical JSON; k and the mapping come from the train side",
        }

    boot = None
    if bootstrap is not None:
        lat = candidates.latency_reduction

        def choose_k(counts: np.ndarray) -> int:
            curve = coverage_curve(counts, pinned_ids=pins)
            cov = curve[ks]
            scores = objective.function(cov, lat, search_settings.coverage_weight)
            feasible = cov >= search_settings.min_coverage
            if domains is not None and floor > 0:  # the replicate's own order, the domains' own counts
                replicate_curves = domain_curves(pinned_frequency_order(counts, pins), domains.counts)
                feasible &= meets_floor(replicate_curves, ks, floor)
            if not feasible.any():
                return int(ks[-1])
            return int(ks[int(np.argmax(np.where(feasible, scores, -np.inf)))])

        boot = bootstrap_analysis(
            bootstrap,
            k=k,
            train_coverage=coverage["train"],
            choose_k=choose_k,
            pinned_ids=pins,
            confidence=settings.evaluation.confidence,
        )

    for message in warnings:
        logger.warning("%s.", message)
    return ServingAnalysis(
        k=k,
        vocab_size=V,
        objective=objective,
        latency=latency_model.describe(),
        pinned=list(pinned),
        pin_notes=list(pin_notes),
        coverage_at_k=coverage,
        curves=curves,
        ks=ks,
        latency_reduction=candidates.latency_reduction,
        picks=picks,
        speedup=speedup,
        rare_tokens=rare_tokens,
        holdout=holdout_summary,
        bootstrap=boot,
        warnings=warnings,
        domains=domain_coverage,
        min_domain_coverage=floor,
        k_without_floor=k_without_floor,
        count_source=count_source,
    )
