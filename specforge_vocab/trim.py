"""Trim an already-trained EAGLE-3 draft: keep the LM-head rows of the tokens a workload uses.

A draft with ``k`` LM-head rows keeps ``k`` of the target's ``V`` ids (its
``d2t``/``t2d``, contract section 1). Trimming chooses ``k' <= k`` of those ids
from token counts, slices the matching ``lm_head`` rows, rebuilds d2t/t2d,
sets ``draft_vocab_size`` in config.json and copies every other tensor byte
for byte. A token without a trained row cannot be added, so the choice is made
among the ids the checkpoint already keeps.

Example (the pure core)::

    >>> w = torch.arange(8.0).reshape(4, 2)                 # 4 draft rows
    >>> old = np.array([1, 3, 5, 7])                        # their target ids
    >>> d2t, t2d = build_mapping(old, 8)
    >>> out = trim_tensors({"lm_head.weight": w, "d2t": d2t, "t2d": t2d}, old, np.array([3, 7]))
    >>> out["lm_head.weight"].tolist(), out["d2t"].tolist()
    ([[2.0, 3.0], [6.0, 7.0]], [3, 6])
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .cost import DraftArchitecture, draft_flops
from .counting import CountSettings, count_dataset, load_counts
from .draft_config import check_vocab_size, patched_text, read_draft_config
from .errors import InputError, SettingsError, must, short
from .fileio import atomic_write_many, file_lock, json_text
from .mapping import build_mapping, check_mapping, kept_ids_from_d2t, kept_token_ids, load_mapping
from .search import SearchResult, SearchSettings, search

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: weight layouts in the order transformers looks for them
LAYOUTS = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)
#: files in a checkpoint directory that are weights or training state: never copied to the output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gz", ".pkl", ".msgpack", ".h5")

#: LM-head tensors whose first dimension is the draft vocabulary: the only ones sliced
HEAD_TENSORS = ("lm_head.weight", "lm_head.bias")
D2T, T2D = "d2t", "t2d"

_SAFE_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


# =========================================================================== pure core


def _row_indices(old_kept: np.ndarray, new_kept: np.ndarray) -> np.ndarray:
    """Draft rows (indices into ``old_kept``) of the ``new_kept`` ids; every new id must be an old one."""
    old_kept = np.asarray(old_kept, dtype=np.int64)
    new_kept = np.asarray(new_kept, dtype=np.int64)
    if new_kept.ndim != 1 or new_kept.size == 0:
        raise InputError(f"The new kept token ids must be a non-empty 1-D array, but got shape {new_kept.shape}.")
    if np.any(np.diff(new_kept) <= 0):
        raise InputError("The new kept token ids must be strictly ascending and unique; sort them first.")
    rows = np.searchsorted(old_kept, new_kept)
    inside = rows < old_kept.size
    ok = np.zeros(new_kept.size, dtype=bool)
    ok[inside] = old_kept[rows[inside]] == new_kept[inside]
    if not ok.all():
        bad = int(new_kept[np.flatnonzero(~ok)[0]])
        raise InputError(
            f"Token id {bad} is not in the checkpoint's draft vocabulary, so it has no trained LM-head row; "
            "trimming can only keep ids the draft already has (a token cannot be added without retraining)."
        )
    return rows.astype(np.int64)


def slice_rows(tensor: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``tensor[rows]`` along dim 0, copying the rows' bytes exactly (any dtype, float8 included)."""
    n = tensor.shape[0]
    flat = tensor.detach().contiguous().reshape(n, -1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    picked = raw.index_select(0, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)))
    if flat.dtype != torch.uint8:
        picked = picked.view(tensor.dtype)
    return picked.reshape((len(rows),) + tuple(tensor.shape[1:])).contiguous()


def _is_named(name: str, base: str) -> bool:
    return name == base or name.endswith("." + base)


@dataclasses.dataclass(frozen=True)
class HeadNames:
    """Where the draft-vocabulary tensors of a checkpoint live."""

    weight: Optional[str]
    bias: Optional[str]
    d2t: Optional[str]
    t2d: Optional[str]

    @property
    def sliced(self) -> Tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


def find_head_names(shapes: Mapping[str, Sequence[int]], *, source: str = "checkpoint") -> HeadNames:
    """Find lm_head.weight/bias and d2t/t2d among the tensor names (a prefix is allowed).

    Serving engines pick d2t/t2d by substring ("d2t" in name), so a second name
    containing "d2t" or "t2d" is refused as ambiguous, as is any other
    ``lm_head.*`` tensor (a quantisation scale, say) that trimming cannot slice.
    """
    def unique(base: str) -> Optional[str]:
        hits = [n for n in shapes if _is_named(n, base)]
        if len(hits) > 1:
            raise InputError(
                f"{source}: found {len(hits)} tensors named like '{base}' ({', '.join(hits)}); a draft has exactly "
                "one. Remove the extra ones (they are not an EAGLE-3 draft's) and try again."
            )
        return hits[0] if hits else None

    names = HeadNames(*(unique(base) for base in HEAD_TENSORS), unique(D2T), unique(T2D))
    for base, chosen in ((D2T, names.d2t), (T2D, names.t2d)):
        others = [n for n in shapes if base in n and n != chosen]
        if others:
            raise InputError(
                f"{source}: tensor {others[0]!r} contains '{base}' in its name; vLLM and SGLang take any such tensor "
                f"as the {base} mapping, so the checkpoint is ambiguous. Rename or remove it."
            )
    unknown_head = [n for n in shapes if "lm_head" in n and n not in names.sliced]
    if unknown_head:
        raise InputError(
            f"{source}: tensor {unknown_head[0]!r} belongs to the LM head but is not lm_head.weight or lm_head.bias "
            "(a quantised head?); trimming cannot slice it safely. Trim the unquantised checkpoint, then quantise."
        )
    return names


