"""Concurrency: runs on the same output directory or config take a lock; a second run waits up to
--lock-timeout, then fails with a message naming the holder's pid; many runs at once end in one
complete set with a config that agrees, and a reader never sees a mix while they write."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from conftest import child_env, llama3_config_text
from reliability_helpers import WIRING_REASON, check_mapping_file, config_k, leftovers, pipeline_is_wired

from specforge_vocab import fileio
from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.errors import InputError
from specforge_vocab.writing.outputs import commit_outputs

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the concurrency tests fork (POSIX only)")

FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection.py"  # run as a script, beside this file
V = 6000
TALLY: Dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    TALLY[key] = TALLY.get(key, 0) + n


def _config(path: Path, k: int = 900) -> str:
    path.write_text(llama3_config_text(vocab_size=V, draft_vocab_size=k), encoding="utf-8")
    return str(path)


@pytest.fixture
def work(tmp_path):
    counts = (np.random.default_rng(3).zipf(1.4, V) % 4000).astype(np.int64)
    save_counts(str(tmp_path / "counts.safetensors"), counts, {"format": "specforge-vocab-counts"})
    return {
        "root": tmp_path,
        "counts": str(tmp_path / "counts.safetensors"),
        "config": _config(tmp_path / "draft.json"),
        "out": str(tmp_path / "out"),
    }


def _env():
    return child_env(*sys.path)


def _optimize_argv(work, k: int, *, out=None, timeout: float = 60.0) -> List[str]:
    return [
        "-q",
        "optimize",
        "--counts",
        work["counts"],
        "--config-path",
        work["config"],
        "--output-dir",
        out or work["out"],
        "--draft-vocab-size",
        str(k),
        "--max-vocab-size",
        "3000",
        "--lock-timeout",
        str(timeout),
    ]


def _holder(work, k: int, *, out=None, release: str = None, sleep: float = 0.0) -> subprocess.Popen:
    """A real optimize run that pauses (holding its locks) before its first write, until the
    file ``release`` exists (or for ``sleep`` seconds)."""
    pause = ["--release", release] if release else ["--sleep", str(sleep)]
    argv = (
        [sys.executable, str(FAULT_INJECTION), "--sleep-on", "_write_payload:1"]
        + pause
        + ["--"]
        + _optimize_argv(work, k, out=out)
    )
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_lock(target: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    pid_file = fileio.lock_path_of(target) + ".pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.communicate()}")
        try:
            if Path(pid_file).read_text().split()[0] == str(proc.pid):
                return
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    raise AssertionError("the holder never took the lock")


def _cli(argv: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specforge_vocab.cli"] + argv, env=_env(), capture_output=True, text=True, timeout=300
    )


def _check_set(out: str, k: int) -> None:
    assert check_mapping_file(out) == k
    summary = json.loads(Path(out, "summary.json").read_text())
    assert summary["optimal_draft_vocab_size"] == k


def test_second_run_on_the_same_output_dir_times_out_naming_the_holder(work):
    release = str(work["root"] / "release")
    holder = _holder(work, 1200, release=release)
    try:
        _wait_for_lock(work["out"], holder)
        started = time.monotonic()
        second = _cli(_optimize_argv(work, 800, timeout=1.0))
        waited = time.monotonic() - started
        Path(release).write_text("go")
        assert second.returncode == 2, second.stderr
        # The output dir's lock, or the config's (both are held; the first in sorted order is reported).
        assert re.search(
            rf"(out|draft\.json) is locked by another specforge-vocab run \(pid {holder.pid}( on \S+)?\); "
            r"waited 1 s \(--lock-timeout\)",
            second.stderr,
        ), second.stderr
        assert "Traceback" not in second.stderr and waited >= 1.0
        assert not os.path.exists(os.path.join(work["out"], "summary.json"))  # the second run wrote nothing
        assert config_k(work["config"]) == 900
        _count("timeout")
    finally:
        Path(release).write_text("go")
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    _check_set(work["out"], 1200)
    assert config_k(work["config"]) == 1200 and leftovers(str(work["root"])) == []
    _count("holder")


def test_second_run_waits_for_the_lock_then_completes(work):
    holder = _holder(work, 1200, sleep=2.0)
    try:
        _wait_for_lock(work["out"], holder)
        second = _cli(_optimize_argv(work, 800, timeout=120.0))
    finally:
        _, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    assert second.returncode == 0, second.stderr
    _check_set(work["out"], 800)  # the waiting run wrote last
    assert config_k(work["config"]) == 800 and leftovers(str(work["root"])) == []
    _count("wait", 2)


@pytest.mark.skipif(not pipeline_is_wired(), reason=WIRING_REASON)
def test_runs_on_different_output_dirs_share_the_config_lock(work):
    release = str(work["root"] / "release")
    holder = _holder(work, 1200, out=str(work["root"] / "out1"), release=release)
    try:
        _wait_for_lock(work["config"], holder)
        second = _cli(_optimize_argv(work, 800, out=str(work["root"] / "out2"), timeout=1.0))
        Path(release).write_text("go")
        assert second.returncode == 2, second.stderr
        assert re.search(rf"draft\.json is locked by another specforge-vocab run \(pid {holder.pid}", second.stderr), (
            second.stderr
        )
        assert not os.path.exists(work["root"] / "out2" / "summary.json")
        _count("config-timeout")
    finally:
        Path(release).write_text("go")
        _, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    _check_set(str(work["root"] / "out1"), 1200)
    assert config_k(work["config"]) == 1200
    _count("holder")


def test_lock_message_names_the_pid_and_lock_is_reentrant(tmp_path):
    target = str(tmp_path / "out")
    ready = tmp_path / "ready"

    def hold():
        with fileio.file_lock(target, timeout=5):
            ready.write_text("1")
            time.sleep(3)
        return 0

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            hold()
        finally:
            os._exit(0)
    try:
        while not ready.exists():
            time.sleep(0.01)
        with pytest.raises(InputError, match=rf"locked by another specforge-vocab run \(pid {pid}"):
            with fileio.file_lock(target, timeout=0.2):
                pass
    finally:
        os.waitpid(pid, 0)
    # Once the holder is gone the lock is free; taking it again in the same thread nests.
    with fileio.file_lock(target, timeout=1):
        with fileio.file_locks([target, str(tmp_path / "cfg.json")], timeout=1):
            pass
    assert not os.path.exists(fileio.lock_path_of(target) + ".pid")
    _count("lock-unit", 2)


def test_many_processes_share_one_lock_whose_file_is_deleted_on_release(tmp_path):
    """8 processes take the same lock 40 times each; every holder deletes the lock file before letting
    go, so waiters that opened the old file must start again. Each child sleeps a random moment
    between opening the lock file and locking it (where a holder's delete can slip in), which makes
    the race a missing check would lose likely. Never are two inside at once; no lock file is left."""
    import fcntl
    import random
    import types

    from specforge_vocab.fileio import locks

    target = str(tmp_path / "out")
    inside = tmp_path / "inside"  # created exclusively by whoever holds the lock
    breaches = tmp_path / "breaches"
    children = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            rng = random.Random(os.getpid())

            def slow_flock(fd, operation, rng=rng):
                if operation & fcntl.LOCK_EX:
                    time.sleep(rng.uniform(0, 0.002))
                return fcntl.flock(fd, operation)

            locks.fcntl = types.SimpleNamespace(
                flock=slow_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN
            )
            try:
                for _ in range(40):
                    with fileio.file_lock(target, timeout=60):
                        try:
                            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                        except FileExistsError:
                            with open(breaches, "a") as handle:
                                handle.write(f"{os.getpid()}\n")
                            continue
                        os.close(fd)
                        time.sleep(0.0005)
                        os.unlink(inside)
            except BaseException:  # noqa: BLE001 - report any failure through the exit status
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert statuses == [0] * 8
    assert not breaches.exists(), f"two holders at once: {breaches.read_text()}"
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
    _count("lock-stress", 8)


# --------------------------------------------------------------------------- many writers, one reader


def _payloads(out: str, k: int, counts: np.ndarray) -> Dict[str, bytes]:
    """A consistent output set for draft_vocab_size k (every file says k in its own way) plus 2 MB
    of filler, so writes take long enough for the runs to overlap."""
    import io

    import torch
    from safetensors.torch import save

    from specforge_vocab.writing.mapping import mapping_from_counts

    d2t, t2d = mapping_from_counts(counts, k)
    buffer = io.BytesIO()
    torch.save({"d2t": d2t, "t2d": t2d}, buffer)
    return {
        os.path.join(out, "full_results.json"): json.dumps({"optimal_vocab_size": k}),
        os.path.join(out, "filler.bin"): bytes([k % 251]) * (2 << 20),
        os.path.join(out, "vocab_mapping.pt"): buffer.getvalue(),
        os.path.join(out, "vocab_mapping.safetensors"): save(
            {"d2t": d2t, "t2d": t2d}, metadata={"draft_vocab_size": str(k)}
        ),
        os.path.join(out, "summary.json"): json.dumps({"optimal_draft_vocab_size": k, "target_vocab_size": V}),
    }


def _ks_of_snapshot(dir_fd: int) -> set:
    """The k each file of one snapshot (opened relative to one directory handle) says."""
    import io

    import torch

    def read(name):
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    ks = {
        json.loads(read("summary.json"))["optimal_draft_vocab_size"],
        json.loads(read("full_results.json"))["optimal_vocab_size"],
    }
    data = read("vocab_mapping.safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    ks.add(int(json.loads(data[8 : 8 + n])["__metadata__"]["draft_vocab_size"]))
    ks.add(int(torch.load(io.BytesIO(read("vocab_mapping.pt")), weights_only=True)["d2t"].shape[0]))
    filler = read("filler.bin")
    assert len(filler) == 2 << 20, "a half-written file"
    ks.add(("filler", filler[0]))
    return ks


def _reader(out: str, stop: str, report: str) -> int:
    snapshots, mixes = 0, []
    while not os.path.exists(stop):
        try:
            fd = os.open(out, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            ks = _ks_of_snapshot(fd)
        except (FileNotFoundError, KeyError):
            continue  # the directory handle is the old one and was emptied after a swap: reopen
        finally:
            os.close(fd)
        numbers = {k for k in ks if isinstance(k, int)}
        fillers = {k for k in ks if isinstance(k, tuple)}
        if len(numbers) != 1 or fillers != {("filler", next(iter(numbers)) % 251)}:
            mixes.append(sorted(map(str, ks)))
        snapshots += 1
        time.sleep(0.002)  # leave the writers some CPU
    Path(report).write_text(json.dumps({"snapshots": snapshots, "mixes": mixes[:5], "n_mixes": len(mixes)}))
    return 0


def _start(function) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = int(function() or 0)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 300.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} hung")


@pytest.mark.parametrize("mode,rounds,writers", [("exchange", 3, 8), ("journal", 2, 8)])
def test_many_writers_end_in_one_complete_set_and_readers_never_see_a_mix(tmp_path, monkeypatch, mode, rounds, writers):
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, mode)
    counts = (np.random.default_rng(5).zipf(1.4, V) % 4000).astype(np.int64)
    out, config = str(tmp_path / "out"), _config(tmp_path / "draft.json")
    ks = [300 + 97 * i for i in range(writers)]
    sets = {k: _payloads(out, k, counts) for k in ks}
    fileio.exchange_supported(str(tmp_path))  # probe once here; the forked writers inherit the answer
    commit_outputs(sets[ks[0]], output_dir=out, config_path=config, draft_vocab_size=ks[0])
    for round_ in range(rounds):
        stop, report = str(tmp_path / f"stop{round_}"), str(tmp_path / f"reader{round_}.json")
        reader = _start(lambda stop=stop, report=report: _reader(out, stop, report)) if mode == "exchange" else None
        pids = [
            _start(
                lambda k=k: (
                    commit_outputs(sets[k], output_dir=out, config_path=config, draft_vocab_size=k, lock_timeout=120)
                    and 0
                )
            )
            for k in ks
        ]
        codes = [_wait(pid) for pid in pids]
        Path(stop).write_text("1")
        assert codes == [0] * writers, codes
        _count(f"writers-{mode}", writers)
        k = check_mapping_file(out)
        assert k in ks and config_k(config) == k, (k, config_k(config))  # the config agrees with the mapping
        fd = os.open(out, os.O_RDONLY)
        try:
            assert {x for x in _ks_of_snapshot(fd) if isinstance(x, int)} == {k}
        finally:
            os.close(fd)
        assert leftovers(str(tmp_path)) == []
        if reader is not None:
            assert _wait(reader) == 0
            seen = json.loads(Path(report).read_text())
            assert seen["n_mixes"] == 0, seen
            assert seen["snapshots"] > 0
            _count("reader-snapshots", seen["snapshots"])
            print(f"round {round_}: reader saw {seen['snapshots']} consistent snapshots while {writers} runs wrote")


def test_zz_report_concurrent_runs():
    print("concurrent runs tried:", TALLY)
