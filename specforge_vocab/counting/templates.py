"""SpecForge's chat templates: the 26 it registers (resources/templates.json) or one read from a file.

A template carries SpecForge's eight ``ChatTemplate`` fields (docs/SPECFORGE.md section 3b), with
SpecForge's None semantics, and the assistant-span regex of its ``assistant_pattern_type``.

>>> t = get_template("llama3")
>>> t.end_of_turn_token, t.parser_type
('<|eot_id|>', 'general')
>>> bool(t.assistant_pattern.match("<|start_header_id|>assistant<|end_header_id|>\\n\\nHi<|eot_id|>"))
True
>>> get_template("glm-5.2").assistant_pattern.match("<|assistant|><think></think>Hi<|user|>").group(1)
'Hi<|user|>'
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from specforge_vocab.errors import InputError, short

logger = logging.getLogger(__name__)


#: SpecForge's parser types (preprocessing.py picks the parser class by this name).
PARSER_TYPES = ("general", "thinking", "glm", "openai-harmony")


#: Assistant-span pattern types SpecForge knows (any other value silently gets "general" there).
PATTERN_TYPES = ("general", "glm", "inkling", "longcat")


#: The inkling pattern's terminators: a span ends at the next of these (or the end of the text).
INKLING_TERMINATORS = ("<|message_user|>", "<|message_tool|>", "<|message_system|>")


#: The string fields of SpecForge's ChatTemplate, then the others, in its order.
STRING_FIELDS = ("assistant_header", "user_header", "system_prompt", "end_of_turn_token")
FIELDS = STRING_FIELDS + ("parser_type", "assistant_pattern_type", "enable_thinking", "ignore_token")


@dataclass(frozen=True)
class ChatTemplate:
    """One SpecForge ChatTemplate (same fields, defaults and None semantics) and where it came from."""

    name: str
    assistant_header: Optional[str] = None
    user_header: Optional[str] = None
    system_prompt: Optional[str] = None
    end_of_turn_token: Optional[str] = None
    parser_type: str = "general"
    assistant_pattern_type: str = "general"
    enable_thinking: bool = False
    ignore_token: Optional[Tuple[str, ...]] = None
    origin: str = ""  # the flag it came from: "--chat-template NAME" or "--chat-template-file PATH"

    @property
    def ignore_tokens(self) -> Tuple[str, ...]:
        return tuple(self.ignore_token or ())

    @property
    def is_harmony(self) -> bool:
        return self.parser_type == "openai-harmony"

    @property
    def assistant_pattern(self) -> "re.Pattern[str]":
        """The span regex of parser types general/thinking/glm (group 1 = the trained text)."""
        return _compile_pattern(self.assistant_header or "", self.end_of_turn_token or "", self.assistant_pattern_type)

    def fields(self) -> Dict[str, Any]:
        """SpecForge's eight fields as JSON values (what the counts file and the cache record)."""
        out: Dict[str, Any] = {name: getattr(self, name) for name in FIELDS}
        out["ignore_token"] = None if self.ignore_token is None else list(self.ignore_token)
        return out

    def problems(self) -> List[str]:
        """Why SpecForge cannot train with this template (empty when it can)."""
        where = self.origin or f"--chat-template {self.name}"
        out = []
        if self.parser_type not in PARSER_TYPES:
            out.append(
                f"{where}: parser_type must be one of {', '.join(PARSER_TYPES)}, but got {self.parser_type!r}; "
                "SpecForge stops with 'Invalid parser type'."
            )
        if self.is_harmony:
            return out
        if self.assistant_pattern_type not in PATTERN_TYPES:
            out.append(
                f"{where}: assistant_pattern_type must be one of {', '.join(PATTERN_TYPES)}, but got "
                f"{self.assistant_pattern_type!r}. SpecForge silently uses the general pattern for any other "
                "value; write 'general' if that is what you mean."
            )
        if not self.assistant_header:
            out.append(
                f"{where}: assistant_header must be a non-empty string for parser_type {self.parser_type!r}, but "
                f"got {self.assistant_header!r}. SpecForge finds the trained replies after this header (a null "
                "header becomes the literal text 'None'), so nothing would be trained."
            )
        if self.end_of_turn_token is None and self.assistant_pattern_type in ("general", "glm"):
            out.append(
                f"{where}: end_of_turn_token must be a string for assistant_pattern_type "
                f"{self.assistant_pattern_type!r}, but got None. SpecForge fails for every record when it builds "
                "the span regex (re.escape(None) raises TypeError); set the token that ends an assistant turn."
            )
        return out


