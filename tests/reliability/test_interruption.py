"""Interruption: runs killed (SIGKILL) or interrupted (SIGINT) at every file-system step of the
commit, and real CLI processes killed at random moments, never leave a mix of old and new
outputs or a config that disagrees with the mapping; the next run cleans up and completes.

How: a forked child installs tests/fault_injection.Injector, which sends the signal to the
child itself right before its Nth disk-changing step inside specforge_vocab.fileio. The
parent then reads the output directory (raw, as any reader would), runs the recovery a
reader or the next run does, and reruns. Old and new sets are two real `optimize` outputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from conftest import child_env, llama3_config_text
from fault_injection import Injector, install
from reliability_helpers import (
    GROUP,
    WIRING_REASON,
    check_mapping_file,
    classify,
    config_k,
    leftovers,
    pipeline_is_wired,
    read_set,
    run_forked,
)

from specforge_vocab import fileio
from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.writing.outputs import commit_outputs, recover_outputs

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork (POSIX only)")

V = 6000
K_OLD, K_NEW = 700, 1500
NOTES = b"the user's own notes: must survive every run\n"
TALLY: Dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    TALLY[key] = TALLY.get(key, 0) + n


@dataclass
class Sets:
    """Two real optimize outputs (old: counts A, k=700; new: counts B, k=1500) for one work dir."""

    root: str
    out: str
    config: str
    counts_old: str
    counts_new: str
    group: List[str] = field(default_factory=list)  # the files optimize writes (from the reference run)
    files: Dict[str, Dict[str, bytes]] = field(default_factory=dict)
    configs: Dict[str, bytes] = field(default_factory=dict)
    signatures: Dict[str, dict] = field(default_factory=dict)

    def argv(self, which: str) -> List[str]:
        counts, k = (self.counts_old, K_OLD) if which == "old" else (self.counts_new, K_NEW)
        return [
            "-q",
            "optimize",
            "--counts",
            counts,
            "--config-path",
            self.config,
            "--output-dir",
            self.out,
            "--draft-vocab-size",
            str(k),
            "--max-vocab-size",
            "3000",
            "--lock-timeout",
            "30",
        ]

    def payloads(self, which: str) -> Dict[str, bytes]:
        return {os.path.join(self.out, name): data for name, data in self.files[which].items()}

    def new_variants(self) -> list:
        return [self.signatures["new"], self.signatures["new-again"]]

    def restore(self, which: str) -> None:
        """Wipe the work dir (leftovers included) and put one complete set back."""
        for entry in os.listdir(self.root):
            path = os.path.join(self.root, entry)
            if entry in ("counts_old.safetensors", "counts_new.safetensors"):
                continue
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        with open(self.config, "wb") as handle:
            handle.write(self.configs[which])
        if which == "none":
            return
        os.makedirs(self.out)
        with open(os.path.join(self.out, "notes.txt"), "wb") as handle:
            handle.write(NOTES)
        for name, data in self.files[which].items():
            with open(os.path.join(self.out, name), "wb") as handle:
                handle.write(data)


def _config_text(k: int) -> bytes:
    return llama3_config_text(vocab_size=V, draft_vocab_size=k).encode("utf-8")


def _make_sets(root: str) -> Sets:
    from specforge_vocab.cli.main import main

    rng = np.random.default_rng(8)
    s = Sets(
        root=root,
        out=os.path.join(root, "out"),
        config=os.path.join(root, "draft.json"),
        counts_old=os.path.join(root, "counts_old.safetensors"),
        counts_new=os.path.join(root, "counts_new.safetensors"),
    )
    for path, seed_shift in ((s.counts_old, 0), (s.counts_new, 1)):
        counts = (rng.zipf(1.3 + 0.2 * seed_shift, V) % 5000).astype(np.int64)
        save_counts(path, counts, {"format": "specforge-vocab-counts", "vocab_size": str(V)})
    s.configs["old"] = _config_text(900)
    s.configs["none"] = s.configs["old"]
    s.restore("none")
    os.makedirs(s.out)
    with open(os.path.join(s.out, "notes.txt"), "wb") as handle:
        handle.write(NOTES)
    for which in ("old", "new"):
        assert main(s.argv(which)) == 0
        s.group = sorted(n for n in os.listdir(s.out) if n != "notes.txt" and not n.startswith("."))
        assert set(GROUP) <= set(s.group)
        s.files[which] = {name: Path(s.out, name).read_bytes() for name in s.group}
        s.configs[which] = Path(s.config).read_bytes()
        s.signatures[which] = read_set(s.out, s.group)
    s.signatures["none"] = {name: None for name in s.group}
    # A rerun that starts from the new config writes the same set, except where the pipeline records
    # the config's previous draft_vocab_size (summary.json "architecture"): that is also "new".
    assert main(s.argv("new")) == 0
    s.signatures["new-again"] = read_set(s.out, s.group)
    assert config_k(s.config) == K_NEW and s.signatures["old"] != s.signatures["new"]
    # Every file differs between the two sets, so a mix is always visible.
    assert all(s.signatures["old"][n] not in (s.signatures["new"][n], s.signatures["new-again"][n]) for n in s.group)
    return s


def _memory_root() -> str:
    """A tmpfs folder when there is one (no fsync cost, many kill points stay fast), else None."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile

        return tempfile.mkdtemp(prefix="specforge-vocab-kill-", dir=shm)
    return None


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Work dir on the test's temp disk."""
    return _make_sets(str(tmp_path_factory.mktemp("interrupt")))


