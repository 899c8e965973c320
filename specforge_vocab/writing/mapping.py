"""The draft vocabulary mapping: which target ids the draft keeps, as d2t/t2d.

An EAGLE-3 draft with ``k`` LM-head rows keeps ``k`` of the target's ``V`` ids.
Two tensors describe the choice (docs/SPECFORGE.md section 1):

- ``d2t`` int64 ``[k]``: target id of draft row ``i`` is ``i + d2t[i]``;
- ``t2d`` bool ``[V]``: True for the kept target ids.

Example::

    >>> counts = np.array([5, 0, 9, 5, 1])
    >>> kept_token_ids(counts, 3).tolist()      # 2 (9), then 0 and 3 (tie: smaller id first)
    [0, 2, 3]
    >>> d2t, t2d = build_mapping(np.array([0, 2, 3]), 5)
    >>> d2t.tolist(), t2d.tolist()
    ([0, 1, 1], [True, False, True, True, False])
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch

from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic_write, safetensors_bytes

logger = logging.getLogger(__name__)

MAPPING_KEYS = ("d2t", "t2d")


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise InputError(f"Token counts must be a 1-D array of length vocab_size, but got shape {counts.shape}.")
    if counts.size == 0:
        raise InputError("Token counts must cover at least one token id, but got an empty array.")
    if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
        raise InputError(f"Token counts must be integers, but got dtype {counts.dtype}.")
    if np.issubdtype(counts.dtype, np.floating) and not np.all(np.isfinite(counts)):
        raise InputError("Token counts must be finite numbers, but some are NaN or infinite.")
    if counts.min() < 0:
        bad = int(np.flatnonzero(counts < 0)[0])
        raise InputError(f"Token counts must be >= 0, but token id {bad} has count {counts[bad]}.")
    return counts


def _check_k(k: int, vocab_size: int, name: str = "draft_vocab_size") -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InputError(f"{name} must be an integer, but got {k!r}.")
    k = int(k)
    if not 1 <= k <= vocab_size:
        raise InputError(
            f"{name} must be in [1, {vocab_size}] (the target vocab_size), but got {k}. "
            "Choose a draft vocabulary no larger than the target's."
        )
    return k


def _check_pinned(pinned_ids: Sequence[int], vocab_size: int, k: int) -> np.ndarray:
    pinned = np.unique(np.asarray(list(pinned_ids), dtype=np.int64))
    if pinned.size and (pinned[0] < 0 or pinned[-1] >= vocab_size):
        bad = int(pinned[0] if pinned[0] < 0 else pinned[-1])
        raise InputError(f"Pinned token ids must be in [0, {vocab_size}), but got {bad}.")
    if pinned.size > k:
        raise InputError(
            f"The number of pinned token ids must be at most draft_vocab_size ({k}), but got {pinned.size}. "
            "Pin fewer ids or raise draft_vocab_size."
        )
    return pinned


def frequency_order(counts: np.ndarray) -> np.ndarray:
    """Every token id, most frequent first, ties to the smaller id (stable sort).

    Unseen ids (count 0) come last in ascending order, which is also the
    padding rule when fewer than k ids were seen.
    """
    counts = np.asarray(counts)
    # A stable sort on the negated counts keeps equal counts in ascending id order.
    return np.argsort(-counts.astype(np.float64 if counts.dtype.kind == "f" else np.int64), kind="stable")


def kept_token_ids(counts: np.ndarray, k: int, *, pinned_ids: Sequence[int] = ()) -> np.ndarray:
    """The ``k`` most frequent token ids, ascending (int64).

    Ties go to the smaller id. ``pinned_ids`` are always kept and count toward
    ``k``. If fewer than ``k`` ids have a count above zero, the smallest unseen
    ids fill the rest (as SpecForge does) and a warning is logged.
    """
    counts = _check_counts(counts)
    vocab_size = counts.shape[0]
    k = _check_k(k, vocab_size)
    pinned = _check_pinned(pinned_ids, vocab_size, k)

    order = frequency_order(counts)
    if pinned.size:
        free = np.ones(vocab_size, dtype=bool)
        free[pinned] = False
        order = order[free[order]]
    chosen = np.concatenate([pinned, order[: k - pinned.size]]).astype(np.int64)
    chosen.sort()

    seen = int(np.count_nonzero(counts))
    if seen < k:
        unseen_kept = int(np.count_nonzero(counts[chosen] == 0))
        logger.warning(
            "Only %d token ids were seen in the data but draft_vocab_size is %d; "
            "%d unseen ids (the smallest ones%s) fill the draft vocabulary. "
            "Use more data or a smaller draft_vocab_size.",
            seen,
            k,
            unseen_kept,
            " and pinned ids" if pinned.size else "",
        )
    return chosen


def build_mapping(kept_ids: np.ndarray, vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """d2t (int64 [k], ``kept - arange(k)``) and t2d (bool [V]) for ascending kept ids."""
    import torch

    kept = np.asarray(kept_ids)
    if kept.ndim != 1 or kept.size == 0 or not np.issubdtype(kept.dtype, np.integer):
        raise InputError(
            f"Kept token ids must be a non-empty 1-D integer array, but got shape {kept.shape} and dtype {kept.dtype}."
        )
    kept = kept.astype(np.int64, copy=False)
    _check_kept(kept, vocab_size, source="kept token ids")
    k = kept.shape[0]
    d2t = torch.from_numpy(kept - np.arange(k, dtype=np.int64))
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[torch.from_numpy(kept)] = True
    return d2t, t2d


def mapping_from_counts(
    counts: np.ndarray, k: int, *, pinned_ids: Sequence[int] = ()
) -> Tuple[torch.Tensor, torch.Tensor]:
    """d2t, t2d for the ``k`` most frequent ids of ``counts`` (checked)."""
    counts = _check_counts(counts)
    kept = kept_token_ids(counts, k, pinned_ids=pinned_ids)
    d2t, t2d = build_mapping(kept, counts.shape[0])
    check_mapping(d2t, t2d, draft_vocab_size=int(k), vocab_size=counts.shape[0])
    return d2t, t2d


def kept_ids_from_d2t(d2t: torch.Tensor) -> np.ndarray:
    """Target ids kept by a mapping: ``arange(k) + d2t`` (int64 numpy)."""
    import torch

    d2t_np = torch.as_tensor(d2t).detach().cpu().numpy().astype(np.int64)
    return np.arange(d2t_np.shape[0], dtype=np.int64) + d2t_np


def _check_kept(kept: np.ndarray, vocab_size: int, *, source: str) -> None:
    if kept.size and (kept.min() < 0 or kept.max() >= vocab_size):
        bad_at = int(np.flatnonzero((kept < 0) | (kept >= vocab_size))[0])
        raise InputError(
            f"{source}: kept target ids (arange(k) + d2t) must be in [0, {vocab_size}), but row {bad_at} "
            f"maps to {int(kept[bad_at])}. The mapping was built for another vocabulary; rebuild it."
        )
    steps = np.diff(kept)
    if steps.size and steps.min() <= 0:
        bad_at = int(np.flatnonzero(steps <= 0)[0]) + 1
        what = "repeats" if steps[bad_at - 1] == 0 else "is below"
        raise InputError(
            f"{source}: kept target ids (arange(k) + d2t) must be strictly ascending and unique, but row "
            f"{bad_at} maps to {int(kept[bad_at])}, which {what} row {bad_at - 1} ({int(kept[bad_at - 1])}). "
            "Rebuild the mapping from sorted kept ids."
        )


def check_mapping(
    d2t: torch.Tensor,
    t2d: torch.Tensor,
    *,
    draft_vocab_size: int,
    vocab_size: int,
    source: str = "mapping",
) -> None:
    """Raise :class:`InputError` unless d2t/t2d satisfy every rule of docs/SPECFORGE.md section 1.

    ``source`` names where the tensors came from (a file path) in the messages.
    """
    import torch

    if not isinstance(d2t, torch.Tensor) or not isinstance(t2d, torch.Tensor):
        raise InputError(
            f"{source}: d2t and t2d must be torch tensors, but got {type(d2t).__name__} and {type(t2d).__name__}."
        )
    if d2t.dtype.is_floating_point or d2t.dtype.is_complex:
        raise InputError(
            f"{source}: d2t must be int64, never a float type, but got {d2t.dtype}. Floats such as bfloat16 "
            "hold integers exactly only up to 256, so the offsets are already corrupted; rebuild the mapping."
        )
    if d2t.dtype != torch.int64:
        raise InputError(f"{source}: d2t must have dtype torch.int64, but got {d2t.dtype}. Rebuild the mapping.")
    if t2d.dtype != torch.bool:
        raise InputError(f"{source}: t2d must have dtype torch.bool, but got {t2d.dtype}. Rebuild the mapping.")
    if tuple(d2t.shape) != (draft_vocab_size,):
        raise InputError(
            f"{source}: d2t must have shape [{draft_vocab_size}] (draft_vocab_size), but got "
            f"{list(d2t.shape)}. Rebuild the mapping with the draft config's draft_vocab_size."
        )
    if tuple(t2d.shape) != (vocab_size,):
        raise InputError(
            f"{source}: t2d must have shape [{vocab_size}] (vocab_size), but got {list(t2d.shape)}. "
            "Rebuild the mapping for the target's vocab_size."
        )
    kept = kept_ids_from_d2t(d2t)
    _check_kept(kept, vocab_size, source=source)
    t2d_np = t2d.detach().cpu().numpy()
    total = int(t2d_np.sum())
    if total != draft_vocab_size:
        raise InputError(
            f"{source}: t2d must mark exactly draft_vocab_size = {draft_vocab_size} ids True, but marks "
            f"{total}. Rebuild t2d from d2t."
        )
    if not t2d_np[kept].all():
        row = int(np.flatnonzero(~t2d_np[kept])[0])
        raise InputError(
            f"{source}: t2d must be True at every kept id (arange(k) + d2t), but t2d[{int(kept[row])}] "
            f"(draft row {row}) is False. d2t and t2d disagree; rebuild t2d from d2t."
        )


def save_mapping(path_pt: str, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Write ``torch.save({"d2t": d2t, "t2d": t2d})`` atomically (SpecForge's format)."""
    import torch

    payload = {"d2t": d2t.detach().cpu().contiguous(), "t2d": t2d.detach().cpu().contiguous()}
    atomic_write(path_pt, lambda handle: torch.save(payload, handle))


