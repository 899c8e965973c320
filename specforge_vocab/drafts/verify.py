"""`verify`: check a trained draft as vLLM and SGLang will read it (docs/SPECFORGE.md section 8.4).

:func:`draft_problems` is a pure function of the draft's config, its tensors' names, dtypes and
shapes, and its d2t/t2d; every failed check is a :class:`Problem` with a stable name (the keys of
:data:`PROBLEMS`). :func:`verify_draft` reads a draft directory (safetensors, sharded or not,
``pytorch_model.bin`` with ``weights_only=True``, or a SpecForge runtime checkpoint), the target's
config, a reference mapping and token counts, and calls it. ``trim`` and ``--remap`` call
:func:`draft_problems` on what they are about to write.

Example::

    >>> from specforge_vocab.writing.mapping import build_mapping
    >>> d2t, t2d = build_mapping(np.array([1, 3]), 4)
    >>> info = {"lm_head.weight": TensorInfo("lm_head.weight", "m", "BF16", (2, 8), 32),
    ...         "d2t": TensorInfo("d2t", "m", "I64", (2,), 16), "t2d": TensorInfo("t2d", "m", "BOOL", (4,), 4)}
    >>> config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 8, "vocab_size": 4, "draft_vocab_size": 2}
    >>> draft_problems(config, info, d2t, t2d)
    []
    >>> [p.name for p in draft_problems(config, info, d2t * 0, t2d)]
    ['no_mapping_saved']
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.counting.target_head import read_target_config, target_hidden_size, target_vocab_size
from specforge_vocab.drafts.checkpoint import TensorInfo, find_head_names
from specforge_vocab.drafts.runtime_checkpoint import RuntimeCheckpoint, open_draft
from specforge_vocab.errors import InputError, SettingsError, ValidatedSettings
from specforge_vocab.writing.mapping import kept_ids_from_d2t, load_mapping, mapping_fingerprint

logger = logging.getLogger(__name__)


EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


#: every problem verify can report, by name
PROBLEMS = {
    "ambiguous_tensors": "several tensors are named like d2t, t2d or lm_head.weight",
    "architecture": f"config architectures is not [{EAGLE3_ARCHITECTURE!r}]",
    "tied_embeddings": "config tie_word_embeddings is true (SGLang then uses the V-row embedding as the head)",
    "lm_head_missing": "no lm_head.weight",
    "lm_head_rows": "lm_head.weight rows != draft_vocab_size",
    "lm_head_columns": "lm_head.weight columns != hidden_size",
    "fc_shape": "fc.weight is not [hidden_size, 3 * target_hidden_size]",
    "no_d2t": "no d2t although draft_vocab_size < vocab_size",
    "d2t_dtype": "d2t is not int64",
    "d2t_shape": "d2t is not [draft_vocab_size]",
    "no_mapping_saved": "d2t is all zeros although draft_vocab_size < vocab_size",
    "kept_ids": "arange(k) + d2t is not strictly ascending within [0, vocab_size)",
    "t2d": "t2d is not bool [vocab_size] marking exactly the kept ids",
    "vocab_size": "vocab_size differs from the target's",
    "hidden_size": "the hidden size the draft reads differs from the target's",
    "mapping_differs": "d2t differs from --vocab-mapping",
    "fingerprint_metadata": "the mapping_fingerprint stored in the file differs from its d2t",
    "frequent_tokens_missing": "most of the data's most frequent tokens are not kept",
}


#: how many of the data's most frequent tokens are checked, and the share of their occurrences
#: that may be missing before the kept set counts as collapsed for that data
TOP_TOKENS = 100


COLLAPSE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str  # a key of PROBLEMS
    message: str

    def as_dict(self) -> Dict[str, str]:
        return {"name": self.name, "message": self.message}


@dataclasses.dataclass(frozen=True)
class TargetFacts:
    """The target's vocabulary and hidden sizes (None where its config does not say)."""

    vocab_size: Optional[int]
    hidden_size: Optional[int]
    source: str


def _config_int(config: Mapping[str, Any], key: str) -> Optional[int]:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"The draft config's field '{key}' must be a positive integer, but got {value!r}. Fix it.")
    return value


