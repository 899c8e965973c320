"""Trained draft checkpoints: read config.json and the weights (``model.safetensors``, sharded
with an index, or ``pytorch_model.bin`` loaded with ``weights_only=True``), find the LM head and the
d2t/t2d mapping, and write safetensors files tensor by tensor.

A draft's LM-head row ``i`` predicts target id ``i + d2t[i]`` (docs/SPECFORGE.md section 1), so
:func:`draft_vocabulary` refuses a checkpoint whose rows cannot be identified: k < V and no mapping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.choosing.cost import DraftArchitecture
from specforge_vocab.errors import InputError, short
from specforge_vocab.writing.draft_config import read_draft_config
from specforge_vocab.writing.mapping import build_mapping, check_mapping, kept_ids_from_d2t, load_mapping

logger = logging.getLogger(__name__)


D2T, T2D = "d2t", "t2d"
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


_SAFE_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


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
        n
        for n, shape in shapes.items()
        if n not in skip and not _is_named(n, "embed_tokens.weight") and draft_vocab_size in tuple(shape)
    ]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # basename of the weight file holding it
    dtype: str  # safetensors spelling ("BF16", "I64", "BOOL", ...)
    shape: Tuple[int, ...]
    nbytes: int


# torch dtype name -> safetensors dtype code.
SAFETENSORS_DTYPE_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def safetensors_dtype(dtype: "torch.dtype") -> Optional[str]:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``), None when it has none."""
    return SAFETENSORS_DTYPE_CODES.get(str(dtype).replace("torch.", ""))


def _safe_dtype(dtype: "torch.dtype") -> str:
    return safetensors_dtype(dtype) or str(dtype).replace("torch.", "")


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
    import torch

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
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
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
        raise InputError(
            f"{path} is not a readable safetensors file ({exc}). Re-download or re-save the draft."
        ) from None
    return infos, (dict(meta) if meta is not None else None)


@dataclasses.dataclass
class DraftVocabulary:
    """What a checkpoint's LM head keeps, checked against its config (docs/SPECFORGE.md section 1)."""

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


def _check_shapes(
    ckpt: DraftCheckpoint, names: HeadNames, arch: DraftArchitecture, config_k: int, has_key: bool
) -> None:
    where = f"{ckpt.directory}"
    if names.weight is None:
        raise InputError(
            f"{where}: no lm_head.weight tensor found, so the draft's LM-head rows cannot be trimmed (a draft that "
            "borrows the target's head has nothing to slice). Pass a checkpoint saved with its own lm_head."
        )
    shape = ckpt.tensors[names.weight].shape
    said = (
        f"config.json says draft_vocab_size = {config_k}"
        if has_key
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


def _check_mapping_shapes(
    d2t: torch.Tensor, t2d: Optional[torch.Tensor], rows: int, vocab_size: int, source: str
) -> None:
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
    import torch

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
                "The checkpoint's own d2t/t2d are invalid (%s); using --vocab-mapping %s instead.",
                own_error,
                vocab_mapping,
            )
        return DraftVocabulary(ckpt, arch, names, vocab_size, rows, d2t, t2d, f"--vocab-mapping {vocab_mapping}")

    if own_error is not None:
        raise own_error
    if own_d2t is not None:
        if rows < vocab_size and not bool(torch.any(own_d2t != 0)):
            logger.warning(
                "%s: d2t is all zeros, so the draft keeps target ids 0..%d. That is what an untouched buffer holds; "
                "if the draft was trained with another mapping, pass it with --vocab-mapping.",
                ckpt.directory,
                rows - 1,
            )
        return DraftVocabulary(ckpt, arch, names, vocab_size, rows, own_d2t, own_t2d, "checkpoint d2t/t2d")
    if rows < vocab_size:
        raise InputError(
            f"{ckpt.directory}: draft_vocab_size is {rows} but vocab_size is {vocab_size}, and the checkpoint holds no "
            "d2t/t2d, so which target id each LM-head row stands for is unknown. Pass --vocab-mapping with the "
            "vocab_mapping .pt the draft was trained with (SpecForge's cache/vocab_mapping/<hash>.pt)."
        )
    d2t, t2d = build_mapping(np.arange(vocab_size, dtype=np.int64), vocab_size)
    logger.info(
        "%s has no d2t/t2d and draft_vocab_size == vocab_size; the identity mapping is implied.", ckpt.directory
    )
    return DraftVocabulary(ckpt, arch, names, vocab_size, rows, d2t, t2d, "identity (draft_vocab_size == vocab_size)")


def write_safetensors(
    handle, tensors: Mapping[str, torch.Tensor], *, metadata: Optional[Dict[str, str]] = None
) -> None:
    """Stream ``tensors`` to an open binary file in the safetensors format, without building it in memory.

    Layout as the safetensors writer does it: an 8-byte little-endian header length, a JSON
    header padded with spaces to a multiple of 8, then the tensors' bytes, largest element
    size first (so every tensor starts aligned), then by name.
    """
    import torch

    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        tensor = tensors[name]
        code = safetensors_dtype(tensor.dtype)
        if code is None:
            raise InputError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    handle.write(len(text).to_bytes(8, "little"))
    handle.write(text)
    for name in order:
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.numel():
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def side_files(ckpt: DraftCheckpoint) -> Tuple[List[str], List[str]]:
    """Other entries of the checkpoint directory: (files copied as they are, entries left out, each
    with why: weights or training state, another weight layout, a folder, a hidden or special file).

    The weights trim reads, their index and config.json are written anew, so they are in neither list.
    """
    copied, left_out = [], []
    written = set(ckpt.files) | {ckpt.layout, CONFIG_NAME}
    for entry in sorted(os.listdir(ckpt.directory)):
        if entry in written:
            continue
        path = ckpt.path(entry)
        if os.path.isdir(path):
            left_out.append(f"{entry}/ (a folder)")
        elif entry in LAYOUTS:
            left_out.append(f"{entry} (another weight layout; {ckpt.layout} was read)")
        elif entry.startswith("."):
            left_out.append(f"{entry} (hidden)")
        elif not os.path.isfile(path):
            left_out.append(f"{entry} (not a regular file)")
        elif entry.endswith(WEIGHT_SUFFIXES):
            left_out.append(f"{entry} (weights or training state)")
        else:
            copied.append(entry)
    return copied, left_out


def copier(src: str):
    def write(handle) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)

    return write


def verify_checkpoint(directory: str, *, flag: str = "--checkpoint") -> DraftVocabulary:
    """Read a draft checkpoint back and check that config, LM head and its own d2t/t2d agree
    (section 1 rules); a draft with k < V must hold d2t."""
    return draft_vocabulary(read_checkpoint(directory, flag=flag))
