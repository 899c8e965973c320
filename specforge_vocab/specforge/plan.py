"""What one prepare / pre-step call will do, decided before any counting: the data and how
SpecForge masks it, the draft config, the output directory and what must be kept.

A :class:`Plan` comes from a run config (:func:`plan_from_run_config`) or from train_eagle3.py's
flags (:func:`plan_from_train_eagle3_args`); it is picklable, so rank 0 makes it and sends it to
every rank.
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
from typing import Optional, Sequence, Tuple

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.templates import usable_template
from specforge_vocab.errors import InputError, where
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT
from specforge_vocab.specforge.data_files import prompts_file_kind
from specforge_vocab.specforge.run_config import (
    DEFAULT_CHAT_TEMPLATE,
    RunConfig,
    as_bool,
    read_run_config,
    resolve_path,
)
from specforge_vocab.specforge.train_eagle3 import draft_config_path_from_args, parse_train_eagle3_args
from specforge_vocab.writing.draft_config import read_draft_vocab_sizes

logger = logging.getLogger(__name__)


OUTPUT_SUBDIR = "vocab_optimization"


CONVERSATIONS = "conversations"


PRETOKENIZED = "pretokenized"


FEATURES = "features"


SOURCE_NAMES = {
    CONVERSATIONS: "raw conversations",
    PRETOKENIZED: "pre-tokenized prompts (input_ids + loss_mask)",
    FEATURES: "offline feature files",
}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data to count and how SpecForge masks it; ``path`` is absolute."""

    source: str  # CONVERSATIONS | PRETOKENIZED | FEATURES
    field: str  # where it was named: "data.train_data_path", "--train-data-path", ...
    path: str
    vocab_size: int  # V: the draft config's vocab_size
    max_length: int
    tokenizer_path: str = ""  # local tokenizer directory (raw conversations only)
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    chat_template_file: Optional[str] = (
        None  # absolute; SpecForge's ChatTemplate fields of a template registered in code
    )
    is_preformatted: bool = False
    train_only_last_turn: bool = False
    trust_remote_code: bool = False
    skip_invalid: bool = False  # train_eagle3.py skips malformed lines (newer SpecForge refuses them)
    legacy_reader: bool = False  # train_eagle3.py passes only conversations and tools to the parser

    def count_settings(self):

        return CountSettings(
            dataset_paths=[self.path],
            tokenizer_path=self.tokenizer_path,
            chat_template=self.chat_template,
            chat_template_file=self.chat_template_file,
            max_length=self.max_length,
            is_preformatted=self.is_preformatted,
            train_only_last_turn=self.train_only_last_turn,
            target_vocab_size=self.vocab_size,
            trust_remote_code=self.trust_remote_code,
            skip_invalid=self.skip_invalid,
            legacy_reader=self.legacy_reader,
        )


@dataclasses.dataclass
class Plan:
    """Everything one prepare / pre-step call decided before counting (picklable: sent to every rank)."""

    data: DataSpec
    draft_config: str  # absolute path of the draft config JSON
    search: SearchSettings  # with draft_vocab_size set under keep
    keep_draft_vocab_size: bool
    keep_reason: str  # "--keep-draft-vocab-size", "--resume", "--ckpt-dir" or ""
    output_dir: str
    cache_dir: str  # absolute; holds the counts cache
    cwd: str
    force: bool = False
    backup: bool = True
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    run: Optional[RunConfig] = None  # newer SpecForge
    output_config: Optional[str] = None
    overrides: Tuple[str, ...] = ()
    train_args: Optional[argparse.Namespace] = None  # older SpecForge
    target_vocab_size: Optional[int] = None  # the target model's own V, when its config.json is local


def _search_for_keep(search: SearchSettings, draft_config: str, reason: str) -> SearchSettings:
    k, _vocab = read_draft_vocab_sizes(draft_config)
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
    local = resolve_path(target, cwd=cwd)
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
    path = os.path.join(resolve_path(target, cwd=cwd), "config.json")
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


