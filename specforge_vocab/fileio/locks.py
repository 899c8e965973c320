"""Locks on output directories and configs: ``<target>.lock`` with a pid file naming the holder.

Both files exist only while the lock is held: the holder deletes them before it lets go, so a run
leaves no lock files behind. That is safe with ``flock`` only if every taker checks, once it holds
the lock, that the path still names the file it locked (a run that opened the file just before the
holder deleted it would otherwise hold a lock on a deleted file while a third run locks a new one);
:func:`_acquire` checks and, if not, starts again. Where ``fcntl`` is missing (Windows) the lock
file is taken with the ``filelock`` package and left in place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from typing import Dict, Iterable, Iterator, Optional

from specforge_vocab.errors import InputError
from specforge_vocab.fileio.atomic import _ensure_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# Seconds a run waits for another run holding the same lock (--lock-timeout).
DEFAULT_LOCK_TIMEOUT = 600.0


# Seconds between two tries while another run holds the lock (doubling from the first).
_POLL_FIRST, _POLL_MAX = 0.005, 0.1


_held_locks: Dict[str, list] = {}


_held_guard = threading.Lock()


class _Busy(Exception):
    """The lock is held by another run and the timeout has passed."""


def lock_path_of(target: str) -> str:
    """``<target>.lock`` next to the real file or directory (a symlink's target, so two links to one
    config share one lock)."""
    return os.path.realpath(os.path.abspath(target).rstrip("/\\")) + ".lock"


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


def _lock_error(lock_path: str, exc: OSError) -> InputError:
    return InputError(
        f"Cannot create the lock file {lock_path}: {exc.strerror or exc}. The lock file sits next to what is "
        "written (the output directory or the config); make that directory writable, or choose another location."
    )


def _acquire(lock_path: str, timeout: float) -> int:
    """An fd holding an exclusive flock on the file ``lock_path`` names now; raises _Busy after ``timeout``."""
    deadline = time.monotonic() + max(0.0, timeout)
    pause = _POLL_FIRST
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _lock_error(lock_path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _lock_error(lock_path, exc) from exc
            if time.monotonic() >= deadline:
                raise _Busy() from None
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, _POLL_MAX)
            continue
        try:
            named = os.stat(lock_path)
        except FileNotFoundError:
            named = None
        mine = os.fstat(fd)
        if named is not None and (named.st_ino, named.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)  # the holder deleted the file we locked while we waited: lock the new one


def _release(fd: int, lock_path: str) -> None:
    """Delete the pid file and the lock file while still holding the lock, then let go."""
    for path in (lock_path + ".pid", lock_path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _portable_lock(lock_path: str, timeout: float) -> Iterator[None]:  # pragma: no cover - Windows
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=max(0.0, timeout))
    except Timeout:
        raise _Busy() from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path + ".pid")
        lock.release()


@contextlib.contextmanager
def _locked(lock_path: str, timeout: float) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - Windows
        with _portable_lock(lock_path, timeout):
            yield
        return
    fd = _acquire(lock_path, timeout)
    try:
        yield
    finally:
        _release(fd, lock_path)


@contextlib.contextmanager
def file_lock(
    target: str, *, timeout: float = DEFAULT_LOCK_TIMEOUT, timeout_label: Optional[float] = None
) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a directory or file) for the block.

    The lock file ``<target>.lock`` sits next to it and ``<target>.lock.pid`` records the
    holder's pid and host; both are deleted when the lock is let go. A second run waits up to
    ``timeout`` seconds, then fails with a message naming that pid. Re-entering the same lock in
    the same thread is allowed.
    """

    lock_path = lock_path_of(target)
    me = threading.get_ident()
    with _held_guard:
        held = _held_locks.get(lock_path)
        if held is not None and held[1] == me:
            held[0] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held_locks[lock_path][0] -= 1
        return

    _ensure_dir(os.path.dirname(lock_path) or ".")
    try:
        lock = _locked(lock_path, timeout)
        lock.__enter__()
    except _Busy:
        holder = lock_holder(target) or "pid unknown"
        waited = timeout if timeout_label is None else timeout_label
        raise InputError(
            f"{target} is locked by another specforge-vocab run ({holder}); waited {waited:g} s "
            f"(--lock-timeout). Wait for that run to finish, or, if it is gone, remove {lock_path}."
        ) from None
    with _held_guard:
        _held_locks[lock_path] = [1, me]
    try:
        with contextlib.suppress(OSError):
            with open(lock_path + ".pid", "w", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}")
        yield
    finally:
        with _held_guard:
            _held_locks.pop(lock_path, None)
        lock.__exit__(None, None, None)


@contextlib.contextmanager
def file_locks(targets: Iterable[Optional[str]], *, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the locks of several targets, always taken in the same (sorted) order so two runs
    never wait for each other in a cycle; ``timeout`` bounds the total wait."""
    deadline = time.monotonic() + max(0.0, timeout)
    unique = sorted({lock_path_of(t): t for t in targets if t}.items())
    with contextlib.ExitStack() as stack:
        for _, target in unique:
            stack.enter_context(file_lock(target, timeout=max(0.0, deadline - time.monotonic()), timeout_label=timeout))
        yield
