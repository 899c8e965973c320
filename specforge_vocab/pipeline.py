"""`optimize`, the one path, in three phases: gather inputs -> choose -> write.

1. :func:`gather_inputs`: the counts (a counts file, the counts cache or a counting pass, with the
   held-out, bootstrap, per-domain and per-path tallies filled in the same pass), the evaluation
   sets' and the other domains' counts, the tokenizer (loaded once), V and the draft's architecture.
2. :func:`choose`: the latency model and objective, the pinned tokens, the search for k (with the
   domain floors), the d2t/t2d mapping (checked), the serving analysis and each --ladder size.
3. :func:`write`: the payloads of every output file, the --export files and ladder/k<K>/ entries,
   committed as one group with the draft config's ``draft_vocab_size`` (writing/outputs.py).

The CLI, the scripts and the training hook only build settings and call :func:`optimize`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.choosing.cost import DraftArchitecture, draft_flops, lm_head_share
from specforge_vocab.choosing.domains import DomainCounts
from specforge_vocab.choosing.holdout import BootstrapTally, HoldoutTally
from specforge_vocab.choosing.ladder import LadderRow, check_ladder, ladder_lines, ladder_problems, ladder_rows
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
from specforge_vocab.counting.count import CountResult
from specforge_vocab.counting.counts_file import (
    counts_file_bytes,
    counts_file_conflicts,
    save_counts,
    template_from_metadata,
)
from specforge_vocab.counting.engine import NO_TOKENS, CountSettings, Tally, resolve_vocab_size
from specforge_vocab.counting.eval_sets import count_domains, count_eval_sets, domains_in_pass
from specforge_vocab.counting.file_tally import (
    FileGroupTally,
    dataset_path_tally,
    weighted_source_lines,
    weighted_sources,
)
from specforge_vocab.counting.sources import Counted, obtain_counts
from specforge_vocab.counting.templates import ChatTemplate, check_template_fits
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError, SettingsError, must
from specforge_vocab.fileio import (
    DEFAULT_LOCK_TIMEOUT,
    json_text,
    output_file_problem,
    replaceable_file_problem,
    writable_dir_problem,
)
from specforge_vocab.writing.draft_config import check_vocab_size, read_draft_config
from specforge_vocab.writing.exports import export_problems, mapping_files
from specforge_vocab.writing.mapping import check_mapping, kept_ids_from_d2t, mapping_fingerprint, mapping_from_counts
from specforge_vocab.writing.outputs import LADDER_DIR, OPTIONAL_OUTPUTS, OUTPUT_FILES, commit_outputs, ladder_files
from specforge_vocab.writing.report import (
    full_results,
    render_coverage_curves,
    render_optimization_results,
    summary_dict,
)

logger = logging.getLogger(__name__)

LATENCY_LABELS = {"flops": "relative FLOPs", "bytes": "relative weight bytes", "measured": "measured time"}


def count_to_file(settings: CountSettings, *, output: str, progress: bool = False) -> Counted:
    """Count ``settings`` and write the counts file (safetensors: tensor 'counts', the other count
    sources beside it, metadata).

    A weighted count (--dataset-weight) also tallies each path, reported in ``result.sources``."""
    problems = settings.problems() + [p for p in [output_file_problem(output)] if p]
    if problems:  # all of them, before counting
        raise SettingsError(problems)
    tally = tokenizer = None
    if settings.reads_conversations:  # loaded once (cached) for the fit check and V; a wrong template warns now
        tokenizer = load_tokenizer(settings.tokenizer_path, trust_remote_code=settings.trust_remote_code)
        check_template_fits(settings.template(), tokenizer)
    if settings.file_weights() is not None:
        tally = dataset_path_tally(settings, resolve_vocab_size(tokenizer, settings.target_vocab_size))
    counted = obtain_counts(settings, progress=progress, tallies=[tally] if tally else [])
    if tally is not None:
        counted.result.sources = weighted_sources(settings, counted.result.tallies[0])
    if int(counted.counts.sum()) == 0 and settings.shard_spec() is None:
        logger.warning("%s The counts file is written all the same.", NO_TOKENS)
    save_counts(output, counted.counts, counted.metadata, counted.by_source)
    logger.info("wrote %s", output)
    return counted


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
    exports: List[str] = field(default_factory=list)  # --export: formats of writing/exports.py
    ladder: List[int] = field(default_factory=list)  # --ladder: sizes written under ladder/k<K>/

    def problems(self) -> List[str]:
        out = export_problems(self.exports) + ladder_problems(self.ladder)
        problem = writable_dir_problem(self.output_dir)
        if problem:
            out.append(problem)
        if self.counts_path is not None and not os.path.isfile(self.counts_path):
            out.append(
                f"--counts {self.counts_path} does not exist. Write one with `specforge-vocab count ... --output FILE`."
            )
        if self.config_path is not None and not os.path.isfile(self.config_path):
            out.append(f"--config-path {self.config_path} does not exist. Point it at the draft model config JSON.")
        elif self.config_path is not None and replaceable_file_problem(self.config_path, "--config-path"):
            out.append(replaceable_file_problem(self.config_path, "--config-path"))
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
    by_source: Dict[str, np.ndarray] = field(default_factory=dict)  # every count source counted (coverage report)
    count_lines: List[str] = field(default_factory=list)  # what the counting read, for the printed summary
    holdout: Optional[HoldoutTally] = None
    bootstrap: Optional[BootstrapTally] = None
    eval_counts: Dict[str, np.ndarray] = field(default_factory=dict)
    tokenizer: Any = None  # for resolving pinned token strings
    chat_template: Optional[ChatTemplate] = None
    domains: Optional[DomainCounts] = None  # --domain counts (each record once)
    sources: List[Dict[str, Any]] = field(default_factory=list)  # per --dataset-path, when weighted
    cache_hit: bool = False  # the counts came from the counts cache

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
    ladder: List[Tuple[LadderRow, Any, Any]] = field(default_factory=list)  # (row, d2t, t2d) per --ladder K


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
    ladder: List[LadderRow] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    count_lines: List[str] = field(default_factory=list)
    cache_hit: bool = False

    @property
    def k(self) -> int:
        return self.search.k

    def summary_lines(self) -> List[str]:
        s, arch, V = self.search, self.arch, self.search.vocab_size
        full, draft = draft_flops(arch, V), draft_flops(arch, s.k)
        lines = list(self.count_lines)
        if self.cache_hit:
            lines.insert(
                0, "counts reused from the counts cache (same data, tokenizer and settings; --no-cache recounts)"
            )
        if self.summary.get("datasets"):
            lines += weighted_source_lines(self.summary["datasets"])
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
        lines += ladder_lines(self.ladder)
        lines += [f"note: {note}" for note in self.notes]
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
    precounted: Optional[Counted] = None,
    serving: Optional[ServingSettings] = None,
    draft_config: Optional[Dict[str, Any]] = None,
    count_flags_given: Optional[Collection[str]] = None,
) -> OptimizeResult:
    """Count (or load counts), choose k, write summary/results/plots/counts/mapping, patch the config.

    ``precounted`` (from :func:`~specforge_vocab.counting.sources.obtain_counts`) skips counting (the
    training hook counts across ranks itself). ``serving``: held-out split, evaluation sets, bootstrap,
    latency model, objective, pinned tokens; the defaults give the paper's choice.
    ``draft_config``: the draft config as a dict when it is no file to patch (prepare's config
    derived from the target, or a checkpoint's); it gives V and the architecture.
    ``count_flags_given``: the CountSettings fields set on the command line; with ``--counts``
    each must equal what the counts file records (see counting/counts_file.counts_file_conflicts).
    """
    serving = serving or ServingSettings()
    if _counts_here(output, precounted):
        count = with_config_vocab_size(count, output.config_path)
    check_settings(
        count,
        search_settings,
        output,
        serving,
        counting=_counts_here(output, precounted),
        count_flags_given=count_flags_given,
    )
    inputs = gather_inputs(
        count, search_settings, output, serving, precounted=precounted, progress=progress, draft_config=draft_config
    )
    choice = choose(inputs, search_settings, serving, cache_dir=output.cache_dir, ladder=output.ladder)
    summary, files, backup = write(inputs, choice, output, serving)
    return OptimizeResult(
        choice.result,
        inputs.arch,
        inputs.counts,
        summary,
        files,
        backup,
        inputs.count_result,
        choice.analysis,
        [row for row, _, _ in choice.ladder],
        list(summary.get("exports", {}).get("notes", [])),
        inputs.count_lines,
        inputs.cache_hit,
    )


def _counts_here(output: OutputSettings, precounted) -> bool:
    """True when this call counts the data itself (no counts file, nothing passed in)."""
    return output.counts_path is None and precounted is None


def with_config_vocab_size(count: CountSettings, config_path: Optional[str]) -> CountSettings:
    """Count over the draft config's vocab_size when no V is given (an unreadable config is reported later)."""
    if count.target_vocab_size is not None or not config_path or not os.path.isfile(config_path):
        return count
    try:
        vocab_size = read_draft_config(config_path).get("vocab_size")
    except InputError:
        return count
    return replace(count, target_vocab_size=vocab_size) if isinstance(vocab_size, int) else count


def check_settings(
    count: CountSettings,
    search_settings: SearchSettings,
    output: OutputSettings,
    serving: ServingSettings,
    *,
    counting: bool,
    count_flags_given: Optional[Collection[str]] = None,
) -> None:
    """Every problem with the settings, all at once, before any work."""
    problems = output.problems() + search_settings.problems() + serving.problems()
    if search_settings.min_domain_coverage and not serving.evaluation.domains:
        problems.append(
            "--min-domain-coverage needs the domains it applies to, but no --domain was given. Add "
            "--domain NAME=PATH [PATH ...] for each domain, or drop --min-domain-coverage."
        )
    evaluation = serving.evaluation
    if counting:
        problems = count.problems() + problems
        raw = count.reads_conversations
        if evaluation.needs_records and not raw:
            problems.append(
                f"--holdout-fraction and --bootstrap split raw conversation records, but the data come from "
                f"{count.source_flag}. Drop those flags (--eval-dataset-path still works, with --tokenizer-path)."
            )
        if evaluation.eval_dataset_paths and not raw and not count.tokenizer_path:
            problems.append(
                "--eval-dataset-path holds raw conversations, which must be tokenized, but got no --tokenizer-path "
                f"(the data of {count.source_flag} are token ids already). Pass the target's tokenizer directory."
            )
    elif output.counts_path is not None:
        problems = counts_file_conflicts(count, output.counts_path, count_flags_given) + problems
    if not counting and count.dataset_weights:
        problems.append(
            "--dataset-weight weights the files counted from --dataset-path, but the counts come from --counts "
            "(or were passed in counted). Weight them when counting (`specforge-vocab count --dataset-weight ...`) "
            "or count here from --dataset-path."
        )
    if not counting and evaluation.needs_records:
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
    precounted: Optional[Counted] = None,
    progress: bool = False,
    draft_config: Optional[Dict[str, Any]] = None,
) -> Inputs:
    """The counts, evaluation counts, tokenizer, V and architecture the choice is made from."""
    counting = _counts_here(output, precounted)
    if draft_config is not None and output.config_path:
        raise ValueError("gather_inputs: pass the draft config as a file (config_path) or as a dict, not both")
    config_source = output.config_path or "the draft config"
    config = read_draft_config(output.config_path) if output.config_path else draft_config
    config_v = config.get("vocab_size") if config else None
    if counting and count.target_vocab_size is None and isinstance(config_v, int):
        count = replace(count, target_vocab_size=config_v)  # count over the draft's V
    # The tokenizer, loaded once: for V when a tally needs it before counting, and for pinned strings.
    loads = counting and (count.reads_conversations or count.tokenizer_path)
    tokenizer = load_tokenizer(count.tokenizer_path, trust_remote_code=count.trust_remote_code) if loads else None
    tallies = _tallies(count, serving, search_settings, tokenizer, counting=counting)
    domain_paths = serving.evaluation.domain_paths
    vocab_guess = count.target_vocab_size or (len(tokenizer) if tokenizer is not None else 0)
    in_pass = domains_in_pass(count, domain_paths) if counting else {}
    if in_pass:
        tallies.append(FileGroupTally(in_pass, vocab_guess, flag="--domain"))
    path_tally = dataset_path_tally(count, vocab_guess) if counting else None
    if path_tally is not None:
        tallies.append(path_tally)
    counted = precounted or obtain_counts(
        count if counting else None,
        counts_path=output.counts_path,
        cache_dir=None if output.no_cache else output.cache_dir,
        progress=progress,
        tallies=tallies,
    )
    counts, metadata, count_result = counted.counts, counted.metadata, counted.result
    cache_hit = counted.cache_hit
    if not counting:
        tokenizer = _tokenizer_named_by(count, metadata)
    chat_template = count.template() if counting else template_from_metadata(metadata, count.chat_template)
    if count_result is not None and tallies:
        tallies = list(count_result.tallies)
    groups = {t.flag: t for t in tallies if isinstance(t, FileGroupTally)}
    V = int(counts.shape[0])
    if config is not None:
        tokenizer_length = (
            count_result.tokenizer_length if count_result else _int_or_none(metadata.get("tokenizer_length"))
        )
        check_vocab_size(config, source=config_source, tokenizer_length=tokenizer_length, counts_length=V)
        arch = DraftArchitecture.from_config(config, source=config_source)
    else:
        arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
        logger.warning("No --config-path: using the paper's Llama-3-8B draft shapes for the FLOPs model.")
    return Inputs(
        counts=counts,
        metadata=metadata,
        arch=arch,
        config=config,
        count_result=count_result,
        by_source=dict(counted.by_source),
        count_lines=counted.summary_lines(),
        holdout=next((t for t in tallies if isinstance(t, HoldoutTally)), None),
        bootstrap=next((t for t in tallies if isinstance(t, BootstrapTally)), None),
        eval_counts=count_eval_sets(serving.evaluation.eval_dataset_paths, count, metadata, V, counting=counting),
        tokenizer=tokenizer,
        chat_template=chat_template,
        domains=_domain_counts(domain_paths, groups.get("--domain"), count, metadata, V, counting=counting),
        sources=weighted_sources(count, groups["--dataset-path"]) if "--dataset-path" in groups else [],
        cache_hit=cache_hit,
    )


