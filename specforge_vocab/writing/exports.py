"""The mapping in the files other engines read (``--export FORMAT [FORMAT ...]``).

Pure functions: counts and kept ids in, file bytes out. Each payload is read back the way its
consumer reads it and compared with the mapping before it is returned, so a file that would load
differently is never written (docs/SPECFORGE.md section 8):

- ``sglang-token-map`` -> ``token_map.pt``: ``torch.save`` of a 1-D int64 tensor of the kept target
  ids, most frequent first (ties to the smaller id). SGLang's ``--speculative-token-map`` loads it
  with ``torch.load(weights_only=True)`` then ``torch.tensor(obj, dtype=int64)``; it is used for
  EAGLE (EAGLE-2) and NEXTN drafts only: an EAGLE-3 draft carries its own d2t and SGLang ignores
  a token map for it.
- ``speculators`` -> ``token_freq.pt`` (a plain dict {token id: count} of the seen ids, as vLLM
  speculators saves it), ``d2t.npy`` (int64 [k], offsets) and ``t2d.npy`` (bool [V]), the files its
  training script looks for next to its data.
- ``ids`` -> ``kept_ids.json``: the kept ids ascending, V, k and the mapping fingerprint
  (writing/mapping.py ``mapping_fingerprint``).

Example::

    >>> counts = np.array([5, 0, 9, 5, 1])
    >>> frequency_ranked(counts, np.array([0, 2, 3])).tolist()   # 9, then the tie 5/5 by id
    [2, 0, 3]
    >>> sorted(export_payloads(["ids"], counts=counts, kept=np.array([0, 2, 3]), vocab_size=5)[0])
    ['kept_ids.json']
"""

from __future__ import annotations

import io
import json
import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np

from specforge_vocab.errors import InputError
from specforge_vocab.fileio import json_text
from specforge_vocab.writing.mapping import (
    build_mapping,
    frequency_order,
    kept_ids_from_d2t,
    mapping_fingerprint,
    mapping_payloads,
)

logger = logging.getLogger(__name__)

SGLANG_TOKEN_MAP = "sglang-token-map"
SPECULATORS = "speculators"
IDS = "ids"
EXPORT_FORMATS = (SGLANG_TOKEN_MAP, SPECULATORS, IDS)

TOKEN_MAP_FILE = "token_map.pt"
TOKEN_FREQ_FILE = "token_freq.pt"
D2T_NPY_FILE = "d2t.npy"
T2D_NPY_FILE = "t2d.npy"
KEPT_IDS_FILE = "kept_ids.json"

#: the files of each format, in writing order
EXPORT_FILES: Dict[str, Tuple[str, ...]] = {
    SGLANG_TOKEN_MAP: (TOKEN_MAP_FILE,),
    SPECULATORS: (TOKEN_FREQ_FILE, D2T_NPY_FILE, T2D_NPY_FILE),
    IDS: (KEPT_IDS_FILE,),
}
ALL_EXPORT_FILES = tuple(name for names in EXPORT_FILES.values() for name in names)

KEPT_IDS_FORMAT = "specforge-vocab-kept-ids"

MAPPING_PT_FILE = "vocab_mapping.pt"  # SpecForge's format (writing/outputs.py lists it among the outputs)
MAPPING_SAFETENSORS_FILE = "vocab_mapping.safetensors"


def export_problems(
    formats: Sequence[str], *, flag: str = "--export", allowed: Sequence[str] = EXPORT_FORMATS
) -> List[str]:
    """Every problem with the requested formats, naming ``flag``."""
    out = []
    for name in formats:
        if name not in allowed:
            out.append(f"{flag} must name formats among {', '.join(allowed)}, but got {name!r}.")
    repeated = sorted({name for name in formats if list(formats).count(name) > 1})
    if repeated:
        out.append(f"{flag} must list each format once, but got {', '.join(repeated)} more than once.")
    return out


