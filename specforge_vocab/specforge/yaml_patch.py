"""Set ``model.*`` fields (``vocab_mapping_path``, ``draft_model_config``, ``draft_checkpoint_path``) in a
user's run config and change nothing else in the file.

The YAML is edited as text: comments, key order, quoting and every other line stay byte for byte.
The model section may be a block or a flow mapping (``model: {...}``), with an anchor; the old value
may be plain, quoted, a block scalar, an alias or span several lines. Every edit is re-read and must
give the original document with only that key changed. What cannot be edited (a model section that
is an alias of another) is refused with the place named, before any work (prepare asks
:func:`run_config_with_mapping` while it plans); into a new file (--output-config) such a config is
written re-serialised instead.
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


_BAD_VALUE_START = set("{[%@`?,")


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


def _odd_layout(path: str, line: int, what: str, key: str = _KEY) -> InputError:
    return InputError(
        f"{where(path, line, 'model.' + key)}: {what}, so the value cannot be set without rewriting "
        "other parts of the file. Nothing was changed. Pass --output-config NEW.yaml (prepare then writes the "
        "run config, re-serialised with the key set, to NEW.yaml; train with `specforge train --config "
        "NEW.yaml`), or write the model section in block style ('model:' then one indented 'field: value' per line)."
    )


_PROPERTY = re.compile(r"(?:[&!][^ \t,\[\]{}]*[ \t]+)*")  # anchors and tags before a value: "&a ", "!!str "


def _flow_end(text: str, start: int, source: str, line: int) -> Tuple[int, list]:
    """The index of the '}' closing the flow mapping opened at ``start``, and the spans
    ``(key start, key end, value start, value end)`` of its own entries (quotes, nesting and
    comments skipped)."""
    depth, i, entries = 0, start, []
    entry_start, colon, quoted_end = start + 1, None, -1
    while i < len(text):
        c = text[i]
        if c in "\"'":
            quoted_end = _scan_quoted(text, i)
            if quoted_end < 0:
                raise _odd_layout(source, line, "a quoted scalar in the flow mapping 'model: {...}' is not closed")
            i = quoted_end
            continue
        if c == "#" and text[i - 1] in " \t\r\n":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                if colon is not None:
                    entries.append((entry_start, colon, colon + 1, i))
                return i, entries
        elif depth == 1 and c == ",":
            if colon is not None:
                entries.append((entry_start, colon, colon + 1, i))
            entry_start, colon = i + 1, None
        elif depth == 1 and c == ":" and colon is None and (i == quoted_end or text[i + 1 : i + 2] in " \t\r\n,}"):
            colon = i
        i += 1
    raise _odd_layout(source, line, "the flow mapping 'model: {...}' is not closed")


def _comment_start(text: str, begin: int, end: int) -> int:
    """Where a comment starts in ``text[begin:end]`` (outside quotes), or ``end``."""
    i = begin
    while i < end:
        c = text[i]
        if c in "\"'":
            close = _scan_quoted(text, i)
            i = end if close < 0 else close
            continue
        if c == "#" and (i == 0 or text[i - 1] in " \t\r\n"):
            return i
        i += 1
    return end


def _patch_flow(text: str, brace: int, key: str, value: str, source: str, line: int) -> str:
    """``text`` with ``key`` set inside the flow mapping ``model: {...}`` that opens at ``brace``."""
    close, entries = _flow_end(text, brace, source, line)
    rendered = _double_quoted(value)  # a flow context: quoting is always safe
    hits = [e for e in entries if _unquote_key(text[e[0] : e[1]].strip()) == key]
    if len(hits) > 1:
        raise _odd_layout(source, line, f"model.{key} appears {len(hits)} times", key)
    if hits:  # replace the value, keeping an anchor or tag on it
        _, _, i, end = hits[0]
        while i < end and text[i] in " \t\r\n":
            i += 1
        i += len(_PROPERTY.match(text[i:end]).group(0))
        if i < end and text[i] in "\"'":
            j = _scan_quoted(text, i)
        else:
            newline = text.find("\n", i, end)
            j = _comment_start(text, i, end if newline < 0 else newline)
            while j > i and text[j - 1] in " \t\r":
                j -= 1
        return text[:i] + rendered + text[j:]
    last = close  # insert after the last entry: skip back over blanks and comments
    while True:
        last -= 1
        if text[last] in " \t\r\n":
            continue
        line_start = text.rfind("\n", 0, last) + 1
        comment = _comment_start(text, line_start, last + 1)
        if comment <= last:
            last = comment
            continue
        break
    if last == brace:
        insert = f"{key}: {rendered}"
    elif text[last] == ",":
        insert = f" {key}: {rendered}"
    else:
        insert = f", {key}: {rendered}"
    return text[: last + 1] + insert + text[last + 1 :]


def _model_value_start(text: str, lines: list, start: int, match) -> Tuple[str, int]:
    """What follows 'model:' on its line, past any anchor or tag: ("", -1) for a block section,
    ("{", offset of the brace) for a flow mapping, else (the text, -1)."""
    rest_at = match.start("rest")
    rest = match.group("rest")
    lead = len(rest) - len(rest.lstrip(" \t"))
    props = _PROPERTY.match(rest[lead:]).group(0)
    after = rest[lead + len(props) :]
    if not props and rest[lead:].startswith(("&", "!")):  # an anchor or tag alone on the line
        props, after = rest[lead:], ""
    value = after.strip()
    if value == "" or value.startswith("#"):
        return "", -1
    offset = sum(len(line) for line in lines[:start]) + rest_at + lead + len(props)
    if value.startswith("{"):
        return "{", offset + (len(after) - len(after.lstrip(" \t")))
    return value, -1


def _value_lines_end(bodies: list, content: list, j: int, indent: int) -> int:
    """The last line of the value that starts on line ``j`` (its more-indented continuation lines)."""
    last = j
    for n in content:
        if n <= j:
            continue
        if _indent_of(bodies[n]) <= indent:
            break
        last = n
    return last


def patch_vocab_mapping_text(text: str, mapping_path: str, *, source: str = "run config") -> str:
    """``text`` (a YAML run config) with ``model.vocab_mapping_path`` set; see :func:`patch_model_text`.

    >>> patch_vocab_mapping_text("model: {target_model_path: m}\n", "/v.pt")
    'model: {target_model_path: m, vocab_mapping_path: "/v.pt"}\n'
    """
    return patch_model_text(text, _KEY, mapping_path, source=source)


def patch_model_text(text: str, key: str, value: str, *, source: str = "run config") -> str:
    """Return ``text`` (a YAML run config) with ``model.<key>`` set to the string ``value``;
    every other byte is kept. The model section may be a block mapping
    (with an anchor on it) or a flow mapping (``model: {...}``); the old value may be plain,
    quoted, a block scalar or span several lines. Raises InputError for layouts it cannot
    edit safely (the model section an alias of another, duplicates).

    The result is re-parsed: it must equal the original document with only that one key changed.
    """
    if key not in SETTABLE_KEYS:
        raise ValueError(f"patch_model_text: {key!r} is not one of {SETTABLE_KEYS}")
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
        raise _odd_layout(
            source, None, f"found {len(starts)} top-level 'model:' lines at column 0, expected exactly one", key
        )
    start, match = starts[0]
    bom = 1 if start == 0 and bodies[0].startswith("\ufeff") else 0
    kind, where_at = _model_value_start(text, lines, start, match)
    if kind == "{":
        new_text = _patch_flow(text, where_at + bom, key, value, source, start + 1)
    elif kind:
        what = "an alias of another section" if kind.startswith("*") else f"{short(kind)}"
        raise _odd_layout(source, start + 1, f"'model:' is followed by {what} on the same line", key)
    else:
        new_text = _patch_block(text, lines, bodies, start, key, value, source)
    expected = copy.deepcopy(original)
    expected["model"][key] = value
    try:
        reparsed = yaml.safe_load(new_text)
    except yaml.YAMLError:
        reparsed = None
    if reparsed != expected:
        raise _odd_layout(
            source,
            start + 1,
            "re-reading the edited file did not give the original config with only this key changed",
            key,
        )
    return new_text


def _patch_block(text: str, lines: list, bodies: list, start: int, key: str, value: str, source: str) -> str:
    """``text`` with ``key`` set in the block mapping under the 'model:' line ``start``."""

    def odd(line: int, what: str) -> InputError:
        return _odd_layout(source, line, what, key)

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
    if not hits:
        other_styles = [m.group("rest").strip()[:1] for _, m in keys]
        last = content[-1]
        body, eol = _split_eol(lines[last])
        eol_new = eol or next((_split_eol(line)[1] for line in lines if _split_eol(line)[1]), "\n")
        style = '"' if '"' in other_styles else ""
        new_line = " " * indent + f"{key}: " + _render_scalar(value, style)
        if eol:
            return "".join(lines[: last + 1] + [new_line + eol_new] + lines[last + 1 :])
        return "".join(lines[:last] + [body + eol_new, new_line] + lines[last + 1 :])
    j, m = hits[0]
    body, eol = _split_eol(lines[j])
    value_from = m.end("colon")
    rest_raw = body[value_from:]
    lead = len(rest_raw) - len(rest_raw.lstrip(" \t"))
    v0 = value_from + lead
    v0 += len(_PROPERTY.match(body[v0:]).group(0))  # keep an anchor or tag on the value
    head = body[v0 : v0 + 1]
    last = _value_lines_end(bodies, content, j, indent)
    if last > j or head in ("|", ">"):  # a block scalar, or a value continued on more-indented lines
        style = head if head in ('"', "'") else ""
        new_body = body[:v0] + _render_scalar(value, style)
        return "".join(lines[:j] + [new_body + _split_eol(lines[last])[1]] + lines[last + 1 :])
    if head in ('"', "'"):
        v1 = _scan_quoted(body, v0)
        if v1 < 0:
            raise odd(j + 1, "its quoted value is not closed on its line")
        style = head
    elif head == "" or head == "#":
        v1 = v0
        style = ""
    elif head == "*":  # an alias: replaced by the value itself
        alias = re.match(r"\*[^ \t,\[\]{}]+", body[v0:])
        v1 = v0 + (alias.end() if alias else 1)
        style = ""
    elif head in _BAD_VALUE_START:
        raise odd(j + 1, f"its value starts with {head!r} (a flow value or a reserved character)")
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
    if v0 == v1 == value_from + lead:  # no value yet: keep the spacing before a comment as it is
        new_body = body[:value_from] + " " + rendered + body[value_from:]
    else:
        new_body = body[:v0] + rendered + body[v1:]
    return "".join(lines[:j] + [new_body + eol] + lines[j + 1 :])


def rewritten_run_config(text: str, values: Dict[str, str], *, source: str) -> str:
    """The run config re-serialised with ``model.<key>`` set to each of ``values`` (for a new file
    only: comments and layout of the original are not kept; aliases are written out)."""
    data = copy.deepcopy(parse_yaml_text(text, source))
    fields = ", ".join(f"model.{key}" for key in values)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{source} has no 'model' mapping, so there is nowhere to set {fields}.")
    data["model"].update(values)

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    header = f"# {os.path.basename(source)} with {fields} set by specforge-vocab prepare\n"
    new_text = header + yaml.dump(data, Dumper=_NoAliases, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(new_text) != data:  # pragma: no cover - safe_dump round-trips plain data
        raise InputError(f"{source}: the run config cannot be written back as YAML. Set the key by hand.")
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


def run_config_with_fields(
    yaml_path: str, values: Dict[str, str], *, output_path: Optional[str] = None
) -> Tuple[str, str, str]:
    """``(file to write, its old text, the new text)`` of setting ``model.<key>`` to each of ``values``;
    nothing is written, so prepare calls it before any work to refuse a layout it cannot edit.

    In place, the text is edited (every other byte kept) or refused. Into another file
    (``output_path``), a layout the edit cannot handle is written re-serialised instead.
    """
    yaml_path = str(yaml_path)
    for key, value in values.items():
        if not isinstance(value, str) or not value:
            raise InputError(f"model.{key} must be set to a non-empty path, but got {short(value)}.")
    text = read_run_text(yaml_path, "Run config")
    in_place = output_path is None or (os.path.exists(output_path) and os.path.samefile(output_path, yaml_path))
    target = yaml_path if in_place else str(output_path)
    if is_json_config(yaml_path):
        return target, text, _patch_json_text(text, values, yaml_path)
    try:
        new_text = text
        for key, value in values.items():
            new_text = patch_model_text(new_text, key, value, source=yaml_path)
        return target, text, new_text
    except InputError:
        if in_place:
            raise
    logger.info("%s cannot be edited in place; writing %s re-serialised (comments not kept).", yaml_path, target)
    return target, text, rewritten_run_config(text, values, source=yaml_path)


def run_config_with_mapping(
    yaml_path: str, mapping_path: str, *, output_path: Optional[str] = None
) -> Tuple[str, str, str]:
    """:func:`run_config_with_fields` for ``model.vocab_mapping_path`` alone."""
    if not isinstance(mapping_path, str) or not mapping_path:
        raise InputError(f"The vocab mapping path must be a non-empty string, but got {short(mapping_path)}.")
    return run_config_with_fields(yaml_path, {_KEY: mapping_path}, output_path=output_path)


def set_model_fields(
    yaml_path: str,
    values: Dict[str, str],
    *,
    output_path: Optional[str] = None,
    backup: bool = True,
) -> PatchResult:
    """Set ``model.<key>`` to each of ``values`` in a run config, keeping comments, key order, quoting
    and line endings byte-identical elsewhere (see :func:`run_config_with_fields`); one write (and one
    ``.bak``) for all of them.

    In place (no ``output_path``) the original is kept in ``<path>.bak`` (``backup=True``; see
    fileio.backup_file); unchanged values write nothing. Paths are written as given: SpecForge resolves
    them from the directory training runs in, so an absolute path is the safe choice.
    """
    yaml_path = str(yaml_path)
    target, text, new_text = run_config_with_fields(yaml_path, values, output_path=output_path)
    in_place = target == yaml_path
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
