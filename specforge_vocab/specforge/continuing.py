"""Training that continues from trained weights: which checkpoint, its own mapping, and what prepare
hands SpecForge (docs/SPECFORGE.md section 6).

A trained LM-head row i predicts target id ``kept[i]``; handing SpecForge another mapping of the same
size repoints every row silently. So when a run continues (newer SpecForge:
``model.draft_checkpoint_path``, ``training.resume_from``; train_eagle3.py: ``--ckpt-dir``, ``--resume``
with a saved ``epoch_*`` checkpoint), the mapping handed over is the checkpoint's own d2t/t2d and k
stays; the counts of the new data still give a fresh choice, which is reported next to the
checkpoint's coverage. ``--remap`` instead moves the draft onto the fresh choice
(:mod:`specforge_vocab.drafts.remap`).

:func:`find_continuation` finds the checkpoint as SpecForge would and reads its kept ids (checked
as ``verify`` checks them); :func:`continuing_payloads` builds the output files of such a run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.choosing.search import coverage_curve, weighted_utility
from specforge_vocab.drafts.checkpoint import find_head_names
from specforge_vocab.drafts.runtime_checkpoint import (
    STATE_FILE,
    RuntimeCheckpoint,
    checkpoint_config_file,
    open_draft,
    resolve_checkpoint_dir,
    weight_file_identity,
)
from specforge_vocab.drafts.verify import TOP_TOKENS, data_coverage, draft_problems, kept_ids_of
from specforge_vocab.errors import InputError, where
from specforge_vocab.fileio import json_text, safetensors_bytes
from specforge_vocab.pipeline import LATENCY_LABELS, Choice, Inputs
from specforge_vocab.specforge.run_config import RunConfig, resolve_path
from specforge_vocab.specforge.train_eagle3 import last_epoch_checkpoint
from specforge_vocab.writing.mapping import (
    build_mapping,
    kept_ids_from_d2t,
    load_mapping,
    mapping_fingerprint,
    mapping_payloads,
)
from specforge_vocab.writing.outputs import OUTPUT_FILES
from specforge_vocab.writing.report import full_results, render_coverage_curves, render_optimization_results

logger = logging.getLogger(__name__)


WARM_START = "warm start"  # model.draft_checkpoint_path: weights only


RESUME = "resume"  # training.resume_from: weights, optimizer and counters


CKPT_DIR = "--ckpt-dir"  # train_eagle3.py: weights and config of a saved draft


OLD_RESUME = "--resume"  # train_eagle3.py: the newest epoch_* checkpoint under --output-dir


@dataclasses.dataclass(frozen=True)
class Continuation:
    """The checkpoint a run continues from and what it keeps (picklable: part of the plan)."""

    kind: str  # WARM_START | RESUME | CKPT_DIR | OLD_RESUME
    field: str  # where it was named: "model.draft_checkpoint_path", "training.resume_from", "--ckpt-dir", ...
    source: str  # the value as written
    checkpoint: str  # absolute: the checkpoint directory
    runtime: bool  # a SpecForge runtime checkpoint (training_state.pt), else a Hugging Face-style directory
    kept: np.ndarray  # the target ids of its LM-head rows, ascending
    vocab_size: int
    config_path: Optional[str]  # the checkpoint's config.json, when it has one
    weights: tuple  # ((path, size, mtime_ns), ...) of its weight files
    remap: bool = False

    @property
    def k(self) -> int:
        return int(self.kept.size)

    @property
    def fingerprint(self) -> str:
        return mapping_fingerprint(self.kept, self.vocab_size)

    def identity(self) -> Dict[str, Any]:
        """What decides the outputs of a continuing run (for reuse)."""
        return {
            "kind": self.kind,
            "checkpoint": self.checkpoint,
            "weights": [list(w) for w in self.weights],
            "mapping_fingerprint": self.fingerprint,
            "remap": self.remap,
        }

    def describe(self) -> str:
        what = "SpecForge runtime checkpoint" if self.runtime else "draft checkpoint"
        return f"{self.field} {self.source} ({what} {self.checkpoint}, k {self.k:,})"


def _read(kind: str, field: str, source: str, path: str, remap: bool) -> Continuation:
    draft = open_draft(path, field=field)
    kept, _k, V = kept_ids_of(draft, field=f"{field} {source}")
    directory = draft.directory
    return Continuation(
        kind=kind,
        field=field,
        source=source,
        checkpoint=os.path.abspath(directory),
        runtime=isinstance(draft, RuntimeCheckpoint),
        kept=kept,
        vocab_size=V,
        config_path=draft.config_path,
        weights=weight_file_identity(draft),
        remap=remap,
    )


def find_continuation(run: RunConfig, *, remap: bool = False) -> Optional[Continuation]:
    """The checkpoint a ``specforge train`` run continues from, read and checked; None for a fresh run."""
    if run.resume_from:
        if remap:
            raise InputError(
                f"{where(run.config_path, field='training.resume_from')} resumes a run (optimizer, counters and the "
                "trained d2t/t2d are restored), so its vocabulary cannot change: --remap needs a warm start. Replace "
                "training.resume_from by model.draft_checkpoint_path (same checkpoint) and run prepare --remap again."
            )
        directory = resolve_checkpoint_dir(resolve_path(run.resume_from, cwd=run.cwd), field="training.resume_from")
        return _read(RESUME, "training.resume_from", run.resume_from, os.path.join(directory, STATE_FILE), remap)
    if run.draft_checkpoint_path:
        path = resolve_path(run.draft_checkpoint_path, cwd=run.cwd)
        if not os.path.exists(path):
            raise InputError(
                f"{where(run.config_path, field='model.draft_checkpoint_path')} is {run.draft_checkpoint_path!r}, but "
                f"{path} does not exist. prepare reads the checkpoint's own mapping, so it must be local (download a "
                "Hugging Face draft first, and point the field at the directory)."
            )
        return _read(WARM_START, "model.draft_checkpoint_path", run.draft_checkpoint_path, path, remap)
    return None


def find_old_continuation(args, *, cwd: str, remap: bool = False) -> Optional[Continuation]:
    """The checkpoint train_eagle3.py continues from (``--resume`` wins over ``--ckpt-dir``, as there)."""
    output_dir = resolve_path(args.output_dir, cwd=cwd) if args.output_dir else None
    if args.resume and output_dir and os.path.isdir(output_dir):
        last = last_epoch_checkpoint(output_dir)
        if last is not None:
            if remap:
                raise InputError(
                    f"--resume continues the run in {last} (optimizer state included), so its vocabulary cannot "
                    "change: --remap needs --ckpt-dir (a warm start). Drop --resume, or drop --remap."
                )
            return _read(OLD_RESUME, "--resume", last, last, remap)
    if args.ckpt_dir:
        return _read(CKPT_DIR, "--ckpt-dir", args.ckpt_dir, resolve_path(args.ckpt_dir, cwd=cwd), remap)
    return None


def warm_start_config_file(run: RunConfig) -> Optional[str]:
    """The config.json SpecForge takes from ``model.draft_checkpoint_path`` when draft_model_config is unset."""
    if not run.draft_checkpoint_path:
        return None
    return checkpoint_config_file(resolve_path(run.draft_checkpoint_path, cwd=run.cwd))


def check_config_fits(continuation: Continuation, config: Dict[str, Any], *, source: str) -> None:
    """Refuse a draft config the checkpoint's weights cannot be loaded into (other than its draft_vocab_size,
    which prepare sets to the checkpoint's)."""
    draft = open_draft(
        os.path.join(continuation.checkpoint, STATE_FILE) if continuation.runtime else continuation.checkpoint,
        field=continuation.field,
    )
    names = find_head_names(draft.shapes, source=continuation.field)
    d2t = draft.get(names.d2t) if names.d2t else None
    t2d = draft.get(names.t2d) if names.t2d else None
    problems = draft_problems(dict(config, draft_vocab_size=continuation.k), draft.tensors, d2t, t2d)
    if problems:
        raise InputError(
            f"{source} does not fit the checkpoint of {continuation.describe()}, so SpecForge could not load its "
            "weights: " + " ".join(f"[{p.name}] {p.message}" for p in problems)
        )


