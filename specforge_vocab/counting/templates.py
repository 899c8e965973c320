"""SpecForge's chat templates (parser type "general") and their assistant-span regex.

The strings come from SpecForge's template registry (resources/templates.json).

>>> t = get_template("llama3")
>>> t.end_of_turn_token
'<|eot_id|>'
>>> bool(t.assistant_pattern.match("<|start_header_id|>assistant<|end_header_id|>\\n\\nHi<|eot_id|>"))
True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

from specforge_vocab.errors import InputError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    assistant_header: str
    user_header: str
    end_of_turn_token: str
    system_prompt: str
    assistant_pattern_type: str = "general"
    ignore_tokens: Tuple[str, ...] = ()

    @property
    def assistant_pattern(self) -> "re.Pattern[str]":
        return _compile_pattern(self.assistant_header, self.end_of_turn_token, self.assistant_pattern_type)


@lru_cache(maxsize=None)
def _compile_pattern(header: str, end_of_turn: str, kind: str) -> "re.Pattern[str]":
    # Group 1 is the reply including its end-of-turn marker, or up to the end of the text.
    if kind == "longcat":
        stop = re.escape("[Round ") + r"\d+" + re.escape("] USER:")
    else:
        stop = re.escape(end_of_turn)
    return re.compile(re.escape(header) + r"([\s\S]*?(?:" + stop + r"|$))", re.DOTALL)


@lru_cache(maxsize=1)
def _registry() -> Dict[str, ChatTemplate]:
    text = resources.files("specforge_vocab").joinpath("resources/templates.json").read_text(encoding="utf-8")
    table = {}
    for name, raw in json.loads(text).items():
        table[name] = ChatTemplate(
            name=name,
            assistant_header=raw.get("assistant_header") or "",
            user_header=raw.get("user_header") or "",
            # SpecForge renders a None end-of-turn as "" (its fallback uses `or ""`).
            end_of_turn_token=raw.get("end_of_turn_token") or "",
            system_prompt=raw.get("system_prompt") or "",
            assistant_pattern_type=raw.get("assistant_pattern_type") or "general",
            ignore_tokens=tuple(raw.get("ignore_token") or ()),
        )
    return table


#: Names the paper's tool accepts that SpecForge spells differently.
TEMPLATE_ALIASES = {"deepseek": "deepseek-v3"}


def template_names() -> Tuple[str, ...]:
    return tuple(_registry())


def canonical_template_name(name: str) -> str:
    """SpecForge's name for ``name`` (the paper's "deepseek" is SpecForge's "deepseek-v3")."""
    return TEMPLATE_ALIASES.get(name, name)


def get_template(name: str, *, flag: str = "--chat-template") -> ChatTemplate:
    """The template called ``name``; an unknown name is an error listing the valid ones."""
    table = _registry()
    name = canonical_template_name(name)
    if name not in table:
        raise InputError(
            f"{flag} must be one of SpecForge's general templates ({', '.join(table)}), "
            f"but got {name!r}. Pick the template SpecForge trains your target with."
        )
    return table[name]


def template_or_none(name: Optional[str]) -> Optional[ChatTemplate]:
    return None if name is None else get_template(name)


# The special-token-like pieces of a template's markers: <|eot_id|>, <｜User｜>, <role>, </longcat_s>.
_MARKER = re.compile(r"<[^<>\s]+>")


def is_single_token(tokenizer: Any, text: str) -> bool:
    """``text`` is one token of ``tokenizer``: one of its added/special tokens, or a string it encodes
    to exactly one id (without special tokens)."""
    if not text:
        return False
    if text in tokenizer.get_added_vocab():
        return True
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def single_token_id(tokenizer: Any, text: str) -> Optional[int]:
    """The id of ``text`` when it is a single token of ``tokenizer`` (see :func:`is_single_token`), else None."""
    if not is_single_token(tokenizer, text):
        return None
    added = tokenizer.get_added_vocab()
    return int(added[text]) if text in added else int(tokenizer.encode(text, add_special_tokens=False)[0])


def template_markers(template: ChatTemplate) -> List[str]:
    """The special-token-like pieces of the template's end-of-turn string and headers, once each.

    >>> template_markers(get_template("llama3"))
    ['<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>']
    """
    out: List[str] = []
    for text in (template.end_of_turn_token, template.assistant_header, template.user_header):
        out += [m for m in _MARKER.findall(text or "") if m not in out]
    return out


def unfit_markers(template: ChatTemplate, tokenizer: Any) -> List[str]:
    """The template's markers that are not single tokens of ``tokenizer``: a template made for another
    model family (SpecForge would then find no assistant span to train on)."""
    return [m for m in template_markers(template) if not is_single_token(tokenizer, m)]


def likely_templates(tokenizer: Any) -> List[str]:
    """Templates of the registry whose every marker is a single token of ``tokenizer``, most specific first
    (more markers, then an end-of-turn token equal to the tokenizer's EOS)."""
    eos = getattr(tokenizer, "eos_token", None)
    scored = []
    for position, (name, template) in enumerate(_registry().items()):
        markers = template_markers(template)
        if markers and not unfit_markers(template, tokenizer):
            scored.append((-len(markers), template.end_of_turn_token.strip() != eos, position, name))
    return [name for *_, name in sorted(scored)]
