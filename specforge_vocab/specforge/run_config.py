"""Newer SpecForge's run configs (``specforge train --config run.yaml [section.field=value ...]``).

SpecForge reads a YAML (``.yaml``/``.yml``) or JSON file with sections ``model`` and ``data``
(docs/SPECFORGE.md section 4). Relative paths in it resolve from the current working directory,
not from the config's folder, and :func:`read_run_config` resolves them the same way. Overrides
are applied as SpecForge applies them, and unknown fields are reported as SpecForge would reject them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence, Tuple

import yaml

from specforge_vocab.counting.target_head import DEFAULT_LM_HEAD_KEY
from specforge_vocab.errors import InputError, short, where

logger = logging.getLogger(__name__)


DEFAULT_MAX_LENGTH = 2048


DEFAULT_CHAT_TEMPLATE = "llama3"


DEFAULT_CACHE_DIR = "./cache"


DATA_SOURCES = ("train_data_path", "prompts_path", "hidden_states_path")


# Fields of SpecForge's ModelConfig / DataConfig (config/schema.py). SpecForge
# rejects any other key in these sections; keys named sglang_* are many and
# change often, so any of them is accepted.
MODEL_FIELDS = (
    "target_model_path",
    "draft_model_config",
    "draft_checkpoint_path",
    "draft_num_hidden_layers",
    "draft_block_size",
    "target_backend",
    "shard_target_output",
    "input_modality",
    "trust_remote_code",
    "use_liger_kernel",
    "embedding_key",
    "lm_head_key",
    "vocab_mapping_path",
    "load_target_embedding",
    "aux_hidden_state_layer_ids",
    "torch_dtype",
    "cache_dir",
    "mask_token_id",
    "tokenizer_pad_token_id",
)


DATA_FIELDS = (
    "train_data_path",
    "prompts_path",
    "hidden_states_path",
    "eval_data_path",
    "eval_hidden_states_path",
    "max_length",
    "chat_template",
    "is_preformatted",
    "train_only_last_turn",
    "build_dataset_num_proc",
    "dataloader_num_workers",
    "cache_dir",
    "cache_key",
    "max_prompts",
)


TOP_LEVEL_KEYS = ("model", "data", "training", "tracking", "profiling", "runtime", "deployment", "run_id", "output_dir")


# Override values for these stay the literal text after "=" (SpecForge passes
# the text to pydantic, which keeps strings as strings).
_STRING_FIELDS = {
    "model.target_model_path",
    "model.draft_model_config",
    "model.draft_checkpoint_path",
    "model.vocab_mapping_path",
    "model.embedding_key",
    "model.lm_head_key",
    "model.cache_dir",
    "model.input_modality",
    "model.target_backend",
    "model.torch_dtype",
    "data.train_data_path",
    "data.prompts_path",
    "data.hidden_states_path",
    "data.eval_data_path",
    "data.eval_hidden_states_path",
    "data.chat_template",
    "data.cache_dir",
    "data.cache_key",
    "training.resume_from",
    "run_id",
    "output_dir",
}


def is_json_config(path: str) -> bool:
    """SpecForge's rule: ``.yaml``/``.yml`` is YAML, anything else is JSON."""
    return not str(path).endswith((".yaml", ".yml"))


def read_run_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise InputError(
            f"{what} {path} does not exist. Check the path (relative paths start at the current directory)."
        ) from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, but a file was expected. Point at the file itself.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {what} {path}: {exc.strerror}. Check that the file is readable.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded). Save it as UTF-8."
        ) from None


def _parse_config_text(text: str, path: str) -> Any:
    if is_json_config(path):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where(path, exc.lineno)}: the run config is not valid JSON ({exc.msg}, column {exc.colno}). "
                "SpecForge reads files not ending in .yaml/.yml as JSON; fix the syntax or rename a YAML file to .yaml."
            ) from None
    return parse_yaml_text(text, path)


def parse_yaml_text(text: str, path: str) -> Any:

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(
            f"{where(path, line)}: the run config is not valid YAML ({problem}). Fix the syntax at that line."
        ) from None


