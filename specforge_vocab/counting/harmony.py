"""SpecForge's openai-harmony parser (gpt-oss): its own rendering and its offsets rule
(docs/SPECFORGE.md section 3b).

No chat template and no message normalisation: each message's ``role`` picks a fixed block and its
``content`` is formatted into it as it is. The trained tokens are those whose character range lies
inside a span ``<|start|>assistant(...)`` that runs up to the next user message (or the end), found on
the one encoding's offsets.

>>> harmony_text([{"role": "user", "content": "q"}, {"role": "assistant_final", "content": "a"}]).split("<|end|>")[1:]
['<|start|>user<|message|>q', '<|start|>assistant<|channel|>final<|message|>a', '']
>>> text = "<|start|>user<|message|>q<|end|><|start|>assistant<|channel|>final<|message|>a<|end|>"
>>> [text[s:e] for s, e in harmony_char_spans(text)]
['<|channel|>final<|message|>a<|end|>']
"""

from __future__ import annotations

import re
from typing import Any, List, Tuple

import numpy as np

from specforge_vocab.errors import InputError, short, where

DEFAULT_REASONING_EFFORT = "low"


REASONING_SYSTEM_BLOCK = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: {effort}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


#: Roles that replace everything rendered so far with a system block.
REPLACING_ROLES = ("system", "assistant_reasoning_effort")


CHANNELS = ("analysis", "commentary", "final")


ROLES = REPLACING_ROLES + ("user",) + tuple("assistant_" + c for c in CHANNELS)


HARMONY_SPAN = re.compile(r"<\|start\|>assistant([\s\S]*?)(?=<\|start\|>user<\|message\|>|$)")


def _add_block(text: str, role: str, content: Any) -> str:
    if role == "system":
        return f"<|start|>system<|message|>{content}<|end|>"
    if role == "assistant_reasoning_effort":
        return REASONING_SYSTEM_BLOCK.format(effort=content.lower())
    if role == "user":
        return text + f"<|start|>user<|message|>{content}<|end|>"
    channel = role[len("assistant_") :]
    return text + f"<|start|>assistant<|channel|>{channel}<|message|>{content}<|end|>"


def harmony_text(conversation: List[Any], *, source: str = "input", line=None) -> str:
    """The text SpecForge's HarmonyParser builds for ``conversation`` (a non-empty list of messages).

    Messages SpecForge cannot render (not an object, no role or content key, a role outside
    :data:`ROLES`, a reasoning effort that is not a string) stop SpecForge: InputError here.
    """
    if not isinstance(conversation, list):
        raise InputError(
            f"{where(source, line, 'conversations')}: must be a list of messages, but got "
            f"{type(conversation).__name__} {short(conversation)}."
        )
    text = ""
    for j, message in enumerate(conversation):
        field = f"conversations[{j}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(
                f"{where(source, line, field)}: SpecForge's openai-harmony parser reads each message's 'role' "
                f"and 'content' keys as they are (no ShareGPT from/value), but got {short(message)}. Write "
                '{"role": ..., "content": ...} messages.'
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InputError(
                f"{where(source, line, field + '.role')}: SpecForge's openai-harmony parser knows the roles "
                f"{', '.join(ROLES)}, but got {short(role)} (it stops with 'Unknown role'). Map plain assistant "
                "turns to assistant_final (and reasoning to assistant_analysis)."
            )
        if role == "assistant_reasoning_effort" and not isinstance(content, str):
            raise InputError(
                f"{where(source, line, field + '.content')}: a reasoning effort must be a string (low, medium, "
                f"high), but got {type(content).__name__} {short(content)}."
            )
        if j == 0 and role not in REPLACING_ROLES:
            text = _add_block(text, "assistant_reasoning_effort", DEFAULT_REASONING_EFFORT)
        text = _add_block(text, role, content)
    return text


def harmony_char_spans(text: str, *, train_only_last_turn: bool = False) -> List[Tuple[int, int]]:
    """Character spans of the assistant groups: after each first ``<|start|>assistant`` of a user turn
    up to the next user message or the end of the text."""
    spans = [(m.start(1), m.end(1)) for m in HARMONY_SPAN.finditer(text)]
    if train_only_last_turn and spans:
        spans = spans[-1:]
    return spans


def contained_tokens(offsets: np.ndarray, spans: List[Tuple[int, int]]) -> np.ndarray:
    """Boolean mask of the tokens whose (start, end) character range lies inside one of ``spans``.

    >>> contained_tokens(np.array([[0, 2], [2, 5], [5, 6]]), [(2, 6)]).tolist()
    [False, True, True]
    """
    mask = np.zeros(len(offsets), dtype=bool)
    if not len(offsets):
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask |= (starts >= s) & (ends <= e)
    return mask
