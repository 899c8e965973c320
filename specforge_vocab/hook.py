"""Before SpecForge training: count, choose k, patch the draft config and put the mapping where
SpecForge loads it, on rank 0 only, and skip all of it when nothing changed since the last time.

Three entry points share one path, :func:`before_training`:

* ``specforge-vocab prepare --config run.yaml [--set section.field=value ...]`` (newer SpecForge,
  ``specforge train --config``): sets ``model.vocab_mapping_path`` in the run config (in place
  with a ``.bak``, or in ``--output-config``). For ``data.hidden_states_path`` runs the mapping
  is also copied to SpecForge's own offline cache path when the target's vocab size is known.
* ``specforge-vocab pre-step -- <train_eagle3 flags>`` and ``scripts/train_eagle3.py`` (older
  SpecForge): writes the mapping at train_eagle3.py's md5 cache paths (both key versions); the
  script then hands over to SpecForge's own train_eagle3.py with the remaining flags. As there,
  lines of --train-data-path that are not valid JSON are skipped (and reported); with --resume
  (an existing --output-dir) or --ckpt-dir the draft weights fix draft_vocab_size, so it is kept.
* ``specforge_vocab.before_training(...)``.

Reuse. ``fingerprint.json`` in the output directory (written last) records what the outputs came
from, in two parts. *counting*: for raw conversations the counts cache's fingerprint (data files
by size and sha256, tokenizer files, template strings, max_length, mask options, V; see
:mod:`.cache`); for pre-tokenized prompts the file's size and sha256; for offline feature files
their paths, sizes and mtimes (the identity SpecForge itself uses: hashing hundreds of GB of
hidden states on every launch is not affordable). *choice*: the search settings, the draft
config without ``draft_vocab_size`` (with it under ``--keep-draft-vocab-size``). Both unchanged:
nothing is counted or searched; only *choice* changed: the stored counts are searched again;
otherwise the data are counted (raw conversations through the counts cache in
``<cache_dir>/counts``). ``force`` recomputes. The hand-over (draft_vocab_size in the
draft config, cache copies, ``model.vocab_mapping_path``) is re-applied on every call.

Ranks. Under torchrun (or in an initialised process group) every rank must call this: rank 0
plans, the ranks split the counting (:func:`~.distributed.count_dataset_distributed` for raw
data; record/file ``i % world_size`` for prompts and feature files) and sum with all_reduce,
rank 0 alone writes, and every rank then reads the same files back. An error on any rank is
raised on every rank with the same message. A gloo group started here lives under its own store
prefix and is destroyed on return, so the training script can start its own group afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import specforge as sf
from .errors import InputError, SpecForgeVocabError, short, where
from .fileio import atomic_write, file_lock, json_text, sha256_file
from .search import SearchSettings

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINT_FORMAT = "specforge-vocab-prepare"
FINGERPRINT_VERSION = 1
OUTPUT_SUBDIR = "vocab_optimization"
MAPPING_FILE = "vocab_mapping.pt"
COUNTS_FILE = "token_counts.safetensors"
SUMMARY_FILE = "summary.json"

CONVERSATIONS = "conversations"
PRETOKENIZED = "pretokenized"
FEATURES = "features"
SOURCE_NAMES = {
    CONVERSATIONS: "raw conversations",
    PRETOKENIZED: "pre-tokenized prompts (input_ids + loss_mask)",
    FEATURES: "offline feature files",
}


# --------------------------------------------------------------------------
# What to do
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data to count and how SpecForge masks it; ``path`` is absolute."""

    source: str                  # CONVERSATIONS | PRETOKENIZED | FEATURES
    field: str                   # where it was named: "data.train_data_path", "--train-data-path", ...
    path: str
    vocab_size: int              # V: the draft config's vocab_size
    max_length: int
    tokenizer_path: str = ""     # local tokenizer directory (raw conversations only)
    chat_template: str = sf.DEFAULT_CHAT_TEMPLATE
    is_preformatted: bool = False
    train_only_last_turn: bool = False
    trust_remote_code: bool = False
    skip_invalid: bool = False   # train_eagle3.py skips malformed lines (newer SpecForge refuses them)

    def count_settings(self):
        from .counting import CountSettings

        return CountSettings(
            dataset_paths=[self.path], tokenizer_path=self.tokenizer_path, chat_template=self.chat_template,
            max_length=self.max_length, is_preformatted=self.is_preformatted,
            train_only_last_turn=self.train_only_last_turn, target_vocab_size=self.vocab_size,
            trust_remote_code=self.trust_remote_code, skip_invalid=self.skip_invalid,
        )


@dataclasses.dataclass
class Plan:
    """Everything one prepare / pre-step call decided before counting (picklable: sent to every rank)."""

    data: DataSpec
    draft_config: str                       # absolute path of the draft config JSON
    search: SearchSettings                  # with draft_vocab_size set under keep
    keep_draft_vocab_size: bool
    keep_reason: str                        # "--keep-draft-vocab-size", "--resume", "--ckpt-dir" or ""
    output_dir: str
    cache_dir: str                          # absolute; holds the counts cache
    cwd: str
    force: bool = False
    backup: bool = True
    lock_timeout: float = 600.0
    run: Optional[sf.RunConfig] = None      # newer SpecForge
    output_config: Optional[str] = None
    overrides: Tuple[str, ...] = ()
    train_args: Optional[argparse.Namespace] = None  # older SpecForge
    target_vocab_size: Optional[int] = None  # the target model's own V, when its config.json is local


