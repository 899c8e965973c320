"""Per-domain coverage and `--min-domain-coverage`: the search keeps only k where every domain meets
the floor (exact and TPE), checked against brute force over every k of the search range.

Brute force here: the vocabulary at k is the first k ids of a plain Python sort (pinned ids first,
then count descending, ties to the smaller id), and each domain's coverage is summed for every k.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA, llama3_arch, run_cli, shared_data_or_skip, zipf_counts

from specforge_vocab.choosing.search import SearchSettings, search
from specforge_vocab.cli.main import main
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.errors import InputError

GSM8K = str(DATA / "gsm8k_train_sample.jsonl")
HUMANEVAL = str(DATA / "humaneval_sample.jsonl")


def brute_force_coverage(search_counts, domain, pinned=()):
    """Coverage of ``domain`` by the first k ids, for every k in [0, V]."""
    rest = sorted(
        (t for t in range(search_counts.size) if t not in set(pinned)), key=lambda t: (-int(search_counts[t]), t)
    )
    order = sorted(set(pinned)) + rest
    kept_sums = np.concatenate([[0], np.cumsum([int(domain[t]) for t in order])])
    return kept_sums / int(domain.sum())


def brute_force_feasible(search_counts, domains, floor, ks, pinned=()):
    curves = [brute_force_coverage(search_counts, d, pinned) for d in domains]
    return np.array([all(c[k] >= floor for c in curves) for k in ks])


# ---------------------------------------------------------------- synthetic counts


V = 32000
BIG = zipf_counts(V, 400_000, 1.1, seed=3)
SMALL = zipf_counts(V, 8_000, 1.3, seed=4)  # another order of the ids: a small, different domain


@pytest.mark.parametrize("floor", [0.85, 0.90, 0.95])
@pytest.mark.parametrize("pinned", [(), (7, V - 1)])
def test_exact_pick_is_the_best_feasible_k_and_the_smallest_when_the_floor_binds(floor, pinned):
    pooled = BIG + SMALL
    settings = SearchSettings(coverage_weight=0.2, min_domain_coverage=floor, max_vocab_size=V, search="exact")
    result = search(pooled, llama3_arch(V), settings, pinned_ids=pinned, domain_counts={"big": BIG, "small": SMALL})
    ks = result.candidates.ks
    feasible = brute_force_feasible(pooled, [BIG, SMALL], floor, ks, pinned)
    assert np.array_equal(result.candidates.feasible, feasible)
    best = ks[feasible][np.argmax(result.candidates.utility[feasible])]
    assert result.k == best == result.exact.pick.k
    assert result.k == ks[feasible][0]  # the floor binds: the utility alone would choose a smaller k
    free = search(pooled, llama3_arch(V), SearchSettings(coverage_weight=0.2, max_vocab_size=V, search="exact"))
    assert free.k < result.k


def test_tpe_scores_trials_below_the_floor_minus_one_and_picks_a_feasible_k():
    pooled = BIG + SMALL
    settings = SearchSettings(coverage_weight=0.2, min_domain_coverage=0.9, max_vocab_size=V, n_calls=40)
    result = search(pooled, llama3_arch(V), settings, domain_counts={"big": BIG, "small": SMALL})
    ks = np.arange(settings.min_vocab_size, V + 1)
    feasible = dict(zip(ks.tolist(), brute_force_feasible(pooled, [BIG, SMALL], 0.9, ks)))
    assert any(not feasible[t.k] for t in result.tpe.trials)
    for trial in result.tpe.trials:
        assert (trial.value == -1.0) == (not feasible[trial.k]), trial
    assert feasible[result.k]


def test_an_unreachable_floor_names_the_domain_and_the_k_it_needs():
    settings = SearchSettings(min_domain_coverage=0.9, max_vocab_size=3000)
    with pytest.raises(InputError, match=r"--min-domain-coverage must be reachable by every --domain.*'small' reaches"):
        search(BIG + SMALL, llama3_arch(V), settings, domain_counts={"big": BIG, "small": SMALL})


# ---------------------------------------------------------------- real data, end to end


def run_domains(tmp_path, llama3_dir, train, domains, *extra, name="out", weight="0.2"):
    out = tmp_path / name
    argv = ["-q", "optimize", "--dataset-path", *train, "--tokenizer-path", llama3_dir, "--output-dir", str(out)]
    for domain, paths in domains.items():
        argv += ["--domain", f"{domain}={paths[0]}", *paths[1:]]
    argv += ["--no-cache", "--max-vocab-size", "20000", "--coverage-weight", weight, "--export", "ids", *extra]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    counts, _ = load_counts(str(out / "token_counts.safetensors"))
    kept = json.loads((out / "kept_ids.json").read_text())["kept_ids"]
    return summary, counts, kept


def check_floor_on_real_data(tmp_path, llama3_dir, train, domains, floor, weight, *, tpe=True):
    """``weight``: a --coverage-weight at which the floor binds (the utility alone keeps a smaller k)."""
    domain_counts = {name: count_tokens(paths, llama3_dir, chat_template="llama3") for name, paths in domains.items()}
    floor_flags = ["--min-domain-coverage", str(floor)]
    summary, counts, kept = run_domains(
        tmp_path, llama3_dir, train, domains, *floor_flags, "--search", "exact", weight=weight
    )
    k = summary["optimal_draft_vocab_size"]
    pins = summary["pinned_token_ids"]
    for name, dc in domain_counts.items():
        assert dc[kept].sum() / dc.sum() >= floor  # both domains meet the floor at the written mapping
        assert summary["domains"][name]["tokens"] == int(dc.sum())
        assert summary["domains"][name]["counted_in_training_pass"]
    ks = np.arange(50, 20001)
    feasible = brute_force_feasible(counts, list(domain_counts.values()), floor, ks, pins)
    assert k == ks[feasible][0]  # the smallest k of the search range where every domain meets it
    needed = {name: d["k_needed"] for name, d in summary["domains"].items()}
    assert summary["binding_domains"] == [max(needed, key=needed.get)] and max(needed.values()) == k
    free = tmp_path / "free"  # the same counts without the floor: a domain then falls below it
    argv = ["-q", "optimize", "--counts", str(tmp_path / "out" / "token_counts.safetensors"), "--search", "exact"]
    argv += ["--output-dir", str(free), "--max-vocab-size", "20000", "--coverage-weight", weight]
    assert main(argv) == 0
    free_k = json.loads((free / "summary.json").read_text())["optimal_draft_vocab_size"]
    assert free_k < k and summary["draft_vocab_size_without_domain_floor"] == free_k
    if tpe:
        tpe_summary, _, kept_tpe = run_domains(
            tmp_path, llama3_dir, train, domains, *floor_flags, name="tpe", weight=weight
        )
        assert all(dc[kept_tpe].sum() / dc.sum() >= floor for dc in domain_counts.values())
        assert tpe_summary["binding_domains"] == summary["binding_domains"]  # TPE's pick may lie above k_needed
    return summary


def test_floor_on_the_fixtures_gives_the_smallest_k_where_math_and_code_both_meet_it(tmp_path, llama3_dir):
    summary = check_floor_on_real_data(
        tmp_path, llama3_dir, [GSM8K, HUMANEVAL], {"math": [GSM8K], "code": [HUMANEVAL]}, 0.95, "0.05"
    )
    assert summary["min_domain_coverage"] == 0.95


def test_floor_on_the_shared_gsm8k_train_files_and_humaneval(tmp_path, llama3_dir):
    data = shared_data_or_skip()
    math = [str(data / "gsm8k_train_part1.jsonl"), str(data / "gsm8k_train_part2.jsonl")]
    code = [str(data / "humaneval.jsonl")]
    summary = check_floor_on_real_data(
        tmp_path, llama3_dir, math + code, {"math": math, "code": code}, 0.95, "0.2", tpe=False
    )
    assert summary["domains"]["math"]["tokens"] > 20 * summary["domains"]["code"]["tokens"]  # very different sizes


def test_a_domain_outside_the_training_files_is_counted_on_its_own(tmp_path, llama3_dir):
    code = str(DATA / "gpteacher_codegen_sample.jsonl")
    summary, counts, kept = run_domains(tmp_path, llama3_dir, [GSM8K], {"codegen": [code], "math": [GSM8K]})
    assert not summary["domains"]["codegen"]["counted_in_training_pass"]
    assert summary["domains"]["math"]["counted_in_training_pass"]
    expected = count_tokens(code, llama3_dir, chat_template="llama3")
    assert summary["domains"]["codegen"]["tokens"] == int(expected.sum())
    assert summary["domains"]["codegen"]["coverage_at_k"] == pytest.approx(expected[kept].sum() / expected.sum())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--min-domain-coverage", "0.9"], "--min-domain-coverage needs the domains it applies to"),
        (["--domain", "code"], "--domain must start with NAME=PATH"),
        (["--domain", "code=missing.jsonl"], "--domain code: missing.jsonl does not exist"),
        (["--domain", f"a={GSM8K}", f"b={HUMANEVAL}"], "To name a second domain, repeat the flag"),
        (["--domain", f"a={GSM8K}", "--domain", f"a={HUMANEVAL}"], "--domain a is given twice"),
        (
            ["--domain", f"a={GSM8K}", "--min-domain-coverage", "1.5"],
            "--min-domain-coverage must be a number in [0, 1]",
        ),
    ],
)
def test_bad_domain_flags_are_refused_before_any_work(tmp_path, llama3_dir, capsys, argv, message):
    out = tmp_path / "out"
    base = ["optimize", "--dataset-path", GSM8K, "--tokenizer-path", llama3_dir, "--output-dir", str(out)]
    code, _, err = run_cli(base + argv, capsys)
    assert code == 2 and message in err, err
    assert not out.exists()
