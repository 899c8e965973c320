"""`optimize`, the one path, in three phases: gather inputs -> choose -> write.

1. :func:`gather_inputs`: the counts (a counts file, the counts cache or a counting pass, with the
   held-out and bootstrap tallies filled in the same pass), the evaluation sets' counts, the
   tokenizer (loaded once), V and the draft's architecture.
2. :func:`choose`: the latency model and objective, the pinned tokens, the search for k, the
   d2t/t2d mapping (checked) and the serving analysis.
3. :func:`write`: the payloads of every output file, committed as one group with the draft
   config's ``draft_vocab_size`` (writing/outputs.py).

The CLI, the scripts and the training hook only build settings and call :func:`optimize`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops, lm_head_share
from specforge_vocab.choosing.holdout import BootstrapTally, HoldoutTally
from specforge_vocab.choosing.latency import DraftLatencyModel, build_latency_model
from specforge_vocab.choosing.pins import PinnedToken, resolve_pinned_tokens
from specforge_vocab.choosing.search import SearchResult, SearchSettings, search
from specforge_vocab.choosing.serving import (
    ObjectiveChoice,
    ServingAnalysis,
    ServingSettings,
    analyse,
    choose_objective,
)
from specforge_vocab.counting.count import CountResult, count_dataset
from specforge_vocab.counting.counts_file import save_counts, template_from_metadata
from specforge_vocab.counting.engine import CountSettings, Tally
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import SettingsError, must
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT, json_text, safetensors_bytes, writable_dir_problem
from specforge_vocab.writing.draft_config import check_vocab_size, read_draft_config
from specforge_vocab.writing.mapping import check_mapping, mapping_from_counts, mapping_payloads
from specforge_vocab.writing.outputs import OUTPUT_FILES, commit_outputs
from specforge_vocab.writing.report import (
    full_results,
    render_coverage_curves,
    render_optimization_results,
    summary_dict,
)

logger = logging.getLogger(__name__)

LATENCY_LABELS = {"flops": "relative FLOPs", "bytes": "relative weight bytes", "measured": "measured time"}


def count_to_file(settings: CountSettings, *, output: str, progress: bool = False) -> CountResult:
    """Count ``settings`` and write the counts file (safetensors, tensor 'counts' + metadata)."""
    settings.validate()
    result = count_dataset(settings, progress=progress)
    save_counts(output, result.counts, result.metadata())
    logger.info("wrote %s", output)
    return result


@dataclass
class OutputSettings:
    """Where results go and which files are patched; one field per flag."""

    output_dir: str = "./cache/vocab_optimization"
    config_path: Optional[str] = None
    counts_path: Optional[str] = None
    cache_dir: str = "./cache"
    no_cache: bool = False
    backup: bool = True
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    def problems(self) -> List[str]:
        out = []
        problem = writable_dir_problem(self.output_dir)
        if problem:
            out.append(problem)
        if self.counts_path is not None and not os.path.isfile(self.counts_path):
            out.append(
                f"--counts {self.counts_path} does not exist. Write one with `specforge-vocab count ... --output FILE`."
            )
        if self.config_path is not None and not os.path.isfile(self.config_path):
            out.append(f"--config-path {self.config_path} does not exist. Point it at the draft model config JSON.")
        if not isinstance(self.lock_timeout, (int, float)) or self.lock_timeout < 0:
            out.append(must("--lock-timeout", "a number of seconds >= 0", self.lock_timeout))
        return out


@dataclass
class Inputs:
    """Everything the choice is made from (phase 1)."""

    counts: np.ndarray  # [V], every counted token
    metadata: Dict[str, str]  # what the counts file stores
    arch: DraftArchitecture
    config: Optional[Dict[str, Any]]  # the draft config, when --config-path is given
    count_result: Optional[CountResult] = None
    holdout: Optional[HoldoutTally] = None
    bootstrap: Optional[BootstrapTally] = None
    eval_counts: Dict[str, np.ndarray] = field(default_factory=dict)
    tokenizer: Any = None  # for resolving pinned token strings
    chat_template: Optional[ChatTemplate] = None

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def search_counts(self) -> np.ndarray:
        """What k is chosen on: the training split when records are held out, else every count."""
        return self.holdout.train if self.holdout is not None else self.counts


@dataclass
class Choice:
    """What was chosen (phase 2)."""

    result: SearchResult
    d2t: Any  # torch int64 [k]
    t2d: Any  # torch bool [V]
    analysis: ServingAnalysis
    latency_model: DraftLatencyModel
    objective: ObjectiveChoice
    pinned: List[PinnedToken]


@dataclass
class OptimizeResult:
    """Everything `optimize` decided and wrote."""

    search: SearchResult
    arch: DraftArchitecture
    counts: np.ndarray
    summary: Dict[str, object]
    files: Dict[str, str]
    config_backup: Optional[str] = None
    count_result: Optional[CountResult] = None
    analysis: Optional[ServingAnalysis] = None

    @property
    def k(self) -> int:
        return self.search.k

    def summary_lines(self) -> List[str]:
        s, arch, V = self.search, self.arch, self.search.vocab_size
        full, draft = draft_flops(arch, V), draft_flops(arch, s.k)
        lines = list(self.count_result.summary_lines()) if self.count_result is not None else []
        name = s.objective
        lines += [
            f"draft_vocab_size: {s.k:,} of {V:,} ({s.method} pick)  coverage {s.pick.coverage:.4%}  "
            f"{name} {s.pick.utility:.6f}",
        ]
        if s.exact is not None and s.tpe is not None:
            lines.append(
                f"TPE pick {s.tpe.pick.k:,} ({name} {s.tpe.pick.utility:.6f}) vs exact optimum "
                f"{s.exact.pick.k:,} ({name} {s.exact.pick.utility:.6f}); gap {s.utility_gap:.2e}"
            )
        lines.append(
            f"draft FLOPs per token: {full / 1e6:,.1f} M at V -> {draft / 1e6:,.1f} M at k "
            f"({1 - draft / full:.1%} less; LM head is {lm_head_share(arch):.1%} of draft FLOPs at V)"
        )
        if self.analysis is not None:
            lines += self.analysis.summary_lines()
        lines.append("wrote: " + ", ".join(self.files.values()))
        if self.config_backup:
            lines.append(f"backup of the original config: {self.config_backup}")
        return lines


# ---------------------------------------------------------------- the path


def optimize(
    count: CountSettings,
    search_settings: SearchSettings,
    output: OutputSettings,
    *,
    progress: bool = False,
    precounted: Optional[Tuple[np.ndarray, Dict[str, str]]] = None,
    serving: Optional[ServingSettings] = None,
) -> OptimizeResult:
    """Count (or load counts), choose k, write summary/results/plots/counts/mapping, patch the config.

    ``precounted`` = (counts, metadata) skips counting (the training hook counts pre-tokenized
    prompts and feature files itself). ``serving``: held-out split, evaluation sets, bootstrap,
    latency model, objective, pinned tokens; the defaults give the paper's choice.
    """
    serving = serving or ServingSettings()
    check_settings(count, search_settings, output, serving, counting=_counts_here(output, precounted))
    inputs = gather_inputs(count, search_settings, output, serving, precounted=precounted, progress=progress)
    choice = choose(inputs, search_settings, serving, cache_dir=output.cache_dir)
    summary, files, backup = write(inputs, choice, output, serving)
    return OptimizeResult(
        choice.result, inputs.arch, inputs.counts, summary, files, backup, inputs.count_result, choice.analysis
    )


def _counts_here(output: OutputSettings, precounted) -> bool:
    """True when this call counts the data itself (no counts file, nothing passed in)."""
    return output.counts_path is None and precounted is None


def check_settings(
    count: CountSettings,
    search_settings: SearchSettings,
    output: OutputSettings,
    serving: ServingSettings,
    *,
    counting: bool,
) -> None:
    """Every problem with the settings, all at once, before any work."""
    problems = output.problems() + search_settings.problems() + serving.problems()
    if counting:
        problems = count.problems() + problems
    elif serving.evaluation.needs_records:
        problems.append(
            "--holdout-fraction and --bootstrap must see each record as it is counted, but the counts "
            "come from --counts (or were passed in counted). Count from --dataset-path instead, or drop "
            "those flags (--eval-dataset-path works with a counts file)."
        )
    if problems:
        raise SettingsError(problems)


# ---------------------------------------------------------------- 1. gather inputs


def gather_inputs(
    count: CountSettings,
    search_settings: SearchSettings,
    output: OutputSettings,
    serving: ServingSettings,
    *,
    precounted: Optional[Tuple[np.ndarray, Dict[str, str]]] = None,
    progress: bool = False,
) -> Inputs:
    """The counts, evaluation counts, tokenizer, V and architecture the choice is made from."""
    counting = _counts_here(output, precounted)
    config = read_draft_config(output.config_path) if output.config_path else None
    config_v = config.get("vocab_size") if config else None
    if counting and count.target_vocab_size is None and config_v is not None:
        count = replace(count, target_vocab_size=config_v)  # count over the draft's V
    # The tokenizer, loaded once: for V when a tally needs it before counting, and for pinned strings.
    tokenizer = load_tokenizer(count.tokenizer_path, trust_remote_code=count.trust_remote_code) if counting else None
    tallies = _tallies(count, serving, search_settings, tokenizer, counting=counting)
    if precounted is not None:
        counts, metadata, count_result = precounted[0], precounted[1], None
    else:
        counted = obtain_counts(
            count if counting else None,
            counts_path=output.counts_path,
            cache_dir=None if output.no_cache else output.cache_dir,
            progress=progress,
            tallies=tallies,
        )
        counts, metadata, count_result = counted.counts, counted.metadata, counted.result
    if not counting:
        tokenizer = _tokenizer_named_by(count, metadata)
    chat_template = count.template() if counting else template_from_metadata(metadata, count.chat_template)
    if count_result is not None and tallies:
        tallies = list(count_result.tallies)
    V = int(counts.shape[0])
    if config is not None:
        tokenizer_length = (
            count_result.tokenizer_length if count_result else _int_or_none(metadata.get("tokenizer_length"))
        )
        check_vocab_size(config, source=output.config_path, tokenizer_length=tokenizer_length, counts_length=V)
        arch = DraftArchitecture.from_config(config, source=output.config_path)
    else:
        arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
        logger.warning("No --config-path: using the paper's Llama-3-8B draft shapes for the FLOPs model.")
    return Inputs(
        counts=counts,
        metadata=metadata,
        arch=arch,
        config=config,
        count_result=count_result,
        holdout=next((t for t in tallies if isinstance(t, HoldoutTally)), None),
        bootstrap=next((t for t in tallies if isinstance(t, BootstrapTally)), None),
        eval_counts=_count_eval_sets(serving.evaluation.eval_dataset_paths, count, metadata, V, counting=counting),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def _tokenizer_named_by(count: CountSettings, metadata: Dict[str, str]):
    """The tokenizer --tokenizer-path or the counts' metadata names, when it is a local directory, else None."""
    path = count.tokenizer_path or metadata.get("tokenizer_path")
    if not path or not os.path.isdir(path):
        return None
    return load_tokenizer(path, trust_remote_code=count.trust_remote_code)


