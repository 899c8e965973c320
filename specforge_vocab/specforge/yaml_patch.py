"""Set ``model.*`` fields (``vocab_mapping_path``, ``draft_model_config``, ``draft_checkpoint_path``) in a
user's run config and change nothing else in the file.

The YAML is edited as text: comments, key order, quoting and every other line stay byte for byte.
Layouts that cannot be edited safely this way (a flow mapping, anchors, a block scalar at that
key) are refused with the exact place named, before any file is written.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import Dict, NamedTuple, Optional, Tuple

import yaml

from specforge_vocab.errors import InputError, short, where
from specforge_vocab.fileio import atomic_write, backup_file
from specforge_vocab.specforge.run_config import is_json_config, parse_yaml_text, read_run_text

logger = logging.getLogger(__name__)


class PatchResult(NamedTuple):
    path: str
    changed: bool
    backup_path: Optional[str]


_TOP_KEY = re.compile(r"""^(?P<key>[A-Za-z_][\w.-]*|"[^"]*"|'[^']*')[ \t]*:(?=[ \t]|$)(?P<rest>.*)$""")


_CHILD_KEY = re.compile(
    r"""^(?P<indent>[ ]+)(?P<key>[A-Za-z_][\w.-]*|"[^"]*"|'[^']*')(?P<colon>[ \t]*:)(?=[ \t]|$)(?P<rest>.*)$"""
)


_BAD_VALUE_START = set("|>&*!{[%@`?,")


_KEY = "vocab_mapping_path"


