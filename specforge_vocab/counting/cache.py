"""A counts cache keyed by the counting fingerprint: a repeated run with the same inputs reuses its counts.

The fingerprint is everything that decides the counts, by content, not by name or time:

* each data file's size and sha256, in reading order (a file touched but unchanged still hits;
  the sha256 is memoised by path, size and mtime in ``<cache_dir>/counts/file_hashes.json``, so
  an unchanged file is not re-read);
* the tokenizer's identifying files (tokenizer.json, tokenizer_config.json, chat template ...,
  see :data:`~specforge_vocab.counting.TOKENIZER_FILES`; its .py files under trust_remote_code),
  hashed together; where the tokenizer lives does not matter;
* each file's --dataset-weight, when any differs from 1;
* the chat template (name and SpecForge's eight fields, from --chat-template-file when given), max_length,
  is_preformatted, train_only_last_turn, legacy_reader, sample_size, target_vocab_size, skip_invalid and shard;
* the counting version and the tokenizers / transformers versions (an upgrade recounts).

``cached_count`` stores ``<cache_dir>/counts/<fingerprint hash>.safetensors`` (the counts file of
``specforge-vocab count`` plus the fingerprint) and, on a hit, rebuilds the CountResult from its
metadata without loading the tokenizer. A hit cannot fill tallies (they are not stored): when
tallies are asked for, it counts (and refreshes the cache entry).

>>> import tempfile; memo = HashMemo(None); path = tempfile.mktemp(suffix=".txt")
>>> _ = open(path, "w").write("abc"); memo.sha256(path)[:12]
'ba7816bf8f01'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import replace
from importlib import metadata
from typing import Dict, Optional, Sequence, Tuple

from specforge_vocab.counting.count import CountResult, count_dataset, file_infos
from specforge_vocab.counting.counts_file import load_counts, save_counts
from specforge_vocab.counting.data import dataset_files
from specforge_vocab.counting.engine import COUNTING_VERSION, CountSettings, Tally
from specforge_vocab.counting.tokenizer import tokenizer_sha256
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic_write, json_text, sha256_file

logger = logging.getLogger(__name__)


FINGERPRINT_KEY = "counting_fingerprint"


COUNTS_SUBDIR = "counts"


MEMO_NAME = "file_hashes.json"


class HashMemo:
    """sha256 of files, remembered by (absolute path, size, mtime_ns) in a small JSON file.

    ``HashMemo(None)`` remembers for its own lifetime only. ``save()`` writes the file (atomically).
    """

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: Dict[str, Dict[str, object]] = {}
        self.changed = False
        if path and os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError):
                with open(path, encoding="utf-8") as handle:
                    loaded = json.load(handle)
                if isinstance(loaded, dict):
                    self.entries = {k: v for k, v in loaded.items() if isinstance(v, dict)}

    def sha256(self, path: str) -> str:
        full = os.path.abspath(path)
        st = os.stat(full)
        entry = self.entries.get(full)
        if (
            entry
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            return str(entry["sha256"])
        digest = sha256_file(full)
        self.entries[full] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.path and self.changed:
            with contextlib.suppress(InputError):  # a cache we cannot write only costs time
                atomic_write(self.path, json_text(self.entries))
            self.changed = False


def _version(package: str) -> str:

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "absent"


def counting_fingerprint(settings: CountSettings, *, memo: Optional[HashMemo] = None) -> Dict[str, object]:
    """Everything that decides ``count_dataset(settings)``'s counts, as a JSON-able dict.

    Equal fingerprints mean equal counts; see the module docstring for what is in it.
    Raises InputError for missing data files or tokenizer (as counting would).
    """
    settings.validate()
    memo = memo if memo is not None else HashMemo(None)
    files = dataset_files(settings.dataset_paths)
    template = settings.template()
    shard = settings.shard_spec()
    weights = settings.file_weights()
    # Size, sha256 and (only when weighted, so unweighted entries keep their fingerprint) the weight; not
    # the path: where the data lives does not matter.
    infos = [
        {key: value for key, value in info.items() if key != "path"}
        for info in file_infos(files, sha256=memo.sha256, weights=weights)
    ]
    return {
        "kind": "specforge-vocab-counting",
        "counting_version": COUNTING_VERSION,
        "libraries": {"tokenizers": _version("tokenizers"), "transformers": _version("transformers")},
        "files": infos,
        "tokenizer": {
            "sha256": tokenizer_sha256(
                settings.tokenizer_path, trust_remote_code=settings.trust_remote_code, sha256=memo.sha256
            ),
            "trust_remote_code": bool(settings.trust_remote_code),
        },
        "chat_template": {"name": template.name, **template.fields()},
        "max_length": int(settings.max_length),
        "is_preformatted": bool(settings.is_preformatted),
        "train_only_last_turn": bool(settings.train_only_last_turn),
        "legacy_reader": bool(settings.legacy_reader),
        "sample_size": settings.sample_size,
        "target_vocab_size": settings.target_vocab_size,
        "skip_invalid": bool(settings.skip_invalid),
        "shard": None if shard is None else str(shard),
    }


def fingerprint_hash(fingerprint: Dict[str, object]) -> str:
    """sha256 (hex) of the fingerprint's canonical JSON."""
    return hashlib.sha256(canonical_json(fingerprint).encode("utf-8")).hexdigest()


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_entry_path(cache_dir: str, fingerprint: Dict[str, object]) -> str:
    """``<cache_dir>/counts/<fingerprint hash>.safetensors``."""
    return os.path.join(cache_dir, COUNTS_SUBDIR, fingerprint_hash(fingerprint) + ".safetensors")