def load_run_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """Read a SpecForge run config (YAML, or JSON for other extensions) and apply
    ``section.field=value`` overrides; return the plain dict.

    >>> load_run_config("run.yaml", ["data.max_length=4096"])["data"]["max_length"]  # doctest: +SKIP
    4096
    """
    path = str(path)
    raw = _parse_config_text(read_run_text(path, "Run config"), path)
    if not isinstance(raw, dict):
        raise InputError(
            f"{path} must hold a mapping with the sections 'model' and 'data' at the top level, "
            f"but it holds {type(raw).__name__} {short(raw)}. Write the run config as 'model:' / 'data:' sections."
        )
    for section in ("model", "data"):
        if section in raw and not isinstance(raw[section], dict):
            raise InputError(
                f"{where(path, field=section)} must be a mapping of fields, but got {short(raw[section])}. "
                f"Write '{section}:' followed by indented 'field: value' lines."
            )
    return apply_overrides(raw, overrides, config_path=path)


def _known_fields(section: str, raw_section: Mapping) -> Tuple[str, ...]:
    base = {"model": MODEL_FIELDS, "data": DATA_FIELDS}.get(section, ())
    return tuple(base) + tuple(k for k in raw_section if k not in base)


def _override_value(dotted: str, text: str, current: Any) -> Any:
    """Type an override value: structured text ([...] / {...}) and non-string
    fields are parsed as YAML; string fields keep the text as it is."""

    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            raise InputError(
                f"--set {dotted}={text} holds an invalid structured value. Write a YAML list or mapping, "
                f"for example --set {dotted}=[1,2,3]."
            ) from None
    if dotted in _STRING_FIELDS or isinstance(current, str):
        return text
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)):
        return text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 as text; SpecForge's pydantic reads it as a number
    return value


def apply_overrides(raw: dict, overrides: Sequence[str], *, config_path: str = "run config") -> dict:
    """Return a copy of ``raw`` with each ``section.field=value`` applied.

    Unknown fields of ``model``/``data`` are rejected (SpecForge rejects them
    too), naming the closest known field.
    """
    result = copy.deepcopy(raw)
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise InputError(
                f"--set {item!r} must have the form section.field=value, for example --set data.max_length=4096."
            )
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        keys = dotted.split(".")
        if not dotted or any(not k for k in keys):
            raise InputError(f"--set {item!r} must name a field as section.field, for example data.max_length.")
        node = result
        for depth, key in enumerate(keys[:-1]):
            if key not in node:
                if depth == 0 and key in TOP_LEVEL_KEYS:
                    node[key] = {}
                else:
                    raise InputError(
                        f"--set {item}: '{'.'.join(keys[: depth + 1])}' does not exist in {config_path}. "
                        f"Check the spelling; top-level sections are {', '.join(TOP_LEVEL_KEYS)}."
                    )
            if not isinstance(node[key], dict):
                raise InputError(
                    f"--set {item}: '{'.'.join(keys[: depth + 1])}' in {config_path} is {short(node[key])}, "
                    "not a section, so it has no fields to set."
                )
            node = node[key]
        field = keys[-1]
        if len(keys) == 2 and keys[0] in ("model", "data"):
            known = _known_fields(keys[0], node)
            if field not in known and not (keys[0] == "model" and field.startswith("sglang_")):
                close = difflib.get_close_matches(field, known, n=1)
                hint = f" Did you mean {keys[0]}.{close[0]}?" if close else ""
                raise InputError(
                    f"--set {item}: SpecForge has no field {dotted}.{hint} Known {keys[0]} fields: {', '.join(known)}."
                )
        node[field] = _override_value(dotted, text, node.get(field))
    return result


_TRUE_TEXT = {"true", "1", "yes", "on", "t", "y"}


_FALSE_TEXT = {"false", "0", "no", "off", "f", "n"}


