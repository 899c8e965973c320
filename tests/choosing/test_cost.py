"""Draft FLOPs model: the paper's formula, the generalisations, and every shipped config."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHIPPED_CONFIGS, shipped_arch, shipped_config

from specforge_vocab.choosing.cost import (
    DraftArchitecture,
    draft_flops,
    draft_flops_by_component,
    latency_reduction,
    lm_head_share,
    paper_latency_reduction,
)
from specforge_vocab.errors import InputError


def test_configs_are_shipped():
    assert {"llama3-8B-eagle3.json", "deepseek-v3-671b-eagle3.json", "gpt-oss-20B-eagle3.json"} <= set(SHIPPED_CONFIGS)


def test_llama3_8b_lm_head_is_64_1_percent():
    arch = shipped_arch("llama3-8B-eagle3.json")
    # By hand, h = 4096, d = 128, 32 heads, 8 kv heads, I = 14336, V = 128256:
    h, I, V = 4096, 14336, 128256
    fc = 2 * 3 * h * h
    attention = 2 * 2 * h * 4096 + 2 * (2 * 2 * h * 1024) + 2 * 4096 * h
    mlp = 6 * h * I
    lm_head = 2 * h * V
    assert draft_flops_by_component(arch, V) == {
        "fc": fc,
        "attention": attention,
        "mlp": mlp,
        "lm_head": lm_head,
        "total": fc + attention + mlp + lm_head,
    }
    assert lm_head_share(arch) == pytest.approx(lm_head / (fc + attention + mlp + lm_head))
    assert round(100 * lm_head_share(arch), 1) == 64.1


@pytest.mark.parametrize("k", [1, 50, 1000, 13264, 32000, 50000, 128255, 128256])
def test_latency_reduction_matches_paper_formula_llama3(k):
    arch = shipped_arch("llama3-8B-eagle3.json")
    ours = latency_reduction(arch, k)
    ref = paper_latency_reduction(4096, 14336, 32, 8, 128256, k)
    assert abs(ours - ref) <= 1e-12
    assert ours == ref  # in fact bit-identical: same integers, one rounding


@pytest.mark.parametrize(
    "dims", [(7168, 40960, 56, 8, 129280), (2048, 8192, 16, 4, 32000), (5120, 25600, 64, 8, 151936)]
)
def test_latency_reduction_matches_paper_formula_other_shapes(dims):
    arch = DraftArchitecture.paper(*dims)
    ks = np.array([50, 777, 5000, 20000, 31999])
    vector = latency_reduction(arch, ks)
    for k, value in zip(ks, vector):
        ref = paper_latency_reduction(*dims, int(k))
        assert abs(value - ref) <= 1e-12
        assert abs(latency_reduction(arch, int(k)) - ref) <= 1e-12


def test_paper_reference_itself_by_hand():
    # Tiny numbers worked out by hand: h=4, I=8, 2 heads (d=2), 1 kv head, V=10, k=5.
    # fc=2*12*4=96; q=2*8*4=64; k=v=2*8*2=32; o=2*4*4=32; mlp=2*4*8*3=192; lm(10)=80, lm(5)=40.
    full, trimmed = 96 + 64 + 32 + 32 + 32 + 192 + 80, 96 + 64 + 32 + 32 + 32 + 192 + 40
    assert paper_latency_reduction(4, 8, 2, 1, 10, 5) == 1.0 - trimmed / full


def test_vectorised_equals_scalar():
    arch = shipped_arch("deepseek-v3-671b-eagle3.json")
    ks = np.arange(1, 3000, 7)
    flops = draft_flops(arch, ks)
    assert flops.dtype == np.int64
    assert flops.tolist() == [draft_flops(arch, int(k)) for k in ks]
    assert latency_reduction(arch, ks).tolist() == [latency_reduction(arch, int(k)) for k in ks]


def test_gpt_oss_head_dim_differs_from_hidden_over_heads():
    arch = shipped_arch("gpt-oss-20B-eagle3.json")
    assert arch.head_dim == 64 and arch.hidden_size // arch.num_attention_heads == 45
    h = 2880
    q_width, kv_width = 64 * 64, 8 * 64
    expected_attention = 2 * (2 * h) * q_width + 2 * 2 * (2 * h) * kv_width + 2 * q_width * h
    assert draft_flops_by_component(arch, 32000)["attention"] == expected_attention
    assert latency_reduction(arch, 32000) != paper_latency_reduction(2880, 17280, 64, 8, 201088, 32000)


def test_fused_layers_and_target_hidden_size():
    config = shipped_config()
    config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [2, 10, 20, 30]}
    config["target_hidden_size"] = 8192
    arch = DraftArchitecture.from_config(config, source="c.json")
    assert arch.num_fused_layers == 4 and arch.target_hidden_size == 8192
    assert draft_flops_by_component(arch, 1)["fc"] == 2 * (4 * 8192) * 4096


def test_more_draft_layers():
    config = shipped_config()
    one = DraftArchitecture.from_config(config, source="c.json")
    config["num_hidden_layers"] = 3
    three = DraftArchitecture.from_config(config, source="c.json")
    h, q, kv = 4096, 4096, 1024
    later_layer_attention = 2 * h * q + 2 * (2 * h * kv) + 2 * q * h  # later layers read h, not 2h
    a1, a3 = draft_flops_by_component(one, 10), draft_flops_by_component(three, 10)
    assert a3["attention"] == a1["attention"] + 2 * later_layer_attention
    assert a3["mlp"] == 3 * a1["mlp"]
    assert a3["fc"] == a1["fc"] and a3["lm_head"] == a1["lm_head"]


def test_head_dim_null_falls_back_to_hidden_over_heads():
    config = shipped_config()
    config["head_dim"] = None
    assert DraftArchitecture.from_config(config, source="c.json").head_dim == 128


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda c: c.pop("hidden_size"), r"c\.json: the draft config has no 'hidden_size'"),
        (lambda c: c.pop("num_key_value_heads"), "'num_key_value_heads'"),
        (
            lambda c: c.update(hidden_size="4096"),
            r"c\.json: field 'hidden_size' must be a positive integer, but got '4096'",
        ),
        (lambda c: c.update(intermediate_size=True), "'intermediate_size' must be a positive integer"),
        (lambda c: c.update(num_attention_heads=0), "'num_attention_heads' must be a positive integer"),
        (lambda c: c.update(head_dim=64.0), "'head_dim' must be a positive integer"),
        (lambda c: c.update(eagle_config=[1]), "'eagle_config' must be an object"),
        (lambda c: c.update(eagle_config={"eagle_aux_hidden_state_layer_ids": []}), "non-empty list"),
    ],
)
def test_config_errors_name_file_and_key(change, pattern):
    config = shipped_config()
    change(config)
    with pytest.raises(InputError, match=pattern):
        DraftArchitecture.from_config(config, source="c.json")


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_has_a_sane_cost_model(name):
    config = shipped_config(name)
    arch = shipped_arch(name)
    assert arch.vocab_size == config["vocab_size"]
    assert arch.draft_vocab_size == config["draft_vocab_size"]
    share = lm_head_share(arch)
    assert 0.2 < share < 0.9
    ks = np.arange(1, arch.vocab_size + 1, 997)
    reduction = latency_reduction(arch, ks)
    assert np.all(np.diff(reduction) < 0)  # more rows, less saved
    assert latency_reduction(arch, arch.vocab_size) == 0.0
    assert 0.0 < latency_reduction(arch, 1) < share + 1e-12
    parts = draft_flops_by_component(arch, arch.vocab_size)
    assert parts["total"] == sum(v for key, v in parts.items() if key != "total")
    paper_assumptions = (
        config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
        == config["hidden_size"] // config["num_attention_heads"]
        and len(config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids", [0, 0, 0])) == 3
        and config.get("num_hidden_layers", 1) == 1
        and config.get("target_hidden_size", config["hidden_size"]) == config["hidden_size"]
    )
    if paper_assumptions:  # then the paper's formula applies exactly
        dims = (
            config["hidden_size"],
            config["intermediate_size"],
            config["num_attention_heads"],
            config["num_key_value_heads"],
            config["vocab_size"],
        )
        assert latency_reduction(arch, 20000) == paper_latency_reduction(*dims, 20000)
