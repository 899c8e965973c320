"""Safe file writing: atomic files, all-or-nothing groups, crash recovery, backups and locks.

Every file the tool writes goes through this module.

* :func:`atomic_write` writes one file: temp file in the same directory, fsync, rename.
  Readers see the old file or the complete new one.
* :func:`atomic_write_many` writes a group of files. When they share one directory the
  group is all-or-nothing: the new files are staged in a hidden sibling directory that
  also gets hard links to every other entry of the output directory, and the two
  directories are swapped with one ``renameat2(RENAME_EXCHANGE)`` call (Linux). Any
  reader, at any instant, sees the complete old set or the complete new set. Where the
  swap cannot be used (no renameat2, a filesystem without RENAME_EXCHANGE, a mount
  point, a directory holding subdirectories, the working directory, or
  ``SPECFORGE_VOCAB_GROUP_WRITE=journal``) a journal is written before the renames;
  a crash between renames is finished ("rolled forward") by :func:`recover_directory`,
  which every group write and every reader of the outputs calls first.
* ``linked`` files (the draft config) live outside the group's directory but must
  agree with it: their temp files are written before the swap, the list of pending
  renames travels inside the group as a journal, and they are renamed right after the
  swap. A crash in between leaves the journal, and the next recovery completes it.
* :func:`file_lock` serialises runs on one output directory or config; a second run
  waits up to ``timeout`` seconds, then fails with a message naming the holder's pid.

Stale temp files and staging directories of a killed run (their names carry its pid)
are removed by the next recovery of that directory. The names:
``.<file>.<pid>.<random>.tmp`` (temp files), ``.<dir>.specforge-vocab-staging.<pid>.<inode>.<random>``
(staging directories, next to the output directory) and
``.specforge-vocab-journal.<pid>.<random>.json`` (journals, inside it).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

logger = logging.getLogger(__name__)
import numpy as np
from specforge_vocab.errors import InputError
from filelock import FileLock, Timeout


Writer = Callable[[io.BufferedWriter], None]


Payload = Union[bytes, str, Writer]


#: environment variable choosing how groups are written: "auto" (default), "exchange" or "journal"
# Seconds a run waits for another run holding the same lock (--lock-timeout).
DEFAULT_LOCK_TIMEOUT = 600.0
GROUP_WRITE_ENV = "SPECFORGE_VOCAB_GROUP_WRITE"


#: more entries than this in an output directory and the journal is used instead of the swap
MAX_EXCHANGE_ENTRIES = 10_000


STAGING_TAG = ".specforge-vocab-staging."


JOURNAL_PREFIX = ".specforge-vocab-journal."


JOURNAL_FORMAT = "specforge-vocab-journal"


_RANDOM = r"[a-z0-9_]{8}"


TEMP_RE = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)\." + _RANDOM + r"\.tmp$")


STAGING_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(STAGING_TAG) + r"(?P<pid>\d+)\.(?P<ino>\d+)\." + _RANDOM + "$")


JOURNAL_RE = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<pid>\d+)\." + _RANDOM + r"\.json$")


_ACTIVE_STAGING: set = set()


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
            f"Cannot create output directory {directory}: {exc.strerror or exc}. "
            "Choose a directory you can write to."
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


def atomic_write(path: str, payload: Payload, *, keep_mode_of: Optional[str] = None) -> None:
    """Write ``payload`` (bytes, str, or a function given the open binary file)
    to ``path`` atomically: the old file stays intact until the new one is complete.

    The new file keeps the mode of ``keep_mode_of`` (default: of the file it replaces)."""
    mode = _file_mode(keep_mode_of if keep_mode_of and os.path.exists(keep_mode_of) else path)
    tmp = _temp_path(path)
    try:
        _fill(tmp, path, payload, mode)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise InputError(f"Cannot move the new {path} into place: {exc.strerror}. Nothing was changed.") from exc
    except BaseException:
        _unlink_quietly([tmp])
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


RENAME_EXCHANGE = 2


_AT_FDCWD = -100


# renameat2 syscall numbers, used when libc has no renameat2 wrapper (glibc < 2.28).
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}


_renameat2_cache: List[Optional[Callable[[bytes, bytes, int], int]]] = []


_exchange_support: Dict[int, bool] = {}


def _renameat2() -> Optional[Callable[[bytes, bytes, int], int]]:
    if _renameat2_cache:
        return _renameat2_cache[0]
    function = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
        wrapper = getattr(libc, "renameat2", None) if libc is not None else None
        if wrapper is not None:
            wrapper.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            wrapper.restype = ctypes.c_int

            def function(old: bytes, new: bytes, flags: int) -> int:
                return wrapper(_AT_FDCWD, old, _AT_FDCWD, new, flags)
        elif libc is not None and platform.machine().lower() in _SYSCALL_RENAMEAT2:
            number = _SYSCALL_RENAMEAT2[platform.machine().lower()]
            syscall = libc.syscall
            syscall.restype = ctypes.c_long

            def function(old: bytes, new: bytes, flags: int) -> int:
                return syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(old),
                               ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(new), ctypes.c_uint(flags))
    _renameat2_cache.append(function)
    return function


def exchange_paths(first: str, second: str) -> None:
    """Swap two paths (both must exist) in one atomic step: Linux renameat2(RENAME_EXCHANGE).

    Raises OSError (ENOSYS where renameat2 is missing, EINVAL where the filesystem lacks it)."""
    function = _renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system", first)
    if function(os.fsencode(first), os.fsencode(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), first, None, second)


def _staging_dir(real_dir: str, inode: int) -> str:
    parent, name = os.path.split(real_dir)
    return tempfile.mkdtemp(prefix=f".{name}{STAGING_TAG}{os.getpid()}.{inode}.", dir=parent)


def exchange_supported(directory: str) -> bool:
    """Whether ``renameat2(RENAME_EXCHANGE)`` works for directories inside ``directory`` (probed once per filesystem)."""
    if _renameat2() is None:
        return False
    try:
        device = os.stat(directory).st_dev
    except OSError:
        return False
    if device not in _exchange_support:
        probes = []
        try:
            probes = [_staging_dir(os.path.join(directory, "probe"), 0) for _ in range(2)]
            exchange_paths(*probes)
            _exchange_support[device] = True
        except OSError:
            _exchange_support[device] = False
        finally:
            for probe in probes:
                with contextlib.suppress(OSError):
                    os.rmdir(probe)
    return _exchange_support[device]


@dataclass
class Move:
    temp: str
    target: str
    size: int


def _journal_name() -> str:
    token = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    return f"{JOURNAL_PREFIX}{os.getpid()}.{token}.json"


def _journal_text(moves: Sequence[Move], copies: Sequence[str]) -> str:
    return json_text({
        "format": JOURNAL_FORMAT,
        "version": 1,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": time.time(),
        "moves": [{"temp": m.temp, "target": m.target, "size": m.size} for m in moves],
        "copies": list(copies),
    })


def _apply_moves(moves: Sequence[Move]) -> int:
    """Rename each temp onto its target; a temp already gone was moved before. Returns renames done."""
    done = 0
    for move in moves:
        try:
            os.replace(move.temp, move.target)
            done += 1
        except FileNotFoundError:
            if os.path.lexists(move.temp):
                raise
    for directory in {os.path.dirname(m.target) for m in moves}:
        _fsync_dir(directory)
    return done


def _remove_journals(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _fsync_dir(os.path.dirname(path))


def _roll_forward(journal_path: str, report: "Recovery") -> None:
    try:
        with open(journal_path, encoding="utf-8") as handle:
            data = json.load(handle)
        moves = [Move(m["temp"], m["target"], int(m["size"])) for m in data["moves"]]
        copies = [str(c) for c in data.get("copies", [])] or [journal_path]
    except FileNotFoundError:
        return  # completed by someone else meanwhile
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{journal_path}: an interrupted write left this journal, but it cannot be read ({exc}). "
            "Check the files it names by hand, then delete it."
        ) from None
    pending = []
    for move in moves:
        if not os.path.lexists(move.temp):
            continue  # already renamed
        size = os.lstat(move.temp).st_size
        if size != move.size:
            raise InputError(
                f"{journal_path}: the interrupted write of {move.target} cannot be completed: its new version "
                f"{move.temp} has {size} bytes, but {move.size} were written. Delete that journal and the temp "
                "files it names, then rerun the command that wrote them."
            )
        pending.append(move)
    report.files_moved += _apply_moves(pending)
    _remove_journals(set(copies) | {journal_path})
    report.journals_completed += 1
    logger.warning("Completed an interrupted write (%d file(s) moved into place) from %s.", len(pending), journal_path)


@dataclass
class Recovery:
    """What :func:`recover_directory` found and fixed."""

    journals_completed: int = 0
    files_moved: int = 0
    temps_removed: int = 0
    staging_removed: int = 0
    rescued: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.journals_completed or self.files_moved or self.temps_removed or self.staging_removed
                    or self.rescued)


def _reconcile_old_dir(old: str, new: str, *, group: Optional[set], carried: Optional[Dict[str, int]],
                       report: Recovery) -> None:
    """After a swap ``old`` holds the previous directory. Entries someone created or replaced
    there during the swap are moved into ``new``; then ``old`` is deleted."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(old):
            name = entry.name
            if group is not None and name in group:
                continue
            match = TEMP_RE.match(name)
            if match and _stale_pid(match.group("pid")):
                continue
            target = os.path.join(new, name)
            try:
                current = os.lstat(target)
            except FileNotFoundError:
                os.rename(entry.path, target)
                report.rescued.append(target)
                continue
            inode = entry.inode()
            if current.st_ino == inode:
                continue
            if carried is not None and name in carried and carried[name] != inode and not entry.is_dir(follow_symlinks=False):
                os.replace(entry.path, target)  # replaced in the old directory while we staged
                report.rescued.append(target)
    shutil.rmtree(old, ignore_errors=True)