def other_draft_sized(shapes: Mapping[str, Sequence[int]], names: HeadNames, draft_vocab_size: int) -> List[str]:
    """Tensors left unchanged although one of their dimensions equals draft_vocab_size (reported, not sliced)."""
    skip = set(names.sliced) | {names.d2t, names.t2d}
    return [
        n for n, shape in shapes.items()
        if n not in skip and not _is_named(n, "embed_tokens.weight") and draft_vocab_size in tuple(shape)
    ]


def trim_tensors(
    tensors: Mapping[str, torch.Tensor],
    old_kept: np.ndarray,
    new_kept: np.ndarray,
    *,
    vocab_size: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """A draft's tensors trimmed from the ``old_kept`` ids (one per LM-head row) to ``new_kept``.

    lm_head.weight/bias rows are sliced, d2t (int64 [k']) and t2d (bool [V]) are
    rebuilt (added as "d2t"/"t2d" if absent), every other tensor is returned as
    the same object. ``vocab_size`` defaults to the length of the t2d tensor.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    names = find_head_names(shapes)
    old_kept = np.asarray(old_kept, dtype=np.int64)
    if names.weight is None:
        raise InputError("The tensors have no lm_head.weight; there are no draft rows to trim.")
    for name in names.sliced:
        if shapes[name][0] != old_kept.size:
            raise InputError(
                f"{name} has {shapes[name][0]} rows but {old_kept.size} kept ids were given; they must match "
                "(one LM-head row per kept id)."
            )
    if vocab_size is None:
        if names.t2d is None:
            raise InputError("vocab_size must be given when the tensors hold no t2d to read it from.")
        vocab_size = shapes[names.t2d][0]
    rows = _row_indices(old_kept, new_kept)
    d2t, t2d = build_mapping(np.asarray(new_kept, dtype=np.int64), int(vocab_size))
    out: Dict[str, torch.Tensor] = OrderedDict()
    for name, tensor in tensors.items():
        if name in names.sliced:
            out[name] = slice_rows(tensor, rows)
        elif name == names.d2t:
            out[name] = d2t
        elif name == names.t2d:
            out[name] = t2d
        else:
            out[name] = tensor
    out.setdefault(names.d2t or D2T, d2t)
    out.setdefault(names.t2d or T2D, t2d)
    return out


def restricted_coverage_curve(counts: np.ndarray, old_kept: np.ndarray) -> np.ndarray:
    """Coverage at every k in [0, V] when only ``old_kept`` ids can be chosen (float64, length V + 1).

    ``curve[k]`` = (sum of the k largest counts among old_kept) / (all counted tokens);
    it stops growing at k = len(old_kept), below 1 when other ids were counted.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise InputError(
            "No loss-masked tokens were counted, so coverage is undefined. Check that the dataset has "
            "assistant replies and that --chat-template matches it."
        )
    ordered = np.sort(counts[np.asarray(old_kept, dtype=np.int64)])[::-1]
    prefix = np.zeros(counts.size + 1, dtype=np.int64)
    prefix[1 : ordered.size + 1] = np.cumsum(ordered)
    prefix[ordered.size + 1 :] = prefix[ordered.size]
    return prefix / total


def choose_kept_ids(counts: np.ndarray, old_kept: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequent of the ``old_kept`` ids (ties to the smaller id; unseen ones fill up), ascending."""
    old_kept = np.asarray(old_kept, dtype=np.int64)
    if not 1 <= k <= old_kept.size:
        raise InputError(must("the new draft_vocab_size", f"in [1, {old_kept.size}] (the checkpoint's)", k))
    rows = kept_token_ids(np.asarray(counts, dtype=np.int64)[old_kept], k)
    return old_kept[rows]


# =========================================================================== checkpoint reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # basename of the weight file holding it
    dtype: str  # safetensors spelling ("BF16", "I64", "BOOL", ...)
    shape: Tuple[int, ...]
    nbytes: int


_TORCH_TO_SAFE = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _TORCH_TO_SAFE[getattr(torch, _name)] = _code


def _safe_dtype(dtype: torch.dtype) -> str:
    return _TORCH_TO_SAFE.get(dtype, str(dtype).replace("torch.", ""))


@dataclasses.dataclass
class DraftCheckpoint:
    """A Hugging Face-style draft checkpoint directory: config.json plus weights (read lazily)."""

    directory: str
    config_path: str
    config_text: str
    config: Dict[str, Any]
    layout: str  # one of LAYOUTS
    files: List[str]  # weight files (basenames), in index order
    index: Optional[Dict[str, Any]]
    tensors: Dict[str, TensorInfo]
    file_metadata: Dict[str, Optional[Dict[str, str]]]
    _bin_cache: Dict[str, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def is_safetensors(self) -> bool:
        return self.layout in (SAFE_SINGLE, SAFE_INDEX)

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def path(self, file: str) -> str:
        return os.path.join(self.directory, file)

    def read_file(self, file: str) -> "OrderedDict[str, torch.Tensor]":
        """Every tensor of one weight file, in stored order."""
        if self.is_safetensors:
            out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
            with safe_open(self.path(file), framework="pt") as handle:
                for name in handle.keys():
                    out[name] = handle.get_tensor(name)
            return out
        if file in self._bin_cache:
            return OrderedDict(self._bin_cache[file])
        return _load_bin(self.path(file))

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name."""
        info = self.tensors[name]
        if self.is_safetensors:
            with safe_open(self.path(info.file), framework="pt") as handle:
                return handle.get_tensor(name)
        if info.file not in self._bin_cache:
            self._bin_cache[info.file] = _load_bin(self.path(info.file))
        return self._bin_cache[info.file][name]


def _load_bin(path: str) -> "OrderedDict[str, torch.Tensor]":
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(
            f"Cannot read {path} with torch.load(weights_only=True): {type(exc).__name__}: {first}. It must be a "
            "plain state dict of tensors (as save_pretrained writes); re-save the draft with safetensors."
        ) from None
    if not isinstance(data, Mapping):
        raise InputError(
            f"{path} must hold a state dict (name -> tensor), but holds a {type(data).__name__}. Re-save the draft "
            "with model.save_pretrained()."
        )
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path}: entry {str(name)!r} must be a tensor, but is a {type(value).__name__}. The file is not a "
                "plain state dict; re-save the draft with model.save_pretrained()."
            )
        out[str(name)] = value
    return out


