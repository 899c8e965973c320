"""One error type for everything a user can fix, and how it is worded.

Every message is one paragraph: where (file, line, field or flag), what was
expected, what was found, and how to fix it. The CLI prints it and exits with
status 2; the Python API raises it.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

EXIT_USAGE = 2


class SpecForgeVocabError(Exception):
    """A problem with the user's input or environment, with a fix in the message."""

    exit_code = EXIT_USAGE


class InputError(SpecForgeVocabError):
    """Bad data, config, tokenizer or flag."""


class SettingsError(InputError):
    """One or more settings are invalid; ``problems`` lists each of them."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} settings are invalid:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class ValidatedSettings:
    """Mixin for settings dataclasses: ``problems()`` lists every invalid field (flag-named);
    ``validate()`` raises them all at once."""

    def problems(self) -> List[str]:  # pragma: no cover - each settings class defines it
        raise NotImplementedError

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise SettingsError(found)


def where(path: Optional[str] = None, line: Optional[int] = None, field: Optional[str] = None) -> str:
    """Render a location: ``where("a.jsonl", 3, "conversations[1].role")``
    -> ``"a.jsonl, line 3, field 'conversations[1].role'"``."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if line is not None:
        parts.append(f"line {line}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts) if parts else "input"


def must(name: str, expected: str, got: object, fix: str = "") -> str:
    """Optuna-style wording: ``must("--max-length", "a positive integer", 0)``
    -> ``"--max-length must be a positive integer, but got 0."``."""
    text = f"{name} must be {expected}, but got {got!r}."
    return f"{text} {fix}".strip()


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a length or a count here).

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def short(value: object, limit: int = 80) -> str:
    """repr() of a value, cut to ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
