"""Render a record as SpecForge does and find the tokens it puts loss on.

This is SpecForge's GeneralParser rule (docs/SPECFORGE.md section 3), made fast:

* messages are normalised, given the system prompt, cut at the first role that
  breaks the order, and rendered through the tokenizer's chat template or the
  template fallback;
* assistant replies are the regex spans ``header([\\s\\S]*?(?:end_of_turn|$))``;
* a span covers tokens ``[len(encode(text[:start])), len(encode(text[:end])))``.

SpecForge re-encodes every prefix (quadratic). We encode each text once and
get the same prefix lengths exactly: added (special) tokens are split off before
any other tokenizer step, so ``encode(text[:c])`` equals the tokens before the
last added token that ends at or before ``c`` plus ``encode(text[p:c])``, where
``p`` is where that added token starts. The window ``text[p:c]`` is short (an
added token and the tail of a header) and repeats, so its length is cached.
With no added token before ``c`` the whole prefix is encoded, as SpecForge does.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.errors import InputError, short, where

logger = logging.getLogger(__name__)


ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


KNOWN_ROLES = ("system", "user", "assistant", "tool")


def normalize_messages(raw: Any, *, source: str = "input", line: Optional[int] = None) -> List[Dict[str, Any]]:
    """Validate a record's ``conversations`` and normalise each message to role/content.

    >>> normalize_messages([{"from": "human", "value": "hi"}, {"role": "gpt", "content": None}])
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': ''}]
    """
    if not isinstance(raw, list):
        raise InputError(
            f"{where(source, line, 'conversations')}: must be a list of messages, but got "
            f"{type(raw).__name__} {short(raw)}. Write conversations as "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
        )
    messages = []
    for i, message in enumerate(raw):
        field = f"conversations[{i}]"
        if not isinstance(message, dict):
            raise InputError(
                f"{where(source, line, field)}: each message must be an object with role/content "
                f"(or ShareGPT from/value), but got {type(message).__name__} {short(message)}."
            )
        role_key = "role" if "role" in message else "from"
        role = message.get(role_key)
        if not isinstance(role, str) or ROLE_ALIASES.get(role, role) not in KNOWN_ROLES:
            raise InputError(
                f"{where(source, line, field + '.' + role_key)}: unknown role {short(role)}; expected one of "
                f"{', '.join(KNOWN_ROLES)} (or ShareGPT's human, gpt). Rename the role or drop the message."
            )
        for key in ("content", "value"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f"{where(source, line, field + '.' + key)}: content must be a string or null, but got "
                    f"{type(value).__name__} {short(value)}. Flatten multimodal or structured content to text."
                )
        # SpecForge: content, else value, else "" (an empty content falls through to value).
        normalized = {
            "role": ROLE_ALIASES.get(role, role),
            "content": message.get("content") or message.get("value") or "",
        }
        if isinstance(message.get("tool_calls"), (list, str)):
            normalized["tool_calls"] = _tool_calls(message["tool_calls"])
        messages.append(normalized)
    return messages


def _tool_calls(value):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    calls = []
    for call in value if isinstance(value, list) else []:
        if not isinstance(call, dict):
            continue
        function = call.get("function", {})
        clean = {"id": call.get("id", ""), "type": call.get("type", "function")}
        if isinstance(function, dict):
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = {}
            clean["function"] = {"name": function.get("name", ""), "arguments": arguments}
        calls.append(clean)
    return calls


def build_messages(conversation: List[Dict[str, Any]], template: ChatTemplate) -> List[Dict[str, Any]]:
    """Steps 2-4 of the rule: system prompt, drop leading non-user turns, cut at a broken order.

    >>> from .templates import get_template
    >>> msgs = build_messages([{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"},
    ...                        {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
    ...                       get_template("lfm"))
    >>> [m["role"] for m in msgs]
    ['user', 'assistant']
    """
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
        messages.append(message)
    return messages


def render_fallback(messages: Sequence[Dict[str, Any]], template: ChatTemplate, bos_token: Optional[str]) -> str:
    """The template rendering SpecForge uses when the tokenizer has no chat template."""
    parts = [bos_token] if bos_token else []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(template.user_header + content)
        elif role == "assistant":
            parts.append(template.assistant_header + content + template.end_of_turn_token)
    return "".join(parts)


def render_record(
    data: Any,
    *,
    template: ChatTemplate,
    tokenizer,
    is_preformatted: bool,
    source: str = "input",
    line: Optional[int] = None,
) -> Optional[str]:
    """The text SpecForge tokenizes for one record, or None for a record it skips (empty)."""
    if not isinstance(data, dict):
        raise InputError(
            f"{where(source, line)}: each record must be a JSON object, but got {type(data).__name__} {short(data)}."
        )
    if is_preformatted:
        if "text" not in data:
            raise InputError(
                f"{where(source, line)}: with --is-preformatted every record needs a 'text' field, but this one has "
                f"{sorted(data)}. Drop --is-preformatted for conversation records."
            )
        text = data["text"]
        if text is not None and not isinstance(text, str):
            raise InputError(
                f"{where(source, line, 'text')}: must be a string, but got {type(text).__name__} {short(text)}."
            )
        return text or None
    if "conversations" not in data:
        hint = " Pass --is-preformatted for records with a 'text' field." if "text" in data else ""
        raise InputError(
            f"{where(source, line)}: every record needs a 'conversations' field, but this one has {sorted(data)}.{hint}"
        )
    raw = data["conversations"]
    if not raw:
        return None  # SpecForge skips empty conversations.
    conversation = normalize_messages(raw, source=source, line=line)
    messages = build_messages(conversation, template)
    if getattr(tokenizer, "chat_template", None):
        tools = _record_tools(data.get("tools"))
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, tools=tools)
        except (ValueError, TypeError):
            pass  # SpecForge falls back to the template rendering on these errors too.
    return render_fallback(messages, template, getattr(tokenizer, "bos_token", None))


def _record_tools(value):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    return value if isinstance(value, list) else []


def assistant_char_spans(
    text: str, template: ChatTemplate, *, train_only_last_turn: bool = False
) -> List[Tuple[int, int]]:
    """Character spans of the assistant replies (each including its end-of-turn marker).

    >>> from .templates import get_template
    >>> assistant_char_spans("<｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>", get_template("deepseek-v3"))
    [(19, 40)]
    """
    spans = [(m.start(1), m.end(1)) for m in template.assistant_pattern.finditer(text)]
    if train_only_last_turn and spans:
        spans = spans[-1:]
    return spans


def ignore_char_spans(text: str, template: ChatTemplate) -> List[Tuple[int, int]]:
    """Non-overlapping occurrences of the template's ignore strings, left to right."""
    spans = []
    for token in template.ignore_tokens:
        start = 0
        while True:
            found = text.find(token, start)
            if found < 0:
                break
            spans.append((found, found + len(token)))
            start = found + len(token)
    return spans


class MaskEngine:
    """Tokenize texts in batches and build SpecForge's loss mask with cached prefix lengths.

    ``masked_ids(text, encoding)`` returns the ids of the loss-masked tokens of one text.
    """

    def __init__(self, tokenizer, *, max_length: int, template: ChatTemplate, train_only_last_turn: bool = False):
        self.template = template
        self.max_length = int(max_length)
        self.train_only_last_turn = train_only_last_turn
        self.left_truncation = getattr(tokenizer, "truncation_side", "right") == "left"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InputError(
                "The tokenizer must be a fast (Rust) tokenizer with a tokenizer.json, but got "
                f"{type(tokenizer).__name__}. Convert it with transformers and save tokenizer.json."
            )
        # transformers sets truncation/padding on each call; we encode untruncated and cut ourselves.
        self.backend = backend
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        size = max(len(tokenizer), self.backend.get_vocab_size(with_added_tokens=True)) + 1
        added = [i for i in getattr(tokenizer, "added_tokens_decoder", {}) if 0 <= i < size]
        self.is_added = np.zeros(size, dtype=bool)
        self.is_added[added] = True
        self._lengths: Dict[str, int] = {}

    # -- tokenization
    def encode_batch(self, texts: Sequence[str]):
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def token_length(self, text: str) -> int:
        """len(encode(text)) without truncation; short texts are cached."""
        if len(text) > 256:
            return len(self.backend.encode(text, add_special_tokens=False).ids)
        length = self._lengths.get(text)
        if length is None:
            if len(self._lengths) > 200_000:
                self._lengths.clear()
            length = self._lengths[text] = len(self.backend.encode(text, add_special_tokens=False).ids)
        return length

    # -- masks
    def _prefix_length(self, text: str, encoding, added_pos: np.ndarray, c: int) -> int:
        """len(encode(text[:c])) from the one full encoding (see the module docstring)."""
        if c <= 0:
            return 0
        t = encoding.char_to_token(c - 1)  # a token holding the last character before c
        if t is None:  # that character is in no token (dropped by a normalizer): scan the added tokens
            k = len(added_pos) - 1
            while k >= 0 and encoding.token_to_chars(int(added_pos[k]))[1] > c:
                k -= 1
        else:
            k = int(np.searchsorted(added_pos, t, side="right")) - 1  # last added token at or before t
            if k >= 0 and added_pos[k] == t and encoding.token_to_chars(t)[1] > c:
                k -= 1  # c cuts this added token: its text is plain text in the prefix
        if k < 0:
            return self.token_length(text[:c])
        j = int(added_pos[k])
        start, end = encoding.token_to_chars(j)
        return j + 1 if end == c else j + self.token_length(text[start:c])

    def token_ranges(self, text: str, encoding, n_full: int, ids_full: np.ndarray) -> List[Tuple[int, int, int]]:
        """(start, end, value) token ranges in SpecForge's order: assistant spans (1), then ignores (0)."""
        spans = assistant_char_spans(text, self.template, train_only_last_turn=self.train_only_last_turn)
        n = min(n_full, self.max_length)
        if not spans or n == 0:
            return []
        ignores = ignore_char_spans(text, self.template) if self.template.ignore_tokens else []
        added_pos = np.flatnonzero(self.is_added[ids_full])
        ranges = []
        for value, char_spans in ((1, spans), (0, ignores)):
            for s, e in char_spans:
                start = min(self._prefix_length(text, encoding, added_pos, s), n)
                end = min(self._prefix_length(text, encoding, added_pos, e), n)
                if start < end:
                    ranges.append((start, end, value))
        return ranges

    def _truncate(self, full: np.ndarray) -> np.ndarray:
        n = min(len(full), self.max_length)
        return full[len(full) - n :] if self.left_truncation else full[:n]

    def loss_mask(self, text: str, encoding) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, mask) exactly as SpecForge computes them: ids truncated to max_length, mask int8."""
        full = np.asarray(encoding.ids, dtype=np.int64)
        ids = self._truncate(full)
        mask = np.zeros(len(ids), dtype=np.int8)
        for start, end, value in self.token_ranges(text, encoding, len(full), full):
            mask[start:end] = value
        return ids, mask

    def masked_ids(self, text: str, encoding) -> np.ndarray:
        """The ids of the loss-masked tokens of one text (slices of the ids; no per-token work)."""
        full = np.asarray(encoding.ids, dtype=np.int64)
        ranges = self.token_ranges(text, encoding, len(full), full)
        if not ranges:
            return full[:0]
        ids = self._truncate(full)
        if any(value == 0 for _, _, value in ranges):
            mask = np.zeros(len(ids), dtype=bool)
            for start, end, value in ranges:
                mask[start:end] = bool(value)
            return ids[mask]
        if len(ranges) == 1:
            return ids[ranges[0][0] : ranges[0][1]]
        return np.concatenate([ids[start:end] for start, end, _ in ranges])