def _read_json(path: str, what: str) -> Tuple[str, Any]:
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as exc:
        raise InputError(f"Cannot read {what} {path}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} must be UTF-8 text, but byte {exc.start} is not valid UTF-8.") from None
    try:
        return text, json.loads(text[1:] if text.startswith("\ufeff") else text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}, line {exc.lineno}, column {exc.colno}: {what} is not valid JSON ({exc.msg}). Fix the syntax there."
        ) from None


def _index_files(index_path: str, index: Any) -> Tuple[Dict[str, str], List[str]]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{index_path}: field 'weight_map' must be a non-empty object mapping tensor names to shard files, but "
            f"got {short(weight_map)}. Re-save the draft with save_pretrained()."
        )
    files: List[str] = []
    for file in weight_map.values():
        if os.path.basename(file) != file:
            raise InputError(
                f"{index_path}, field 'weight_map': shard {file!r} must be a file name in the checkpoint directory, "
                "not a path. Fix the index."
            )
        if file not in files:
            files.append(file)
    return weight_map, files


def read_checkpoint(directory: str, *, flag: str = "--checkpoint") -> DraftCheckpoint:
    """Read a draft checkpoint directory's config and weight headers (tensors are loaded on demand)."""
    if not os.path.isdir(directory):
        raise InputError(
            f"{flag} {directory} must be a draft checkpoint directory (config.json plus model.safetensors or "
            "pytorch_model.bin), but it does not exist or is not a directory."
        )
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise InputError(
            f"{flag} {directory} has no config.json. A draft checkpoint directory holds config.json (the draft "
            "config, with vocab_size and draft_vocab_size) next to its weights; add it."
        )
    config = read_draft_config(config_path)
    config_text, _ = _read_json(config_path, "the draft config")

    present = [name for name in LAYOUTS if os.path.isfile(os.path.join(directory, name))]
    if not present:
        listing = sorted(os.listdir(directory))
        raise InputError(
            f"{flag} {directory} holds no {', '.join(LAYOUTS)}; found {short(listing, 200)}. Point {flag} at the "
            "directory save_pretrained() wrote."
        )
    layout = present[0]
    if len(present) > 1:
        logger.warning("%s holds %s; reading %s as transformers does.", directory, " and ".join(present), layout)

    index = None
    if layout in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(directory, layout)
        _, index = _read_json(index_path, "the weight index")
        weight_map, files = _index_files(index_path, index)
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise InputError(
                f"{index_path} names shard {missing[0]!r}, which is missing from {directory}. Copy every shard of the "
                "checkpoint into the directory."
            )
    else:
        weight_map, files = None, [layout]

    tensors: Dict[str, TensorInfo] = {}
    metadata: Dict[str, Optional[Dict[str, str]]] = {}
    cache: Dict[str, Dict[str, torch.Tensor]] = {}
    for file in files:
        path = os.path.join(directory, file)
        if layout in (SAFE_SINGLE, SAFE_INDEX):
            found, metadata[file] = _safetensors_infos(path, file)
        else:
            data = _load_bin(path)
            cache[file] = data
            metadata[file] = None
            found = [
                TensorInfo(n, file, _safe_dtype(t.dtype), tuple(t.shape), t.numel() * t.element_size())
                for n, t in data.items()
            ]
        for info in found:
            if info.name in tensors:
                raise InputError(
                    f"{flag} {directory}: tensor {info.name!r} is stored in both {tensors[info.name].file} and {file}. "
                    "Each tensor must live in one shard; re-save the checkpoint."
                )
            if weight_map is not None and weight_map.get(info.name) != file:
                raise InputError(
                    f"{os.path.join(directory, layout)}: tensor {info.name!r} is stored in {file} but the index says "
                    f"{weight_map.get(info.name)!r}. The index and the shards disagree; re-save the checkpoint."
                )
            tensors[info.name] = info
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise InputError(
                f"{os.path.join(directory, layout)} lists tensor {absent[0]!r} in {weight_map[absent[0]]!r}, but that "
                "shard does not hold it. The index and the shards disagree; re-save the checkpoint."
            )
    return DraftCheckpoint(directory, config_path, config_text, config, layout, files, index, tensors, metadata, cache)