def _clean_staging(real_dir: str, report: Recovery) -> None:
    parent, name = os.path.split(real_dir)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(parent):
            match = STAGING_RE.match(entry.name)
            if not match or match.group("name") not in (name, "probe") or entry.path in _ACTIVE_STAGING:
                continue
            if not _stale_pid(match.group("pid")) and int(match.group("pid")) != os.getpid():
                continue
            inode = int(match.group("ino"))
            if inode and os.path.isdir(real_dir) and entry.inode() == inode:
                # The old directory of a swap whose run died before deleting it.
                _reconcile_old_dir(entry.path, real_dir, group=None, carried=None, report=report)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
            report.staging_removed += 1


def recover_directory(directory: str, *, clean: bool = True) -> Recovery:
    """Finish or undo what an interrupted run left in ``directory``; safe to call any time.

    Journals are rolled forward (their renames completed). With ``clean``, stale temp files and
    staging directories (whose writer's pid no longer runs on this machine) are removed too:
    writers do that while holding the directory's lock; readers pass ``clean=False`` and only
    complete journals, so they never delete anything another machine may still be writing.
    """
    report = Recovery()
    real = os.path.realpath(directory)
    if not os.path.isdir(real):
        return report
    for entry in sorted(os.listdir(real)):
        if JOURNAL_RE.match(entry):
            _roll_forward(os.path.join(real, entry), report)
    if not clean:
        return report
    for entry in os.listdir(real):
        match = TEMP_RE.match(entry)
        if match and _stale_pid(match.group("pid")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(real, entry))
                report.temps_removed += 1
    _clean_staging(real, report)
    if report:
        logger.info("recovered %s: %s", directory, report)
    return report


