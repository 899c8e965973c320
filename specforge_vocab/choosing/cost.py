"""Per-token FLOPs of an EAGLE-3 draft, and the latency reduction from trimming its LM head.

The draft (docs/SPECFORGE.md sections 2 and 5) is an ``fc`` layer fusing
``num_fused_layers`` target hidden states, ``num_hidden_layers`` decoder layers
and an LM head with ``k`` rows. Per token, with h = hidden_size,
d = head_dim, I = intermediate_size::

    fc      = 2 * (num_fused_layers * target_hidden_size) * h
    q       = 2 * in * (n_heads * d)       in = 2h for the first layer
    k, v    = 2 * in * (n_kv * d) each          (embeddings ++ hidden), h after
    o       = 2 * (n_heads * d) * h
    mlp     = 3 * 2 * h * I
    lm_head = 2 * h * k

``latency_reduction(k) = 1 - F(k) / F(V)``. With head_dim = h // n_heads, one
layer, three fused layers and target_hidden_size = h this is exactly the paper's
formula (:func:`paper_latency_reduction`).

Batch-1 decoding is memory bound, so :func:`draft_weight_bytes` counts the weight
bytes read per drafted token instead: the same matrices (one parameter per
multiply-add) plus the RMSNorm weights (hidden_norm, input and post-attention
norms per layer, the final norm) and one embedding row, in the config's
``torch_dtype`` (bfloat16 when absent); :func:`bytes_latency_reduction` is
``1 - B(k) / B(V)``. The KV cache read by attention is left out (it depends on the
context length and is the same for every k).

Example (Llama-3-8B draft)::

    >>> arch = DraftArchitecture(4096, 14336, 32, 8, 128, 1, 3, 4096, 128256, 32000)
    >>> round(lm_head_share(arch), 3)
    0.641
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from specforge_vocab.errors import InputError, short

ArrayOrInt = Union[int, np.ndarray]


DEFAULT_FUSED_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class DraftArchitecture:
    """The draft's shapes, as read from its config JSON."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int = 1
    num_fused_layers: int = DEFAULT_FUSED_LAYERS
    target_hidden_size: Optional[int] = None
    vocab_size: int = 0
    draft_vocab_size: Optional[int] = None
    torch_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.target_hidden_size is None:
            object.__setattr__(self, "target_hidden_size", self.hidden_size)

    @classmethod
    def paper(
        cls, hidden: int, intermediate: int, n_heads: int, n_kv: int, vocab: int, draft_vocab: Optional[int] = None
    ) -> "DraftArchitecture":
        """The architecture the paper's tool assumes: head_dim = hidden // n_heads,
        one layer, three fused target layers of the draft's own width."""
        return cls(
            hidden, intermediate, n_heads, n_kv, hidden // n_heads, 1, DEFAULT_FUSED_LAYERS, hidden, vocab, draft_vocab
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str) -> "DraftArchitecture":
        """Read the architecture from a parsed draft config; ``source`` (the file) names it in errors."""
        if not isinstance(config, Mapping):
            raise InputError(f"{source}: a draft config must be a JSON object, but got {type(config).__name__}.")

        def positive_int(key: str, default: Any = ..., *, allow_zero: bool = False) -> Any:
            if key not in config or config[key] is None:
                if default is ...:
                    raise InputError(
                        f"{source}: the draft config has no '{key}'. Every EAGLE-3 draft config needs "
                        f"'{key}' (see SpecForge configs/*.json); add it."
                    )
                return default
            value = config[key]
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise InputError(
                    f"{source}: field '{key}' must be a {'non-negative' if allow_zero else 'positive'} integer, "
                    f"but got {short(value)}. Fix the value in the draft config."
                )
            return int(value)

        hidden = positive_int("hidden_size")
        n_heads = positive_int("num_attention_heads")
        head_dim = positive_int("head_dim", None)
        if head_dim is None:
            head_dim = hidden // n_heads
            if head_dim < 1:
                raise InputError(
                    f"{source}: hidden_size ({hidden}) // num_attention_heads ({n_heads}) is 0; set 'head_dim' "
                    "in the draft config."
                )
        fused = DEFAULT_FUSED_LAYERS
        eagle = config.get("eagle_config")
        if eagle is not None:
            if not isinstance(eagle, Mapping):
                raise InputError(
                    f"{source}: field 'eagle_config' must be an object, but got {short(eagle)}. Fix the draft config."
                )
            layer_ids = eagle.get("eagle_aux_hidden_state_layer_ids")
            if layer_ids is not None:
                if not isinstance(layer_ids, list) or not layer_ids:
                    raise InputError(
                        f"{source}: field 'eagle_config.eagle_aux_hidden_state_layer_ids' must be a non-empty list "
                        f"of target layer ids, but got {short(layer_ids)}. Fix the draft config."
                    )
                fused = len(layer_ids)
        dtype = config.get("torch_dtype", config.get("dtype"))
        return cls(
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size"),
            num_attention_heads=n_heads,
            num_key_value_heads=positive_int("num_key_value_heads"),
            head_dim=head_dim,
            num_hidden_layers=positive_int("num_hidden_layers", 1),
            num_fused_layers=fused,
            target_hidden_size=positive_int("target_hidden_size", hidden),
            vocab_size=positive_int("vocab_size"),
            draft_vocab_size=positive_int("draft_vocab_size", None),
            torch_dtype=dtype if isinstance(dtype, str) else None,
        )

    def with_vocab_size(self, vocab_size: int) -> "DraftArchitecture":
        return dataclasses.replace(self, vocab_size=int(vocab_size))