def _safetensors_infos(path: str, file: str) -> Tuple[List[TensorInfo], Optional[Dict[str, str]]]:
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
            infos = []
            for name in handle.keys():
                piece = handle.get_slice(name)
                shape = tuple(int(d) for d in piece.get_shape())
                dtype = piece.get_dtype()
                size = _SAFE_DTYPE_SIZES.get(dtype)
                nbytes = math.prod(shape) * size if size is not None else 0
                infos.append(TensorInfo(name, file, dtype, shape, nbytes))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}). Re-download or re-save the draft.") from None
    return infos, (dict(meta) if meta is not None else None)


# =========================================================================== draft vocabulary of a checkpoint


@dataclasses.dataclass
class DraftVocabulary:
    """What a checkpoint's LM head keeps, checked against its config (contract section 1)."""

    checkpoint: DraftCheckpoint
    arch: DraftArchitecture
    names: HeadNames
    vocab_size: int
    draft_vocab_size: int
    d2t: torch.Tensor
    t2d: torch.Tensor
    mapping_source: str

    @property
    def kept_ids(self) -> np.ndarray:
        return kept_ids_from_d2t(self.d2t)


def _check_shapes(ckpt: DraftCheckpoint, names: HeadNames, arch: DraftArchitecture, config_k: int, has_key: bool) -> None:
    where = f"{ckpt.directory}"
    if names.weight is None:
        raise InputError(
            f"{where}: no lm_head.weight tensor found, so the draft's LM-head rows cannot be trimmed (a draft that "
            "borrows the target's head has nothing to slice). Pass a checkpoint saved with its own lm_head."
        )
    shape = ckpt.tensors[names.weight].shape
    said = (
        f"config.json says draft_vocab_size = {config_k}" if has_key
        else f"config.json has no draft_vocab_size, so vLLM and SGLang take vocab_size = {config_k}"
    )
    if len(shape) != 2 or shape[0] != config_k:
        raise InputError(
            f"{where}: {said}, but {names.weight} has shape {list(shape)}; its rows must equal draft_vocab_size. "
            "The config and the weights belong to different drafts: use the config.json saved with these weights."
        )
    if shape[1] != arch.hidden_size:
        raise InputError(
            f"{where}: config.json says hidden_size = {arch.hidden_size}, but {names.weight} has {shape[1]} columns; "
            "they must match. Use the config.json saved with these weights."
        )
    if names.bias is not None and ckpt.tensors[names.bias].shape != (config_k,):
        raise InputError(
            f"{where}: {names.bias} has shape {list(ckpt.tensors[names.bias].shape)} but must be [{config_k}] "
            f"(one entry per LM-head row). The checkpoint is inconsistent; re-save it."
        )


def _check_mapping_shapes(d2t: torch.Tensor, t2d: Optional[torch.Tensor], rows: int, vocab_size: int, source: str) -> None:
    if d2t.dim() != 1 or d2t.shape[0] != rows:
        raise InputError(
            f"{source}: d2t has shape {list(d2t.shape)} but the LM head has {rows} rows; d2t must have one entry per "
            f"row ([{rows}]). The mapping belongs to another draft: use the mapping the draft was trained with."
        )
    if t2d is not None and (t2d.dim() != 1 or t2d.shape[0] != vocab_size):
        raise InputError(
            f"{source}: t2d has shape {list(t2d.shape)} but config.json says vocab_size = {vocab_size}; t2d must be "
            f"[{vocab_size}]. The mapping belongs to another target model."
        )


