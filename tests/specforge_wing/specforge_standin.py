"""A stand-in for SpecForge's side of the hand-over, for tests.

Written from SpecForge's documented behaviour (docs/SPECFORGE_CONTRACT.md
sections 1 and 4), deliberately without importing specforge_vocab, so a test
that passes here shows the files would be picked up by SpecForge itself:

* ``train_eagle3_mapping(argv)``: what scripts/train_eagle3.py does with its
  flags: key = md5 of "{train_data_path}-{max_length}-{chat_template}-
  {target_model_path}-{draft_vocab_size}-{vocab_size}" (``legacy=True``: the
  key without the last two parts), load ``<cache_dir>/vocab_mapping/<key>.pt``
  if it exists (else SpecForge would build its own mapping), then install it.
* ``run_config_mapping(path, overrides)``: what ``specforge train --config``
  does with ``model.vocab_mapping_path``.

Installing = ``torch.load(weights_only=True)``, then ``copy_`` into zero
buffers shaped by the draft config: ``t2d`` bool [vocab_size], ``d2t`` int64
[draft_vocab_size]; then the section 1 rules are checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Sequence, Tuple

import torch
import yaml


class WouldBuildOwnMapping(Exception):
    """SpecForge would not find a mapping file and would build its own."""


def draft_sizes(draft_config_path: str) -> Tuple[int, int]:
    """(draft_vocab_size, vocab_size) of a draft config JSON."""
    with open(draft_config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    return int(config["draft_vocab_size"]), int(config["vocab_size"])


def check_mapping_rules(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Section 1: kept ids ascending, unique, in range; t2d marks exactly them."""
    k, vocab = d2t.numel(), t2d.numel()
    kept = torch.arange(k, dtype=torch.int64) + d2t
    assert bool((kept[1:] > kept[:-1]).all()), "kept target ids are not strictly ascending"
    assert int(kept.min()) >= 0 and int(kept.max()) < vocab, "a kept target id is outside [0, V)"
    assert int(t2d.sum()) == k, f"t2d marks {int(t2d.sum())} ids, expected {k}"
    assert bool(t2d[kept].all()), "t2d is False at a kept target id"


def install_mapping(mapping_path: str, draft_config_path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load the .pt like SpecForge and copy it into buffers shaped by the config."""
    k, vocab = draft_sizes(draft_config_path)
    mapping = torch.load(mapping_path, weights_only=True)
    assert not mapping["d2t"].dtype.is_floating_point, f"d2t was saved as {mapping['d2t'].dtype}"
    assert mapping["t2d"].dtype == torch.bool, f"t2d was saved as {mapping['t2d'].dtype}"
    t2d = torch.zeros(vocab, dtype=torch.bool)
    d2t = torch.zeros(k, dtype=torch.int64)
    t2d.copy_(mapping["t2d"])  # raises on a shape mismatch, as in SpecForge
    d2t.copy_(mapping["d2t"])
    check_mapping_rules(d2t, t2d)
    return d2t, t2d


def _flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-model-path", required=True)
    parser.add_argument("--draft-model-config")
    parser.add_argument("--train-data-path", required=True)
    parser.add_argument("--chat-template", default="llama3")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--cache-dir", default="./cache")
    parser.add_argument("--ckpt-dir")
    args, _unknown = parser.parse_known_args(list(argv))
    return args


def train_eagle3_mapping(argv: Sequence[str], *, legacy: bool = False):
    """Return (path, d2t, t2d) as scripts/train_eagle3.py would load them."""
    args = _flags(argv)
    config = os.path.join(args.ckpt_dir, "config.json") if args.ckpt_dir else args.draft_model_config
    k, vocab = draft_sizes(config)
    text = "-".join([args.train_data_path, str(args.max_length), args.chat_template, args.target_model_path])
    if not legacy:
        text += f"-{k}-{vocab}"
    path = os.path.join(args.cache_dir, "vocab_mapping", hashlib.md5(text.encode()).hexdigest() + ".pt")
    if not os.path.exists(path):
        raise WouldBuildOwnMapping(path)
    d2t, t2d = install_mapping(path, config)
    return path, d2t, t2d


def run_config_mapping(config_path: str, overrides: Sequence[str] = ()):
    """Return (path, d2t, t2d) as ``specforge train --config`` would load them
    (relative paths from the current directory)."""
    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) if config_path.endswith((".yaml", ".yml")) else json.load(handle)
    for item in overrides:
        dotted, value = item.split("=", 1)
        node = raw
        *parents, field = dotted.split(".")
        for key in parents:
            node = node[key]
        node[field] = value
    mapping = raw["model"].get("vocab_mapping_path") or ""
    if not mapping:
        raise WouldBuildOwnMapping(config_path)
    draft = raw["model"]["draft_model_config"]
    if os.path.isdir(draft):
        draft = os.path.join(draft, "config.json")
    d2t, t2d = install_mapping(mapping, draft)
    return mapping, d2t, t2d


def _feature_files(path: str):
    """Offline feature files as newer SpecForge lists them: the file, or every *.ckpt / *.ckpt.gz
    under the directory (recursively), sorted."""
    if os.path.isfile(path):
        return [path]
    found = []
    for root, _dirs, names in os.walk(path):
        found += [os.path.join(root, n) for n in names if n.endswith((".ckpt", ".ckpt.gz"))]
    return sorted(found)


def target_vocab_size(target_model_path: str) -> int:
    """The target's V as newer SpecForge reads it from config.json: padded_vocab_size, else
    vocab_size, of text_config when the config nests one."""
    with open(os.path.join(target_model_path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config = config.get("text_config", config)
    return int(config.get("padded_vocab_size") or config["vocab_size"])


def offline_cache_mapping(config_path: str, overrides: Sequence[str] = ()):
    """Return (path, d2t, t2d) as ``specforge train --config`` finds a mapping for offline features
    when model.vocab_mapping_path is empty: ``<data.cache_dir>/vocab_mapping/<sha256>.pt`` with
    sha256 of "<identity>:<target V>:<draft k>", identity = JSON (sorted keys) of
    {"kind": "offline-features-v1", "files": [[abs path, size, mtime_ns], ...], "max_length": ...}."""
    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) if config_path.endswith((".yaml", ".yml")) else json.load(handle)
    for item in overrides:
        dotted, value = item.split("=", 1)
        section, field = dotted.split(".")
        raw[section][field] = value
    data = raw["data"]
    files = []
    for path in _feature_files(data["hidden_states_path"]):
        stat = os.stat(path)
        files.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    identity = json.dumps(
        {"kind": "offline-features-v1", "files": files, "max_length": int(data.get("max_length", 2048))}, sort_keys=True
    )
    draft = raw["model"]["draft_model_config"]
    if os.path.isdir(draft):
        draft = os.path.join(draft, "config.json")
    k, _vocab = draft_sizes(draft)
    V = target_vocab_size(raw["model"]["target_model_path"])
    key = hashlib.sha256(f"{identity}:{V}:{k}".encode()).hexdigest()
    path = os.path.join(data.get("cache_dir", "./cache"), "vocab_mapping", key + ".pt")
    if not os.path.exists(path):
        raise WouldBuildOwnMapping(path)
    d2t, t2d = install_mapping(path, draft)
    return path, d2t, t2d
