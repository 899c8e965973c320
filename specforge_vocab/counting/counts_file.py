"""The counts file: tensor ``counts`` (int64 [V]) in a safetensors file, with the counting settings
and what was read as string metadata. Equal counts and metadata give byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open

from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.templates import ChatTemplate, field_problems, get_template, template_from_fields
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic_write, safetensors_bytes

logger = logging.getLogger(__name__)


COUNTS_TENSOR = "counts"


FORMAT_VERSION = "1"


def settings_from_metadata(metadata: Dict[str, str], *, source: str = "counts file") -> CountSettings:
    """The CountSettings a counts file was written with (dataset paths = its files, in order)."""
    try:
        return CountSettings(
            dataset_paths=[str(f["path"]) for f in json.loads(metadata["files"])],
            tokenizer_path=metadata["tokenizer_path"],
            chat_template=metadata["chat_template"],
            chat_template_file=metadata.get("chat_template_file") or None,
            max_length=int(metadata["max_length"]),
            is_preformatted=bool(json.loads(metadata["is_preformatted"])),
            train_only_last_turn=bool(json.loads(metadata["train_only_last_turn"])),
            legacy_reader=bool(json.loads(metadata.get("legacy_reader") or "false")),
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


def template_from_metadata(metadata: Dict[str, str], default_name: str) -> Optional[ChatTemplate]:
    """The chat template a counts file was made with: its recorded fields, else the registered template of
    its name (or ``default_name``); None when neither is known."""
    name = metadata.get("chat_template") or default_name
    fields = metadata.get("chat_template_fields")
    if fields:
        with contextlib.suppress(ValueError, TypeError):
            raw = json.loads(fields)
            if isinstance(raw, dict) and not field_problems(raw, "counts metadata"):
                return template_from_fields(name, raw, origin="the counts file's metadata")
    try:
        return get_template(name)
    except InputError:
        return None


def save_counts(path: str, counts: np.ndarray, metadata: Dict[str, str]) -> None:
    """Write ``counts`` (int64 [V]) and string metadata to a safetensors file, atomically and
    deterministically (equal counts and metadata give byte-identical files)."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, but got shape {counts.shape}")
    atomic_write(path, safetensors_bytes({COUNTS_TENSOR: counts}, {k: str(v) for k, v in metadata.items()}))


def load_counts(path: str, *, flag: str = "--counts") -> Tuple[np.ndarray, Dict[str, str]]:
    """Read a counts file written by :func:`save_counts`; a bad file is a clear error."""

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
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{flag} {path} is not a readable safetensors file ({exc}). Recount with `specforge-vocab count`."
        ) from None
    if counts.dtype != np.int64 or counts.ndim != 1:
        raise InputError(
            f"{flag} {path}: 'counts' must be int64 with shape [V], but got {counts.dtype} {list(counts.shape)}."
        )
    if (counts < 0).any():
        raise InputError(
            f"{flag} {path}: 'counts' must be non-negative, but holds negative values; the file is corrupt."
        )
    return counts, metadata
