"""Target-argmax counts at Llama-3-8B shapes (H 4,096, V 128,256) on CPU: positions per second and memory.

baseline = a naive full-logits implementation, as SpecForge's TargetHead computes them: per feature file,
           F.linear(hidden_state, W) in bfloat16 over every stored position ([L, V] logits), .float(),
           argmax, then the positions the loss keeps (last mask entry zeroed, teacher from the next row)
ours     = specforge_vocab's path (counting/tokenized.py): read only the hidden rows of the trained
           positions, fp32 tiles of W with bounded memory, exact bfloat16 argmax (counting/target_counts.py)

The features look like prepare_hidden_states.py's: capture batches padded to L = 1,024, each sample a
prompt (loss mask 0) then a reply (loss mask 1), then padding; W and the hidden states are random bfloat16.
Both read the same files with the head already in memory (loading it is the same for both: timed apart).

Claims: ours >= 2x the baseline's trained positions per second; ours' peak memory growth while counting
(RSS above the loaded head, sampled by psutil) < 1 GiB and the same for 1 file as for all of them.
CUDA, when torch sees a GPU: the same two, timed there too (otherwise printed as skipped).

Run: .venv/bin/python benchmarks/bench_target_counts.py [--files N]   (about a minute per file on 2 cores)
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from _common import machine

from specforge_vocab.counting.features import list_feature_files, load_feature_file, read_feature_sample
from specforge_vocab.counting.target_counts import ArgmaxCounter, TargetArgmax, full_precision_matmul
from specforge_vocab.counting.target_head import load_target_head

V, H, L = 128_256, 4_096, 1_024
MAX_LENGTH = 2048
CLAIM_RATIO, CLAIM_BYTES = 2.0, 1 << 30


def write_inputs(root: Path, files: int, seed: int = 0):
    """A target directory (the head in a two-shard index) and ``files`` feature files."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    target = root / "target"
    target.mkdir()
    weight = torch.from_numpy(rng.standard_normal((V, H), dtype=np.float32) * 0.02).to(torch.bfloat16)
    save_file(
        {"model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}, str(target / "model-00001-of-00002.safetensors")
    )
    save_file({"lm_head.weight": weight}, str(target / "model-00002-of-00002.safetensors"))
    index = '{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}'
    (target / "model.safetensors.index.json").write_text(index)
    features = root / "features" / "rows_0-2000"
    features.mkdir(parents=True)
    for i in range(files):
        real = int(rng.integers(L // 2, L + 1))  # the rest of the capture batch's length is padding
        prompt = int(real * rng.uniform(0.2, 0.5))
        ids = np.zeros(L, dtype=np.int64)
        ids[:real] = rng.integers(0, V, size=real)
        mask = np.zeros(L, dtype=np.int64)
        mask[prompt:real] = 1
        hidden = torch.from_numpy(rng.standard_normal((1, L, H), dtype=np.float32)).to(torch.bfloat16)
        record = {"input_ids": torch.from_numpy(ids), "loss_mask": torch.from_numpy(mask), "hidden_state": hidden}
        torch.save(record, features / f"data_{i}.ckpt")
    return str(target), str(root / "features")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def ours(paths, weight, device: str):
    counter = ArgmaxCounter(TargetArgmax(weight, device=device))
    with full_precision_matmul(psutil.cpu_count() or 1):
        for path in paths:
            counter.add(read_feature_sample(path, MAX_LENGTH, vocab_size=V, hidden=True).teacher_hidden, source=path)
        counter.flush()
    return counter.counts, counter.positions


def naive(paths, weight, device: str):
    """Full [L, V] logits per sample in bfloat16 (SpecForge's TargetHead), argmax, SpecForge's positions."""
    counts = np.zeros(V, dtype=np.int64)
    w = weight.to(device)
    positions = 0
    with torch.no_grad():
        for path in paths:
            raw = load_feature_file(path)
            hidden = raw["hidden_state"].squeeze(0)[:MAX_LENGTH].to(device)
            mask = raw["loss_mask"][:MAX_LENGTH].clone()
            mask[-1] = 0
            argmax = torch.nn.functional.linear(hidden, w).float().argmax(dim=-1).cpu().numpy()
            t = np.flatnonzero(mask.numpy())
            counts += np.bincount(argmax[t + 1], minlength=V)
            positions += t.size
    return counts, positions


def release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc), so each run's RSS growth starts clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def timed(fn, *args):
    release_freed_memory()
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
    return seconds, memory.growth, result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2, help="feature files of L = 1,024 (default 2)")
    args = parser.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        target, features = write_inputs(Path(tmp), args.files)
        start = time.perf_counter()
        head = load_target_head(target)
        print(f"LM head [{V:,}, {H:,}] bfloat16 read from its shard in {time.perf_counter() - start:.1f} s")
        paths = list_feature_files(features)
        stored = len(paths) * L
        ok = True
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            t_one, m_one, _ = timed(ours, paths[:1], head.weight, device)
            t_ours, m_ours, (c_ours, n) = timed(ours, paths, head.weight, device)
            t_naive, m_naive, (c_naive, n_naive) = timed(naive, paths, head.weight, device)
            assert n == n_naive
            ratio = t_naive / t_ours
            print(f"[{device}] {len(paths)} files, {stored:,} stored positions, {n:,} trained ({n / stored:.0%})")
            print(
                f"[{device}] trained positions per second: baseline {n / t_naive:,.1f}  ours {n / t_ours:,.1f}  "
                f"ratio {ratio:.2f}x"
            )
            print(
                f"[{device}] peak RSS growth while counting: ours {m_one / 2**20:,.0f} MiB (1 file) and "
                f"{m_ours / 2**20:,.0f} MiB ({len(paths)} files); baseline {m_naive / 2**20:,.0f} MiB ([L, V] logits)"
            )
            differ = int(np.abs(c_ours - c_naive).sum()) // 2
            print(f"[{device}] positions whose argmax differs from the bfloat16 GEMM's (near-ties): {differ} of {n:,}")
            met = ratio >= CLAIM_RATIO and max(m_ours, m_one) < CLAIM_BYTES
            print(
                f"[{device}] claim >= {CLAIM_RATIO:.0f}x and < 1 GiB for any number of positions: {'met' if met else 'NOT met'}"
            )
            ok = ok and met
        if not torch.cuda.is_available():
            print("[cuda] skipped: torch sees no CUDA GPU on this machine")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
