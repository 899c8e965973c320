"""Every command-line flag, defined once, with its default taken from its settings dataclass.

Each ``add_*_flags`` function adds one settings class's flags (as an argparse group) under
``dest`` names equal to the dataclass's field names; :func:`settings_from` then builds the
dataclass from the parsed flags, so a field without a flag on that command keeps the
dataclass default and no default is written twice.

>>> parser = Parser()
>>> add_search_flags(parser)
>>> settings_from(SearchSettings, parser.parse_args(["--n-calls", "100"])).n_calls
100
>>> settings_from(SearchSettings, parser.parse_args([])).coverage_weight == SearchSettings.coverage_weight
True

Every parser is a :class:`Parser`: a flag that takes several values keeps all of them when
repeated (``--dataset-path a --dataset-path b`` is ``--dataset-path a b``), a single-value flag
given twice is an error naming it, flags are never abbreviated, and ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import FrozenSet, Type, TypeVar

from specforge_vocab.choosing.holdout import EvaluationSettings
from specforge_vocab.choosing.latency import LATENCY_MODELS, MEASURE_DEVICES, LatencySettings
from specforge_vocab.choosing.objectives import (
    DEFAULT_DRAFT_STEPS,
    DEFAULT_P_FULL,
    DEFAULT_TARGET_COST_RATIO,
    OBJECTIVES,
    ObjectiveSettings,
)
from specforge_vocab.choosing.pins import PinSettings
from specforge_vocab.choosing.search import SEARCH_METHODS, SearchSettings
from specforge_vocab.choosing.serving import ServingSettings
from specforge_vocab.counting.engine import COUNT_SOURCES, DEVICES, CountSettings
from specforge_vocab.counting.templates import template_names
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT
from specforge_vocab.pipeline import OutputSettings
from specforge_vocab.writing.exports import EXPORT_FORMATS, IDS, SGLANG_TOKEN_MAP, SPECULATORS

EXPORT_HELP = {
    SGLANG_TOKEN_MAP: "sglang-token-map: token_map.pt for SGLang's --speculative-token-map (EAGLE/NEXTN drafts; "
    "EAGLE-3 drafts use their own d2t)",
    SPECULATORS: "speculators: token_freq.pt, d2t.npy and t2d.npy in vLLM speculators' layout",
    IDS: "ids: kept_ids.json (kept ids ascending, V and the mapping fingerprint)",
}

Settings = TypeVar("Settings")

# The namespace attribute that records which flags were given on the command line (by dest).
GIVEN_ATTRIBUTE = "_flags_given"


class Store(argparse.Action):
    """argparse's ``store`` under the house rules.

    A flag taking several values (nargs "+" or "*") given again adds its values to the first
    ones; a single-value flag given twice is an error naming it (argparse would keep the last
    value and silently drop the first). Each flag given is recorded (see :func:`flags_given`).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        given = set(getattr(namespace, GIVEN_ATTRIBUTE, ()))
        several = self.nargs in ("+", "*")
        if option_string is not None and self.dest in given and not several:
            parser.error(
                f"{option_string} was given twice (first {getattr(namespace, self.dest)!r}, then {values!r}); "
                "give it once"
            )
        if several and self.dest in given:
            values = [*getattr(namespace, self.dest), *values]
        elif several:
            values = list(values)
        if option_string is not None:
            given.add(self.dest)
            setattr(namespace, GIVEN_ATTRIBUTE, frozenset(given))
        setattr(namespace, self.dest, values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every flag with a value, without "(default: None)" or
    "(default: False)" noise, and not where the help text already states the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.nargs == 0
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default in ("", [])
            or "default" in text.lower()
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with the house rules (:class:`Store`, no abbreviations, every default in
    ``--help``); its sub-parsers are Parsers too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, Store)
        self.register("action", "store", Store)


def flags_given(args: argparse.Namespace) -> FrozenSet[str]:
    """The dests of the flags given on the command line (not those left at their defaults)."""
    return frozenset(getattr(args, GIVEN_ATTRIBUTE, ()))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a "must ... but got ..." message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, but got {value}")
    return value


def number(text: str):
    """argparse type: an int when the text is one, else a float (the settings' problems() judge it)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, but got {text!r}") from None


def settings_from(cls: Type[Settings], args: argparse.Namespace) -> Settings:
    """``cls`` (a settings dataclass) from parsed flags: each field takes the flag whose dest is its name."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


# ---------------------------------------------------------------- counting


