"""Latency models for the draft: how much of its per-token time a k-row LM head saves.

Every model maps candidate ks to ``latency_reduction(k) = 1 - t(k) / t(V)``
(what :func:`specforge_vocab.choosing.search.search` takes as ``latency_model``):

- ``flops`` (default, the paper's): per-token draft FLOPs (:func:`specforge_vocab.choosing.cost.draft_flops`);
- ``bytes``: weight bytes read per drafted token in the config's dtype
  (:func:`specforge_vocab.choosing.cost.draft_weight_bytes`): batch-1 decoding is memory bound;
- ``measured``: the draft layer (fc, RMSNorms, attention projections, attention over a short
  KV cache, SwiGLU MLP) and an LM head of each size from a grid of k are timed on this machine
  (CUDA when present, else CPU) in the configured dtype (on CUDA as CUDA-graph replays, as
  SGLang and vLLM run drafts), and ``t(k) = a + b * k`` is fitted by least squares. The fit, with the device name, is cached as JSON under
  ``<cache_dir>/latency/`` per device, dtype, draft shapes and measuring settings.

Example::

    >>> from specforge_vocab.choosing.cost import DraftArchitecture
    >>> arch = DraftArchitecture(4096, 14336, 32, 8, 128, 1, 3, 4096, 128256, 32000)
    >>> model = FlopsLatency(arch)
    >>> round(float(model(np.array([32000]))[0]), 3)
    0.481
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import psutil

from specforge_vocab.choosing.cost import (
    DraftArchitecture,
    bytes_latency_reduction,
    draft_weight_bytes,
    dtype_bytes,
    latency_reduction,
)
from specforge_vocab.errors import InputError, ValidatedSettings, must
from specforge_vocab.fileio import atomic_write, json_text

logger = logging.getLogger(__name__)


LATENCY_MODELS = ("flops", "bytes", "measured")


MEASURE_DEVICES = ("auto", "cpu", "cuda")


CACHE_FORMAT = "specforge-vocab-latency-fit/1"


#: on CPU, a half-precision matmul this many times slower than float32 is measured in float32 instead
CPU_HALF_SLOWDOWN_LIMIT = 3.0


@dataclasses.dataclass
class LatencySettings(ValidatedSettings):
    """How the draft's latency is modelled; one field per flag."""

    latency_model: str = "flops"
    measure_device: str = "auto"
    measure_dtype: Optional[str] = None  # default: the config's torch_dtype (bfloat16 if none)
    measure_points: int = 8
    measure_repeats: int = 5
    measure_context: int = 128
    measure_cuda_graph: bool = True
    latency_cache: bool = True

    def problems(self) -> List[str]:
        out = []
        if self.latency_model not in LATENCY_MODELS:
            out.append(must("--latency-model", f"one of {', '.join(LATENCY_MODELS)}", self.latency_model))
        if self.measure_device not in MEASURE_DEVICES:
            out.append(must("--measure-device", f"one of {', '.join(MEASURE_DEVICES)}", self.measure_device))
        if self.measure_dtype is not None:
            try:
                dtype_bytes(self.measure_dtype, source="--measure-dtype")
                _torch_dtype_name(self.measure_dtype)
            except InputError:
                out.append(must("--measure-dtype", "float32, float16 or bfloat16", self.measure_dtype))
        for flag, value, low in (
            ("--measure-points", self.measure_points, 2),
            ("--measure-repeats", self.measure_repeats, 1),
            ("--measure-context", self.measure_context, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                out.append(must(flag, f"an integer >= {low}", value))
        return out


class DraftLatencyModel:
    """Base: ``model(ks)`` -> latency reduction per k; ``relative_time(ks)`` = t(k) / t(V)."""

    name = "base"

    def __init__(self, arch: DraftArchitecture):
        self.arch = arch

    def __call__(self, ks: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def relative_time(self, ks) -> np.ndarray:
        """Draft time per token at k relative to the full vocabulary: ``1 - latency_reduction(k)``."""
        return 1.0 - np.asarray(self(np.atleast_1d(np.asarray(ks, dtype=np.int64))), dtype=np.float64)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name}


class FlopsLatency(DraftLatencyModel):
    """The paper's model: ``1 - F(k) / F(V)`` with per-token draft FLOPs."""

    name = "flops"

    def __call__(self, ks: np.ndarray) -> np.ndarray:
        return latency_reduction(self.arch, ks)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "unit": "FLOPs per drafted token"}


class BytesLatency(DraftLatencyModel):
    """Memory-bound model: ``1 - B(k) / B(V)`` with weight bytes read per drafted token."""

    name = "bytes"

    def __init__(self, arch: DraftArchitecture, *, dtype: Optional[str] = None):
        super().__init__(arch)
        self.dtype = dtype

    def __call__(self, ks: np.ndarray) -> np.ndarray:
        return bytes_latency_reduction(self.arch, ks, dtype=self.dtype)

    def describe(self) -> Dict[str, Any]:
        dtype = self.dtype or self.arch.torch_dtype or "bfloat16"
        return {
            "name": self.name,
            "unit": "weight bytes read per drafted token",
            "dtype": dtype,
            "bytes_at_full_vocab": int(draft_weight_bytes(self.arch, self.arch.vocab_size, dtype=self.dtype)),
        }


@dataclasses.dataclass
class LatencyFit:
    """A measured ``t(k) = intercept + slope * k`` (seconds per drafted token) and how it was measured."""

    intercept_s: float
    slope_s_per_row: float
    r_squared: float
    ks: List[int]
    seconds: List[float]  # median time per k
    device: str  # e.g. "NVIDIA H200" or the CPU model name
    device_type: str  # "cuda" or "cpu"
    dtype: str  # what was timed
    requested_dtype: str
    dtype_note: Optional[str]
    repeats: int
    context: int
    torch_version: str
    key: str = ""
    cached: bool = False

    def seconds_at(self, k) -> np.ndarray:
        return self.intercept_s + self.slope_s_per_row * np.asarray(k, dtype=np.float64)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class MeasuredLatency(DraftLatencyModel):
    """``1 - t(k) / t(V)`` from a fitted ``t(k) = a + b * k``."""

    name = "measured"

    def __init__(self, arch: DraftArchitecture, fit: LatencyFit):
        super().__init__(arch)
        self.fit = fit

    def __call__(self, ks: np.ndarray) -> np.ndarray:
        return 1.0 - self.fit.seconds_at(ks) / float(self.fit.seconds_at(self.arch.vocab_size))

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "unit": "measured seconds per drafted token",
            "fit": self.fit.as_dict(),
            "seconds_at_full_vocab": float(self.fit.seconds_at(self.arch.vocab_size)),
        }


