"""What ``optimize`` reports: summary.json, full_results.json and optimization_results.png.

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

from .cost import DraftArchitecture, draft_flops_by_component, lm_head_share
from .fileio import atomic_write
from .search import Evaluation, SearchResult

logger = logging.getLogger(__name__)

PAPER_METHOD_NAMES = {"tpe": "optuna", "exact": "exact", "fixed": "fixed"}


def _evaluation(e: Optional[Evaluation]) -> Optional[Dict[str, Any]]:
    if e is None:
        return None
    return {"draft_vocab_size": e.k, **e.as_dict()}


def summary_dict(
    result: SearchResult,
    arch: DraftArchitecture,
    *,
    tokens_counted: int,
    unique_tokens: int,
    settings: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """summary.json: the paper's keys, then the exact optimum, search details, FLOPs and settings.

    ``settings`` adds the caller's other settings (counting options, paths) to the search settings.
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
        "utility": result.pick.utility,
        # --- additions
        "search_method": result.method,
        "exact_optimum": _evaluation(result.exact.pick if result.exact else None),
        "tpe_pick": _evaluation(result.tpe.pick if result.tpe else None),
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
        "architecture": dataclasses.asdict(arch),
        "settings": {**dataclasses.asdict(result.settings), **dict(settings or {})},
    }
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
        "all_evaluations": {str(k): e.as_dict() for k, e in evaluations.items()},
        "trials": [dataclasses.asdict(t) for t in result.tpe.trials] if result.tpe else [],
        "exact_optimum": _evaluation(result.exact.pick if result.exact else None),
    }
    if include_exact_curve and result.candidates is not None:
        c = result.candidates
        out["exact_curve"] = {
            "k": c.ks.tolist(),
            "coverage": c.coverage.tolist(),
            "latency_reduction": c.latency_reduction.tolist(),
            "utility": c.utility.tolist(),
        }
    return out


# --------------------------------------------------------------------------- plot


def render_optimization_results(result: SearchResult, *, title: Optional[str] = None, dpi: int = 120) -> bytes:
    """PNG bytes of the paper's four panels: coverage, latency reduction and utility
    against k, and the coverage / latency Pareto front, with the exact curve drawn in."""
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

    picks = []
    if result.tpe is not None:
        picks.append(("TPE pick", result.tpe.pick, "tab:green", "--"))
    if result.exact is not None:
        picks.append(("exact optimum", result.exact.pick, "tab:red", ":"))
    if result.method == "fixed":
        picks.append(("fixed", result.pick, "tab:green", "--"))

    panels = [
        (axes[0, 0], "coverage", tcov, "Token coverage", "Token coverage vs draft vocab size", "tab:blue"),
        (axes[0, 1], "latency_reduction", tlat, "Latency reduction (relative FLOPs)",
         "Latency reduction vs draft vocab size", "tab:orange"),
        (axes[1, 0], "utility", tutil, "Utility", "Utility vs draft vocab size", "tab:purple"),
    ]
    for ax, field, values, ylabel, panel_title, colour in panels:
        if curve is not None:
            ax.plot(curve.ks, getattr(curve, field), color=colour, linewidth=1.5, label="exact (every k)")
        ax.scatter(tk, values, s=14, color="black", alpha=0.6, zorder=3,
                   label="TPE trials" if result.tpe else "evaluated")
        for label, pick, pcolour, style in picks:
            ax.axvline(pick.k, color=pcolour, linestyle=style, linewidth=1.2, label=f"{label}: {pick.k:,}")
        if field == "coverage" and result.settings.min_coverage > 0:
            ax.axhline(result.settings.min_coverage, color="gray", linestyle="-.", linewidth=1,
                       label=f"min coverage {result.settings.min_coverage:g}")
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
    scatter = ax4.scatter(tlat, tcov, c=tk, cmap="viridis", s=22, alpha=0.8, zorder=3,
                          label="TPE trials" if result.tpe else "evaluated")
    # marker, size, zorder: the TPE star is drawn larger and on top, so both picks stay visible.
    markers = {"TPE pick": ("*", 320, 6), "exact optimum": ("X", 110, 7), "fixed": ("*", 320, 6)}
    for label, pick, pcolour, _ in picks:
        marker, size, order = markers[label]
        ax4.scatter([pick.latency_reduction], [pick.coverage], color=pcolour, s=size, marker=marker,
                    edgecolor="black", zorder=order, label=f"{label}: {pick.k:,}")
    ax4.set_xlabel("Latency reduction")
    ax4.set_ylabel("Token coverage")
    ax4.set_title("Pareto front: coverage vs latency")
    ax4.grid(True, alpha=0.3)
    ax4.legend(fontsize=8, loc="best")
    fig.colorbar(scatter, ax=ax4, label="Draft vocab size k")

    heading = title or (
        f"{PAPER_METHOD_NAMES[result.method]} pick k = {result.k:,} of V = {result.vocab_size:,} "
        f"(coverage {result.pick.coverage:.4f}, utility {result.pick.utility:.6f})"
    )
    fig.suptitle(heading)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_optimization_results(path: str, result: SearchResult, *, title: Optional[str] = None, dpi: int = 120) -> None:
    """Write optimization_results.png atomically."""
    data = render_optimization_results(result, title=title, dpi=dpi)
    atomic_write(path, lambda handle: handle.write(data))


__all__ = ["full_results", "plot_optimization_results", "render_optimization_results", "summary_dict"]