def _tallies(
    count: CountSettings, serving: ServingSettings, search_settings: SearchSettings, tokenizer, *, counting: bool
) -> List[Tally]:
    """The held-out and bootstrap tallies the counting pass fills (none unless asked for)."""
    evaluation = serving.evaluation
    if not (counting and evaluation.needs_records):
        return []
    V = count.target_vocab_size or len(tokenizer)
    tallies: List[Tally] = []
    if evaluation.holdout_fraction > 0:
        tallies.append(HoldoutTally(V, evaluation.holdout_fraction))
    if evaluation.bootstrap > 0:
        tallies.append(
            BootstrapTally(
                V, evaluation.bootstrap, search_settings.random_state, holdout_fraction=evaluation.holdout_fraction
            )
        )
    return tallies


def _eval_count_settings(
    path: str, count: CountSettings, meta: Dict[str, str], vocab_size: int, *, counting: bool
) -> CountSettings:
    if counting or count.tokenizer_path:
        return replace(count, dataset_paths=[path], sample_size=None, target_vocab_size=vocab_size)
    missing = [key for key in ("tokenizer_path", "chat_template", "max_length") if not meta.get(key)]
    if missing:
        raise SettingsError(
            [
                f"--eval-dataset-path needs the tokenizer and template the counts were made with, but "
                f"the counts metadata lacks {', '.join(missing)}. Pass --tokenizer-path and "
                "--chat-template (and --max-length) with --counts."
            ]
        )
    return CountSettings(
        dataset_paths=[path],
        tokenizer_path=meta["tokenizer_path"],
        chat_template=meta["chat_template"],
        chat_template_file=meta.get("chat_template_file") or None,
        max_length=int(meta["max_length"]),
        is_preformatted=json.loads(meta.get("is_preformatted", "false")),
        train_only_last_turn=json.loads(meta.get("train_only_last_turn", "false")),
        target_vocab_size=vocab_size,
        trust_remote_code=count.trust_remote_code,
    )


