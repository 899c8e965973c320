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
import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.pretokenized import prompts_file_kind
from specforge_vocab.counting.target_head import read_target_config, target_vocab_size
from specforge_vocab.counting.templates import usable_template
from specforge_vocab.errors import InputError, SettingsError, where
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT, replaceable_file_problem
from specforge_vocab.specforge.continuing import (
    RESUME,
    WARM_START,
    Continuation,
    check_config_fits,
    find_continuation,
    find_old_continuation,
    warm_start_config_file,
)
from specforge_vocab.specforge.draft_derivation import SPECFORGE_DERIVED_DRAFT_VOCAB_SIZE, derive_draft_config
from specforge_vocab.specforge.run_config import (
    DEFAULT_CHAT_TEMPLATE,
    RunConfig,
    as_bool,
    read_run_config,
    resolve_path,
)
from specforge_vocab.specforge.train_eagle3 import draft_config_path_from_args, parse_train_eagle3_args
from specforge_vocab.specforge.yaml_patch import run_config_with_fields
from specforge_vocab.writing.draft_config import read_draft_config, read_draft_vocab_sizes
from specforge_vocab.writing.outputs import MAPPING_FILE

logger = logging.getLogger(__name__)


OUTPUT_SUBDIR = "vocab_optimization"


#: the draft config prepare derives from the target (no model.draft_model_config), in its output directory
DERIVED_CONFIG_FILE = "draft_config.json"


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
    count_source: str = "tokens"  # features only: "target-argmax" counts the target's own predictions
    target_model_path: Optional[str] = None  # with target-argmax: where the target's LM head is read
    lm_head_key: str = CountSettings.lm_head_key
    device: str = CountSettings.device
    legacy_reader: bool = False  # train_eagle3.py passes only conversations and tools to the parser

    def count_settings(self) -> CountSettings:
        """The settings that count this data through counting/sources.py's obtain_counts."""
        if self.source == PRETOKENIZED:
            return CountSettings(prompts_path=self.path, max_length=self.max_length, target_vocab_size=self.vocab_size)
        if self.source == FEATURES:
            return CountSettings(
                hidden_states_path=self.path,
                max_length=self.max_length,
                target_vocab_size=self.vocab_size,
                count_source=self.count_source,
                target_model_path=self.target_model_path,
                lm_head_key=self.lm_head_key,
                device=self.device,
            )
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
    keep_reason: str  # "--keep-draft-vocab-size" or ""
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
    continuation: Optional[Continuation] = None  # the checkpoint the run continues from
    derived_config: Optional[Dict[str, Any]] = None  # derived from the target: prepare writes it at draft_config
    patch_draft_config: bool = True  # False: the file is a checkpoint's or a resumed run's; never changed

    @property
    def remap(self) -> bool:
        return self.continuation is not None and self.continuation.remap

    def draft_config_dict(self) -> Dict[str, Any]:
        """The draft config SpecForge will use (derived, or read from its file)."""
        return dict(self.derived_config) if self.derived_config is not None else read_draft_config(self.draft_config)


def _search_for_keep(search: SearchSettings, draft_config, reason: str) -> SearchSettings:
    k, _vocab = read_draft_vocab_sizes(draft_config)
    if search.draft_vocab_size is not None and search.draft_vocab_size != k:
        why = "keeps" if reason == "--keep-draft-vocab-size" else f"must keep (the draft weights of {reason} have it)"
        raise InputError(
            f"{reason} {why} draft_vocab_size {k} of {draft_config}, but --draft-vocab-size asks for "
            f"{search.draft_vocab_size}. Drop one of the two."
        )
    return dataclasses.replace(search, draft_vocab_size=k)


def _run_fields_set(out: str, draft: str, derived, remap: bool) -> Dict[str, str]:
    """The model.* fields prepare will set in the run config (values as paths of the right kind), so the
    layout can be checked before any work; what is finally written is decided in specforge/prepare.py."""
    fields = {"vocab_mapping_path": os.path.join(out, MAPPING_FILE)}
    if derived is not None or remap:
        fields["draft_model_config"] = draft
    if remap:
        fields["draft_checkpoint_path"] = out.rstrip("/\\") + "-warm-start"
    return fields


