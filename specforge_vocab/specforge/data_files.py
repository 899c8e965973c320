"""SpecForge's already-tokenized data: pre-tokenized prompts (``data.prompts_path``: JSONL records
with ``input_ids`` and ``loss_mask``) and offline feature files (``data.hidden_states_path``:
``*.ckpt`` / ``*.ckpt.gz``, torch-saved dicts read with ``weights_only=True``).

:func:`iter_prompt_records` and :func:`iter_feature_files` yield the loss-masked ids of each
record (truncated to max_length, as SpecForge does) and :func:`count_masked_ids` turns them into
dense counts (docs/SPECFORGE.md section 4).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import pickle
import zipfile
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from specforge_vocab.errors import InputError, short, where

logger = logging.getLogger(__name__)


FEATURE_SUFFIXES = (".ckpt", ".ckpt.gz")


class RawConversationsFile(InputError):
    """The prompts file holds raw conversations, not input_ids/loss_mask
    records: count it like data.train_data_path."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"{path}: the first record has no input_ids/loss_mask, so SpecForge treats data.prompts_path as raw "
            "conversations (like data.train_data_path)."
        )


def _iter_json_records(path: str, field: str) -> Iterator[Tuple[int, Optional[str], Any]]:
    """Yield (line or record number, raw line text, parsed record or None).

    A JSON array (first non-space character '[') yields parsed records
    numbered from 1; JSONL yields raw lines, to be parsed by the caller.
    """
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"{where(path, field=field)}: the file does not exist. Check the path in the run config."
        ) from None
    except OSError as exc:
        raise InputError(f"Cannot read {path} ({field}): {exc.strerror}.") from None
    with handle:
        try:
            first = ""
            while True:
                c = handle.read(1)
                if not c or not c.isspace():
                    first = c
                    break
            handle.seek(0)
            if first == "[":
                try:
                    records = json.load(handle)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where(path, exc.lineno, field)}: invalid JSON array ({exc.msg}).") from None
                for number, record in enumerate(records, start=1):
                    yield number, None, record
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line, None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{where(path, field=field)}: the file is not UTF-8 ({exc.reason}). Save it as UTF-8."
            ) from None


def _parse_line(path: str, number: int, line: Optional[str], record: Any, is_array: bool) -> dict:
    if line is not None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where(path, number)}: invalid JSON ({exc.msg}, column {exc.colno}). Fix or remove the line."
            ) from None
    if not isinstance(record, dict):
        place = f"{path}, record {number}" if is_array else where(path, number)
        raise InputError(f"{place} must be a JSON object, but got {short(record)}.")
    return record


def _int_array(value: Any, *, place: str, field: str, binary: bool) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InputError(f"{place}, field '{field}' must be a list of integers, but got {short(value)}.")
    if len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]  # a batch dimension of one
    if len(value) == 0:
        raise InputError(f"{place}, field '{field}' is an empty token sequence. Remove the record or re-tokenize it.")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.ndim != 1:
        raise InputError(f"{place}, field '{field}' must be a flat list of integers, but it is nested or ragged.")
    kinds = "iub" if binary else "iu"
    if array.dtype.kind not in kinds or (not binary and any(type(x) is bool for x in value)):
        bad = next(
            (i for i, x in enumerate(value) if (not binary and isinstance(x, bool)) or not isinstance(x, int)), None
        )
        if bad is None:
            raise InputError(
                f"{place}, field '{field}' holds integers outside the 64-bit range; re-tokenize the record."
            )
        raise InputError(
            f"{place}, field '{field}[{bad}]' must be an integer, but got {short(value[bad])}. "
            "Token ids and loss-mask entries are whole numbers."
        )
    array = array.astype(np.int64, copy=False)
    if binary and array.size and (array.min() < 0 or array.max() > 1):
        bad = int(np.flatnonzero((array < 0) | (array > 1))[0])
        raise InputError(f"{place}, field '{field}[{bad}]' must be 0 or 1, but got {int(array[bad])}.")
    return array


def _check_id_range(ids: np.ndarray, vocab_size: Optional[int], place: str) -> None:
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise InputError(
            f"{place} holds the negative token id {low}. Token ids must be in [0, vocab_size); re-tokenize the data."
        )
    if vocab_size is not None and high >= vocab_size:
        raise InputError(
            f"{place} holds the token id {high}, outside the target vocabulary of {vocab_size} ids. "
            "The data were tokenized with another tokenizer; use the target model's tokenizer or fix vocab_size."
        )


def prompts_file_kind(path: str) -> str:
    """'pretokenized', 'conversations' or 'empty': SpecForge decides from the
    first record (both input_ids and loss_mask, or neither)."""
    for number, line, record in _iter_json_records(path, "data.prompts_path"):
        first = _parse_line(path, number, line, record, line is None)
        has_ids, has_mask = "input_ids" in first, "loss_mask" in first
        if has_ids != has_mask:
            missing = "loss_mask" if has_ids else "input_ids"
            raise InputError(
                f"{where(path, number)} has {'input_ids' if has_ids else 'loss_mask'} but no {missing}. A pre-tokenized "
                "prompts file needs both in every record; add the missing field or give raw conversations instead."
            )
        return "pretokenized" if has_ids else "conversations"
    return "empty"


