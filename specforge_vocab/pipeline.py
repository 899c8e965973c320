"""The one path: read data -> render and mask -> count -> cost model -> search -> mapping -> outputs.

The CLI, the scripts and the training hook only build settings and call these functions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple
import numpy as np
from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops, lm_head_share
from specforge_vocab.choosing.holdout import BootstrapTally, HoldoutTally
from specforge_vocab.choosing.latency import build_latency_model
from specforge_vocab.choosing.pins import resolve_pinned_tokens
from specforge_vocab.choosing.search import SearchResult, SearchSettings, search
from specforge_vocab.choosing.serving import ServingAnalysis, ServingSettings, analyse, choose_objective
from specforge_vocab.counting.cache import cached_count
from specforge_vocab.counting.count import CountResult, count_dataset
from specforge_vocab.counting.counts_file import load_counts, save_counts
from specforge_vocab.counting.engine import CountSettings, Tally
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import SettingsError, must
from specforge_vocab.fileio import json_text, safetensors_bytes, writable_dir_problem
from specforge_vocab.writing.draft_config import check_vocab_size, read_draft_config
from specforge_vocab.writing.mapping import _mapping_payloads, check_mapping, mapping_from_counts
from specforge_vocab.writing.outputs import commit_outputs
from specforge_vocab.writing.report import full_results, render_coverage_curves, render_optimization_results, summary_dict
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT

logger = logging.getLogger(__name__)


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
            out.append(f"--counts {self.counts_path} does not exist. Write one with `specforge-vocab count ... --output FILE`.")
        if self.config_path is not None and not os.path.isfile(self.config_path):
            out.append(f"--config-path {self.config_path} does not exist. Point it at the draft model config JSON.")
        if not isinstance(self.lock_timeout, (int, float)) or self.lock_timeout < 0:
            out.append(must("--lock-timeout", "a number of seconds >= 0", self.lock_timeout))
        return out


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
            lines.append(f"TPE pick {s.tpe.pick.k:,} ({name} {s.tpe.pick.utility:.6f}) vs exact optimum "
                         f"{s.exact.pick.k:,} ({name} {s.exact.pick.utility:.6f}); gap {s.utility_gap:.2e}")
        lines.append(f"draft FLOPs per token: {full / 1e6:,.1f} M at V -> {draft / 1e6:,.1f} M at k "
                     f"({1 - draft / full:.1%} less; LM head is {lm_head_share(arch):.1%} of draft FLOPs at V)")
        if self.analysis is not None:
            lines += self.analysis.summary_lines()
        lines.append("wrote: " + ", ".join(self.files.values()))
        if self.config_backup:
            lines.append(f"backup of the original config: {self.config_backup}")
        return lines


def resolve_counts(count: CountSettings, output: OutputSettings, *, vocab_size: Optional[int],
                   progress: bool = False, tallies: Sequence[Tally] = ()) -> Tuple[np.ndarray, Optional[CountResult], Dict[str, str]]:
    """Counts from --counts, else counted (V from the draft config when it has one), filling ``tallies``."""
    if output.counts_path is not None:
        counts, metadata = load_counts(output.counts_path)
        return counts, None, metadata
    if count.target_vocab_size is None and vocab_size is not None:
        count = replace(count, target_vocab_size=vocab_size)
    if output.no_cache:
        result = count_dataset(count, progress=progress, tallies=tallies)
    else:

        result, hit = cached_count(count, cache_dir=output.cache_dir, progress=progress, tallies=tallies)
        if hit:
            logger.warning("Reusing the counts cached in %s (same data, tokenizer and settings; --no-cache recounts).",
                           os.path.join(output.cache_dir, "counts"))
    return result.counts, result, result.metadata()


def optimize(count: CountSettings, search_settings: SearchSettings, output: OutputSettings, *,
             progress: bool = False, precounted: Optional[Tuple[np.ndarray, Dict[str, str]]] = None,
             serving: Optional[ServingSettings] = None) -> OptimizeResult:
    """Count (or load counts), choose k, write summary/results/plots/counts/mapping, patch the config.

    ``precounted`` = (counts, metadata) skips counting (used by the training hook's other readers).
    ``serving`` (issue 6): held-out split, evaluation sets, bootstrap, latency model, objective,
    pinned tokens; the defaults give the paper's choice.
    """
    serving = serving or ServingSettings()
    counting = output.counts_path is None and precounted is None
    problems = output.problems() + search_settings.problems() + serving.problems()
    if counting:
        problems = count.problems() + problems
    elif serving.evaluation.needs_records:
        problems.append("--holdout-fraction and --bootstrap must see each record as it is counted, but the counts "
                        "come from --counts (or were passed in counted). Count from --dataset-path instead, or drop "
                        "those flags (--eval-dataset-path works with a counts file).")
    if problems:
        raise SettingsError(problems)
    config = read_draft_config(output.config_path) if output.config_path else None
    config_v = config.get("vocab_size") if config else None
    evaluation = serving.evaluation
    tallies: List[Tally] = []
    if counting and evaluation.needs_records:
        expected_v = count.target_vocab_size or config_v or len(
            load_tokenizer(count.tokenizer_path, trust_remote_code=count.trust_remote_code))
        if evaluation.holdout_fraction > 0:
            tallies.append(HoldoutTally(expected_v, evaluation.holdout_fraction))
        if evaluation.bootstrap > 0:
            tallies.append(BootstrapTally(expected_v, evaluation.bootstrap, search_settings.random_state,
                                          holdout_fraction=evaluation.holdout_fraction))
    if precounted is not None:
        (counts, counts_meta), count_result = precounted, None
    else:
        counts, count_result, counts_meta = resolve_counts(count, output, vocab_size=config_v, progress=progress,
                                                           tallies=tallies)
    if count_result is not None and tallies:
        tallies = list(count_result.tallies)
    holdout_tally = next((t for t in tallies if isinstance(t, HoldoutTally)), None)
    bootstrap_tally = next((t for t in tallies if isinstance(t, BootstrapTally)), None)
    V = int(counts.shape[0])
    if config is not None:
        tokenizer_length = count_result.tokenizer_length if count_result else _int_or_none(counts_meta.get("tokenizer_length"))
        check_vocab_size(config, source=output.config_path, tokenizer_length=tokenizer_length, counts_length=V)
        arch = DraftArchitecture.from_config(config, source=output.config_path)
    else:
        arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
        logger.warning("No --config-path: using the paper's Llama-3-8B draft shapes for the FLOPs model.")
    latency_model = build_latency_model(serving.latency, arch, cache_dir=output.cache_dir)
    objective = choose_objective(serving.objective, arch, latency_model=serving.latency.latency_model)
    tokenizer, template = _tokenizer_for_pins(count, counts_meta, counting=counting)
    pinned, pin_notes = resolve_pinned_tokens(serving.pins, vocab_size=V, tokenizer=tokenizer, chat_template=template)
    search_counts = holdout_tally.train if holdout_tally is not None else counts
    pins = [t.id for t in pinned]
    result = search(search_counts, arch, search_settings, latency_model=latency_model, objective=objective.function,
                    objective_name=objective.name, pinned_ids=pins)
    d2t, t2d = mapping_from_counts(search_counts, result.k, pinned_ids=pins)
    check_mapping(d2t, t2d, draft_vocab_size=result.k, vocab_size=V, source="the new mapping")
    eval_counts = _count_eval_sets(evaluation.eval_dataset_paths, count, counts_meta, V, counting=counting)
    analysis = analyse(result, arch=arch, search_settings=search_settings, settings=serving,
                       latency_model=latency_model, objective=objective, search_counts=search_counts, pinned=pinned,
                       pin_notes=pin_notes, holdout=holdout_tally, bootstrap=bootstrap_tally, eval_counts=eval_counts)

    extra = {"counting": {k: v for k, v in counts_meta.items()}, "output_dir": output.output_dir,
             "config_path": output.config_path, "counts_path": output.counts_path}
    tokens = int(counts.sum())
    extra["serving"] = serving.as_dict()
    summary = summary_dict(result, arch, tokens_counted=tokens, unique_tokens=int(np.count_nonzero(counts)),
                           settings=extra, additions=analysis.summary())

    mapping_meta = {"draft_vocab_size": str(result.k), "vocab_size": str(V), "format": "specforge-vocab-mapping"}
    pt_bytes, st_bytes = _mapping_payloads(d2t, t2d, mapping_meta)
    d = output.output_dir
    files = {
        "summary": os.path.join(d, "summary.json"),
        "full_results": os.path.join(d, "full_results.json"),
        "plot": os.path.join(d, "optimization_results.png"),
        "coverage_plot": os.path.join(d, "coverage_curves.png"),
        "counts": os.path.join(d, "token_counts.safetensors"),
        "mapping_pt": os.path.join(d, "vocab_mapping.pt"),
        "mapping_safetensors": os.path.join(d, "vocab_mapping.safetensors"),
    }
    payloads = {
        files["full_results"]: json_text(full_results(result)),
        files["plot"]: render_optimization_results(result, latency_label=LATENCY_LABELS[serving.latency.latency_model]),
        files["coverage_plot"]: render_coverage_curves(result, analysis),
        files["counts"]: safetensors_bytes({"counts": np.ascontiguousarray(counts)}, counts_meta),
        files["mapping_pt"]: pt_bytes,
        files["mapping_safetensors"]: st_bytes,
        files["summary"]: json_text(summary),  # last: its presence means the set is complete
    }
    # One commit: the outputs swap in as a set, then the config (and its backup) follow; a crash in
    # between is completed by the next run (see outputs.commit_outputs).
    backup = commit_outputs(payloads, output_dir=d, config_path=output.config_path, draft_vocab_size=result.k,
                            backup=output.backup, lock_timeout=output.lock_timeout)
    if output.config_path:
        files["config"] = output.config_path
    return OptimizeResult(result, arch, counts, summary, files, backup, count_result, analysis)


LATENCY_LABELS = {"flops": "relative FLOPs", "bytes": "relative weight bytes", "measured": "measured time"}


def _tokenizer_for_pins(count: CountSettings, meta: Dict[str, str], *, counting: bool):
    """(tokenizer or None, chat template name or None) for resolving pinned token strings."""
    path = count.tokenizer_path or (meta.get("tokenizer_path") if not counting else None)
    template = count.chat_template if counting else (meta.get("chat_template") or count.chat_template)
    if not path or not os.path.isdir(path):
        return None, template
    return load_tokenizer(path, trust_remote_code=count.trust_remote_code), template


def _eval_count_settings(path: str, count: CountSettings, meta: Dict[str, str], vocab_size: int, *,
                         counting: bool) -> CountSettings:
    if counting or count.tokenizer_path:
        return replace(count, dataset_paths=[path], sample_size=None, target_vocab_size=vocab_size)
    missing = [key for key in ("tokenizer_path", "chat_template", "max_length") if not meta.get(key)]
    if missing:
        raise SettingsError([f"--eval-dataset-path needs the tokenizer and template the counts were made with, but "
                             f"the counts metadata lacks {', '.join(missing)}. Pass --tokenizer-path and "
                             "--chat-template (and --max-length) with --counts."])
    return CountSettings(dataset_paths=[path], tokenizer_path=meta["tokenizer_path"],
                         chat_template=meta["chat_template"], max_length=int(meta["max_length"]),
                         is_preformatted=json.loads(meta.get("is_preformatted", "false")),
                         train_only_last_turn=json.loads(meta.get("train_only_last_turn", "false")),
                         target_vocab_size=vocab_size, trust_remote_code=count.trust_remote_code)


def _count_eval_sets(paths: Sequence[str], count: CountSettings, meta: Dict[str, str], vocab_size: int, *,
                     counting: bool) -> Dict[str, np.ndarray]:
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