@pytest.fixture(scope="module")
def fast_sets(tmp_path_factory):
    """Work dir on tmpfs when available (same code paths, including renameat2), else on disk."""
    root = _memory_root()
    try:
        yield _make_sets(root or str(tmp_path_factory.mktemp("interrupt-fast")))
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)


def _outcome(s: Sets, before: str, *, raw_must_be_whole: bool) -> str:
    """Check the state right after a kill; return 'old'/'new' (or 'mixed-with-journal' in journal mode)."""
    if before != "none":
        assert Path(s.out, "notes.txt").read_bytes() == NOTES, "a file of the user's was lost"
    references = {before: s.signatures[before], "new": s.new_variants()}
    config = Path(s.config).read_bytes()
    assert config in (s.configs[before], s.configs["new"]), "the config is neither the old nor the new one"
    journals = [n for n in os.listdir(s.out) if fileio.JOURNAL_RE.match(n)] if os.path.isdir(s.out) else []
    visible = sorted(n for n in os.listdir(s.out) if not n.startswith(".")) if os.path.isdir(s.out) else []
    assert set(visible) <= set(s.group) | {"notes.txt"}, f"unexpected visible files: {visible}"
    try:
        label = classify(read_set(s.out, s.group), references)
    except AssertionError:
        if raw_must_be_whole or not journals:
            raise
        return "mixed-with-journal"
    bak = Path(s.config + ".bak")
    if label == before:
        assert config == s.configs[before], "old outputs but a new config"
        assert not bak.exists(), "a backup appeared although nothing was committed"
    elif config == s.configs["new"]:
        assert bak.read_bytes() == s.configs[before], "the backup is not the config the run started from"
    else:
        assert journals, "new outputs with the old config and no journal to complete the config"
        return "new-config-pending"
    return label


def _after_recovery(s: Sets, before: str) -> str:
    recover_outputs(s.out, s.config)
    label = classify(read_set(s.out, s.group), {before: s.signatures[before], "new": s.new_variants()})
    assert Path(s.config).read_bytes() == s.configs[label], f"{label} outputs but the other config"
    if os.path.isdir(s.out):
        assert not [n for n in os.listdir(s.out) if fileio.JOURNAL_RE.match(n)], "a journal was not completed"
    return label


def _final_checks(s: Sets, *, notes: bool = True) -> None:
    assert classify(read_set(s.out, s.group), {"new": s.new_variants()}) == "new"
    assert Path(s.config).read_bytes() == s.configs["new"]
    assert check_mapping_file(s.out) == K_NEW == config_k(s.config)
    if notes:
        assert Path(s.out, "notes.txt").read_bytes() == NOTES
    assert leftovers(s.root) == [], leftovers(s.root)
    assert not any(n.startswith(".") for n in os.listdir(s.out))


def _commit_new(s: Sets, injector: Injector, steps_file: str = None) -> int:
    install(injector)
    try:
        commit_outputs(
            s.payloads("new"),
            output_dir=s.out,
            config_path=s.config,
            draft_vocab_size=K_NEW,
            backup=True,
            lock_timeout=30,
        )
    finally:
        if steps_file:
            Path(steps_file).write_text(json.dumps(injector.steps))
    return 0


def _count_steps(s: Sets, before: str, run) -> List[str]:
    # Probe renameat2 support here, once: the forked runs inherit the answer, so every run takes
    # the same steps (otherwise only the first run in this process would probe).
    fileio.exchange_supported(s.root)
    s.restore(before)
    steps_file = os.path.join(os.path.dirname(s.root), f"steps-{os.getpid()}.json")
    assert run_forked(lambda: run(Injector(), steps_file)) == ("exit", 0)
    steps = json.loads(Path(steps_file).read_text())
    os.unlink(steps_file)
    return steps


