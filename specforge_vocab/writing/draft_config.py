"""Read a SpecForge draft config JSON and rewrite its ``draft_vocab_size`` in place.

The rewrite works on the file's text: only the characters of the top-level
``draft_vocab_size`` value change, so every other key, their order, the
indentation, number formatting and line endings stay byte-identical. If the
key is absent it is added right after ``vocab_size``, in the same style.

Example::

    >>> patch_draft_vocab_size("configs/llama3-8B-eagle3.json", 13264)   # doctest: +SKIP
    'configs/llama3-8B-eagle3.json.bak'
"""

from __future__ import annotations

import json
import logging
from json.decoder import scanstring
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from specforge_vocab.errors import InputError, short, where
from specforge_vocab.fileio import atomic_write, backup_file

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


_WS = " \t\n\r"


_BOM = "\ufeff"


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise InputError(
            f"Draft config {path} does not exist. Pass --config-path the draft model config JSON "
            "(for example one of SpecForge's configs/*-eagle3.json)."
        ) from None
    except OSError as exc:
        raise InputError(f"Cannot read draft config {path}: {exc.strerror}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"Draft config {path} must be UTF-8 text, but byte {exc.start} is not valid UTF-8. Save it as UTF-8."
        ) from None


def _parse(text: str, path: str) -> Any:
    try:
        return json.loads(text[1:] if text.startswith(_BOM) else text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}, line {exc.lineno}, column {exc.colno}: the draft config is not valid JSON ({exc.msg}). "
            "Fix the JSON syntax at that place."
        ) from None


def read_draft_config(path: str, *, required: Tuple[str, ...] = REQUIRED_KEYS) -> Dict[str, Any]:
    """The parsed config; InputError for a missing file, bad JSON (with line and column),
    a non-object top level, or a missing required key."""
    config = _parse(_read_text(path), path)
    if not isinstance(config, dict):
        raise InputError(
            f"{path}: a draft config must be a JSON object ({{...}}), but the file holds a "
            f"{type(config).__name__}. Pass the draft model config JSON."
        )
    missing = [key for key in required if key not in config]
    if missing:
        raise InputError(
            f"{path}: the draft config must have {', '.join(repr(k) for k in missing)}, but "
            f"{'it is' if len(missing) == 1 else 'they are'} missing. Add "
            f"{'it' if len(missing) == 1 else 'them'} (see SpecForge's configs/*-eagle3.json)."
        )
    for key in required:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(
                f"{path}: field '{key}' must be a positive integer, but got {short(value)}. Fix the draft config."
            )
    return config


class _Member:
    __slots__ = ("key", "key_start", "key_end", "value_start", "value_end")

    def __init__(self, key: str, key_start: int, key_end: int, value_start: int, value_end: int):
        self.key, self.key_start, self.key_end = key, key_start, key_end
        self.value_start, self.value_end = value_start, value_end


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _top_level_members(text: str) -> Tuple[List[_Member], int, int]:
    """Spans of the top-level object's members; also the index of '{' and of the closing '}'.
    ``text`` must already be valid JSON holding an object."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 1 if text.startswith(_BOM) else 0)
    assert text[i] == "{"
    open_at = i
    i = _skip_ws(text, i + 1)
    members: List[_Member] = []
    if text[i] == "}":
        return members, open_at, i
    while True:
        key_start = i
        key, i = scanstring(text, i + 1)
        key_end = i
        i = _skip_ws(text, i)
        assert text[i] == ":"
        i = _skip_ws(text, i + 1)
        value_start = i
        _, i = decoder.raw_decode(text, i)
        members.append(_Member(key, key_start, key_end, value_start, i))
        i = _skip_ws(text, i)
        if text[i] == "}":
            return members, open_at, i
        assert text[i] == ","
        i = _skip_ws(text, i + 1)


def patched_text(text: str, k: int, *, path: str = "draft config") -> str:
    """``text`` with the top-level draft_vocab_size set to ``k`` (added after vocab_size if absent)."""
    original = _parse(text, path)
    if not isinstance(original, dict):
        raise InputError(f"{path}: a draft config must be a JSON object, but holds a {type(original).__name__}.")
    members, open_at, close_at = _top_level_members(text)
    value = str(int(k))
    hits = [m for m in members if m.key == "draft_vocab_size"]
    if hits:
        new = text
        for member in reversed(hits):  # right to left keeps earlier offsets valid
            new = new[: member.value_start] + value + new[member.value_end :]
    elif members:
        anchor_index = next((i for i, m in enumerate(members) if m.key == "vocab_size"), len(members) - 1)
        anchor = members[anchor_index]
        # Copy the layout around the anchor: the text between the previous member's comma
        # (or the opening brace) and the anchor's key, and the anchor's key-to-value gap.
        if anchor_index == 0:
            lead = text[open_at + 1 : anchor.key_start]
        else:
            prev_end = members[anchor_index - 1].value_end
            comma = text.index(",", prev_end)
            lead = text[comma + 1 : anchor.key_start]
        gap = text[anchor.key_end : anchor.value_start]
        insert = "," + lead + '"draft_vocab_size"' + gap + value
        new = text[: anchor.value_end] + insert + text[anchor.value_end :]
    else:
        inner = text[open_at + 1 : close_at]
        new = text[: open_at + 1] + '"draft_vocab_size": ' + value + inner + text[close_at:]

    # The only change must be draft_vocab_size (a check on our own splice).
    expected = dict(original)
    expected["draft_vocab_size"] = int(k)
    if json.dumps(_parse(new, path), sort_keys=True) != json.dumps(
        expected, sort_keys=True
    ):  # pragma: no cover - would be a bug in the splice
        raise RuntimeError(f"internal error: patching draft_vocab_size in {path} changed other keys")
    return new


def checked_patch(path: str, k: int) -> Tuple[str, str]:
    """(old text, new text) of the config at ``path`` with draft_vocab_size = k, after checking k
    (a positive integer, at most vocab_size); nothing is written."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"draft_vocab_size must be a positive integer, but got {short(k)}.")
    config = read_draft_config(path, required=())
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and k > vocab_size:
        raise InputError(
            f"{path}: draft_vocab_size must be at most vocab_size ({vocab_size}), but got {k}. "
            "Choose a smaller draft vocabulary or the draft config of the right target model."
        )
    text = _read_text(path)
    return text, patched_text(text, k, path=path)


