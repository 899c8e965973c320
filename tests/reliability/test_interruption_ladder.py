"""Interruption of a commit that holds subdirectories: an output set with ladder/k<K>/ entries and
--export files, killed (SIGKILL) or interrupted (SIGINT) at every file-system step, is always the old
set or the new set (the whole tree, the config and its backup), never a mix; the recovery a reader
or the next run does completes it, and a rerun leaves nothing behind.

Three real `optimize` outputs (writing/outputs.py OPTIONAL_OUTPUTS are owned by each run):
A: k 700, ladder 300 500, --export ids; B: k 1500, ladder 400 500, --export speculators ids (other
counts); C: k 1500 on B's counts, no ladder and no export (committing C over A removes A's ladder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from conftest import llama3_config_text
from fault_injection import Injector, install
from reliability_helpers import leftovers, run_forked

from specforge_vocab import fileio
from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.writing.outputs import OPTIONAL_OUTPUTS, commit_outputs, recover_outputs

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork (POSIX only)")

V = 6000
NOTES = b"the user's own notes\n"
RUNS = {
    "A": ("counts_a", 700, ["--ladder", "300", "500", "--export", "ids"]),
    "B": ("counts_b", 1500, ["--ladder", "400", "500", "--export", "speculators", "ids"]),
    "C": ("counts_b", 1500, []),
}


def tree(directory: str) -> Dict[str, str]:
    """{relative path: sha256} of every visible file under ``directory`` (notes.txt aside)."""
    out = {}
    for base, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if not name.startswith(".") and rel != "notes.txt":
                out[rel] = hashlib.sha256(Path(base, name).read_bytes()).hexdigest()
    return out


class Work:
    """A work dir with one output directory and one draft config, and the three reference sets."""

    def __init__(self, root: str):
        self.root, self.out, self.config = root, os.path.join(root, "out"), os.path.join(root, "draft.json")
        self.files: Dict[str, Dict[str, bytes]] = {}
        self.trees: Dict[str, Dict[str, str]] = {}
        self.configs = {
            name: llama3_config_text(vocab_size=V, draft_vocab_size=k).encode() for name, (_, k, _) in RUNS.items()
        }
        self.configs["start"] = llama3_config_text(vocab_size=V, draft_vocab_size=900).encode()
        rng = np.random.default_rng(16)
        for name, exponent in (("counts_a", 1.3), ("counts_b", 1.5)):
            counts = (rng.zipf(exponent, V) % 5000).astype(np.int64)
            save_counts(os.path.join(root, f"{name}.safetensors"), counts, {"format": "specforge-vocab-counts"})
        from specforge_vocab.cli.main import main

        for name, (counts, k, extra) in RUNS.items():
            reference = os.path.join(root, f"ref_{name}")
            config = reference + ".json"
            Path(config).write_bytes(self.configs["start"])
            argv = ["-q", "optimize", "--counts", os.path.join(root, f"{counts}.safetensors"), "--config-path", config]
            assert main(argv + ["--output-dir", reference, "--draft-vocab-size", str(k), *extra]) == 0
            self.trees[name] = tree(reference)
            self.files[name] = {rel: Path(reference, rel).read_bytes() for rel in self.trees[name]}
        assert any(rel.startswith("ladder/") for rel in self.trees["A"]) and not any(
            "ladder" in r for r in self.trees["C"]
        )

    def restore(self, name: str) -> None:
        """Wipe the output directory and the config (leftovers included) and put set ``name`` back."""
        for entry in os.listdir(self.root):
            if entry.startswith(("out", "draft.json", ".out", ".draft")):
                path = os.path.join(self.root, entry)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        Path(self.config).write_bytes(self.configs[name])
        for rel, data in self.files[name].items():
            os.makedirs(os.path.dirname(os.path.join(self.out, rel)), exist_ok=True)
            Path(self.out, rel).write_bytes(data)
        Path(self.out, "notes.txt").write_bytes(NOTES)

    def commit(self, name: str) -> int:
        payloads = {os.path.join(self.out, rel): data for rel, data in self.files[name].items()}
        commit_outputs(
            payloads,
            output_dir=self.out,
            config_path=self.config,
            draft_vocab_size=RUNS[name][1],
            lock_timeout=30,
            owned=OPTIONAL_OUTPUTS,
        )
        return 0

    def state(self, before: str, after: str, *, must_be_whole: bool) -> str:
        """'before' or 'after' (the tree, config and backup agree), or 'journal' (a mix a journal completes)."""
        assert Path(self.out, "notes.txt").read_bytes() == NOTES, "a file of the user's was lost"
        current, config = tree(self.out), Path(self.config).read_bytes()
        backup = Path(self.config + ".bak")
        journals = [n for n in os.listdir(self.out) if fileio.JOURNAL_RE.match(n)]
        if current == self.trees[before]:
            if config == self.configs[before]:
                assert not backup.exists(), "a backup appeared although nothing was committed"
                return "before"
        if current == self.trees[after]:
            if config == self.configs[after]:
                assert backup.read_bytes() == self.configs[before]
                return "after"
            assert journals, "new outputs with the old config and no journal to complete it"
            return "journal"
        assert not must_be_whole and journals, f"a MIX of sets without a journal: {sorted(current)}"
        return "journal"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    shm = "/dev/shm"
    root = None
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile

        root = tempfile.mkdtemp(prefix="specforge-vocab-ladder-kill-", dir=shm)
    try:
        yield Work(root or str(tmp_path_factory.mktemp("ladder-kill")))
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    "mode,before,after", [("exchange", "A", "B"), ("journal", "A", "B"), ("exchange", "A", "C"), ("journal", "A", "C")]
)
def test_a_commit_with_a_ladder_killed_at_every_step_is_old_or_new(work, monkeypatch, mode, before, after):
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, mode)
    fileio.exchange_supported(work.root)  # probed here once, so every forked run takes the same steps
    work.restore(before)
    steps_file = os.path.join(work.root, ".steps.json")

    def recorded() -> int:
        injector = install(Injector())
        try:
            return work.commit(after)
        finally:
            Path(steps_file).write_text(json.dumps(injector.steps))

    assert run_forked(recorded) == ("exit", 0)
    steps = json.loads(Path(steps_file).read_text())
    os.unlink(steps_file)
    assert (mode == "exchange") == ("exchange_paths" in steps)
    seen: Dict[str, int] = {}
    for n in range(1, len(steps) + 1):
        signum = signal.SIGKILL if n % 2 else signal.SIGINT
        work.restore(before)
        status = run_forked(lambda n=n, signum=signum: (install(Injector(n, signum)), work.commit(after))[1])
        assert status == (("signal", 9) if signum == signal.SIGKILL else ("exit", 130)), (n, steps[n - 1], status)
        raw = work.state(before, after, must_be_whole=(mode == "exchange"))
        seen[raw] = seen.get(raw, 0) + 1
        recover_outputs(work.out, work.config)  # what a reader (and the next run) does first
        assert work.state(before, after, must_be_whole=True) in ("before", "after"), (n, steps[n - 1])
        work.commit(after)
        assert work.state(before, after, must_be_whole=True) == "after"
        assert leftovers(work.root) == [], leftovers(work.root)
    assert seen.get("before") and (seen.get("after") or seen.get("journal")), seen
    print(f"{mode} {before}->{after}: {len(steps)} steps: {seen}")