def configured_mapping_equals(run: RunConfig, continuation: Continuation) -> Optional[bool]:
    """Whether model.vocab_mapping_path holds the checkpoint's own mapping (None: unset or missing)."""
    path = run.resolved_vocab_mapping_path
    if not path or not os.path.isfile(path):
        return None
    d2t, t2d = load_mapping(path)
    if d2t.dtype.is_floating_point or t2d.shape[0] != continuation.vocab_size:
        return False
    kept = kept_ids_from_d2t(d2t)
    return bool(kept.size == continuation.k and np.array_equal(kept, continuation.kept))


def continuing_summary(
    continuation: Continuation, inputs: Inputs, choice: Choice, *, settings: Dict[str, Any]
) -> Dict[str, Any]:
    """summary.json of a continuing run: the paper's keys describe the mapping handed over (the checkpoint's),
    then the checkpoint and the fresh choice for the same counts."""
    counts, k, V = inputs.counts, continuation.k, continuation.vocab_size
    coverage, top_missing = data_coverage(counts, continuation.kept)
    latency = float(choice.latency_model(np.array([k], dtype=np.int64))[0])
    fresh = choice.result
    curve = coverage_curve(counts)
    a = fresh.settings.coverage_weight
    return {
        "method": "checkpoint",
        "optimal_draft_vocab_size": k,
        "target_vocab_size": V,
        "vocab_reduction_ratio": 1 - k / V,
        "coverage": coverage,
        "latency_reduction": latency,
        "utility": float(weighted_utility(coverage, latency, a)),
        "continuing": {
            "kind": continuation.kind,
            "field": continuation.field,
            "source": continuation.source,
            "checkpoint": continuation.checkpoint,
            "draft_vocab_size": k,
            "coverage": coverage,
            f"top_{TOP_TOKENS}_tokens_missing": top_missing,
            "mapping_fingerprint": continuation.fingerprint,
        },
        "fresh_choice": {
            "draft_vocab_size": fresh.k,
            "method": fresh.method,
            "coverage": fresh.pick.coverage,
            "latency_reduction": fresh.pick.latency_reduction,
            "utility": float(weighted_utility(fresh.pick.coverage, fresh.pick.latency_reduction, a)),
            "coverage_of_the_top_k_at_the_checkpoints_k": float(curve[min(k, V)]),
        },
        "tokens_counted": int(counts.sum()),
        "unique_tokens": int(np.count_nonzero(counts)),
        "mapping_fingerprint": continuation.fingerprint,
        "settings": {**dataclasses.asdict(fresh.settings), **settings},
    }


