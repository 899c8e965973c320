"""`--remap`: move a trained draft onto a new kept set for new data, keeping every trained row it can.

A draft's LM-head row i predicts target id ``old_kept[i]`` (docs/SPECFORGE.md section 1). For a new
kept set the new head has one row per new id: an id the old head had keeps its trained row byte for
byte; an id it lacked gets the target's own LM-head row for that id (cast to the head's dtype), or
zeros when the target's weights are not local. d2t/t2d are rebuilt and every other tensor is kept
as it is. The result is a Hugging Face-style draft directory (config.json + model.safetensors) that
SpecForge's warm start (``model.draft_checkpoint_path``) and train_eagle3's ``--ckpt-dir`` load;
the old checkpoint is never modified.

Example (the pure core)::

    >>> import torch
    >>> w = torch.arange(6.0).reshape(3, 2)                       # trained rows of ids 1, 4, 6
    >>> rows, kept_row = remap_rows(w, np.array([1, 4, 6]), np.array([0, 4, 6]), torch.tensor([[9.0, 9.0]]))
    >>> rows.tolist(), kept_row.tolist()                          # id 0 is new: the target's row
    ([[9.0, 9.0], [2.0, 3.0], [4.0, 5.0]], [False, True, True])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import numpy as np
from safetensors import safe_open

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.counting.target_head import DEFAULT_LM_HEAD_KEY, read_lm_head_rows
from specforge_vocab.drafts.checkpoint import (
    CONFIG_NAME,
    SAFE_SINGLE,
    TensorInfo,
    find_head_names,
    other_draft_sized,
    safetensors_dtype,
    write_safetensors,
)
from specforge_vocab.drafts.runtime_checkpoint import RuntimeCheckpoint, local_path, weight_file_identity
from specforge_vocab.drafts.verify import draft_problems
from specforge_vocab.errors import InputError, short
from specforge_vocab.fileio import atomic_write_many, file_lock, json_text
from specforge_vocab.writing.draft_config import patched_text
from specforge_vocab.writing.mapping import build_mapping, mapping_fingerprint

logger = logging.getLogger(__name__)


def _as_bytes(tensor: "torch.Tensor") -> "torch.Tensor":
    """A [rows, row_bytes] uint8 view of a tensor's rows (any dtype)."""
    import torch

    flat = tensor.detach().contiguous().reshape(tensor.shape[0], -1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def remap_rows(
    old_rows: "torch.Tensor", old_kept: np.ndarray, new_kept: np.ndarray, fresh_rows: Optional["torch.Tensor"]
) -> Tuple["torch.Tensor", np.ndarray]:
    """(rows for ``new_kept``, which of them are trained rows): a retained id's row is copied byte for byte
    from ``old_rows``; the others take ``fresh_rows`` (one per new id, in order; cast) or zeros."""
    import torch

    old_kept = np.asarray(old_kept, dtype=np.int64)
    new_kept = np.asarray(new_kept, dtype=np.int64)
    at = np.searchsorted(old_kept, new_kept)
    inside = at < old_kept.size
    retained = np.zeros(new_kept.size, dtype=bool)
    retained[inside] = old_kept[at[inside]] == new_kept[inside]
    added = int((~retained).sum())
    if fresh_rows is not None and added and tuple(fresh_rows.shape) != (added,) + tuple(old_rows.shape[1:]):
        raise InputError(
            f"The target's LM-head rows have shape {list(fresh_rows.shape)}, but the draft's head needs "
            f"{[added, *old_rows.shape[1:]]}: the target's hidden size differs from the draft's."
        )
    # One gather over [old rows; new rows (or one zero row)]: retained ids take their old row, the others theirs.
    old_raw = _as_bytes(old_rows)
    if fresh_rows is not None and added:
        new_raw = _as_bytes(fresh_rows.to(old_rows.dtype))
        new_index = old_kept.size + np.arange(added)
    else:
        new_raw = torch.zeros((1, old_raw.shape[1]), dtype=torch.uint8)
        new_index = np.full(added, old_kept.size)
    index = np.empty(new_kept.size, dtype=np.int64)
    index[retained] = at[retained]
    index[~retained] = new_index
    gathered = torch.cat([old_raw, new_raw]).index_select(0, torch.from_numpy(index))
    out = gathered.view(old_rows.dtype).reshape((new_kept.size,) + tuple(old_rows.shape[1:]))
    return out, retained


def draft_tensors(draft) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of a draft (runtime checkpoint or Hugging Face directory), in stored order."""
    if isinstance(draft, RuntimeCheckpoint):
        return OrderedDict(draft.state)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for file in draft.files:
        out.update(draft.read_file(file))
    return out


@dataclasses.dataclass
class RemapResult:
    """What the warm-start checkpoint holds."""

    source: str
    output: str
    old_draft_vocab_size: int
    new_draft_vocab_size: int
    retained: int  # new ids with a trained row
    added: int  # new ids without one
    added_rows_from: str  # "the target's lm_head rows" | "zeros"
    mapping_fingerprint: str
    written: bool  # False: an identical warm start was already there

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def summary_line(self) -> str:
        verb = "wrote" if self.written else "kept (unchanged)"
        return (
            f"--remap: {verb} the warm-start checkpoint {self.output}: k {self.old_draft_vocab_size:,} -> "
            f"{self.new_draft_vocab_size:,}; {self.retained:,} rows trained (byte for byte from {self.source}), "
            f"{self.added:,} new from {self.added_rows_from}"
        )


def _already_written(output: str, config_text: str, metadata: Dict[str, str]) -> bool:
    weights, config = os.path.join(output, SAFE_SINGLE), os.path.join(output, CONFIG_NAME)
    if not (os.path.isfile(weights) and os.path.isfile(config)):
        return False
    try:
        with open(config, encoding="utf-8") as handle:
            if handle.read() != config_text:
                return False
        with safe_open(weights, framework="pt") as handle:
            return (handle.metadata() or {}) == metadata
    except Exception:  # noqa: BLE001 - an unreadable earlier output is simply rewritten
        return False


def _check_output(output: str, source_dir: str) -> None:
    out, src = os.path.realpath(output), os.path.realpath(source_dir)
    if out == src or out.startswith(src + os.sep):
        raise InputError(
            f"The warm-start checkpoint would be written to {output}, inside the checkpoint {source_dir}; the "
            "checkpoint is never modified. Choose another --output-dir."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"{output} must be a directory for the warm-start checkpoint, but it is a file. Remove it.")
    if os.path.isdir(output):
        stale = [e for e in os.listdir(output) if e.endswith((".safetensors", ".bin", ".pt")) and e != SAFE_SINGLE]
        if stale:
            raise InputError(
                f"{output} holds weight files the warm start would not replace ({short(sorted(stale))}); a loader "
                "could mix them in. Remove them or choose another --output-dir."
            )


def write_warm_start(
    draft,
    old_kept: np.ndarray,
    new_kept: np.ndarray,
    *,
    output: str,
    config: Mapping[str, Any],
    config_text: Optional[str],
    vocab_size: int,
    target_model_path: Optional[str] = None,
    lm_head_key: str = DEFAULT_LM_HEAD_KEY,
    source: str = "the checkpoint",
) -> RemapResult:
    """Write ``draft`` moved onto ``new_kept`` into ``output`` (module docstring), checked before it is committed.

    ``config`` is the draft config the checkpoint was trained with (``config_text`` its file's text,
    patched in place; without it the dict is written); draft_vocab_size becomes ``len(new_kept)``.
    """
    _check_output(output, draft.directory)
    tensors = draft_tensors(draft)
    names = find_head_names({n: tuple(t.shape) for n, t in tensors.items()}, source=source)
    if names.weight is None:
        raise InputError(f"{source} has no lm_head.weight, so there are no trained rows to carry over.")
    old_kept = np.asarray(old_kept, dtype=np.int64)
    new_kept = np.asarray(new_kept, dtype=np.int64)
    new_ids = new_kept[~np.isin(new_kept, old_kept)]
    fresh = read_lm_head_rows(target_model_path, new_ids, lm_head_key=lm_head_key) if target_model_path else None
    if fresh is None and new_ids.size:
        logger.warning(
            "The target's LM head (%s in %s) is not available locally, so the %d new tokens' rows start at zeros.",
            lm_head_key,
            target_model_path or "no target path",
            new_ids.size,
        )
    d2t, t2d = build_mapping(new_kept, vocab_size)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    retained = np.zeros(0, dtype=bool)
    for name, tensor in tensors.items():
        if name == names.weight:
            tensor, retained = remap_rows(tensor, old_kept, new_kept, fresh)
        elif name == names.bias:
            tensor, _ = remap_rows(tensor.reshape(-1, 1), old_kept, new_kept, None)
            tensor = tensor.reshape(-1)
        elif name == names.d2t:
            tensor = d2t
        elif name == names.t2d:
            tensor = t2d
        out[name] = tensor
    out.setdefault(names.d2t or "d2t", d2t)
    out.setdefault(names.t2d or "t2d", t2d)
    unsliced = other_draft_sized({n: tuple(t.shape) for n, t in tensors.items()}, names, old_kept.size)
    if unsliced and old_kept.size != vocab_size:
        logger.warning(
            "Left unchanged although a dimension equals the old k %d: %s.", old_kept.size, ", ".join(unsliced)
        )

    new_k = int(new_kept.size)
    new_config = dict(config, draft_vocab_size=new_k)
    text = patched_text(config_text, new_k, path=source) if config_text is not None else json_text(new_config)
    infos = {
        n: TensorInfo(n, SAFE_SINGLE, safetensors_dtype(t.dtype) or str(t.dtype), tuple(t.shape), 0)
        for n, t in out.items()
    }
    problems = draft_problems(new_config, infos, out[names.d2t or "d2t"], out[names.t2d or "t2d"])
    if problems:
        raise InputError(
            f"The warm-start checkpoint for {source} would fail verify, so nothing was written: "
            + " ".join(f"[{p.name}] {p.message}" for p in problems)
        )
    fingerprint = mapping_fingerprint(new_kept, vocab_size)
    metadata = {
        "format": "pt",
        "mapping_fingerprint": fingerprint,
        "remapped_from": json.dumps(
            {
                "weights": weight_file_identity(draft),
                "old_mapping_fingerprint": mapping_fingerprint(old_kept, vocab_size),
            },
            separators=(",", ":"),
        ),
        "added_rows_from": "target lm_head" if fresh is not None else "zeros",
    }
    written = not _already_written(output, text, metadata)
    if written:
        with file_lock(os.path.abspath(output)):
            atomic_write_many(
                {
                    os.path.join(output, SAFE_SINGLE): lambda handle: write_safetensors(handle, out, metadata=metadata),
                    os.path.join(output, CONFIG_NAME): text,
                }
            )
        logger.info("Wrote the warm-start checkpoint %s (%d -> %d rows).", output, old_kept.size, new_k)
    return RemapResult(
        source=local_path(draft.directory),
        output=os.path.abspath(output),
        old_draft_vocab_size=int(old_kept.size),
        new_draft_vocab_size=new_k,
        retained=int(retained.sum()),
        added=int((~retained).sum()),
        added_rows_from="the target's lm_head rows" if fresh is not None or not new_ids.size else "zeros",
        mapping_fingerprint=fingerprint,
        written=written,
    )
