"""Stop a process at its Nth file-system step inside specforge_vocab.fileio (tests only).

Every call that changes the disk from fileio (rename, link, unlink, fsync, chmod, mkdir,
mkstemp/mkdtemp, rmtree, open, each payload write and the directory swap) is one step.
``Injector(kill_at=N, signum=SIGKILL)`` sends the signal to its own process right before
step N: SIGKILL is a crash at that point, SIGINT a Ctrl-C there. ``sleep_on=("name", n)``
pauses before the n-th call of that step (to hold a lock while another run starts): for
``sleep_s`` seconds, or until the file ``release`` exists.

As a script it runs the CLI with an injector::

    python tests/reliability/fault_injection.py --kill-at 12 --signal KILL -- optimize --counts ...
    python tests/reliability/fault_injection.py --sleep-on _write_payload:1 --release /tmp/go -- optimize ...
"""

from __future__ import annotations

import argparse
import builtins
import os
import signal
import sys
import time
import types
from typing import List, Optional, Tuple

OS_STEPS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "makedirs", "fsync", "chmod", "chown")
SHUTIL_STEPS = ("rmtree", "copyfileobj")
TEMPFILE_STEPS = ("mkstemp", "mkdtemp")
FUNCTION_STEPS = ("_write_payload", "exchange_paths")


class Injector:
    def __init__(
        self,
        kill_at: Optional[int] = None,
        signum: int = signal.SIGKILL,
        sleep_on: Optional[Tuple[str, int]] = None,
        sleep_s: float = 0.0,
        release: Optional[str] = None,
    ):
        self.kill_at, self.signum = kill_at, signum
        self.sleep_on, self.sleep_s, self.release = sleep_on, sleep_s, release
        self.steps: List[str] = []
        self.calls = {}

    def tick(self, name: str) -> None:
        self.steps.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.sleep_on is not None and self.sleep_on == (name, self.calls[name]):
            if self.release:
                deadline = time.monotonic() + 300
                while not os.path.exists(self.release) and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                time.sleep(self.sleep_s)
        if self.kill_at is not None and len(self.steps) == self.kill_at:
            os.kill(os.getpid(), self.signum)
            if self.signum == signal.SIGKILL:  # pragma: no cover - never returns
                time.sleep(60)

    def wrap(self, name, function):
        def wrapped(*args, **kwargs):
            self.tick(name)
            return function(*args, **kwargs)

        return wrapped


def _proxy(module, names, injector, prefix):
    proxy = types.ModuleType(module.__name__)
    proxy.__dict__.update(module.__dict__)
    for name in names:
        setattr(proxy, name, injector.wrap(prefix + name, getattr(module, name)))
    return proxy


def install(injector: Injector) -> Injector:
    """Route fileio's disk-changing calls through ``injector`` (for the rest of this process)."""
    import shutil
    import tempfile

    from specforge_vocab.fileio import atomic, groups, locks

    proxy_os = _proxy(os, OS_STEPS, injector, "os.")
    proxy_os.path = os.path
    proxy_shutil = _proxy(shutil, SHUTIL_STEPS, injector, "shutil.")
    proxy_tempfile = _proxy(tempfile, TEMPFILE_STEPS, injector, "tempfile.")
    wrapped_open = injector.wrap("open", builtins.open)
    for module in (atomic, groups, locks):
        module.os, module.shutil, module.tempfile, module.open = proxy_os, proxy_shutil, proxy_tempfile, wrapped_open
    # Each function step is patched where it is defined, so every caller's lookup finds the wrapper.
    atomic._write_payload = injector.wrap("_write_payload", atomic._write_payload)
    groups.exchange_paths = injector.wrap("exchange_paths", groups.exchange_paths)
    return injector


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "INT", "TERM"])
    parser.add_argument("--sleep-on", default=None, help="STEP:N, e.g. _write_payload:1")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--release", default=None, help="pause until this file exists (instead of --sleep)")
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    sleep_on = None
    if args.sleep_on:
        name, _, n = args.sleep_on.rpartition(":")
        sleep_on = (name, int(n))
    install(Injector(args.kill_at, getattr(signal, "SIG" + args.signal), sleep_on, args.sleep, args.release))
    from specforge_vocab.cli.main import main as cli_main

    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())
