"""The target model's own files, read as SpecForge reads them: its config and rows of its LM head.

Self-contained (json, numpy, safetensors, torch only), so any wing that needs the target's
shapes or its LM head can use it:

- :func:`read_target_config` / :func:`target_text_config`: ``config.json`` of a local target
  directory; a multimodal target's ``text_config`` holds the language model's fields
  (docs/SPECFORGE.md section 2);
- :func:`target_vocab_size`, :func:`target_hidden_size`: V (``padded_vocab_size`` or
  ``vocab_size``) and the hidden size, as SpecForge's ``target_vocab_size`` reads them;
- :func:`read_lm_head_rows`: some rows of the target's LM head, found like SpecForge's
  ``TargetHead`` (``*.index.json`` -> ``weight_map[lm_head_key]``; also a single
  ``model.safetensors`` or ``pytorch_model.bin``; the embedding of a tied target), read row by
  row from the file without loading the whole matrix.

Example::

    >>> rows = read_lm_head_rows("/models/Llama-3.1-8B-Instruct", [128009, 13])  # doctest: +SKIP
    >>> rows.shape, rows.dtype                                                   # doctest: +SKIP
    (torch.Size([2, 4096]), torch.bfloat16)
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.errors import InputError, short

logger = logging.getLogger(__name__)


DEFAULT_LM_HEAD_KEY = "lm_head.weight"


TIED_EMBEDDING_KEY = "model.embed_tokens.weight"


_SAFETENSORS_TORCH_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def read_target_config(target_path: str, *, flag: str = "--target-model-path") -> Dict[str, Any]:
    """The target's ``config.json`` (a local directory, or the file itself), parsed."""
    path = os.path.join(target_path, "config.json") if os.path.isdir(target_path) else target_path
    if not os.path.isfile(path):
        raise InputError(
            f"{flag} {target_path} must be a local model directory holding config.json, but {path} does not exist. "
            "Download the target's config.json (huggingface-cli download REPO config.json --local-dir DIR)."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag}: {path} is not a readable JSON config ({exc}). Re-download it.") from None
    if not isinstance(config, dict):
        raise InputError(f"{flag}: {path} must hold a JSON object, but holds {short(config)}.")
    return config


def target_text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The language model's fields: ``text_config`` of a multimodal target, else the config itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def _positive(config: Dict[str, Any], key: str) -> Optional[int]:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def target_vocab_size(config: Dict[str, Any]) -> Optional[int]:
    """V as SpecForge reads it: ``padded_vocab_size`` or ``vocab_size`` of the text config (None if absent)."""
    text = target_text_config(config)
    return _positive(text, "padded_vocab_size") or _positive(text, "vocab_size")


def target_hidden_size(config: Dict[str, Any]) -> Optional[int]:
    """``hidden_size`` of the text config (None if absent)."""
    return _positive(target_text_config(config), "hidden_size")


def _safetensors_rows(path: str, name: str, ids: np.ndarray) -> "torch.Tensor":
    """Rows ``ids`` of tensor ``name`` in a safetensors file, read through a memory map (bytes exact)."""
    import torch

    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    info = header[name]
    dtype = _SAFETENSORS_TORCH_DTYPES.get(info["dtype"])
    shape = [int(d) for d in info["shape"]]
    if dtype is None or len(shape) != 2:
        raise InputError(
            f"{path}: {name} must be a 2-D floating-point matrix, but it is {info['dtype']} {shape}. "
            "The target's LM head cannot be read from it."
        )
    _check_ids(ids, shape[0], f"{path}: {name}")
    torch_dtype = getattr(torch, dtype)
    row_bytes = shape[1] * torch.tensor([], dtype=torch_dtype).element_size()
    begin = int(info["data_offsets"][0])
    matrix = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len + begin, shape=(shape[0], row_bytes))
    return torch.from_numpy(np.array(matrix[ids])).view(torch_dtype).reshape(len(ids), shape[1])


def _check_ids(ids: np.ndarray, rows: int, where: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise InputError(
            f"{where} has {rows} rows, but row {int(ids.max() if ids.max() >= rows else ids.min())} was asked for. "
            "The target's vocabulary is smaller than the draft's vocab_size: use the target the draft was made for."
        )


def _weight_file(target_path: str, key: str) -> Optional[str]:
    """The file holding ``key``: from the single ``*.index.json`` (as TargetHead), else the single-file layouts."""
    indexes = sorted(glob.glob(os.path.join(glob.escape(target_path), "*.index.json")))
    if len(indexes) == 1:
        with open(indexes[0], encoding="utf-8") as handle:
            weight_map = (json.load(handle) or {}).get("weight_map") or {}
        file = weight_map.get(key)
        return os.path.join(target_path, file) if isinstance(file, str) else None
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(target_path, name)
        if os.path.isfile(path):
            return path
    return None


def _holds(path: str, key: str) -> bool:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return key in handle.keys()
    return True  # a .bin file is checked when loaded


def read_lm_head_rows(
    target_path: str, token_ids: Sequence[int], *, lm_head_key: str = DEFAULT_LM_HEAD_KEY
) -> Optional["torch.Tensor"]:
    """Rows ``token_ids`` of the target's LM head ([len(ids), hidden], the file's dtype), or None when the
    target directory holds no weights with that key (not downloaded, say).

    A target with tied embeddings has no ``lm_head.weight``; its embedding is its LM head, so
    ``model.embed_tokens.weight`` is read instead when config.json says ``tie_word_embeddings``.
    """
    import torch

    ids = np.asarray(list(token_ids), dtype=np.int64)
    if not os.path.isdir(target_path):
        return None
    keys = [lm_head_key]
    config_path = os.path.join(target_path, "config.json")
    if os.path.isfile(config_path):
        config = read_target_config(target_path)
        if target_text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings")):
            keys.append(TIED_EMBEDDING_KEY)
    for key in keys:
        path = _weight_file(target_path, key)
        if path is None or not os.path.isfile(path) or not _holds(path, key):
            continue
        if path.endswith(".safetensors"):
            matrix_rows = _safetensors_rows(path, key, ids)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
                raise InputError(
                    f"Cannot read {path} with torch.load(weights_only=True): {type(exc).__name__}. Convert the "
                    "target's weights to safetensors."
                ) from None
            if key not in state:
                continue
            _check_ids(ids, int(state[key].shape[0]), f"{path}: {key}")
            matrix_rows = state[key][torch.from_numpy(ids)].clone()
        logger.info("Read %d rows of %s from %s.", ids.size, key, path)
        return matrix_rows
    return None
