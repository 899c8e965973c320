"""Safe file writing: temp file + fsync + os.replace, backups and locks.

Every file the tool writes goes through :func:`atomic_write`, so a reader sees
either the old file or the complete new one, never a mix. A group of outputs is
written with :func:`atomic_write_many` (all written to temp files first, then
moved into place one by one, with a manifest written last).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Optional, Union

from .errors import InputError

Writer = Callable[[io.BufferedWriter], None]
Payload = Union[bytes, str, Writer]


def _write_payload(handle, payload: Payload) -> None:
    if isinstance(payload, str):
        handle.write(payload.encode("utf-8"))
    elif isinstance(payload, (bytes, bytearray)):
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
            f"Cannot create output directory {directory}: {exc.strerror}. "
            "Choose a directory you can write to."
        ) from exc


def _temp_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    _ensure_dir(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(
            f"Cannot write {path}: {exc.strerror} in {directory}. "
            "Check that the directory exists and is writable."
        ) from exc
    os.close(fd)
    return tmp


def _fill_temp(tmp: str, path: str, payload: Payload, mode: Optional[int]) -> None:
    try:
        with open(tmp, "wb") as handle:
            _write_payload(handle, payload)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise InputError(
                f"Cannot write {path}: {exc.strerror or exc}. Nothing was changed; "
                "free disk space or choose another output location."
            ) from exc
        raise


def atomic_write(path: str, payload: Payload, *, keep_mode_of: Optional[str] = None) -> None:
    """Write ``payload`` (bytes, str, or a function given the open binary file)
    to ``path`` atomically: the old file stays intact until the new one is complete."""
    mode = None
    if keep_mode_of and os.path.exists(keep_mode_of):
        mode = os.stat(keep_mode_of).st_mode & 0o7777
    tmp = _temp_path(path)
    _fill_temp(tmp, path, payload, mode)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"Cannot move the new {path} into place: {exc.strerror}. Nothing was changed.") from exc
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_many(files: Dict[str, Payload]) -> None:
    """Write several files so that a failure while writing leaves every old file
    intact: all payloads go to temp files first, then each is moved into place."""
    temps = {}
    try:
        for path, payload in files.items():
            tmp = _temp_path(path)
            temps[path] = tmp
            _fill_temp(tmp, path, payload, None)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)
    for directory in {os.path.dirname(os.path.abspath(p)) for p in files}:
        _fsync_dir(directory)


def json_text(obj: object, indent: int = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n"


def backup_file(path: str, suffix: str = ".bak") -> str:
    """Copy ``path`` to ``path + suffix`` (atomically); return the backup path."""
    backup = path + suffix
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


@contextlib.contextmanager
def file_lock(target: str, *, timeout: float = 600.0) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a directory or file) for the block.

    The lock file ``<target>.lock`` records the holder's pid; a second run waits
    up to ``timeout`` seconds, then fails with a message naming that pid.
    """
    from filelock import FileLock, Timeout

    lock_path = (target.rstrip("/\\") + ".lock")
    _ensure_dir(os.path.dirname(os.path.abspath(lock_path)) or ".")
    info_path = lock_path + ".pid"
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        holder = "unknown"
        with contextlib.suppress(OSError):
            with open(info_path, encoding="utf-8") as handle:
                holder = handle.read().strip() or "unknown"
        raise InputError(
            f"{target} is locked by another specforge-vocab run (pid {holder}); waited {timeout:g} s "
            f"(--lock-timeout). Wait for that run to finish, or, if it is gone, remove {lock_path}."
        ) from None
    try:
        with contextlib.suppress(OSError):
            with open(info_path, "w", encoding="utf-8") as handle:
                handle.write(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(info_path)
        lock.release()


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    def write(handle):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)

    atomic_write(dst, write)
