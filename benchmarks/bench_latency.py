"""Measured draft latency vs the FLOPs and weight-bytes models, for the Llama-3-8B EAGLE-3 draft.

baseline = the paper's FLOPs model, 1 - F(k)/F(V) (and the weight-bytes model beside it)
ours     = --latency-model measured: the draft layer and an LM head of each size from a grid of k
           timed on this machine, t(k) = a + b*k fitted by least squares, 1 - t(k)/t(V)

Prints the fit (with the device) and the three predicted latency reductions at several k, side
by side, from one process. On CPU it times float32 by default (bf16 matmuls of one token can take
slow paths on CPUs) and only a few sizes, to stay within about two minutes on two cores.

Run: .venv/bin/python benchmarks/bench_latency.py [--device cpu|cuda|auto] [--dtype float32|bfloat16]
                                                   [--points 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import REPO, machine

from specforge_vocab.choosing.cost import DraftArchitecture, bytes_latency_reduction, latency_reduction, lm_head_share
from specforge_vocab.choosing.latency import default_grid, measure_draft_latency, resolve_device

CONFIG = REPO / "configs" / "llama3-8B-eagle3.json"
KS = [1024, 4096, 8192, 16384, 32000, 50000, 64000, 128256]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, the config's dtype (float16) on CUDA")
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="on CUDA, time eager launches instead of CUDA graphs")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    config = json.loads(CONFIG.read_text())
    arch = DraftArchitecture.from_config(config, source=str(CONFIG))
    device = resolve_device(args.device)
    dtype = args.dtype or ("float32" if device == "cpu" else None)
    print(f"machine: {machine()}")
    print(
        f"draft: {CONFIG.name}  h={arch.hidden_size} I={arch.intermediate_size} heads={arch.num_attention_heads}/"
        f"{arch.num_key_value_heads} V={arch.vocab_size:,}  config dtype {arch.torch_dtype}; "
        f"LM head = {lm_head_share(arch):.1%} of draft FLOPs at V"
    )
    grid = default_grid(arch.vocab_size, args.points)
    print(
        f"timing on {device} ({dtype or arch.torch_dtype}), LM-head sizes {grid}, {args.repeats} repeats, "
        f"KV cache {args.context} positions ..."
    )
    start = time.perf_counter()
    fit = measure_draft_latency(
        arch, device=device, dtype=dtype, ks=grid, repeats=args.repeats, context=args.context, cuda_graph=not args.eager
    )
    elapsed = time.perf_counter() - start
    print(f"measured in {elapsed:.1f} s on {fit.device} ({fit.dtype}{'; ' + fit.dtype_note if fit.dtype_note else ''})")
    print(
        f"fit: t(k) = {fit.intercept_s * 1e3:.4f} ms + {fit.slope_s_per_row * 1e9:.4f} ns * k   (R^2 {fit.r_squared:.4f})"
    )
    for k, seconds in zip(fit.ks, fit.seconds):
        print(f"  k = {k:>7,}: median {seconds * 1e3:9.4f} ms   fit {float(fit.seconds_at(k)) * 1e3:9.4f} ms")
    t_full = float(fit.seconds_at(arch.vocab_size))
    lm_share = fit.slope_s_per_row * arch.vocab_size / t_full
    print(f"measured LM-head share of draft time at V: {lm_share:.1%} (FLOPs model: {lm_head_share(arch):.1%})")
    print()
    print(f"{'k':>8}  {'FLOPs model':>12}  {'bytes model':>12}  {'measured fit':>12}  {'measured - FLOPs':>16}")
    rows = []
    for k in KS:
        flops = float(latency_reduction(arch, k))
        weight_bytes = float(bytes_latency_reduction(arch, k))
        measured = 1.0 - float(fit.seconds_at(k)) / t_full
        rows.append({"k": k, "flops": flops, "bytes": weight_bytes, "measured": measured})
        print(f"{k:>8,}  {flops:12.4f}  {weight_bytes:12.4f}  {measured:12.4f}  {measured - flops:+16.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"fit": fit.as_dict(), "rows": rows, "seconds": elapsed}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
