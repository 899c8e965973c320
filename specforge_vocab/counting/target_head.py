"""The target model's own files, read as SpecForge reads them: its config and its LM head, never the
whole model.

- :func:`read_target_config`, :func:`target_vocab_size`, :func:`target_hidden_size`: ``config.json``
  of a local target directory (a multimodal target's ``text_config`` holds the language model's
  fields; docs/SPECFORGE.md section 2);
- :func:`load_target_head`: all of W [V, H] in bfloat16, to count the target's argmax;
- :func:`read_lm_head_rows`: some rows of W, read row by row from the file (--remap's new rows).

SpecForge's TargetHead (docs/SPECFORGE.md section 7) reads W from the target directory's one
``*.index.json``: the shard that ``weight_map[lm_head_key]`` names, one tensor, cast to bfloat16.
:func:`load_target_head` reads it the same way, and also accepts a single ``model.safetensors``
without an index. Targets with tied embeddings store no ``lm_head.weight``; for them the head is the
embedding, ``--lm-head-key model.embed_tokens.weight`` (SpecForge: ``model.lm_head_key``).

>>> head = load_target_head("./Llama-3.1-8B-Instruct")  # doctest: +SKIP
>>> head.vocab_size, head.hidden_size, head.weight.dtype  # doctest: +SKIP
(128256, 4096, torch.bfloat16)
>>> read_lm_head_rows("./Llama-3.1-8B-Instruct", [128009, 13]).shape  # doctest: +SKIP
torch.Size([2, 4096])
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch

from specforge_vocab.errors import InputError, short

logger = logging.getLogger(__name__)


DEFAULT_LM_HEAD_KEY = "lm_head.weight"


TIED_EMBEDDING_KEY = "model.embed_tokens.weight"


# The weight files read without an index: SpecForge's TargetHead needs model.safetensors; a draft's new rows
# (--remap) may also come from pytorch_model.bin.
SINGLE_FILES = ("model.safetensors",)


ROW_SOURCE_FILES = ("model.safetensors", "pytorch_model.bin")


_SAFETENSORS_TORCH_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclasses.dataclass
class TargetHead:
    """W [V, H] in bfloat16 (as SpecForge casts it) and where it came from."""

    weight: Any  # torch.Tensor [V, H] bfloat16
    model_dir: str
    key: str
    file: str  # the file W was read from
    stored_dtype: str

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])


def local_model_dir(target: str, *, flag: str = "--target-model-path") -> str:
    """``target`` as a local directory: itself, or its copy in the Hugging Face cache (never downloads)."""
    if os.path.isdir(target):
        return os.path.abspath(target)
    if not os.path.exists(target) and "/" in target and not target.startswith((".", "/")):
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            return snapshot_download(target, local_files_only=True)
    raise InputError(
        f"{flag} {target} must be the target model's local directory (or a Hugging Face id already in the local "
        f"cache), but {'it is a file' if os.path.isfile(target) else 'no such directory or cached model exists'}. "
        "Only the LM head is read; download it with: huggingface-cli download <model> --include '*.json' "
        "'*.safetensors'."
    )


# ---------------------------------------------------------------- the target's config


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


# ---------------------------------------------------------------- where the head is, and reading it


def _index_files(model_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(model_dir, "*.index.json")))


def _keys_like_a_head(names) -> List[str]:
    return sorted(n for n in names if "lm_head" in n or "embed_tokens" in n or n.endswith("wte.weight"))[:6]


def _missing_key_error(key: str, where_: str, names, flag: str) -> InputError:
    hints = _keys_like_a_head(names)
    tied = TIED_EMBEDDING_KEY in names and DEFAULT_LM_HEAD_KEY not in names
    fix = (
        f"This target ties its LM head to the embedding: pass {flag} {TIED_EMBEDDING_KEY} (SpecForge: "
        f"model.lm_head_key: {TIED_EMBEDDING_KEY})."
        if tied
        else f"Pass the head's tensor name with {flag}"
        + (f" (tensors that look like one: {', '.join(hints)})." if hints else ".")
    )
    return InputError(f"{where_} has no tensor {key!r}. {fix}")


def find_lm_head_file(
    model_dir: str, key: str, *, flag: str = "--lm-head-key", single_files: Sequence[str] = SINGLE_FILES
) -> str:
    """The file holding tensor ``key``: from the one ``*.index.json`` (as SpecForge reads it), else the
    first of ``single_files`` present."""
    indexes = _index_files(model_dir)
    if len(indexes) > 1:
        raise InputError(
            f"{model_dir} holds {len(indexes)} *.index.json files ({', '.join(map(os.path.basename, indexes))}); "
            "SpecForge's TargetHead needs exactly one to find the LM head. Remove the stale one."
        )
    if indexes:
        try:
            with open(indexes[0], encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{indexes[0]} is not a readable weight index ({type(exc).__name__}: {short(str(exc), 120)}); it "
                "needs a 'weight_map' object from tensor names to files. Download the model's index again."
            ) from None
        if key not in weight_map:
            raise _missing_key_error(key, f"{indexes[0]} (weight_map)", weight_map, flag)
        path = os.path.join(model_dir, str(weight_map[key]))
        if not os.path.isfile(path):
            raise InputError(
                f"{indexes[0]} puts {key!r} in {weight_map[key]}, but {path} does not exist. Download that shard "
                "(only it is read)."
            )
        return path
    for name in single_files:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise InputError(
        f"{model_dir} has no *.index.json and no model.safetensors, so there is no LM head to read. Point "
        "--target-model-path at the target model's directory (config.json, the weight index and the shard holding "
        "the LM head)."
    )


def head_file_identity(target_model_path: str, lm_head_key: str) -> Dict[str, object]:
    """The file holding the LM head (path, size, mtime) and its key, without reading the tensor."""
    path = find_lm_head_file(local_model_dir(target_model_path), lm_head_key)
    stat = os.stat(path)
    return {"file": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "key": lm_head_key}


def _read_tensor(path: str, key: str, flag: str):
    """One tensor from a safetensors file (only it is read) or a torch checkpoint (weights_only, mmap)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                if key not in handle.keys():
                    raise _missing_key_error(key, path, list(handle.keys()), flag)
                return handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"{path} is not a readable safetensors file ({short(str(exc), 160)}); download it again."
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe pickle
        raise InputError(
            f"{path} cannot be read with torch.load(weights_only=True, mmap=True) ({type(exc).__name__}: "
            f"{short(str(exc), 160)}). Use the model's safetensors files."
        ) from None
    if not isinstance(state, dict) or key not in state:
        raise _missing_key_error(key, path, list(state) if isinstance(state, dict) else [], flag)
    return state[key]


