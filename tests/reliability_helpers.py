"""Shared pieces of the interruption, concurrency and bad-input tests: reference output sets,
classifying a directory as one complete set (never a mix), leftovers, forked runs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple

from specforge_vocab import fileio

GROUP = (
    "summary.json",
    "full_results.json",
    "optimization_results.png",
    "token_counts.safetensors",
    "vocab_mapping.pt",
    "vocab_mapping.safetensors",
)

Signature = Dict[str, object]


def canonical_bytes(name: str, data: bytes):
    """Content identity of one output file. JSON files and safetensors headers are compared as
    parsed JSON (metadata read back from safetensors comes in a different key order in each
    process), everything else byte for byte."""
    if name.endswith(".json"):
        try:
            return ("json", json.dumps(json.loads(data), sort_keys=True))
        except ValueError:  # a half-written file: never equal to a reference
            return ("unparseable", hashlib.sha256(data).hexdigest())
    if name.endswith(".safetensors"):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        return ("safetensors", json.dumps(header, sort_keys=True), hashlib.sha256(data[8 + n :]).hexdigest())
    return ("bytes", hashlib.sha256(data).hexdigest())


def read_set(directory: str, names=GROUP, *, dir_fd: Optional[int] = None) -> Signature:
    """{name: canonical content or None if absent}; with ``dir_fd`` every file is opened
    relative to one directory handle (one consistent snapshot even across a swap)."""
    out: Signature = {}
    for name in names:
        try:
            if dir_fd is not None:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as handle:
                    data = handle.read()
            else:
                with open(os.path.join(directory, name), "rb") as handle:
                    data = handle.read()
        except FileNotFoundError:
            out[name] = None
            continue
        out[name] = canonical_bytes(name, data)
    return out


def classify(signature: Signature, references: Dict[str, object]) -> str:
    """Name of the reference set ``signature`` belongs to; AssertionError naming the mix otherwise.

    A reference is one signature or a list of equally valid variants of the same set (each
    file must then equal that file in one of the variants)."""

    def variants(reference):
        return reference if isinstance(reference, list) else [reference]

    for label, reference in references.items():
        if all(any(v.get(name) == value for v in variants(reference)) for name, value in signature.items()):
            return label
    parts = []
    for name, value in signature.items():
        owners = [label for label, ref in references.items() if any(v.get(name) == value for v in variants(ref))]
        parts.append(f"{name}: {'/'.join(owners) or ('absent' if value is None else 'unknown content')}")
    raise AssertionError("the output directory holds a MIX of sets: " + "; ".join(parts))


LOCK_FILE_RE = re.compile(r"\.lock(\.pid)?$")


def leftovers(root: str) -> List[str]:
    """Temp files, staging directories, journals and lock files anywhere under ``root``."""
    found = []
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            if (
                fileio.TEMP_RE.match(name)
                or fileio.STAGING_RE.match(name)
                or fileio.JOURNAL_RE.match(name)
                or LOCK_FILE_RE.search(name)
            ):
                found.append(os.path.join(base, name))
    return found


def snapshot_tree(root: str, *, ignore=()) -> Dict[str, str]:
    """{relative path: sha256 or 'dir'} of everything under ``root`` (names matching ``ignore`` left out)."""
    pattern = re.compile("|".join(ignore)) if ignore else None
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), root)] = "dir"
        for name in files:
            if pattern is not None and pattern.search(name):
                continue
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = fileio.sha256_file(path) if os.path.isfile(path) else "special"
    return out


def config_k(path: str) -> Optional[int]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("draft_vocab_size")


def check_mapping_file(directory: str) -> int:
    """Load vocab_mapping.pt (weights_only) and check the section 1 rules against summary.json's k; return k."""
    import torch

    from specforge_vocab.writing.mapping import check_mapping

    with open(os.path.join(directory, "summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    k, V = int(summary["optimal_draft_vocab_size"]), int(summary["target_vocab_size"])
    data = torch.load(os.path.join(directory, "vocab_mapping.pt"), map_location="cpu", weights_only=True)
    check_mapping(data["d2t"], data["t2d"], draft_vocab_size=k, vocab_size=V, source="test")
    return k


def run_forked(function: Callable[[], int], *, timeout: float = 120.0) -> Tuple[str, int]:
    """Run ``function`` in a forked child; ("exit", code) or ("signal", number)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = int(function() or 0)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked run {pid} did not finish in {timeout} s")
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


def pipeline_is_wired() -> bool:
    """True once pipeline.optimize commits through outputs.commit_outputs (issue 8 wiring)."""
    from specforge_vocab import pipeline

    return hasattr(pipeline, "commit_outputs")


WIRING_REASON = (
    "pipeline.optimize does not commit through specforge_vocab.writing.outputs.commit_outputs yet "
    "(see the wiring in the issue 8 report); the config is then patched after the outputs, outside the group"
)