def add_count_flags(parser: argparse.ArgumentParser, *, shard: bool = True) -> None:
    """The data, tokenizer, counting-source and parallelism flags of :class:`CountSettings` (which of the
    three data sources is given, exactly one, is checked by :meth:`CountSettings.problems`).

    ``shard=False`` leaves out ``--shard`` (for commands that need every record, e.g. optimize).
    """
    data = parser.add_argument_group("data (what SpecForge trains on: exactly one of the three sources)")
    data.add_argument(
        "--dataset-path",
        dest="dataset_paths",
        nargs="+",
        default=[],
        metavar="PATH",
        help="raw conversations (data.train_data_path): .jsonl, .json, optionally .gz, or directories, read in order",
    )
    data.add_argument(
        "--prompts-path",
        default=CountSettings.prompts_path,
        metavar="FILE",
        help="pre-tokenized prompts (data.prompts_path): JSONL records with input_ids and loss_mask",
    )
    data.add_argument(
        "--hidden-states-path",
        default=CountSettings.hidden_states_path,
        metavar="PATH",
        help="offline feature files (data.hidden_states_path): a *.ckpt / *.ckpt.gz file or the directory "
        "prepare_hidden_states.py wrote",
    )
    data.add_argument(
        "--dataset-weight",
        dest="dataset_weights",
        nargs="+",
        type=number,
        default=[],
        metavar="W",
        help="one whole-number weight per --dataset-path value, in order: each record of that path counts W "
        "times, as if the path appeared W times in SpecForge's one training file (default: all 1)",
    )
    data.add_argument(
        "--is-preformatted",
        action="store_true",
        default=CountSettings.is_preformatted,
        help="records hold rendered 'text' instead of 'conversations'",
    )
    data.add_argument(
        "--train-only-last-turn",
        action="store_true",
        default=CountSettings.train_only_last_turn,
        help="count only the last assistant turn",
    )
    data.add_argument(
        "--sample-size", type=positive_int, default=CountSettings.sample_size, help="count only the first N records"
    )
    data.add_argument(
        "--skip-invalid",
        action="store_true",
        default=CountSettings.skip_invalid,
        help="skip malformed records (reported) instead of stopping at the first",
    )
    tok = parser.add_argument_group("tokenizer and template")
    tok.add_argument(
        "--tokenizer-path", default=CountSettings.tokenizer_path, help="the target model's tokenizer directory"
    )
    tok.add_argument(
        "--chat-template",
        default=CountSettings.chat_template,
        metavar="NAME",
        help=f"the SpecForge chat template the target is trained with: {', '.join(template_names())}",
    )
    add_chat_template_file_flag(tok)
    tok.add_argument(
        "--max-length",
        type=positive_int,
        default=CountSettings.max_length,
        help="truncation length, as SpecForge's max_length",
    )
    tok.add_argument(
        "--target-vocab-size",
        type=positive_int,
        default=CountSettings.target_vocab_size,
        help="V, the target vocabulary size (default: the tokenizer's length)",
    )
    tok.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=CountSettings.trust_remote_code,
        help="allow the tokenizer to run its own code",
    )
    add_count_source_flags(parser, head_flags=True)
    par = parser.add_argument_group("parallelism")
    par.add_argument(
        "--num-workers",
        type=positive_int,
        default=CountSettings.num_workers,
        help="worker processes counting in parallel (default: one per core, or in this process "
        "for small data; 1 = count in this process)",
    )
    if shard:
        par.add_argument(
            "--shard",
            default=CountSettings.shard,
            metavar="I/N",
            help="count only the I-th of N deterministic shards of the records (0-based: record "
            "position %% N == I, after --sample-size); merge the N files with "
            "`specforge-vocab merge`",
        )


def add_count_source_flags(parser: argparse.ArgumentParser, *, head_flags: bool) -> None:
    """--count-source and --device of :class:`CountSettings`; ``head_flags`` adds --target-model-path and
    --lm-head-key (prepare reads those from the run config's model section instead)."""
    target = parser.add_argument_group("counting source (what the draft vocabulary is chosen by)")
    target.add_argument(
        "--count-source",
        choices=COUNT_SOURCES,
        default=CountSettings.count_source,
        help="tokens: the data's loss-masked tokens (default); target-argmax: the target's own prediction at each "
        "position SpecForge trains on, from offline features and the target's LM head (what the EAGLE-3 loss "
        "and greedy acceptance depend on)",
    )
    if head_flags:
        target.add_argument(
            "--target-model-path",
            default=CountSettings.target_model_path,
            metavar="DIR",
            help="the target model's directory (model.target_model_path); only its LM head is read. With "
            "--hidden-states-path the target-argmax coverage is reported whatever --count-source is",
        )
        target.add_argument(
            "--lm-head-key",
            default=CountSettings.lm_head_key,
            metavar="NAME",
            help=f"the LM head's tensor name (model.lm_head_key; default {CountSettings.lm_head_key}; tied-embedding "
            "targets: model.embed_tokens.weight)",
        )
    target.add_argument(
        "--device",
        choices=DEVICES,
        default=CountSettings.device,
        help="where the target's logits are computed (auto: CUDA when present, else every CPU core)",
    )


