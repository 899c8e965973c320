"""Deterministic safetensors bytes from numpy arrays (equal inputs, byte-identical files)."""

from __future__ import annotations

import json
import logging
from typing import Dict, Optional

import numpy as np

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """A safetensors file's bytes, deterministically: the same tensors and metadata always give the
    same bytes (``safetensors.numpy.save`` orders the metadata by a per-process hash, so two
    processes writing the same counts would write different files).

    >>> from safetensors.numpy import load
    >>> load(safetensors_bytes({"x": np.arange(3)}, {"b": "1", "a": "2"}))["x"].tolist()
    [0, 1, 2]
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {name!r} must have one of the dtypes {sorted(SAFETENSORS_DTYPES)}, but got {array.dtype}"
            )
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
