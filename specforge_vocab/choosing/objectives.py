"""What k is chosen for: the paper's weighted utility, or the expected speed-up of chain drafting.

Speed-up model (``--objective speedup``). The draft proposes a chain of ``g`` tokens
(``--draft-steps``), then the target verifies them in one forward pass. A drafted token is
accepted with probability ``p(k) = p_full * coverage(k)``: a token outside the draft
vocabulary can never be drafted, and ``p_full`` is the acceptance rate with the full
vocabulary. ``coverage`` is that of the counts k is chosen on: the data's tokens by default, the
target's own argmax with ``--count-source target-argmax`` (what greedy acceptance is measured
against, docs/SPECFORGE.md section 7); when both are known the serving analysis also reports the
speed-up at the target-argmax coverage. With independent acceptances a cycle yields::

    T(p) = 1 + p + ... + p**g = (1 - p**(g + 1)) / (1 - p)      tokens (the target adds one)

and costs ``g * t_draft(k) + t_target``. Relative to plain decoding (one token per
``t_target``), with ``R = t_target / t_draft(V)`` and ``r(k) = t_draft(k) / t_draft(V) =
1 - latency_reduction(k)`` from the latency model::

    speedup(k) = T(p(k)) * R / (g * r(k) + R)

Example (by hand: p = 0.8 * 0.5 = 0.4, T = 1 + 0.4 + 0.16 = 1.56, cost = 2 * 0.5 + 4 = 5)::

    >>> round(float(chain_speedup(0.5, 0.5, p_full=0.8, draft_steps=2, cost_ratio=4.0)), 6)
    1.248

How the optimum moves (each proved by increasing differences in (k, parameter), so the
argmax is monotone; tests/test_objectives.py checks them):

- higher ``R`` (a dearer target): the draft's share of the cycle shrinks, so a bigger head
  costs less -> k grows (never shrinks);
- higher ``p_full``: the elasticity ``p T'(p) / T(p)`` grows with p, so each covered token is
  worth more -> k grows (never shrinks);
- more steps ``g`` has no fixed direction: coverage is worth more (step j needs j acceptances)
  but the head is paid g times. When drafting is cheap next to the target (``g * r << R``) the
  cost grows linearly in g and the benefit less than linearly -> k shrinks; when drafting
  dominates the cycle (``g * r >> R``) the relative cost of a bigger head stops growing with g
  while the benefit still grows -> k grows.

Defaults and where they come from (all are assumptions about *your* serving; measure yours):

- ``p_full = 0.7``: the acceptance lengths reported for the public
  yuhuili/EAGLE3-LLaMA3.1-Instruct-8B draft (chain of K = 7, temperature 1: MT-bench 2.77,
  HumanEval 3.49, GSM8K 3.34; nebius/EAGLE3-Llama-3.3-70B-Instruct model card on Hugging Face)
  give, under this model (tau = T(p) with g = 7, solved by :func:`acceptance_from_length`),
  p = 0.65, 0.74 and 0.72. That draft keeps 32,000 ids, so its full-vocabulary rate is slightly
  higher; 0.7 is a round figure in that range, not a measurement of your draft.
- ``g = 3``: the chain setting of SGLang's EAGLE-3 examples (``--speculative-eagle-topk 1
  --speculative-num-steps 3 --speculative-num-draft-tokens 4``).
- ``R = 9.16``: weight bytes read per token by Llama-3.1-8B (hidden 4096, 32 layers, 32/8
  heads, intermediate 14336, V 128,256) over those of its EAGLE-3 draft
  (configs/llama3-8B-eagle3.json) with the full LM head (:data:`DEFAULT_TARGET_COST_RATIO`,
  recomputed in the tests). Real drafts are often launch-bound and cost more than their bytes
  suggest; pass ``--target-cost-ratio`` from a measurement, or ``--target-config`` for your
  target's shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops, draft_weight_bytes, dtype_bytes
from specforge_vocab.errors import InputError, ValidatedSettings, must, short

OBJECTIVES = ("utility", "speedup")


DEFAULT_P_FULL = 0.7


DEFAULT_DRAFT_STEPS = 3


#: Llama-3.1-8B's shapes (its public config.json), used for the default cost ratio.
LLAMA_3_1_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}


#: configs/llama3-8B-eagle3.json's shapes (the same draft the paper's tool assumes).
LLAMA_3_8B_DRAFT = DraftArchitecture(4096, 14336, 32, 8, 128, 1, 3, 4096, 128256, None, "bfloat16")


def tokens_per_cycle(p, draft_steps: int):
    """Expected tokens per draft-verify cycle: ``1 + p + ... + p**g`` (g + 1 when p = 1)."""
    p = np.asarray(p, dtype=np.float64)
    g = int(draft_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = (1.0 - p ** (g + 1)) / (1.0 - p)
    out = np.where(p >= 1.0, float(g + 1), closed)
    return float(out) if out.ndim == 0 else out


def chain_speedup(coverage, relative_draft_time, *, p_full: float, draft_steps: int, cost_ratio: float):
    """``T(p_full * coverage) * R / (g * r + R)``: speed-up over plain decoding (see the module docstring)."""
    p = p_full * np.asarray(coverage, dtype=np.float64)
    r = np.asarray(relative_draft_time, dtype=np.float64)
    out = tokens_per_cycle(p, draft_steps) * cost_ratio / (draft_steps * r + cost_ratio)
    return float(out) if np.ndim(out) == 0 else out


def speedup_objective(*, p_full: float, draft_steps: int, cost_ratio: float):
    """An objective for :func:`specforge_vocab.choosing.search.search`: (coverage, latency_reduction, a) -> speed-up."""

    def objective(coverage, latency, coverage_weight):  # coverage_weight is not used by this objective
        return chain_speedup(
            coverage,
            1.0 - np.asarray(latency, dtype=np.float64),
            p_full=p_full,
            draft_steps=draft_steps,
            cost_ratio=cost_ratio,
        )

    objective.__name__ = "speedup"
    return objective


def acceptance_from_length(tau: float, draft_steps: int) -> float:
    """The per-token acceptance ``p`` whose chain of ``g`` drafts yields ``tau`` tokens per cycle."""
    g = int(draft_steps)
    if not 1.0 <= tau <= g + 1:
        raise ValueError(f"tau must be in [1, {g + 1}] for {g} draft steps, but got {tau}")
    low, high = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (low + high)
        if tokens_per_cycle(mid, g) < tau:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def target_params_by_component(config: Mapping[str, Any], *, source: str) -> Dict[str, int]:
    """Parameters a decoder-only target reads per token at batch 1 (active experts only), by component.

    Handles dense Llama-style configs, mixture-of-experts keys (``num_experts_per_tok`` with
    ``moe_intermediate_size`` or ``intermediate_size``, ``n_shared_experts``,
    ``shared_expert_intermediate_size``, ``first_k_dense_replace``) and DeepSeek's latent attention
    (``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``).
    """
    if not isinstance(config, Mapping):
        raise InputError(f"{source}: a target config must be a JSON object, but got {type(config).__name__}.")
    cfg = _section(config)

    def num(key: str, default: Any = ...) -> int:
        value = cfg.get(key)
        if value is None:
            if default is ...:
                raise InputError(
                    f"{source}: the target config has no '{key}'. Pass the target model's own config.json "
                    "(--target-config), or give --target-cost-ratio instead."
                )
            return default
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise InputError(f"{source}: field '{key}' must be a non-negative integer, but got {short(value)}.")
        return int(value)

    h, layers, heads = num("hidden_size"), num("num_hidden_layers"), num("num_attention_heads")
    kv_heads = num("num_key_value_heads", heads)
    head_dim = num("head_dim", h // max(heads, 1))
    if cfg.get("kv_lora_rank"):
        rope, nope = num("qk_rope_head_dim"), num("qk_nope_head_dim")
        v_dim, kv_rank, q_rank = num("v_head_dim"), num("kv_lora_rank"), num("q_lora_rank", 0)
        q = h * q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        attention = q + h * (kv_rank + rope) + kv_rank * heads * (nope + v_dim) + heads * v_dim * h
    else:
        attention = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    intermediate = num("intermediate_size")
    dense_mlp = 3 * h * intermediate
    active = cfg.get("num_experts_per_tok") or cfg.get("experts_per_token")
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    if active and experts:
        expert_size = num("moe_intermediate_size", intermediate)
        shared = num("n_shared_experts", 0) * 3 * h * expert_size + 3 * h * num("shared_expert_intermediate_size", 0)
        moe_mlp = int(active) * 3 * h * expert_size + shared + h * int(experts)  # + the router
        dense_layers = min(num("first_k_dense_replace", 0), layers)
        mlp = dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp
    else:
        mlp = layers * dense_mlp
    return {
        "attention": layers * attention,
        "mlp": mlp,
        "norms": (2 * layers + 1) * h,
        "embedding_row": h,
        "lm_head": h * num("vocab_size"),
    }


def target_cost_ratio(
    target_config: Mapping[str, Any], draft: DraftArchitecture, *, unit: str = "bytes", source: str = "--target-config"
) -> float:
    """``t_target / t_draft(V)`` estimated as a ratio of per-token weight bytes (``unit="bytes"``)
    or matmul FLOPs (``unit="flops"``) of the target and of the draft with its full LM head."""
    parts = target_params_by_component(target_config, source=source)
    if unit == "flops":
        target = 2 * (parts["attention"] + parts["mlp"] + parts["lm_head"])
        return target / draft_flops(draft, draft.vocab_size)
    if unit != "bytes":
        raise ValueError(f"unit must be 'bytes' or 'flops', but got {unit!r}")
    dtype = (
        _section(target_config).get("torch_dtype")
        or _section(target_config).get("dtype")
        or target_config.get("torch_dtype")
    )
    target = sum(parts.values()) * dtype_bytes(dtype if isinstance(dtype, str) else None, source=source)
    return target / draft_weight_bytes(draft, draft.vocab_size)


#: R for Llama-3.1-8B over its EAGLE-3 draft with the full LM head, by weight bytes (see module docstring).
DEFAULT_TARGET_COST_RATIO = round(target_cost_ratio(LLAMA_3_1_8B, LLAMA_3_8B_DRAFT, source="built-in Llama-3.1-8B"), 2)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class ObjectiveSettings(ValidatedSettings):
    """What k is chosen for; one field per flag."""

    objective: str = "utility"
    p_full: float = DEFAULT_P_FULL
    draft_steps: int = DEFAULT_DRAFT_STEPS
    target_cost_ratio: Optional[float] = None
    target_config: Optional[str] = None

    def problems(self) -> List[str]:
        out = []
        if self.objective not in OBJECTIVES:
            out.append(must("--objective", f"one of {', '.join(OBJECTIVES)}", self.objective))
        if not _is_real(self.p_full) or not 0.0 < self.p_full <= 1.0:
            out.append(must("--p-full", "a number in (0, 1]", self.p_full))
        if isinstance(self.draft_steps, bool) or not isinstance(self.draft_steps, int) or self.draft_steps < 1:
            out.append(must("--draft-steps", "a positive integer", self.draft_steps))
        if self.target_cost_ratio is not None and (not _is_real(self.target_cost_ratio) or self.target_cost_ratio <= 0):
            out.append(must("--target-cost-ratio", "a positive number", self.target_cost_ratio))
        if self.target_config is not None and self.target_cost_ratio is not None:
            out.append(
                "--target-cost-ratio and --target-config must not both be given, but got both. Keep the "
                "measured ratio (--target-cost-ratio) or the config to estimate it from (--target-config)."
            )
        if self.target_config is not None and not os.path.isfile(self.target_config):
            out.append(
                f"--target-config {self.target_config} does not exist. Point it at the target model's "
                "config.json (Hugging Face format)."
            )
        return out

    def resolve_cost_ratio(self, draft: DraftArchitecture, *, latency_model: str = "flops"):
        """(R, where it came from): the flag, the target config (FLOPs for the flops model, else bytes), or the default."""
        if self.target_cost_ratio is not None:
            return float(self.target_cost_ratio), "--target-cost-ratio"
        if self.target_config is not None:
            try:
                with open(self.target_config, encoding="utf-8") as handle:
                    config = json.load(handle)
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"--target-config {self.target_config} is not readable JSON ({exc}). Pass the "
                    "target model's config.json."
                ) from None
            unit = "flops" if latency_model == "flops" else "bytes"
            ratio = target_cost_ratio(config, draft, unit=unit, source=f"--target-config {self.target_config}")
            return (
                ratio,
                f"--target-config {self.target_config} (per-token {'FLOPs' if unit == 'flops' else 'weight bytes'})",
            )
        return DEFAULT_TARGET_COST_RATIO, "default (Llama-3.1-8B over its EAGLE-3 draft, weight bytes)"