@dataclasses.dataclass
class PrepareResult:
    """What :func:`before_training` chose and where SpecForge will find it."""

    k: int
    mapping_path: str                       # absolute path of the .pt SpecForge loads
    summary: Dict[str, Any]                 # summary.json
    reused: bool                            # True: nothing counted or searched (inputs unchanged)
    action: str = "reuse"                   # "reuse" | "search" (stored counts) | "count"
    reason: str = ""
    output_dir: str = ""
    draft_config: str = ""
    cache_paths: List[str] = dataclasses.field(default_factory=list)  # md5 / sha256 copies SpecForge finds
    run_config: Optional[str] = None        # the file whose model.vocab_mapping_path was set
    overrides: Tuple[str, ...] = ()
    source: str = ""
    rank: int = 0

    def summary_lines(self) -> List[str]:
        s = self.summary
        verb = {"reuse": "reused (inputs unchanged)", "search": "searched again on the stored counts",
                "count": "counted and searched"}.get(self.action, self.action)
        lines = [f"{verb}: {self.reason}" if self.reason else verb,
                 f"data: {self.source}",
                 f"loss-masked tokens counted: {int(s.get('tokens_counted', 0)):,}  unique ids: "
                 f"{int(s.get('unique_tokens', 0)):,}",
                 f"draft_vocab_size: {self.k:,} of {s.get('target_vocab_size', 0):,}  coverage "
                 f"{float(s.get('coverage', 0.0)):.4%}  ({s.get('method')}), set in {self.draft_config}",
                 f"mapping: {self.mapping_path}"]
        lines += [f"  copy at SpecForge's cache path: {p}" for p in self.cache_paths]
        if self.run_config:
            lines.append(f"model.vocab_mapping_path set in {self.run_config}")
            command = f"specforge train --config {self.run_config}"
            if self.overrides:
                command += " " + " ".join(self.overrides)
                lines.append("pass `specforge train` the same overrides you gave prepare:")
            lines.append(f"next: {command}")
        return lines


@dataclasses.dataclass
class Decision:
    action: str            # "reuse" | "search" | "count"
    reason: str
    fingerprint: Dict[str, Any]


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

def before_training(
    run_config: Optional[str] = None,
    *,
    train_eagle3_args: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    output_config: Optional[str] = None,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = 600.0,
    progress: bool = False,
    cwd: Optional[str] = None,
) -> PrepareResult:
    """Prepare the draft vocabulary for a SpecForge run; call it on every rank.

    Give either ``run_config`` (a ``specforge train`` YAML/JSON, with ``overrides`` as
    ``section.field=value``) or ``train_eagle3_args`` (scripts/train_eagle3.py's flags; the other
    flags are ignored). Relative paths resolve from ``cwd`` (default: the current directory),
    as SpecForge resolves them.

    >>> result = before_training("configs/llama3-8b-eagle3-run.yaml")  # doctest: +SKIP
    >>> result.k, result.mapping_path, result.reused  # doctest: +SKIP
    (13264, '/abs/cache/vocab_optimization/.../vocab_mapping.pt', False)
    """
    if (run_config is None) == (train_eagle3_args is None):
        raise InputError("before_training needs exactly one of run_config (a `specforge train` config file) or "
                         "train_eagle3_args (scripts/train_eagle3.py's flags), but got "
                         f"{'both' if run_config is not None else 'neither'}.")
    if train_eagle3_args is not None and (overrides or output_config):
        raise InputError("overrides and output_config apply to a run config; with train_eagle3_args give the "
                         "values as train_eagle3 flags instead.")
    cwd = os.path.abspath(cwd or os.getcwd())
    search = search if search is not None else SearchSettings()
    search.validate()  # every search flag is checked before any work
    options = dict(keep_draft_vocab_size=keep_draft_vocab_size, force=force, search=search, output_dir=output_dir,
                   backup=backup, lock_timeout=lock_timeout, cwd=cwd)

    def make_plan() -> Plan:
        if run_config is not None:
            return plan_from_run_config(run_config, overrides=overrides, output_config=output_config, **options)
        return plan_from_train_eagle3_args(train_eagle3_args, **options)

    from .distributed import distributed_session

    with _process_group(), distributed_session() as session, contextlib.ExitStack() as held:
        rank = session.rank if session is not None else 0

        def plan_and_decide() -> Tuple[Plan, Decision]:
            plan = make_plan()
            # One prepare at a time per output directory (optimize locks the directory itself).
            held.enter_context(file_lock(plan.output_dir.rstrip("/\\") + ".prepare", timeout=plan.lock_timeout))
            return plan, decide(plan)

        plan, decision = _on_rank_zero(session, plan_and_decide)
        logger.info("%s: %s", decision.action, decision.reason)
        counted = None
        if decision.action == "count":
            counted = count_data(plan, session=session, progress=progress and rank == 0)
        info = _on_rank_zero(session, lambda: write_outputs(plan, decision, counted))
        return _agree(session, lambda: load_result(info, plan, rank=rank))


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------

def _search_for_keep(search: SearchSettings, draft_config: str, reason: str) -> SearchSettings:
    k, _vocab = sf.read_draft_vocab_sizes(draft_config)
    if search.draft_vocab_size is not None and search.draft_vocab_size != k:
        why = "keeps" if reason == "--keep-draft-vocab-size" else f"must keep (the draft weights of {reason} have it)"
        raise InputError(
            f"{reason} {why} draft_vocab_size {k} of {draft_config}, but --draft-vocab-size asks for "
            f"{search.draft_vocab_size}. Drop one of the two."
        )
    return dataclasses.replace(search, draft_vocab_size=k)


