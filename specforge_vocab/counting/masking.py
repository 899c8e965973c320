"""Render a record as SpecForge does and find the tokens it puts loss on.

Rendering is per parser type: general, thinking and glm in parsers.py, openai-harmony in harmony.py.
The loss mask is SpecForge's (docs/SPECFORGE.md sections 3 and 3b), made fast:

* general / thinking / glm: the spans of the template's assistant pattern
  (``header([\\s\\S]*?(?:end_of_turn|$))`` and its glm, inkling and longcat variants), then the
  ignore strings; a span covers tokens ``[len(encode(text[:start])), len(encode(text[:end])))``;
* openai-harmony: a token is trained when its character offsets lie inside a span.

SpecForge re-encodes every prefix (quadratic). We encode each text once and
get the same prefix lengths exactly: added (special) tokens are split off before
any other tokenizer step, so ``encode(text[:c])`` equals the tokens before the
last added token that ends at or before ``c`` plus ``encode(text[p:c])``, where
``p`` is where that added token starts. The window ``text[p:c]`` is short (an
added token and the tail of a header) and repeats, so its length is cached.
With no added token before ``c`` the whole prefix is encoded, as SpecForge does.
Harmony's offsets come from the same single encoding.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.counting.harmony import contained_tokens, harmony_char_spans, harmony_text
from specforge_vocab.counting.parsers import conversation_of, render_conversation, template_columns
from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.errors import InputError, short, where

logger = logging.getLogger(__name__)


def render_record(
    data: Any,
    *,
    template: ChatTemplate,
    tokenizer,
    is_preformatted: bool,
    fill: Sequence[str] = (),
    legacy_reader: bool = False,
    source: str = "input",
    line: Optional[int] = None,
) -> Optional[str]:
    """The text SpecForge tokenizes for one record, or None for a record it skips (empty).

    ``fill`` names columns other records of the data have: SpecForge passes them as None here.
    ``legacy_reader``: read as the older train_eagle3.py did (only conversations and tools reach the parser).
    """
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
    if template.is_harmony:
        conversation = conversation_of(data, legacy_reader=legacy_reader, source=source, line=line)
        if conversation is None:
            return None  # SpecForge skips empty conversations.
        if not legacy_reader:
            template_columns(data, template, fill=fill, source=source, line=line)  # refuses extra columns
        return harmony_text(conversation, source=source, line=line)
    return render_conversation(
        data, template=template, tokenizer=tokenizer, fill=fill, legacy_reader=legacy_reader, source=source, line=line
    )


def assistant_char_spans(
    text: str, template: ChatTemplate, *, train_only_last_turn: bool = False
) -> List[Tuple[int, int]]:
    """Character spans of the assistant replies (each including its end-of-turn marker).

    >>> from .templates import get_template
    >>> assistant_char_spans("<｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>", get_template("deepseek-v3"))
    [(22, 42)]
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

    def harmony_mask(self, text: str, encoding) -> np.ndarray:
        """openai-harmony: which of the kept (truncated) tokens lie inside an assistant span, by their offsets."""
        spans = harmony_char_spans(text, train_only_last_turn=self.train_only_last_turn)
        if not spans or not len(encoding.ids):
            return np.zeros(min(len(encoding.ids), self.max_length), dtype=bool)
        offsets = self._truncate(np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2))
        return contained_tokens(offsets, spans)

    def loss_mask(self, text: str, encoding) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, mask) exactly as SpecForge computes them: ids truncated to max_length, mask int8."""
        full = np.asarray(encoding.ids, dtype=np.int64)
        ids = self._truncate(full)
        if self.template.is_harmony:
            return ids, self.harmony_mask(text, encoding).astype(np.int8)
        mask = np.zeros(len(ids), dtype=np.int8)
        for start, end, value in self.token_ranges(text, encoding, len(full), full):
            mask[start:end] = value
        return ids, mask

    def masked_ids(self, text: str, encoding) -> np.ndarray:
        """The ids of the loss-masked tokens of one text (slices of the ids; no per-token work)."""
        full = np.asarray(encoding.ids, dtype=np.int64)
        if self.template.is_harmony:
            return self._truncate(full)[self.harmony_mask(text, encoding)]
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