def _sizes(config: Optional[Mapping[str, Any]], tensors: Mapping[str, TensorInfo], names) -> Tuple[int, int]:
    """(k, V): from the config when there is one (k = vocab_size when draft_vocab_size is unset, as the
    engines read it), else from the tensors."""
    if config is not None:
        V = _config_int(config, "vocab_size")
        k = _config_int(config, "draft_vocab_size")
        return (k if k is not None else V), V
    weight, d2t, t2d = (getattr(names, n, None) for n in ("weight", "d2t", "t2d"))
    k = tensors[weight].shape[0] if weight else (tensors[d2t].shape[0] if d2t else 0)
    V = tensors[t2d].shape[0] if t2d else k
    return int(k), int(V)


def _kept_problem(kept: np.ndarray, V: int) -> Optional[str]:
    if kept.size and (kept.min() < 0 or kept.max() >= V):
        row = int(np.flatnonzero((kept < 0) | (kept >= V))[0])
        return f"draft row {row} maps to target id {int(kept[row])}, outside [0, {V})"
    steps = np.diff(kept)
    if steps.size and steps.min() <= 0:
        row = int(np.flatnonzero(steps <= 0)[0]) + 1
        return f"draft row {row} maps to target id {int(kept[row])}, not above row {row - 1} ({int(kept[row - 1])})"
    return None


def _mapping_problems(
    d2t: Optional["torch.Tensor"], t2d: Optional["torch.Tensor"], k: int, V: int
) -> Tuple[List[Problem], Optional[np.ndarray]]:
    """The d2t/t2d checks; also the kept ids when d2t is usable (the identity when k == V without d2t)."""
    out: List[Problem] = []
    kept = None
    if d2t is None:
        if k < V:
            out.append(
                Problem(
                    "no_d2t",
                    f"there is no d2t tensor, but draft_vocab_size {k} < vocab_size {V}: vLLM keeps "
                    "draft_id_to_target_id at zeros and SGLang has no hot_token_id, so draft row i is served as target "
                    "id i. Add the d2t the draft was trained with (specforge-vocab trim --vocab-mapping FILE rewrites "
                    "the draft with it).",
                )
            )
        else:
            kept = np.arange(V, dtype=np.int64)
    elif d2t.dtype.is_floating_point or d2t.dtype.is_complex:
        out.append(
            Problem(
                "d2t_dtype",
                f"d2t is {str(d2t.dtype).replace('torch.', '')}, but must be int64: a float type holds integer "
                "offsets exactly only up to 256 (bfloat16), so the ids are already corrupted. Re-save the draft with "
                "the int64 d2t it was trained with.",
            )
        )
    elif str(d2t.dtype) != "torch.int64":
        out.append(Problem("d2t_dtype", f"d2t is {str(d2t.dtype).replace('torch.', '')}, but must be int64."))
    elif tuple(d2t.shape) != (k,):
        out.append(
            Problem(
                "d2t_shape", f"d2t has shape {list(d2t.shape)}, but must be [{k}] (draft_vocab_size); vLLM asserts it."
            )
        )
    elif k < V and not bool((d2t != 0).any()):
        out.append(
            Problem(
                "no_mapping_saved",
                f"d2t is all zeros with draft_vocab_size {k} < vocab_size {V}: no mapping was saved (an untouched "
                f"buffer), so the draft is served as keeping target ids 0..{k - 1}. Write the mapping the draft was "
                "trained with into it.",
            )
        )
    else:
        candidate = kept_ids_from_d2t(d2t)
        problem = _kept_problem(candidate, V)
        if problem:
            out.append(Problem("kept_ids", f"d2t is invalid: {problem}. The mapping was built for another vocabulary."))
        else:
            kept = candidate
    if t2d is not None:
        problem = None
        if str(t2d.dtype) != "torch.bool":
            problem = f"t2d is {str(t2d.dtype).replace('torch.', '')}, but must be bool"
        elif tuple(t2d.shape) != (V,):
            problem = f"t2d has shape {list(t2d.shape)}, but must be [{V}] (vocab_size)"
        elif int(t2d.sum()) != k:
            problem = f"t2d marks {int(t2d.sum())} ids, but draft_vocab_size is {k}"
        elif kept is not None and d2t is not None:
            mask = t2d.detach().cpu().numpy()
            if not mask[kept].all():
                row = int(np.flatnonzero(~mask[kept])[0])
                problem = f"t2d is False at target id {int(kept[row])} (draft row {row}), which d2t keeps"
        if problem:
            out.append(
                Problem(
                    "t2d", f"{problem}. SpecForge's warm start loads t2d; rebuild it from d2t (t2d[arange(k) + d2t])."
                )
            )
    return out, kept


