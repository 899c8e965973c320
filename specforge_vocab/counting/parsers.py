"""SpecForge's general, thinking and glm parsers up to the rendered text (docs/SPECFORGE.md sections 3, 3b).

A record becomes the text SpecForge tokenizes in four steps, each as SpecForge has it:

1. the record's ``tools`` (:func:`record_tools`) and its other columns, which reach the chat template
   as variables (:func:`template_columns`);
2. every message normalised (role/from, content/value; :func:`normalize_message`);
3. the message list: system message, leading non-user turns dropped, cut at the first broken order,
   each message cut to the parser's keys with its tool calls cleaned (:func:`message_list`);
4. the tokenizer's chat template with the parser's arguments (:func:`render_messages`), or the
   template fallback when the chat template is missing or raises ValueError/TypeError.

>>> normalize_message({"from": "human", "value": "hi", "weight": 1})
{'weight': 1, 'role': 'user', 'content': 'hi'}
>>> sanitize_message({"role": "assistant", "content": "x", "reasoning_content": "r"}, GENERAL_KEYS)
{'role': 'assistant', 'content': 'x'}
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.errors import InputError, short, where

logger = logging.getLogger(__name__)


#: The message keys each parser keeps (parse.py: Parser.standard_keys, ThinkingParser's own).
GENERAL_KEYS = ("role", "content", "tool_calls")
THINKING_KEYS = GENERAL_KEYS + ("reasoning_content", "name", "tool_call_id")


#: Top-level columns SpecForge's preprocessing takes for itself; every other column is a template variable.
RESERVED_COLUMNS = ("conversations", "id", "tools")


#: Names SpecForge's parse() binds itself: a column with one of them makes the whole preprocessing fail.
PARSE_PARAMETERS = ("self", "conversation", "max_length", "preformatted", "train_only_last_turn", "tool")


#: Names the parsers' own apply_chat_template(self, messages, tool, **kwargs) binds: such a column raises
#: TypeError inside SpecForge's try block, so the record is rendered by the fallback.
WRAPPER_PARAMETERS = ("messages",)


ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


class DatasetError(InputError):
    """Bad input that makes SpecForge fail for the whole dataset: never skipped by --skip-invalid."""


def record_tools(value: Any, *, legacy_reader: bool = False) -> Any:
    """The ``tools`` SpecForge hands the parser for one record's ``tools`` value.

    A JSON string becomes whatever it decodes to (a dict stays a dict), invalid JSON ``[]``; a list
    stays; anything else (None, a dict, a number) becomes ``[]``. The older train_eagle3.py's reader
    JSON-encoded a dict first, so there a dict stays a dict.

    >>> record_tools('{"name": "f"}'), record_tools("[oops"), record_tools({"name": "f"})
    ({'name': 'f'}, [], [])
    """
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return []
    if legacy_reader and isinstance(value, dict):
        return value
    return value if isinstance(value, list) else []


def template_columns(
    record: Dict[str, Any], template: ChatTemplate, *, fill: Sequence[str] = (), source: str = "input", line=None
) -> Dict[str, Any]:
    """The record's columns that reach the parser as keyword arguments (every column but conversations,
    id and tools), with None for each name in ``fill`` the record lacks (``datasets`` gives every record
    every column of the file).

    Raises DatasetError for columns that make SpecForge fail for the whole dataset.
    """
    columns = {key: value for key, value in record.items() if key not in RESERVED_COLUMNS}
    for name in fill:
        columns.setdefault(name, None)
    clash = [key for key in columns if key in PARSE_PARAMETERS]
    if clash:
        raise DatasetError(
            f"{where(source, line)}: the column(s) {', '.join(map(repr, clash))} have the names of parameters of "
            "SpecForge's parser (parse() would get them twice), so SpecForge's preprocessing fails with a "
            "TypeError for the whole dataset. Rename or drop these columns."
        )
    if columns and template.is_harmony:
        raise DatasetError(
            f"{where(source, line)}: the column(s) {', '.join(map(repr, columns))} are passed to SpecForge's "
            "openai-harmony parser, whose parse() takes no extra arguments, so SpecForge's preprocessing fails "
            "with a TypeError for the whole dataset. Keep only conversations (and id, tools) in the records."
        )
    return columns


def normalize_message(message: Any, *, source: str = "input", line=None, index: int = 0) -> Dict[str, Any]:
    """SpecForge's _normalize_message: role from ``role`` (else ``from``, else ""), human/gpt renamed;
    content = ``content`` or ``value`` or ""; every other key kept. Roles outside user/assistant/system/
    tool are kept as they are (the chat template decides what they render to)."""
    field = f"conversations[{index}]"
    if not isinstance(message, dict):
        raise InputError(
            f"{where(source, line, field)}: each message must be an object with role/content "
            f"(or ShareGPT from/value), but got {type(message).__name__} {short(message)}."
        )
    role_key = "role" if "role" in message else "from"
    role = message.get(role_key, "")
    if not isinstance(role, str):
        raise InputError(
            f"{where(source, line, field + '.' + role_key)}: the role must be a string (user, assistant, system, "
            f"tool, ... or ShareGPT's human, gpt), but got {type(role).__name__} {short(role)}. Fix the message."
        )
    for key in ("content", "value"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(
                f"{where(source, line, field + '.' + key)}: content must be a string or null, but got "
                f"{type(value).__name__} {short(value)}. Flatten multimodal or structured content to text."
            )
    normalized = {
        **message,
        "role": ROLE_ALIASES.get(role, role),
        "content": message.get("content") or message.get("value") or "",
    }
    normalized.pop("from", None)
    normalized.pop("value", None)
    return normalized


def sanitize_message(message: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """SpecForge's _sanitize_message: only ``keys`` stay; ``tool_calls`` cleaned (a JSON string parsed,
    invalid JSON dropped; in a list, non-dict calls dropped, each call reduced to id, type and a
    function with name and parsed arguments)."""
    cleaned = {key: value for key, value in message.items() if key in keys}
    if "tool_calls" not in cleaned:
        return cleaned
    calls = cleaned["tool_calls"]
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            del cleaned["tool_calls"]
            return cleaned
    if isinstance(calls, list):  # any other type (dict, None, a number) is left as it is
        cleaned["tool_calls"] = [_clean_call(call) for call in calls if isinstance(call, dict)]
    return cleaned


def _clean_call(call: Dict[str, Any]) -> Dict[str, Any]:
    clean = {"id": call.get("id", ""), "type": call.get("type", "function")}
    function = call.get("function", {})
    if isinstance(function, dict):
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        clean["function"] = {"name": function.get("name", ""), "arguments": arguments}
    return clean


def message_list(conversation: List[Dict[str, Any]], template: ChatTemplate) -> List[Dict[str, Any]]:
    """The messages SpecForge renders: system first, leading non-user turns dropped, cut at a broken order.

    A tool message must follow an assistant or tool message, an assistant message a user or tool
    message (comparing with the previous message of the normalised list); the first that does not
    ends the conversation. Each kept message is cut to the parser's keys (:func:`sanitize_message`).

    >>> from .templates import get_template
    >>> msgs = message_list([{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"},
    ...                      {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
    ...                     get_template("lfm"))
    >>> [m["role"] for m in msgs]
    ['user', 'assistant']
    """
    keys = THINKING_KEYS if template.parser_type == "thinking" else GENERAL_KEYS
    messages: List[Dict[str, Any]] = []
    rest = conversation
    if rest and rest[0]["role"] == "system":
        messages.append({"role": "system", "content": rest[0]["content"]})
        rest = rest[1:]
    elif template.system_prompt:
        messages.append({"role": "system", "content": template.system_prompt})
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    for j, message in enumerate(rest):
        if j > 0:
            previous = rest[j - 1]["role"]
            if message["role"] == "tool" and previous not in ("assistant", "tool"):
                break
            if message["role"] == "assistant" and previous not in ("user", "tool"):
                break
        messages.append(sanitize_message(message, keys))
    return messages


def render_fallback(messages: Sequence[Dict[str, Any]], template: ChatTemplate, bos_token: Optional[str]) -> str:
    """SpecForge's rendering without a usable chat template: BOS, then system content, user header +
    content, assistant header + content + end-of-turn; other roles render nothing.

    >>> from .templates import get_template
    >>> render_fallback([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
    ...                  {"role": "assistant", "content": "a"}], get_template("qwen"), "<s>")
    '<s><|im_start|>user\\nq<|im_start|>assistant\\na<|im_end|>\\n'
    """
    parts = [bos_token] if bos_token else []
    user_header = template.user_header or ""
    assistant_header = template.assistant_header or ""
    end_of_turn = template.end_of_turn_token or ""
    for message in messages:
        role = message["role"]
        if role == "system":
            parts.append(f"{message['content']}")
        elif role == "user":
            parts.append(f"{user_header}{message['content']}")
        elif role == "assistant":
            parts.append(f"{assistant_header}{message['content']}{end_of_turn}")
    return "".join(parts)


def chat_template_call(template: ChatTemplate, columns: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the parser's own arguments, the template variables) of SpecForge's apply_chat_template call.

    thinking: add_special_tokens=False, and enable_thinking=True when the template says so (it
    replaces a column of that name); glm: enable_thinking=False unless a column sets it.
    """
    own: Dict[str, Any] = {"tokenize": False, "add_generation_prompt": False}
    variables = dict(columns)
    if template.parser_type == "thinking":
        own["add_special_tokens"] = False
        if template.enable_thinking:
            variables["enable_thinking"] = True
    elif template.parser_type == "glm":
        variables.setdefault("enable_thinking", False)
    return own, variables


def render_messages(
    messages: List[Dict[str, Any]],
    tools: Any,
    columns: Dict[str, Any],
    *,
    template: ChatTemplate,
    tokenizer,
    source: str = "input",
    line=None,
) -> str:
    """The chat template's text for ``messages``, or the fallback where SpecForge falls back.

    SpecForge falls back on ValueError and TypeError only (no chat template, an empty message list,
    tools that are not a list of schemas, a column named like an argument of the call). Any other
    exception of the chat template (Jinja's raise_exception, undefined attributes) stops SpecForge at
    this record: it is an InputError here.
    """
    own, variables = chat_template_call(template, columns)
    bos = getattr(tokenizer, "bos_token", None)
    if any(name in variables for name in WRAPPER_PARAMETERS):
        return render_fallback(messages, template, bos)
    if not getattr(tokenizer, "chat_template", None) and variables.get("chat_template") is None:
        return render_fallback(messages, template, bos)  # transformers raises ValueError: nothing to render with
    if any(name in own for name in variables):  # the same keyword twice: TypeError in SpecForge's call, caught there
        return render_fallback(messages, template, bos)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools if tools else None, **own, **variables)
    except (ValueError, TypeError):
        return render_fallback(messages, template, bos)
    except Exception as exc:  # noqa: BLE001 - whatever the chat template raises, SpecForge stops on it
        detail = " ".join(str(exc).split())
        raise InputError(
            f"{where(source, line)}: the tokenizer's chat template fails on this record ({type(exc).__name__}: "
            f"{detail}). SpecForge stops here too (it falls back to the template rendering only on ValueError "
            "and TypeError). Fix or drop the record, or pass --skip-invalid to skip such records."
        ) from None


def conversation_of(record: Dict[str, Any], *, legacy_reader: bool = False, source: str = "input", line=None):
    """The record's ``conversations`` list; None when SpecForge skips the record (empty). The older
    train_eagle3.py's reader dropped messages that are not objects."""
    raw = record["conversations"]
    if not raw:
        return None
    if not isinstance(raw, list):
        raise InputError(
            f"{where(source, line, 'conversations')}: must be a list of messages, but got "
            f"{type(raw).__name__} {short(raw)}. Write conversations as "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
        )
    if legacy_reader:
        return [message for message in raw if isinstance(message, dict)] or None
    return raw


def render_conversation(
    record: Dict[str, Any],
    *,
    template: ChatTemplate,
    tokenizer,
    fill: Sequence[str] = (),
    legacy_reader: bool = False,
    source: str = "input",
    line=None,
) -> Optional[str]:
    """The text SpecForge's general, thinking or glm parser tokenizes for ``record``; None when SpecForge
    skips it (an empty conversation). With ``legacy_reader`` (the older train_eagle3.py) no column
    reaches the chat template."""
    raw = conversation_of(record, legacy_reader=legacy_reader, source=source, line=line)
    if raw is None:
        return None
    columns = {} if legacy_reader else template_columns(record, template, fill=fill, source=source, line=line)
    conversation = [normalize_message(m, source=source, line=line, index=i) for i, m in enumerate(raw)]
    messages = message_list(conversation, template)
    tools = record_tools(record.get("tools"), legacy_reader=legacy_reader)
    return render_messages(messages, tools, columns, template=template, tokenizer=tokenizer, source=source, line=line)