class _UseJournal(Exception):
    """The swap cannot be used for this directory; the reason is the message."""


def _group_mode() -> str:
    mode = os.environ.get(GROUP_WRITE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "exchange", "journal"):
        raise InputError(f"{GROUP_WRITE_ENV} must be one of auto, exchange, journal, but got {mode!r}.")
    return mode


def _exchange_refusal(real_dir: str) -> Optional[str]:
    """Why the swap cannot be used for ``real_dir`` (None when it can)."""
    if _group_mode() == "journal":
        return f"{GROUP_WRITE_ENV}=journal"
    parent = os.path.dirname(real_dir)
    if parent == real_dir:
        return "the filesystem root"
    if os.stat(real_dir).st_dev != os.stat(parent).st_dev:
        return "a mount point"
    cwd = os.path.realpath(os.getcwd())
    if cwd == real_dir or cwd.startswith(real_dir.rstrip(os.sep) + os.sep):
        return "the working directory (or holds it)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its parent {parent} is not writable"
    if not exchange_supported(parent):
        return "no renameat2(RENAME_EXCHANGE) on this system or filesystem"
    return None


def _check_targets(paths: Iterable[str]) -> None:
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            raise InputError(
                f"Cannot write {path}: a directory has that name. Move it away or choose another output location; "
                "nothing was changed."
            )