def _fixed_flops_by_component(arch: DraftArchitecture) -> Dict[str, int]:
    h, d = arch.hidden_size, arch.head_dim
    q_width, kv_width = arch.num_attention_heads * d, arch.num_key_value_heads * d
    attention = 0
    for layer in range(arch.num_hidden_layers):
        width_in = 2 * h if layer == 0 else h  # the first layer reads embeddings ++ fused hidden states
        attention += 2 * width_in * q_width + 2 * (2 * width_in * kv_width) + 2 * q_width * h
    return {
        "fc": 2 * (arch.num_fused_layers * arch.target_hidden_size) * h,
        "attention": attention,
        "mlp": arch.num_hidden_layers * 3 * 2 * h * arch.intermediate_size,
    }


def draft_flops_by_component(arch: DraftArchitecture, k: int) -> Dict[str, int]:
    """Per-token FLOPs of each part of the draft with ``k`` LM-head rows, plus ``total``."""
    parts = _fixed_flops_by_component(arch)
    parts["lm_head"] = 2 * arch.hidden_size * int(k)
    parts["total"] = sum(parts.values())
    return parts


def draft_flops(arch: DraftArchitecture, k: ArrayOrInt) -> ArrayOrInt:
    """Per-token draft FLOPs at ``k`` (an int, or an array of k: vectorised, int64)."""
    fixed = sum(_fixed_flops_by_component(arch).values())
    if np.ndim(k) == 0:
        return fixed + 2 * arch.hidden_size * int(k)
    return fixed + 2 * arch.hidden_size * np.asarray(k, dtype=np.int64)


def latency_reduction(arch: DraftArchitecture, k: ArrayOrInt) -> Union[float, np.ndarray]:
    """``1 - F(k) / F(V)``: the share of draft FLOPs saved by keeping ``k`` of ``V`` ids."""
    full = draft_flops(arch, arch.vocab_size)
    trimmed = draft_flops(arch, k)
    # int / int (Python) and int64 / int (numpy) both round the exact quotient once, as the paper does.
    return 1.0 - (trimmed / full)


def lm_head_share(arch: DraftArchitecture, k: Optional[int] = None) -> float:
    """Share of draft FLOPs spent in the LM head at ``k`` rows (default: the full vocab_size)."""
    parts = draft_flops_by_component(arch, arch.vocab_size if k is None else k)
    return parts["lm_head"] / parts["total"]


