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
from typing import Dict, Optional, Tuple

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
