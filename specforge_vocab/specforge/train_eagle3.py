"""Older SpecForge's scripts/train_eagle3.py: its flags, where it looks for a cached mapping, and
where the script itself lives (docs/SPECFORGE.md section 4).

train_eagle3.py loads ``<cache_dir>/vocab_mapping/<md5 key>.pt`` when it exists; the key hashes
``train_data_path``, ``max_length``, ``chat_template``, ``target_model_path`` and (since mid-2026)
the draft and target vocabulary sizes. Writing the mapping there before the script starts is how
the pre-step hands it over. Newer SpecForge's offline runs use a sha256 key instead
(:func:`offline_cache_mapping_path`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from specforge_vocab.counting.features import list_feature_files
from specforge_vocab.errors import InputError
from specforge_vocab.specforge.run_config import DEFAULT_CACHE_DIR, DEFAULT_CHAT_TEMPLATE, DEFAULT_MAX_LENGTH, RunConfig
from specforge_vocab.writing.draft_config import read_draft_vocab_sizes

logger = logging.getLogger(__name__)


VOCAB_MAPPING_DIR = "vocab_mapping"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit
        raise InputError(
            f"train_eagle3 flags: {message}. Pass the same flags you would give SpecForge's scripts/train_eagle3.py, "
            "for example --target-model-path meta-llama/Llama-3.1-8B-Instruct --draft-model-config "
            "configs/llama3-8B-eagle3.json --train-data-path data.jsonl."
        )


# Flags that decide the mapping; an abbreviation of one of them is refused
# because SpecForge's full parser could resolve it differently from ours.
_KEY_FLAGS = (
    "--target-model-path",
    "--draft-model-config",
    "--train-data-path",
    "--chat-template",
    "--max-length",
    "--cache-dir",
    "--ckpt-dir",
    "--is-preformatted",
    "--train-only-last-turn",
    "--vocab-mapping-path",
    "--train-hidden-states-path",
)


def train_eagle3_parser() -> argparse.ArgumentParser:
    """The train_eagle3.py flags that matter for counting and the mapping path,
    with SpecForge's defaults; use :func:`parse_train_eagle3_args` so other
    flags pass through."""
    parser = _Parser(prog="train_eagle3.py", add_help=False, allow_abbrev=False)
    add = parser.add_argument
    add("--target-model-path", type=str, required=True)
    add("--draft-model-config", type=str, default=None)
    add("--trust-remote-code", action="store_true")
    add("--is-vlm", action="store_true")
    add("--train-data-path", type=str, required=True)
    add("--train-hidden-states-path", type=str, default=None)
    add("--eval-hidden-states-path", type=str, default=None)
    add("--eval-data-path", type=str, default=None)
    add("--chat-template", type=str, default=DEFAULT_CHAT_TEMPLATE)
    add("--is-preformatted", action="store_true")
    add("--train-only-last-turn", action="store_true")
    add("--build-dataset-num-proc", type=int, default=8)
    add("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    add("--resume", action="store_true")
    add("--ckpt-dir", type=str, default=None)
    add("--cache-key", type=str, default=None)
    add("--cache-dir", type=str, default=DEFAULT_CACHE_DIR)
    add("--output-dir", type=str, default=None)
    add("--model-download-dir", type=str, default=None)
    # Only in an unmerged SpecForge branch (July 2026): load this file instead.
    add("--vocab-mapping-path", type=str, default=None)
    return parser


def parse_train_eagle3_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Parse train_eagle3 flags; return (known args, the other flags untouched)."""
    argv = list(argv)
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        prefixed = [flag for flag in _KEY_FLAGS if flag.startswith(name) and flag != name]
        if prefixed and name not in _KEY_FLAGS and len(name) > 2:
            raise InputError(
                f"train_eagle3 flag {name} is an abbreviation of {' / '.join(prefixed)}. Write the flag in full: "
                "the mapping's cache path depends on it and an abbreviation could be read differently by SpecForge."
            )
    args, rest = train_eagle3_parser().parse_known_args(argv)
    return args, rest


def md5_cache_key(
    train_data_path: str,
    max_length: int,
    chat_template: str,
    target_model_path: str,
    draft_vocab_size: int,
    vocab_size: int,
    *,
    legacy: bool = False,
) -> str:
    """train_eagle3.py's mapping cache key: md5 hex of
    ``"{train_data_path}-{max_length}-{chat_template}-{target_model_path}-{draft_vocab_size}-{vocab_size}"``
    (the flag strings exactly as given; ``legacy`` drops the last two parts,
    as SpecForge did before 2026-06-28)."""
    text = f"{train_data_path}-{max_length}-{chat_template}-{target_model_path}"
    if not legacy:
        text = f"{text}-{draft_vocab_size}-{vocab_size}"
    return hashlib.md5(text.encode()).hexdigest()


