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


# ---------------------------------------------------------------- warm start and resume (docs/SPECFORGE.md section 6)


class SpecForgeWouldFail(Exception):
    """SpecForge would stop here with an error."""


STATE_FILE = "training_state.pt"
PRETRAINED_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _local(source: str) -> str:
    source = source[len("file://") :] if source.startswith("file://") else source
    return os.path.abspath(os.path.expanduser(source))


def resolve_resume_dir(source: str) -> str:
    """CheckpointManager.resolve_resume_dir: a training_state.pt's directory, a directory holding one, a run root's
    single complete *-latest, else its highest <run_id>-step<N> (one run id)."""
    import glob
    import re

    path = _local(source)
    if os.path.basename(path) == STATE_FILE:
        path = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = sorted(
        {
            os.path.realpath(p)
            for p in glob.glob(os.path.join(path, "*-latest"))
            if os.path.isfile(os.path.join(os.path.realpath(p), STATE_FILE))
        }
    )
    if len(latest) == 1:
        return latest[0]
    if len(latest) > 1:
        raise SpecForgeWouldFail(f"multiple complete *-latest runs under {path}")
    runs = {}
    for candidate in glob.glob(os.path.join(path, "*-step*")):
        match = re.match(r"^(.+)-step(\d+)$", os.path.basename(candidate))
        if match and os.path.isfile(os.path.join(candidate, STATE_FILE)):
            runs.setdefault(match.group(1), []).append((int(match.group(2)), candidate))
    if len(runs) != 1:
        raise SpecForgeWouldFail(f"no single run with a complete checkpoint under {path}")
    return max(next(iter(runs.values())))[1]


def _runtime_state_file(source: str):
    """_runtime_state_file: SpecForge format (training_state.pt) or None for a pretrained directory."""
    import glob

    path = _local(source)
    if os.path.isfile(path):
        return path if os.path.basename(path) == STATE_FILE else None
    if os.path.isfile(os.path.join(path, STATE_FILE)) and not any(
        os.path.isfile(os.path.join(path, n)) for n in PRETRAINED_FILES
    ):
        return os.path.join(path, STATE_FILE)
    if glob.glob(os.path.join(path, "*-latest")) or glob.glob(os.path.join(path, "*-step*")):
        return os.path.join(resolve_resume_dir(path), STATE_FILE)
    return None


def _checkpoint_config_source(source):
    """_checkpoint_config_source for local paths: config.json of the checkpoint (file, directory, or the one
    behind a single *-latest), else None."""
    import glob

    if not source:
        return None
    path = _local(source)
    if os.path.isfile(path):
        sibling = os.path.join(os.path.dirname(path), "config.json")
        return path if os.path.basename(path) == "config.json" else (sibling if os.path.isfile(sibling) else None)
    if os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, "config.json")
    found = {
        os.path.join(os.path.realpath(p), "config.json")
        for p in glob.glob(os.path.join(path, "*-latest"))
        if os.path.isfile(os.path.join(os.path.realpath(p), "config.json"))
    }
    return found.pop() if len(found) == 1 else None


def _load_config(source: str) -> dict:
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("draft_vocab_size") is None:
        config["draft_vocab_size"] = config["vocab_size"]  # _draft_config_from_dict
    return config


def _model_shapes(config: dict) -> dict:
    """state_dict() names and shapes of LlamaForCausalLMEagle3 built from ``config`` (llama3_eagle.py)."""
    h, k, V = config["hidden_size"], config["draft_vocab_size"], config["vocab_size"]
    heads, kv, inter = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // heads
    target_h = config.get("target_hidden_size") or h
    return {
        "embed_tokens.weight": (V, h),
        "midlayer.self_attn.q_proj.weight": (heads * head_dim, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv * head_dim, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv * head_dim, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "fc.weight": (h, 3 * target_h),
        "norm.weight": (h,),
        "lm_head.weight": (k, h),
        "t2d": (V,),
        "d2t": (k,),
    }


def _pretrained_state(directory: str) -> dict:
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, name)))
        elif name.endswith(".bin"):
            state.update(torch.load(os.path.join(directory, name), weights_only=True))
    return state