def memo_for(cache_dir: Optional[str]) -> HashMemo:
    return HashMemo(os.path.join(cache_dir, COUNTS_SUBDIR, MEMO_NAME) if cache_dir else None)


def load_cached(
    settings: CountSettings, path: str, fingerprint: Dict[str, object], memo: HashMemo
) -> Optional[CountResult]:
    """The cached result at ``path`` if it is there, readable and of this fingerprint; else None."""
    if not os.path.isfile(path):
        return None
    try:
        counts, metadata = load_counts(path, flag="cache entry")
        if metadata.get(FINGERPRINT_KEY) != canonical_json(fingerprint):
            logger.warning("cache entry %s belongs to other inputs; recounting", path)
            return None
        result = CountResult.from_metadata(counts, metadata, settings=settings, source=path)
    except InputError as exc:
        logger.warning("ignoring unreadable cache entry (%s); recounting", exc)
        return None
    # Report the files where they are now (the cache is keyed by content, not by path).

    result.files = file_infos(
        dataset_files(settings.dataset_paths), sha256=memo.sha256, weights=settings.file_weights()
    )
    return result


def store_cached(path: str, result: CountResult, fingerprint: Dict[str, object]) -> None:
    """Write ``result`` as a counts file with its fingerprint (atomically; a failure only warns)."""
    metadata = dict(result.metadata())
    metadata[FINGERPRINT_KEY] = canonical_json(fingerprint)
    try:
        save_counts(path, result.counts, metadata)
    except InputError as exc:
        logger.warning("could not store the counts cache entry: %s", exc)


def cached_count(
    settings: CountSettings,
    *,
    cache_dir: str = "./cache",
    progress: bool = False,
    force: bool = False,
    tallies: Sequence[Tally] = (),
) -> Tuple[CountResult, bool]:
    """``count_dataset(settings)`` through the counts cache: (result, True) on a hit, (result, False) after counting.

    ``force`` recounts and replaces the entry. ``tallies`` cannot be served from the cache, so
    asking for them always counts (and refreshes the entry for later calls without tallies).
    """
    memo = memo_for(cache_dir)
    fingerprint = counting_fingerprint(settings, memo=memo)
    path = cache_entry_path(cache_dir, fingerprint)
    if not force and not tallies:
        result = load_cached(settings, path, fingerprint, memo)
        if result is not None:
            memo.save()
            logger.info("counts cache hit: %s", path)
            return result, True
    result = count_dataset(settings, progress=progress, tallies=tallies, sha256=memo.sha256)
    if [(f["size"], f["sha256"]) for f in result.files] == [(f["size"], f["sha256"]) for f in fingerprint["files"]]:
        store_cached(path, replace(result, tallies=[]), fingerprint)
    else:  # a data file changed while it was counted: these counts match neither version for sure
        logger.warning("a dataset file changed during counting; the counts are not cached")
    memo.save()
    logger.info("counted and cached: %s", path)
    return result, False
