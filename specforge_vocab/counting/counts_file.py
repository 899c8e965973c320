"""The counts file: tensor ``counts`` (int64 [V]) in a safetensors file, with the counting settings
and what was read as string metadata. Equal counts and metadata give byte-identical files.

Counts of offline features with the target's LM head also carry both sources side by side
(``token_counts``: the data's loss-masked tokens; ``target_argmax_counts``: the target's argmax at
the trained positions), so the coverage of each can be reported whichever one k is chosen on.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open

from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic_write, safetensors_bytes

logger = logging.getLogger(__name__)


COUNTS_TENSOR = "counts"


# Count sources stored beside ``counts`` (by --count-source name), and their tensor names.
COMPANION_TENSORS = {"tokens": "token_counts", "target-argmax": "target_argmax_counts"}


FORMAT_VERSION = "1"


def settings_from_metadata(metadata: Dict[str, str], *, source: str = "counts file") -> CountSettings:
    """The CountSettings a counts file was written with (dataset paths = its files, in order, each with
    its --dataset-weight when the count was weighted)."""
    try:
        files = json.loads(metadata["files"])
        weighted = any("weight" in f for f in files)
        return CountSettings(
            dataset_paths=[str(f["path"]) for f in files],
            dataset_weights=[int(f.get("weight", 1)) for f in files] if weighted else [],
            tokenizer_path=metadata["tokenizer_path"],
            chat_template=metadata["chat_template"],
            max_length=int(metadata["max_length"]),
            is_preformatted=bool(json.loads(metadata["is_preformatted"])),
            train_only_last_turn=bool(json.loads(metadata["train_only_last_turn"])),
            sample_size=json.loads(metadata.get("sample_size") or "null"),
            skip_invalid=bool(json.loads(metadata.get("skip_invalid") or "false")),
            shard=metadata.get("shard") or None,
        )
    except KeyError as exc:
        raise InputError(
            f"{source}: metadata field {exc.args[0]!r} is missing; the file was not written by "
            "`specforge-vocab count` (or by an older version). Recount it."
        ) from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: the metadata is malformed ({exc}); the file is corrupt. Recount it.") from None


def save_counts(
    path: str, counts: np.ndarray, metadata: Dict[str, str], companions: Optional[Dict[str, np.ndarray]] = None
) -> None:
    """Write ``counts`` (int64 [V]), the ``companions`` (by count source) and string metadata to a
    safetensors file, atomically and deterministically (equal inputs give byte-identical files)."""
    atomic_write(path, counts_file_bytes(counts, metadata, companions))


def counts_file_bytes(
    counts: np.ndarray, metadata: Dict[str, str], companions: Optional[Dict[str, np.ndarray]] = None
) -> bytes:
    """The bytes :func:`save_counts` writes (companions only when there are two sources to compare)."""
    companions = companions if companions and len(companions) > 1 else {}
    tensors = {COUNTS_TENSOR: counts}
    tensors.update({COMPANION_TENSORS[name]: value for name, value in (companions or {}).items()})
    for name, value in tensors.items():
        tensors[name] = np.ascontiguousarray(value, dtype=np.int64)
        if tensors[name].ndim != 1 or tensors[name].shape != tensors[COUNTS_TENSOR].shape:
            raise ValueError(f"{name} must be one-dimensional like counts, but got shape {np.shape(value)}")
    return safetensors_bytes(tensors, {k: str(v) for k, v in metadata.items()})


def read_counts_file(path: str, *, flag: str = "--counts") -> Tuple[np.ndarray, Dict[str, str], Dict[str, np.ndarray]]:
    """(counts, metadata, companions by count source) of a file written by :func:`save_counts`."""

    if not os.path.isfile(path):
        raise InputError(f"{flag} {path} does not exist. Write one with `specforge-vocab count ... --output {path}`.")
    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            if COUNTS_TENSOR not in handle.keys():
                raise InputError(
                    f"{flag} {path} must hold a tensor named 'counts', but it holds {list(handle.keys())}. "
                    "Use a file written by `specforge-vocab count`."
                )
            counts = handle.get_tensor(COUNTS_TENSOR)
            companions = {
                source: handle.get_tensor(tensor)
                for source, tensor in COMPANION_TENSORS.items()
                if tensor in handle.keys()
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{flag} {path} is not a readable safetensors file ({exc}). Recount with `specforge-vocab count`."
        ) from None
    for name, value in [(COUNTS_TENSOR, counts)] + [(COMPANION_TENSORS[s], v) for s, v in companions.items()]:
        if value.dtype != np.int64 or value.ndim != 1 or value.shape != counts.shape:
            raise InputError(
                f"{flag} {path}: '{name}' must be int64 with shape [V], but got {value.dtype} {list(value.shape)}."
            )
        if (value < 0).any():
            raise InputError(
                f"{flag} {path}: '{name}' must be non-negative, but holds negative values; the file is corrupt."
            )
    return counts, metadata, companions


def load_counts(path: str, *, flag: str = "--counts") -> Tuple[np.ndarray, Dict[str, str]]:
    """Read a counts file written by :func:`save_counts`; a bad file is a clear error."""
    counts, metadata, _ = read_counts_file(path, flag=flag)
    return counts, metadata
