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

from specforge_vocab.fileio.atomic import (
    TEMP_RE,
    Payload,
    Writer,
    atomic_write,
    backup_file,
    copy_file,
    json_text,
    output_file_problem,
    pid_alive,
    replaceable_file_problem,
    sha256_file,
    writable_dir_problem,
    write_target,
)
from specforge_vocab.fileio.groups import (
    GROUP_WRITE_ENV,
    JOURNAL_FORMAT,
    JOURNAL_PREFIX,
    JOURNAL_RE,
    STAGING_RE,
    STAGING_TAG,
    Recovery,
    atomic_write_many,
    exchange_paths,
    exchange_supported,
    recover_directory,
)
from specforge_vocab.fileio.locks import DEFAULT_LOCK_TIMEOUT, file_lock, file_locks, lock_holder, lock_path_of
from specforge_vocab.fileio.tensor_bytes import SAFETENSORS_DTYPES, safetensors_bytes

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "GROUP_WRITE_ENV",
    "JOURNAL_FORMAT",
    "JOURNAL_PREFIX",
    "JOURNAL_RE",
    "Payload",
    "Recovery",
    "SAFETENSORS_DTYPES",
    "STAGING_RE",
    "STAGING_TAG",
    "TEMP_RE",
    "Writer",
    "atomic_write",
    "atomic_write_many",
    "backup_file",
    "copy_file",
    "exchange_paths",
    "exchange_supported",
    "file_lock",
    "file_locks",
    "json_text",
    "lock_holder",
    "lock_path_of",
    "output_file_problem",
    "pid_alive",
    "recover_directory",
    "replaceable_file_problem",
    "safetensors_bytes",
    "sha256_file",
    "writable_dir_problem",
    "write_target",
]