def paper_latency_reduction(hidden: int, intermediate: int, n_heads: int, n_kv: int, vocab: int, k: int) -> float:
    """The paper's latency reduction, term for term as its tool writes it (reference for tests)."""

    def total(rows: int) -> int:
        head_dim = hidden // n_heads
        fc = 2 * (hidden * 3) * hidden
        qkv_in = hidden * 2
        q = 2 * qkv_in * (n_heads * head_dim)
        k_proj = 2 * qkv_in * (n_kv * head_dim)
        v_proj = 2 * qkv_in * (n_kv * head_dim)
        o = 2 * (n_heads * head_dim) * hidden
        mlp = 2 * hidden * intermediate * 3
        lm_head = 2 * hidden * rows
        return fc + (q + k_proj + v_proj + o) + mlp + lm_head

    return 1.0 - (total(k) / total(vocab))


#: bytes per parameter of the dtype names found in HF configs (``torch_dtype`` / ``dtype``)
DTYPE_BYTES = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "fp8": 1,
    "int8": 1,
}


DEFAULT_DTYPE = "bfloat16"


def dtype_bytes(name: Optional[str], *, source: str = "the draft config") -> int:
    """Bytes per parameter for a config dtype name ("bfloat16", "torch.float16", ...); None -> bfloat16."""
    if name is None:
        return DTYPE_BYTES[DEFAULT_DTYPE]
    key = str(name).lower().replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise InputError(
            f"{source}: field 'torch_dtype' must be one of {', '.join(sorted(DTYPE_BYTES))}, but got {short(name)}. "
            "Fix the config's dtype."
        )
    return DTYPE_BYTES[key]


def _fixed_params_by_component(arch: DraftArchitecture) -> Dict[str, int]:
    h, d = arch.hidden_size, arch.head_dim
    q_width, kv_width = arch.num_attention_heads * d, arch.num_key_value_heads * d
    attention = 0
    for layer in range(arch.num_hidden_layers):
        width_in = 2 * h if layer == 0 else h
        attention += width_in * q_width + 2 * width_in * kv_width + q_width * h
    return {
        "fc": arch.num_fused_layers * arch.target_hidden_size * h,
        "attention": attention,
        "mlp": arch.num_hidden_layers * 3 * h * arch.intermediate_size,
        # hidden_norm (first layer), input and post-attention norm per layer, the final norm
        "norms": (1 + 2 * arch.num_hidden_layers + 1) * h,
        "embedding_row": h,
    }


def draft_weight_bytes_by_component(arch: DraftArchitecture, k: int, *, dtype: Optional[str] = None) -> Dict[str, int]:
    """Weight bytes read per drafted token by each part of the draft with ``k`` LM-head rows, plus ``total``.

    ``dtype`` defaults to the config's ``torch_dtype`` (bfloat16 when it has none).
    """
    size = dtype_bytes(dtype if dtype is not None else arch.torch_dtype)
    parts = {name: size * params for name, params in _fixed_params_by_component(arch).items()}
    parts["lm_head"] = size * arch.hidden_size * int(k)
    parts["total"] = sum(parts.values())
    return parts


def draft_weight_bytes(arch: DraftArchitecture, k: ArrayOrInt, *, dtype: Optional[str] = None) -> ArrayOrInt:
    """Weight bytes read per drafted token at ``k`` (an int, or an array of k: vectorised, int64)."""
    size = dtype_bytes(dtype if dtype is not None else arch.torch_dtype)
    fixed = size * sum(_fixed_params_by_component(arch).values())
    if np.ndim(k) == 0:
        return fixed + size * arch.hidden_size * int(k)
    return fixed + size * arch.hidden_size * np.asarray(k, dtype=np.int64)


def bytes_latency_reduction(arch: DraftArchitecture, k: ArrayOrInt, *, dtype: Optional[str] = None):
    """``1 - B(k) / B(V)``: the share of weight bytes per drafted token saved by keeping ``k`` of ``V`` ids."""
    return 1.0 - draft_weight_bytes(arch, k, dtype=dtype) / draft_weight_bytes(arch, arch.vocab_size, dtype=dtype)
