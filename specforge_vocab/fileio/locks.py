"""Locks on output directories and configs: ``<target>.lock`` with a pid file naming the holder."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Dict, Iterable, Iterator, Optional

from filelock import FileLock, Timeout

from specforge_vocab.errors import InputError
from specforge_vocab.fileio.atomic import _ensure_dir

logger = logging.getLogger(__name__)

#: environment variable choosing how groups are written: "auto" (default), "exchange" or "journal"
# Seconds a run waits for another run holding the same lock (--lock-timeout).
DEFAULT_LOCK_TIMEOUT = 600.0


_held_locks: Dict[str, list] = {}


_held_guard = threading.Lock()


def lock_path_of(target: str) -> str:
    return os.path.abspath(target).rstrip("/\\") + ".lock"


def lock_holder(target: str) -> Optional[str]:
    """'pid N on HOST' of the run holding ``target``'s lock, from its pid file (None if unknown)."""
    info_path = lock_path_of(target) + ".pid"
    for attempt in range(5):  # the holder writes its pid just after taking the lock
        with contextlib.suppress(OSError):
            with open(info_path, encoding="utf-8") as handle:
                text = handle.read().strip()
            if text:
                pid, _, host = text.partition(" ")
                return f"pid {pid}" + (f" on {host}" if host else "")
        time.sleep(0.02 * (attempt + 1))
    return None


@contextlib.contextmanager
def file_lock(
    target: str, *, timeout: float = DEFAULT_LOCK_TIMEOUT, timeout_label: Optional[float] = None
) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a directory or file) for the block.

    The lock file ``<target>.lock`` sits next to it and ``<target>.lock.pid`` records the
    holder's pid and host; a second run waits up to ``timeout`` seconds, then fails with a
    message naming that pid. Re-entering the same lock in the same thread is allowed.
    """

    lock_path = lock_path_of(target)
    me = threading.get_ident()
    with _held_guard:
        held = _held_locks.get(lock_path)
        if held is not None and held[2] == me:
            held[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held_locks[lock_path][1] -= 1
        return

    _ensure_dir(os.path.dirname(lock_path) or ".")
    info_path = lock_path + ".pid"
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=max(0.0, timeout))
    except Timeout:
        holder = lock_holder(target) or "pid unknown"
        waited = timeout if timeout_label is None else timeout_label
        raise InputError(
            f"{target} is locked by another specforge-vocab run ({holder}); waited {waited:g} s "
            f"(--lock-timeout). Wait for that run to finish, or, if it is gone, remove {lock_path}."
        ) from None
    with _held_guard:
        _held_locks[lock_path] = [lock, 1, me]
    try:
        with contextlib.suppress(OSError):
            with open(info_path, "w", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}")
        yield
    finally:
        with _held_guard:
            _held_locks.pop(lock_path, None)
        with contextlib.suppress(OSError):
            os.unlink(info_path)
        lock.release()


@contextlib.contextmanager
def file_locks(targets: Iterable[Optional[str]], *, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the locks of several targets, always taken in the same (sorted) order so two runs
    never wait for each other in a cycle; ``timeout`` bounds the total wait."""
    deadline = time.monotonic() + max(0.0, timeout)
    unique = sorted({os.path.abspath(t) for t in targets if t}, key=lock_path_of)
    with contextlib.ExitStack() as stack:
        for target in unique:
            stack.enter_context(file_lock(target, timeout=max(0.0, deadline - time.monotonic()), timeout_label=timeout))
        yield
