"""Load a Hugging Face fast tokenizer from a local directory, never running remote code by default."""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from typing import Callable, List, Optional

from specforge_vocab.errors import InputError
from specforge_vocab.fileio import sha256_file

logger = logging.getLogger(__name__)


def tokenizer_path_problem(path: str, flag: str = "--tokenizer-path") -> Optional[str]:
    """Why ``path`` is not a tokenizer directory (None when it looks like one).

    >>> tokenizer_path_problem("/nowhere")[:47]
    '--tokenizer-path /nowhere must be a directory h'
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return (
            f"{flag} {path} must be the directory holding tokenizer.json, but it is a file. Pass its folder: "
            f"{flag} {os.path.dirname(os.path.abspath(path))}"
        )
    if not os.path.isdir(path):
        return (
            f"{flag} {path} must be a directory holding tokenizer.json (and tokenizer_config.json), "
            "but it does not exist. Download the target model's tokenizer and point "
            f"{flag} at that folder."
        )
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return (
            f"{flag} {path} has no tokenizer.json; a fast tokenizer is required. Save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(dir) and point to that dir."
        )
    return None


@lru_cache(maxsize=4)
def load_tokenizer(path: str, *, trust_remote_code: bool = False, flag: str = "--tokenizer-path"):
    """AutoTokenizer.from_pretrained(path) with a clear error when it cannot be loaded."""
    path = os.fspath(path)
    problem = tokenizer_path_problem(path, flag)
    if problem:
        raise InputError(problem)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        hint = (
            " It asks to run its own code: pass --trust-remote-code if you trust it."
            if "trust_remote_code" in str(exc)
            else ""
        )
        detail = " ".join(str(exc).split())  # one paragraph, whatever transformers printed
        raise InputError(
            f"{flag} {path}: the tokenizer cannot be loaded ({type(exc).__name__}: {detail}).{hint}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{flag} {path}: a fast tokenizer is required, but {type(tokenizer).__name__} was loaded.")
    return tokenizer


# Files of a tokenizer directory that decide how it tokenizes and renders (weights never are).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "tiktoken.model",
)


def tokenizer_files(path: str, *, trust_remote_code: bool = False) -> List[str]:
    """The files of ``path`` that identify its tokenizer (its own .py code too under trust_remote_code)."""
    names = set(TOKENIZER_FILES)
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return []
    out = []
    for name in entries:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name in names or name.endswith(".tiktoken") or (trust_remote_code and name.endswith(".py")):
            out.append(full)
    return out


def tokenizer_sha256(path: str, *, trust_remote_code: bool = False, sha256: Callable[[str], str] = sha256_file) -> str:
    """One sha256 over the tokenizer's identifying files (names and contents), independent of where it lives."""

    digest = hashlib.sha256()
    for full in tokenizer_files(path, trust_remote_code=trust_remote_code):
        digest.update(f"{os.path.basename(full)}\0{sha256(full)}\n".encode("utf-8"))
    return digest.hexdigest()