def draft_vocabulary(ckpt: DraftCheckpoint, *, vocab_mapping: Optional[str] = None) -> DraftVocabulary:
    """The checkpoint's kept ids, from its own d2t/t2d, from ``vocab_mapping`` or (k == V) the identity.

    Refuses a checkpoint whose config, LM head and mapping disagree, and one with
    k < V and no mapping (its rows cannot be identified).
    """
    arch = DraftArchitecture.from_config(ckpt.config, source=ckpt.config_path)
    vocab_size = arch.vocab_size
    has_key = ckpt.config.get("draft_vocab_size") is not None
    config_k = int(ckpt.config["draft_vocab_size"]) if has_key else vocab_size
    names = find_head_names(ckpt.shapes, source=ckpt.directory)
    _check_shapes(ckpt, names, arch, config_k, has_key)
    rows = config_k

    own_d2t = ckpt.get(names.d2t) if names.d2t else None
    own_t2d = ckpt.get(names.t2d) if names.t2d else None
    own_source = f"{ckpt.directory} (tensors {names.d2t or '-'}, {names.t2d or '-'})"
    own_error: Optional[InputError] = None
    if own_d2t is not None:
        try:
            _check_mapping_shapes(own_d2t, own_t2d, rows, vocab_size, own_source)
            if own_t2d is None:
                kept = kept_ids_from_d2t(own_d2t) if not own_d2t.dtype.is_floating_point else None
                if kept is not None and kept.size and kept.min() >= 0 and kept.max() < vocab_size:
                    own_t2d = torch.zeros(vocab_size, dtype=torch.bool)
                    own_t2d[torch.from_numpy(kept)] = True
                    logger.info("%s has d2t but no t2d; t2d is rebuilt from d2t.", ckpt.directory)
                else:
                    own_t2d = torch.zeros(vocab_size, dtype=torch.bool)
            check_mapping(own_d2t, own_t2d, draft_vocab_size=rows, vocab_size=vocab_size, source=own_source)
        except InputError as exc:
            own_error = exc
    elif own_t2d is not None:
        own_error = InputError(
            f"{own_source}: the checkpoint has t2d but no d2t; vLLM and SGLang read d2t, and t2d alone does not say "
            "which row holds which id. Pass --vocab-mapping with the mapping the draft was trained with."
        )

    if vocab_mapping is not None:
        d2t, t2d = load_mapping(vocab_mapping)
        _check_mapping_shapes(d2t, t2d, rows, vocab_size, f"--vocab-mapping {vocab_mapping}")
        check_mapping(d2t, t2d, draft_vocab_size=rows, vocab_size=vocab_size, source=f"--vocab-mapping {vocab_mapping}")
        if own_d2t is not None and own_error is None:
            if not torch.equal(own_d2t, d2t):
                differ = np.flatnonzero(kept_ids_from_d2t(own_d2t) != kept_ids_from_d2t(d2t))
                row = int(differ[0])
                raise InputError(
                    f"--vocab-mapping {vocab_mapping} disagrees with the d2t stored in {ckpt.directory}: draft row {row} "
                    f"maps to target id {int(kept_ids_from_d2t(d2t)[row])} in the file but to "
                    f"{int(kept_ids_from_d2t(own_d2t)[row])} in the checkpoint ({differ.size} rows differ). Serving "
                    "engines use the checkpoint's d2t; drop --vocab-mapping, or pass the checkpoint the mapping was "
                    "made for."
                )
        elif own_error is not None:
            logger.warning(
                "The checkpoint's own d2t/t2d are invalid (%s); using --vocab-mapping %s instead.", own_error, vocab_mapping
            )
        return DraftVocabulary(ckpt, arch, names, vocab_size, rows, d2t, t2d, f"--vocab-mapping {vocab_mapping}")

    if own_error is not None:
        raise own_error
    if own_d2t is not None:
        if rows < vocab_size and not bool(torch.any(own_d2t != 0)):
            logger.warning(
                "%s: d2t is all zeros, so the draft keeps target ids 0..%d. That is what an untouched buffer holds; "
                "if the draft was trained with another mapping, pass it with --vocab-mapping.", ckpt.directory, rows - 1,
            )
        return DraftVocabulary(ckpt, arch, names, vocab_size, rows, own_d2t, own_t2d, "checkpoint d2t/t2d")
    if rows < vocab_size:
        raise InputError(
            f"{ckpt.directory}: draft_vocab_size is {rows} but vocab_size is {vocab_size}, and the checkpoint holds no "
            "d2t/t2d, so which target id each LM-head row stands for is unknown. Pass --vocab-mapping with the "
            "vocab_mapping .pt the draft was trained with (SpecForge's cache/vocab_mapping/<hash>.pt)."
        )
    d2t, t2d = build_mapping(np.arange(vocab_size, dtype=np.int64), vocab_size)
    logger.info("%s has no d2t/t2d and draft_vocab_size == vocab_size; the identity mapping is implied.", ckpt.directory)
    return DraftVocabulary(ckpt, arch, names, vocab_size, rows, d2t, t2d, "identity (draft_vocab_size == vocab_size)")


# =========================================================================== settings and result


@dataclasses.dataclass
class TrimSettings:
    """What to trim and how; one field per `specforge-vocab trim` flag.

    Counts come from ``count`` (count a dataset) or ``counts_path`` (a counts file
    from `specforge-vocab count`), or are passed to :func:`trim_checkpoint`.
    """

    checkpoint: str = ""
    output: str = ""
    vocab_mapping: Optional[str] = None
    draft_vocab_size: Optional[int] = None
    count: Optional[CountSettings] = None
    counts_path: Optional[str] = None
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)
    overwrite: bool = False

    def problems(self, *, counts_given: bool = False) -> List[str]:
        out: List[str] = []
        if not self.checkpoint:
            out.append("--checkpoint must name the trained draft's directory, but got nothing.")
        if not self.output:
            out.append("--output must name the directory to write the trimmed draft to, but got nothing.")
        if self.checkpoint and self.output and os.path.realpath(self.checkpoint) == os.path.realpath(self.output):
            out.append(must("--output", "a directory other than --checkpoint (the input is never overwritten)", self.output))
        sources = [s for s, on in (("--counts", self.counts_path), ("--dataset-path", self.count)) if on]
        if not counts_given:
            if not sources:
                out.append(
                    "Token counts are needed to choose which rows to keep: pass --dataset-path (with --tokenizer-path) "
                    "or --counts FILE from `specforge-vocab count`."
                )
            elif len(sources) > 1:
                out.append("Pass either --counts or --dataset-path, not both.")
        if self.draft_vocab_size is not None and (
            isinstance(self.draft_vocab_size, bool) or not isinstance(self.draft_vocab_size, int) or self.draft_vocab_size < 1
        ):
            out.append(must("--draft-vocab-size", "a positive integer", self.draft_vocab_size))
        search_k = getattr(self.search, "draft_vocab_size", None)
        if search_k is not None and self.draft_vocab_size is not None and search_k != self.draft_vocab_size:
            out.append(
                f"--draft-vocab-size is {self.draft_vocab_size} but the search settings fix {search_k}; set one of them."
            )
        out.extend(self.search.problems())
        if self.count is not None and not counts_given and not self.counts_path:
            out.extend(self.count.problems())
        return out

    def validate(self, *, counts_given: bool = False) -> None:
        found = self.problems(counts_given=counts_given)
        if found:
            raise SettingsError(found)


