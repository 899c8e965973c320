"""SpecForge's offline feature files (``data.hidden_states_path`` / ``--hidden-states-path``:
``*.ckpt`` / ``*.ckpt.gz``, torch-saved dicts), read with ``weights_only=True``.

Two rules read them (docs/SPECFORGE.md sections 4.3, 4.4 and 7):

* the data tokens, as SpecForge's own mapping builder counts them: ``input_ids`` where
  ``loss_mask`` is non-zero, truncated to max_length (:func:`iter_feature_files`);
* the positions training puts loss on, whose teacher is the target's prediction from the next
  stored hidden state: truncate to L' = min(L, max_length), zero the last mask entry, and take
  ``hidden_state[t + 1]`` for every t with a non-zero mask (:func:`training_positions`,
  :func:`read_feature_sample`). Only those rows are read from disk.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import zipfile
from typing import Any, Iterator, List, Mapping, Optional

import numpy as np

from specforge_vocab.counting.pretokenized import check_id_range
from specforge_vocab.errors import InputError, short

FEATURE_SUFFIXES = (".ckpt", ".ckpt.gz")


def list_feature_files(path: str, *, field: str = "data.hidden_states_path") -> List[str]:
    """Offline feature files as SpecForge lists them: a file itself, or every
    ``*.ckpt``/``*.ckpt.gz`` under a directory (recursively), absolute, sorted."""
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise InputError(
            f"{field} {path} does not exist. Point it at the directory written by SpecForge's "
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
            f"{field} {path} holds no *.ckpt or *.ckpt.gz feature files. "
            "Run SpecForge's prepare_hidden_states.py first, or point at the directory it wrote."
        )
    return files


def load_feature_file(path: str) -> Any:
    """The torch-saved object in ``path`` (gzipped when it ends in .gz), loaded with
    ``weights_only=True`` and, for plain files, memory-mapped (tensors are read when touched)."""
    import torch

    if not path.endswith(".gz") and _starts_with(path, b"\x1f\x8b"):
        raise InputError(
            f"{path} is gzip-compressed but its name does not end in .gz, so SpecForge would load it uncompressed and "
            "fail. Rename it to .ckpt.gz (prepare_hidden_states.py --compress names them so)."
        )
    try:
        if path.endswith(".gz"):
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


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False  # torch.load reports it


def _ids_and_mask(path: str, data: Any):
    """The flattened ``input_ids`` and ``loss_mask`` tensors of a loaded feature file, checked."""
    import torch

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
    return ids, mask


def iter_feature_samples(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    hidden: bool = False,
    field: str = "data.hidden_states_path",
) -> Iterator["FeatureSample"]:
    """:func:`read_feature_sample` of each feature file under ``path``; file i (in SpecForge's order)
    goes to rank ``i % world_size``."""
    for index, file in enumerate(list_feature_files(path, field=field)):
        if index % world_size == rank:
            yield read_feature_sample(file, max_length, vocab_size=vocab_size, hidden=hidden)


def iter_feature_files(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Loss-masked ids (int64) of each feature file under ``data.hidden_states_path``: input_ids where
    loss_mask is non-zero, after flattening (a batch dimension of 1 is common) and truncating to
    ``max_length``; file i (in sorted order) goes to rank ``i % world_size``."""
    for sample in iter_feature_samples(path, max_length, vocab_size=vocab_size, rank=rank, world_size=world_size):
        yield sample.masked_ids


def training_positions(loss_mask) -> np.ndarray:
    """The positions t whose teacher SpecForge trains on, for a mask already truncated to L':
    every t with a non-zero mask, the last position excluded (training zeroes it). The teacher of
    position t is the prediction from hidden state t + 1.

    >>> training_positions(np.array([0, 1, 1, 0, 1, 1])).tolist()
    [1, 2, 4]
    """
    mask = np.asarray(loss_mask)
    return np.flatnonzero(mask[:-1] != 0).astype(np.int64) if mask.size else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass
class FeatureSample:
    """What one feature file contributes: its data tokens (the builder's rule) and, when asked for,
    the stored hidden states at its training positions' teachers (``[n, H]`` bfloat16)."""

    path: str
    masked_ids: np.ndarray
    teacher_hidden: Any = None  # torch.Tensor [n, H] bfloat16, or None

    @property
    def positions(self) -> int:
        return 0 if self.teacher_hidden is None else int(self.teacher_hidden.shape[0])


def _hidden_rows(path: str, data: Mapping, length: int):
    """``hidden_state`` as a [L, H] bfloat16 view (a leading batch dimension of 1 is dropped, as
    SpecForge's squeeze(0) does), checked against the number of stored positions."""
    import torch

    hidden = data.get("hidden_state")
    if hidden is None:
        raise InputError(
            f"{path} has no 'hidden_state' (keys: {', '.join(map(str, data))}); target-argmax counts need the "
            "target's last hidden state that SpecForge's prepare_hidden_states.py stores. Regenerate the features, or "
            "count with --count-source tokens."
        )
    if not isinstance(hidden, torch.Tensor):
        raise InputError(f"{path}: 'hidden_state' must be a tensor, but is {type(hidden).__name__}.")
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if hidden.dim() != 2 or hidden.shape[0] != length:
        raise InputError(
            f"{path}: 'hidden_state' must have shape [1, {length}, H] or [{length}, H] (one row per input id), but "
            f"has shape {list(hidden.shape)}. The file does not come from prepare_hidden_states.py, or is damaged."
        )
    if hidden.dtype != torch.bfloat16:
        raise InputError(
            f"{path}: 'hidden_state' must be bfloat16, but is {hidden.dtype}. SpecForge's TargetHead multiplies "
            "bfloat16 weights by the stored hidden state as it is, so training would fail on these features too "
            "(docs/SPECFORGE.md section 7). Capture them with a bfloat16 target."
        )
    return hidden


def read_feature_sample(
    path: str, max_length: int, *, vocab_size: Optional[int] = None, hidden: bool = False
) -> FeatureSample:
    """One feature file's data tokens and (``hidden=True``) its teacher hidden states: row t + 1 for
    every training position t (:func:`training_positions`), in position order."""
    import torch

    data = load_feature_file(path)
    ids, mask = _ids_and_mask(path, data)
    length = int(ids.numel())
    ids, mask = ids[:max_length], mask[:max_length]
    kept = ids[mask.to(torch.bool)].to(torch.int64).numpy()
    check_id_range(kept, vocab_size, path)
    sample = FeatureSample(path, kept)
    if hidden:
        rows = _hidden_rows(path, data, length)
        teachers = torch.from_numpy(training_positions(mask.numpy()) + 1)
        sample.teacher_hidden = rows.index_select(0, teachers)
    return sample