def as_bool(value: Any, name: str, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_TEXT | _FALSE_TEXT:
        return value.strip().lower() in _TRUE_TEXT
    raise InputError(f"{where(path, field=name)} must be true or false, but got {short(value)}. Write true or false.")


def _as_positive_int(value: Any, name: str, path: str) -> int:
    number = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        number = int(value)
    if number is None or number <= 0:
        raise InputError(
            f"{where(path, field=name)} must be a positive integer, but got {short(value)}. "
            f"Set it in the run config or with --set {name}=2048."
        )
    return number


def _as_str(value: Any, name: str, path: str, default: str = "") -> str:
    if value is None:
        return default
    if isinstance(value, str):
        return value
    raise InputError(
        f"{where(path, field=name)} must be a string, but got {short(value)}. Quote the value in the run config."
    )


def resolve_path(value: str, *, cwd: Optional[str] = None) -> str:
    """Absolute form of a config path, as SpecForge sees it: ``~`` expanded,
    a ``file://`` prefix dropped, relative paths joined to ``cwd`` (default:
    the current working directory)."""
    text = value[len("file://") :] if value.startswith("file://") else value
    text = os.path.expanduser(text)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), text))


def _looks_local(source: str) -> bool:
    """SpecForge's test for a draft config source that must exist on disk."""
    return source.startswith((".", "/", "~", "file://")) or source.endswith(".json")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The parts of a SpecForge run config this tool reads (raw strings as
    written; ``resolved_*`` give absolute paths from ``cwd``)."""

    config_path: str
    raw: dict
    target_model_path: str
    draft_model_config: Optional[str]
    vocab_mapping_path: str
    data_source: str
    data_path: str
    max_length: int = DEFAULT_MAX_LENGTH
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    is_preformatted: bool = False
    train_only_last_turn: bool = False
    cache_dir: str = DEFAULT_CACHE_DIR
    cwd: str = ""
    draft_checkpoint_path: Optional[str] = None  # warm start (weights only); "" is set, as SpecForge tests it
    resume_from: Optional[str] = None  # training.resume_from: full resume
    lm_head_key: str = DEFAULT_LM_HEAD_KEY

    @classmethod
    def from_dict(cls, raw: Mapping, *, config_path: str, cwd: Optional[str] = None) -> "RunConfig":
        path = str(config_path)
        model = raw.get("model")
        data = raw.get("data")
        for name, section in (("model", model), ("data", data)):
            if not isinstance(section, Mapping):
                raise InputError(
                    f"{path} has no '{name}' section (found top-level keys: {', '.join(map(str, raw)) or 'none'}). "
                    f"A SpecForge run config needs 'model:' and 'data:' mappings."
                )
        for section_name, section, known in (("model", model, MODEL_FIELDS), ("data", data, DATA_FIELDS)):
            for key in section:
                if key not in known and not (section_name == "model" and str(key).startswith("sglang_")):
                    logger.warning(
                        "%s: SpecForge does not know the field %s.%s; it will reject the config.",
                        path,
                        section_name,
                        key,
                    )
        target = _as_str(model.get("target_model_path"), "model.target_model_path", path)
        if not target:
            raise InputError(
                f"{where(path, field='model.target_model_path')} must name the target model (a local directory "
                "or a Hugging Face id; its tokenizer is used for counting), but it is missing or empty."
            )
        draft = model.get("draft_model_config")
        draft = _as_str(draft, "model.draft_model_config", path) or None
        mapping = _as_str(model.get("vocab_mapping_path"), "model.vocab_mapping_path", path)
        given = {k: _as_str(data.get(k), f"data.{k}", path) for k in DATA_SOURCES}
        chosen = [k for k in DATA_SOURCES if given[k]]
        if len(chosen) != 1:
            found = ", ".join(f"data.{k}" for k in chosen) or "none of them"
            raise InputError(
                f"{path} must set exactly one of data.train_data_path (raw conversations), data.prompts_path "
                f"(pre-tokenized JSONL) or data.hidden_states_path (offline features), but sets {found}. "
                "Keep one (an override such as --set data.prompts_path= clears one)."
            )
        training = raw.get("training") if isinstance(raw.get("training"), Mapping) else {}
        warm = model.get("draft_checkpoint_path")
        resume = training.get("resume_from")
        if warm is not None and resume is not None:
            raise InputError(
                f"{path} sets both model.draft_checkpoint_path (a warm start: weights only) and training.resume_from "
                "(a full resume); SpecForge refuses the pair (it tests both with `is not None`, so an empty value "
                "counts). Remove one of them."
            )
        return cls(
            draft_checkpoint_path=None if warm is None else _as_str(warm, "model.draft_checkpoint_path", path),
            resume_from=None if resume is None else _as_str(resume, "training.resume_from", path),
            lm_head_key=_as_str(model.get("lm_head_key"), "model.lm_head_key", path, DEFAULT_LM_HEAD_KEY)
            or DEFAULT_LM_HEAD_KEY,
            config_path=os.path.abspath(path),
            raw=copy.deepcopy(dict(raw)),
            target_model_path=target,
            draft_model_config=draft,
            vocab_mapping_path=mapping,
            data_source=chosen[0],
            data_path=given[chosen[0]],
            max_length=_as_positive_int(data.get("max_length", DEFAULT_MAX_LENGTH), "data.max_length", path),
            chat_template=_as_str(data.get("chat_template"), "data.chat_template", path, DEFAULT_CHAT_TEMPLATE)
            or DEFAULT_CHAT_TEMPLATE,
            is_preformatted=as_bool(data.get("is_preformatted", False), "data.is_preformatted", path),
            train_only_last_turn=as_bool(data.get("train_only_last_turn", False), "data.train_only_last_turn", path),
            cache_dir=_as_str(data.get("cache_dir"), "data.cache_dir", path, DEFAULT_CACHE_DIR) or DEFAULT_CACHE_DIR,
            cwd=os.path.abspath(cwd or os.getcwd()),
        )

    @property
    def resolved_data_path(self) -> str:
        return resolve_path(self.data_path, cwd=self.cwd)

    @property
    def resolved_cache_dir(self) -> str:
        return resolve_path(self.cache_dir, cwd=self.cwd)

    @property
    def resolved_vocab_mapping_path(self) -> str:
        """Absolute mapping path, or "" when the config sets none."""
        return resolve_path(self.vocab_mapping_path, cwd=self.cwd) if self.vocab_mapping_path else ""

    @property
    def tokenizer_path(self) -> str:
        """The target model as a local directory when one exists, else the hub id."""
        local = resolve_path(self.target_model_path, cwd=self.cwd)
        return local if os.path.exists(local) else self.target_model_path

    def draft_config_file(self) -> str:
        """The draft config JSON file to patch: the file itself, or
        ``config.json`` inside a directory; an error for hub ids or when unset."""
        field = "model.draft_model_config"
        if not self.draft_model_config:
            raise InputError(
                f"{where(self.config_path, field=field)} is not set, so SpecForge would generate a draft config "
                "from the target model on the fly and there is no file for specforge-vocab to patch. "
                "Set it to a draft config JSON (for example configs/llama3-8B-eagle3.json)."
            )
        local = resolve_path(self.draft_model_config, cwd=self.cwd)
        if os.path.isfile(local):
            return local
        if os.path.isdir(local):
            inner = os.path.join(local, "config.json")
            if os.path.isfile(inner):
                return inner
            raise InputError(
                f"{where(self.config_path, field=field)} names the directory {local}, which has no config.json. "
                "Point it at the draft config JSON file."
            )
        if _looks_local(self.draft_model_config):
            raise InputError(
                f"{where(self.config_path, field=field)} is {self.draft_model_config!r}, but {local} does not exist. "
                f"SpecForge resolves relative paths from the current directory ({self.cwd}); run from the directory "
                "the config was written for, or fix the path."
            )
        raise InputError(
            f"{where(self.config_path, field=field)} is {self.draft_model_config!r}, which is not a local file, so "
            "SpecForge would fetch it from the Hugging Face Hub and specforge-vocab cannot patch it. Download the "
            "draft config JSON and point the field at the local copy."
        )


def read_run_config(path: str, overrides: Sequence[str] = (), *, cwd: Optional[str] = None) -> RunConfig:
    """:func:`load_run_config` plus extraction of the fields this tool uses."""
    return RunConfig.from_dict(load_run_config(path, overrides), config_path=str(path), cwd=cwd)
