"""The host side: SpecForge's run configs, train_eagle3 flags, mapping cache
paths, and its pre-tokenized and offline data files.

What SpecForge does (read from github.com/sgl-project/SpecForge; see
``docs/SPECFORGE_CONTRACT.md`` section 4) and what this module mirrors:

* Newer SpecForge (``specforge train --config run.yaml [section.field=value]``)
  reads a YAML (``.yaml``/``.yml``) or JSON run config with sections ``model``
  and ``data``. Relative paths in it are used as they are, so they resolve from
  the *current working directory*, not from the config's folder (SpecForge's
  training docs say so, and its example configs assume the repository root).
  :func:`read_run_config` resolves them the same way.
* ``model.vocab_mapping_path``, when non-empty, is loaded with ``torch.load``
  and copied into the draft's ``t2d``/``d2t`` buffers; SpecForge then builds no
  mapping of its own. :func:`set_vocab_mapping_path` writes that key into the
  user's YAML without touching anything else in the file.
* Older SpecForge (``scripts/train_eagle3.py``, removed from SpecForge in
  July 2026) loads ``<cache_dir>/vocab_mapping/<md5 key>.pt`` when it exists;
  :func:`cache_mapping_paths` computes both key versions.
* ``data.prompts_path`` records and ``data.hidden_states_path`` feature files
  already hold ``input_ids`` and ``loss_mask``; :func:`iter_prompt_records` and
  :func:`iter_feature_files` yield the loss-masked ids, and
  :func:`count_masked_ids` turns them into dense counts.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError, short, where
from .fileio import atomic_write, backup_file

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_CHAT_TEMPLATE = "llama3"
DEFAULT_CACHE_DIR = "./cache"
DATA_SOURCES = ("train_data_path", "prompts_path", "hidden_states_path")
FEATURE_SUFFIXES = (".ckpt", ".ckpt.gz")
VOCAB_MAPPING_DIR = "vocab_mapping"

# Fields of SpecForge's ModelConfig / DataConfig (config/schema.py). SpecForge
# rejects any other key in these sections; keys named sglang_* are many and
# change often, so any of them is accepted.
MODEL_FIELDS = (
    "target_model_path", "draft_model_config", "draft_checkpoint_path", "draft_num_hidden_layers",
    "draft_block_size", "target_backend", "shard_target_output", "input_modality",
    "trust_remote_code", "use_liger_kernel", "embedding_key", "lm_head_key", "vocab_mapping_path",
    "load_target_embedding", "aux_hidden_state_layer_ids", "torch_dtype", "cache_dir",
    "mask_token_id", "tokenizer_pad_token_id",
)
DATA_FIELDS = (
    "train_data_path", "prompts_path", "hidden_states_path", "eval_data_path",
    "eval_hidden_states_path", "max_length", "chat_template", "is_preformatted",
    "train_only_last_turn", "build_dataset_num_proc", "dataloader_num_workers", "cache_dir",
    "cache_key", "max_prompts",
)
TOP_LEVEL_KEYS = ("model", "data", "training", "tracking", "profiling", "runtime", "deployment", "run_id", "output_dir")
# Override values for these stay the literal text after "=" (SpecForge passes
# the text to pydantic, which keeps strings as strings).
_STRING_FIELDS = {
    "model.target_model_path", "model.draft_model_config", "model.draft_checkpoint_path",
    "model.vocab_mapping_path", "model.embedding_key", "model.lm_head_key", "model.cache_dir",
    "model.input_modality", "model.target_backend", "model.torch_dtype",
    "data.train_data_path", "data.prompts_path", "data.hidden_states_path", "data.eval_data_path",
    "data.eval_hidden_states_path", "data.chat_template", "data.cache_dir", "data.cache_key",
    "run_id", "output_dir",
}


# --------------------------------------------------------------------------
# Run config (newer SpecForge)
# --------------------------------------------------------------------------

def _is_json_config(path: str) -> bool:
    """SpecForge's rule: ``.yaml``/``.yml`` is YAML, anything else is JSON."""
    return not str(path).endswith((".yaml", ".yml"))


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist. Check the path (relative paths start at the current directory).") from None
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
    if _is_json_config(path):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where(path, exc.lineno)}: the run config is not valid JSON ({exc.msg}, column {exc.colno}). "
                "SpecForge reads files not ending in .yaml/.yml as JSON; fix the syntax or rename a YAML file to .yaml."
            ) from None
    return _parse_yaml_text(text, path)


def _parse_yaml_text(text: str, path: str) -> Any:
    import yaml

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
    raw = _parse_config_text(_read_text(path, "Run config"), path)
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
    import yaml

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
                    f"--set {item}: SpecForge has no field {dotted}.{hint} "
                    f"Known {keys[0]} fields: {', '.join(known)}."
                )
        node[field] = _override_value(dotted, text, node.get(field))
    return result


