"""What ``optimize`` reports: summary.json, full_results.json, optimization_results.png and coverage_curves.png.

The paper's keys come first and keep their meaning (``method`` is "optuna"
for a TPE pick, as in the paper's tool); everything this tool adds (the exact
optimum, the FLOPs, the settings) follows. These functions build plain dicts;
the caller writes them with :func:`specforge_vocab.fileio.json_text`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any, Dict, Mapping, Optional

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops_by_component, lm_head_share
from specforge_vocab.choosing.search import Evaluation, SearchResult, weighted_utility
from specforge_vocab.fileio import atomic_write

logger = logging.getLogger(__name__)


PAPER_METHOD_NAMES = {"tpe": "optuna", "exact": "exact", "fixed": "fixed"}


def _thin(n: int, most: int = 2000) -> np.ndarray:
    """Indices of at most ``most`` evenly spread points of ``n`` (first and last included), for drawing."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(np.int64))


def _scores(e: Evaluation, result: Optional[SearchResult]) -> Dict[str, float]:
    """coverage, latency_reduction, the paper's utility and, for another objective, its value under its name."""
    if result is None or result.objective == "utility":
        return e.as_dict()
    paper = weighted_utility(e.coverage, e.latency_reduction, result.settings.coverage_weight)
    return {
        "coverage": e.coverage,
        "latency_reduction": e.latency_reduction,
        "utility": paper,
        result.objective: e.utility,
    }


def _evaluation(e: Optional[Evaluation], result: Optional[SearchResult] = None) -> Optional[Dict[str, Any]]:
    if e is None:
        return None
    return {"draft_vocab_size": e.k, **_scores(e, result)}