def _domain_counts(
    domain_paths: Dict[str, List[str]],
    tally: Optional[FileGroupTally],
    count: CountSettings,
    meta: Dict[str, str],
    vocab_size: int,
    *,
    counting: bool,
) -> Optional[DomainCounts]:
    """Each --domain's counts, from the training pass's tally where it has them (None without --domain)."""
    if not domain_paths:
        return None
    in_pass = {name: tally.counts_of(name) for name in tally.names} if tally is not None else {}
    counts = count_domains(domain_paths, in_pass, count, meta, vocab_size, counting=counting)
    return DomainCounts(counts, dict(domain_paths), list(tally.names) if tally is not None else [])


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


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- 2. choose


def choose(
    inputs: Inputs,
    search_settings: SearchSettings,
    serving: ServingSettings,
    *,
    cache_dir: str,
    ladder: Sequence[int] = (),
) -> Choice:
    """k (TPE and exact), the checked mapping, what serving gains at k, and each ``ladder`` size's
    mapping and table row (the first K ids of the same order: what ``--draft-vocab-size K`` keeps)."""
    arch, V = inputs.arch, inputs.vocab_size
    latency_model = build_latency_model(serving.latency, arch, cache_dir=cache_dir)
    objective = choose_objective(serving.objective, arch, latency_model=serving.latency.latency_model)
    pinned, pin_notes = resolve_pinned_tokens(
        serving.pins, vocab_size=V, tokenizer=inputs.tokenizer, chat_template=inputs.chat_template
    )
    pins = [t.id for t in pinned]
    ladder = check_ladder(ladder, vocab_size=V, pinned=len(pins))  # before the search: nothing is lost
    domain_counts = inputs.domains.counts if inputs.domains is not None else None
    result = search(
        inputs.search_counts,
        arch,
        search_settings,
        latency_model=latency_model,
        objective=objective.function,
        objective_name=objective.name,
        pinned_ids=pins,
        domain_counts=domain_counts,
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
        domains=inputs.domains,
        by_source=inputs.by_source,
        count_source=inputs.metadata.get("count_source", "tokens"),
    )
    rows = ladder_rows(
        ladder,
        search_counts=inputs.search_counts,
        pinned_ids=pins,
        latency_reduction=latency_model,
        relative_time=latency_model.relative_time,
        speedup=objective.speedup,
        objective=objective.function,
        coverage_weight=search_settings.coverage_weight,
        held_out=inputs.holdout.held_out if inputs.holdout is not None else None,
        eval_counts=inputs.eval_counts,
        domain_counts=domain_counts,
    )
    rungs = []
    for row in rows:
        rung_d2t, rung_t2d = mapping_from_counts(inputs.search_counts, row.k, pinned_ids=pins)  # checked there
        rungs.append((row, rung_d2t, rung_t2d))
    return Choice(result, d2t, t2d, analysis, latency_model, objective, pinned, rungs)


