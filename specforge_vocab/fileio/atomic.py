"""One file at a time: temp file in the same directory, fsync, rename; backups, copies, hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from typing import Callable, Iterable, Iterator, List, Optional, Union

from specforge_vocab.errors import InputError

logger = logging.getLogger(__name__)

Writer = Callable[[io.BufferedWriter], None]


Payload = Union[bytes, str, Writer]


_RANDOM = r"[a-z0-9_]{8}"


TEMP_RE = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)\." + _RANDOM + r"\.tmp$")


def _write_payload(handle, payload: Payload) -> None:
    if isinstance(payload, str):
        handle.write(payload.encode("utf-8"))
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        handle.write(payload)
    else:
        payload(handle)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _ensure_dir(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"Cannot create output directory {directory}: {exc.strerror or exc}. Choose a directory you can write to."
        ) from exc


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(replacing: Optional[str]) -> int:
    """The mode of the file being replaced, else what open() would give (0666 & ~umask)."""
    if replacing is not None:
        with contextlib.suppress(OSError):
            return stat.S_IMODE(os.stat(replacing).st_mode)
    return 0o666 & ~_umask()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this machine (a pid we may not signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stale_pid(pid_text: str) -> bool:
    pid = int(pid_text)
    return pid != os.getpid() and not pid_alive(pid)


def _temp_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    _ensure_dir(directory)
    base = os.path.basename(path)[:180]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(
            f"Cannot write {path}: {exc.strerror or exc} in {directory}. "
            "Check that the directory exists and is writable."
        ) from exc
    os.close(fd)
    return tmp


def _write_error(path: str, exc: OSError) -> InputError:
    hint = "free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the permissions"
    return InputError(
        f"Cannot write {path}: {exc.strerror or exc}. Nothing was changed; {hint} or choose another output location."
    )


def _fill(tmp: str, path: str, payload: Payload, mode: int, *, exclusive: bool = False) -> None:
    """Write ``payload`` into ``tmp`` (named ``path`` in messages), fsync it and set ``mode``.
    On any failure ``tmp`` is removed."""
    try:
        with open(tmp, "xb" if exclusive else "wb") as handle:
            _write_payload(handle, payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


def _unlink_quietly(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the few renames that make a group visible; deliver them after.

    Only the main thread can change handlers; elsewhere this does nothing (SIGKILL can never
    be deferred, which is what the journal and :func:`recover_directory` are for).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is None:  # installed outside Python: leave it alone
            continue
        previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            logger.debug("delivering signal %d held during a commit", received[0])
            signal.raise_signal(received[0])


def json_text(obj: object, indent: int = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n"


def write_target(path: str) -> str:
    """Where writing ``path`` puts the bytes: a symlink's target (so the link stays a link), else ``path``."""
    return os.path.realpath(path) if os.path.islink(path) else path


def atomic_write(path: str, payload: Payload, *, keep_mode_of: Optional[str] = None) -> None:
    """Write ``payload`` (bytes, str, or a function given the open binary file)
    to ``path`` atomically: the old file stays intact until the new one is complete.

    A symlink stays a symlink: its target is written. The new file keeps the mode of
    ``keep_mode_of`` (default: of the file it replaces)."""
    target = write_target(path)
    mode = _file_mode(keep_mode_of if keep_mode_of and os.path.exists(keep_mode_of) else target)
    tmp = _temp_path(target)
    try:
        _fill(tmp, path, payload, mode)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise InputError(f"Cannot move the new {path} into place: {exc.strerror}. Nothing was changed.") from exc
    except BaseException:
        _unlink_quietly([tmp])
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(target)))


def backup_file(path: str, suffix: str = ".bak") -> str:
    """Keep the original of ``path`` in ``path + suffix`` and return that path.

    The backup is written only when none exists yet, so it always holds the file as it was
    before specforge-vocab first changed it (a second run never replaces it with the first
    run's result). Delete it to take a new one."""
    backup = path + suffix
    if os.path.lexists(backup):
        return backup
    with open(path, "rb") as handle:
        data = handle.read()
    atomic_write(backup, data, keep_mode_of=path)
    return backup


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""

    def write(handle):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)

    atomic_write(dst, write)


def writable_dir_problem(path: str, flag: str = "--output-dir") -> Optional[str]:
    """Why ``path`` cannot be (created and) written as a directory, or None. No side effects."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            return (
                f"{flag} {path} must be a directory, but it is an existing file. "
                f"Choose another {flag} or move the file away."
            )
        if not os.access(full, os.W_OK | os.X_OK):
            return f"{flag} {path} is not writable. Choose a directory you can write to."
        return None
    blocked = _creation_blocked(full)
    return f"{flag} {path} cannot be created, because {blocked}. Choose another {flag}." if blocked else None


def _creation_blocked(path: str) -> Optional[str]:
    """What stops ``path`` (absent) from being created: "<ancestor> is a file, not a directory" or
    "<ancestor> is not writable" for its nearest existing ancestor, or None."""
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def replaceable_file_problem(path: str, flag: str) -> Optional[str]:
    """Why the existing file ``path`` cannot be replaced in place, or None. No side effects.

    A file is replaced by writing a new copy next to it and renaming it over the old one, with
    a lock file (and a .bak) beside it, so its folder must be writable, not only the file.
    """
    folders = sorted({os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))})
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            return (
                f"{flag} {path} cannot be changed: its folder {folder} is not writable, and the new version is "
                "written next to it and renamed over it (with a lock file beside it). Make the folder writable, "
                "or copy the file to a folder you can write to and pass the copy."
            )
    return None


def output_file_problem(path: str, flag: str = "--output") -> Optional[str]:
    """Why a file cannot be written at ``path`` (a directory there, or a folder that cannot be
    made), or None. No side effects: checked before the work whose result it holds."""
    if os.path.isdir(path):
        return (
            f"{flag} {path} must name a file, but it is a directory. Name a file in it, e.g. "
            f"{flag} {os.path.join(path, 'counts.safetensors')}."
        )
    blocked = _creation_blocked(os.path.dirname(os.path.abspath(path)))
    return f"{flag} {path} cannot be written, because {blocked}. Choose another {flag}." if blocked else None