def continuing_payloads(
    continuation: Continuation,
    inputs: Inputs,
    choice: Choice,
    *,
    output_dir: str,
    latency_model: str,
    settings: Dict[str, Any],
    keep: Sequence[str] = (),
) -> Dict[str, Any]:
    """The output files of a continuing run (by path): summary, full results and plots of the fresh choice,
    counts, and the checkpoint's own mapping (.pt and .safetensors). Paths in ``keep`` are left out (an
    existing file that must not be rewritten)."""
    d2t, t2d = build_mapping(continuation.kept, continuation.vocab_size)
    pt_bytes, st_bytes = mapping_payloads(d2t, t2d, draft_vocab_size=continuation.k, vocab_size=continuation.vocab_size)
    files = {role: os.path.join(output_dir, name) for role, name in OUTPUT_FILES.items()}
    payloads = {
        files["full_results"]: json_text(full_results(choice.result)),
        files["plot"]: render_optimization_results(choice.result, latency_label=LATENCY_LABELS[latency_model]),
        files["coverage_plot"]: render_coverage_curves(choice.result, choice.analysis),
        files["counts"]: safetensors_bytes({"counts": np.ascontiguousarray(inputs.counts)}, inputs.metadata),
        files["mapping_pt"]: pt_bytes,
        files["mapping_safetensors"]: st_bytes,
        files["summary"]: json_text(continuing_summary(continuation, inputs, choice, settings=settings)),
    }
    for path in keep:
        payloads.pop(path, None)
    return payloads


def summary_lines(summary: Dict[str, Any]) -> List[str]:
    """The CLI's lines for a continuing run's summary.json."""
    cont, fresh = summary["continuing"], summary["fresh_choice"]
    return [
        f"continuing from {cont['field']} {cont['source']}: SpecForge gets the checkpoint's own mapping "
        f"(k {cont['draft_vocab_size']:,}, fingerprint {cont['mapping_fingerprint'][:16]})",
        f"coverage of the new data: the checkpoint's kept set {cont['coverage']:.4%} "
        f"(the data's {TOP_TOKENS} most frequent tokens missing: {cont[f'top_{TOP_TOKENS}_tokens_missing']:.2%}); "
        f"a fresh choice: k {fresh['draft_vocab_size']:,}, coverage {fresh['coverage']:.4%} "
        f"({fresh['coverage_of_the_top_k_at_the_checkpoints_k']:.4%} at k {cont['draft_vocab_size']:,})",
        "to move the draft onto a fresh kept set (warm start, trained rows kept), run again with --remap",
    ]