def _slug(text: str) -> str:
    name = os.path.basename(text.rstrip("/\\")) or "data"
    for suffix in (".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data")[:40]


def default_output_dir(cache_dir: str, data: DataSpec, draft_config: str) -> str:
    """``<cache_dir>/vocab_optimization/<data name>-<12 hex>``: the hex is a hash of the data path,
    its kind and the draft config path, so it stays the same while their contents change."""
    key = "\0".join([data.source, data.path, os.path.abspath(draft_config)])
    return os.path.join(cache_dir, OUTPUT_SUBDIR, f"{_slug(data.path)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def resolve_tokenizer_dir(target: str, *, cwd: str, field: str, source: str) -> str:
    """The target model's tokenizer directory: a local path (relative to ``cwd``), else the copy in the
    Hugging Face cache; never downloads."""
    local = sf.resolve_path(target, cwd=cwd)
    if os.path.isdir(local):
        return local
    with contextlib.suppress(Exception):
        from huggingface_hub import snapshot_download

        cached = snapshot_download(target, local_files_only=True)
        if os.path.isfile(os.path.join(cached, "tokenizer.json")):
            return cached
    raise InputError(
        f"{where(source, field=field)} is {target!r}: no local directory {local} and no copy in the Hugging Face "
        "cache, so there is no tokenizer to count with. Download the tokenizer first (huggingface-cli download "
        f"{target} --include 'tokenizer*' 'config.json') or point the field at a local model directory."
    )


def target_model_vocab_size(target: str, *, cwd: str) -> Optional[int]:
    """The target's own vocab size as SpecForge reads it (``padded_vocab_size`` or ``vocab_size``, from
    ``text_config`` when nested) from a local ``config.json``; None when there is none."""
    path = os.path.join(sf.resolve_path(target, cwd=cwd), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    value = (config.get("padded_vocab_size") or config.get("vocab_size")) if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _existing(path: str, *, raw: str, field: str, source: str, cwd: str) -> str:
    if not os.path.exists(path):
        raise InputError(
            f"{where(source, field=field)} is {raw!r}, but {path} does not exist. Relative paths start at the "
            f"current directory ({cwd}), as in SpecForge; run from the directory the config was written for or fix "
            "the path."
        )
    return path


def plan_from_run_config(config_path: str, *, overrides: Sequence[str] = (), output_config: Optional[str] = None,
                         keep_draft_vocab_size: bool = False, force: bool = False,
                         search: Optional[SearchSettings] = None, output_dir: Optional[str] = None,
                         backup: bool = True, lock_timeout: float = 600.0, cwd: Optional[str] = None) -> Plan:
    """What to count and write for a ``specforge train --config`` run."""
    cwd = os.path.abspath(cwd or os.getcwd())
    config_path = sf.resolve_path(os.fspath(config_path), cwd=cwd)
    overrides = tuple(overrides or ())
    for item in overrides:
        if isinstance(item, str) and item.split("=", 1)[0].strip() == "model.vocab_mapping_path":
            raise InputError(
                f"The override {item!r} sets model.vocab_mapping_path, which prepare writes itself; passing it to "
                "`specforge train` as well would load another mapping. Drop this override."
            )
    run = sf.read_run_config(config_path, overrides, cwd=cwd)
    draft = run.draft_config_file()
    _k, vocab = sf.read_draft_vocab_sizes(draft)
    field = f"data.{run.data_source}"
    path = _existing(run.resolved_data_path, raw=run.data_path, field=field, source=config_path, cwd=cwd)
    common = dict(field=field, path=path, vocab_size=vocab, max_length=run.max_length)
    source = {"train_data_path": CONVERSATIONS, "hidden_states_path": FEATURES}.get(run.data_source)
    if source is None:
        kind = sf.prompts_file_kind(path)
        if kind == "empty":
            raise InputError(f"{where(config_path, field=field)}: {path} holds no records. Point it at the prompts "
                             "file SpecForge trains on.")
        source = PRETOKENIZED if kind == "pretokenized" else CONVERSATIONS
    if source == CONVERSATIONS:
        data = DataSpec(source, **common, chat_template=run.chat_template, is_preformatted=run.is_preformatted,
                        train_only_last_turn=run.train_only_last_turn,
                        tokenizer_path=resolve_tokenizer_dir(run.target_model_path, cwd=cwd,
                                                             field="model.target_model_path", source=config_path),
                        trust_remote_code=sf._as_bool(run.raw["model"].get("trust_remote_code", False),
                                                      "model.trust_remote_code", config_path))
    else:
        data = DataSpec(source, **common)
    search = search if search is not None else SearchSettings()
    keep_reason = "--keep-draft-vocab-size" if keep_draft_vocab_size else ""
    if keep_reason:
        search = _search_for_keep(search, draft, keep_reason)
    cache_dir = run.resolved_cache_dir
    return Plan(
        data=data, draft_config=draft, search=search, keep_draft_vocab_size=bool(keep_reason),
        keep_reason=keep_reason,
        output_dir=sf.resolve_path(output_dir, cwd=cwd) if output_dir else default_output_dir(cache_dir, data, draft),
        cache_dir=cache_dir, cwd=cwd, force=force, backup=backup, lock_timeout=lock_timeout, run=run,
        output_config=sf.resolve_path(output_config, cwd=cwd) if output_config else None, overrides=overrides,
        target_vocab_size=target_model_vocab_size(run.target_model_path, cwd=cwd) if source == FEATURES else None,
    )


def plan_from_train_eagle3_args(argv: Sequence[str], *, keep_draft_vocab_size: bool = False, force: bool = False,
                                search: Optional[SearchSettings] = None, output_dir: Optional[str] = None,
                                backup: bool = True, lock_timeout: float = 600.0,
                                cwd: Optional[str] = None) -> Plan:
    """What to count and write for SpecForge's scripts/train_eagle3.py with these flags."""
    cwd = os.path.abspath(cwd or os.getcwd())
    args, _rest = sf.parse_train_eagle3_args(list(argv))
    source = "train_eagle3 flags"
    if args.ckpt_dir:
        ckpt = sf.resolve_path(args.ckpt_dir, cwd=cwd)
        if not os.path.isdir(ckpt):
            raise InputError(f"--ckpt-dir {args.ckpt_dir} is not a directory ({ckpt}); SpecForge would stop with the "
                             "same complaint. Point it at a draft checkpoint directory holding config.json.")
        draft = os.path.join(ckpt, "config.json")
        if not os.path.isfile(draft):
            raise InputError(f"--ckpt-dir {args.ckpt_dir} has no config.json, which train_eagle3.py reads the draft "
                             "shapes from. Point it at a checkpoint written by SpecForge.")
    else:
        draft = _existing(sf.resolve_path(sf.draft_config_path_from_args(args), cwd=cwd), raw=args.draft_model_config,
                          field="--draft-model-config", source=source, cwd=cwd)
    _k, vocab = sf.read_draft_vocab_sizes(draft)
    path = _existing(sf.resolve_path(args.train_data_path, cwd=cwd), raw=args.train_data_path,
                     field="--train-data-path", source=source, cwd=cwd)
    data = DataSpec(
        CONVERSATIONS, field="--train-data-path", path=path, vocab_size=vocab, max_length=args.max_length,
        tokenizer_path=resolve_tokenizer_dir(args.target_model_path, cwd=cwd, field="--target-model-path",
                                             source=source),
        chat_template=args.chat_template, is_preformatted=args.is_preformatted,
        train_only_last_turn=args.train_only_last_turn, trust_remote_code=args.trust_remote_code,
        # train_eagle3.py reads --train-data-path with safe_conversations_generator, which skips (and logs) lines
        # that are not valid JSON; count the same records.
        skip_invalid=True,
    )
    if getattr(args, "is_vlm", False):
        logger.warning("--is-vlm: the conversations' text is counted with the target tokenizer; image tokens "
                       "(never loss-masked in SpecForge) are not, so the counts cover the trained tokens only if "
                       "the chat template renders the replies as plain text.")
    keep_reason = ""
    if args.ckpt_dir:
        keep_reason = "--ckpt-dir"
    elif args.resume and args.output_dir and os.path.isdir(sf.resolve_path(args.output_dir, cwd=cwd)):
        keep_reason = "--resume"
    elif keep_draft_vocab_size:
        keep_reason = "--keep-draft-vocab-size"
    search = search if search is not None else SearchSettings()
    if keep_reason:
        if keep_reason != "--keep-draft-vocab-size":
            logger.warning("%s: the draft weights fix draft_vocab_size, so it is kept as in %s and only the mapping "
                           "is written (as with --keep-draft-vocab-size).", keep_reason, draft)
        search = _search_for_keep(search, draft, keep_reason)
    cache_dir = sf.resolve_path(args.cache_dir, cwd=cwd)
    return Plan(
        data=data, draft_config=draft, search=search, keep_draft_vocab_size=bool(keep_reason), keep_reason=keep_reason,
        output_dir=sf.resolve_path(output_dir, cwd=cwd) if output_dir else default_output_dir(cache_dir, data, draft),
        cache_dir=cache_dir, cwd=cwd, force=force, backup=backup, lock_timeout=lock_timeout, train_args=args,
    )


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------

def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _memo(plan: Plan):
    from .cache import memo_for

    return memo_for(plan.cache_dir)


def counting_identity(plan: Plan, memo=None) -> Dict[str, Any]:
    """Everything that decides the counts of ``plan.data`` (see the module docstring)."""
    from .cache import HashMemo, counting_fingerprint
    from .counting import COUNTING_VERSION

    memo = memo if memo is not None else HashMemo(None)
    data = plan.data
    if data.source == CONVERSATIONS:
        return {"source": CONVERSATIONS, "counts": counting_fingerprint(data.count_settings(), memo=memo)}
    if data.source == PRETOKENIZED:
        files = [{"size": os.path.getsize(data.path), "sha256": memo.sha256(data.path)}]
    else:
        files = []
        for path in sf.list_feature_files(data.path):
            stat = os.stat(path)
            files.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"source": data.source, "counting_version": COUNTING_VERSION, "files": files,
            "max_length": data.max_length, "vocab_size": data.vocab_size}


def choice_identity(plan: Plan) -> Dict[str, Any]:
    """Everything besides the counts that decides k and the mapping."""
    from .draft_config import read_draft_config

    config = dict(read_draft_config(plan.draft_config, required=()))
    if not plan.keep_draft_vocab_size:
        config.pop("draft_vocab_size", None)  # we write it: our own patch must not look like a change
    from . import __version__

    return {"tool_version": __version__, "search": dataclasses.asdict(plan.search),
            "keep_draft_vocab_size": plan.keep_draft_vocab_size,
            "draft_config_sha256": hashlib.sha256(_canonical(config).encode()).hexdigest()}


def fingerprint(plan: Plan, memo=None) -> Dict[str, Any]:
    return {"format": FINGERPRINT_FORMAT, "version": FINGERPRINT_VERSION,
            "counting": counting_identity(plan, memo), "choice": choice_identity(plan)}


def read_fingerprint(output_dir: str) -> Optional[Dict[str, Any]]:
    """The stored fingerprint, or None when absent or unreadable (then everything is recomputed)."""
    path = os.path.join(output_dir, FINGERPRINT_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("format") != FINGERPRINT_FORMAT \
            or stored.get("version") != FINGERPRINT_VERSION:
        return None
    return stored


def _first_difference(old: Any, new: Any, where_: str) -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{where_}.{key} {'added' if key not in old else 'removed'}"
            found = _first_difference(old[key], new[key], f"{where_}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{where_}: {len(old)} -> {len(new)} entries"
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{where_}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{where_}: {short(old, 60)} -> {short(new, 60)}"


def _outputs_intact(output_dir: str, stored: Dict[str, Any], names: Sequence[str]) -> Optional[str]:
    """None when every named output exists with its recorded sha256, else what is wrong."""
    recorded = (stored.get("result") or {}).get("sha256") or {}
    for name in names:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if recorded.get(name) != sha256_file(path):
            return f"{name} changed since it was written"
    return None


def decide(plan: Plan) -> Decision:
    """Reuse everything, search the stored counts again, or count (rank 0; reads only)."""
    from .outputs import recover_outputs

    recover_outputs(plan.output_dir, plan.draft_config)  # finish what an interrupted run left, if anything
    memo = _memo(plan)
    current = json.loads(json_text(fingerprint(plan, memo)))  # as it will read back from fingerprint.json
    stored = read_fingerprint(plan.output_dir)
    if plan.force:
        return Decision("count", "--force", current)
    if stored is None:
        return Decision("count", f"no earlier results in {plan.output_dir}", current)
    changed = _first_difference(stored.get("counting"), current["counting"], "counting")
    if changed:
        return Decision("count", f"input changed ({changed})", current)
    broken = _outputs_intact(plan.output_dir, stored, [COUNTS_FILE])
    if broken:
        return Decision("count", broken, current)
    memo.save()  # the data hashes are known good from here on (a count that fails saves nothing)
    changed = _first_difference(stored.get("choice"), current["choice"], "choice")
    if changed:
        return Decision("search", f"setting changed ({changed}); the data are unchanged", current)
    broken = _outputs_intact(plan.output_dir, stored, [MAPPING_FILE, SUMMARY_FILE])
    if broken:
        return Decision("search", broken, current)
    return Decision("reuse", f"same data, settings and draft config as in {plan.output_dir}", current)


# --------------------------------------------------------------------------
# Counting (every rank)
# --------------------------------------------------------------------------

def _local_masked_counts(data: DataSpec, rank: int, world_size: int,
                         stop: Optional[Callable[[], bool]]) -> np.ndarray:
    """This rank's counts of prompts records / feature files, with the record count appended."""
    from .counting import CountAborted

    if data.source == PRETOKENIZED:
        arrays = sf.iter_prompt_records(data.path, data.max_length, vocab_size=data.vocab_size, rank=rank,
                                        world_size=world_size)
    else:
        arrays = sf.iter_feature_files(data.path, data.max_length, vocab_size=data.vocab_size, rank=rank,
                                       world_size=world_size)
    records = 0

    def counted() -> Iterator[np.ndarray]:
        nonlocal records
        for ids in arrays:
            if stop is not None and stop():
                raise CountAborted("another rank failed")
            records += 1
            yield ids

    counts = sf.count_masked_ids(counted(), data.vocab_size)
    return np.concatenate([counts, np.array([records], dtype=np.int64)])


def _masked_metadata(data: DataSpec, counts: np.ndarray, records: int) -> Dict[str, str]:
    from .counting import FORMAT_VERSION

    paths = [data.path] if data.source == PRETOKENIZED else sf.list_feature_files(data.path)
    files = [{"path": p, "size": os.path.getsize(p)} for p in paths]
    return {
        "format": "specforge-vocab-counts", "format_version": FORMAT_VERSION,
        "source": f"{data.field} ({SOURCE_NAMES[data.source]})", "data_path": data.path,
        "files": json.dumps(files, ensure_ascii=False), "max_length": str(data.max_length),
        "vocab_size": str(data.vocab_size), "records_counted": str(records),
        "tokens_counted": str(int(counts.sum())), "unique_tokens": str(int(np.count_nonzero(counts))),
    }


def count_data(plan: Plan, *, session=None, progress: bool = False) -> Tuple[np.ndarray, Dict[str, str]]:
    """Counts [V] and their metadata for ``plan.data``; split over the ranks of ``session``."""
    data = plan.data
    if data.source == CONVERSATIONS:
        settings = data.count_settings()
        if session is None:
            from .cache import cached_count

            result, _hit = cached_count(settings, cache_dir=plan.cache_dir, progress=progress, force=plan.force)
        else:
            from .distributed import count_dataset_distributed

            result = count_dataset_distributed(settings, progress=progress, cache_dir=plan.cache_dir, force=plan.force)
        return result.counts, result.metadata()
    if session is None:
        local = _local_masked_counts(data, 0, 1, None)
        total = local
    else:
        import uuid

        key = _on_rank_zero(session, lambda: f"specforge_vocab/prepare-abort/{uuid.uuid4().hex}")
        local, _ = session.agree(lambda: _local_masked_counts(data, session.rank, session.world_size,
                                                              session.stop_flag(key)), abort_key=key)
        total = session.all_reduce_int64(local)
    counts, records = total[:-1].copy(), int(total[-1])
    if records == 0 or counts.sum() == 0:
        raise InputError(
            f"{data.field} {data.path}: no loss-masked tokens to count ({records} records read), so SpecForge would "
            "train on nothing. Check that loss_mask marks the assistant tokens, or point at the right data."
        )
    return counts, _masked_metadata(data, counts, records)


# --------------------------------------------------------------------------
# Writing (rank 0) and reading back (every rank)
# --------------------------------------------------------------------------

def _write_if_different(path: str, payload: bytes) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as handle:
            if handle.read() == payload:
                return False
    atomic_write(path, payload)
    return True


def cache_copy_paths(plan: Plan, k: int) -> List[str]:
    """Absolute paths where SpecForge looks for a cached mapping: train_eagle3's md5 keys (current,
    then legacy), or newer SpecForge's offline sha256 key for feature files."""
    paths = []
    if plan.train_args is not None:
        paths += [os.path.normpath(os.path.join(plan.cwd, p))
                  for p in sf.cache_mapping_paths(plan.train_args, plan.draft_config)]
    if plan.data.source == FEATURES and plan.run is not None:
        if plan.target_vocab_size is None:
            logger.info("The target model's config.json is not local, so the offline cache copy is skipped "
                        "(model.vocab_mapping_path is what SpecForge loads).")
        elif plan.target_vocab_size != plan.data.vocab_size:
            logger.warning("The target model's vocab size %d differs from the draft config's vocab_size %d; "
                           "SpecForge's own offline cache key would not match this mapping, so no copy is written there.",
                           plan.target_vocab_size, plan.data.vocab_size)
        else:
            paths.append(sf.offline_cache_mapping_path(plan.run, plan.target_vocab_size, k))
    return paths


def write_outputs(plan: Plan, decision: Decision,
                  counted: Optional[Tuple[np.ndarray, Dict[str, str]]]) -> Dict[str, Any]:
    """Rank 0: search and write (unless reused), then hand over; fingerprint.json goes last."""
    from .counting import CountSettings, load_counts
    from .draft_config import patch_draft_vocab_size
    from .pipeline import OutputSettings, optimize

    out = plan.output_dir
    fingerprint_path = os.path.join(out, FINGERPRINT_FILE)
    mapping = os.path.join(out, MAPPING_FILE)
    if decision.action == "reuse":
        with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as handle:
            k = int(json.load(handle)["optimal_draft_vocab_size"])
        if not plan.keep_draft_vocab_size:
            patch_draft_vocab_size(plan.draft_config, k, backup=plan.backup)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fingerprint_path)  # outputs are about to change: never pair old fingerprint with new files
        if counted is None:
            counted = load_counts(os.path.join(out, COUNTS_FILE), flag=f"the stored counts in {out}")
        count = plan.data.count_settings() if plan.data.source == CONVERSATIONS else CountSettings()
        result = optimize(count, plan.search,
                          OutputSettings(output_dir=out, config_path=plan.draft_config, backup=plan.backup,
                                         lock_timeout=plan.lock_timeout),
                          precounted=counted)
        k = result.k
    with open(mapping, "rb") as handle:
        payload = handle.read()
    copies = cache_copy_paths(plan, k)
    for path in copies:
        _write_if_different(path, payload)
    run_config = None
    if plan.run is not None:
        patched = sf.set_vocab_mapping_path(plan.run.config_path, mapping, output_path=plan.output_config,
                                            backup=plan.backup)
        run_config = patched.path
    sums = {name: sha256_file(os.path.join(out, name)) for name in (MAPPING_FILE, COUNTS_FILE, SUMMARY_FILE)}
    stored = dict(decision.fingerprint, result={"draft_vocab_size": k, "sha256": sums})
    if read_fingerprint(out) != json.loads(json_text(stored)):
        atomic_write(fingerprint_path, json_text(stored))
    return {"k": k, "mapping": mapping, "mapping_sha256": sums[MAPPING_FILE], "copies": copies,
            "run_config": run_config, "action": decision.action, "reason": decision.reason}


def load_result(info: Dict[str, Any], plan: Plan, *, rank: int = 0) -> PrepareResult:
    """Every rank: read back what rank 0 wrote (it must be visible here too) into a PrepareResult."""
    mapping = info["mapping"]
    for path in [mapping, *info["copies"]]:
        if not os.path.isfile(path) or sha256_file(path) != info["mapping_sha256"]:
            raise InputError(
                f"{path}, written by rank 0, is {'missing' if not os.path.isfile(path) else 'different'} on rank "
                f"{rank}. Every rank must see the same files: put the output and cache directories on a filesystem "
                "shared by all nodes (--output-dir, cache_dir), or run `specforge-vocab prepare` once before launching."
            )
    with open(os.path.join(plan.output_dir, SUMMARY_FILE), encoding="utf-8") as handle:
        summary = json.load(handle)
    return PrepareResult(
        k=int(info["k"]), mapping_path=mapping, summary=summary, reused=info["action"] == "reuse",
        action=info["action"], reason=info["reason"], output_dir=plan.output_dir, draft_config=plan.draft_config,
        cache_paths=list(info["copies"]), run_config=info["run_config"], overrides=tuple(plan.overrides),
        source=f"{plan.data.field} {plan.data.path} ({SOURCE_NAMES[plan.data.source]})", rank=rank,
    )


# --------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------

def _on_rank_zero(session, fn: Callable[[], Any]) -> Any:
    return fn() if session is None else session.on_rank_zero(fn)


def _agree(session, fn: Callable[[], Any]) -> Any:
    return fn() if session is None else session.agree(fn)[0]


_GROUPS_STARTED = 0


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Under torchrun with no process group yet, start a gloo group whose store keys live under a
    prefix of their own, and destroy it on exit.

    A group started with plain ``env://`` leaves its keys in torchrun's store under the names the
    training script's own ``init_process_group`` uses next (in this process, or after an exec),
    and that second start then intermittently fails or hangs.
    """
    global _GROUPS_STARTED
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    env = os.environ
    if not dist.is_available() or dist.is_initialized() or int(env.get("WORLD_SIZE", "1") or 1) <= 1 \
            or not all(env.get(name) for name in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        yield
        return
    from datetime import timedelta

    _GROUPS_STARTED += 1
    prefix = "specforge_vocab/{}/{}/{}".format(env.get("TORCHELASTIC_RUN_ID", "run"),
                                               env.get("TORCHELASTIC_RESTART_COUNT", "0"), _GROUPS_STARTED)
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(minutes=10)))
        dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=60))
    except Exception as exc:
        raise InputError(
            f"torchrun's environment is set (RANK={env.get('RANK')}, WORLD_SIZE={env.get('WORLD_SIZE')}, "
            f"MASTER_ADDR={env.get('MASTER_ADDR')}, MASTER_PORT={env.get('MASTER_PORT')}), but a gloo process group "
            f"cannot be started ({type(exc).__name__}: {exc}). Every rank must run the pre-step; or unset these "
            "variables to run it in one process."
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --------------------------------------------------------------------------
# Command line: prepare, pre-step, scripts/train_eagle3.py
# --------------------------------------------------------------------------

def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what prepare writes")
    group.add_argument("--keep-draft-vocab-size", action="store_true",
                       help="keep draft_vocab_size as the draft config has it; write only the mapping")
    group.add_argument("--force", action="store_true", help="recount and search again even if nothing changed")
    group.add_argument("--output-dir", default=None,
                       help="results directory (default: <cache_dir>/vocab_optimization/<data>-<hash>)")
    group.add_argument("--no-backup", dest="backup", action="store_false",
                       help="do not keep <file>.bak copies of the configs it changes")
    group.add_argument("--lock-timeout", type=float, default=600.0,
                       help="seconds to wait for another run holding the same output directory")
    SearchSettings.add_arguments(parser)


def add_prepare_parser(sub) -> None:
    parser = sub.add_parser(
        "prepare", help="before `specforge train --config`: choose k, write the mapping, set vocab_mapping_path",
        description="Count the tokens a SpecForge run config trains on (data.train_data_path, data.prompts_path or "
                    "data.hidden_states_path), choose draft_vocab_size, patch the draft config, write the d2t/t2d "
                    "mapping and set model.vocab_mapping_path in the run config. A second run with unchanged inputs "
                    "reuses the results.")
    parser.add_argument("--config", required=True, help="the run config (YAML, or JSON) given to `specforge train`")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides, as given to `specforge train` (pass it the same ones)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="section.field=value",
                        help="an override (repeatable; applied after the positional ones)")
    parser.add_argument("--output-config", default=None,
                        help="write the run config with vocab_mapping_path here instead of changing --config")
    _add_common_arguments(parser)
    parser.set_defaults(run=run_prepare_command)


def _say(args: argparse.Namespace, result: PrepareResult) -> None:
    from .cli import _say as say

    if result.rank == 0:
        say(args, *result.summary_lines())


def run_prepare_command(args: argparse.Namespace) -> int:
    result = before_training(
        args.config, overrides=[*args.overrides, *args.set_overrides], output_config=args.output_config,
        keep_draft_vocab_size=args.keep_draft_vocab_size, force=args.force, search=SearchSettings.from_args(args),
        output_dir=args.output_dir, backup=args.backup, lock_timeout=args.lock_timeout,
        progress=not getattr(args, "quiet", False),
    )
    _say(args, result)
    return 0


def add_pre_step_parser(sub) -> None:
    parser = sub.add_parser(
        "pre-step", help="before scripts/train_eagle3.py: choose k and write the mapping at its cache path",
        description="Run only the pre-step of scripts/train_eagle3.py: count --train-data-path, choose "
                    "draft_vocab_size, patch --draft-model-config and write the mapping at "
                    "<cache-dir>/vocab_mapping/<md5 key>.pt (both key versions), where train_eagle3.py loads it. "
                    "Usage: specforge-vocab pre-step [options] -- <train_eagle3 flags>.")
    _add_common_arguments(parser)
    parser.add_argument("train_eagle3_args", nargs=argparse.REMAINDER, metavar="-- FLAGS",
                        help="SpecForge's train_eagle3.py flags, after --")
    parser.set_defaults(run=run_pre_step_command)


def run_pre_step_command(args: argparse.Namespace) -> int:
    flags = list(args.train_eagle3_args)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    if not flags:
        raise InputError("pre-step needs SpecForge's train_eagle3 flags after --, for example: specforge-vocab "
                         "pre-step -- --target-model-path ./Llama-3.1-8B-Instruct --draft-model-config "
                         "configs/llama3-8B-eagle3.json --train-data-path train.jsonl")
    result = before_training(
        train_eagle3_args=flags, keep_draft_vocab_size=args.keep_draft_vocab_size, force=args.force,
        search=SearchSettings.from_args(args), output_dir=args.output_dir, backup=args.backup,
        lock_timeout=args.lock_timeout, progress=not getattr(args, "quiet", False),
    )
    _say(args, result)
    return 0


HANDOVER_PREFIX = "--vocab-"


def handover_parser() -> argparse.ArgumentParser:
    """scripts/train_eagle3.py's own flags; every other flag goes to SpecForge's train_eagle3.py.

    The search flags carry a ``--vocab-`` prefix there (``--vocab-n-calls 100``) so that they can never
    clash with SpecForge's flags.
    """
    parser = argparse.ArgumentParser(
        prog="scripts/train_eagle3.py", allow_abbrev=False,
        description="SpecForge's scripts/train_eagle3.py with the specforge-vocab pre-step: count --train-data-path, "
                    "choose draft_vocab_size, patch --draft-model-config, write the mapping at train_eagle3.py's "
                    "cache path, then run SpecForge's train_eagle3.py with all other flags unchanged. Under "
                    "torchrun every rank runs it; rank 0 writes.")
    parser.add_argument("--specforge-script", default=None, metavar="PATH",
                        help="SpecForge's scripts/train_eagle3.py (default: found next to an installed source "
                             "checkout of SpecForge)")
    parser.add_argument("--keep-draft-vocab-size", action="store_true",
                        help="keep draft_vocab_size as the draft config has it; write only the mapping")
    parser.add_argument(HANDOVER_PREFIX + "force", dest="force", action="store_true",
                        help="recount and search again even if nothing changed")
    parser.add_argument(HANDOVER_PREFIX + "output-dir", dest="output_dir", default=None,
                        help="results directory (default: <cache-dir>/vocab_optimization/<data>-<hash>)")
    parser.add_argument(HANDOVER_PREFIX + "no-backup", dest="backup", action="store_false",
                        help="do not keep a .bak of the draft config")
    search = argparse.ArgumentParser(add_help=False)
    SearchSettings.add_arguments(search)
    group = parser.add_argument_group("search (SearchSettings flags with a --vocab- prefix)")
    for action in search._actions:
        if not action.option_strings:
            continue
        name = action.option_strings[-1]
        name = name if name.startswith(HANDOVER_PREFIX) else HANDOVER_PREFIX + name[2:]
        options: Dict[str, Any] = dict(dest=action.dest, default=action.default, help=action.help)
        if action.nargs == 0:  # store_true and the like
            options.update(action="store_const", const=action.const)
        else:
            options.update(type=action.type, choices=action.choices, nargs=action.nargs, metavar=action.metavar)
        group.add_argument(name, **options)
    return parser


def split_handover_flags(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None
                         ) -> Tuple[List[str], List[str]]:
    """(our flags, SpecForge's flags), each in the given order; ``--flag value`` and ``--flag=value``."""
    parser = parser or handover_parser()
    takes_value = {}
    for action in parser._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    own: List[str] = []
    rest: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in takes_value and name not in ("-h", "--help"):
            own.append(token)
            if takes_value[name] and "=" not in token:
                if i + 1 >= len(argv):
                    raise InputError(f"{name} needs a value, but it is the last flag. Write {name} VALUE.")
                own.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    return own, rest


def hand_over(script: str, flags: Sequence[str]) -> None:  # pragma: no cover - replaces the process
    """Replace this process with ``python <script> <flags>`` (same interpreter, environment, rank)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    argv = [sys.executable, script, *flags]
    if os.name == "nt":
        import subprocess

        sys.exit(subprocess.call(argv))
    os.execv(sys.executable, argv)


def train_eagle3_main(argv: Optional[Sequence[str]] = None) -> int:
    """scripts/train_eagle3.py: the pre-step, then SpecForge's train_eagle3.py with the other flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = handover_parser()
    if any(token in ("-h", "--help") for token in argv):
        parser.print_help()
        print("\nEvery other flag is passed to SpecForge's train_eagle3.py unchanged.")
        return 0
    logging.basicConfig(level=logging.WARNING, format="specforge-vocab: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        own, flags = split_handover_flags(argv, parser)
        try:
            args = parser.parse_args(own)
        except SystemExit as exc:  # argparse already printed the problem
            return int(exc.code or 2)
        script = sf.find_specforge_train_script(args.specforge_script)
        result = before_training(train_eagle3_args=flags, keep_draft_vocab_size=args.keep_draft_vocab_size,
                                 force=args.force, search=SearchSettings.from_args(args), output_dir=args.output_dir,
                                 backup=args.backup, progress=True)
    except SpecForgeVocabError as exc:
        print(f"specforge-vocab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.rank == 0:
        for line in result.summary_lines():
            print(f"specforge-vocab: {line}")
        print(f"specforge-vocab: handing over to {script}")
    hand_over(script, flags)
    return 0  # pragma: no cover - hand_over does not return


__all__ = [
    "DataSpec", "Plan", "PrepareResult", "add_pre_step_parser", "add_prepare_parser", "before_training",
    "cache_copy_paths", "count_data", "decide", "default_output_dir", "fingerprint", "handover_parser",
    "plan_from_run_config", "plan_from_train_eagle3_args", "resolve_tokenizer_dir", "split_handover_flags",
    "target_model_vocab_size", "train_eagle3_main",
]
