"""Commit optimize's outputs and the draft config together, and check that they agree.

The mapping in the output directory and ``draft_vocab_size`` in the draft config must
never disagree: SpecForge copies the mapping into buffers shaped by the config.
:func:`commit_outputs` takes the locks of both, finishes any interrupted earlier write,
and writes the outputs as one group with the patched config linked to it (see
:func:`specforge_vocab.fileio.atomic_write_many`): after any crash, the next run (or any
reader calling :func:`recover_outputs`) finds the old outputs with the old config, or the
new outputs with the new config.

Example::

    >>> commit_outputs({"out/summary.json": "{}"}, output_dir="out", config_path="draft.json",
    ...                draft_vocab_size=32000)                                   # doctest: +SKIP
    'draft.json.bak'
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from safetensors import safe_open

from specforge_vocab.errors import InputError, short
from specforge_vocab.fileio import (
    DEFAULT_LOCK_TIMEOUT,
    Payload,
    Recovery,
    atomic_write_many,
    file_locks,
    recover_directory,
    writable_dir_problem,
)
from specforge_vocab.writing.draft_config import checked_patch, read_draft_config
from specforge_vocab.writing.exports import (
    ALL_EXPORT_FILES,
    MAPPING_PT_FILE,
    MAPPING_SAFETENSORS_FILE,
    mapping_files,
)
from specforge_vocab.writing.mapping import kept_ids_from_d2t, load_mapping, mapping_fingerprint

logger = logging.getLogger(__name__)

# The files of one output directory, by role (``optimize`` writes them as one group; prepare adds
# fingerprint.json after them).
SUMMARY_FILE = "summary.json"
FULL_RESULTS_FILE = "full_results.json"
PLOT_FILE = "optimization_results.png"
COVERAGE_PLOT_FILE = "coverage_curves.png"
COUNTS_FILE = "token_counts.safetensors"
MAPPING_FILE = MAPPING_PT_FILE
FINGERPRINT_FILE = "fingerprint.json"
LADDER_DIR = "ladder"  # ladder/k<K>/: the mapping, exports and config copy of each --ladder size
LADDER_CONFIG_FILE = "draft_config.json"  # the patched copy of --config-path in each ladder entry
# What optimize writes only when asked (--export, --ladder): each run replaces them as a whole, so a
# run without them removes an earlier run's (nothing in the directory comes from another run).
OPTIONAL_OUTPUTS = ALL_EXPORT_FILES + (LADDER_DIR,)
OUTPUT_FILES = {
    "summary": SUMMARY_FILE,
    "full_results": FULL_RESULTS_FILE,
    "plot": PLOT_FILE,
    "coverage_plot": COVERAGE_PLOT_FILE,
    "counts": COUNTS_FILE,
    "mapping_pt": MAPPING_FILE,
    "mapping_safetensors": MAPPING_SAFETENSORS_FILE,
}


def recover_outputs(output_dir: str, config_path: Optional[str] = None, *, clean: bool = False) -> Recovery:
    """Complete what an interrupted run left (in the output directory and next to the config).

    Readers call it as is (only journals are completed); writers, holding the locks, pass
    ``clean=True`` to also remove stale temp files and staging directories."""
    report = recover_directory(output_dir, clean=clean)
    if config_path:
        other = recover_directory(os.path.dirname(os.path.realpath(config_path)), clean=clean)
        report.temps_removed += other.temps_removed
        report.journals_completed += other.journals_completed
        report.files_moved += other.files_moved
    return report


def recorded_draft_vocab_size(output_dir: str) -> Optional[Tuple[int, Optional[int], str]]:
    """(k, V, file) of the mapping in ``output_dir``: from vocab_mapping.safetensors' metadata,
    else vocab_mapping.pt's d2t shape, else summary.json; None when there is no output."""
    path = os.path.join(output_dir, MAPPING_SAFETENSORS_FILE)
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="numpy") as handle:
                meta = handle.metadata() or {}
                shape = handle.get_slice("d2t").get_shape() if "d2t" in handle.keys() else None
                t2d_shape = handle.get_slice("t2d").get_shape() if "t2d" in handle.keys() else None
            k = int(meta["draft_vocab_size"]) if "draft_vocab_size" in meta else (int(shape[0]) if shape else None)
            V = int(meta["vocab_size"]) if "vocab_size" in meta else (int(t2d_shape[0]) if t2d_shape else None)
            if k is not None:
                return k, V, path
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            raise InputError(
                f"{path} cannot be read ({type(exc).__name__}: {exc}). Rerun optimize to rewrite it."
            ) from None
    path = os.path.join(output_dir, MAPPING_FILE)
    if os.path.isfile(path):
        d2t, t2d = load_mapping(path)
        return int(d2t.shape[0]), int(t2d.shape[0]), path
    path = os.path.join(output_dir, SUMMARY_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                summary = json.load(handle)
            return int(summary["optimal_draft_vocab_size"]), summary.get("target_vocab_size"), path
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def other_writer(output_dir: str, config_path: str, k: object, limit: int = 200) -> Optional[str]:
    """Another output directory beside ``output_dir`` whose summary.json says it set ``k`` in this
    config (the usual reason a config disagrees with a mapping), or None."""
    parent, real_config = os.path.dirname(os.path.abspath(output_dir)), os.path.realpath(config_path)
    try:
        siblings = sorted(os.scandir(parent), key=lambda e: e.name)[:limit]
    except OSError:
        return None
    for entry in siblings:
        if os.path.realpath(entry.path) == os.path.realpath(output_dir) or not entry.is_dir():
            continue
        try:
            with open(os.path.join(entry.path, SUMMARY_FILE), encoding="utf-8") as handle:
                summary = json.load(handle)
            used = summary["settings"]["config_path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if used and os.path.realpath(used) == real_config and summary.get("optimal_draft_vocab_size") == k:
            return entry.path
    return None


def config_disagreement(output_dir: str, config_path: str) -> Optional[str]:
    """A message if the draft config and the mapping in ``output_dir`` disagree, else None."""

    recorded = recorded_draft_vocab_size(output_dir)
    if recorded is None or not os.path.isfile(config_path):
        return None
    k, V, source = recorded
    config = read_draft_config(config_path, required=())
    config_k, config_V = config.get("draft_vocab_size"), config.get("vocab_size")
    if config_k != k:
        other = other_writer(output_dir, config_path, config_k)
        why = (
            f"the run that wrote {other} (another output directory with the same config) set it afterwards. "
            "One draft config cannot serve two output directories: give each its own copy of the config"
            if other
            else "the config or the outputs were changed after the run that wrote them (by a run with this "
            "config and another output directory, or by hand)"
        )
        return (
            f"{config_path} has draft_vocab_size {short(config_k)}, but the mapping {source} has {k} rows: "
            f"they disagree: {why}. Training with both would fail to load the mapping or load a wrong one."
        )
    if V is not None and config_V is not None and config_V != V:
        return (
            f"{config_path} has vocab_size {short(config_V)}, but the mapping {source} covers {V} target ids: "
            "they disagree (the mapping was made for another target model)."
        )
    return None


def check_outputs_match_config(output_dir: str, config_path: str) -> None:
    """Raise InputError when the config and the mapping in ``output_dir`` disagree (after recovery).

    Call it before reusing earlier outputs (for example when inputs are unchanged)."""
    recover_outputs(output_dir, config_path)
    problem = config_disagreement(output_dir, config_path)
    if problem:
        raise InputError(f"{problem} Rerun `specforge-vocab optimize` (or prepare) to rewrite both.")


def _patched_config(config_path: str, k: int) -> Tuple[str, str]:
    """(old text, new text) of the config with draft_vocab_size = k; checks before anything is written."""

    return checked_patch(config_path, k)


def ladder_entry_dir(output_dir: str, k: int) -> str:
    """``<output_dir>/ladder/k<k>``."""
    return os.path.join(output_dir, LADDER_DIR, f"k{int(k)}")


def ladder_files(
    rungs: Sequence[Tuple[Dict[str, Any], Any, Any]],
    *,
    output_dir: str,
    vocab_size: int,
    counts,
    exports: Sequence[str],
    config_path: Optional[str],
) -> Tuple[Dict[str, Payload], List[Dict[str, Any]], List[str]]:
    """(payloads, summary rows, notes) of ladder/k<K>/ for each rung (table row dict, d2t, t2d): the
    mapping and exports (:func:`~specforge_vocab.writing.exports.mapping_files`) and, with
    ``config_path``, a copy of the draft config with draft_vocab_size = K (draft_config.json)."""
    payloads: Dict[str, Payload] = {}
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for row, d2t, t2d in rungs:
        k = int(row["draft_vocab_size"])
        directory = ladder_entry_dir(output_dir, k)
        files, rung_notes = mapping_files(d2t, t2d, vocab_size=vocab_size, counts=counts, exports=exports)
        if config_path:
            files[LADDER_CONFIG_FILE] = _patched_config(config_path, k)[1].encode("utf-8")
        payloads.update({os.path.join(directory, name): data for name, data in files.items()})
        notes += rung_notes
        rows.append(
            {
                **row,
                "directory": os.path.relpath(directory, output_dir),
                "files": list(files),
                "mapping_fingerprint": mapping_fingerprint(kept_ids_from_d2t(d2t), vocab_size),
            }
        )
    return payloads, rows, notes


def commit_outputs(
    payloads: Dict[str, Payload],
    *,
    output_dir: str,
    config_path: Optional[str] = None,
    draft_vocab_size: Optional[int] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    owned: Sequence[str] = (),
) -> Optional[str]:
    """Write ``payloads`` (paths inside ``output_dir``, subdirectories allowed) and set
    ``draft_vocab_size`` in ``config_path`` as one commit, under the locks of both. The names in
    ``owned`` (e.g. :data:`OPTIONAL_OUTPUTS`) are replaced as a whole: what an earlier run left
    there and this one does not write is removed in the same commit. Returns the config backup
    path (``<config>.bak``) or None.

    Before writing: an interrupted earlier write is completed, and a config that disagrees
    with the mapping already in ``output_dir`` is reported (this commit rewrites both).
    """
    problem = writable_dir_problem(output_dir)
    if problem:
        raise InputError(problem)
    if config_path is not None and draft_vocab_size is None:
        raise ValueError("commit_outputs: draft_vocab_size is required with config_path")
    root = os.path.abspath(output_dir)
    outside = [p for p in payloads if not os.path.abspath(p).startswith(root + os.sep)]
    if outside:
        raise ValueError(f"commit_outputs: every output must be inside {output_dir}, but got {outside}")
    with file_locks([output_dir, config_path], timeout=lock_timeout):
        recover_outputs(output_dir, config_path, clean=True)
        linked: Dict[str, Payload] = {}
        saved = None
        if config_path:
            mismatch = config_disagreement(output_dir, config_path)
            if mismatch:
                logger.warning("%s This run rewrites both.", mismatch)
            old, new = _patched_config(config_path, int(draft_vocab_size))
            if new != old:
                if backup:  # the original, kept from the first change on (see fileio.backup_file)
                    saved = config_path + ".bak"
                    if not os.path.lexists(saved):  # committed with the config, so a failed run leaves none
                        linked[saved] = old
                linked[config_path] = new
            else:
                logger.info("%s already has draft_vocab_size %d; left unchanged.", config_path, draft_vocab_size)
        method = atomic_write_many(payloads, linked=linked, root=output_dir, owned=owned)
        logger.info(
            "wrote %d file(s) to %s (%s)%s",
            len(payloads),
            output_dir,
            method,
            f" and set draft_vocab_size = {draft_vocab_size} in {config_path}" if linked else "",
        )
    return saved