def _stage_linked(linked: Dict[str, Payload], temps: List[str]) -> List[Move]:
    moves = []
    for target, payload in linked.items():
        tmp = _temp_path(target)
        temps.append(tmp)
        _fill(tmp, target, payload, _file_mode(target))
        moves.append(Move(tmp, target, os.path.getsize(tmp)))
    return moves


def _commit_by_exchange(directory: str, real_dir: str, group: Dict[str, Payload], linked: Dict[str, Payload]) -> None:
    info = os.stat(real_dir)
    staging = _staging_dir(real_dir, info.st_ino)
    _ACTIVE_STAGING.add(staging)
    temps: List[str] = []
    carried: Dict[str, int] = {}
    try:
        try:
            os.chmod(staging, stat.S_IMODE(info.st_mode))
            if hasattr(os, "geteuid") and os.geteuid() == 0 and (info.st_uid, info.st_gid) != (0, 0):
                os.chown(staging, info.st_uid, info.st_gid)
            for count, entry in enumerate(os.scandir(real_dir)):
                if entry.name in group:
                    continue
                match = TEMP_RE.match(entry.name)
                if match and _stale_pid(match.group("pid")):
                    continue  # a killed run's temp file: not carried over, so cleaned
                if count >= MAX_EXCHANGE_ENTRIES:
                    raise _UseJournal(f"it holds more than {MAX_EXCHANGE_ENTRIES} entries")
                if entry.is_dir(follow_symlinks=False):
                    raise _UseJournal(f"it holds a subdirectory ({entry.name})")
                if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                    raise _UseJournal(f"it holds a special file ({entry.name})")
                try:
                    os.link(entry.path, os.path.join(staging, entry.name), follow_symlinks=False)
                except OSError as exc:
                    raise _UseJournal(f"hard links fail there ({exc.strerror})") from None
                carried[entry.name] = entry.inode()
        except _UseJournal:
            raise
        except OSError as exc:
            raise InputError(f"Cannot prepare the new files of {directory}: {exc.strerror or exc}. Nothing was changed.") from exc
        for name, payload in group.items():
            final = os.path.join(directory, name)
            _fill(os.path.join(staging, name), final, payload, _file_mode(final), exclusive=True)
        moves = _stage_linked(linked, temps)
        journal = None
        if moves:
            journal_name = _journal_name()
            journal = os.path.join(real_dir, journal_name)
            with open(os.path.join(staging, journal_name), "x", encoding="utf-8") as handle:
                handle.write(_journal_text(moves, [journal]))
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(staging)
    except BaseException:
        _ACTIVE_STAGING.discard(staging)
        shutil.rmtree(staging, ignore_errors=True)
        _unlink_quietly(temps)
        raise

    report = Recovery()
    try:
        with _deferred_interrupts():
            try:
                exchange_paths(staging, real_dir)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                _unlink_quietly(temps)
                raise InputError(
                    f"Cannot swap the new files into {directory}: {exc.strerror or exc}. Nothing was changed; "
                    f"set {GROUP_WRITE_ENV}=journal to write without the swap."
                ) from exc
            _fsync_dir(os.path.dirname(real_dir))
            if moves:
                try:
                    _apply_moves(moves)
                except OSError as exc:
                    raise InputError(
                        f"The new files in {directory} are complete, but {exc.filename} could not be updated: "
                        f"{exc.strerror or exc}. Fix that and rerun; the next run completes it from {journal}."
                    ) from exc
                _remove_journals([journal])
    finally:
        _ACTIVE_STAGING.discard(staging)
        # ``staging`` now holds the previous directory: keep what others wrote there meanwhile, drop the rest.
        _reconcile_old_dir(staging, real_dir, group=set(group), carried=carried, report=report)
    if report.rescued:
        logger.warning("kept %d file(s) written into %s by another process during the swap: %s",
                       len(report.rescued), directory, ", ".join(report.rescued))