def save_mapping_safetensors(
    path: str, d2t: torch.Tensor, t2d: torch.Tensor, metadata: Optional[Dict[str, str]] = None
) -> None:
    """Write d2t/t2d as a safetensors file (metadata values are turned into strings), byte-identical
    for the same tensors and metadata."""

    meta = {str(key): str(value) for key, value in (metadata or {}).items()}
    tensors = {"d2t": d2t.detach().cpu().numpy(), "t2d": t2d.detach().cpu().numpy()}
    atomic_write(path, safetensors_bytes(tensors, meta or None))


def load_mapping(
    path: str, *, draft_vocab_size: Optional[int] = None, vocab_size: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read d2t, t2d from a ``.pt`` (torch.load, weights_only) or ``.safetensors`` file.

    With both ``draft_vocab_size`` and ``vocab_size`` given, the section 1 rules
    are checked too.
    """
    import torch

    if not os.path.isfile(path):
        raise InputError(
            f"Vocab mapping file {path} does not exist. Pass the path of a vocab_mapping.pt or "
            ".safetensors file written by specforge-vocab or SpecForge."
        )
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        raise InputError(
            f"Cannot read vocab mapping file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Expected torch.save({'d2t': ..., 't2d': ...}) or a safetensors file with tensors d2t and t2d; "
            "rebuild it with specforge-vocab."
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"Vocab mapping file {path} must hold a dict with keys 'd2t' and 't2d', but holds a "
            f"{type(data).__name__}. Rebuild it with specforge-vocab."
        )
    missing = [key for key in MAPPING_KEYS if key not in data]
    if missing:
        raise InputError(
            f"Vocab mapping file {path} must hold keys 'd2t' and 't2d', but {', '.join(repr(m) for m in missing)} "
            f"is missing (found {sorted(map(str, data))}). Rebuild it with specforge-vocab."
        )
    d2t, t2d = data["d2t"], data["t2d"]
    for key, value in (("d2t", d2t), ("t2d", t2d)):
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"Vocab mapping file {path}: '{key}' must be a tensor, but got {type(value).__name__}. "
                "Rebuild it with specforge-vocab."
            )
    if draft_vocab_size is not None and vocab_size is not None:
        check_mapping(d2t, t2d, draft_vocab_size=draft_vocab_size, vocab_size=vocab_size, source=str(path))
    return d2t, t2d


def mapping_fingerprint(kept_ids: np.ndarray, vocab_size: int) -> str:
    """sha256 (hex) naming a mapping: the bytes of V as one little-endian int64, followed by the kept
    target ids (ascending, ``arange(k) + d2t``) as little-endian int64. Equal for equal mappings
    whatever file they are stored in.

    >>> mapping_fingerprint(np.array([0, 2, 3]), 5) == hashlib.sha256(
    ...     np.array([5, 0, 2, 3], dtype="<i8").tobytes()).hexdigest()
    True
    """
    kept = np.asarray(kept_ids, dtype="<i8")
    return hashlib.sha256(np.array([int(vocab_size)], dtype="<i8").tobytes() + kept.tobytes()).hexdigest()


def mapping_payloads(d2t, t2d, *, draft_vocab_size: int, vocab_size: int) -> Tuple[bytes, bytes]:
    """The bytes of ``vocab_mapping.pt`` (``torch.save`` of d2t/t2d, what SpecForge loads) and of
    ``vocab_mapping.safetensors`` (the same tensors, deterministic bytes)."""
    import torch

    metadata = {
        "draft_vocab_size": str(draft_vocab_size),
        "vocab_size": str(vocab_size),
        "format": "specforge-vocab-mapping",
    }
    buffer = io.BytesIO()
    torch.save({"d2t": d2t, "t2d": t2d}, buffer)
    return buffer.getvalue(), safetensors_bytes({"d2t": d2t.numpy(), "t2d": t2d.numpy()}, metadata)