def summary_dict(
    result: SearchResult,
    arch: DraftArchitecture,
    *,
    tokens_counted: int,
    unique_tokens: int,
    settings: Optional[Mapping[str, Any]] = None,
    additions: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """summary.json: the paper's keys, then the exact optimum, search details, FLOPs and settings.

    ``settings`` adds the caller's other settings (counting options, paths) to the search settings;
    ``additions`` (e.g. :meth:`specforge_vocab.serving.ServingAnalysis.summary`) are appended last.
    With an objective other than the paper's utility, ``utility`` keeps the paper's meaning
    (a * coverage + (1 - a) * latency_reduction at the pick), the objective's value is stored
    under its name, and ``utility_gap`` is the gap in that objective.
    """
    k, V = result.k, result.vocab_size
    at_k = draft_flops_by_component(arch, k)
    at_v = draft_flops_by_component(arch, V)
    summary: Dict[str, Any] = {
        "method": PAPER_METHOD_NAMES[result.method],
        "optimal_draft_vocab_size": int(k),
        "target_vocab_size": int(V),
        "vocab_reduction_ratio": 1 - k / V,
        "coverage": result.pick.coverage,
        "latency_reduction": result.pick.latency_reduction,
        "utility": _scores(result.pick, result)["utility"],
        # --- additions
        "search_method": result.method,
        "exact_optimum": _evaluation(result.exact.pick if result.exact else None, result),
        "tpe_pick": _evaluation(result.tpe.pick if result.tpe else None, result),
        "utility_gap": result.utility_gap,
        "relative_utility_gap": result.relative_utility_gap,
        "tpe_fallback": result.tpe.fallback if result.tpe else None,
        "n_trials": len(result.tpe.trials) if result.tpe else 0,
        "distinct_trial_vocab_sizes": len(result.tpe.evaluations) if result.tpe else 0,
        "tokens_counted": int(tokens_counted),
        "unique_tokens": int(unique_tokens),
        "lm_head_flop_share": lm_head_share(arch),
        "lm_head_flop_share_at_draft_vocab_size": lm_head_share(arch, k),
        "draft_flops_per_token": {"full_vocab": at_v, "draft_vocab": at_k},
        # The draft as written: draft_vocab_size is the chosen k (the config's earlier value is kept
        # separately, so a rerun's summary does not depend on the run before it).
        "architecture": {**dataclasses.asdict(arch), "draft_vocab_size": int(k)},
        "settings": {**dataclasses.asdict(result.settings), **dict(settings or {})},
    }
    if result.objective != "utility":
        summary[result.objective] = result.pick.utility
    if result.pinned_ids:
        summary["pinned_token_ids"] = [int(i) for i in result.pinned_ids]
    summary.update(additions or {})
    return summary


def full_results(result: SearchResult, *, include_exact_curve: bool = False) -> Dict[str, Any]:
    """full_results.json: the paper's layout (every TPE-evaluated k with coverage,
    latency_reduction, utility) plus the trials in order and the exact optimum.
    ``include_exact_curve`` adds the scores of every k in range (large)."""
    if result.tpe is not None:
        evaluations = result.tpe.evaluations
    else:
        evaluations = {result.k: result.pick}
    out: Dict[str, Any] = {
        "method": PAPER_METHOD_NAMES[result.method],
        "optimal_vocab_size": int(result.k),
        "coverage": result.pick.coverage,
        "latency_reduction": result.pick.latency_reduction,
        "utility": result.pick.utility,
        "n_trials": len(result.tpe.trials) if result.tpe else 0,
        "all_evaluations": {str(k): _scores(e, result) for k, e in evaluations.items()},
        "trials": [dataclasses.asdict(t) for t in result.tpe.trials] if result.tpe else [],
        "exact_optimum": _evaluation(result.exact.pick if result.exact else None, result),
    }
    if result.objective != "utility":
        out["objective"] = result.objective
        out["utility"] = _scores(result.pick, result)["utility"]
        out[result.objective] = result.pick.utility
    if include_exact_curve and result.candidates is not None:
        c = result.candidates
        out["exact_curve"] = {
            "k": c.ks.tolist(),
            "coverage": c.coverage.tolist(),
            "latency_reduction": c.latency_reduction.tolist(),
            "utility": c.utility.tolist(),
        }
    return out


def render_optimization_results(
    result: SearchResult, *, title: Optional[str] = None, dpi: int = 120, latency_label: str = "relative FLOPs"
) -> bytes:
    """PNG bytes of the paper's four panels: coverage, latency reduction and utility (or the
    search's other objective) against k, and the coverage / latency Pareto front, with the exact
    curve drawn in. ``latency_label`` names the latency model in the second panel's axis."""
    # The Agg canvas is attached to this figure only: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    curve = result.candidates
    trials = sorted(result.tpe.evaluations.values(), key=lambda e: e.k) if result.tpe else [result.pick]
    tk = np.array([e.k for e in trials])
    tcov = np.array([e.coverage for e in trials])
    tlat = np.array([e.latency_reduction for e in trials])
    tutil = np.array([e.utility for e in trials])

    objective_label = "Utility" if result.objective == "utility" else f"Predicted {result.objective}"
    picks = []
    if result.tpe is not None:
        picks.append(("TPE pick", result.tpe.pick, "tab:green", "--"))
    if result.exact is not None:
        picks.append(("exact optimum", result.exact.pick, "tab:red", ":"))
    if result.method == "fixed":
        picks.append(("fixed", result.pick, "tab:green", "--"))

    panels = [
        (axes[0, 0], "coverage", tcov, "Token coverage", "Token coverage vs draft vocab size", "tab:blue"),
        (
            axes[0, 1],
            "latency_reduction",
            tlat,
            f"Latency reduction ({latency_label})",
            "Latency reduction vs draft vocab size",
            "tab:orange",
        ),
        (axes[1, 0], "utility", tutil, objective_label, f"{objective_label} vs draft vocab size", "tab:purple"),
    ]
    for ax, field, values, ylabel, panel_title, colour in panels:
        if curve is not None:
            ax.plot(curve.ks, getattr(curve, field), color=colour, linewidth=1.5, label="exact (every k)")
        ax.scatter(
            tk, values, s=14, color="black", alpha=0.6, zorder=3, label="TPE trials" if result.tpe else "evaluated"
        )
        for label, pick, pcolour, style in picks:
            ax.axvline(pick.k, color=pcolour, linestyle=style, linewidth=1.2, label=f"{label}: {pick.k:,}")
        if field == "coverage" and curve is not None:
            for name, domain in result.domain_curves.items():
                ax.plot(curve.ks, domain[curve.ks], linewidth=1.0, linestyle="--", label=f"domain {name}")
        if field == "coverage":
            floors = [("min coverage", result.settings.min_coverage, "gray")]
            if result.domain_curves:
                floors.append(("min domain coverage", result.settings.min_domain_coverage, "tab:red"))
            for what, value, colour in floors:
                if value > 0:
                    ax.axhline(value, color=colour, linestyle="-.", linewidth=1, label=f"{what} {value:g}")
        if field == "utility" and curve is not None:
            # Zoom near the top so the gap between the picks is visible.
            top = float(curve.utility.max())
            low = min(float(np.min(tutil)), float(np.quantile(curve.utility, 0.05)))
            ax.set_ylim(low - 0.02 * (top - low + 1e-9), top + 0.05 * (top - low + 1e-9))
        ax.set_xlabel("Draft vocabulary size k")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")

    ax4 = axes[1, 1]
    if curve is not None:
        ax4.plot(curve.latency_reduction, curve.coverage, color="gray", linewidth=1.2, label="exact front (every k)")
    scatter = ax4.scatter(
        tlat, tcov, c=tk, cmap="viridis", s=22, alpha=0.8, zorder=3, label="TPE trials" if result.tpe else "evaluated"
    )
    # marker, size, zorder: the TPE star is drawn larger and on top, so both picks stay visible.
    markers = {"TPE pick": ("*", 320, 6), "exact optimum": ("X", 110, 7), "fixed": ("*", 320, 6)}
    for label, pick, pcolour, _ in picks:
        marker, size, order = markers[label]
        ax4.scatter(
            [pick.latency_reduction],
            [pick.coverage],
            color=pcolour,
            s=size,
            marker=marker,
            edgecolor="black",
            zorder=order,
            label=f"{label}: {pick.k:,}",
        )
    ax4.set_xlabel("Latency reduction")
    ax4.set_ylabel("Token coverage")
    ax4.set_title("Pareto front: coverage vs latency")
    ax4.grid(True, alpha=0.3)
    ax4.legend(fontsize=8, loc="best")
    fig.colorbar(scatter, ax=ax4, label="Draft vocab size k")

    heading = title or (
        f"{PAPER_METHOD_NAMES[result.method]} pick k = {result.k:,} of V = {result.vocab_size:,} "
        f"(coverage {result.pick.coverage:.4f}, {result.objective} {result.pick.utility:.6f})"
    )
    fig.suptitle(heading)
    fig.tight_layout()
    buffer = io.BytesIO()
    # compress_level 1: a few percent larger file, a fraction of the encoding time.
    fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def plot_optimization_results(path: str, result: SearchResult, *, title: Optional[str] = None, dpi: int = 120) -> None:
    """Write optimization_results.png atomically."""
    data = render_optimization_results(result, title=title, dpi=dpi)
    atomic_write(path, lambda handle: handle.write(data))


def render_coverage_curves(result: SearchResult, analysis, *, dpi: int = 110) -> bytes:
    """PNG bytes of coverage_curves.png (``analysis``: a :class:`specforge_vocab.serving.ServingAnalysis`).

    Left: coverage against k on the train records, the held-out records, each evaluation set and
    each --domain, with the domain floor (the vocabulary is always the train side's top k), with the
    chosen k and, with --bootstrap, its interval; with offline features and the target's LM head, the
    data-token and target-argmax coverage of the same kept set. Middle: the Pareto front (coverage
    against latency reduction) with the best k
    of each objective marked. Right: predicted chain speed-up against k, with the full-vocabulary
    speed-up for reference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 6))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ks = analysis.ks
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, (label, values) in enumerate(analysis.curves.items()):
        ax1.plot(ks, values, color=colours[i % len(colours)], linewidth=1.5, label=label)
    if analysis.domains and analysis.min_domain_coverage > 0:
        ax1.axhline(
            analysis.min_domain_coverage,
            color="tab:red",
            linestyle="-.",
            linewidth=1,
            label=f"--min-domain-coverage {analysis.min_domain_coverage:g}",
        )
    ax1.axvline(result.k, color="black", linestyle="--", linewidth=1.2, label=f"chosen k = {result.k:,}")
    if analysis.bootstrap is not None:
        low, high = analysis.bootstrap.interval(analysis.bootstrap.chosen_k, integer=True)
        ax1.axvspan(
            low,
            high,
            color="gray",
            alpha=0.2,
            label=f"bootstrap {analysis.bootstrap.confidence:.0%} interval of k: [{low:,}, {high:,}]",
        )
        unseen = analysis.bootstrap.unseen_interval
        if np.all(np.isfinite(unseen)):
            ax1.errorbar(
                [result.k],
                [0.5 * (unseen[0] + unseen[1])],
                yerr=[[0.5 * (unseen[1] - unseen[0])]],
                color="black",
                capsize=5,
                fmt="none",
                label="bootstrap coverage at k on unseen conversations",
            )
    ax1.set_xscale("log")
    ax1.set_xlabel("Draft vocab size k (log scale)")
    ax1.set_ylabel("Token coverage")
    ax1.set_title("Coverage of the train side's top k")
    ax1.grid(True, alpha=0.3, which="both")
    ax1.legend(fontsize=8, loc="lower right")

    shown = _thin(len(ks))  # a few thousand points draw the same front as 50,000, in a fraction of the time
    sc = ax2.scatter(
        np.asarray(analysis.latency_reduction)[shown],
        np.asarray(result.candidates.coverage)[shown],
        c=np.asarray(ks)[shown],
        cmap="viridis",
        s=4,
    )
    markers = {"utility": ("*", "tab:green"), "speedup": ("X", "tab:red")}
    for name, pick in analysis.picks.items():
        marker, colour = markers.get(name, ("o", "black"))
        ax2.scatter(
            [pick.latency_reduction],
            [pick.coverage],
            marker=marker,
            s=220,
            color=colour,
            edgecolor="black",
            zorder=5,
            label=f"best {name}: k = {pick.k:,}",
        )
    i = result.candidates.index_of(result.k) if result.k in set(ks.tolist()) else None
    if i is not None:
        ax2.scatter(
            [result.candidates.latency_reduction[i]],
            [result.candidates.coverage[i]],
            marker="o",
            s=80,
            facecolor="none",
            edgecolor="black",
            linewidth=1.5,
            zorder=6,
            label=f"chosen: k = {result.k:,}",
        )
    ax2.set_xlabel(f"Latency reduction ({analysis.latency['name']} model)")
    ax2.set_ylabel("Token coverage (train)")
    ax2.set_title("Pareto front: coverage vs latency reduction")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8, loc="lower left")
    fig.colorbar(sc, ax=ax2, label="Draft vocab size k")

    speed = analysis.objective.speedup(result.candidates.coverage, 1.0 - analysis.latency_reduction)
    ax3.plot(ks, speed, color="tab:red", linewidth=1.5, label="predicted speed-up (train coverage)")
    if "target argmax" in analysis.curves:  # k chosen on data tokens, the target's argmax known too
        argmax_speed = analysis.objective.speedup(analysis.curves["target argmax"], 1.0 - analysis.latency_reduction)
        ax3.plot(
            ks, argmax_speed, color="tab:purple", linewidth=1.2, label="predicted speed-up (target-argmax coverage)"
        )
    ax3.axhline(
        analysis.speedup["at_full_vocab"],
        color="gray",
        linestyle="-.",
        linewidth=1,
        label=f"full vocabulary: {analysis.speedup['at_full_vocab']:.3f}x",
    )
    ax3.axvline(
        result.k,
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"chosen k: {analysis.speedup['at_draft_vocab_size']:.3f}x",
    )
    s = analysis.speedup
    ax3.set_xscale("log")
    ax3.set_xlabel("Draft vocab size k (log scale)")
    ax3.set_ylabel("Speed-up over plain decoding")
    ax3.set_title(f"Chain drafting: p_full {s['p_full']}, g {s['draft_steps']}, R {s['target_cost_ratio']:.2f}")
    ax3.grid(True, alpha=0.3, which="both")
    ax3.legend(fontsize=8, loc="lower right")

    fig.suptitle(
        f"k = {result.k:,} of V = {result.vocab_size:,} chosen by {analysis.objective.name} "
        f"({result.method}); coverage on train / held-out / evaluation sets"
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    # compress_level 1: a few percent larger file, a fraction of the encoding time.
    fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()
