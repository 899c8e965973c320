"""Latency models: weight bytes by hand, the measured fit on a scaled-down draft (CPU, and CUDA when
present), its cache, and the settings. No timing assertions: only structure and sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import llama3_arch

from specforge_vocab.choosing import latency as latency_module
from specforge_vocab.choosing.cost import (
    DraftArchitecture,
    bytes_latency_reduction,
    draft_weight_bytes,
    draft_weight_bytes_by_component,
    dtype_bytes,
    latency_reduction,
)
from specforge_vocab.choosing.latency import (
    BytesLatency,
    FlopsLatency,
    LatencySettings,
    MeasuredLatency,
    build_latency_model,
    default_grid,
    measured_fit,
)
from specforge_vocab.errors import InputError, SettingsError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def tiny_arch(dtype: str = "float32") -> DraftArchitecture:
    # hidden 64, intermediate 128, 4 heads of 16, 2 kv heads, 1 layer, 3 fused layers, V 2048
    return DraftArchitecture(64, 128, 4, 2, 16, 1, 3, 64, 2048, 512, dtype)


# --------------------------------------------------------------------------- bytes


def test_weight_bytes_of_the_llama3_draft_by_hand():
    arch = llama3_arch()  # torch_dtype float16: 2 bytes per parameter
    h, I, V, k = 4096, 14336, 128256, 32000
    fc = 3 * h * h
    attention = (2 * h) * 4096 + 2 * (2 * h) * 1024 + 4096 * h  # q, k, v from 2h, o
    mlp = 3 * h * I
    norms = 4 * h  # hidden_norm, input_layernorm, post_attention_layernorm, final norm
    parts = draft_weight_bytes_by_component(arch, k)
    assert parts == {
        "fc": 2 * fc,
        "attention": 2 * attention,
        "mlp": 2 * mlp,
        "norms": 2 * norms,
        "embedding_row": 2 * h,
        "lm_head": 2 * h * k,
        "total": 2 * (fc + attention + mlp + norms + h + h * k),
    }
    full = 2 * (fc + attention + mlp + norms + h + h * V)
    assert draft_weight_bytes(arch, V) == full
    assert bytes_latency_reduction(arch, k) == 1.0 - parts["total"] / full
    # vectorised and scalar agree; the ratio does not depend on the dtype
    ks = np.array([1000, k, V])
    assert np.array_equal(draft_weight_bytes(arch, ks), [draft_weight_bytes(arch, int(x)) for x in ks])
    assert bytes_latency_reduction(arch, k, dtype="float32") == pytest.approx(
        bytes_latency_reduction(arch, k), rel=1e-12
    )
    # norms and one embedding row are all that separate it from the FLOPs model here
    assert 0 < latency_reduction(arch, k) - bytes_latency_reduction(arch, k) < 1e-4


def test_dtype_bytes():
    assert dtype_bytes(None) == 2  # bfloat16 when the config has no dtype
    assert [dtype_bytes(d) for d in ("float32", "torch.bfloat16", "float16", "float8_e4m3fn")] == [4, 2, 2, 1]
    with pytest.raises(InputError, match="torch_dtype"):
        dtype_bytes("int3")


def test_flops_and_bytes_models():
    arch = llama3_arch()
    ks = np.array([50, 5000, 50000])
    assert np.array_equal(FlopsLatency(arch)(ks), latency_reduction(arch, ks))
    model = BytesLatency(arch)
    assert np.array_equal(model(ks), bytes_latency_reduction(arch, ks))
    assert np.allclose(model.relative_time(ks), 1 - bytes_latency_reduction(arch, ks))
    assert model.describe()["dtype"] == "float16"
    assert isinstance(
        build_latency_model(LatencySettings(latency_model="bytes"), arch, cache_dir="unused"), BytesLatency
    )
    assert isinstance(build_latency_model(LatencySettings(), arch, cache_dir="unused"), FlopsLatency)


# --------------------------------------------------------------------------- measured


def test_default_grid_spans_small_k_to_v():
    grid = default_grid(128256, 8)
    assert grid[0] == 501 and grid[-1] == 128256 and len(grid) == 8 and grid == sorted(set(grid))
    assert default_grid(100, 4)[-1] == 100


@pytest.mark.parametrize("device", DEVICES)
def test_measured_fit_on_a_scaled_down_draft_and_its_cache(tmp_path, device, monkeypatch):
    arch = tiny_arch()
    fit = measured_fit(arch, device=device, dtype="float32", points=4, repeats=2, context=16, cache_dir=str(tmp_path))
    assert fit.ks == default_grid(2048, 4) and len(fit.seconds) == 4
    assert all(s > 0 for s in fit.seconds) and np.isfinite([fit.intercept_s, fit.slope_s_per_row]).all()
    assert fit.device and fit.device_type == device and fit.dtype == "float32" and not fit.cached
    # the fit is the least-squares line through the medians
    b, a = np.polyfit(fit.ks, fit.seconds, 1)
    assert fit.intercept_s == pytest.approx(a, rel=1e-6, abs=1e-12)
    assert fit.slope_s_per_row == pytest.approx(b, rel=1e-6, abs=1e-15)
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["device"] == fit.device

    # A second call with the same device, dtype and config reuses the file and measures nothing.
    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency_module, "measure_draft_latency", fail)
    again = measured_fit(arch, device=device, dtype="float32", points=4, repeats=2, context=16, cache_dir=str(tmp_path))
    assert again.cached and (again.intercept_s, again.slope_s_per_row, again.ks) == (
        fit.intercept_s,
        fit.slope_s_per_row,
        fit.ks,
    )
    # another config (a wider draft) does not hit that cache entry
    with pytest.raises(AssertionError, match="measured again"):
        measured_fit(
            tiny_arch().with_vocab_size(4096),
            device=device,
            dtype="float32",
            points=4,
            repeats=2,
            context=16,
            cache_dir=str(tmp_path),
        )

    model = MeasuredLatency(arch, again)
    reduction = model(np.array([64, 1024, 2048]))
    assert reduction[-1] == 0.0  # k = V
    if fit.slope_s_per_row > 0:
        assert reduction[0] > reduction[1] > 0
    assert model.describe()["fit"]["device"] == fit.device


def test_measured_in_the_configured_half_dtype_or_float32_with_a_note():
    fit = latency_module.measure_draft_latency(tiny_arch("bfloat16"), device="cpu", points=3, repeats=1, context=8)
    assert fit.requested_dtype == "bfloat16"
    assert fit.dtype == "bfloat16" or (fit.dtype == "float32" and "float32" in fit.dtype_note)


def test_latency_settings_problems_name_their_flags():
    assert LatencySettings().problems() == []
    bad = LatencySettings(
        latency_model="wallclock",
        measure_device="tpu",
        measure_dtype="int4",
        measure_points=1,
        measure_repeats=0,
        measure_context=0,
    )
    flags = [p.split()[0] for p in bad.problems()]
    assert flags == [
        "--latency-model",
        "--measure-device",
        "--measure-dtype",
        "--measure-points",
        "--measure-repeats",
        "--measure-context",
    ]
    with pytest.raises(SettingsError):
        bad.validate()
