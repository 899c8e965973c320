"""Pinned tokens: ids the draft vocabulary always keeps (they count toward k).

A draft that cannot propose the end-of-turn token can never draft the end of a reply, so by
default the chat template's end-of-turn token and the tokenizer's EOS are pinned, plus any
``--pin-token`` (one token's string, or an integer id). Strings need the tokenizer: when only
a counts file without a tokenizer path is at hand, only explicit ids are pinned (and the
summary says so). Only a single token of the tokenizer is pinned: the end-of-turn string
without its surrounding whitespace (Qwen's ``<|im_end|>\\n`` pins ``<|im_end|>``); when it, or a
header's special token, is not one token of this tokenizer, the template was made for another
model, and a warning names a template that fits. The structural tokens the template trains on
(``<think>``, ``</think>``, tool-call markers, harmony's ``<|channel|>`` ...; counting/templates.py
TRAINED_MARKERS) are pinned too, each only when it is one token of the tokenizer.

Pinning changes nothing when the pinned ids are already among the most frequent: the usual
case for an end-of-turn token, which closes every assistant turn.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from specforge_vocab.counting.templates import (
    ChatTemplate,
    as_template,
    check_template_fits,
    single_token_id,
    trained_markers,
)
from specforge_vocab.errors import InputError, ValidatedSettings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PinnedToken:
    id: int
    token: Optional[str]  # the tokenizer's string for the id (None without a tokenizer)
    source: str  # "end-of-turn (llama3)", "eos_token", "--pin-token"

    def as_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "token": self.token, "source": self.source}


@dataclasses.dataclass
class PinSettings(ValidatedSettings):
    """Which tokens are always kept; one field per flag."""

    pin_tokens: List[str] = dataclasses.field(default_factory=list)
    pin_special_tokens: bool = True

    def problems(self) -> List[str]:
        out = []
        for value in self.pin_tokens:
            if not isinstance(value, str) or value == "":
                out.append(f"--pin-token must be a token string or an integer id, but got {value!r}.")
        return out


def _ids_of_string(tokenizer, text: str) -> List[int]:
    vocab_id = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if (
        isinstance(vocab_id, int)
        and vocab_id >= 0
        and (vocab_id != unk or text == getattr(tokenizer, "unk_token", None))
    ):
        return [vocab_id]
    return list(tokenizer.encode(text, add_special_tokens=False))


def resolve_pinned_tokens(
    settings: PinSettings,
    *,
    vocab_size: int,
    tokenizer=None,
    chat_template=None,
) -> (List[PinnedToken], List[str]):
    """The pinned tokens (sorted by id, each once) and notes on what could not be pinned."""
    notes: List[str] = []
    found: Dict[int, PinnedToken] = {}

    def token_string(i: int) -> Optional[str]:
        if tokenizer is None:
            return None
        try:
            return tokenizer.convert_ids_to_tokens(int(i))
        except Exception:  # noqa: BLE001 - any tokenizer failure just leaves the string out
            return None

    def add(i: int, source: str) -> None:
        if not 0 <= i < vocab_size:
            raise InputError(
                f"--pin-token must name ids in [0, {vocab_size}) (the target vocab_size), but {source} gives {i}. "
                "Pin a token of the target's own tokenizer."
            )
        if i not in found:
            found[i] = PinnedToken(int(i), token_string(i), source)

    if settings.pin_special_tokens:
        if tokenizer is None:
            notes.append(
                "the template's end-of-turn token and the EOS were not pinned: no tokenizer is known "
                "(none was given, or the counts file names none); pass --tokenizer-path or pin ids with --pin-token"
            )
        else:
            if chat_template:
                template = as_template(chat_template)
                eot = single_token_id(tokenizer, (template.end_of_turn_token or "").strip())
                if eot is not None:
                    add(eot, f"end-of-turn ({template.name})")
                for marker, marker_id in template_marker_ids(template, tokenizer):
                    add(marker_id, f"trained marker {marker!r} ({template.name})")
            eos = getattr(tokenizer, "eos_token_id", None)
            if isinstance(eos, int):
                add(eos, "eos_token")
    for value in settings.pin_tokens:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            add(int(text), f"--pin-token {text}")
        elif tokenizer is None:
            notes.append(
                f"--pin-token {value!r} was not pinned: a token string needs the tokenizer, and none is "
                "known; pass its id instead"
            )
        else:
            ids = _ids_of_string(tokenizer, value)
            if len(ids) != 1:
                pieces = ", ".join(f"{i} ({token_string(i)!r})" for i in ids) or "nothing"
                raise InputError(
                    f"--pin-token must name one token of the tokenizer, but {value!r} encodes to {len(ids)} ids: "
                    f"{pieces}. Pin the pieces you need one by one, by string or id."
                )
            add(int(ids[0]), f"--pin-token {value!r}")
    for note in notes:
        logger.warning("pinned tokens: %s.", note)
    if tokenizer is not None and chat_template:
        check_template_fits(chat_template, tokenizer)
    return [found[i] for i in sorted(found)], notes


def template_marker_ids(template: ChatTemplate, tokenizer) -> List[Tuple[str, int]]:
    """(string, id) of each structural string ``template``'s training puts loss on (<think>, tool-call
    markers, harmony's channel markers) that is one token of ``tokenizer``; the others are left out."""
    found = []
    for marker in trained_markers(template):
        marker_id = single_token_id(tokenizer, marker)
        if marker_id is not None:
            found.append((marker, marker_id))
    return found


def pinned_ids(tokens: Sequence[PinnedToken]) -> List[int]:
    return [t.id for t in tokens]