def patch_draft_vocab_size(path: str, k: int, *, backup: bool = True) -> Optional[str]:
    """Set ``draft_vocab_size`` to ``k`` in the config file at ``path``, atomically.

    Returns the backup path (``<path>.bak``, a copy of the original) or None when no
    backup was made (``backup=False``, or the file already held ``k``).
    """
    text, new = checked_patch(path, k)
    if new == text:
        logger.info("%s already has draft_vocab_size %d; left unchanged.", path, k)
        return None
    saved = backup_file(path) if backup else None
    atomic_write(path, new, keep_mode_of=path)
    logger.info("Set draft_vocab_size = %d in %s%s.", k, path, f" (backup: {saved})" if saved else "")
    return saved


def check_vocab_size(
    config: Dict[str, Any],
    *,
    source: str,
    tokenizer_length: Optional[int] = None,
    counts_length: Optional[int] = None,
) -> int:
    """Refuse a config whose vocab_size disagrees with the counts or cannot hold the tokenizer's ids.

    The counts must cover exactly vocab_size ids (the t2d buffer has that shape). A
    tokenizer may have fewer ids than vocab_size (embeddings are often padded) but
    never more. Returns vocab_size.
    """
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(
            f"{source}: field 'vocab_size' must be a positive integer (the target model's vocabulary size), "
            f"but got {short(vocab_size)}. Fix the draft config."
        )
    if counts_length is not None and counts_length != vocab_size:
        raise InputError(
            f"{source}: vocab_size is {vocab_size} but the token counts cover {counts_length} ids; they must be "
            f"equal, since t2d has one entry per target id. Use the draft config made for the target model the "
            f"counts came from, or recount with --target-vocab-size {vocab_size}."
        )
    if tokenizer_length is not None and tokenizer_length > vocab_size:
        raise InputError(
            f"{source}: vocab_size is {vocab_size} but the tokenizer has {tokenizer_length} ids, so ids up to "
            f"{tokenizer_length - 1} would fall outside the draft's target vocabulary. Use the draft config made "
            f"for this tokenizer's model, or set vocab_size to at least {tokenizer_length} "
            f"(--target-vocab-size {tokenizer_length})."
        )
    return vocab_size


def read_draft_vocab_sizes(draft_config: Union[str, Mapping]) -> Tuple[int, int]:
    """``(draft_vocab_size, vocab_size)`` from a draft config dict or JSON file."""
    source = draft_config if isinstance(draft_config, str) else "draft config"
    config = read_draft_config(draft_config, required=()) if isinstance(draft_config, str) else draft_config
    if not isinstance(config, Mapping):
        raise InputError(f"{source} must be a JSON object, but holds {short(config)}.")
    sizes = []
    for key in ("draft_vocab_size", "vocab_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(
                f"{where(source, field=key)} must be a positive integer, but got {short(value)}. "
                "SpecForge shapes the d2t/t2d buffers and the cache key from it; set it in the draft config."
            )
        sizes.append(value)
    return sizes[0], sizes[1]