def _template_file(template_file: Optional[str], name: str, *, field: str, cwd: str) -> Optional[str]:
    """The absolute --chat-template-file (None without one), after checking that the template it names
    (or SpecForge's ``name`` from ``field``) is one SpecForge can train with."""
    path = resolve_path(template_file, cwd=cwd) if template_file else None
    usable_template(name, path, flag=field)
    return path


def _existing(path: str, *, raw: str, field: str, source: str, cwd: str) -> str:
    if not os.path.exists(path):
        raise InputError(
            f"{where(source, field=field)} is {raw!r}, but {path} does not exist. Relative paths start at the "
            f"current directory ({cwd}), as in SpecForge; run from the directory the config was written for or fix "
            "the path."
        )
    return path


def plan_from_run_config(
    config_path: str,
    *,
    overrides: Sequence[str] = (),
    output_config: Optional[str] = None,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    chat_template_file: Optional[str] = None,
    cwd: Optional[str] = None,
) -> Plan:
    """What to count and write for a ``specforge train --config`` run."""
    cwd = os.path.abspath(cwd or os.getcwd())
    config_path = resolve_path(os.fspath(config_path), cwd=cwd)
    overrides = tuple(overrides or ())
    for item in overrides:
        if isinstance(item, str) and item.split("=", 1)[0].strip() == "model.vocab_mapping_path":
            raise InputError(
                f"The override {item!r} sets model.vocab_mapping_path, which prepare writes itself; passing it to "
                "`specforge train` as well would load another mapping. Drop this override."
            )
    run = read_run_config(config_path, overrides, cwd=cwd)
    draft = run.draft_config_file()
    _k, vocab = read_draft_vocab_sizes(draft)
    field = f"data.{run.data_source}"
    path = _existing(run.resolved_data_path, raw=run.data_path, field=field, source=config_path, cwd=cwd)
    common = dict(field=field, path=path, vocab_size=vocab, max_length=run.max_length)
    source = {"train_data_path": CONVERSATIONS, "hidden_states_path": FEATURES}.get(run.data_source)
    if source is None:
        kind = prompts_file_kind(path)
        if kind == "empty":
            raise InputError(
                f"{where(config_path, field=field)}: {path} holds no records. Point it at the prompts "
                "file SpecForge trains on."
            )
        source = PRETOKENIZED if kind == "pretokenized" else CONVERSATIONS
    if source == CONVERSATIONS:
        data = DataSpec(
            source,
            **common,
            chat_template=run.chat_template,
            chat_template_file=_template_file(
                chat_template_file, run.chat_template, field=f"{config_path}: data.chat_template", cwd=cwd
            ),
            is_preformatted=run.is_preformatted,
            train_only_last_turn=run.train_only_last_turn,
            tokenizer_path=resolve_tokenizer_dir(
                run.target_model_path, cwd=cwd, field="model.target_model_path", source=config_path
            ),
            trust_remote_code=as_bool(
                run.raw["model"].get("trust_remote_code", False), "model.trust_remote_code", config_path
            ),
        )
    else:
        if chat_template_file:
            raise InputError(
                f"--chat-template-file applies to raw conversations, but {where(config_path, field=field)} holds "
                f"{SOURCE_NAMES[source]}, whose loss mask SpecForge takes as it is. Drop --chat-template-file."
            )
        data = DataSpec(source, **common)
    search = search if search is not None else SearchSettings()
    keep_reason = "--keep-draft-vocab-size" if keep_draft_vocab_size else ""
    if keep_reason:
        search = _search_for_keep(search, draft, keep_reason)
    cache_dir = run.resolved_cache_dir
    return Plan(
        data=data,
        draft_config=draft,
        search=search,
        keep_draft_vocab_size=bool(keep_reason),
        keep_reason=keep_reason,
        output_dir=resolve_path(output_dir, cwd=cwd) if output_dir else default_output_dir(cache_dir, data, draft),
        cache_dir=cache_dir,
        cwd=cwd,
        force=force,
        backup=backup,
        lock_timeout=lock_timeout,
        run=run,
        output_config=resolve_path(output_config, cwd=cwd) if output_config else None,
        overrides=overrides,
        target_vocab_size=target_model_vocab_size(run.target_model_path, cwd=cwd) if source == FEATURES else None,
    )