def _count_eval_sets(
    paths, count: CountSettings, meta: Dict[str, str], vocab_size: int, *, counting: bool
) -> Dict[str, np.ndarray]:
    """Counts of each evaluation set (same tokenizer, template and mask as the training data), by name."""
    out: Dict[str, np.ndarray] = {}
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        for suffix in (".gz", ".jsonl", ".json"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        if name in out:
            name = path
        settings = _eval_count_settings(path, count, meta, vocab_size, counting=counting)
        out[name] = count_dataset(settings).counts
    return out


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- 2. choose


def choose(inputs: Inputs, search_settings: SearchSettings, serving: ServingSettings, *, cache_dir: str) -> Choice:
    """k (TPE and exact), the checked mapping and what serving gains at k."""
    arch, V = inputs.arch, inputs.vocab_size
    latency_model = build_latency_model(serving.latency, arch, cache_dir=cache_dir)
    objective = choose_objective(serving.objective, arch, latency_model=serving.latency.latency_model)
    pinned, pin_notes = resolve_pinned_tokens(
        serving.pins, vocab_size=V, tokenizer=inputs.tokenizer, chat_template=inputs.chat_template
    )
    pins = [t.id for t in pinned]
    result = search(
        inputs.search_counts,
        arch,
        search_settings,
        latency_model=latency_model,
        objective=objective.function,
        objective_name=objective.name,
        pinned_ids=pins,
    )
    d2t, t2d = mapping_from_counts(inputs.search_counts, result.k, pinned_ids=pins)
    check_mapping(d2t, t2d, draft_vocab_size=result.k, vocab_size=V, source="the new mapping")
    analysis = analyse(
        result,
        arch=arch,
        search_settings=search_settings,
        settings=serving,
        latency_model=latency_model,
        objective=objective,
        search_counts=inputs.search_counts,
        pinned=pinned,
        pin_notes=pin_notes,
        holdout=inputs.holdout,
        bootstrap=inputs.bootstrap,
        eval_counts=inputs.eval_counts,
    )
    return Choice(result, d2t, t2d, analysis, latency_model, objective, pinned)


# ---------------------------------------------------------------- 3. write


def write(
    inputs: Inputs, choice: Choice, output: OutputSettings, serving: ServingSettings
) -> Tuple[Dict[str, Any], Dict[str, str], Optional[str]]:
    """Every output file as one group, then the draft config; (summary, files written, config backup)."""
    result, counts = choice.result, inputs.counts
    settings = {
        "counting": dict(inputs.metadata),
        "output_dir": output.output_dir,
        "config_path": output.config_path,
        "counts_path": output.counts_path,
        "serving": serving.as_dict(),
    }
    summary = summary_dict(
        result,
        inputs.arch,
        tokens_counted=int(counts.sum()),
        unique_tokens=int(np.count_nonzero(counts)),
        settings=settings,
        additions=choice.analysis.summary(),
    )
    pt_bytes, st_bytes = mapping_payloads(
        choice.d2t, choice.t2d, draft_vocab_size=result.k, vocab_size=inputs.vocab_size
    )
    files = {role: os.path.join(output.output_dir, name) for role, name in OUTPUT_FILES.items()}
    payloads = {
        files["full_results"]: json_text(full_results(result)),
        files["plot"]: render_optimization_results(result, latency_label=LATENCY_LABELS[serving.latency.latency_model]),
        files["coverage_plot"]: render_coverage_curves(result, choice.analysis),
        files["counts"]: safetensors_bytes({"counts": np.ascontiguousarray(counts)}, inputs.metadata),
        files["mapping_pt"]: pt_bytes,
        files["mapping_safetensors"]: st_bytes,
        files["summary"]: json_text(summary),  # last: its presence means the set is complete
    }
    # One commit: the outputs swap in as a set, then the config (and its backup) follow; a crash in
    # between is completed by the next run (see writing/outputs.py).
    backup = commit_outputs(
        payloads,
        output_dir=output.output_dir,
        config_path=output.config_path,
        draft_vocab_size=result.k,
        backup=output.backup,
        lock_timeout=output.lock_timeout,
    )
    if output.config_path:
        files["config"] = output.config_path
    return summary, files, backup
