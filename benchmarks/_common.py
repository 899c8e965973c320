"""Shared helpers for the benchmark scripts: data location, tokenizers, timing, machine facts."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))


def shared_data_or_exit() -> Path:
    if not SHARED_DATA.is_dir():
        print(
            f"skipped: the shared data folder {SHARED_DATA} is absent; benchmarks need ../shared/data next to the repo"
        )
        sys.exit(0)
    return SHARED_DATA


def tokenizer_dir(module_name: str) -> str:
    return os.path.dirname(__import__(module_name).__file__)


def best_of(fn, repeats: int = 3):
    """(best wall time in seconds, last result) over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def interleaved(fns: dict, repeats: int = 5) -> dict:
    """Best wall time of each function, running them in turn so load changes hit all alike.

    Returns {name: (best seconds, last result)}.
    """
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            best[name] = (min(best[name][0], elapsed), result)
    return best


def machine() -> str:
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:  # pragma: no cover
        mem = "?"
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem}, Python {platform.python_version()}"


def row(name: str, baseline: float, ours: float, unit: str = "s") -> str:
    return f"{name:<44} baseline {baseline:9.3f} {unit}   ours {ours:9.3f} {unit}   ratio {baseline / ours:8.2f}x"