def add_chat_template_file_flag(group) -> None:
    """``--chat-template-file`` (count, optimize, trim, prepare, pre-step, scripts/train_eagle3.py)."""
    group.add_argument(
        "--chat-template-file",
        default=CountSettings.chat_template_file,
        metavar="FILE",
        help="a chat template you registered in SpecForge yourself (TEMPLATE_REGISTRY.register): its "
        "ChatTemplate fields (assistant_header, user_header, system_prompt, end_of_turn_token, parser_type, "
        "assistant_pattern_type, enable_thinking, ignore_token) as JSON or YAML; used instead of SpecForge's "
        "own template of that name",
    )


# ---------------------------------------------------------------- choosing


def add_search_flags(parser: argparse.ArgumentParser, *, prefix: str = "--") -> None:
    """The :class:`SearchSettings` flags; defaults are the paper tool's.

    ``prefix="--vocab-"`` names them ``--vocab-n-calls`` ... for scripts/train_eagle3.py, where they
    must never clash with SpecForge's own flags (``--vocab-multiple`` keeps its name).
    """

    def name(stem: str) -> str:
        return "--" + stem if prefix != "--" and stem.startswith("vocab-") else prefix + stem

    s = SearchSettings
    group = parser.add_argument_group("search (the paper's flags and defaults)")
    group.add_argument(
        name("coverage-weight"),
        dest="coverage_weight",
        type=float,
        default=s.coverage_weight,
        help="a in a*coverage + (1-a)*latency_reduction",
    )
    group.add_argument(
        name("min-coverage"),
        dest="min_coverage",
        type=float,
        default=s.min_coverage,
        help="minimum acceptable coverage (0 = none)",
    )
    group.add_argument(
        name("min-vocab-size"),
        dest="min_vocab_size",
        type=int,
        default=s.min_vocab_size,
        help="lower bound of the search range",
    )
    group.add_argument(
        name("max-vocab-size"),
        dest="max_vocab_size",
        type=int,
        default=s.max_vocab_size,
        help="upper bound of the search range",
    )
    group.add_argument(name("n-calls"), dest="n_calls", type=int, default=s.n_calls, help="number of TPE trials")
    group.add_argument(name("random-state"), dest="random_state", type=int, default=s.random_state, help="TPE seed")
    group.add_argument(
        name("search"),
        dest="search",
        choices=SEARCH_METHODS,
        default=s.search,
        help="which pick to use: the paper's TPE (default) or the exact optimum; both are reported",
    )
    group.add_argument(
        name("draft-vocab-size"),
        dest="draft_vocab_size",
        type=positive_int,
        default=s.draft_vocab_size,
        help="skip the search and use this k",
    )
    group.add_argument(
        name("vocab-multiple"),
        dest="vocab_multiple",
        type=positive_int,
        default=s.vocab_multiple,
        metavar="M",
        help="only multiples of M are candidates (vLLM and SGLang pad LM-head rows to a "
        "multiple of 64; default 1 = every k)",
    )
    group.add_argument(
        name("storage"),
        dest="storage",
        default=s.storage,
        metavar="URL",
        help="keep the TPE study in an Optuna RDB storage (e.g. sqlite:///study.db) so an "
        "interrupted search resumes; needs --study-name",
    )
    group.add_argument(
        name("study-name"),
        dest="study_name",
        default=s.study_name,
        metavar="NAME",
        help="the study's name in --storage",
    )


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The :class:`EvaluationSettings` flags: held-out split, evaluation sets, bootstrap."""
    e = EvaluationSettings
    group = parser.add_argument_group("evaluation (how far the coverage can be trusted)")
    group.add_argument(
        "--holdout-fraction",
        type=float,
        default=e.holdout_fraction,
        metavar="F",
        help="hold out this share of the records (split by a hash of each record's content) and "
        "choose k on the rest; coverage on both is reported (default 0 = off)",
    )
    group.add_argument(
        "--eval-dataset-path",
        dest="eval_dataset_paths",
        nargs="+",
        default=[],
        metavar="PATH",
        help="evaluation sets (e.g. other domains), counted with the same settings; coverage at k is reported for each",
    )
    group.add_argument(
        "--bootstrap",
        type=int,
        default=e.bootstrap,
        metavar="N",
        help="N Poisson-bootstrap replicates over conversations, seeded by --random-state: "
        "intervals for the chosen k and coverage at k (default 0 = off; memory 8*V*N bytes)",
    )
    group.add_argument(
        "--bootstrap-confidence",
        dest="confidence",
        type=float,
        default=e.confidence,
        help="level of the bootstrap intervals",
    )
    group.add_argument(
        "--min-token-count",
        type=int,
        default=e.min_token_count,
        help="warn when the chosen k keeps ids seen fewer than this many times",
    )


def add_domain_flags(parser: argparse.ArgumentParser) -> None:
    """--domain (:class:`EvaluationSettings`) and the floor --min-domain-coverage (:class:`SearchSettings`)."""
    group = parser.add_argument_group("domains (coverage per domain, and a floor for each)")
    group.add_argument(
        "--domain",
        dest="domains",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME=PATH", "PATH"),
        help="a domain and its data files or directories (repeat the flag for each domain); counted in the "
        "training pass when they are training files; coverage at k and along k is reported for each",
    )
    group.add_argument(
        "--min-domain-coverage",
        type=float,
        default=SearchSettings.min_domain_coverage,
        metavar="C",
        help="keep only draft vocabulary sizes where every --domain's coverage is at least C (TPE scores other "
        "trials -1.0, as below --min-coverage); the summary names the domain that binds (default 0 = no floor)",
    )


def add_latency_flags(parser: argparse.ArgumentParser) -> None:
    """The :class:`LatencySettings` flags: what a smaller LM head saves."""
    lat = LatencySettings
    group = parser.add_argument_group("latency model (what a smaller LM head saves)")
    group.add_argument(
        "--latency-model",
        choices=LATENCY_MODELS,
        default=lat.latency_model,
        help="flops: the paper's per-token FLOPs (default); bytes: weight bytes read per drafted "
        "token in the config's dtype (batch-1 decoding is memory bound); measured: time the "
        "draft layer and LM heads of several sizes on this machine and fit t = a + b*k "
        "(cached under --cache-dir/latency)",
    )
    group.add_argument(
        "--measure-device",
        choices=MEASURE_DEVICES,
        default=lat.measure_device,
        help="where --latency-model measured times the draft (auto: CUDA when present, else CPU)",
    )
    group.add_argument(
        "--measure-dtype",
        default=lat.measure_dtype,
        help="dtype to time in (default: the draft config's torch_dtype, else bfloat16)",
    )
    group.add_argument(
        "--measure-points",
        type=int,
        default=lat.measure_points,
        help="LM-head sizes timed, geometric up to V",
    )
    group.add_argument(
        "--measure-repeats",
        type=int,
        default=lat.measure_repeats,
        help="timings per size; the median is fitted",
    )
    group.add_argument(
        "--measure-context",
        type=int,
        default=lat.measure_context,
        help="KV-cache length the timed attention reads",
    )
    group.add_argument(
        "--measure-eager",
        dest="measure_cuda_graph",
        action="store_false",
        default=lat.measure_cuda_graph,
        help="on CUDA, time eager kernel launches instead of CUDA-graph replays (serving engines "
        "replay the draft as CUDA graphs)",
    )
    group.add_argument(
        "--no-latency-cache",
        dest="latency_cache",
        action="store_false",
        default=lat.latency_cache,
        help="always re-measure instead of reusing a cached fit",
    )


def add_objective_flags(parser: argparse.ArgumentParser) -> None:
    """The :class:`ObjectiveSettings` flags: what k is chosen for."""
    o = ObjectiveSettings
    group = parser.add_argument_group("objective (what k is chosen for)")
    group.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=o.objective,
        help="utility: the paper's a*coverage + (1-a)*latency_reduction (default); speedup: the "
        "expected speed-up of chain drafting, T(p_full*coverage)*R/(g*t_draft(k)/t_draft(V)+R)",
    )
    group.add_argument(
        "--p-full",
        type=float,
        default=o.p_full,
        help=f"acceptance rate of a drafted token with the full vocabulary (default {DEFAULT_P_FULL}: "
        "what published EAGLE-3 Llama-3.1-8B acceptance lengths imply; see "
        "choosing/objectives.py)",
    )
    group.add_argument(
        "--draft-steps",
        type=int,
        default=o.draft_steps,
        help=f"g, tokens drafted per cycle (default {DEFAULT_DRAFT_STEPS}, SGLang's chain examples)",
    )
    group.add_argument(
        "--target-cost-ratio",
        type=float,
        default=o.target_cost_ratio,
        metavar="R",
        help="t_target / t_draft(V), measured on your serving setup (default: from --target-config, "
        f"else {DEFAULT_TARGET_COST_RATIO}, Llama-3.1-8B over its draft by weight bytes)",
    )
    group.add_argument(
        "--target-config",
        default=o.target_config,
        metavar="CONFIG_JSON",
        help="the target model's config.json, to estimate R from per-token weight bytes (FLOPs "
        "with --latency-model flops)",
    )


def add_pin_flags(parser: argparse.ArgumentParser) -> None:
    """The :class:`PinSettings` flags: tokens always kept."""
    group = parser.add_argument_group("pinned tokens (always kept, counted toward k)")
    group.add_argument(
        "--pin-token",
        dest="pin_tokens",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="token strings or integer ids to keep whatever their counts",
    )
    group.add_argument(
        "--no-pin-special-tokens",
        dest="pin_special_tokens",
        action="store_false",
        default=PinSettings.pin_special_tokens,
        help="do not pin the template's end-of-turn token, the structural tokens it trains on (<think>, "
        "tool-call and harmony markers, when single tokens) and the tokenizer's EOS (pinned by default)",
    )


def add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of :class:`ServingSettings` (and the domain floor of :class:`SearchSettings`)."""
    add_evaluation_flags(parser)
    add_domain_flags(parser)
    add_latency_flags(parser)
    add_objective_flags(parser)
    add_pin_flags(parser)