def _check_replaceable(*files: Tuple[Optional[str], str]) -> None:
    """Refuse (before any work) files prepare must change in folders it cannot write."""
    problems = [replaceable_file_problem(path, name) for path, name in files if path]
    if any(problems):
        raise SettingsError([p for p in problems if p])


def _slug(text: str) -> str:
    name = os.path.basename(text.rstrip("/\\")) or "data"
    for suffix in (".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data")[:40]


def default_output_dir(cache_dir: str, source: str, data_path: str, owner: str) -> str:
    """``<cache_dir>/vocab_optimization/<data name>-<12 hex>``: the hex is a hash of the data path, its
    kind and the ``owner`` (the run config, or train_eagle3's draft config), so it stays the same while
    their contents change."""
    key = "\0".join([source, data_path, os.path.abspath(owner)])
    return os.path.join(cache_dir, OUTPUT_SUBDIR, f"{_slug(data_path)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


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


def local_target_dir(target: str, *, cwd: str) -> Optional[str]:
    """The target model's local directory holding config.json (or its copy in the Hugging Face cache), else None;
    never downloads."""
    local = resolve_path(target, cwd=cwd)
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    with contextlib.suppress(Exception):
        from huggingface_hub import snapshot_download

        cached = snapshot_download(target, local_files_only=True)
        if os.path.isfile(os.path.join(cached, "config.json")):
            return cached
    return None


def target_model_vocab_size(target: str, *, cwd: str) -> Optional[int]:
    """The target's own vocab size as SpecForge reads it (``padded_vocab_size`` or ``vocab_size``, from
    ``text_config`` when nested) from a local ``config.json``; None when there is none."""
    path = os.path.join(resolve_path(target, cwd=cwd), "config.json")
    if not os.path.isfile(path):
        return None
    with contextlib.suppress(InputError):
        return target_vocab_size(read_target_config(path))
    return None


def _check_continuation_search(search: SearchSettings, continuation: Continuation) -> None:
    if not continuation.remap and search.draft_vocab_size is not None and search.draft_vocab_size != continuation.k:
        raise InputError(
            f"--draft-vocab-size asks for k = {search.draft_vocab_size}, but training continues from "
            f"{continuation.describe()}, whose {continuation.k} trained LM-head rows fix k: another k (or another "
            "mapping) would repoint them. Drop --draft-vocab-size, or pass --remap to move the draft onto a new "
            "vocabulary (a warm start keeping every trained row it can)."
        )


def _run_draft_config(run: RunConfig, continuation: Optional[Continuation], output_dir: str, cwd: str):
    """(draft config path, derived config or None, whether prepare may change the file): the config SpecForge
    will use, as it resolves it (docs/SPECFORGE.md section 2)."""
    if run.draft_model_config:
        draft = run.draft_config_file()
        inside = continuation is not None and os.path.realpath(draft).startswith(
            os.path.realpath(continuation.checkpoint) + os.sep
        )
        return draft, None, not inside and not (continuation is not None and continuation.kind == RESUME)
    warm_config = warm_start_config_file(run) if continuation is not None and continuation.kind == WARM_START else None
    if warm_config is not None:
        return warm_config, None, False  # SpecForge reads the checkpoint's own config.json
    target_dir = local_target_dir(run.target_model_path, cwd=cwd)
    if target_dir is None:
        raise InputError(
            f"{where(run.config_path, field='model.draft_model_config')} is not set, so SpecForge derives the draft "
            f"config from the target's config.json, but model.target_model_path {run.target_model_path!r} has no "
            "config.json locally (nor in the Hugging Face cache). Download it (huggingface-cli download REPO "
            "config.json --local-dir DIR), or set model.draft_model_config."
        )
    k = SPECFORGE_DERIVED_DRAFT_VOCAB_SIZE
    if continuation is not None and continuation.kind == WARM_START:
        k = continuation.k
    derived = derive_draft_config(
        read_target_config(target_dir, flag="model.target_model_path"),
        draft_vocab_size=k,
        source=os.path.join(target_dir, "config.json"),
    )
    return os.path.join(output_dir, DERIVED_CONFIG_FILE), derived, continuation is None or continuation.kind != RESUME


def _check_continuing_config(
    continuation: Continuation, config: Dict[str, Any], draft: str, patchable: bool, *, derived: bool = False
) -> None:
    """The draft config must load the checkpoint's weights; its k must be the checkpoint's or be prepare's to set."""
    if derived:
        draft = "the draft config SpecForge derives from the target (model.draft_model_config is unset)"
    check_config_fits(continuation, config, source=draft)
    k = config.get("draft_vocab_size") or config.get("vocab_size")
    if k != continuation.k and not patchable and not continuation.remap:
        why = (
            "a resumed run must keep its draft config unchanged (SpecForge compares it)"
            if continuation.kind == RESUME
            else "it belongs to the checkpoint"
        )
        fix = (
            "Set model.draft_model_config to the config the checkpoint was trained with."
            if derived
            else "Use the draft config the checkpoint was trained with."
        )
        raise InputError(
            f"{draft} has draft_vocab_size {k}, but {continuation.describe()} has {continuation.k} LM-head rows, so "
            f"SpecForge could not load them; prepare does not change that ({why}). {fix}"
        )


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


def _target_argmax_options(run: RunConfig, count_source: str, device: str, *, config_path: str, cwd: str) -> dict:
    """DataSpec fields for counting the target's argmax from a run config's model section."""
    if count_source == "tokens":
        return {}
    if run.data_source != "hidden_states_path":
        raise InputError(
            f"--count-source {count_source} counts the target's predictions from offline features, but "
            f"{config_path} trains from data.{run.data_source}. Use data.hidden_states_path, or drop the flag."
        )
    local = resolve_path(run.target_model_path, cwd=cwd)
    lm_head_key = run.lm_head_key or CountSettings.lm_head_key  # a type: checked when the run config was read
    return dict(
        count_source=count_source,
        target_model_path=local if os.path.exists(local) else run.target_model_path,
        lm_head_key=lm_head_key,
        device=device,
    )


def plan_from_run_config(
    config_path: str,
    *,
    overrides: Sequence[str] = (),
    output_config: Optional[str] = None,
    count_source: str = CountSettings.count_source,
    device: str = CountSettings.device,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    chat_template_file: Optional[str] = None,
    cwd: Optional[str] = None,
    remap: bool = False,
) -> Plan:
    """What to count and write for a ``specforge train --config`` run (``count_source`` "target-argmax":
    the target's predictions from ``data.hidden_states_path``, with ``model.target_model_path`` and
    ``model.lm_head_key``)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    config_path = resolve_path(os.fspath(config_path), cwd=cwd)
    overrides = tuple(overrides or ())
    for item in overrides:
        key = item.split("=", 1)[0].strip() if isinstance(item, str) else ""
        if key == "model.vocab_mapping_path" or (
            remap and key in ("model.draft_checkpoint_path", "model.draft_model_config")
        ):
            raise InputError(
                f"The override {item!r} sets {key}, which prepare writes itself; passing it to `specforge train` as "
                "well would load something else. Drop this override."
            )
    run = read_run_config(config_path, overrides, cwd=cwd)
    continuation = find_continuation(run, remap=remap)
    argmax_options = _target_argmax_options(run, count_source, device, config_path=config_path, cwd=cwd)
    field = f"data.{run.data_source}"
    path = _existing(run.resolved_data_path, raw=run.data_path, field=field, source=config_path, cwd=cwd)
    cache_dir = run.resolved_cache_dir
    source = {"train_data_path": CONVERSATIONS, "hidden_states_path": FEATURES}.get(run.data_source)
    if source is None:
        kind = prompts_file_kind(path)
        if kind == "empty":
            raise InputError(
                f"{where(config_path, field=field)}: {path} holds no records. Point it at the prompts "
                "file SpecForge trains on."
            )
        source = PRETOKENIZED if kind == "pretokenized" else CONVERSATIONS
    # The outputs belong to the run config (its draft config may be one prepare writes into them).
    out = resolve_path(output_dir, cwd=cwd) if output_dir else default_output_dir(cache_dir, source, path, config_path)
    draft, derived, patchable = _run_draft_config(run, continuation, out, cwd)
    config = dict(derived) if derived is not None else read_draft_config(draft, required=())
    if continuation is not None:
        _check_continuing_config(continuation, config, draft, patchable, derived=derived is not None)
    _k, vocab = read_draft_vocab_sizes(config if derived is not None else draft)
    common = dict(field=field, path=path, vocab_size=vocab, max_length=run.max_length)
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
        data = DataSpec(source, **common, **argmax_options)
    search = search if search is not None else SearchSettings()
    keep_reason = "--keep-draft-vocab-size" if keep_draft_vocab_size else ""
    if keep_reason:
        search = _search_for_keep(search, config if derived is not None else draft, keep_reason)
    if continuation is not None:
        _check_continuation_search(search, continuation)
    output_config = resolve_path(output_config, cwd=cwd) if output_config else None
    # Setting the model.* fields is the last step; a layout they cannot be set in, or a file that cannot be
    # replaced, is refused now, before anything is counted or written (a resume changes neither).
    if continuation is None or continuation.kind != RESUME:
        _check_replaceable(
            (draft if patchable and derived is None else None, "model.draft_model_config"),
            (None if output_config else config_path, "--config"),
        )
        run_config_with_fields(config_path, _run_fields_set(out, draft, derived, remap), output_path=output_config)
    return Plan(
        data=data,
        draft_config=draft,
        search=search,
        keep_draft_vocab_size=bool(keep_reason),
        keep_reason=keep_reason,
        output_dir=out,
        cache_dir=cache_dir,
        cwd=cwd,
        force=force,
        backup=backup,
        lock_timeout=lock_timeout,
        run=run,
        output_config=output_config,
        overrides=overrides,
        target_vocab_size=target_model_vocab_size(run.target_model_path, cwd=cwd) if source == FEATURES else None,
        continuation=continuation,
        derived_config=derived,
        patch_draft_config=patchable,
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
    remap: bool = False,
) -> Plan:
    """What to count and write for SpecForge's scripts/train_eagle3.py with these flags."""
    cwd = os.path.abspath(cwd or os.getcwd())
    args, _rest = parse_train_eagle3_args(list(argv))
    source = "train_eagle3 flags"
    if remap and not args.ckpt_dir:
        raise InputError(
            "--remap moves a trained draft onto a new vocabulary, so it needs the draft: pass train_eagle3's "
            "--ckpt-dir DIR (the checkpoint to warm-start from)."
        )
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
    continuation = find_old_continuation(args, cwd=cwd, remap=remap)
    # --ckpt-dir's config.json belongs to the checkpoint; under --resume the draft config is the user's own.
    patchable = not args.ckpt_dir
    if continuation is not None:
        _check_continuing_config(continuation, read_draft_config(draft, required=()), draft, patchable)
    keep_reason = "--keep-draft-vocab-size" if keep_draft_vocab_size else ""
    search = search if search is not None else SearchSettings()
    if keep_reason:
        search = _search_for_keep(search, draft, keep_reason)
    if continuation is not None:
        _check_continuation_search(search, continuation)
    cache_dir = resolve_path(args.cache_dir, cwd=cwd)
    _check_replaceable((draft if patchable else None, "--draft-model-config"))
    return Plan(
        data=data,
        draft_config=draft,
        search=search,
        keep_draft_vocab_size=bool(keep_reason),
        keep_reason=keep_reason,
        output_dir=resolve_path(output_dir, cwd=cwd)
        if output_dir
        else default_output_dir(cache_dir, CONVERSATIONS, path, draft),
        cache_dir=cache_dir,
        cwd=cwd,
        force=force,
        backup=backup,
        lock_timeout=lock_timeout,
        train_args=args,
        continuation=continuation,
        patch_draft_config=patchable,
    )