def plan_from_train_eagle3_args(
    argv: Sequence[str],
    *,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    chat_template_file: Optional[str] = None,
    cwd: Optional[str] = None,
) -> Plan:
    """What to count and write for SpecForge's scripts/train_eagle3.py with these flags."""
    cwd = os.path.abspath(cwd or os.getcwd())
    args, _rest = parse_train_eagle3_args(list(argv))
    source = "train_eagle3 flags"
    if args.ckpt_dir:
        ckpt = resolve_path(args.ckpt_dir, cwd=cwd)
        if not os.path.isdir(ckpt):
            raise InputError(
                f"--ckpt-dir {args.ckpt_dir} is not a directory ({ckpt}); SpecForge would stop with the "
                "same complaint. Point it at a draft checkpoint directory holding config.json."
            )
        draft = os.path.join(ckpt, "config.json")
        if not os.path.isfile(draft):
            raise InputError(
                f"--ckpt-dir {args.ckpt_dir} has no config.json, which train_eagle3.py reads the draft "
                "shapes from. Point it at a checkpoint written by SpecForge."
            )
    else:
        draft = _existing(
            resolve_path(draft_config_path_from_args(args), cwd=cwd),
            raw=args.draft_model_config,
            field="--draft-model-config",
            source=source,
            cwd=cwd,
        )
    _k, vocab = read_draft_vocab_sizes(draft)
    path = _existing(
        resolve_path(args.train_data_path, cwd=cwd),
        raw=args.train_data_path,
        field="--train-data-path",
        source=source,
        cwd=cwd,
    )
    data = DataSpec(
        CONVERSATIONS,
        field="--train-data-path",
        path=path,
        vocab_size=vocab,
        max_length=args.max_length,
        tokenizer_path=resolve_tokenizer_dir(
            args.target_model_path, cwd=cwd, field="--target-model-path", source=source
        ),
        chat_template=args.chat_template,
        chat_template_file=_template_file(chat_template_file, args.chat_template, field="--chat-template", cwd=cwd),
        is_preformatted=args.is_preformatted,
        train_only_last_turn=args.train_only_last_turn,
        trust_remote_code=args.trust_remote_code,
        # train_eagle3.py reads --train-data-path with safe_conversations_generator, which skips (and logs) lines
        # that are not valid JSON; count the same records.
        skip_invalid=True,
        legacy_reader=True,
    )
    if args.is_vlm:
        logger.warning(
            "--is-vlm: the conversations' text is counted with the target tokenizer; image tokens "
            "(never loss-masked in SpecForge) are not, so the counts cover the trained tokens only if "
            "the chat template renders the replies as plain text."
        )
    keep_reason = ""
    if args.ckpt_dir:
        keep_reason = "--ckpt-dir"
    elif args.resume and args.output_dir and os.path.isdir(resolve_path(args.output_dir, cwd=cwd)):
        keep_reason = "--resume"
    elif keep_draft_vocab_size:
        keep_reason = "--keep-draft-vocab-size"
    search = search if search is not None else SearchSettings()
    if keep_reason:
        if keep_reason != "--keep-draft-vocab-size":
            logger.warning(
                "%s: the draft weights fix draft_vocab_size, so it is kept as in %s and only the mapping "
                "is written (as with --keep-draft-vocab-size).",
                keep_reason,
                draft,
            )
        search = _search_for_keep(search, draft, keep_reason)
    cache_dir = resolve_path(args.cache_dir, cwd=cwd)
    return Plan(
        data=data,
        draft_config=draft,
        search=search,
        keep_draft_vocab_size=bool(keep_reason),
        keep_reason=keep_reason,
        output_dir=resolve_path(output_dir, cwd=cwd) if output_dir else default_output_dir(cache_dir, data, draft),
        cache_dir=cache_dir,
        cwd=cwd,
        force=force,
        backup=backup,
        lock_timeout=lock_timeout,
        train_args=args,
    )