def _first_difference(kept: np.ndarray, reference: np.ndarray) -> str:
    if kept.size != reference.size:
        return f"the draft keeps {kept.size} ids, the file {reference.size}"
    row = int(np.flatnonzero(kept != reference)[0])
    count = int(np.count_nonzero(kept != reference))
    return (
        f"draft row {row} predicts target id {int(kept[row])} in the draft but {int(reference[row])} in the file "
        f"({count} of {kept.size} rows differ)"
    )


def draft_problems(
    config: Optional[Mapping[str, Any]],
    tensors: Mapping[str, TensorInfo],
    d2t: Optional["torch.Tensor"],
    t2d: Optional["torch.Tensor"],
    *,
    target: Optional[TargetFacts] = None,
    reference: Optional[np.ndarray] = None,
    stored_fingerprints: Sequence[str] = (),
) -> List[Problem]:
    """Every problem of a draft, as serving engines and SpecForge's warm start would meet it.

    ``config`` None (a runtime checkpoint) skips the config checks and takes k and V from the
    tensors; ``reference`` are the kept ids of the mapping the draft must have (``--vocab-mapping``);
    ``stored_fingerprints`` the ``mapping_fingerprint`` values in the files' metadata.
    """
    shapes = {name: info.shape for name, info in tensors.items()}
    try:
        names = find_head_names(shapes, source="the draft")
    except InputError as exc:
        return [Problem("ambiguous_tensors", str(exc))]
    k, V = _sizes(config, tensors, names)
    out: List[Problem] = []
    if config is not None:
        if config.get("architectures") != [EAGLE3_ARCHITECTURE]:
            out.append(
                Problem(
                    "architecture",
                    f"config architectures is {config.get('architectures')!r}, but vLLM and SGLang load an EAGLE-3 "
                    f"Llama draft only as [{EAGLE3_ARCHITECTURE!r}].",
                )
            )
        if config.get("tie_word_embeddings"):
            out.append(
                Problem(
                    "tied_embeddings",
                    "config tie_word_embeddings is true: SGLang then uses the V-row embedding as the LM head and "
                    "ignores the trained lm_head. Set it to false.",
                )
            )
    hidden = int(config.get("hidden_size")) if config is not None and config.get("hidden_size") else None
    if names.weight is None:
        out.append(Problem("lm_head_missing", "there is no lm_head.weight; an EAGLE-3 draft carries its own LM head."))
    else:
        rows, *rest = tensors[names.weight].shape
        if rows != k:
            out.append(
                Problem(
                    "lm_head_rows",
                    f"{names.weight} has {rows} rows, but draft_vocab_size is {k}; vLLM and SGLang assert they are "
                    "equal. The config and the weights belong to different drafts.",
                )
            )
        if hidden is not None and rest != [hidden]:
            out.append(
                Problem("lm_head_columns", f"{names.weight} has shape {[rows, *rest]}, but hidden_size is {hidden}.")
            )
    target_hidden = hidden
    if config is not None and config.get("target_hidden_size"):
        target_hidden = int(config["target_hidden_size"])
    fc = tensors.get("fc.weight")
    if fc is not None and hidden is not None and target_hidden is not None and fc.shape != (hidden, 3 * target_hidden):
        out.append(
            Problem(
                "fc_shape",
                f"fc.weight has shape {list(fc.shape)}, but the config asks for [{hidden}, {3 * target_hidden}] "
                "(hidden_size, 3 * target_hidden_size).",
            )
        )
    mapping_problems, kept = _mapping_problems(d2t, t2d, k, V)
    out.extend(mapping_problems)
    if target is not None:
        if target.vocab_size is not None and target.vocab_size != V:
            out.append(
                Problem(
                    "vocab_size",
                    f"the draft's vocab_size is {V}, but the target ({target.source}) has {target.vocab_size}: the "
                    "draft was made for another target model.",
                )
            )
        reads = target_hidden if target_hidden is not None else (fc.shape[1] // 3 if fc is not None else None)
        if target.hidden_size is not None and reads is not None and reads != target.hidden_size:
            out.append(
                Problem(
                    "hidden_size",
                    f"the draft reads target hidden states of size {reads}, but the target ({target.source}) has "
                    f"hidden_size {target.hidden_size}.",
                )
            )
    if reference is not None and kept is not None and (kept.size != reference.size or np.any(kept != reference)):
        out.append(
            Problem(
                "mapping_differs",
                f"the draft's d2t differs from --vocab-mapping: {_first_difference(kept, reference)}. A draft must be "
                "served with the mapping it was trained with; a different one repoints every trained row.",
            )
        )
    if kept is not None:
        fingerprint = mapping_fingerprint(kept, V)
        for stored in stored_fingerprints:
            if stored != fingerprint:
                out.append(
                    Problem(
                        "fingerprint_metadata",
                        f"the file's metadata says mapping_fingerprint {stored[:16]}..., but its d2t gives "
                        f"{fingerprint[:16]}...: d2t was changed after the file was written.",
                    )
                )
                break
    return out


def data_coverage(counts: np.ndarray, kept: np.ndarray, *, top: int = TOP_TOKENS) -> Tuple[float, float]:
    """(share of counted tokens the kept ids cover, share of the ``top`` most frequent tokens' occurrences
    they miss). Ties among the most frequent go to the smaller id.

    >>> data_coverage(np.array([5, 0, 3, 2]), np.array([0, 3]), top=2)
    (0.7, 0.375)
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise InputError("No tokens were counted in the data, so coverage is undefined. Check the data flags.")
    held = np.zeros(counts.size, dtype=bool)
    held[kept] = True
    order = np.argsort(-counts, kind="stable")[:top]
    order = order[counts[order] > 0]
    top_total = int(counts[order].sum())
    missing = int(counts[order][~held[order]].sum())
    return float(counts[held].sum() / total), float(missing / top_total)


@dataclasses.dataclass
class VerifySettings(ValidatedSettings):
    """What `specforge-vocab verify` checks; one field per flag."""

    draft: str = ""
    vocab_mapping: Optional[str] = None
    target_model_path: Optional[str] = None
    count: Optional[CountSettings] = None
    counts_path: Optional[str] = None

    def problems(self) -> List[str]:
        out = []
        if not self.draft:
            out.append("DRAFT must name the draft to check (a directory or a training_state.pt), but got nothing.")
        if self.count is not None and self.counts_path:
            out.append("Pass either --counts or --dataset-path, not both.")
        if self.count is not None:
            out.extend(self.count.problems())
        return out


@dataclasses.dataclass
class VerifyReport:
    """What verify found: the draft's sizes and mapping fingerprint, each problem, and the data's coverage."""

    draft: str
    kind: str
    draft_vocab_size: Optional[int]
    vocab_size: Optional[int]
    mapping_fingerprint: Optional[str]
    problems: List[Problem]
    notes: List[str] = dataclasses.field(default_factory=list)
    coverage: Optional[float] = None
    top_tokens_missing: Optional[float] = None
    tokens_counted: Optional[int] = None

    @property
    def sound(self) -> bool:
        return not self.problems

    def as_dict(self) -> Dict[str, Any]:
        return {
            "draft": self.draft,
            "kind": self.kind,
            "sound": self.sound,
            "draft_vocab_size": self.draft_vocab_size,
            "vocab_size": self.vocab_size,
            "mapping_fingerprint": self.mapping_fingerprint,
            "problems": [p.as_dict() for p in self.problems],
            "notes": list(self.notes),
            "coverage": self.coverage,
            f"top_{TOP_TOKENS}_tokens_missing": self.top_tokens_missing,
            "tokens_counted": self.tokens_counted,
        }

    def summary_lines(self) -> List[str]:
        sizes = f"draft_vocab_size {self.draft_vocab_size:,} of vocab_size {self.vocab_size:,}"
        lines = [f"{self.draft} ({self.kind}): {sizes}"]
        if self.mapping_fingerprint:
            lines.append(f"mapping fingerprint: {self.mapping_fingerprint}")
        lines += [f"note: {n}" for n in self.notes]
        if self.coverage is not None:
            lines.append(
                f"coverage of {self.tokens_counted:,} counted tokens: {self.coverage:.4%}; the data's {TOP_TOKENS} most "
                f"frequent tokens missing: {self.top_tokens_missing:.2%} of their occurrences"
            )
        if self.sound:
            lines.append("sound: vLLM and SGLang will read it as trained")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  [{p.name}] {p.message}" for p in self.problems]
        return lines


def draft_kind(draft) -> str:
    if isinstance(draft, RuntimeCheckpoint):
        step = f", step {draft.global_step}" if draft.global_step is not None else ""
        return f"SpecForge runtime checkpoint{step}"
    sharded = "sharded " if len(draft.files) > 1 else ""
    return sharded + ("safetensors" if draft.is_safetensors else "pytorch_model.bin")


def stored_fingerprints(draft) -> List[str]:
    return sorted({m["mapping_fingerprint"] for m in draft.file_metadata.values() if m and "mapping_fingerprint" in m})


def verify_draft(settings: VerifySettings, *, counts: Optional[np.ndarray] = None) -> VerifyReport:
    """Read ``settings.draft`` (and the target, mapping and data named) and check it; see the module docstring."""
    found = settings.problems()
    if found:
        raise SettingsError(found)
    draft = open_draft(settings.draft)
    try:
        names = find_head_names(draft.shapes, source=settings.draft)
    except InputError:
        names = None  # draft_problems reports it
    d2t = draft.get(names.d2t) if names and names.d2t else None
    t2d = draft.get(names.t2d) if names and names.t2d else None
    notes = []
    if draft.config is None:
        notes.append("no config.json next to the checkpoint: k and V come from the tensors; config checks skipped")
    if names and names.t2d is None:
        notes.append("no t2d (the engines ignore it; SpecForge's warm start needs it)")
    target = None
    if settings.target_model_path:
        config = read_target_config(settings.target_model_path)
        target = TargetFacts(target_vocab_size(config), target_hidden_size(config), settings.target_model_path)
    reference = None
    if settings.vocab_mapping:
        ref_d2t, _ref_t2d = load_mapping(settings.vocab_mapping)
        if ref_d2t.dtype.is_floating_point:
            raise InputError(
                f"--vocab-mapping {settings.vocab_mapping}: its d2t is {ref_d2t.dtype}, not int64; it cannot be the "
                "mapping a draft was trained with. Pass the .pt SpecForge loaded."
            )
        reference = kept_ids_from_d2t(ref_d2t)
    problems = draft_problems(
        draft.config,
        draft.tensors,
        d2t,
        t2d,
        target=target,
        reference=reference,
        stored_fingerprints=stored_fingerprints(draft),
    )
    k, V = _sizes(draft.config, draft.tensors, names)
    kept = _usable_kept(d2t, k, V, problems)
    report = VerifyReport(
        draft=settings.draft,
        kind=draft_kind(draft),
        draft_vocab_size=k,
        vocab_size=V,
        mapping_fingerprint=mapping_fingerprint(kept, V) if kept is not None else None,
        problems=problems,
        notes=notes,
    )
    if kept is not None and (counts is not None or settings.count is not None or settings.counts_path):
        if counts is None:
            count = settings.count
            if count is not None and count.target_vocab_size is None:
                count = dataclasses.replace(count, target_vocab_size=V)
            counts = obtain_counts(count, counts_path=settings.counts_path or None).counts
        counts = np.asarray(counts)
        if counts.shape != (V,):
            raise InputError(
                f"The token counts cover {counts.shape[0]} ids, but the draft's vocab_size is {V}; count with the "
                "target's tokenizer (or --target-vocab-size) so they match."
            )
        report.coverage, report.top_tokens_missing = data_coverage(counts, kept)
        report.tokens_counted = int(counts.sum())
        if report.top_tokens_missing > COLLAPSE_SHARE:
            report.problems.append(
                Problem(
                    "frequent_tokens_missing",
                    f"{report.top_tokens_missing:.1%} of the occurrences of the data's {TOP_TOKENS} most frequent "
                    f"tokens have no draft row (coverage {report.coverage:.2%}): the draft cannot draft this data. A "
                    "wrong or repointed mapping looks like this.",
                )
            )
    return report


def _usable_kept(d2t, k: int, V: int, problems: Sequence[Problem]) -> Optional[np.ndarray]:
    broken = {"no_d2t", "d2t_dtype", "d2t_shape", "kept_ids", "ambiguous_tensors"}
    if any(p.name in broken for p in problems):
        return None
    if d2t is None:
        return np.arange(V, dtype=np.int64) if k == V else None
    return kept_ids_from_d2t(d2t)


def kept_ids_of(draft, *, field: str) -> Tuple[np.ndarray, int, int]:
    """(kept ids, k, V) of a draft whose mapping passes every check; InputError naming each problem otherwise."""
    names = find_head_names(draft.shapes, source=field)
    d2t = draft.get(names.d2t) if names.d2t else None
    t2d = draft.get(names.t2d) if names.t2d else None
    problems = draft_problems(draft.config, draft.tensors, d2t, t2d)
    if problems:
        raise InputError(
            f"{field}: the checkpoint fails {len(problems)} check(s), so its trained rows cannot be kept safely: "
            + " ".join(f"[{p.name}] {p.message}" for p in problems)
        )
    k, V = _sizes(draft.config, draft.tensors, names)
    kept = kept_ids_from_d2t(d2t) if d2t is not None else np.arange(V, dtype=np.int64)
    return kept, k, V
