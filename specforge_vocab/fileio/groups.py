"""All-or-nothing groups of files: the directory swap (``renameat2(RENAME_EXCHANGE)``), the journal
where the swap cannot be used, and the recovery that completes or removes what a killed run left.

A group given a ``root`` may hold files in subdirectories of it (``ladder/k1024/vocab_mapping.pt``):
each top-level name it writes, and each name in ``owned``, is replaced as a whole, so what an
earlier group left under that name and this one does not write is removed in the same commit. The
swap builds those subtrees in the staging directory (only other subdirectories rule it out); the
journal lists the stale files to remove beside the renames, and the recovery completes both.

See the package docstring (fileio/__init__.py) for the guarantees.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from specforge_vocab.errors import InputError
from specforge_vocab.fileio.atomic import (
    _RANDOM,
    TEMP_RE,
    Payload,
    _deferred_interrupts,
    _ensure_dir,
    _file_mode,
    _fill,
    _fsync_dir,
    _stale_pid,
    _temp_path,
    _unlink_quietly,
    atomic_write,
    json_text,
    write_target,
)

logger = logging.getLogger(__name__)

GROUP_WRITE_ENV = "SPECFORGE_VOCAB_GROUP_WRITE"


#: more entries than this in an output directory and the journal is used instead of the swap
MAX_EXCHANGE_ENTRIES = 10_000


STAGING_TAG = ".specforge-vocab-staging."


JOURNAL_PREFIX = ".specforge-vocab-journal."


JOURNAL_FORMAT = "specforge-vocab-journal"


STAGING_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(STAGING_TAG) + r"(?P<pid>\d+)\.(?P<ino>\d+)\." + _RANDOM + "$")


JOURNAL_RE = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<pid>\d+)\." + _RANDOM + r"\.json$")


_ACTIVE_STAGING: set = set()


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
                return syscall(
                    ctypes.c_long(number),
                    ctypes.c_int(_AT_FDCWD),
                    ctypes.c_char_p(old),
                    ctypes.c_int(_AT_FDCWD),
                    ctypes.c_char_p(new),
                    ctypes.c_uint(flags),
                )

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


def _journal_text(
    moves: Sequence[Move], copies: Sequence[str], removals: Sequence[str] = (), prune: Sequence[str] = ()
) -> str:
    return json_text(
        {
            "format": JOURNAL_FORMAT,
            "version": 1,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "created": time.time(),
            "moves": [{"temp": m.temp, "target": m.target, "size": m.size} for m in moves],
            "copies": list(copies),
            "removals": list(removals),  # stale files of replaced subtrees, removed before the moves
            "prune": list(prune),  # their directories (deepest first), removed after the moves when empty
        }
    )


def _apply_removals(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _prune(directories: Sequence[str]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty (it holds new files), or gone already
            os.rmdir(directory)


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
        removals = [str(r) for r in data.get("removals", [])]
        prune = [str(d) for d in data.get("prune", [])]
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
    _apply_removals(removals)
    report.files_moved += _apply_moves(pending)
    _prune(prune)
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
        return bool(
            self.journals_completed or self.files_moved or self.temps_removed or self.staging_removed or self.rescued
        )


def _reconcile_old_dir(
    old: str, new: str, *, group: Optional[set], carried: Optional[Dict[str, int]], report: Recovery
) -> None:
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
            if (
                carried is not None
                and name in carried
                and carried[name] != inode
                and not entry.is_dir(follow_symlinks=False)
            ):
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


def _commit_by_exchange(
    directory: str,
    real_dir: str,
    group: Dict[str, Payload],
    linked: Dict[str, Payload],
    replaced: Optional[set] = None,
) -> None:
    """Swap in ``group`` ({path relative to ``directory``: payload}); every other entry is carried
    over as a hard link, except the top-level names in ``replaced`` (default: the group's names)."""
    replaced = set(group) if replaced is None else set(replaced)
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
                if entry.name in replaced:
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
            raise InputError(
                f"Cannot prepare the new files of {directory}: {exc.strerror or exc}. Nothing was changed."
            ) from exc
        for name, payload in group.items():
            final = os.path.join(directory, name)
            if os.path.dirname(name):
                os.makedirs(os.path.join(staging, os.path.dirname(name)), exist_ok=True)
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
        _reconcile_old_dir(staging, real_dir, group=replaced, carried=carried, report=report)
    if report.rescued:
        logger.warning(
            "kept %d file(s) written into %s by another process during the swap: %s",
            len(report.rescued),
            directory,
            ", ".join(report.rescued),
        )


def _commit_by_journal(
    files: Dict[str, Payload],
    linked: Dict[str, Payload],
    *,
    journal_dirs: Sequence[str],
    removals: Sequence[str] = (),
    prune: Sequence[str] = (),
) -> None:
    """``files`` ({path: payload}, renamed in this order) and ``linked`` through a journal copied into
    each of ``journal_dirs``; ``removals`` go before the renames, ``prune`` after."""
    temps: List[str] = []
    journals: List[str] = []
    try:
        moves = _stage_linked(files, temps)
        moves += _stage_linked(linked, temps)
        name = _journal_name()
        copies = [os.path.join(directory, name) for directory in journal_dirs]
        text = _journal_text(moves, copies, removals, prune)
        for copy in copies:
            journals.append(copy)
            atomic_write(copy, text)
    except BaseException:
        _unlink_quietly(temps + journals)
        raise
    # From here the group is committed: a crash is rolled forward by recover_directory.
    with _deferred_interrupts():
        try:
            _apply_removals(removals)
            _apply_moves(moves)
        except OSError as exc:
            raise InputError(
                f"Cannot move the new {exc.filename} into place: {exc.strerror or exc}. The remaining files are "
                f"listed in {journals[0]}; fix the problem and rerun, which completes them."
            ) from exc
        _prune(prune)
        _remove_journals(journals)


def atomic_write_many(
    files: Dict[str, Payload],
    *,
    linked: Optional[Dict[str, Payload]] = None,
    root: Optional[str] = None,
    owned: Sequence[str] = (),
) -> str:
    """Write ``files`` ({path: payload}) all-or-nothing; return how: "exchange" or "journal".

    Files in one directory are swapped in together (see the module docstring); files in
    several directories go through a journal copied into each of them. With ``root``, every
    file lies under it (subdirectories allowed) and the group replaces, as a whole, each
    top-level name it writes and each name in ``owned`` (one group, one journal in ``root``).
    ``linked`` files (elsewhere, such as the draft config) are renamed right after the group is
    in place, and a crash in between is completed by the next :func:`recover_directory` of the
    group's directory. Old files stay intact if anything fails before the group is in place.
    Callers hold :func:`file_lock` on the directory (this also removes what killed runs left there).
    """
    linked = {os.path.abspath(write_target(p)): v for p, v in (linked or {}).items()}  # a link's target
    directories = {os.path.dirname(os.path.abspath(path)) for path in files}
    if root is None and len(directories) == 1:
        (root,) = directories
    if root is not None:
        return _write_tree(os.path.abspath(root), files, linked, owned)
    if not files and not linked:
        return "none"
    _check_targets([os.path.abspath(p) for p in files] + list(linked))
    for directory in directories:
        _ensure_dir(directory)
        recover_directory(directory)
    for path in linked:
        _ensure_dir(os.path.dirname(path))
    ordered = {os.path.abspath(path): payload for path, payload in files.items()}
    _commit_by_journal(ordered, linked, journal_dirs=sorted(directories))
    return "journal"


def _check_parents(root: str, relative: Iterable[str]) -> None:
    for rel in relative:
        parts = rel.split(os.sep)[:-1]
        for depth in range(1, len(parts) + 1):
            path = os.path.join(root, *parts[:depth])
            if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
                raise InputError(
                    f"Cannot write {os.path.join(root, rel)}: {path} is a file where a directory is needed. "
                    "Move it away or choose another output location; nothing was changed."
                )


def _stale_in_owned(root: str, owned: Iterable[str], targets: set):
    """(files to remove, directories to prune deepest first) of the owned names that ``targets`` do not rewrite."""
    removals: List[str] = []
    prune: List[str] = []
    for name in sorted(owned):
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            if path not in targets:
                removals.append(path)
            continue
        for base, dirs, names in os.walk(path, topdown=False):
            for entry in names + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
                if os.path.join(base, entry) not in targets:
                    removals.append(os.path.join(base, entry))
            prune.append(base)
    return removals, prune


def _write_tree(root: str, files: Dict[str, Payload], linked: Dict[str, Payload], owned: Sequence[str]) -> str:
    group: Dict[str, Payload] = {}
    for path, payload in files.items():
        rel = os.path.relpath(os.path.abspath(path), root)
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
            raise ValueError(f"atomic_write_many: {path} is not inside {root}")
        group[rel] = payload
    for path in list(linked):  # a linked file inside root joins the group
        if os.path.dirname(path) == root:
            group[os.path.basename(path)] = linked.pop(path)
    replaced = {rel.split(os.sep)[0] for rel in group} | set(owned)
    _check_targets([os.path.join(root, rel) for rel in group] + list(linked))
    _check_parents(root, group)
    _ensure_dir(root)
    recover_directory(root)
    for path in linked:
        _ensure_dir(os.path.dirname(path))
    real_dir = os.path.realpath(root)
    reason = _exchange_refusal(real_dir)
    if reason is None:
        try:
            _commit_by_exchange(root, real_dir, group, linked, replaced)
            return "exchange"
        except _UseJournal as exc:
            reason = str(exc)
    if _group_mode() == "exchange":
        raise InputError(f"{GROUP_WRITE_ENV}=exchange, but {root} cannot be swapped: {reason}.")
    logger.debug("writing %s with a journal: %s", root, reason)
    targets = {os.path.join(root, rel): payload for rel, payload in group.items()}
    removals, prune = _stale_in_owned(root, replaced, set(targets))
    created: List[str] = []  # directories made for the new files, removed again if the commit fails
    try:
        for target in targets:
            missing = []
            parent = os.path.dirname(target)
            while not os.path.isdir(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(missing):
                _ensure_dir(directory)
                created.append(directory)
        _commit_by_journal(targets, linked, journal_dirs=[root], removals=removals, prune=prune)
    except BaseException:
        _prune(sorted(created, key=len, reverse=True))
        raise
    return "journal"
