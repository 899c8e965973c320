"""The chain speed-up objective: hand-computed values, how its optimum moves, search hooks, defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import llama3_arch, zipf_counts

from specforge_vocab.choosing.cost import DraftArchitecture, latency_reduction
from specforge_vocab.choosing.objectives import (
    DEFAULT_P_FULL,
    DEFAULT_TARGET_COST_RATIO,
    LLAMA_3_8B_DRAFT,
    ObjectiveSettings,
    acceptance_from_length,
    chain_speedup,
    speedup_objective,
    target_cost_ratio,
    target_params_by_component,
    tokens_per_cycle,
)
from specforge_vocab.choosing.search import SearchSettings, coverage_curve, search
from specforge_vocab.errors import InputError

# --------------------------------------------------------------------------- by hand


def test_tokens_per_cycle_by_hand():
    assert tokens_per_cycle(0.5, 1) == pytest.approx(1.5)
    assert tokens_per_cycle(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert tokens_per_cycle(0.0, 4) == 1.0
    assert tokens_per_cycle(1.0, 4) == 5.0  # every draft accepted, plus the target's own token
    assert np.allclose(tokens_per_cycle(np.array([0.2, 0.9]), 2), [1 + 0.2 + 0.04, 1 + 0.9 + 0.81])


def test_chain_speedup_by_hand_at_small_sizes():
    # p = 0.8 * 0.5 = 0.4, g = 2: 1.56 tokens per cycle; cost 2 * 0.5 + 4 = 5 draft(V) units; R = 4.
    assert chain_speedup(0.5, 0.5, p_full=0.8, draft_steps=2, cost_ratio=4.0) == pytest.approx(1.56 * 4 / 5)
    # Full vocabulary: coverage 1, relative time 1; p = 0.7, g = 3: T = 2.533; R = 9: 2.533 * 9 / 12.
    assert chain_speedup(1.0, 1.0, p_full=0.7, draft_steps=3, cost_ratio=9.0) == pytest.approx(2.533 * 9 / 12)
    # A free draft (relative time 0) gives the tokens per cycle; a useless one (p = 0) is slower than plain decoding.
    assert chain_speedup(0.9, 0.0, p_full=1.0, draft_steps=1, cost_ratio=3.0) == pytest.approx(1.9)
    assert chain_speedup(0.0, 1.0, p_full=0.7, draft_steps=2, cost_ratio=8.0) == pytest.approx(8 / 10)

    # As a search objective on a four-token vocabulary: counts 6, 3, 1, 0 (coverage 0.6, 0.9, 1.0, 1.0 at k = 1..4).
    objective = speedup_objective(p_full=1.0, draft_steps=1, cost_ratio=1.0)
    coverage = np.array([0.6, 0.9, 1.0])
    latency = np.array([0.75, 0.5, 0.25])  # relative draft time 0.25, 0.5, 0.75
    expected = [(1 + 0.6) / 1.25, (1 + 0.9) / 1.5, (1 + 1.0) / 1.75]
    assert np.allclose(objective(coverage, latency, 0.123), expected)


def test_exact_and_tpe_search_maximise_the_speedup():
    V = 3000
    counts = zipf_counts(V, 40_000, 1.05, seed=1)
    arch = DraftArchitecture.paper(512, 1536, 8, 2, V)
    objective = speedup_objective(p_full=0.75, draft_steps=3, cost_ratio=5.0)
    s = SearchSettings(min_vocab_size=10, max_vocab_size=V, n_calls=15)
    result = search(counts, arch, s, objective=objective, objective_name="speedup")
    # brute force with the formula written out
    curve = coverage_curve(counts)
    best_k, best = None, -1.0
    for k in range(10, V + 1):
        p = 0.75 * curve[k]
        tokens = sum(p**j for j in range(4))
        value = tokens * 5.0 / (3 * (1 - latency_reduction(arch, k)) + 5.0)
        if value > best + 1e-12:
            best_k, best = k, value
    assert result.exact.pick.k == best_k and result.exact.pick.utility == pytest.approx(best, rel=1e-12)
    assert result.objective == "speedup"
    for trial in result.tpe.trials:
        expected = objective(curve[trial.k], latency_reduction(arch, trial.k), 0.5)
        assert trial.value == pytest.approx(expected, rel=1e-12)
    assert result.tpe.pick.utility <= result.exact.pick.utility


# --------------------------------------------------------------------------- how the optimum moves


@pytest.fixture(scope="module")
def llama_setup():
    V = 128256
    arch = llama3_arch()
    return coverage_curve(zipf_counts(V, 2_000_000, 1.1, seed=3)), arch


def best_k(curve, arch, *, p_full, draft_steps, cost_ratio):
    s = SearchSettings(min_vocab_size=50, max_vocab_size=128256, n_calls=1, search="exact")
    return search(
        curve, arch, s, objective=speedup_objective(p_full=p_full, draft_steps=draft_steps, cost_ratio=cost_ratio)
    ).exact.pick.k


def test_a_dearer_target_makes_k_larger(llama_setup):
    # Higher R = t_target / t_draft(V): the draft's share of each cycle shrinks, so its head costs less.
    ks = [best_k(*llama_setup, p_full=0.7, draft_steps=3, cost_ratio=r) for r in (1.0, 3.0, 9.0, 30.0, 100.0)]
    assert ks == sorted(ks) and ks[-1] > 2 * ks[0]


def test_higher_full_vocabulary_acceptance_makes_k_larger(llama_setup):
    # p T'(p) / T(p) grows with p: each covered token is worth more when acceptance is high.
    ks = [best_k(*llama_setup, p_full=p, draft_steps=3, cost_ratio=9.0) for p in (0.3, 0.5, 0.7, 0.85, 0.95)]
    assert ks == sorted(ks) and ks[-1] > ks[0]


def test_more_draft_steps_move_k_by_regime(llama_setup):
    # Drafting cheap next to the target (g * r <= 8 * 0.6 << R = 30): the head's cost grows linearly in g,
    # the value of coverage less than linearly (with p_full 0.3 later steps are rarely reached) -> k shrinks.
    cheap = [best_k(*llama_setup, p_full=0.3, draft_steps=g, cost_ratio=30.0) for g in (1, 2, 4, 8)]
    assert cheap == sorted(cheap, reverse=True) and cheap[0] > cheap[-1]
    # Drafting dominating the cycle (g * r >> R): the head's relative cost no longer grows with g,
    # the value of coverage still does -> k grows with g.
    dear = [best_k(*llama_setup, p_full=0.9, draft_steps=g, cost_ratio=0.05) for g in (1, 2, 4, 8)]
    assert dear == sorted(dear) and dear[-1] > dear[0]


# --------------------------------------------------------------------------- defaults and the target's cost


def test_default_acceptance_is_what_published_acceptance_lengths_imply():
    # tau for yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, chain of K = 7 (MT-bench, HumanEval, GSM8K).
    found = []
    for tau in (2.77, 3.49, 3.34):
        p = acceptance_from_length(tau, 7)
        assert sum(p**j for j in range(8)) == pytest.approx(tau, abs=1e-9)
        found.append(round(p, 2))
    assert found == [0.65, 0.74, 0.72]
    assert min(found) <= DEFAULT_P_FULL <= max(found)


def test_default_cost_ratio_recomputed_by_hand():
    h, I, V, L = 4096, 14336, 128256, 32
    target = (
        L * (h * h + 2 * h * 1024 + h * h + 3 * h * I + 2 * h) + h + h * V + h
    )  # layers, norms, head, embedding row
    draft = 3 * h * h + (2 * h * h + 2 * 2 * h * 1024 + h * h) + 3 * h * I + 4 * h + h + h * V
    assert DEFAULT_TARGET_COST_RATIO == round(target / draft, 2) == 9.16
    arch = llama3_arch()
    llama = {
        "hidden_size": h,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": V,
        "torch_dtype": "float16",
    }
    assert target_cost_ratio(llama, arch) == pytest.approx(target / draft, rel=1e-12)
    assert target_cost_ratio(llama, arch, unit="flops") == pytest.approx(
        2
        * (L * (2 * h * h + 2 * h * 1024 + 3 * h * I) + h * V)
        / (2 * (3 * h * h + 3 * h * h + 4 * h * 1024 + 3 * h * I + h * V)),
        rel=1e-12,
    )
    assert LLAMA_3_8B_DRAFT.vocab_size == arch.vocab_size


def test_target_params_of_mixture_of_experts_and_latent_attention():
    moe = {
        "hidden_size": 8,
        "intermediate_size": 32,
        "moe_intermediate_size": 4,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "vocab_size": 100,
    }
    parts = target_params_by_component(moe, source="moe")
    head_dim = 4
    assert parts["attention"] == 3 * (8 * 2 * head_dim + 2 * 8 * 1 * head_dim + 2 * head_dim * 8)
    # layer 0 dense (3*8*32); layers 1-2: 2 active + 1 shared expert of 3*8*4, plus the router 8*16
    assert parts["mlp"] == 3 * 8 * 32 + 2 * ((2 + 1) * 3 * 8 * 4 + 8 * 16)
    assert parts["lm_head"] == 800 and parts["norms"] == 7 * 8
    mla = {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "kv_lora_rank": 4,
        "q_lora_rank": 6,
        "qk_nope_head_dim": 3,
        "qk_rope_head_dim": 1,
        "v_head_dim": 2,
        "vocab_size": 10,
    }
    q = 8 * 6 + 6 * 2 * (3 + 1)
    kv = 8 * (4 + 1) + 4 * 2 * (3 + 2)
    assert target_params_by_component(mla, source="mla")["attention"] == q + kv + 2 * 2 * 8
    with pytest.raises(InputError, match="no 'num_hidden_layers'"):
        target_params_by_component({"hidden_size": 8}, source="bad.json")


def test_objective_settings(tmp_path):
    assert ObjectiveSettings().problems() == []
    bad = ObjectiveSettings(
        objective="tokens",
        p_full=1.5,
        draft_steps=0,
        target_cost_ratio=-1.0,
        target_config=str(tmp_path / "missing.json"),
    )
    flags = [p.split()[0] for p in bad.problems()]
    assert flags == [
        "--objective",
        "--p-full",
        "--draft-steps",
        "--target-cost-ratio",
        "--target-cost-ratio",
        "--target-config",
    ]
    arch = LLAMA_3_8B_DRAFT
    assert ObjectiveSettings(target_cost_ratio=4.0).resolve_cost_ratio(arch) == (4.0, "--target-cost-ratio")
    path = tmp_path / "target.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "torch_dtype": "bfloat16",
            }
        )
    )
    ratio, source = ObjectiveSettings(target_config=str(path)).resolve_cost_ratio(arch, latency_model="bytes")
    assert round(ratio, 2) == DEFAULT_TARGET_COST_RATIO and "weight bytes" in source