def _config_shape(model_dir: str) -> Tuple[Optional[int], Optional[int]]:
    """(vocab_size, hidden_size) at the top level of config.json, as SpecForge's TargetHead reads them."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        if isinstance(config, dict):
            sizes = tuple(config.get(name) for name in ("vocab_size", "hidden_size"))
            return tuple(v if isinstance(v, int) and not isinstance(v, bool) else None for v in sizes)
    return None, None


def load_target_head(
    target_model_path: str,
    lm_head_key: str = DEFAULT_LM_HEAD_KEY,
    *,
    model_flag: str = "--target-model-path",
    key_flag: str = "--lm-head-key",
) -> TargetHead:
    """W [V, H] of the target, in bfloat16, read from the one file that holds ``lm_head_key``."""
    import torch

    model_dir = local_model_dir(target_model_path, flag=model_flag)
    path = find_lm_head_file(model_dir, lm_head_key, flag=key_flag)
    tensor = _read_tensor(path, lm_head_key, key_flag)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.dtype.is_floating_point:
        described = (
            f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        )
        raise InputError(
            f"{path}: {lm_head_key!r} must be a floating-point matrix [vocab_size, hidden_size], but is {described}. "
            f"Check {key_flag}."
        )
    vocab, hidden = _config_shape(model_dir)
    for name, want, got in (("vocab_size", vocab, tensor.shape[0]), ("hidden_size", hidden, tensor.shape[1])):
        if want is not None and want != got:
            raise InputError(
                f"{path}: {lm_head_key!r} has shape {list(tensor.shape)}, but {model_dir}/config.json says "
                f"{name} {want}. SpecForge's TargetHead copies the head into a [vocab_size, hidden_size] layer and "
                "would fail too; check the key and the model directory."
            )
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(
            f"{path}: {lm_head_key!r} holds NaN or infinite values; the file is damaged. Download it again."
        )
    stored = str(tensor.dtype).replace("torch.", "")
    weight = tensor.to(torch.bfloat16).contiguous()
    if weight.data_ptr() == tensor.data_ptr():
        weight = weight.clone()  # read it now (safetensors may hand out a view of the memory-mapped file)
    logger.info("target LM head %s %s (%s) from %s", lm_head_key, list(weight.shape), stored, path)
    return TargetHead(weight, model_dir, lm_head_key, os.path.abspath(path), stored)


# ---------------------------------------------------------------- some rows of the head


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
        try:
            path = find_lm_head_file(target_path, key, single_files=ROW_SOURCE_FILES)
        except InputError:
            continue  # not there (not downloaded, or tied): the next key, else None
        if not _holds(path, key):
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
