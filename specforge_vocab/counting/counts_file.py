"""The counts file: tensor ``counts`` (int64 [V]) in a safetensors file, with the counting settings
and what was read as string metadata. Equal counts and metadata give byte-identical files.

Counts of offline features with the target's LM head also carry both sources side by side
(``token_counts``: the data's loss-masked tokens; ``target_argmax_counts``: the target's argmax at
the trained positions), so the coverage of each can be reported whichever one k is chosen on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Collection, Dict, List, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open

from specforge_vocab.counting.data import dataset_files
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.templates import (
    ChatTemplate,
    canonical_template_name,
    field_problems,
    get_template,
    load_template_file,
    template_from_fields,
)
from specforge_vocab.counting.tokenizer import tokenizer_sha256
from specforge_vocab.errors import InputError, short
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
    tensors.update({COMPANION_TENSORS[name]: value for name, value in companions.items()})
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


# The counting settings a counts file was made with, by field: their flag and how the file records them.
COUNTED_WITH = {
    "dataset_paths": "--dataset-path",
    "tokenizer_path": "--tokenizer-path",
    "chat_template": "--chat-template",
    "chat_template_file": "--chat-template-file",
    "max_length": "--max-length",
    "is_preformatted": "--is-preformatted",
    "train_only_last_turn": "--train-only-last-turn",
    "sample_size": "--sample-size",
    "target_vocab_size": "--target-vocab-size",
}


def read_counts_metadata(path: str) -> Optional[Dict[str, str]]:
    """The metadata of a counts file (the tensor is not read), or None when it cannot be read."""
    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            metadata["vocab_size"] = metadata.get("vocab_size") or str(handle.get_slice(COUNTS_TENSOR).get_shape()[0])
            return metadata
    except Exception:  # noqa: BLE001 - load_counts reports an unreadable file with its reason
        return None


def _recorded(field: str, metadata: Dict[str, str]):
    """What the counts file records for ``field`` (KeyError / ValueError when it does not say)."""
    if field == "dataset_paths":
        return [(os.path.realpath(f["path"]), int(f["size"])) for f in json.loads(metadata["files"])]
    if field == "tokenizer_path":
        return metadata["tokenizer_path"]
    if field == "chat_template":
        return canonical_template_name(metadata["chat_template"])
    if field == "chat_template_file":  # the fields the file held, wherever it lives now
        return json.loads(metadata["chat_template_fields"])
    if field in ("max_length", "target_vocab_size"):
        return int(metadata["max_length" if field == "max_length" else "vocab_size"])
    return json.loads(metadata[field])


def _same(field: str, given, recorded, metadata: Dict[str, str]) -> bool:
    if field == "dataset_paths":
        try:
            files = dataset_files(given)
        except InputError:
            return False
        return [(os.path.realpath(p), os.path.getsize(p)) for p in files] == recorded
    if field == "tokenizer_path":
        if os.path.realpath(given) == os.path.realpath(recorded):
            return True
        return bool(metadata.get("tokenizer_sha256")) and tokenizer_sha256(given) == metadata["tokenizer_sha256"]
    if field == "chat_template":
        return canonical_template_name(given) == recorded
    if field == "chat_template_file":
        try:
            return load_template_file(given, name=metadata.get("chat_template", "")).fields() == recorded
        except InputError:
            return False
    return given == recorded


def _template_difference(path: str, recorded: Dict[str, object], metadata: Dict[str, str]) -> str:
    """How the template in ``path`` differs from the fields the counts file recorded, field by field."""
    try:
        given = load_template_file(path, name=metadata.get("chat_template", "")).fields()
    except InputError as exc:
        return f"a template it cannot be compared with ({exc})"
    differ = [
        f"{key} {short(recorded.get(key), 60)} there, {short(given.get(key), 60)} here"
        for key in sorted(set(given) | set(recorded))
        if given.get(key) != recorded.get(key)
    ]
    return "a template whose fields differ: " + "; ".join(differ)


def counts_file_conflicts(
    settings: CountSettings, counts_path: str, given: Optional[Collection[str]] = None, *, flag: str = "--counts"
) -> List[str]:
    """Counting flags that disagree with the counts file ``counts_path`` (one problem each).

    The counts file already fixes what was counted; a counting flag given with it is accepted only
    when it equals what the file records. A field is checked when it differs from CountSettings'
    default or is in ``given`` (the fields set on the command line, a default typed out included).
    """
    metadata = read_counts_metadata(counts_path)
    if metadata is None:
        return []  # load_counts says what is wrong with the file
    defaults = CountSettings()
    problems = []
    for field, name in COUNTED_WITH.items():
        value = getattr(settings, field)
        if value == getattr(defaults, field) and (given is None or field not in given):
            continue
        try:
            recorded = _recorded(field, metadata)
        except (KeyError, ValueError, TypeError):
            recorded = None
        if recorded is None and field != "dataset_paths":
            continue  # the file does not say (an older counts file): the flag fills it in
        if recorded is not None and _same(field, value, recorded, metadata):
            continue
        if field == "dataset_paths":
            said = json.dumps([path for path, _ in recorded]) if recorded else "no data files"
        elif field == "chat_template_file":
            said = _template_difference(value, recorded, metadata)
        else:
            said = "nothing" if recorded is None else repr(recorded)
        problems.append(
            f"{name} {value!r} conflicts with {flag} {counts_path}, which was counted with {said}: the counts "
            f"file decides what was counted. Drop {name} to use the counts file as it is, or drop {flag} to "
            "count again with the flags given."
        )
    return problems
