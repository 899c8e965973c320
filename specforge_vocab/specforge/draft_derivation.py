"""The draft config newer SpecForge derives from the target when ``model.draft_model_config`` is unset
(docs/SPECFORGE.md section 2).

SpecForge (``specforge/training/model_loading.py``, ``_generate_draft_config``) loads the target's
config, takes its ``text_config`` when it has one, copies a fixed list of fields that are set,
takes V from ``padded_vocab_size`` or ``vocab_size``, and adds the EAGLE-3 defaults:
``LlamaForCausalLMEagle3``, ``model_type`` llama, one layer, ``tie_word_embeddings`` false,
``use_cache`` true, ``pad_token_id`` 0 when unset and ``draft_vocab_size`` 32000. It reads the
fields as attributes of transformers' config object (transformers 5, which SpecForge pins), so two
of them are not the JSON's: ``head_dim`` is ``hidden_size // num_attention_heads`` when the JSON has
none, and the rope settings come as one ``rope_scaling`` dict holding ``rope_theta`` and
``rope_type`` (``rope_theta`` itself reads as unset). :func:`derive_draft_config` does the same on
the JSON, with the chosen k; prepare writes the result and points ``model.draft_model_config`` at it,
because SpecForge's own k of 32000 would not fit a mapping of another size.

Example::

    >>> target = {"vocab_size": 128256, "hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0}
    >>> config = derive_draft_config(target, draft_vocab_size=8000)
    >>> config["head_dim"], config["rope_scaling"], config["draft_vocab_size"], config["pad_token_id"]
    (128, {'rope_type': 'default', 'rope_theta': 500000.0}, 8000, 0)
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

from specforge_vocab.counting.target_head import target_text_config
from specforge_vocab.errors import InputError

#: the target fields SpecForge copies into the draft config (``_TARGET_ARCHITECTURE_FIELDS``)
TARGET_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "attention_bias",
    "attention_dropout",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
)


#: SpecForge's EAGLE-3 defaults for a derived draft (``TargetDerivedDraftDefaults``)
EAGLE3_DEFAULTS = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "num_hidden_layers": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
}


SPECFORGE_DERIVED_DRAFT_VOCAB_SIZE = 32000


def _rope(text: Mapping[str, Any]) -> Any:
    """transformers 5's view of the rope fields: one dict with rope_type and rope_theta, or None."""
    params = text.get("rope_parameters") or text.get("rope_scaling")
    theta = text.get("rope_theta")
    if params is None and theta is None:
        return None
    rope = dict(params) if isinstance(params, Mapping) else {}
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    if theta is not None:
        rope.setdefault("rope_theta", theta)
    return rope


def derive_draft_config(
    target_config: Mapping[str, Any], *, draft_vocab_size: int, source: str = "the target's config.json"
) -> Dict[str, Any]:
    """The draft config SpecForge derives from ``target_config`` (a parsed config.json), with
    ``draft_vocab_size`` in place of SpecForge's 32000."""
    text = target_text_config(dict(target_config))
    payload: Dict[str, Any] = {}
    for field in TARGET_FIELDS:
        if field == "rope_theta":
            continue  # transformers 5 moves it into the rope dict
        value = _rope(text) if field == "rope_scaling" else text.get(field)
        if field == "head_dim" and value is None and text.get("hidden_size") and text.get("num_attention_heads"):
            value = int(text["hidden_size"]) // int(text["num_attention_heads"])
        if value is not None:
            payload[field] = copy.deepcopy(value)
    vocab = text.get("padded_vocab_size") or text.get("vocab_size")
    if vocab is not None:
        payload["vocab_size"] = int(vocab)
    missing = [name for name in ("vocab_size", "hidden_size") if name not in payload]
    if missing:
        raise InputError(
            f"{source} has no {' or '.join(missing)} (in text_config for a multimodal model), so neither SpecForge nor "
            "specforge-vocab can derive a draft config from it. Set model.draft_model_config to a draft config JSON."
        )
    payload.update(copy.deepcopy(EAGLE3_DEFAULTS))
    if payload.get("pad_token_id") is None:
        payload["pad_token_id"] = 0
    payload["draft_vocab_size"] = int(draft_vocab_size)
    return payload
