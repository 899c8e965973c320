"""Which record columns reach the chat template as None where a record lacks them.

SpecForge's ``specforge train`` reads the data with ``datasets``, which gives every record every
column of the file: a record without a column another record has gets None for it, and SpecForge
passes it to the chat template as a variable (docs/SPECFORGE.md section 3.1). A None variable is not an
absent one for a template that tests ``is defined`` (Kimi-K3's ``thinking``), and a None ``tokenize``
or ``messages`` makes SpecForge's rendering call fail for every record (it falls back).

:func:`columns_to_fill` finds, in one cheap pass over the files, the columns that matter: those
the chat template reads (the undeclared variables of its Jinja source) or whose name collides with the
rendering call, that at least one record has. Only lines that mention such a name as a JSON key are
decoded.

>>> referenced = frozenset({"thinking"})
>>> key_pattern(referenced | frozenset(COLLIDING_NAMES)).search('{"thinking": true}') is not None
True
"""

from __future__ import annotations

import json
import logging
import re
from typing import FrozenSet, Iterable, Optional, Tuple

from specforge_vocab.counting.data import iter_raw_records
from specforge_vocab.counting.parsers import RESERVED_COLUMNS, WRAPPER_PARAMETERS
from specforge_vocab.counting.templates import ChatTemplate
from specforge_vocab.errors import InputError

logger = logging.getLogger(__name__)


#: Column names that collide with SpecForge's rendering call (a duplicate keyword: TypeError, fallback).
COLLIDING_NAMES = ("tokenize", "add_generation_prompt", "add_special_tokens") + WRAPPER_PARAMETERS


def referenced_variables(tokenizer) -> Optional[FrozenSet[str]]:
    """The variables the tokenizer's chat template(s) read without defining them (a superset: names set
    inside macros count too); empty without a chat template; None when the source cannot be parsed."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return frozenset()
    sources = list(source.values()) if isinstance(source, dict) else [source]
    try:
        import jinja2
        from jinja2 import meta
        from jinja2.ext import loopcontrols

        environment = jinja2.Environment(extensions=[loopcontrols])
        names = set()
        for text in sources:
            names |= meta.find_undeclared_variables(environment.parse(text))
        return frozenset(names)
    except Exception:  # noqa: BLE001 - an unparsable template: every column may matter
        logger.info("the chat template could not be parsed for its variables; every column is checked")
        return None


def key_pattern(names: Iterable[str]) -> "re.Pattern[str]":
    """A regex finding any of ``names`` as a JSON object key in raw JSON text."""
    return re.compile('"(?:' + "|".join(re.escape(n) for n in sorted(names)) + r')"\s*:')


def columns_to_fill(files, template: ChatTemplate, tokenizer) -> Tuple[str, ...]:
    """The columns some record of ``files`` has that the chat template reads or that collide with the
    rendering call (sorted); each record lacking one gets it as None, as in SpecForge."""
    if template.is_harmony:
        return ()  # any column stops SpecForge's harmony parser; counting refuses it
    if not getattr(tokenizer, "chat_template", None):
        return ()  # every record renders by the fallback, which reads no column
    referenced = referenced_variables(tokenizer)
    names = None if referenced is None else (set(referenced) | set(COLLIDING_NAMES)) - set(RESERVED_COLUMNS)
    if names is not None and not names:
        return ()
    pattern = None if names is None else key_pattern(names)
    found = set()
    try:
        for raw in iter_raw_records(files):
            payload = raw.payload
            if not raw.parsed:
                if pattern is not None and not pattern.search(payload):
                    continue
                try:
                    payload = json.loads(payload)
                except ValueError:
                    continue  # counting reports malformed lines
            if isinstance(payload, dict):
                found.update(k for k in payload if k not in RESERVED_COLUMNS and (names is None or k in names))
    except InputError:
        pass  # a file that cannot be read to the end: counting stops there, after any earlier bad record
    return tuple(sorted(found))
