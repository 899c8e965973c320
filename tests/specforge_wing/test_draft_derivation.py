"""The draft config newer SpecForge derives from the target when model.draft_model_config is unset, and
prepare writing it (with the chosen k) for such a run.

SpecForge's derivation (specforge/training/model_loading.py, ``_generate_draft_config``) is computed here two
ways, independently of specforge_vocab: from its documented rules (:func:`reference_derivation`, with the
worked examples for a Llama-3-8B-Instruct and a Qwen3-8B target as fixed expectations), and through
transformers' config objects exactly as SpecForge's code reads them (:func:`transformers_derivation`).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import specforge_standin as standin
import torch
import yaml
from conftest import LLAMA3_8B_INSTRUCT, MATH_DATA, tiny_llama3_target

from specforge_vocab import before_training
from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.specforge.draft_derivation import derive_draft_config

# config.json of Qwen/Qwen3-8B, as published (Llama-3-8B-Instruct's is in conftest).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# SpecForge's derivation of both (with transformers 5, which it pins), draft_vocab_size aside.
LLAMA3_DERIVED = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "num_hidden_layers": 1,
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_scaling": {"rope_theta": 500000.0, "rope_type": "default"},
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "use_cache": True,
}
QWEN3_DERIVED = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "num_hidden_layers": 1,
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_scaling": {"rope_theta": 1000000, "rope_type": "default"},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 0,
    "use_sliding_window": False,
    "max_window_layers": 36,
    "tie_word_embeddings": False,
    "use_cache": True,
}
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

WHITELIST = (
    "vocab_size hidden_size num_attention_heads num_key_value_heads intermediate_size max_position_embeddings "
    "rms_norm_eps hidden_act initializer_range attention_bias attention_dropout head_dim rope_theta rope_scaling "
    "bos_token_id eos_token_id pad_token_id sliding_window use_sliding_window max_window_layers"
).split()


def with_eagle3_defaults(payload: dict, k: int) -> dict:
    """SpecForge's fixed EAGLE-3 fields: LlamaForCausalLMEagle3, llama, one layer, untied, use_cache, pad 0 when
    unset; then the chosen k in place of its 32000."""
    payload.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        num_hidden_layers=1,
        tie_word_embeddings=False,
        use_cache=True,
    )
    if payload.get("pad_token_id") is None:
        payload["pad_token_id"] = 0
    payload["draft_vocab_size"] = k
    return payload


def reference_derivation(target: dict, k: int) -> dict:
    """SpecForge's rules: the text config; each whitelisted attribute that is set (transformers 5: head_dim
    defaults to hidden_size // heads, rope_theta lives in the rope_scaling dict with rope_type); V = padded or
    plain vocab_size; then LlamaForCausalLMEagle3, llama, one layer, untied, use_cache, pad 0 when unset."""
    text = target.get("text_config", target)
    attributes = dict(text)
    attributes.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    rope = dict(text.get("rope_scaling") or {})
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = text.get("rope_theta", rope.get("rope_theta"))
    attributes["rope_scaling"], attributes["rope_theta"] = rope, None
    payload = {name: attributes[name] for name in WHITELIST if attributes.get(name) is not None}
    payload["vocab_size"] = text.get("padded_vocab_size") or text["vocab_size"]
    return with_eagle3_defaults(payload, k)


def transformers_derivation(target: dict, k: int, tmp_path) -> dict:
    """SpecForge's code path: AutoConfig of the target directory, its text config, getattr of each field."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("SpecForge pins transformers 5; older versions expose rope_theta differently")
    directory = tmp_path / "target"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(target))
    config = transformers.AutoConfig.from_pretrained(str(directory))
    config = getattr(config, "text_config", config)
    payload = {name: getattr(config, name, None) for name in WHITELIST}
    payload = {name: value for name, value in payload.items() if value is not None}
    payload["vocab_size"] = int(getattr(config, "padded_vocab_size", None) or config.vocab_size)
    return json.loads(json.dumps(with_eagle3_defaults(payload, k)))


def llama31() -> dict:
    return dict(
        LLAMA3_8B_INSTRUCT,
        rope_scaling=LLAMA31_ROPE,
        max_position_embeddings=131072,
        eos_token_id=[128001, 128008, 128009],
    )


def multimodal() -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": QWEN3_8B,
    }


@pytest.mark.parametrize(
    "target, documented",
    [(LLAMA3_8B_INSTRUCT, LLAMA3_DERIVED), (QWEN3_8B, QWEN3_DERIVED)],
    ids=["llama3-8b-instruct", "qwen3-8b"],
)
def test_derivation_equals_specforges_field_by_field(target, documented, tmp_path):
    ours = derive_draft_config(copy.deepcopy(target), draft_vocab_size=13264)
    assert ours == dict(documented, draft_vocab_size=13264)  # the worked example
    assert ours == reference_derivation(target, 13264)
    assert ours == transformers_derivation(target, 13264, tmp_path)


@pytest.mark.parametrize("make", [llama31, multimodal], ids=["llama3.1-rope", "multimodal-text-config"])
def test_derivation_of_rope_scaling_and_multimodal_targets(make, tmp_path):
    target = make()
    ours = derive_draft_config(target, draft_vocab_size=4000)
    assert ours == reference_derivation(target, 4000)
    if make is llama31:
        assert ours["rope_scaling"] == dict(LLAMA31_ROPE, rope_theta=500000.0)
        assert ours == transformers_derivation(target, 4000, tmp_path)
    else:
        assert ours == dict(QWEN3_DERIVED, draft_vocab_size=4000)


RUN_YAML = """\
# no draft_model_config: SpecForge would derive one with draft_vocab_size 32000
model:
  target_model_path: "target"
data:
  train_data_path: "math.jsonl"
  chat_template: "llama3"
"""


@pytest.mark.parametrize("target_config", ["tiny-llama3", "qwen3-8b"])
def test_prepare_without_draft_model_config_writes_the_derivation_with_the_chosen_k(
    target_config, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    # Qwen3-8B's config.json goes with the Llama-3 tokenizer here (its ids fit in Qwen3's vocabulary).
    config = QWEN3_8B if target_config == "qwen3-8b" else None
    target = tiny_llama3_target(tmp_path / "target", lm_head=False, config=config)
    shutil.copy(MATH_DATA, tmp_path / "math.jsonl")
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    search = SearchSettings(n_calls=8, max_vocab_size=4000)
    result = before_training("run.yaml", search=search)
    run = yaml.safe_load((tmp_path / "run.yaml").read_text())
    written = json.loads(open(run["model"]["draft_model_config"], encoding="utf-8").read())
    target_json = json.loads((target / "config.json").read_text())
    assert written == reference_derivation(target_json, result.k) and result.k != 32000
    assert (tmp_path / "run.yaml").read_text().startswith("# no draft_model_config")
    model = standin.run_config_draft("run.yaml")  # SpecForge loads that config and our mapping into it
    assert model["d2t"].numel() == result.k and torch.equal(
        model["d2t"], torch.load(result.mapping_path, weights_only=True)["d2t"]
    )
    again = before_training("run.yaml", search=search)
    assert again.reused and again.output_dir == result.output_dir