def _load_state(shapes: dict, state: dict, model: dict, source: str) -> None:
    """load_state_dict(strict=False) with warm_start_draft_model's checks: shapes must match, no unexpected key,
    nothing missing but the embedding."""
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise SpecForgeWouldFail(f"{source}: unexpected keys {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != shapes[name]:
            raise SpecForgeWouldFail(f"{source}: {name} has shape {tuple(tensor.shape)}, the model {shapes[name]}")
        model[name] = tensor.clone()
    missing = sorted(n for n in set(shapes) - set(state) if "embed" not in n)
    if missing:
        raise SpecForgeWouldFail(f"{source}: missing draft weights {missing}")


def _install_mapping(model: dict, mapping_path: str) -> None:
    """Eagle3DraftModel.load_vocab_mapping: torch.load, then copy_ into the buffers (broadcasting, casting)."""
    mapping = torch.load(mapping_path, weights_only=True)
    model["t2d"].copy_(mapping["t2d"])
    model["d2t"].copy_(mapping["d2t"])


def run_config_draft(config_path: str, overrides: Sequence[str] = ()) -> dict:
    """What ``specforge train --config`` leaves in the draft (lm_head.weight, d2t, t2d, ...) after
    build_eagle3_draft and, under training.resume_from, Trainer.__init__: the config (draft_model_config, else
    the warm-start checkpoint's config.json; without either SpecForge would derive one with k = 32000), the
    warm start, the mapping of model.vocab_mapping_path copied over it, then the resumed checkpoint's
    draft_state_dict restored last."""
    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) if config_path.endswith((".yaml", ".yml")) else json.load(handle)
    for item in overrides:
        dotted, value = item.split("=", 1)
        section, field = dotted.split(".")
        raw.setdefault(section, {})[field] = value
    model_cfg, training = raw["model"], raw.get("training") or {}
    warm, resume = model_cfg.get("draft_checkpoint_path"), training.get("resume_from")
    if warm is not None and resume is not None:
        raise SpecForgeWouldFail("draft_checkpoint_path and resume_from are mutually exclusive")
    source = model_cfg.get("draft_model_config") or _checkpoint_config_source(warm)
    if not source:
        raise SpecForgeWouldFail("no draft config: SpecForge would derive one with draft_vocab_size 32000")
    config = _load_config(source)
    shapes = _model_shapes(config)
    model = {
        "t2d": torch.ones(config["vocab_size"], dtype=torch.bool),
        "d2t": torch.zeros(config["draft_vocab_size"], dtype=torch.int64),
    }
    if warm:
        state_file = _runtime_state_file(warm)
        if state_file is not None:
            state = torch.load(state_file, weights_only=True)["draft_state_dict"]
        else:
            state = _pretrained_state(_local(warm))
        _load_state(shapes, state, model, warm)
    if model_cfg.get("vocab_mapping_path"):
        _install_mapping(model, model_cfg["vocab_mapping_path"])
    elif raw["data"].get("hidden_states_path"):
        raise WouldBuildOwnMapping("offline run without vocab_mapping_path: the data's own mapping is copied over")
    if resume:
        state = torch.load(os.path.join(resolve_resume_dir(resume), STATE_FILE), weights_only=True)["draft_state_dict"]
        _load_state(shapes, state, model, resume)
    return model


def train_eagle3_draft(argv: Sequence[str], *, legacy: bool = False) -> dict:
    """What train_eagle3.py leaves in the draft: weights of --ckpt-dir (or, with --resume, of the newest
    epoch_<e>[_step_<s>] under --output-dir), then the md5-keyed mapping copied over them unconditionally."""
    import re

    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--output-dir")
    args, _ = parser.parse_known_args(list(argv))
    source = args.ckpt_dir
    if args.resume and args.output_dir and os.path.isdir(args.output_dir):
        found = []
        for name in os.listdir(args.output_dir):
            match = re.match(r"^epoch_(\d+)(?:_step_(\d+))?$", name)
            if match:
                found.append(((int(match.group(1)), int(match.group(2) or 0)), os.path.join(args.output_dir, name)))
        if found:
            source = max(found)[1]
    if source is None:
        raise SpecForgeWouldFail("no checkpoint to continue from")
    config = _load_config(source)
    model = {}
    _load_state(_model_shapes(config), _pretrained_state(source), model, source)
    path, d2t, t2d = train_eagle3_mapping(argv, legacy=legacy)
    model["d2t"].copy_(d2t)
    model["t2d"].copy_(t2d)
    return model