#: the model.* fields prepare may set
SETTABLE_KEYS = ("vocab_mapping_path", "draft_model_config", "draft_checkpoint_path")


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
            if quote == "'" and text[i + 1 : i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return -1


def _plain_ok(value: str) -> bool:

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
    return (
        0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or 0x10000 <= o <= 0x10FFFF
    ) and c not in ("\u2028", "\u2029", "\ufeff")


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


def _odd_layout(path: str, line: int, what: str, key: str) -> InputError:
    return InputError(
        f"{where(path, line, 'model.' + key)}: {what}, so the value cannot be replaced without rewriting "
        "other parts of the file. Nothing was changed. Write the model section in block style "
        "('model:' then one indented 'field: value' per line), or pass --output-config and set the key by hand."
    )


def patch_vocab_mapping_text(text: str, mapping_path: str, *, source: str = "run config") -> str:
    """``text`` (a YAML run config) with ``model.vocab_mapping_path`` set; see :func:`patch_model_text`."""
    return patch_model_text(text, _KEY, mapping_path, source=source)


def patch_model_text(text: str, key: str, value: str, *, source: str = "run config") -> str:
    """Return ``text`` (a YAML run config) with ``model.<key>`` set to the string
    ``value``; every other byte is kept. Raises InputError for layouts it cannot
    edit safely (flow style, anchors, block scalars, duplicates).

    The result is re-parsed: it must equal the original document with only
    that one key changed.
    """
    if key not in SETTABLE_KEYS:
        raise ValueError(f"patch_model_text: {key!r} is not one of {SETTABLE_KEYS}")

    def odd(line: int, what: str) -> InputError:
        return _odd_layout(source, line, what, key)

    original = parse_yaml_text(text, source)
    if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
        raise InputError(
            f"{source} has no block 'model:' section (top level: {short(original)}), so there is nowhere to set "
            f"model.{key}. Add a 'model:' section with target_model_path and draft_model_config."
        )
    current = original["model"].get(key)
    if current is not None and not isinstance(current, str):
        raise InputError(
            f"{where(source, field='model.' + key)} must be a string (a path), but it holds {short(current)}. "
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
        raise odd(
            start + 1,
            f"'model:' is followed by {short(rest)} on the same line (flow style, an anchor or a tag)",
        )
    end = len(lines)
    for j in range(start + 1, len(lines)):
        body = bodies[j]
        if body[:1] not in (" ", "\t", "") and not body.startswith("#"):
            end = j
            break
    content = [j for j in range(start + 1, end) if _is_content(bodies[j])]
    if not content:
        raise odd(start + 1, "the 'model:' section has no indented fields")
    if any(bodies[j].startswith("\t") or "\t" in bodies[j][: _indent_of(bodies[j]) + 1] for j in content):
        raise odd(content[0] + 1, "the model section is indented with tabs")
    indent = _indent_of(bodies[content[0]])
    if bodies[content[0]][indent:].startswith(("{", "[", "- ", "? ")):
        raise odd(content[0] + 1, "the model section is written in flow or complex-key style")
    keys = []
    for j in content:
        if _indent_of(bodies[j]) != indent:
            continue
        child = _CHILD_KEY.match(bodies[j])
        if child and len(child.group("indent")) == indent:
            keys.append((j, child))
    hits = [(j, m) for j, m in keys if _unquote_key(m.group("key")) == key]
    if len(hits) > 1:
        raise odd(hits[1][0] + 1, f"model.{key} appears {len(hits)} times")
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
        head = body[v0 : v0 + 1]
        if continues(j):
            raise odd(j + 1, "its value continues on the following, more indented lines")
        if head in ('"', "'"):
            v1 = _scan_quoted(body, v0)
            if v1 < 0:
                raise odd(j + 1, "its quoted value spans several lines")
            style = head
        elif head == "" or head == "#":
            v1 = v0
            style = ""
        elif head in _BAD_VALUE_START:
            raise odd(j + 1, f"its value starts with {head!r} (a block scalar, anchor, alias, tag or flow value)")
        else:
            comment = re.search(r"[ \t]#", body[v0:])
            v1 = v0 + (comment.start() if comment else len(body) - v0)
            while v1 > v0 and body[v1 - 1] in " \t":
                v1 -= 1
            style = ""
        tail = body[v1:]
        if head != "#" and tail.strip() and not re.match(r"[ \t]+#", tail):
            raise odd(j + 1, f"its value is followed by {short(tail.strip())}")
        rendered = _render_scalar(value, style)
        if v0 == v1:  # no value yet: keep the spacing before a comment as it is
            new_body = body[:value_from] + " " + rendered + body[value_from:]
        else:
            new_body = body[:v0] + rendered + body[v1:]
        new_lines = lines[:j] + [new_body + eol] + lines[j + 1 :]
    else:
        last = content[-1]
        body, eol = _split_eol(lines[last])
        eol_new = eol or next((_split_eol(line)[1] for line in lines if _split_eol(line)[1]), "\n")
        style = '"' if '"' in other_styles else ""
        new_line = " " * indent + f"{key}: " + _render_scalar(value, style)
        if eol:
            new_lines = lines[: last + 1] + [new_line + eol_new] + lines[last + 1 :]
        else:
            new_lines = lines[:last] + [body + eol_new, new_line] + lines[last + 1 :]
    new_text = "".join(new_lines)
    expected = copy.deepcopy(original)
    expected["model"][key] = value
    try:
        reparsed = yaml.safe_load(new_text)
    except yaml.YAMLError:
        reparsed = None
    if reparsed != expected:
        raise odd(start + 1, "re-reading the edited file did not give the original config with only this key changed")
    return new_text


def _patch_json_text(text: str, values: Dict[str, str], source: str) -> str:
    """JSON run configs have no comments: re-serialise with the same key order
    and the indentation of the original (whitespace may be normalised)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where(source, exc.lineno)}: the run config is not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        fields = ", ".join(f"model.{key}" for key in values)
        raise InputError(f'{source} has no "model" object, so there is nowhere to set {fields}.')
    data["model"].update(values)
    indent_match = re.search(r"\n([ \t]+)\S", text)
    indent = indent_match.group(1) if indent_match else None
    out = json.dumps(data, indent=indent if indent is not None else None, ensure_ascii=False)
    return out + ("\n" if text.endswith("\n") else "")


def set_model_fields(
    yaml_path: str,
    values: Dict[str, str],
    *,
    output_path: Optional[str] = None,
    backup: bool = True,
) -> PatchResult:
    """Set ``model.<key>`` to each of ``values`` in a run config, keeping comments, key order, quoting
    and line endings byte-identical elsewhere; one write (and one ``.bak``) for all of them.

    In place (no ``output_path``) the old file is first copied to ``<path>.bak``
    (``backup=True``); unchanged values write nothing. Paths are written as given:
    SpecForge resolves them from the directory training runs in, so an absolute path is the safe choice.
    """
    yaml_path = str(yaml_path)
    for key, value in values.items():
        if not isinstance(value, str) or not value:
            raise InputError(f"model.{key} must be set to a non-empty path, but got {short(value)}.")
    text = read_run_text(yaml_path, "Run config")
    if is_json_config(yaml_path):
        new_text = _patch_json_text(text, values, yaml_path)
    else:
        new_text = text
        for key, value in values.items():
            new_text = patch_model_text(new_text, key, value, source=yaml_path)
    in_place = output_path is None or (os.path.exists(output_path) and os.path.samefile(output_path, yaml_path))
    target = yaml_path if in_place else str(output_path)
    shown = ", ".join(f"model.{key} = {value}" for key, value in values.items())
    if in_place and new_text == text:
        logger.info("%s already has %s", yaml_path, shown)
        return PatchResult(target, False, None)
    backup_path = backup_file(yaml_path) if (in_place and backup) else None
    atomic_write(target, new_text, keep_mode_of=yaml_path)
    logger.info("Set %s in %s", shown, target)
    return PatchResult(target, new_text != text, backup_path)


def set_vocab_mapping_path(
    yaml_path: str,
    mapping_path: str,
    *,
    output_path: Optional[str] = None,
    backup: bool = True,
) -> PatchResult:
    """Set ``model.vocab_mapping_path`` in a run config (:func:`set_model_fields`)."""
    if not isinstance(mapping_path, str) or not mapping_path:
        raise InputError(f"The vocab mapping path must be a non-empty string, but got {short(mapping_path)}.")
    return set_model_fields(yaml_path, {_KEY: mapping_path}, output_path=output_path, backup=backup)