QWEN3_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
KIMI_K2_TOOL_MARKERS = (
    "<|tool_calls_section_begin|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|tool_calls_section_end|>",
)
GLM_MARKERS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<|observation|>",
    "<tool_response>",
    "</tool_response>",
    "<|assistant|>",
)
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")


#: Structural strings each template's training puts loss on besides its end-of-turn token (reasoning
#: and tool-call markers; docs/SPECFORGE.md section 3b, README's template table). qwen3-next-thinking
#: and qwen3.5 never train "<think>": it ends their assistant header.
TRAINED_MARKERS: Dict[str, Tuple[str, ...]] = {
    "qwen": QWEN3_MARKERS,
    "qwen3-instruct": QWEN3_MARKERS,
    "qwen3-thinking": QWEN3_MARKERS,
    "qwen3-next-thinking": QWEN3_MARKERS[1:],
    "qwen3.5": QWEN3_MARKERS[1:],
    "kimi-k2-thinking": ("<think>", "</think>") + KIMI_K2_TOOL_MARKERS,
    "kimi-k2-instruct": KIMI_K2_TOOL_MARKERS,
    "kimi-k3-thinking": ("<|open|>", "<|sep|>", "<|close|>"),
    "deepseek-v32": ("<think>", "</think>"),
    "glm-5.2": GLM_MARKERS,
    "inkling-thinking": (
        "<|message_model|>",
        "<|content_thinking|>",
        "<|content_text|>",
        "<|content_invoke_tool_json|>",
        "<|end_message|>",
    ),
    "gpt-oss": HARMONY_MARKERS,
}


#: For other templates (a file's, or a registered name with other fields): the markers of their parser type.
PARSER_MARKERS = {"thinking": ("<think>", "</think>"), "glm": GLM_MARKERS, "openai-harmony": HARMONY_MARKERS}


def trained_markers(template: ChatTemplate) -> Tuple[str, ...]:
    """The structural strings ``template``'s training puts loss on (besides its end-of-turn token).

    >>> trained_markers(get_template("qwen3.5"))
    ('</think>', '<tool_call>', '</tool_call>')
    """
    registered = _registry().get(template.name)
    if registered is not None and registered.fields() == template.fields() and template.name in TRAINED_MARKERS:
        return TRAINED_MARKERS[template.name]
    return PARSER_MARKERS.get(template.parser_type, ())


@lru_cache(maxsize=None)
def _compile_pattern(header: str, end_of_turn: str, kind: str) -> "re.Pattern[str]":
    """SpecForge's set_assistant_pattern: group 1 runs from after the header to the first stop (included)
    or to the end of the text."""
    head = re.escape(header)
    if kind == "longcat":
        stop = re.escape("[Round ") + r"\d+" + re.escape("] USER:")
    elif kind == "inkling":
        stop = "|".join(re.escape(token) for token in INKLING_TERMINATORS)
    else:
        stop = re.escape(end_of_turn)
    if kind == "glm":  # a </think> right after the header is skipped, not trained
        head += r"(?:</think>)?"
    return re.compile(head + r"([\s\S]*?(?:" + stop + r"|$))", re.DOTALL)