def build_latency_model(settings: LatencySettings, arch: DraftArchitecture, *, cache_dir: str) -> DraftLatencyModel:
    """The latency model ``settings`` names (``measured`` measures now unless a cached fit matches)."""
    settings.validate()
    if settings.latency_model == "flops":
        return FlopsLatency(arch)
    if settings.latency_model == "bytes":
        return BytesLatency(arch)
    fit = measured_fit(
        arch,
        device=settings.measure_device,
        dtype=settings.measure_dtype,
        points=settings.measure_points,
        repeats=settings.measure_repeats,
        context=settings.measure_context,
        cuda_graph=settings.measure_cuda_graph,
        cache_dir=cache_dir if settings.latency_cache else None,
    )
    return MeasuredLatency(arch, fit)


def _torch_dtype_name(name: Optional[str]) -> str:
    key = (name or "bfloat16").lower().replace("torch.", "")
    aliases = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}
    key = aliases.get(key, key)
    if key not in ("float32", "float16", "bfloat16"):
        raise InputError(
            f"--latency-model measured times float32, float16 or bfloat16, but the dtype is {name!r}. "
            "Pass --measure-dtype bfloat16 (or float32)."
        )
    return key


def resolve_device(device: str = "auto") -> str:
    """ "cuda" or "cpu"; ``auto`` is CUDA when torch sees one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--measure-device cuda needs a CUDA GPU, but torch sees none. Use --measure-device cpu or auto."
        )
    return device


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "cpu") + f" ({os.cpu_count()} logical cores)"


def default_grid(vocab_size: int, points: int) -> List[int]:
    """LM-head sizes to time: ``points`` sizes spaced geometrically from ~V/256 (at least 64) to V."""
    low = min(vocab_size, max(64, vocab_size // 256))
    grid = np.unique(np.round(np.geomspace(low, vocab_size, points)).astype(np.int64))
    return [int(k) for k in grid]


def _fit_line(ks: Sequence[int], seconds: Sequence[float]):
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (a + b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    return float(a), float(b), r2


class _DraftStandIn:
    """Weights shaped like an EAGLE-3 draft (random values) and a decode step over them.

    One token per step: fc over the fused target states, RMSNorms, q/k/v/o projections, attention of the
    new query over a KV cache of ``context`` positions (grouped-query), SwiGLU MLP, final norm, and the
    first ``k`` rows of one LM-head matrix (a contiguous slice), then an argmax over the k logits.
    """

    def __init__(self, arch: DraftArchitecture, *, max_rows: int, context: int, device: str, dtype):
        import torch

        self.torch = torch
        h, d = arch.hidden_size, arch.head_dim
        self.n_heads, self.n_kv, self.head_dim = arch.num_attention_heads, arch.num_key_value_heads, d
        self.groups = max(1, self.n_heads // self.n_kv)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def weight(*shape):
            w = torch.empty(*shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen)
            return w.to(device=device, dtype=dtype)

        def norm_weight():
            return torch.ones(h, device=device, dtype=dtype)

        self.fused = weight(1, arch.num_fused_layers * arch.target_hidden_size)
        self.embedding = weight(1, h)
        self.fc = weight(h, arch.num_fused_layers * arch.target_hidden_size)
        self.hidden_norm = norm_weight()
        self.layers = []
        for layer in range(arch.num_hidden_layers):
            width_in = 2 * h if layer == 0 else h
            self.layers.append(
                {
                    "input_norm": norm_weight(),
                    "post_norm": norm_weight(),
                    "q": weight(self.n_heads * d, width_in),
                    "k": weight(self.n_kv * d, width_in),
                    "v": weight(self.n_kv * d, width_in),
                    "o": weight(h, self.n_heads * d),
                    "gate": weight(arch.intermediate_size, h),
                    "up": weight(arch.intermediate_size, h),
                    "down": weight(h, arch.intermediate_size),
                    "k_cache": weight(1, self.n_kv, context, d),
                    "v_cache": weight(1, self.n_kv, context, d),
                }
            )
        self.final_norm = norm_weight()
        self.lm_head = weight(max_rows, h)
        self.context = context

    def _rms(self, x, w):
        x32 = x.float()
        return (x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    def step(self, k: int):
        torch, F = self.torch, self.torch.nn.functional
        hidden = F.linear(self.fused, self.fc)
        x = torch.cat(
            [self._rms(self.embedding, self.layers[0]["input_norm"]), self._rms(hidden, self.hidden_norm)], -1
        )
        residual = hidden
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self._rms(residual, layer["input_norm"])
            q = F.linear(x, layer["q"]).view(1, self.n_heads, 1, self.head_dim)
            new_k = F.linear(x, layer["k"]).view(1, self.n_kv, 1, self.head_dim)
            new_v = F.linear(x, layer["v"]).view(1, self.n_kv, 1, self.head_dim)
            layer["k_cache"][:, :, -1:].copy_(new_k)  # the newest position, as a cache append would
            layer["v_cache"][:, :, -1:].copy_(new_v)
            keys = layer["k_cache"].repeat_interleave(self.groups, dim=1)
            values = layer["v_cache"].repeat_interleave(self.groups, dim=1)
            attended = F.scaled_dot_product_attention(q, keys, values).reshape(1, -1)
            residual = residual + F.linear(attended, layer["o"])
            y = self._rms(residual, layer["post_norm"])
            residual = residual + F.linear(F.silu(F.linear(y, layer["gate"])) * F.linear(y, layer["up"]), layer["down"])
        logits = F.linear(self._rms(residual, self.final_norm), self.lm_head[:k])
        return torch.argmax(logits, dim=-1)


def _capture_graphs(model: _DraftStandIn, grid: Sequence[int]) -> Optional[Dict[int, Any]]:
    """One CUDA graph per LM-head size (serving engines replay the draft step as a graph), or None
    with a warning when capture fails."""
    import torch

    graphs = {}
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for k in grid:
                for _ in range(2):
                    model.step(k)
        torch.cuda.current_stream().wait_stream(stream)
        for k in grid:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.step(k)
            graphs[k] = graph
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing
        logger.warning(
            "measured latency: CUDA graph capture failed (%s: %s); timing eager launches instead.",
            type(exc).__name__,
            exc,
        )
        return None
    return graphs


def _time_steps(
    model: _DraftStandIn, k: int, inner: int, device_type: str, graphs: Optional[Dict[int, Any]] = None
) -> float:
    import torch

    if device_type == "cuda":
        run = graphs[k].replay if graphs else (lambda: model.step(k))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        model.step(k)
    return (time.perf_counter() - begin) / inner


def _cpu_half_is_slow(dtype, arch: DraftArchitecture) -> float:
    """How many times longer this CPU takes for the draft's small projections in ``dtype`` than in float32.

    On some CPUs and thread settings, half-precision matmuls of one token take a slow path (or wait for
    busy threads) that real serving never sees; the median of a few calls of two projection shapes decides.
    """
    import torch

    h = arch.hidden_size
    shapes = [(arch.num_key_value_heads * arch.head_dim, 2 * h), (h, h)]
    total = {}
    with torch.inference_mode():
        for d in (torch.float32, dtype):
            spent = 0.0
            for rows, cols in shapes:
                w = torch.empty(rows, cols, dtype=torch.float32).uniform_(-0.02, 0.02).to(d)
                x = torch.ones(1, cols, dtype=d)
                torch.nn.functional.linear(x, w)
                times = []
                for _ in range(5):
                    begin = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    times.append(time.perf_counter() - begin)
                spent += float(np.median(times))
            total[d] = spent
    return total[dtype] / max(total[torch.float32], 1e-9)


def _memory_check(arch: DraftArchitecture, max_rows: int, context: int, size: int, device_type: str) -> None:
    params = int(draft_weight_bytes(arch, max_rows, dtype="float32")) // 4
    params += arch.num_hidden_layers * 2 * arch.num_key_value_heads * arch.head_dim * context
    need = params * size * 1.2 + (max_rows * 4)
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
    else:
        try:
            free = psutil.virtual_memory().available
        except Exception:  # pragma: no cover - psutil is a dependency
            return
    if need > 0.8 * free:
        raise InputError(
            f"--latency-model measured needs about {need / 2**30:.1f} GiB for the draft's weights in this dtype, but only "
            f"{free / 2**30:.1f} GiB is free on {device_type}. Use --latency-model bytes, a smaller --measure-dtype, "
            "or another --measure-device."
        )


def measure_draft_latency(
    arch: DraftArchitecture,
    *,
    device: str = "auto",
    dtype: Optional[str] = None,
    ks: Optional[Sequence[int]] = None,
    points: int = 8,
    repeats: int = 5,
    context: int = 128,
    target_seconds: float = 0.02,
    cuda_graph: bool = True,
) -> LatencyFit:
    """Time the draft stand-in at each k of ``ks`` (default :func:`default_grid`) and fit ``a + b * k``.

    Each repeat times every k in turn (so load changes hit all sizes alike), each timing averaging
    enough steps to last about ``target_seconds``; the median over repeats is fitted. On CUDA each
    size is captured as a CUDA graph and replayed (``cuda_graph``), as SGLang and vLLM run drafts.
    """
    import torch

    device_type = resolve_device(device)
    requested = _torch_dtype_name(dtype if dtype is not None else arch.torch_dtype)
    effective, note = requested, None
    torch_dtype = getattr(torch, effective)
    if device_type == "cpu" and effective != "float32":
        slowdown = _cpu_half_is_slow(torch_dtype, arch)
        if slowdown > CPU_HALF_SLOWDOWN_LIMIT:
            note = (
                f"{requested} matmul on this CPU took {slowdown:.1f}x as long as float32, so the draft was "
                "timed in float32"
            )
            logger.warning("measured latency: %s.", note)
            effective, torch_dtype = "float32", torch.float32
    grid = sorted({int(k) for k in (ks if ks is not None else default_grid(arch.vocab_size, points))})
    if not grid or grid[0] < 1:
        raise InputError(f"LM-head sizes to time must be positive integers, but got {grid}.")
    _memory_check(arch, grid[-1], context, dtype_bytes(effective), device_type)
    name = device_name(device_type)
    logger.info("measuring draft latency on %s (%s), LM-head sizes %s", name, effective, grid)
    with torch.inference_mode():
        model = _DraftStandIn(arch, max_rows=grid[-1], context=context, device=device_type, dtype=torch_dtype)
        for k in (grid[-1], grid[0], grid[-1]):  # warm-up (allocator, kernels, caches)
            model.step(k)
        graphs = None
        if device_type == "cuda":
            torch.cuda.synchronize()
            graphs = _capture_graphs(model, grid) if cuda_graph else None
        probe = _time_steps(model, grid[-1], 1, device_type, graphs)
        inner = int(min(200, max(1, round(target_seconds / max(probe, 1e-6)))))
        samples = {k: [] for k in grid}
        for _ in range(repeats):
            for k in grid:
                samples[k].append(_time_steps(model, k, inner, device_type, graphs))
        graphs_used = bool(graphs)
        del model, graphs
    if device_type == "cuda":
        torch.cuda.empty_cache()
    seconds = [float(np.median(samples[k])) for k in grid]
    a, b, r2 = _fit_line(grid, seconds)
    if b <= 0:
        logger.warning(
            "measured latency: the time did not grow with the LM-head size on %s (slope %.3g s/row); "
            "the measured model sees no gain from a smaller head.",
            name,
            b,
        )
    if device_type == "cuda":
        mode = "CUDA graphs" if graphs_used else "eager launches"
        note = f"{note}; {mode}" if note else mode
    return LatencyFit(
        a,
        b,
        r2,
        grid,
        seconds,
        name,
        device_type,
        effective,
        requested,
        note,
        int(repeats),
        int(context),
        torch.__version__,
    )


def fit_cache_key(
    arch: DraftArchitecture,
    *,
    device_name_: str,
    dtype: str,
    ks: Sequence[int],
    repeats: int,
    context: int,
    cuda_graph: bool = True,
) -> str:
    """sha256 over the device, dtype, the draft's shapes and the measuring settings."""
    shapes = {
        f: getattr(arch, f)
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_hidden_layers",
            "num_fused_layers",
            "target_hidden_size",
            "vocab_size",
        )
    }
    import torch

    payload = {
        "format": CACHE_FORMAT,
        "device": device_name_,
        "dtype": dtype,
        "shapes": shapes,
        "ks": [int(k) for k in ks],
        "repeats": int(repeats),
        "context": int(context),
        "cuda_graph": bool(cuda_graph),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def measured_fit(
    arch: DraftArchitecture,
    *,
    device: str = "auto",
    dtype: Optional[str] = None,
    points: int = 8,
    repeats: int = 5,
    context: int = 128,
    ks: Optional[Sequence[int]] = None,
    cuda_graph: bool = True,
    cache_dir: Optional[str] = None,
) -> LatencyFit:
    """:func:`measure_draft_latency`, reusing ``<cache_dir>/latency/<key>.json`` when it exists."""
    device_type = resolve_device(device)
    requested = _torch_dtype_name(dtype if dtype is not None else arch.torch_dtype)
    grid = sorted({int(k) for k in (ks if ks is not None else default_grid(arch.vocab_size, points))})
    name = device_name(device_type)
    graphs = bool(cuda_graph) and device_type == "cuda"
    key = fit_cache_key(
        arch, device_name_=name, dtype=requested, ks=grid, repeats=repeats, context=context, cuda_graph=graphs
    )
    path = os.path.join(cache_dir, "latency", f"{key[:32]}.json") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            if stored.get("key") == key:
                stored["cached"] = True
                logger.info("measured latency: reusing the fit in %s", path)
                return LatencyFit(**stored)
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("measured latency: ignoring unreadable cache file %s (%s); measuring again.", path, exc)
    fit = measure_draft_latency(
        arch, device=device_type, dtype=requested, ks=grid, repeats=repeats, context=context, cuda_graph=graphs
    )
    fit.key = key
    if path:
        atomic_write(path, json_text(fit.as_dict()))
    return fit