@dataclasses.dataclass
class TrimResult:
    """What was trimmed: sizes, coverage and per-token draft FLOPs before and after."""

    checkpoint: str
    output: str
    vocab_size: int
    old_draft_vocab_size: int
    new_draft_vocab_size: int
    tokens_counted: int
    old_coverage: float
    new_coverage: float
    old_flops: int
    new_flops: int
    full_vocab_flops: int
    mapping_source: str
    kept_token_ids: np.ndarray
    sliced_tensors: List[str]
    added_tensors: List[str]
    unsliced_draft_sized: List[str]
    files_written: List[str]
    files_not_copied: List[str]
    method: str  # "fixed", "tpe" or "exact"
    search: Optional[SearchResult] = None

    @property
    def flops_reduction(self) -> float:
        """Share of the old draft's per-token FLOPs saved: 1 - F(k') / F(k)."""
        return 1.0 - self.new_flops / self.old_flops

    def as_dict(self) -> Dict[str, Any]:
        return {
            "checkpoint": os.path.abspath(self.checkpoint),
            "output": os.path.abspath(self.output),
            "vocab_size": self.vocab_size,
            "old_draft_vocab_size": self.old_draft_vocab_size,
            "new_draft_vocab_size": self.new_draft_vocab_size,
            "method": self.method,
            "tokens_counted": self.tokens_counted,
            "old_coverage": self.old_coverage,
            "new_coverage": self.new_coverage,
            "old_draft_flops_per_token": self.old_flops,
            "new_draft_flops_per_token": self.new_flops,
            "flops_reduction": self.flops_reduction,
            "mapping_source": self.mapping_source,
            "sliced_tensors": self.sliced_tensors,
            "added_tensors": self.added_tensors,
            "unsliced_draft_sized": self.unsliced_draft_sized,
            "files_written": self.files_written,
            "files_not_copied": self.files_not_copied,
        }

    def summary_lines(self) -> List[str]:
        lines = [
            f"trimmed {self.checkpoint} -> {self.output} (mapping: {self.mapping_source}; k chosen by: {self.method})",
            f"draft_vocab_size: {self.old_draft_vocab_size:,} -> {self.new_draft_vocab_size:,} of V={self.vocab_size:,}",
            f"coverage of {self.tokens_counted:,} counted tokens: {self.old_coverage:.4%} -> {self.new_coverage:.4%}",
            f"draft FLOPs per token: {self.old_flops:,} -> {self.new_flops:,} ({self.flops_reduction:.2%} fewer)",
            f"sliced: {', '.join(self.sliced_tensors)}; rebuilt: d2t, t2d"
            + (f" (added: {', '.join(self.added_tensors)})" if self.added_tensors else ""),
        ]
        if self.unsliced_draft_sized:
            lines.append(
                f"left unchanged although a dimension equals {self.old_draft_vocab_size}: "
                + ", ".join(self.unsliced_draft_sized)
            )
        if self.files_not_copied:
            lines.append("not copied (weights or training state): " + ", ".join(self.files_not_copied))
        return lines


# =========================================================================== orchestration


def _resolve_counts(settings: TrimSettings, counts: Optional[np.ndarray], vocab: DraftVocabulary) -> np.ndarray:
    if counts is None and settings.counts_path:
        counts, _ = load_counts(settings.counts_path)
    elif counts is None:
        count_settings = settings.count
        if count_settings.target_vocab_size is None:
            count_settings = dataclasses.replace(count_settings, target_vocab_size=vocab.vocab_size)
        counts = count_dataset(count_settings).counts
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise InputError(f"Token counts must be a 1-D integer array, but got {counts.dtype} {list(counts.shape)}.")
    check_vocab_size(vocab.checkpoint.config, source=vocab.checkpoint.config_path, counts_length=int(counts.shape[0]))
    return counts.astype(np.int64, copy=False)


def _choose_k(settings: TrimSettings, curve: np.ndarray, vocab: DraftVocabulary) -> SearchResult:
    """The new draft_vocab_size via the optimize search, capped at the checkpoint's k."""
    old_k = vocab.draft_vocab_size
    fixed = settings.draft_vocab_size if settings.draft_vocab_size is not None else settings.search.draft_vocab_size
    if fixed is not None:
        if fixed > old_k:
            raise InputError(
                f"--draft-vocab-size must be at most the checkpoint's draft_vocab_size ({old_k}), but got {fixed}. "
                "Trimming keeps a subset of the trained LM-head rows; a token without a row cannot be added without "
                "retraining."
            )
        search_settings = dataclasses.replace(settings.search, draft_vocab_size=int(fixed))
    else:
        if settings.search.min_vocab_size > old_k:
            raise InputError(
                f"--min-vocab-size must be at most the checkpoint's draft_vocab_size ({old_k}), but got "
                f"{settings.search.min_vocab_size}. Trimming can only shrink the draft vocabulary; lower "
                "--min-vocab-size."
            )
        best = float(curve[old_k])
        if settings.search.min_coverage > best:
            raise InputError(
                f"--min-coverage must be reachable with the checkpoint's {old_k} kept tokens, but got "
                f"{settings.search.min_coverage!r}: they cover only {best:.6f} of the counted tokens (the rest have no "
                "trained LM-head row). Lower --min-coverage, or retrain the draft with a larger vocabulary."
            )
        search_settings = dataclasses.replace(
            settings.search, draft_vocab_size=None, max_vocab_size=min(settings.search.max_vocab_size, old_k)
        )
    return search(curve, vocab.arch, search_settings)