@pytest.mark.parametrize(
    "mode,before,where", [("exchange", "old", "disk"), ("journal", "old", "memory"), ("exchange", "none", "memory")]
)
def test_commit_killed_at_every_step_leaves_old_or_new(request, monkeypatch, mode, before, where):
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, mode)
    s = request.getfixturevalue("sets" if where == "disk" else "fast_sets")
    steps = _count_steps(s, before, lambda inj, f: _commit_new(s, inj, f))
    assert (mode == "exchange") == ("exchange_paths" in steps)
    seen = {}
    for n in range(1, len(steps) + 1):
        for signum in (signal.SIGKILL, signal.SIGINT):
            s.restore(before)
            status = run_forked(lambda n=n, signum=signum: _commit_new(s, Injector(n, signum)))
            expected = ("signal", 9) if signum == signal.SIGKILL else ("exit", 130)
            assert status == expected, (n, steps[n - 1], status)
            raw = _outcome(s, before, raw_must_be_whole=(mode == "exchange"))
            seen[raw] = seen.get(raw, 0) + 1
            if n % 2 == 0:
                _after_recovery(s, before)  # what a reader does first (the next run does it too)
            commit_outputs(s.payloads("new"), output_dir=s.out, config_path=s.config, draft_vocab_size=K_NEW)
            _final_checks(s, notes=before != "none")
            _count(f"commit-{mode}-{before}")
    # Both sides of the commit point were hit.
    assert seen.get(before, 0) > 0 and seen.get("new", 0) + seen.get("new-config-pending", 0) > 0, seen
    print(f"{mode}/{before}: {len(steps)} steps x 2 signals: {seen}")


def _cli_child(s: Sets, injector: Injector, steps_file: str = None) -> int:
    install(injector)
    from specforge_vocab.cli.main import main

    try:
        return main(s.argv("new"))
    finally:
        if steps_file:
            Path(steps_file).write_text(json.dumps(injector.steps))


def _memoize_rendering(monkeypatch) -> None:
    """Plots are pure computation done before any write and cost ~1 s each: render each once
    per chosen k and reuse the bytes, so many kill points stay affordable."""
    from specforge_vocab import pipeline

    for name in [n for n in dir(pipeline) if n.startswith("render_") and callable(getattr(pipeline, n))]:
        function, cache = getattr(pipeline, name), {}

        def memo(*args, _function=function, _cache=cache, **kwargs):
            key = getattr(args[0], "k", None) if args else None
            if key is None:
                return _function(*args, **kwargs)
            if key not in _cache:
                _cache[key] = _function(*args, **kwargs)
            return _cache[key]

        monkeypatch.setattr(pipeline, name, memo)


@pytest.mark.skipif(not pipeline_is_wired(), reason=WIRING_REASON)
@pytest.mark.parametrize("mode", ["exchange", "journal"])
def test_optimize_cli_killed_at_sampled_steps(fast_sets, monkeypatch, mode):
    """The real `optimize` command (forked after imports), killed at every third step."""
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, mode)
    _memoize_rendering(monkeypatch)
    s = fast_sets
    from specforge_vocab.cli.main import main

    s.restore("old")
    assert main(s.argv("new")) == 0  # renders the plots once, here; forked runs reuse them
    steps = _count_steps(s, "old", lambda inj, f: _cli_child(s, inj, f))
    points = [(n, signal.SIGINT if n % 2 else signal.SIGKILL) for n in range(1, len(steps) + 1, 3)]
    for n, signum in points:
        s.restore("old")
        status = run_forked(lambda n=n, signum=signum: _cli_child(s, Injector(n, signum)))
        assert status == (("signal", 9) if signum == signal.SIGKILL else ("exit", 130)), (n, steps[n - 1], status)
        _outcome(s, "old", raw_must_be_whole=(mode == "exchange"))
        _after_recovery(s, "old")
        assert run_forked(lambda: _cli_child(s, Injector())) == ("exit", 0)  # the rerun completes normally
        _final_checks(s)
        _count(f"cli-{mode}")


@pytest.mark.skipif(not pipeline_is_wired(), reason=WIRING_REASON)
def test_real_processes_killed_at_random_moments(sets):
    """`python -m specforge_vocab.cli optimize` killed with SIGKILL or SIGINT a random 0-60 ms after it
    takes the output lock (the write phase), then rerun."""
    s = sets
    rng = random.Random(2026)
    tries = int(os.environ.get("SPECFORGE_VOCAB_RANDOM_KILLS", "4"))
    lock_pid = fileio.lock_path_of(s.out) + ".pid"
    env = child_env(*sys.path)
    outcomes = {}
    for i in range(tries):
        s.restore("old")
        signum = signal.SIGKILL if i % 2 == 0 else signal.SIGINT
        proc = subprocess.Popen(
            [sys.executable, "-m", "specforge_vocab.cli"] + s.argv("new"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while not os.path.exists(lock_pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.06))
        if proc.poll() is None:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -9, -2, 130), err.decode()  # -2: SIGINT after main returned
        raw = _outcome(s, "old", raw_must_be_whole=True)
        outcomes[raw] = outcomes.get(raw, 0) + 1
        _after_recovery(s, "old")
        from specforge_vocab.cli.main import main

        assert main(s.argv("new")) == 0
        _final_checks(s)
        _count("random-kill")
    print("random kills:", outcomes)


def test_zz_report_kill_points():
    """Prints how many kill points the tests above tried (the README's reliability figures)."""
    print("kill points tried:", TALLY, "total", sum(TALLY.values()))