def template_from_fields(name: str, raw: Dict[str, Any], *, origin: str) -> ChatTemplate:
    """A ChatTemplate from SpecForge's fields (already checked: see :func:`field_problems`)."""
    ignore = raw.get("ignore_token")
    return ChatTemplate(
        name=name,
        **{key: raw.get(key) for key in STRING_FIELDS},
        parser_type=raw.get("parser_type", "general"),
        assistant_pattern_type=raw.get("assistant_pattern_type", "general"),
        enable_thinking=bool(raw.get("enable_thinking", False)),
        ignore_token=None if ignore is None else tuple(ignore),
        origin=origin,
    )


@lru_cache(maxsize=1)
def _registry() -> Dict[str, ChatTemplate]:
    text = resources.files("specforge_vocab").joinpath("resources/templates.json").read_text(encoding="utf-8")
    return {
        name: template_from_fields(name, raw, origin=f"--chat-template {name}")
        for name, raw in json.loads(text)["templates"].items()
    }


#: Names the paper's tool accepts that SpecForge spells differently.
TEMPLATE_ALIASES = {"deepseek": "deepseek-v3"}


def template_names() -> Tuple[str, ...]:
    return tuple(_registry())


def canonical_template_name(name: str) -> str:
    """SpecForge's name for ``name`` (the paper's "deepseek" is SpecForge's "deepseek-v3")."""
    return TEMPLATE_ALIASES.get(name, name)


def get_template(name: str, *, flag: str = "--chat-template") -> ChatTemplate:
    """The registered template called ``name``; an unknown name is an error listing the valid ones."""
    table = _registry()
    canonical = canonical_template_name(name)
    if canonical not in table:
        raise InputError(
            f"{flag} must be one of {', '.join(table)} (the templates SpecForge registers), but got {name!r}. "
            "Pick the template SpecForge trains your target with; for one you registered yourself, pass its "
            "fields with --chat-template-file."
        )
    return table[canonical]


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
    """The special-token-like pieces of the template's end-of-turn string and headers, once each; a
    template without those strings (harmony renders its own) has its trained markers.

    >>> template_markers(get_template("llama3"))
    ['<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>']
    >>> template_markers(get_template("gpt-oss"))
    ['<|start|>', '<|channel|>', '<|message|>', '<|end|>']
    """
    out: List[str] = []
    for text in (template.end_of_turn_token, template.assistant_header, template.user_header):
        out += [m for m in _MARKER.findall(text or "") if m not in out]
    return out or list(trained_markers(template))


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
            scored.append((-len(markers), (template.end_of_turn_token or "").strip() != eos, position, name))
    return [name for *_, name in sorted(scored)]


def as_template(chat_template: Union[str, ChatTemplate]) -> ChatTemplate:
    """A registered template by name, or the template itself (one read from --chat-template-file)."""
    return get_template(chat_template) if isinstance(chat_template, str) else chat_template


def check_template_fits(chat_template: Union[str, ChatTemplate], tokenizer) -> Optional[str]:
    """Warn (and return the warning) when the template's end-of-turn string or headers are not single
    tokens of the tokenizer: the template was made for another model (e.g. llama3 on a DeepSeek tokenizer)."""
    template = as_template(chat_template)
    unfit = unfit_markers(template, tokenizer)
    if not unfit:
        return None
    chat_template = template.name
    likely = [name for name in likely_templates(tokenizer) if name != chat_template]
    if not likely:
        hint = "no template of SpecForge's registry fits it; check --tokenizer-path"
    else:  # several can fit one tokenizer (Qwen3's fits qwen and the qwen3-* templates): pick the model's own
        hint = f"a template that fits it: --chat-template {likely[0]}"
        if len(likely) > 1:
            hint += f"; others that fit: {', '.join(likely[1:6])}" + (", ..." if len(likely) > 6 else "")
    message = (
        f"--chat-template {chat_template} does not fit this tokenizer: {', '.join(map(repr, unfit))} "
        f"{'is' if len(unfit) == 1 else 'are'} not a single token of it, so SpecForge's mask would not find the "
        f"assistant replies as this template describes them ({hint})"
    )
    logger.warning("%s.", message)
    return message