_TRUE_TEXT = {"true", "1", "yes", "on", "t", "y"}
_FALSE_TEXT = {"false", "0", "no", "off", "f", "n"}


def _as_bool(value: Any, name: str, path: str) -> bool:
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
    text = value[len("file://"):] if value.startswith("file://") else value
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
                    logger.warning("%s: SpecForge does not know the field %s.%s; it will reject the config.", path, section_name, key)
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
        return cls(
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
            is_preformatted=_as_bool(data.get("is_preformatted", False), "data.is_preformatted", path),
            train_only_last_turn=_as_bool(data.get("train_only_last_turn", False), "data.train_only_last_turn", path),
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


# --------------------------------------------------------------------------
# Setting model.vocab_mapping_path in the user's file
# --------------------------------------------------------------------------

class PatchResult(NamedTuple):
    path: str
    changed: bool
    backup_path: Optional[str]


_TOP_KEY = re.compile(r"""^(?P<key>[A-Za-z_][\w.-]*|"[^"]*"|'[^']*')[ \t]*:(?=[ \t]|$)(?P<rest>.*)$""")
_CHILD_KEY = re.compile(r"""^(?P<indent>[ ]+)(?P<key>[A-Za-z_][\w.-]*|"[^"]*"|'[^']*')(?P<colon>[ \t]*:)(?=[ \t]|$)(?P<rest>.*)$""")
_BAD_VALUE_START = set("|>&*!{[%@`?,")
_KEY = "vocab_mapping_path"


def _unquote_key(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'" else key


def _split_eol(line: str) -> Tuple[str, str]:
    for eol in ("\r\n", "\n", "\r"):
        if line.endswith(eol):
            return line[: -len(eol)], eol
    return line, ""


def _is_content(body: str) -> bool:
    stripped = body.strip()
    return bool(stripped) and not stripped.startswith("#")


def _indent_of(body: str) -> int:
    return len(body) - len(body.lstrip(" "))


def _scan_quoted(text: str, start: int) -> int:
    """Index just past the closing quote of the quoted scalar at ``start``, or -1."""
    quote = text[start]
    i = start + 1
    while i < len(text):
        c = text[i]
        if quote == '"' and c == "\\":
            i += 2
            continue
        if c == quote:
            if quote == "'" and text[i + 1: i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return -1


def _plain_ok(value: str) -> bool:
    import yaml

    if not value or value != value.strip() or any(c in value for c in "\n\r\t"):
        return False
    if " #" in value or ": " in value or value.endswith(":") or value[0] in "-?:,[]{}#&*!|>'\"%@`":
        return False
    try:
        return yaml.safe_load(f"k: {value}\n") == {"k": value}
    except yaml.YAMLError:
        return False


def _yaml_printable(c: str) -> bool:
    """A character YAML allows as it is inside a quoted scalar (no line breaks)."""
    o = ord(c)
    return (0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or 0x10000 <= o <= 0x10FFFF) and c not in (
        "\u2028", "\u2029", "\ufeff")


def _double_quoted(value: str) -> str:
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif _yaml_printable(c):
            out.append(c)
        elif ord(c) <= 0xFF:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _render_scalar(value: str, style: str) -> str:
    """Render ``value`` as a YAML scalar in ``style`` ('"', "'" or '' = plain
    when that round-trips, else quoted)."""
    if style == '"' or not all(_yaml_printable(c) for c in value):
        return _double_quoted(value)
    if style == "'" or not _plain_ok(value):
        return "'" + value.replace("'", "''") + "'"
    return value


def _odd_layout(path: str, line: int, what: str) -> InputError:
    return InputError(
        f"{where(path, line, 'model.vocab_mapping_path')}: {what}, so the value cannot be replaced without rewriting "
        "other parts of the file. Nothing was changed. Write the model section in block style "
        "('model:' then one indented 'field: value' per line), or pass --output-config and set the key by hand."
    )


def patch_vocab_mapping_text(text: str, mapping_path: str, *, source: str = "run config") -> str:
    """Return ``text`` (a YAML run config) with ``model.vocab_mapping_path`` set
    to ``mapping_path``; every other byte is kept. Raises InputError for layouts
    it cannot edit safely (flow style, anchors, block scalars, duplicates).

    The result is re-parsed: it must equal the original document with only
    that one key changed.
    """
    import yaml

    original = _parse_yaml_text(text, source)
    if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
        raise InputError(
            f"{source} has no block 'model:' section (top level: {short(original)}), so there is nowhere to set "
            "model.vocab_mapping_path. Add a 'model:' section with target_model_path and draft_model_config."
        )
    current = original["model"].get(_KEY)
    if current is not None and not isinstance(current, str):
        raise InputError(
            f"{where(source, field='model.' + _KEY)} must be a string (a .pt path), but it holds {short(current)}. "
            "Nothing was changed; replace it with a path or remove it."
        )
    lines = text.splitlines(keepends=True)
    bodies = [_split_eol(line)[0] for line in lines]
    starts = []
    for i, body in enumerate(bodies):
        match = _TOP_KEY.match(body.lstrip("\ufeff") if i == 0 else body)
        if match and _unquote_key(match.group("key")) == "model":
            starts.append((i, match))
    if len(starts) != 1:
        raise InputError(
            f"{source}: found {len(starts)} top-level 'model:' lines at column 0, expected exactly one. "
            "Nothing was changed; write the config with one block 'model:' section starting at column 0."
        )
    start, match = starts[0]
    rest = match.group("rest").strip()
    if rest and not rest.startswith("#"):
        raise _odd_layout(source, start + 1, f"'model:' is followed by {short(rest)} on the same line (flow style, an anchor or a tag)")
    end = len(lines)
    for j in range(start + 1, len(lines)):
        body = bodies[j]
        if body[:1] not in (" ", "\t", "") and not body.startswith("#"):
            end = j
            break
    content = [j for j in range(start + 1, end) if _is_content(bodies[j])]
    if not content:
        raise _odd_layout(source, start + 1, "the 'model:' section has no indented fields")
    if any(bodies[j].startswith("\t") or "\t" in bodies[j][: _indent_of(bodies[j]) + 1] for j in content):
        raise _odd_layout(source, content[0] + 1, "the model section is indented with tabs")
    indent = _indent_of(bodies[content[0]])
    if bodies[content[0]][indent:].startswith(("{", "[", "- ", "? ")):
        raise _odd_layout(source, content[0] + 1, "the model section is written in flow or complex-key style")
    keys = []
    for j in content:
        if _indent_of(bodies[j]) != indent:
            continue
        child = _CHILD_KEY.match(bodies[j])
        if child and len(child.group("indent")) == indent:
            keys.append((j, child))
    hits = [(j, m) for j, m in keys if _unquote_key(m.group("key")) == _KEY]
    if len(hits) > 1:
        raise _odd_layout(source, hits[1][0] + 1, f"model.{_KEY} appears {len(hits)} times")
    other_styles = [m.group("rest").strip()[:1] for _, m in keys]

    def continues(j: int) -> bool:
        later = [n for n in content if n > j]
        return bool(later) and _indent_of(bodies[later[0]]) > indent

    if hits:
        j, m = hits[0]
        body, eol = _split_eol(lines[j])
        value_from = m.end("colon")
        rest_raw = body[value_from:]
        lead = len(rest_raw) - len(rest_raw.lstrip(" \t"))
        v0 = value_from + lead
        head = body[v0:v0 + 1]
        if continues(j):
            raise _odd_layout(source, j + 1, "its value continues on the following, more indented lines")
        if head in ('"', "'"):
            v1 = _scan_quoted(body, v0)
            if v1 < 0:
                raise _odd_layout(source, j + 1, "its quoted value spans several lines")
            style = head
        elif head == "" or head == "#":
            v1 = v0
            style = ""
        elif head in _BAD_VALUE_START:
            raise _odd_layout(source, j + 1, f"its value starts with {head!r} (a block scalar, anchor, alias, tag or flow value)")
        else:
            comment = re.search(r"[ \t]#", body[v0:])
            v1 = v0 + (comment.start() if comment else len(body) - v0)
            while v1 > v0 and body[v1 - 1] in " \t":
                v1 -= 1
            style = ""
        tail = body[v1:]
        if head != "#" and tail.strip() and not re.match(r"[ \t]+#", tail):
            raise _odd_layout(source, j + 1, f"its value is followed by {short(tail.strip())}")
        rendered = _render_scalar(mapping_path, style)
        if v0 == v1:  # no value yet: keep the spacing before a comment as it is
            new_body = body[:value_from] + " " + rendered + body[value_from:]
        else:
            new_body = body[:v0] + rendered + body[v1:]
        new_lines = lines[:j] + [new_body + eol] + lines[j + 1:]
    else:
        last = content[-1]
        body, eol = _split_eol(lines[last])
        eol_new = eol or next((_split_eol(l)[1] for l in lines if _split_eol(l)[1]), "\n")
        style = '"' if '"' in other_styles else ""
        new_line = " " * indent + f"{_KEY}: " + _render_scalar(mapping_path, style)
        if eol:
            new_lines = lines[: last + 1] + [new_line + eol_new] + lines[last + 1:]
        else:
            new_lines = lines[:last] + [body + eol_new, new_line] + lines[last + 1:]
    new_text = "".join(new_lines)
    expected = copy.deepcopy(original)
    expected["model"][_KEY] = mapping_path
    try:
        reparsed = yaml.safe_load(new_text)
    except yaml.YAMLError:
        reparsed = None
    if reparsed != expected:
        raise _odd_layout(source, start + 1, "re-reading the edited file did not give the original config with only this key changed")
    return new_text


def _patch_json_text(text: str, mapping_path: str, source: str) -> str:
    """JSON run configs have no comments: re-serialise with the same key order
    and the indentation of the original (whitespace may be normalised)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where(source, exc.lineno)}: the run config is not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{source} has no \"model\" object, so there is nowhere to set model.vocab_mapping_path.")
    data["model"][_KEY] = mapping_path
    indent_match = re.search(r"\n([ \t]+)\S", text)
    indent = indent_match.group(1) if indent_match else None
    out = json.dumps(data, indent=indent if indent is not None else None, ensure_ascii=False)
    return out + ("\n" if text.endswith("\n") else "")


def set_vocab_mapping_path(
    yaml_path: str,
    mapping_path: str,
    *,
    output_path: Optional[str] = None,
    backup: bool = True,
) -> PatchResult:
    """Set ``model.vocab_mapping_path`` in a run config, keeping comments, key
    order, quoting and line endings byte-identical elsewhere.

    In place (no ``output_path``) the old file is first copied to
    ``<path>.bak`` (``backup=True``); an unchanged value writes nothing.
    ``mapping_path`` is written as given: SpecForge resolves it from the
    directory training runs in, so an absolute path is the safe choice.
    """
    yaml_path = str(yaml_path)
    if not isinstance(mapping_path, str) or not mapping_path:
        raise InputError(f"The vocab mapping path must be a non-empty string, but got {short(mapping_path)}.")
    text = _read_text(yaml_path, "Run config")
    if _is_json_config(yaml_path):
        new_text = _patch_json_text(text, mapping_path, yaml_path)
    else:
        new_text = patch_vocab_mapping_text(text, mapping_path, source=yaml_path)
    in_place = output_path is None or (
        os.path.exists(output_path) and os.path.samefile(output_path, yaml_path)
    )
    target = yaml_path if in_place else str(output_path)
    if in_place and new_text == text:
        logger.info("%s already has model.vocab_mapping_path = %s", yaml_path, mapping_path)
        return PatchResult(target, False, None)
    backup_path = backup_file(yaml_path) if (in_place and backup) else None
    atomic_write(target, new_text, keep_mode_of=yaml_path)
    logger.info("Set model.vocab_mapping_path = %s in %s", mapping_path, target)
    return PatchResult(target, new_text != text, backup_path)


# --------------------------------------------------------------------------
# Older SpecForge: scripts/train_eagle3.py
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit
        raise InputError(
            f"train_eagle3 flags: {message}. Pass the same flags you would give SpecForge's scripts/train_eagle3.py, "
            "for example --target-model-path meta-llama/Llama-3.1-8B-Instruct --draft-model-config "
            "configs/llama3-8B-eagle3.json --train-data-path data.jsonl."
        )


# Flags that decide the mapping; an abbreviation of one of them is refused
# because SpecForge's full parser could resolve it differently from ours.
_KEY_FLAGS = (
    "--target-model-path", "--draft-model-config", "--train-data-path", "--chat-template", "--max-length",
    "--cache-dir", "--ckpt-dir", "--is-preformatted", "--train-only-last-turn", "--vocab-mapping-path",
    "--train-hidden-states-path",
)


def train_eagle3_parser() -> argparse.ArgumentParser:
    """The train_eagle3.py flags that matter for counting and the mapping path,
    with SpecForge's defaults; use :func:`parse_train_eagle3_args` so other
    flags pass through."""
    parser = _Parser(prog="train_eagle3.py", add_help=False, allow_abbrev=False)
    add = parser.add_argument
    add("--target-model-path", type=str, required=True)
    add("--draft-model-config", type=str, default=None)
    add("--trust-remote-code", action="store_true")
    add("--is-vlm", action="store_true")
    add("--train-data-path", type=str, required=True)
    add("--train-hidden-states-path", type=str, default=None)
    add("--eval-hidden-states-path", type=str, default=None)
    add("--eval-data-path", type=str, default=None)
    add("--chat-template", type=str, default=DEFAULT_CHAT_TEMPLATE)
    add("--is-preformatted", action="store_true")
    add("--train-only-last-turn", action="store_true")
    add("--build-dataset-num-proc", type=int, default=8)
    add("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    add("--resume", action="store_true")
    add("--ckpt-dir", type=str, default=None)
    add("--cache-key", type=str, default=None)
    add("--cache-dir", type=str, default=DEFAULT_CACHE_DIR)
    add("--output-dir", type=str, default=None)
    add("--model-download-dir", type=str, default=None)
    # Only in an unmerged SpecForge branch (July 2026): load this file instead.
    add("--vocab-mapping-path", type=str, default=None)
    return parser


def parse_train_eagle3_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Parse train_eagle3 flags; return (known args, the other flags untouched)."""
    argv = list(argv)
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        prefixed = [flag for flag in _KEY_FLAGS if flag.startswith(name) and flag != name]
        if prefixed and name not in _KEY_FLAGS and len(name) > 2:
            raise InputError(
                f"train_eagle3 flag {name} is an abbreviation of {' / '.join(prefixed)}. Write the flag in full: "
                "the mapping's cache path depends on it and an abbreviation could be read differently by SpecForge."
            )
    args, rest = train_eagle3_parser().parse_known_args(argv)
    return args, rest


def md5_cache_key(
    train_data_path: str,
    max_length: int,
    chat_template: str,
    target_model_path: str,
    draft_vocab_size: int,
    vocab_size: int,
    *,
    legacy: bool = False,
) -> str:
    """train_eagle3.py's mapping cache key: md5 hex of
    ``"{train_data_path}-{max_length}-{chat_template}-{target_model_path}-{draft_vocab_size}-{vocab_size}"``
    (the flag strings exactly as given; ``legacy`` drops the last two parts,
    as SpecForge did before 2026-06-28)."""
    text = f"{train_data_path}-{max_length}-{chat_template}-{target_model_path}"
    if not legacy:
        text = f"{text}-{draft_vocab_size}-{vocab_size}"
    return hashlib.md5(text.encode()).hexdigest()


def read_draft_vocab_sizes(draft_config: Union[str, Mapping]) -> Tuple[int, int]:
    """``(draft_vocab_size, vocab_size)`` from a draft config dict or JSON file."""
    source = draft_config if isinstance(draft_config, str) else "draft config"
    if isinstance(draft_config, str):
        try:
            config = json.loads(_read_text(draft_config, "Draft config"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{where(draft_config, exc.lineno)}: the draft config is not valid JSON ({exc.msg}).") from None
    else:
        config = draft_config
    if not isinstance(config, Mapping):
        raise InputError(f"{source} must be a JSON object, but holds {short(config)}.")
    sizes = []
    for key in ("draft_vocab_size", "vocab_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(
                f"{where(source, field=key)} must be a positive integer, but got {short(value)}. "
                "SpecForge shapes the d2t/t2d buffers and the cache key from it; set it in the draft config."
            )
        sizes.append(value)
    return sizes[0], sizes[1]


def draft_config_path_from_args(args: argparse.Namespace) -> str:
    """The draft config train_eagle3.py keys the mapping on: ``<ckpt_dir>/config.json``
    when ``--ckpt-dir`` is a directory, else ``--draft-model-config``."""
    ckpt_dir = getattr(args, "ckpt_dir", None)
    if ckpt_dir:
        if not os.path.isdir(ckpt_dir):
            raise InputError(
                f"--ckpt-dir {ckpt_dir} is not a directory; SpecForge would stop with the same complaint. "
                "Point it at a draft checkpoint directory holding config.json."
            )
        return os.path.join(ckpt_dir, "config.json")
    if not getattr(args, "draft_model_config", None):
        raise InputError(
            "--draft-model-config is not given, so train_eagle3.py would generate a draft config from the target "
            "model and there is no file for the pre-step to patch. Pass --draft-model-config with a draft config "
            "JSON (for example configs/llama3-8B-eagle3.json)."
        )
    return args.draft_model_config


def cache_mapping_paths(args: argparse.Namespace, draft_config: Union[str, Mapping]) -> List[str]:
    """``<cache_dir>/vocab_mapping/<key>.pt`` for the current key, then the
    legacy key (the paths as train_eagle3.py joins them: relative to the
    directory it runs in when --cache-dir is relative)."""
    draft_vocab_size, vocab_size = read_draft_vocab_sizes(draft_config)
    parts = (args.train_data_path, args.max_length, args.chat_template, args.target_model_path, draft_vocab_size, vocab_size)
    directory = os.path.join(args.cache_dir, VOCAB_MAPPING_DIR)
    return [
        os.path.join(directory, md5_cache_key(*parts) + ".pt"),
        os.path.join(directory, md5_cache_key(*parts, legacy=True) + ".pt"),
    ]


def sha256_cache_key(dataset_identity: str, target_vocab_size: int, draft_vocab_size: int) -> str:
    """Newer SpecForge's key: sha256 hex of ``"<identity>:<V>:<k>"``."""
    return hashlib.sha256(f"{dataset_identity}:{target_vocab_size}:{draft_vocab_size}".encode()).hexdigest()


def offline_dataset_identity(hidden_states_path: str, max_length: int, *, cwd: Optional[str] = None) -> str:
    """The dataset identity newer SpecForge hashes for offline features: JSON
    (sorted keys) of kind "offline-features-v1", max_length and, per feature
    file in sorted order, ``[absolute path, size, mtime_ns]`` (relative paths
    taken from ``cwd``, default the current directory, as SpecForge does)."""
    files = []
    for path in list_feature_files(os.path.join(cwd or os.getcwd(), hidden_states_path)):
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns])
    return json.dumps({"kind": "offline-features-v1", "files": files, "max_length": max_length}, sort_keys=True)


def offline_cache_mapping_path(run: RunConfig, target_vocab_size: int, draft_vocab_size: int) -> str:
    """Where newer SpecForge caches the mapping it derives from offline
    features when model.vocab_mapping_path is empty. ``target_vocab_size`` is
    the *target* model's (padded_vocab_size or vocab_size of its config)."""
    if run.data_source != "hidden_states_path":
        raise InputError(
            f"{run.config_path}: newer SpecForge derives and caches a mapping only for data.hidden_states_path; "
            f"this config uses data.{run.data_source}, for which it requires model.vocab_mapping_path."
        )
    identity = offline_dataset_identity(run.data_path, run.max_length, cwd=run.cwd)
    key = sha256_cache_key(identity, target_vocab_size, draft_vocab_size)
    return os.path.join(run.resolved_cache_dir, VOCAB_MAPPING_DIR, key + ".pt")


def find_specforge_train_script(explicit: Optional[str] = None) -> str:
    """SpecForge's scripts/train_eagle3.py: ``explicit`` (--specforge-script),
    else next to an installed ``specforge`` package's source tree."""
    if explicit:
        path = os.path.abspath(os.path.expanduser(explicit))
        if not os.path.isfile(path):
            raise InputError(
                f"--specforge-script {explicit} does not exist (looked at {path}). "
                "Point it at scripts/train_eagle3.py in your SpecForge checkout."
            )
        return path
    try:
        spec = importlib.util.find_spec("specforge")
    except (ImportError, ValueError):
        spec = None
    looked = []
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(os.path.dirname(os.path.abspath(location)), "scripts", "train_eagle3.py")
        looked.append(candidate)
        if os.path.isfile(candidate):
            return candidate
    found = (
        f"the installed specforge package has no scripts/ next to it (looked at {', '.join(looked)}; "
        "wheel installs do not ship scripts/)"
        if looked
        else "no 'specforge' package is installed"
    )
    raise InputError(
        f"Cannot find SpecForge's scripts/train_eagle3.py: no --specforge-script was given and {found}. "
        "Pass --specforge-script /path/to/SpecForge/scripts/train_eagle3.py, or install SpecForge from a source "
        "checkout (pip install -e /path/to/SpecForge). SpecForge after July 2026 has no train_eagle3.py: use "
        "'specforge-vocab prepare --config run.yaml' and then 'specforge train --config run.yaml'."
    )


# --------------------------------------------------------------------------
# Pre-tokenized prompts (data.prompts_path) and offline features
# --------------------------------------------------------------------------

class RawConversationsFile(InputError):
    """The prompts file holds raw conversations, not input_ids/loss_mask
    records: count it like data.train_data_path."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"{path}: the first record has no input_ids/loss_mask, so SpecForge treats data.prompts_path as raw "
            "conversations (like data.train_data_path)."
        )


def _iter_json_records(path: str, field: str) -> Iterator[Tuple[int, Optional[str], Any]]:
    """Yield (line or record number, raw line text, parsed record or None).

    A JSON array (first non-space character '[') yields parsed records
    numbered from 1; JSONL yields raw lines, to be parsed by the caller.
    """
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{where(path, field=field)}: the file does not exist. Check the path in the run config.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {path} ({field}): {exc.strerror}.") from None
    with handle:
        try:
            first = ""
            while True:
                c = handle.read(1)
                if not c or not c.isspace():
                    first = c
                    break
            handle.seek(0)
            if first == "[":
                try:
                    records = json.load(handle)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where(path, exc.lineno, field)}: invalid JSON array ({exc.msg}).") from None
                for number, record in enumerate(records, start=1):
                    yield number, None, record
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line, None
        except UnicodeDecodeError as exc:
            raise InputError(f"{where(path, field=field)}: the file is not UTF-8 ({exc.reason}). Save it as UTF-8.") from None


def _parse_line(path: str, number: int, line: Optional[str], record: Any, is_array: bool) -> dict:
    if line is not None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where(path, number)}: invalid JSON ({exc.msg}, column {exc.colno}). Fix or remove the line.") from None
    if not isinstance(record, dict):
        place = f"{path}, record {number}" if is_array else where(path, number)
        raise InputError(f"{place} must be a JSON object, but got {short(record)}.")
    return record


def _int_array(value: Any, *, place: str, field: str, binary: bool) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InputError(f"{place}, field '{field}' must be a list of integers, but got {short(value)}.")
    if len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]  # a batch dimension of one
    if len(value) == 0:
        raise InputError(f"{place}, field '{field}' is an empty token sequence. Remove the record or re-tokenize it.")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.ndim != 1:
        raise InputError(f"{place}, field '{field}' must be a flat list of integers, but it is nested or ragged.")
    kinds = "iub" if binary else "iu"
    if array.dtype.kind not in kinds or (not binary and any(type(x) is bool for x in value)):
        bad = next((i for i, x in enumerate(value) if (not binary and isinstance(x, bool)) or not isinstance(x, int)), None)
        if bad is None:
            raise InputError(f"{place}, field '{field}' holds integers outside the 64-bit range; re-tokenize the record.")
        raise InputError(
            f"{place}, field '{field}[{bad}]' must be an integer, but got {short(value[bad])}. "
            "Token ids and loss-mask entries are whole numbers."
        )
    array = array.astype(np.int64, copy=False)
    if binary and array.size and (array.min() < 0 or array.max() > 1):
        bad = int(np.flatnonzero((array < 0) | (array > 1))[0])
        raise InputError(f"{place}, field '{field}[{bad}]' must be 0 or 1, but got {int(array[bad])}.")
    return array


def _check_id_range(ids: np.ndarray, vocab_size: Optional[int], place: str) -> None:
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise InputError(f"{place} holds the negative token id {low}. Token ids must be in [0, vocab_size); re-tokenize the data.")
    if vocab_size is not None and high >= vocab_size:
        raise InputError(
            f"{place} holds the token id {high}, outside the target vocabulary of {vocab_size} ids. "
            "The data were tokenized with another tokenizer; use the target model's tokenizer or fix vocab_size."
        )


def prompts_file_kind(path: str) -> str:
    """'pretokenized', 'conversations' or 'empty': SpecForge decides from the
    first record (both input_ids and loss_mask, or neither)."""
    for number, line, record in _iter_json_records(path, "data.prompts_path"):
        first = _parse_line(path, number, line, record, line is None)
        has_ids, has_mask = "input_ids" in first, "loss_mask" in first
        if has_ids != has_mask:
            missing = "loss_mask" if has_ids else "input_ids"
            raise InputError(
                f"{where(path, number)} has {'input_ids' if has_ids else 'loss_mask'} but no {missing}. A pre-tokenized "
                "prompts file needs both in every record; add the missing field or give raw conversations instead."
            )
        return "pretokenized" if has_ids else "conversations"
    return "empty"


def iter_prompt_records(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Loss-masked token ids (int64) of each pre-tokenized record in a
    ``data.prompts_path`` file (JSONL or a JSON array), truncated to
    ``max_length`` as SpecForge does. Record i goes to rank ``i % world_size``.

    Raises :class:`RawConversationsFile` when the first record has neither
    input_ids nor loss_mask (SpecForge then reads raw conversations).
    """
    kind = prompts_file_kind(path)
    if kind == "empty":
        return
    if kind == "conversations":
        raise RawConversationsFile(path)
    for index, (number, line, record) in enumerate(_iter_json_records(path, "data.prompts_path")):
        if index % world_size != rank:
            continue
        is_array = line is None
        record = _parse_line(path, number, line, record, is_array)
        place = f"{path}, record {number}" if is_array else where(path, number)
        missing = [name for name in ("input_ids", "loss_mask") if name not in record]
        if missing:
            raise InputError(
                f"{place} has no {' and no '.join(missing)}. Every record of a pre-tokenized prompts file needs both "
                "input_ids and loss_mask (SpecForge decides the format from the first record)."
            )
        ids = _int_array(record["input_ids"], place=place, field="input_ids", binary=False)
        mask = _int_array(record["loss_mask"], place=place, field="loss_mask", binary=True)
        if ids.size != mask.size:
            raise InputError(
                f"{place}: input_ids has {ids.size} entries but loss_mask has {mask.size}; they must be equally long."
            )
        kept = ids[:max_length][mask[:max_length] == 1]
        _check_id_range(kept, vocab_size, place)
        yield kept


def list_feature_files(path: str) -> List[str]:
    """Offline feature files as SpecForge lists them: a file itself, or every
    ``*.ckpt``/``*.ckpt.gz`` under a directory (recursively), absolute, sorted."""
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise InputError(
            f"data.hidden_states_path {path} does not exist. Point it at the directory written by SpecForge's "
            "prepare_hidden_states.py (relative paths start at the current directory)."
        )
    files = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            if name.endswith(FEATURE_SUFFIXES):
                files.append(os.path.abspath(os.path.join(root, name)))
    files.sort()
    if not files:
        raise InputError(
            f"data.hidden_states_path {path} holds no *.ckpt or *.ckpt.gz feature files. "
            "Run SpecForge's prepare_hidden_states.py first, or point at the directory it wrote."
        )
    return files


def _load_feature(path: str) -> Any:
    import torch

    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path} cannot be read with torch.load(weights_only=True): it holds objects other than tensors and plain "
            f"containers ({short(reason, 160)}). specforge-vocab never unpickles arbitrary objects; re-save the "
            "features as a dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(
            f"{path} is not a readable torch feature file ({type(exc).__name__}: {short(str(exc), 160)}). "
            "It may be truncated; regenerate it with prepare_hidden_states.py or remove it."
        ) from None


def read_feature_file(path: str, max_length: int, *, vocab_size: Optional[int] = None) -> np.ndarray:
    """Loss-masked ids of one offline feature file: input_ids where loss_mask
    is non-zero, after flattening (a batch dimension of 1 is common) and
    truncating to ``max_length``."""
    import torch

    data = _load_feature(path)
    if not isinstance(data, Mapping):
        raise InputError(f"{path} must hold a dict of tensors (input_ids, loss_mask, ...), but holds {type(data).__name__}.")
    missing = [name for name in ("input_ids", "loss_mask") if name not in data]
    if missing:
        raise InputError(
            f"{path} has no {' and no '.join(missing)} (keys: {', '.join(map(str, data))}). Offline feature files "
            "must hold input_ids and loss_mask; regenerate them with SpecForge's prepare_hidden_states.py."
        )
    ids, mask = data["input_ids"], data["loss_mask"]
    for name, value in (("input_ids", ids), ("loss_mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: '{name}' must be a tensor, but is {type(value).__name__}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{path}: 'input_ids' must be an integer tensor, but has dtype {ids.dtype}.")
    ids, mask = ids.reshape(-1), mask.reshape(-1)
    if ids.numel() != mask.numel():
        raise InputError(
            f"{path}: input_ids has {ids.numel()} entries but loss_mask has {mask.numel()}; they must match."
        )
    ids, mask = ids[:max_length], mask[:max_length]
    kept = ids[mask.to(torch.bool)].to(torch.int64).numpy()
    _check_id_range(kept, vocab_size, path)
    return kept


def iter_feature_files(
    path: str,
    max_length: int,
    *,
    vocab_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Loss-masked ids (int64) of each feature file under ``data.hidden_states_path``;
    file i (in sorted order) goes to rank ``i % world_size``."""
    for index, file in enumerate(list_feature_files(path)):
        if index % world_size == rank:
            yield read_feature_file(file, max_length, vocab_size=vocab_size)


def count_masked_ids(id_arrays: Iterable[np.ndarray], vocab_size: int, *, chunk: int = 1 << 22) -> np.ndarray:
    """Dense int64 counts [vocab_size] of all ids in ``id_arrays``.

    >>> count_masked_ids([np.array([1, 1, 3])], 5).tolist()
    [0, 2, 0, 1, 0]
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise InputError(f"vocab_size must be a positive integer, but got {short(vocab_size)}.")
    counts = np.zeros(int(vocab_size), dtype=np.int64)
    pending: List[np.ndarray] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        ids = np.concatenate(pending) if len(pending) > 1 else pending[0]
        pending, size = [], 0
        if ids.size == 0:
            return
        _check_id_range(ids, int(vocab_size), "The counted data")
        np.add(counts, np.bincount(ids, minlength=int(vocab_size)), out=counts)

    for array in id_arrays:
        array = np.asarray(array)
        if array.dtype.kind not in "iu":
            raise InputError(f"Token ids must be integers, but an array of dtype {array.dtype} was given.")
        pending.append(array.astype(np.int64, copy=False).ravel())
        size += array.size
        if size >= chunk:
            flush()
    flush()
    return counts
