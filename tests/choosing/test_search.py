"""Coverage curve, settings checks, the exact search and the paper-faithful TPE search."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import optuna
import pytest
from conftest import llama3_arch, zipf_counts

from specforge_vocab.choosing.cost import DraftArchitecture, latency_reduction, paper_latency_reduction
from specforge_vocab.choosing.search import (
    Evaluation,
    SearchSettings,
    coverage_at,
    coverage_curve,
    k_for_coverage,
    score_candidates,
    search,
    tpe_search,
)
from specforge_vocab.errors import InputError, SettingsError


@pytest.fixture(scope="module")
def llama3_zipf():
    return zipf_counts(128256, 3_000_000, 1.1, seed=11)


# --------------------------------------------------------------------------- coverage


def test_coverage_curve_by_hand():
    curve = coverage_curve(np.array([1, 0, 6, 3]))
    assert curve.tolist() == [0.0, 0.6, 0.9, 1.0, 1.0]
    assert coverage_at(curve, 2) == 0.9
    assert coverage_at(curve, np.array([0, 4])).tolist() == [0.0, 1.0]
    assert k_for_coverage(curve, 0.85) == 2
    assert k_for_coverage(curve, 1.0) == 3


def test_coverage_equals_paper_counter_computation_bit_for_bit():
    counts = zipf_counts(20000, 200_000, 1.0, seed=5)
    freq = Counter({i: int(c) for i, c in enumerate(counts) if c})
    total = sum(freq.values())
    curve = coverage_curve(counts)
    for k in (1, 2, 50, 999, 4321, 19999, 20000):
        paper = sum(f for _, f in freq.most_common(k)) / total
        assert curve[k] == paper


def test_coverage_errors():
    with pytest.raises(InputError, match="No loss-masked tokens"):
        coverage_curve(np.zeros(10, dtype=np.int64))
    with pytest.raises(InputError, match=">= 0"):
        coverage_curve(np.array([1, -1]))
    with pytest.raises(InputError, match="integers"):
        coverage_curve(np.array([0.5, 1.0]))


# --------------------------------------------------------------------------- settings


def test_default_settings_are_the_papers_and_valid():
    s = SearchSettings()
    assert (s.coverage_weight, s.min_coverage, s.min_vocab_size, s.max_vocab_size, s.n_calls, s.random_state) == (
        0.5,
        0.0,
        50,
        50000,
        30,
        42,
    )
    assert s.problems(128256) == []


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("coverage_weight", 1.5, "--coverage-weight"),
        ("coverage_weight", float("nan"), "--coverage-weight"),
        ("min_coverage", -0.1, "--min-coverage"),
        ("min_vocab_size", 0, "--min-vocab-size"),
        ("max_vocab_size", 2.5, "--max-vocab-size"),
        ("n_calls", 0, "--n-calls"),
        ("random_state", -1, "--random-state"),
        ("search", "grid", "--search"),
        ("draft_vocab_size", 200000, "--draft-vocab-size"),
        ("draft_vocab_size", True, "--draft-vocab-size"),
    ],
)
def test_each_bad_setting_names_its_flag(field, value, flag):
    s = SearchSettings(**{field: value})
    problems = s.problems(128256)
    assert len(problems) == 1
    assert problems[0].startswith(f"{flag} must be ")
    assert repr(value) in problems[0]


def test_all_problems_reported_together():
    s = SearchSettings(coverage_weight=2, min_vocab_size=600, max_vocab_size=500, n_calls=-3)
    problems = s.problems()
    assert [p.split()[0] for p in problems] == ["--coverage-weight", "--min-vocab-size", "--n-calls"]
    with pytest.raises(SettingsError) as info:
        s.validate()
    assert info.value.problems == problems


def test_min_vocab_size_above_target_vocab():
    problems = SearchSettings(min_vocab_size=1000, max_vocab_size=5000).problems(vocab_size=800)
    assert problems == ["--min-vocab-size must be at most the target vocab_size (800), but got 1000."]


# --------------------------------------------------------------------------- exact search


def test_exact_equals_brute_force_loop():
    V = 3000
    counts = zipf_counts(V, 50_000, 1.05, seed=3)
    arch = DraftArchitecture.paper(512, 1536, 8, 2, V)
    s = SearchSettings(min_vocab_size=10, max_vocab_size=2500, coverage_weight=0.8)
    result = search(counts, arch, s)
    freq = Counter({i: int(c) for i, c in enumerate(counts) if c})
    total = sum(freq.values())
    ranked = [f for _, f in freq.most_common()] + [0] * V
    best_k, best_u = None, -np.inf
    top_k_sum = sum(ranked[:9])
    for k in range(10, 2501):
        top_k_sum += ranked[k - 1]  # Python ints: the exact top-k sum
        cov = top_k_sum / total
        u = 0.8 * cov + (1.0 - 0.8) * paper_latency_reduction(512, 1536, 8, 2, V, k)
        if u > best_u:
            best_k, best_u = k, u
    assert result.exact.pick.k == best_k
    assert result.exact.pick.utility == best_u


def test_exact_respects_min_coverage():
    counts = zipf_counts(128256, 1_000_000, 1.1, seed=2)
    arch = llama3_arch()
    free = search(counts, arch, SearchSettings(n_calls=5))
    target = free.exact.pick.coverage + 0.02
    constrained = search(counts, arch, SearchSettings(n_calls=20, min_coverage=target))
    curve = coverage_curve(counts)
    assert constrained.exact.pick.k == k_for_coverage(curve, target)  # concave utility: the boundary
    assert constrained.exact.pick.coverage >= target
    assert constrained.tpe.pick.coverage >= target
    # Trials below the constraint scored -1.0.
    below = [t for t in constrained.tpe.trials if t.coverage < target]
    assert below and all(t.value == -1.0 for t in below)


def test_unreachable_min_coverage_is_a_clear_error():
    counts = zipf_counts(128256, 1_000_000, 1.1, seed=2)
    curve = coverage_curve(counts)
    needed = 0.5 * (curve[3000] + curve[3001]) + 1e-12  # first met at k = 3001
    with pytest.raises(InputError) as info:
        search(counts, llama3_arch(), SearchSettings(max_vocab_size=2000, min_coverage=needed))
    text = str(info.value)
    assert f"{curve[2000]:.6f}" in text and "k = 2000" in text
    assert "first met at k = 3001" in text and "--max-vocab-size" in text


# --------------------------------------------------------------------------- TPE


def paper_tool_pick(counts, hidden, intermediate, heads, kv, V, *, lo, hi, n_trials, seed, a, min_cov):
    """A plain re-implementation of the paper tool's search loop (Counter coverage, its FLOPs
    formula, TPESampler(seed), -1.0 for infeasible trials, its fallback)."""
    freq = Counter({i: int(c) for i, c in enumerate(counts) if c})
    total = sum(freq.values())
    hi = min(hi, V)
    cache = {}

    def evaluate(k):
        if k not in cache:
            cov = sum(f for _, f in freq.most_common(k)) / total
            lat = paper_latency_reduction(hidden, intermediate, heads, kv, V, k)
            cache[k] = (cov, lat, a * cov + (1.0 - a) * lat)
        return cache[k]

    def objective(trial):
        k = trial.suggest_int("vocab_size", lo, hi)
        cov, _, util = evaluate(k)
        return -1.0 if cov < min_cov else util

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    k = study.best_trial.params["vocab_size"]
    if evaluate(k)[0] < min_cov:
        valid = sorted([(kk, v) for kk, v in cache.items() if v[0] >= min_cov], key=lambda x: x[1][2], reverse=True)
        k = valid[0][0] if valid else hi
    return k, [t.params["vocab_size"] for t in study.trials]


@pytest.mark.parametrize("seed, a, min_cov", [(42, 0.5, 0.0), (7, 0.7, 0.0), (42, 0.5, 0.9)])
def test_tpe_picks_what_the_paper_tool_picks(seed, a, min_cov):
    V = 20000
    counts = zipf_counts(V, 300_000, 1.0, seed=seed)
    arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
    s = SearchSettings(n_calls=30, random_state=seed, coverage_weight=a, min_coverage=min_cov)
    ours = search(counts, arch, s)
    k, trial_ks = paper_tool_pick(
        counts, 4096, 14336, 32, 8, V, lo=50, hi=50000, n_trials=30, seed=seed, a=a, min_cov=min_cov
    )
    assert [t.k for t in ours.tpe.trials] == trial_ks
    assert ours.tpe.pick.k == k
    assert ours.k == k  # --search tpe is the default


@pytest.mark.parametrize("exponent, seed", [(0.9, 1), (1.1, 2), (1.3, 3)])
def test_tpe_100_trials_close_to_exact_and_never_above(llama3_zipf, exponent, seed):
    counts = zipf_counts(128256, 3_000_000, exponent, seed=seed)
    result = search(counts, llama3_arch(), SearchSettings(n_calls=100))
    assert result.utility_gap >= 0.0
    assert result.relative_utility_gap <= 1e-4  # within 0.01%
    assert abs(result.tpe.pick.k - result.exact.pick.k) < 0.05 * result.exact.pick.k


def test_exact_never_lower_than_tpe_over_many_short_runs(llama3_zipf):
    arch = llama3_arch()
    for seed in range(6):
        result = search(llama3_zipf, arch, SearchSettings(n_calls=8, random_state=seed, search="exact"))
        assert result.exact.pick.utility >= result.tpe.pick.utility
        assert result.k == result.exact.pick.k  # --search exact uses the exact optimum


def test_tpe_fallback_to_max_when_no_trial_is_feasible():
    def evaluate(k):
        return Evaluation(k, 1.0 if k == 1000 else 0.1, 0.0, 0.5)

    result = tpe_search(evaluate, low=1, high=1000, n_trials=3, random_state=0, min_coverage=0.9)
    assert all(t.value == -1.0 for t in result.trials)
    assert result.fallback == "max-vocab-size" and result.pick.k == 1000


def test_tpe_fallback_to_best_feasible_evaluated():
    # With negative utilities a feasible trial can score below an infeasible one's -1.0,
    # which is the only way the paper's first fallback branch is reached.
    def evaluate(k):
        feasible = k % 2 == 0
        return Evaluation(k, 0.95 if feasible else 0.1, 0.0, -5.0 - k / 1000 if feasible else 0.0)

    result = tpe_search(evaluate, low=1, high=400, n_trials=20, random_state=1, min_coverage=0.9)
    feasible = [e for e in result.evaluations.values() if e.coverage >= 0.9]
    assert feasible and result.fallback == "best-feasible-evaluated"
    assert result.pick == max(feasible, key=lambda e: e.utility)


def test_optuna_logging_is_silenced_and_restored(llama3_zipf, caplog):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            search(llama3_zipf, llama3_arch(), SearchSettings(n_calls=5))
        assert "Trial 0 finished" not in caplog.text
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- driver


def test_fixed_draft_vocab_size_skips_search(llama3_zipf):
    arch = llama3_arch()
    result = search(llama3_zipf, arch, SearchSettings(draft_vocab_size=32000))
    assert result.method == "fixed" and result.tpe is None and result.exact is None
    assert result.k == 32000
    curve = coverage_curve(llama3_zipf)
    assert result.pick.coverage == curve[32000]
    assert result.pick.latency_reduction == latency_reduction(arch, 32000)


def test_accepts_a_coverage_curve_instead_of_counts(llama3_zipf):
    arch = llama3_arch()
    a = search(llama3_zipf, arch, SearchSettings(n_calls=10))
    b = search(coverage_curve(llama3_zipf), arch, SearchSettings(n_calls=10))
    assert (a.k, a.exact.pick) == (b.k, b.exact.pick)
    with pytest.raises(InputError, match="coverage curve"):
        search(np.array([0.5, 0.2]), arch, SearchSettings())


def test_vocab_size_mismatch_between_config_and_counts():
    with pytest.raises(InputError, match="says 128256 and the counts cover 5000 ids"):
        search(zipf_counts(5000, 1000, 1.0, 0), llama3_arch(), SearchSettings())


def test_max_vocab_size_clipped_to_target_vocab():
    V = 3000
    counts = zipf_counts(V, 30_000, 1.0, seed=9)
    result = search(counts, DraftArchitecture.paper(512, 1536, 8, 2, V), SearchSettings(n_calls=5))
    assert result.exact.candidates.ks[-1] == V
    assert all(t.k <= V for t in result.tpe.trials)


def test_settings_problems_raised_before_searching(llama3_zipf):
    with pytest.raises(SettingsError, match="--coverage-weight"):
        search(llama3_zipf, llama3_arch(), SearchSettings(coverage_weight=-1))


def test_custom_latency_model_and_objective_hooks(llama3_zipf):
    arch = llama3_arch()
    # A latency model that ignores k: coverage alone decides, so the largest k in range wins.
    flat = search(llama3_zipf, arch, SearchSettings(n_calls=5), latency_model=lambda ks: np.zeros(ks.shape))
    assert flat.exact.pick.k == 50000 and flat.exact.pick.latency_reduction == 0.0
    # An objective that only rewards latency: the smallest k wins.
    fastest = search(llama3_zipf, arch, SearchSettings(n_calls=5), objective=lambda cov, lat, a: lat)
    assert fastest.exact.pick.k == 50


def test_score_candidates_shapes_checked():
    curve = coverage_curve(np.array([3, 2, 1]))
    with pytest.raises(ValueError):
        score_candidates(curve, np.array([1, 2]), np.array([0.1]), coverage_weight=0.5)


# --------------------------------------------------------------------------- --vocab-multiple


def test_vocab_multiple_64_exact_is_the_best_multiple_by_brute_force():
    V = 20000
    counts = zipf_counts(V, 300_000, 1.0, seed=8)
    arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
    s = SearchSettings(vocab_multiple=64, n_calls=20, search="exact")
    result = search(counts, arch, s)
    assert result.k % 64 == 0 and result.exact.candidates.ks.tolist() == list(range(64, V + 1, 64))
    freq = Counter({i: int(c) for i, c in enumerate(counts) if c})
    total = sum(freq.values())
    ranked = [f for _, f in freq.most_common()] + [0] * V
    best_k, best_u = None, -np.inf
    for k in range(64, V + 1, 64):  # every multiple of 64 in [50, 20000], the paper's formula
        u = 0.5 * (sum(ranked[:k]) / total) + 0.5 * paper_latency_reduction(4096, 14336, 32, 8, V, k)
        if u > best_u:
            best_k, best_u = k, u
    assert result.k == best_k and result.pick.utility == best_u
    # TPE draws only multiples too and never beats the exact optimum
    assert all(t.k % 64 == 0 for t in result.tpe.trials)
    assert result.tpe.pick.k % 64 == 0 and result.tpe.pick.utility <= best_u
    # the default TPE pick is a multiple as well
    assert search(counts, arch, SearchSettings(vocab_multiple=64, n_calls=20)).k % 64 == 0


def test_vocab_multiple_rounds_the_range_inward_or_says_why_not():
    s = SearchSettings(min_vocab_size=50, max_vocab_size=1000, vocab_multiple=64)
    assert s.candidate_range(128256) == (64, 960)
    assert s.candidate_ks(900).tolist()[-1] == 896  # max clipped to V, then rounded down
    with pytest.raises(InputError, match="--vocab-multiple 64 must leave at least one candidate.*\\[70, 100\\]"):
        SearchSettings(min_vocab_size=70, max_vocab_size=100, vocab_multiple=64).candidate_range(128256)
    assert SearchSettings(vocab_multiple=0).problems() == ["--vocab-multiple must be a positive integer, but got 0."]
    # M = 1 is every k, as before
    assert SearchSettings().candidate_ks(128256).tolist() == list(range(50, 50001))


# --------------------------------------------------------------------------- pinned ids


def test_pinned_curve_is_the_coverage_of_the_kept_set():
    counts = np.array([5, 0, 9, 5, 1, 0, 2])
    curve = coverage_curve(counts, pinned_ids=[5, 1])  # two unseen ids pinned
    total = counts.sum()
    from specforge_vocab.writing.mapping import kept_token_ids

    for k in range(2, 8):
        kept = kept_token_ids(counts, k, pinned_ids=[5, 1])
        assert curve[k] == counts[kept].sum() / total
    # pins already among the most frequent change nothing from there on
    plain = coverage_curve(counts)
    pinned_top = coverage_curve(counts, pinned_ids=[2, 0])
    assert pinned_top[2:].tolist() == plain[2:].tolist()


def test_search_with_pinned_ids_counts_them_toward_k():
    V = 3000
    counts = zipf_counts(V, 50_000, 1.05, seed=3)
    arch = DraftArchitecture.paper(512, 1536, 8, 2, V)
    unseen = [int(i) for i in np.flatnonzero(counts == 0)[:3]]
    s = SearchSettings(min_vocab_size=1, max_vocab_size=V, n_calls=10, search="exact")
    plain = search(counts, arch, s)
    pinned = search(counts, arch, s, pinned_ids=unseen)
    assert pinned.pinned_ids == tuple(sorted(unseen))
    assert pinned.exact.candidates.ks[0] == 3  # no candidate below the number of pinned ids
    # three slots go to never-seen ids: at equal k, coverage is lower by the three smallest kept counts
    assert pinned.exact.candidates.coverage[100] < plain.exact.candidates.coverage[102]
    assert pinned.pick.utility <= plain.pick.utility
    with pytest.raises(InputError, match="integer token counts"):
        search(coverage_curve(counts), arch, s, pinned_ids=unseen)
