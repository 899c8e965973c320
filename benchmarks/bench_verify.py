"""`verify` and `--remap` on a real-size Llama-3.1-8B EAGLE-3 draft (configs/llama3-8B-eagle3.json shapes,
k = 32,000, bf16, no embed_tokens, as SpecForge saves it): what they cost next to the floor of any tool.

Each row is printed as baseline | ours | ratio, measured in this process:

1. verify, Hugging Face layout (model.safetensors): baseline = reading the file once (the least a checker that
   looks at every tensor does); ours = ``verify_draft`` (headers, d2t and t2d only).
2. verify, SpecForge runtime checkpoint (training_state.pt): baseline = ``torch.load(weights_only=True)`` of the
   file; ours = ``verify_draft`` (the same load, memory-mapped, and the checks).
3. --remap onto a new kept set of the same size, half of it new ids: baseline = load_file + save_file + fsync
   of the unchanged draft (the floor of rewriting it safely); ours = ``write_warm_start`` (the byte copy of
   the retained rows, the new rows read from a 128,256-row target lm_head, the checks, an atomic write).

    python benchmarks/bench_verify.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_trim import arch_and_config, draft_tensors, row  # noqa: E402 (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from specforge_vocab.drafts.remap import write_warm_start  # noqa: E402 (after the sys.path insert)
from specforge_vocab.drafts.runtime_checkpoint import open_draft  # noqa: E402
from specforge_vocab.drafts.verify import VerifySettings, verify_draft  # noqa: E402
from specforge_vocab.writing.mapping import build_mapping  # noqa: E402


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from safetensors.torch import load_file, save_file

    arch, config = arch_and_config()
    k, V = config["draft_vocab_size"], arch.vocab_size
    rng = np.random.default_rng(0)
    old_kept = np.sort(rng.choice(V, k, replace=False))
    new_kept = np.sort(
        np.concatenate([old_kept[::2], rng.choice(np.setdiff1d(np.arange(V), old_kept), k // 2, replace=False)])
    )
    tensors = draft_tensors(arch, k, torch.bfloat16)
    tensors["d2t"], tensors["t2d"] = build_mapping(old_kept, V)
    work = Path(tempfile.mkdtemp(prefix="bench_verify_"))
    try:
        hf = work / "draft"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
        runtime = work / "run" / "specforge-run-step100"
        runtime.mkdir(parents=True)
        torch.save(
            {"draft_state_dict": tensors, "global_step": 100, "strategy": "eagle3"}, runtime / "training_state.pt"
        )
        target = work / "target"
        target.mkdir()
        head = (torch.randn(V, arch.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
        save_file({"lm_head.weight": head}, str(target / "model.safetensors"), metadata={"format": "pt"})
        del tensors, head
        size = (hf / "model.safetensors").stat().st_size

        print(f"[verify] {size / 1e6:,.0f} MB draft, k {k:,} of V {V:,}, best of {args.repeats}")
        base = best(lambda: (hf / "model.safetensors").read_bytes(), args.repeats)
        ours = best(lambda: verify_draft(VerifySettings(draft=str(hf))), args.repeats)
        assert verify_draft(VerifySettings(draft=str(hf))).sound
        row("safetensors draft (s)", base, ours, "s", "read/verify")
        base = best(lambda: torch.load(runtime / "training_state.pt", weights_only=True), args.repeats)
        ours = best(lambda: verify_draft(VerifySettings(draft=str(work / "run"))), args.repeats)
        row("runtime checkpoint (s)", base, ours, "s", "load/verify")

        def copy():
            loaded = load_file(str(hf / "model.safetensors"))
            save_file(loaded, str(work / "copy.safetensors"), metadata={"format": "pt"})
            with open(work / "copy.safetensors", "rb") as handle:
                os.fsync(handle.fileno())
            os.unlink(work / "copy.safetensors")

        def remap():
            shutil.rmtree(work / "warm", ignore_errors=True)
            result = write_warm_start(
                open_draft(str(work / "run")),
                old_kept,
                new_kept,
                output=str(work / "warm"),
                config=config,
                config_text=None,
                vocab_size=V,
                target_model_path=str(target),
            )
            assert result.retained == k // 2 and result.added_rows_from == "the target's lm_head rows"

        print(f"[remap] k {k:,} -> {new_kept.size:,}, {k // 2:,} rows retained, {k // 2:,} from the target's lm_head")
        row("rewrite the draft (s)", best(copy, args.repeats), best(remap, args.repeats), "s", "copy/remap")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