def draft_config_path_from_args(args: argparse.Namespace) -> str:
    """The draft config train_eagle3.py keys the mapping on: ``<ckpt_dir>/config.json``
    when ``--ckpt-dir`` is a directory, else ``--draft-model-config``."""
    ckpt_dir = args.ckpt_dir
    if ckpt_dir:
        if not os.path.isdir(ckpt_dir):
            raise InputError(
                f"--ckpt-dir {ckpt_dir} is not a directory; SpecForge would stop with the same complaint. "
                "Point it at a draft checkpoint directory holding config.json."
            )
        return os.path.join(ckpt_dir, "config.json")
    if not args.draft_model_config:
        raise InputError(
            "--draft-model-config is not given, so train_eagle3.py would generate a draft config from the target "
            "model and there is no file for the pre-step to patch. Pass --draft-model-config with a draft config "
            "JSON (for example configs/llama3-8B-eagle3.json)."
        )
    return args.draft_model_config


def cache_mapping_paths(args: argparse.Namespace, draft_config: Union[str, Mapping]) -> List[str]:
    """``<cache_dir>/vocab_mapping/<key>.pt`` for the current key, then the
    legacy key (the paths as train_eagle3.py joins them: relative to the
    directory it runs in when --cache-dir is relative)."""
    draft_vocab_size, vocab_size = read_draft_vocab_sizes(draft_config)
    parts = (
        args.train_data_path,
        args.max_length,
        args.chat_template,
        args.target_model_path,
        draft_vocab_size,
        vocab_size,
    )
    directory = os.path.join(args.cache_dir, VOCAB_MAPPING_DIR)
    return [
        os.path.join(directory, md5_cache_key(*parts) + ".pt"),
        os.path.join(directory, md5_cache_key(*parts, legacy=True) + ".pt"),
    ]


def sha256_cache_key(dataset_identity: str, target_vocab_size: int, draft_vocab_size: int) -> str:
    """Newer SpecForge's key: sha256 hex of ``"<identity>:<V>:<k>"``."""
    return hashlib.sha256(f"{dataset_identity}:{target_vocab_size}:{draft_vocab_size}".encode()).hexdigest()


def offline_dataset_identity(hidden_states_path: str, max_length: int, *, cwd: Optional[str] = None) -> str:
    """The dataset identity newer SpecForge hashes for offline features: JSON
    (sorted keys) of kind "offline-features-v1", max_length and, per feature
    file in sorted order, ``[absolute path, size, mtime_ns]`` (relative paths
    taken from ``cwd``, default the current directory, as SpecForge does)."""
    files = []
    for path in list_feature_files(os.path.join(cwd or os.getcwd(), hidden_states_path)):
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns])
    return json.dumps({"kind": "offline-features-v1", "files": files, "max_length": max_length}, sort_keys=True)


def offline_cache_mapping_path(run: RunConfig, target_vocab_size: int, draft_vocab_size: int) -> str:
    """Where newer SpecForge caches the mapping it derives from offline
    features when model.vocab_mapping_path is empty. ``target_vocab_size`` is
    the *target* model's (padded_vocab_size or vocab_size of its config)."""
    if run.data_source != "hidden_states_path":
        raise InputError(
            f"{run.config_path}: newer SpecForge derives and caches a mapping only for data.hidden_states_path; "
            f"this config uses data.{run.data_source}, for which it requires model.vocab_mapping_path."
        )
    identity = offline_dataset_identity(run.data_path, run.max_length, cwd=run.cwd)
    key = sha256_cache_key(identity, target_vocab_size, draft_vocab_size)
    return os.path.join(run.resolved_cache_dir, VOCAB_MAPPING_DIR, key + ".pt")


_EPOCH_DIR = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")


def last_epoch_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` continues from: the ``epoch_<e>[_step_<s>]`` directory under ``output_dir``
    with the highest (e, s), s = 0 when absent (SpecForge's get_last_checkpoint); None when there is none
    (then train_eagle3.py trains from scratch)."""
    found = []
    for name in os.listdir(output_dir):
        match = _EPOCH_DIR.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append(((int(match.group(1)), int(match.group(2) or 0)), name))
    return os.path.join(output_dir, max(found)[1]) if found else None


def find_specforge_train_script(explicit: Optional[str] = None) -> str:
    """SpecForge's scripts/train_eagle3.py: ``explicit`` (--specforge-script),
    else next to an installed ``specforge`` package's source tree."""
    if explicit:
        path = os.path.abspath(os.path.expanduser(explicit))
        if not os.path.isfile(path):
            raise InputError(
                f"--specforge-script {explicit} does not exist (looked at {path}). "
                "Point it at scripts/train_eagle3.py in your SpecForge checkout."
            )
        return path
    try:
        spec = importlib.util.find_spec("specforge")
    except (ImportError, ValueError):
        spec = None
    looked = []
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(os.path.dirname(os.path.abspath(location)), "scripts", "train_eagle3.py")
        looked.append(candidate)
        if os.path.isfile(candidate):
            return candidate
    found = (
        f"the installed specforge package has no scripts/ next to it (looked at {', '.join(looked)}; "
        "wheel installs do not ship scripts/)"
        if looked
        else "no 'specforge' package is installed"
    )
    raise InputError(
        f"Cannot find SpecForge's scripts/train_eagle3.py: no --specforge-script was given and {found}. "
        "Pass --specforge-script /path/to/SpecForge/scripts/train_eagle3.py, or install SpecForge from a source "
        "checkout (pip install -e /path/to/SpecForge). SpecForge after July 2026 has no train_eagle3.py: use "
        "'specforge-vocab prepare --config run.yaml' and then 'specforge train --config run.yaml'."
    )