def resolve_template(name: str, template_file: Optional[str] = None, *, flag: str = "--chat-template") -> ChatTemplate:
    """The template a count uses: read from ``template_file`` (named ``name``) when given, else registered."""
    if template_file:
        return load_template_file(template_file, name=name)
    return get_template(name, flag=flag)


def usable_template(name: str, template_file: Optional[str] = None, *, flag: str = "--chat-template") -> ChatTemplate:
    """:func:`resolve_template`, refusing a template SpecForge cannot train with (one message for all problems)."""
    template = resolve_template(name, template_file, flag=flag)
    problems = template.problems()
    if problems:
        raise InputError(" ".join(problems))
    return template


# ---------------------------------------------------------------- custom templates from a file


def field_problems(raw: Any, source: str) -> List[str]:
    """Every field of ``raw`` that is not a valid ChatTemplate value, each named (empty when all are)."""
    if not isinstance(raw, dict):
        return [
            f"{source}: must hold a mapping of SpecForge's ChatTemplate fields ({', '.join(FIELDS)}), but holds "
            f"{type(raw).__name__} {short(raw)}."
        ]
    out = []
    for key in raw:
        if key not in FIELDS:
            out.append(
                f"{source}, field {key!r}: not a ChatTemplate field; the fields are {', '.join(FIELDS)}. Fix the "
                "spelling or remove it."
            )
    for key in STRING_FIELDS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            out.append(
                f"{source}, field {key!r}: must be a string or null, but got {type(value).__name__} {short(value)}."
            )
    for key in ("parser_type", "assistant_pattern_type"):
        if key in raw and not isinstance(raw[key], str):
            out.append(
                f"{source}, field {key!r}: must be a string, but got {type(raw[key]).__name__} {short(raw[key])}."
            )
    if "enable_thinking" in raw and not isinstance(raw["enable_thinking"], bool):
        out.append(
            f"{source}, field 'enable_thinking': must be true or false, but got {short(raw['enable_thinking'])}."
        )
    ignore = raw.get("ignore_token")
    if ignore is not None and (
        not isinstance(ignore, list) or not all(isinstance(item, str) and item for item in ignore)
    ):
        out.append(
            f"{source}, field 'ignore_token': must be a list of non-empty strings or null, but got {short(ignore)}."
        )
    return out


def read_template_file(path: str) -> Any:
    """The parsed content of a template file: YAML for .yaml/.yml, JSON otherwise."""
    if not os.path.isfile(path):
        raise InputError(
            f"--chat-template-file {path} does not exist. Write the template's fields (assistant_header, "
            "user_header, system_prompt, end_of_turn_token, parser_type, ...) to a JSON or YAML file."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--chat-template-file {path} cannot be read ({exc}).") from None
    try:
        if path.endswith((".yaml", ".yml")):
            return yaml.safe_load(text)
        return json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON (files not ending in .yaml/.yml are read as JSON)"
        detail = " ".join(str(exc).split())
        raise InputError(f"--chat-template-file {path} is not valid {kind}: {detail}. Fix the syntax.") from None


def load_template_file(path: str, *, name: str) -> ChatTemplate:
    """The template in ``path`` (SpecForge's ChatTemplate fields as JSON or YAML), called ``name``.

    Every invalid field is reported at once; a template SpecForge cannot train with is refused.
    """
    path = os.fspath(path)
    raw = read_template_file(path)
    problems = field_problems(raw, f"--chat-template-file {path}")
    if not problems:
        template = template_from_fields(name, raw, origin=f"--chat-template-file {path}")
        problems = template.problems()
    if problems:
        raise InputError(" ".join(problems))
    if canonical_template_name(name) in _registry():
        logger.info(
            "--chat-template-file %s replaces SpecForge's own %r template (as TEMPLATE_REGISTRY.register(..., "
            "override=True) would).",
            path,
            name,
        )
    return template