def serving_settings(args: argparse.Namespace) -> ServingSettings:
    return ServingSettings(
        evaluation=settings_from(EvaluationSettings, args),
        latency=settings_from(LatencySettings, args),
        objective=settings_from(ObjectiveSettings, args),
        pins=settings_from(PinSettings, args),
    )


# ---------------------------------------------------------------- outputs


def add_output_flags(parser: argparse.ArgumentParser, *, output_dir_default: str = OutputSettings.output_dir) -> None:
    """The :class:`OutputSettings` flags: the draft config to patch, counts to reuse, where results go."""
    o = OutputSettings
    group = parser.add_argument_group("inputs and outputs")
    group.add_argument(
        "--config-path", default=o.config_path, help="draft config JSON whose draft_vocab_size is rewritten"
    )
    group.add_argument(
        "--counts",
        dest="counts_path",
        default=o.counts_path,
        metavar="FILE",
        help="reuse a counts file from `specforge-vocab count` instead of counting",
    )
    group.add_argument("--output-dir", default=output_dir_default, help="where results and the mapping are written")
    group.add_argument("--cache-dir", default=o.cache_dir, help="counts cache directory (as SpecForge's --cache-dir)")
    group.add_argument("--no-cache", action="store_true", default=o.no_cache, help="always recount")
    group.add_argument(
        "--no-backup", dest="backup", action="store_false", default=o.backup, help="do not keep <config>.bak"
    )
    add_lock_timeout_flag(group)
    add_export_flag(group)
    group.add_argument(
        "--ladder",
        nargs="+",
        type=positive_int,
        default=[],
        metavar="K",
        help="besides the chosen k, write ladder/k<K>/ for each K (the mapping, the --export files and a copy "
        "of --config-path with draft_vocab_size K) from the same counts, and a table of coverage and "
        "predicted speed-up per K",
    )


def add_export_flag(group, *, formats=EXPORT_FORMATS) -> None:
    group.add_argument(
        "--export",
        dest="exports",
        nargs="+",
        default=[],
        metavar="FORMAT",
        help="also write the mapping for other engines: " + "; ".join(EXPORT_HELP[f] for f in formats),
    )


def add_lock_timeout_flag(group) -> None:
    group.add_argument(
        "--lock-timeout",
        type=float,
        default=DEFAULT_LOCK_TIMEOUT,
        help="seconds to wait for another run holding the same output directory",
    )