# ---------------------------------------------------------------- 3. write


def write(
    inputs: Inputs, choice: Choice, output: OutputSettings, serving: ServingSettings
) -> Tuple[Dict[str, Any], Dict[str, str], Optional[str]]:
    """Every output file (with the exports and the ladder) as one group, then the draft config;
    (summary, files written, config backup)."""
    result, counts, V = choice.result, inputs.counts, inputs.vocab_size
    main_files, notes = mapping_files(
        choice.d2t, choice.t2d, vocab_size=V, counts=inputs.search_counts, exports=output.exports
    )
    ladder_payloads, ladder_summary, ladder_notes = ladder_files(
        [(row.as_dict(), d2t, t2d) for row, d2t, t2d in choice.ladder],
        output_dir=output.output_dir,
        vocab_size=V,
        counts=inputs.search_counts,
        exports=output.exports,
        config_path=output.config_path,
    )
    settings = {
        "counting": dict(inputs.metadata),
        "output_dir": output.output_dir,
        "config_path": output.config_path,
        "counts_path": output.counts_path,
        "exports": list(output.exports),
        "ladder": list(output.ladder),
        "serving": serving.as_dict(),
    }
    export_names = [name for name in main_files if name not in OUTPUT_FILES.values()]
    additions = {
        **choice.analysis.summary(),
        "datasets": inputs.sources or None,
        "exports": {
            "formats": list(output.exports),
            "files": export_names,
            "mapping_fingerprint": mapping_fingerprint(kept_ids_from_d2t(choice.d2t), V),
            "notes": list(dict.fromkeys(notes + ladder_notes)),
        },
        "ladder": ladder_summary,
    }
    summary = summary_dict(
        result,
        inputs.arch,
        tokens_counted=int(counts.sum()),
        unique_tokens=int(np.count_nonzero(counts)),
        settings=settings,
        additions=additions,
    )
    summary["mapping_fingerprint"] = additions["exports"]["mapping_fingerprint"]
    files = {role: os.path.join(output.output_dir, name) for role, name in OUTPUT_FILES.items()}
    payloads = {
        **ladder_payloads,
        files["full_results"]: json_text(full_results(result)),
        files["plot"]: render_optimization_results(result, latency_label=LATENCY_LABELS[serving.latency.latency_model]),
        files["coverage_plot"]: render_coverage_curves(result, choice.analysis),
        files["counts"]: counts_file_bytes(counts, inputs.metadata, inputs.by_source),
        **{os.path.join(output.output_dir, name): data for name, data in main_files.items()},
    }
    payloads[files["summary"]] = json_text(summary)  # last: its presence means the set is complete
    # One commit: the outputs swap in as a set, then the config (and its backup) follow; a crash in
    # between is completed by the next run (see writing/outputs.py). An earlier run's exports and
    # ladder that this run does not write go in the same commit.
    backup = commit_outputs(
        payloads,
        output_dir=output.output_dir,
        config_path=output.config_path,
        draft_vocab_size=result.k,
        backup=output.backup,
        lock_timeout=output.lock_timeout,
        owned=OPTIONAL_OUTPUTS,
    )
    files.update({name: os.path.join(output.output_dir, name) for name in export_names})
    if ladder_summary:
        sizes = ",".join(str(r["draft_vocab_size"]) for r in ladder_summary)
        files["ladder"] = os.path.join(output.output_dir, LADDER_DIR, f"k{{{sizes}}}")
    if output.config_path:
        files["config"] = output.config_path
    return summary, files, backup
