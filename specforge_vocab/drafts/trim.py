"""Trim an already-trained EAGLE-3 draft: keep the LM-head rows of the tokens a workload uses.

A draft with ``k`` LM-head rows keeps ``k`` of the target's ``V`` ids (its
``d2t``/``t2d``, docs/SPECFORGE.md section 1). Trimming chooses ``k' <= k`` of those ids
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

import dataclasses
import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.choosing.cost import draft_flops
from specforge_vocab.choosing.search import SearchResult, SearchSettings, search
from specforge_vocab.counting.engine import NO_TOKENS, CountSettings
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.drafts.checkpoint import (
    BIN_SINGLE,
    CONFIG_NAME,
    D2T,
    SAFE_INDEX,
    SAFE_SINGLE,
    T2D,
    WEIGHT_SUFFIXES,
    DraftCheckpoint,
    DraftVocabulary,
    TensorInfo,
    copier,
    draft_vocabulary,
    find_head_names,
    other_draft_sized,
    read_checkpoint,
    side_files,
    write_safetensors,
)
from specforge_vocab.drafts.runtime_checkpoint import runtime_state_file
from specforge_vocab.drafts.verify import draft_problems
from specforge_vocab.errors import InputError, SettingsError, must, short
from specforge_vocab.fileio import atomic_write_many, file_lock, json_text
from specforge_vocab.writing.draft_config import check_vocab_size, patched_text
from specforge_vocab.writing.exports import IDS, SGLANG_TOKEN_MAP, SPECULATORS, export_payloads, export_problems
from specforge_vocab.writing.mapping import build_mapping, check_mapping, kept_token_ids, mapping_fingerprint

#: the --export formats that fit a trimmed EAGLE-3 draft (see TrimSettings.problems for the others)
TRIM_EXPORT_FORMATS = (IDS,)
TRIM_EXPORT_REFUSALS = {
    SGLANG_TOKEN_MAP: "SGLang ignores --speculative-token-map for EAGLE-3 drafts, which carry their own d2t "
    "(docs/SPECFORGE.md section 8.1)",
    SPECULATORS: "its token_freq.pt would rebuild a vocabulary from every id, while a trimmed draft can keep "
    "only ids it has rows for; speculators' converter reads the d2t/t2d inside the trimmed checkpoint",
}

logger = logging.getLogger(__name__)


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
    import torch

    n = tensor.shape[0]
    flat = tensor.detach().contiguous().reshape(n, -1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    picked = raw.index_select(0, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)))
    if flat.dtype != torch.uint8:
        picked = picked.view(tensor.dtype)
    return picked.reshape((len(rows),) + tuple(tensor.shape[1:])).contiguous()


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
        raise InputError(NO_TOKENS)
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


def _runtime_checkpoint_problems(checkpoint: str) -> List[str]:
    """A SpecForge runtime checkpoint (training_state.pt: no config.json, no safetensors) is refused with the
    export that turns it into a draft trim reads; the empty list for anything else."""
    try:
        state = runtime_state_file(checkpoint, field="--checkpoint")
    except InputError as exc:
        return [str(exc)]
    if state is None:
        return []
    return [
        f"--checkpoint {checkpoint} is a SpecForge runtime checkpoint ({state}): training state without config.json "
        "or safetensors, which trim does not read. Export it first with `specforge export --to hf --checkpoint "
        f"{os.path.dirname(state)} --draft-config <the run's draft config> --embedding-source <the target model> "
        "--output-dir <dir>` (without "
        "--vocab-mapping, which would replace the trained d2t/t2d), then trim that directory; `specforge-vocab "
        "verify` reads the runtime checkpoint as it is."
    ]


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
    exports: List[str] = dataclasses.field(default_factory=list)  # --export: written beside the trimmed draft

    def problems(self, *, counts_given: bool = False) -> List[str]:
        out: List[str] = []
        if not self.checkpoint:
            out.append("--checkpoint must name the trained draft's directory, but got nothing.")
        if not self.output:
            out.append("--output must name the directory to write the trimmed draft to, but got nothing.")
        if self.checkpoint:
            out += _runtime_checkpoint_problems(self.checkpoint)
        if self.checkpoint and self.output and os.path.realpath(self.checkpoint) == os.path.realpath(self.output):
            out.append(
                must("--output", "a directory other than --checkpoint (the input is never overwritten)", self.output)
            )
        data_flag = self.count.source_flag if self.count is not None else "--dataset-path"
        sources = [s for s, on in (("--counts", self.counts_path), (data_flag, self.count)) if on]
        if not counts_given:
            if not sources:
                out.append(
                    "Token counts are needed to choose which rows to keep: pass --dataset-path (with --tokenizer-path), "
                    "--prompts-path, --hidden-states-path or --counts FILE from `specforge-vocab count`."
                )
            elif len(sources) > 1:
                out.append(f"Pass either --counts or {data_flag}, not both.")
        if self.draft_vocab_size is not None and (
            isinstance(self.draft_vocab_size, bool)
            or not isinstance(self.draft_vocab_size, int)
            or self.draft_vocab_size < 1
        ):
            out.append(must("--draft-vocab-size", "a positive integer", self.draft_vocab_size))
        search_k = getattr(self.search, "draft_vocab_size", None)
        if search_k is not None and self.draft_vocab_size is not None and search_k != self.draft_vocab_size:
            out.append(
                f"--draft-vocab-size is {self.draft_vocab_size} but the search settings fix {search_k}; set one of them."
            )
        out.extend(self.search.problems())
        for name in self.exports:
            if name in TRIM_EXPORT_REFUSALS:
                out.append(
                    f"--export {name} does not fit trim: {TRIM_EXPORT_REFUSALS[name]}. Use --export "
                    f"{' '.join(TRIM_EXPORT_FORMATS)}, or run optimize --export {name} for a draft still to be trained."
                )
        out.extend(p for p in export_problems(self.exports) if not any(n in p for n in TRIM_EXPORT_REFUSALS))
        if self.count is not None and not counts_given and not self.counts_path:
            out.extend(self.count.problems(vocab_size_known=True))  # V: the checkpoint's vocab_size
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
            lines.append(f"not copied from {self.checkpoint}: " + ", ".join(self.files_not_copied))
        return lines


def _resolve_counts(settings: TrimSettings, counts: Optional[np.ndarray], vocab: DraftVocabulary) -> np.ndarray:
    if counts is None:
        count_settings = settings.count
        if count_settings is not None and count_settings.target_vocab_size is None:
            count_settings = dataclasses.replace(count_settings, target_vocab_size=vocab.vocab_size)
        counts = obtain_counts(count_settings, counts_path=settings.counts_path or None).counts
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
        stem = "model" + stem[len("pytorch_model") :]
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


def _shard_writer(
    ckpt: DraftCheckpoint,
    file: str,
    vocab: DraftVocabulary,
    rows: np.ndarray,
    d2t: torch.Tensor,
    t2d: torch.Tensor,
    extra: Dict[str, torch.Tensor],
    fingerprint: str,
):
    """A payload for fileio: loads one input file, trims it, writes it as safetensors (its metadata gains the
    new mapping's fingerprint)."""

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
        metadata = dict(ckpt.file_metadata.get(file) or {"format": "pt"})  # transformers needs "format"
        metadata["mapping_fingerprint"] = fingerprint
        write_safetensors(handle, out, metadata=metadata)

    return write


def trim_checkpoint(settings: TrimSettings, *, counts: Optional[np.ndarray] = None) -> TrimResult:
    """Trim ``settings.checkpoint`` into ``settings.output``; see the module docstring.

    ``counts`` (int64 [V]) overrides the counts source in ``settings``.
    """
    settings.validate(counts_given=counts is not None)
    ckpt = read_checkpoint(settings.checkpoint)
    vocab = draft_vocabulary(ckpt, vocab_mapping=settings.vocab_mapping)
    out_names = {file: _output_file_name(ckpt, file) for file in ckpt.files}
    copied, not_copied = side_files(ckpt)
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

    fingerprint = mapping_fingerprint(new_kept, vocab.vocab_size)
    payloads: Dict[str, Any] = OrderedDict()
    for file in ckpt.files:
        extra = added if file == head_file else {}
        payloads[os.path.join(settings.output, out_names[file])] = _shard_writer(
            ckpt, file, vocab, rows, d2t, t2d, extra, fingerprint
        )
    if ckpt.index is not None:
        payloads[os.path.join(settings.output, SAFE_INDEX)] = json_text(
            _new_index(ckpt, vocab, out_names, head_file, added, new_k)
        )
    for entry in copied:
        payloads[os.path.join(settings.output, entry)] = copier(ckpt.path(entry))
    config_text = patched_text(ckpt.config_text, new_k, path=ckpt.config_path)
    payloads[os.path.join(settings.output, CONFIG_NAME)] = config_text
    _verify_planned(ckpt, vocab, json.loads(config_text), d2t, t2d, added, new_k, settings.output)
    exported, _ = export_payloads(settings.exports, counts=counts, kept=new_kept, vocab_size=vocab.vocab_size)
    for name, data in exported.items():
        payloads[os.path.join(settings.output, name)] = data
        planned.append(name)

    _prepare_output(settings, planned)  # again: the directory may have changed while counting
    with file_lock(os.path.abspath(settings.output)):
        atomic_write_many(payloads)
    logger.info("Wrote the trimmed draft (%d -> %d rows) to %s.", old_k, new_k, settings.output)

    unsliced = other_draft_sized(ckpt.shapes, vocab.names, old_k)
    if unsliced and old_k != vocab.vocab_size:
        logger.warning(
            "Left unchanged although a dimension equals the old draft_vocab_size %d: %s. If any of them belongs to "
            "the LM head, the trimmed draft is wrong.",
            old_k,
            ", ".join(unsliced),
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


def _verify_planned(
    ckpt: DraftCheckpoint,
    vocab: DraftVocabulary,
    config: Dict[str, Any],
    d2t: torch.Tensor,
    t2d: torch.Tensor,
    added: Dict[str, torch.Tensor],
    new_k: int,
    output: str,
) -> None:
    """Run verify's checks on the trimmed draft before anything is written."""
    infos = {}
    for name, info in ckpt.tensors.items():
        shape = info.shape
        if name in vocab.names.sliced:
            shape = (new_k,) + tuple(shape[1:])
        elif name == vocab.names.d2t:
            shape = (new_k,)
        infos[name] = dataclasses.replace(info, shape=shape, dtype="I64" if name == vocab.names.d2t else info.dtype)
    for name, tensor in added.items():
        infos[name] = TensorInfo(name, "", "", tuple(tensor.shape), 0)
    # The architecture name and tie_word_embeddings are copied unchanged: checks of what trim writes only.
    unchanged = ("architecture", "tied_embeddings")
    problems = [p for p in draft_problems(config, infos, d2t, t2d) if p.name not in unchanged]
    if problems:
        raise InputError(
            f"The trimmed draft for --output {output} would fail verify, so nothing was written: "
            + " ".join(f"[{p.name}] {p.message}" for p in problems)
        )


def _new_index(
    ckpt: DraftCheckpoint,
    vocab: DraftVocabulary,
    out_names: Dict[str, str],
    head_file: str,
    added: Dict[str, torch.Tensor],
    new_k: int,
) -> Dict[str, Any]:
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