def _commit_by_journal(groups: Dict[str, Dict[str, Payload]], linked: Dict[str, Payload]) -> None:
    temps: List[str] = []
    journals: List[str] = []
    try:
        moves = []
        for directory, files in groups.items():
            moves += _stage_linked({os.path.join(directory, name): p for name, p in files.items()}, temps)
        moves += _stage_linked(linked, temps)
        name = _journal_name()
        copies = [os.path.join(directory, name) for directory in groups]
        text = _journal_text(moves, copies)
        for copy in copies:
            journals.append(copy)
            atomic_write(copy, text)
    except BaseException:
        _unlink_quietly(temps + journals)
        raise
    # From here the group is committed: a crash is rolled forward by recover_directory.
    with _deferred_interrupts():
        try:
            _apply_moves(moves)
        except OSError as exc:
            raise InputError(
                f"Cannot move the new {exc.filename} into place: {exc.strerror or exc}. The remaining files are "
                f"listed in {journals[0]}; fix the problem and rerun, which completes them."
            ) from exc
        _remove_journals(journals)


def atomic_write_many(files: Dict[str, Payload], *, linked: Optional[Dict[str, Payload]] = None) -> str:
    """Write ``files`` ({path: payload}) all-or-nothing; return how: "exchange" or "journal".

    Files in one directory are swapped in together (see the module docstring); files in
    several directories go through a journal copied into each of them. ``linked`` files
    (elsewhere, such as the draft config) are renamed right after the group is in place,
    and a crash in between is completed by the next :func:`recover_directory` of the
    group's directory. Old files stay intact if anything fails before the group is in place.
    Callers hold :func:`file_lock` on the directory (this also removes what killed runs left there).
    """
    linked = {os.path.abspath(p): v for p, v in (linked or {}).items()}
    groups: Dict[str, Dict[str, Payload]] = {}
    for path, payload in files.items():
        full = os.path.abspath(path)
        groups.setdefault(os.path.dirname(full), {})[os.path.basename(full)] = payload
    if not groups and not linked:
        return "none"
    if len(groups) == 1:
        (directory,) = groups
        for path in list(linked):  # a linked file inside the directory joins the group
            if os.path.dirname(path) == directory:
                groups[directory][os.path.basename(path)] = linked.pop(path)
    _check_targets([os.path.join(d, n) for d, names in groups.items() for n in names] + list(linked))
    for directory in groups:
        _ensure_dir(directory)
        recover_directory(directory)
    for path in linked:
        _ensure_dir(os.path.dirname(path))
    if len(groups) == 1:
        (directory, group), = groups.items()
        real_dir = os.path.realpath(directory)
        reason = _exchange_refusal(real_dir)
        if reason is None:
            try:
                _commit_by_exchange(directory, real_dir, group, linked)
                return "exchange"
            except _UseJournal as exc:
                reason = str(exc)
        if _group_mode() == "exchange":
            raise InputError(f"{GROUP_WRITE_ENV}=exchange, but {directory} cannot be swapped: {reason}.")
        logger.debug("writing %s with a journal: %s", directory, reason)
    _commit_by_journal(groups, linked)
    return "journal"


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
            return (f"{flag} {path} must be a directory, but it is an existing file. "
                    f"Choose another {flag} or move the file away.")
        if not os.access(full, os.W_OK | os.X_OK):
            return f"{flag} {path} is not writable. Choose a directory you can write to."
        return None
    ancestor = full
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return (f"{flag} {path} cannot be created, because {ancestor} is a file, not a directory. "
                f"Choose another {flag}.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{flag} {path} cannot be created, because {ancestor} is not writable. Choose another {flag}."
    return None


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
def file_lock(target: str, *, timeout: float = DEFAULT_LOCK_TIMEOUT, timeout_label: Optional[float] = None) -> Iterator[None]:
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


SAFETENSORS_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
                      "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16",
                      "float32": "F32", "float64": "F64"}


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """A safetensors file's bytes, deterministically: the same tensors and metadata always give the
    same bytes (``safetensors.numpy.save`` orders the metadata by a per-process hash, so two
    processes writing the same counts would write different files).

    >>> from safetensors.numpy import load
    >>> load(safetensors_bytes({"x": np.arange(3)}, {"b": "1", "a": "2"}))["x"].tolist()
    [0, 1, 2]
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} must have one of the dtypes {sorted(SAFETENSORS_DTYPES)}, but got {array.dtype}")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