def _output_file_name(ckpt: DraftCheckpoint, file: str) -> str:
    if ckpt.is_safetensors:
        return file
    if file == BIN_SINGLE:
        return SAFE_SINGLE
    stem = file[: -len(".bin")] if file.endswith(".bin") else file
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _prepare_output(settings: TrimSettings, planned: Sequence[str]) -> None:
    out = settings.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--output {out} must be a directory, but it is a file. Choose another path.")
    if not os.path.isdir(out):
        return
    entries = [e for e in os.listdir(out) if not e.startswith(".")]
    if entries and not settings.overwrite:
        raise InputError(
            f"--output {out} already exists and is not empty ({short(sorted(entries), 120)}). Choose a new directory, "
            "or pass --overwrite to replace the files trim writes."
        )
    stale = [e for e in entries if e.endswith(WEIGHT_SUFFIXES) and e not in planned]
    if stale:
        raise InputError(
            f"--output {out} holds weight files trim would not replace ({', '.join(sorted(stale))}); a loader could "
            "mix them with the new ones. Remove them or choose a new directory."
        )


def _shard_writer(ckpt: DraftCheckpoint, file: str, vocab: DraftVocabulary, rows: np.ndarray,
                  d2t: torch.Tensor, t2d: torch.Tensor, extra: Dict[str, torch.Tensor]):
    """A payload for fileio: loads one input file, trims it, writes it as safetensors."""
    def write(handle) -> None:
        tensors = ckpt.read_file(file)
        out: Dict[str, torch.Tensor] = OrderedDict()
        for name, tensor in tensors.items():
            if name in vocab.names.sliced:
                tensor = slice_rows(tensor, rows)
            elif name == vocab.names.d2t:
                tensor = d2t
            elif name == vocab.names.t2d:
                tensor = t2d
            out[name] = tensor
        out.update(extra)
        metadata = ckpt.file_metadata.get(file)
        if metadata is None:
            metadata = {"format": "pt"}  # transformers refuses safetensors files without it
        write_safetensors(handle, out, metadata=metadata)
    return write


