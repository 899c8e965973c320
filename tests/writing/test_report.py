"""summary.json / full_results.json contents and the four-panel PNG."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import PAPER_KEYS, llama3_arch, zipf_counts

from specforge_vocab.choosing.cost import paper_latency_reduction
from specforge_vocab.choosing.search import SearchSettings, search
from specforge_vocab.writing.report import (
    full_results,
    plot_optimization_results,
    render_optimization_results,
    summary_dict,
)


@pytest.fixture(scope="module")
def setup():
    counts = zipf_counts(128256, 2_000_000, 1.1, seed=4)
    arch = llama3_arch()
    result = search(counts, arch, SearchSettings(n_calls=25))
    return counts, arch, result


def test_summary_has_the_papers_keys_first_with_their_meaning(setup):
    counts, arch, result = setup
    summary = summary_dict(
        result,
        arch,
        tokens_counted=int(counts.sum()),
        unique_tokens=int(np.count_nonzero(counts)),
        settings={"chat_template": "llama3"},
    )
    assert list(summary)[:7] == PAPER_KEYS
    k = summary["optimal_draft_vocab_size"]
    assert summary["method"] == "optuna" and summary["search_method"] == "tpe"
    assert summary["target_vocab_size"] == 128256
    assert summary["vocab_reduction_ratio"] == 1 - k / 128256
    freq = Counter({i: int(c) for i, c in enumerate(counts) if c})
    assert summary["coverage"] == sum(f for _, f in freq.most_common(k)) / sum(freq.values())
    assert summary["latency_reduction"] == paper_latency_reduction(4096, 14336, 32, 8, 128256, k)
    assert summary["utility"] == 0.5 * summary["coverage"] + 0.5 * summary["latency_reduction"]
    assert summary["exact_optimum"]["utility"] >= summary["utility"]
    assert summary["utility_gap"] == summary["exact_optimum"]["utility"] - summary["utility"]
    assert summary["n_trials"] == 25
    assert summary["tokens_counted"] == 2_000_000
    assert summary["unique_tokens"] == int(np.count_nonzero(counts))
    assert round(summary["lm_head_flop_share"], 3) == 0.641
    assert summary["draft_flops_per_token"]["draft_vocab"]["lm_head"] == 2 * 4096 * k
    assert summary["settings"]["n_calls"] == 25 and summary["settings"]["chat_template"] == "llama3"
    json.dumps(summary, allow_nan=False)


def test_full_results_lists_every_evaluated_k(setup):
    counts, arch, result = setup
    full = full_results(result)
    assert set(full["all_evaluations"]) == {str(t.k) for t in result.tpe.trials}
    for key, entry in full["all_evaluations"].items():
        assert set(entry) == {"coverage", "latency_reduction", "utility"}
        assert entry["latency_reduction"] == paper_latency_reduction(4096, 14336, 32, 8, 128256, int(key))
    assert [t["k"] for t in full["trials"]] == [t.k for t in result.tpe.trials]
    assert full["optimal_vocab_size"] == result.k
    json.dumps(full, allow_nan=False)
    with_curve = full_results(result, include_exact_curve=True)
    assert len(with_curve["exact_curve"]["k"]) == 50000 - 50 + 1


def test_exact_and_fixed_methods(setup):
    counts, arch, _ = setup
    exact = search(counts, arch, SearchSettings(n_calls=5, search="exact"))
    summary = summary_dict(exact, arch, tokens_counted=1, unique_tokens=1)
    assert summary["method"] == "exact" and summary["optimal_draft_vocab_size"] == exact.exact.pick.k
    fixed = search(counts, arch, SearchSettings(draft_vocab_size=32000))
    summary = summary_dict(fixed, arch, tokens_counted=1, unique_tokens=1)
    assert summary["method"] == "fixed" and summary["exact_optimum"] is None and summary["n_trials"] == 0
    assert full_results(fixed)["all_evaluations"].keys() == {"32000"}


def test_plot_is_a_png_written_atomically(setup, tmp_path):
    _, arch, result = setup
    path = tmp_path / "optimization_results.png"
    plot_optimization_results(str(path), result)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["optimization_results.png"]


def test_plot_fixed_mode(setup):
    counts, arch, _ = setup
    fixed = search(counts, arch, SearchSettings(draft_vocab_size=32000))
    assert render_optimization_results(fixed)[:4] == b"\x89PNG"