def frequency_ranked(counts: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``kept`` ordered most frequent first by ``counts``, ties to the smaller id (int64)."""
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    order = np.argsort(-np.asarray(counts, dtype=np.int64)[kept], kind="stable")
    return kept[order]


def _torch_bytes(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _refuse(name: str, found: str) -> InputError:
    return InputError(
        f"{name} would not load as the mapping it exports ({found}); nothing was written. This is a bug in "
        "specforge-vocab: please report it with the command line."
    )


def token_map_bytes(counts: np.ndarray, kept: np.ndarray) -> bytes:
    """token_map.pt: the kept ids most frequent first, as a 1-D int64 tensor, checked as SGLang loads it."""
    import torch

    ranked = frequency_ranked(counts, kept)
    data = _torch_bytes(torch.from_numpy(np.ascontiguousarray(ranked)))
    loaded = torch.tensor(_torch_load(data).tolist(), dtype=torch.int64)  # what torch.tensor(obj, int64) gives
    if loaded.ndim != 1 or not np.array_equal(np.sort(loaded.numpy()), np.sort(np.asarray(kept, dtype=np.int64))):
        raise _refuse(TOKEN_MAP_FILE, f"{loaded.ndim}-D with {loaded.numel()} ids")
    return data


def token_freq_bytes(counts: np.ndarray) -> bytes:
    """token_freq.pt: {id: count} of every seen id (ascending id), plain Python ints, as speculators saves it."""
    counts = np.asarray(counts, dtype=np.int64)
    seen = np.flatnonzero(counts)
    table = {int(i): int(c) for i, c in zip(seen.tolist(), counts[seen].tolist())}
    data = _torch_bytes(table)
    loaded = _torch_load(data)
    if not isinstance(loaded, dict) or loaded != table:
        raise _refuse(TOKEN_FREQ_FILE, f"a {type(loaded).__name__} that differs from the counts")
    return data


def speculators_bytes(counts: np.ndarray, kept: np.ndarray, vocab_size: int) -> Dict[str, bytes]:
    """token_freq.pt, d2t.npy and t2d.npy; d2t/t2d read back with np.load and checked against ``kept``."""
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    d2t, t2d = build_mapping(kept, vocab_size)
    files = {
        TOKEN_FREQ_FILE: token_freq_bytes(counts),
        D2T_NPY_FILE: _npy_bytes(d2t.numpy().astype(np.int64)),
        T2D_NPY_FILE: _npy_bytes(t2d.numpy().astype(np.bool_)),
    }
    d2t_back = np.load(io.BytesIO(files[D2T_NPY_FILE]), allow_pickle=False)
    t2d_back = np.load(io.BytesIO(files[T2D_NPY_FILE]), allow_pickle=False)
    if d2t_back.dtype != np.int64 or d2t_back.shape != kept.shape:
        raise _refuse(D2T_NPY_FILE, f"{d2t_back.dtype} {list(d2t_back.shape)}")
    if t2d_back.dtype != np.bool_ or t2d_back.shape != (vocab_size,) or int(t2d_back.sum()) != kept.size:
        raise _refuse(T2D_NPY_FILE, f"{t2d_back.dtype} {list(t2d_back.shape)} with {int(t2d_back.sum())} True")
    if not np.array_equal(np.arange(kept.size) + d2t_back, kept) or not t2d_back[kept].all():
        raise _refuse(D2T_NPY_FILE, "other kept ids")
    return files


def kept_ids_text(kept: np.ndarray, vocab_size: int) -> str:
    """kept_ids.json: the kept ids ascending, V, k and the mapping fingerprint (checked by reading it back)."""
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    fingerprint = mapping_fingerprint(kept, vocab_size)
    text = json_text(
        {
            "format": KEPT_IDS_FORMAT,
            "vocab_size": int(vocab_size),
            "draft_vocab_size": int(kept.size),
            "mapping_fingerprint": fingerprint,
            "fingerprint_rule": "sha256 of V then the kept ids, each a little-endian int64",
            "kept_ids": kept.tolist(),
        }
    )
    back = json.loads(text)
    if back["kept_ids"] != kept.tolist() or mapping_fingerprint(np.array(back["kept_ids"]), vocab_size) != fingerprint:
        raise _refuse(KEPT_IDS_FILE, "other ids")
    return text


def speculators_rebuild_note(counts: np.ndarray, kept: np.ndarray) -> List[str]:
    """A note when speculators' own rule on token_freq.pt (top k by count, ties to the smaller id,
    the smallest unseen ids filling up; the same rule as writing/mapping.py) keeps other ids than
    ``kept`` (pinned tokens outside the top k): its training script then needs d2t.npy/t2d.npy."""
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    rebuilt = np.sort(frequency_order(np.asarray(counts, dtype=np.int64))[: kept.size])
    if np.array_equal(rebuilt, kept):
        return []
    extra = np.setdiff1d(kept, rebuilt)
    return [
        f"speculators export at k = {kept.size:,}: token_freq.pt alone would rebuild another vocabulary (the "
        f"pinned id(s) {', '.join(map(str, extra[:5].tolist()))}{' ...' if extra.size > 5 else ''} are not among "
        "the top k by count); speculators' train.py reads d2t.npy and t2d.npy first when they sit next to it, so "
        "keep the three files together"
    ]


def export_payloads(
    formats: Sequence[str], *, counts: np.ndarray, kept: np.ndarray, vocab_size: int
) -> Tuple[Dict[str, bytes], List[str]]:
    """({file name: payload} of every requested format, notes): each payload checked as its consumer
    reads it. ``counts`` are the counts the kept ids were chosen from."""
    problems = export_problems(formats)
    if problems:
        raise InputError(problems[0])
    files: Dict[str, bytes] = {}
    notes: List[str] = []
    for name in formats:
        if name == SGLANG_TOKEN_MAP:
            files[TOKEN_MAP_FILE] = token_map_bytes(counts, kept)
        elif name == SPECULATORS:
            files.update(speculators_bytes(counts, kept, vocab_size))
            notes += speculators_rebuild_note(counts, kept)
        elif name == IDS:
            files[KEPT_IDS_FILE] = kept_ids_text(kept, vocab_size).encode("utf-8")
    return files, notes


def mapping_files(
    d2t, t2d, *, vocab_size: int, counts: np.ndarray, exports: Sequence[str]
) -> Tuple[Dict[str, bytes], List[str]]:
    """({file name: bytes}, notes) of one mapping: vocab_mapping.pt, vocab_mapping.safetensors and
    the ``exports`` (from the ``counts`` the ids were chosen on). optimize's chosen k and every
    ladder size go through here, so a ladder entry holds the bytes a ``--draft-vocab-size K`` run writes."""
    k = int(d2t.shape[0])
    pt_bytes, st_bytes = mapping_payloads(d2t, t2d, draft_vocab_size=k, vocab_size=vocab_size)
    extra, notes = export_payloads(exports, counts=counts, kept=kept_ids_from_d2t(d2t), vocab_size=vocab_size)
    return {MAPPING_PT_FILE: pt_bytes, MAPPING_SAFETENSORS_FILE: st_bytes, **extra}, notes