def write_safetensors(handle, tensors: Mapping[str, torch.Tensor], *, metadata: Optional[Dict[str, str]] = None) -> None:
    """Stream ``tensors`` to an open binary file in the safetensors format, without building it in memory.

    Layout as the safetensors writer does it: an 8-byte little-endian header length, a JSON
    header padded with spaces to a multiple of 8, then the tensors' bytes, largest element
    size first (so every tensor starts aligned), then by name.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _TORCH_TO_SAFE:
            raise InputError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _TORCH_TO_SAFE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    handle.write(len(text).to_bytes(8, "little"))
    handle.write(text)
    for name in order:
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.numel():
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def trim_checkpoint(settings: TrimSettings, *, counts: Optional[np.ndarray] = None) -> TrimResult:
    """Trim ``settings.checkpoint`` into ``settings.output``; see the module docstring.

    ``counts`` (int64 [V]) overrides the counts source in ``settings``.
    """
    settings.validate(counts_given=counts is not None)
    ckpt = read_checkpoint(settings.checkpoint)
    vocab = draft_vocabulary(ckpt, vocab_mapping=settings.vocab_mapping)
    out_names = {file: _output_file_name(ckpt, file) for file in ckpt.files}
    copied, not_copied = _side_files(ckpt)
    planned = list(out_names.values()) + ([SAFE_INDEX] if ckpt.index is not None else []) + copied + [CONFIG_NAME]
    _prepare_output(settings, planned)  # before counting, which can take a while

    counts = _resolve_counts(settings, counts, vocab)
    old_kept = vocab.kept_ids
    old_k = vocab.draft_vocab_size
    curve = restricted_coverage_curve(counts, old_kept)
    result = _choose_k(settings, curve, vocab)
    new_k = int(result.k)
    new_kept = choose_kept_ids(counts, old_kept, new_k)
    rows = _row_indices(old_kept, new_kept)
    d2t, t2d = build_mapping(new_kept, vocab.vocab_size)
    check_mapping(d2t, t2d, draft_vocab_size=new_k, vocab_size=vocab.vocab_size, source=f"--output {settings.output}")

    # The rebuilt d2t/t2d keep their names and shards; missing ones are added next to lm_head.weight.
    head_file = ckpt.tensors[vocab.names.weight].file
    added: Dict[str, torch.Tensor] = OrderedDict()
    if vocab.names.d2t is None:
        added[D2T] = d2t
    if vocab.names.t2d is None:
        added[T2D] = t2d

    payloads: Dict[str, Any] = OrderedDict()
    for file in ckpt.files:
        extra = added if file == head_file else {}
        payloads[os.path.join(settings.output, out_names[file])] = _shard_writer(ckpt, file, vocab, rows, d2t, t2d, extra)
    if ckpt.index is not None:
        payloads[os.path.join(settings.output, SAFE_INDEX)] = json_text(
            _new_index(ckpt, vocab, out_names, head_file, added, new_k)
        )
    for entry in copied:
        payloads[os.path.join(settings.output, entry)] = _copier(ckpt.path(entry))
    payloads[os.path.join(settings.output, CONFIG_NAME)] = patched_text(ckpt.config_text, new_k, path=ckpt.config_path)

    _prepare_output(settings, planned)  # again: the directory may have changed while counting
    with file_lock(os.path.abspath(settings.output)):
        atomic_write_many(payloads)
    logger.info("Wrote the trimmed draft (%d -> %d rows) to %s.", old_k, new_k, settings.output)

    unsliced = other_draft_sized(ckpt.shapes, vocab.names, old_k)
    if unsliced and old_k != vocab.vocab_size:
        logger.warning(
            "Left unchanged although a dimension equals the old draft_vocab_size %d: %s. If any of them belongs to "
            "the LM head, the trimmed draft is wrong.", old_k, ", ".join(unsliced),
        )
    total = int(counts.sum())
    return TrimResult(
        checkpoint=settings.checkpoint,
        output=settings.output,
        vocab_size=vocab.vocab_size,
        old_draft_vocab_size=old_k,
        new_draft_vocab_size=new_k,
        tokens_counted=total,
        old_coverage=float(counts[old_kept].sum() / total),
        new_coverage=float(counts[new_kept].sum() / total),
        old_flops=int(draft_flops(vocab.arch, old_k)),
        new_flops=int(draft_flops(vocab.arch, new_k)),
        full_vocab_flops=int(draft_flops(vocab.arch, vocab.vocab_size)),
        mapping_source=vocab.mapping_source,
        kept_token_ids=new_kept,
        sliced_tensors=list(vocab.names.sliced),
        added_tensors=list(added),
        unsliced_draft_sized=unsliced,
        files_written=planned,
        files_not_copied=not_copied,
        method=result.method,
        search=result,
    )


def _new_index(ckpt: DraftCheckpoint, vocab: DraftVocabulary, out_names: Dict[str, str], head_file: str,
               added: Dict[str, torch.Tensor], new_k: int) -> Dict[str, Any]:
    """The input index with shard names mapped, added tensors listed and total_size recomputed."""
    index = json.loads(json.dumps(ckpt.index))  # deep copy, key order kept
    weight_map = OrderedDict((name, out_names[file]) for name, file in index["weight_map"].items())
    for name in added:
        weight_map[name] = out_names[head_file]
    total = 0
    for name, info in ckpt.tensors.items():
        if name in vocab.names.sliced:
            total += info.nbytes // info.shape[0] * new_k
        elif name == vocab.names.d2t:
            total += 8 * new_k
        else:
            total += info.nbytes
    total += sum(t.numel() * t.element_size() for t in added.values())
    index["weight_map"] = dict(weight_map)
    metadata = index.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    metadata["total_size"] = total
    index["metadata"] = metadata
    return index


def _side_files(ckpt: DraftCheckpoint) -> Tuple[List[str], List[str]]:
    """Other files of the checkpoint directory: (copied as they are, left out as weights/training state)."""
    copied, left_out = [], []
    for entry in sorted(os.listdir(ckpt.directory)):
        if entry in ckpt.files or entry in LAYOUTS or entry == CONFIG_NAME or entry.startswith("."):
            continue
        if not os.path.isfile(ckpt.path(entry)):
            continue
        (left_out if entry.endswith(WEIGHT_SUFFIXES) else copied).append(entry)
    return copied, left_out


def _copier(src: str):
    def write(handle) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)
    return write


# =========================================================================== checking an output


def verify_checkpoint(directory: str, *, flag: str = "--checkpoint") -> DraftVocabulary:
    """Read a draft checkpoint back and check that config, LM head and its own d2t/t2d agree
    (section 1 rules); a draft with k < V must hold d2t."""
    return draft_vocabulary(read_checkpoint(directory, flag=flag))


# =========================================================================== CLI


def add_trim_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `specforge-vocab trim` flags, in groups: the checkpoint, then counting's and the
    search's own flags (as `optimize` has them; --draft-vocab-size among the latter)."""
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="trained draft directory: config.json plus model.safetensors (sharded or not) or "
                           "pytorch_model.bin")
    ckpt.add_argument("--vocab-mapping", metavar="FILE", default=None,
                      help="d2t/t2d the draft was trained with (.pt or .safetensors); needed when the checkpoint holds "
                           "none and draft_vocab_size < vocab_size")
    ckpt.add_argument("--counts", dest="counts_path", default=None, metavar="FILE",
                      help="token counts from `specforge-vocab count`, instead of --dataset-path")
    ckpt.add_argument("--output", required=True, metavar="DIR",
                      help="directory for the trimmed draft (safetensors, index if sharded, config.json)")
    ckpt.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output directory")
    CountSettings.add_arguments(parser, datasets_required=False, shard=False)
    SearchSettings.add_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> TrimSettings:
    count = CountSettings.from_args(args) if args.dataset_path else None
    search_settings = SearchSettings.from_args(args)
    return TrimSettings(
        checkpoint=args.checkpoint, output=args.output, vocab_mapping=args.vocab_mapping,
        draft_vocab_size=search_settings.draft_vocab_size, count=count, counts_path=args.counts_path,
        search=search_settings, overwrite=args.overwrite,
    )


def run_trim(args: argparse.Namespace, *, out: Optional[TextIO] = None) -> int:
    """`specforge-vocab trim`: trim, then print the summary (errors propagate as InputError)."""
    result = trim_checkpoint(settings_from_args(args))
    stream = out if out is not None else sys.stdout
    for line in result.summary_lines():
        stream.write(line + "\n")
    return 0


__all__ = [
    "DraftCheckpoint",
    "DraftVocabulary",
    "HeadNames",
    "TrimResult",
    "TrimSettings",
    "add_trim_arguments",
    "choose_kept_ids",
    "draft_vocabulary",
    "find_head_names",
    "read_checkpoint",
    "restricted_coverage_curve",
    "run_trim",
    "settings_from_args",
    "slice_rows",
    "trim_checkpoint",
    "trim_tensors",
    "verify_checkpoint",
    "write_safetensors",
]