def iter_prompt_records(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Loss-masked token ids (int64) of each pre-tokenized record in a
    ``data.prompts_path`` file (JSONL or a JSON array), truncated to
    ``max_length`` as SpecForge does. Record i goes to rank ``i % world_size``.

    Raises :class:`RawConversationsFile` when the first record has neither
    input_ids nor loss_mask (SpecForge then reads raw conversations).
    """
    kind = prompts_file_kind(path)
    if kind == "empty":
        return
    if kind == "conversations":
        raise RawConversationsFile(path)
    for index, (number, line, record) in enumerate(_iter_json_records(path, "data.prompts_path")):
        if index % world_size != rank:
            continue
        is_array = line is None
        record = _parse_line(path, number, line, record, is_array)
        place = f"{path}, record {number}" if is_array else where(path, number)
        missing = [name for name in ("input_ids", "loss_mask") if name not in record]
        if missing:
            raise InputError(
                f"{place} has no {' and no '.join(missing)}. Every record of a pre-tokenized prompts file needs both "
                "input_ids and loss_mask (SpecForge decides the format from the first record)."
            )
        ids = _int_array(record["input_ids"], place=place, field="input_ids", binary=False)
        mask = _int_array(record["loss_mask"], place=place, field="loss_mask", binary=True)
        if ids.size != mask.size:
            raise InputError(
                f"{place}: input_ids has {ids.size} entries but loss_mask has {mask.size}; they must be equally long."
            )
        kept = ids[:max_length][mask[:max_length] == 1]
        _check_id_range(kept, vocab_size, place)
        yield kept


def list_feature_files(path: str) -> List[str]:
    """Offline feature files as SpecForge lists them: a file itself, or every
    ``*.ckpt``/``*.ckpt.gz`` under a directory (recursively), absolute, sorted."""
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise InputError(
            f"data.hidden_states_path {path} does not exist. Point it at the directory written by SpecForge's "
            "prepare_hidden_states.py (relative paths start at the current directory)."
        )
    files = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            if name.endswith(FEATURE_SUFFIXES):
                files.append(os.path.abspath(os.path.join(root, name)))
    files.sort()
    if not files:
        raise InputError(
            f"data.hidden_states_path {path} holds no *.ckpt or *.ckpt.gz feature files. "
            "Run SpecForge's prepare_hidden_states.py first, or point at the directory it wrote."
        )
    return files


def _load_feature(path: str) -> Any:
    import torch

    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path} cannot be read with torch.load(weights_only=True): it holds objects other than tensors and plain "
            f"containers ({short(reason, 160)}). specforge-vocab never unpickles arbitrary objects; re-save the "
            "features as a dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(
            f"{path} is not a readable torch feature file ({type(exc).__name__}: {short(str(exc), 160)}). "
            "It may be truncated; regenerate it with prepare_hidden_states.py or remove it."
        ) from None


def read_feature_file(path: str, max_length: int, *, vocab_size: Optional[int] = None) -> np.ndarray:
    """Loss-masked ids of one offline feature file: input_ids where loss_mask
    is non-zero, after flattening (a batch dimension of 1 is common) and
    truncating to ``max_length``."""
    import torch

    data = _load_feature(path)
    if not isinstance(data, Mapping):
        raise InputError(
            f"{path} must hold a dict of tensors (input_ids, loss_mask, ...), but holds {type(data).__name__}."
        )
    missing = [name for name in ("input_ids", "loss_mask") if name not in data]
    if missing:
        raise InputError(
            f"{path} has no {' and no '.join(missing)} (keys: {', '.join(map(str, data))}). Offline feature files "
            "must hold input_ids and loss_mask; regenerate them with SpecForge's prepare_hidden_states.py."
        )
    ids, mask = data["input_ids"], data["loss_mask"]
    for name, value in (("input_ids", ids), ("loss_mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: '{name}' must be a tensor, but is {type(value).__name__}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{path}: 'input_ids' must be an integer tensor, but has dtype {ids.dtype}.")
    ids, mask = ids.reshape(-1), mask.reshape(-1)
    if ids.numel() != mask.numel():
        raise InputError(
            f"{path}: input_ids has {ids.numel()} entries but loss_mask has {mask.numel()}; they must match."
        )
    ids, mask = ids[:max_length], mask[:max_length]
    kept = ids[mask.to(torch.bool)].to(torch.int64).numpy()
    _check_id_range(kept, vocab_size, path)
    return kept


def iter_feature_files(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Loss-masked ids (int64) of each feature file under ``data.hidden_states_path``;
    file i (in sorted order) goes to rank ``i % world_size``."""
    for index, file in enumerate(list_feature_files(path)):
        if index % world_size == rank:
            yield read_feature_file(file, max_length, vocab_size=vocab_size)


def count_masked_ids(id_arrays: Iterable[np.ndarray], vocab_size: int, *, chunk: int = 1 << 22) -> np.ndarray:
    """Dense int64 counts [vocab_size] of all ids in ``id_arrays``.

    >>> count_masked_ids([np.array([1, 1, 3])], 5).tolist()
    [0, 2, 0, 1, 0]
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise InputError(f"vocab_size must be a positive integer, but got {short(vocab_size)}.")
    counts = np.zeros(int(vocab_size), dtype=np.int64)
    pending: List[np.ndarray] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        ids = np.concatenate(pending) if len(pending) > 1 else pending[0]
        pending, size = [], 0
        if ids.size == 0:
            return
        _check_id_range(ids, int(vocab_size), "The counted data")
        np.add(counts, np.bincount(ids, minlength=int(vocab_size)), out=counts)

    for array in id_arrays:
        array = np.asarray(array)
        if array.dtype.kind not in "iu":
            raise InputError(f"Token ids must be integers, but an array of dtype {array.dtype} was given.")
        pending.append(array.astype(np.int64, copy=False).ravel())
        size += array.size
        if size >= chunk:
            flush()
    flush()
    return counts
