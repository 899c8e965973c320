"""SpecForge's runtime checkpoints (``specforge train``), and which kind of draft a path is.

The runtime writes ``<output_dir>/<run_id>-step<N>/training_state.pt``, a torch pickle whose
``draft_state_dict`` holds the draft's tensors (``d2t``, ``t2d``, ``lm_head.weight``, ``fc.weight``,
``midlayer.*``, ...; no embedding, no config.json), plus ``<run_id>-latest`` pointing at the newest
step (docs/SPECFORGE.md section 6). It is read with ``torch.load(weights_only=True)`` only; a file
that needs more is refused, never unpickled.

The rules follow SpecForge's own code:

- :func:`resolve_checkpoint_dir`: ``training.resume_from`` (``CheckpointManager.resolve_resume_dir``):
  a ``training_state.pt`` -> its directory; a directory holding one -> it; a run root -> its one
  complete ``*-latest``, else its highest ``<run_id>-step<N>`` (one run id only);
- :func:`runtime_state_file`: ``model.draft_checkpoint_path`` (``_runtime_state_file``): SpecForge
  format when the path is a ``training_state.pt``, a directory holding one and no pretrained
  weights, or a run root; anything else is a pretrained (Hugging Face) draft directory;
- :func:`checkpoint_config_file`: the config.json SpecForge takes from the checkpoint when
  ``model.draft_model_config`` is unset (``_checkpoint_config_source``);
- :func:`open_draft`: either kind, read lazily.

Example::

    >>> draft = open_draft("outputs/specforge-run")                # doctest: +SKIP
    >>> draft.state_path, draft.shapes["lm_head.weight"]           # doctest: +SKIP
    ('/abs/outputs/specforge-run-step500/training_state.pt', (32000, 4096))
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:  # torch is imported where tensors are made: `specforge-vocab --help` stays fast
    import torch
from specforge_vocab.drafts.checkpoint import (
    CONFIG_NAME,
    LAYOUTS,
    DraftCheckpoint,
    TensorInfo,
    _read_json,
    read_checkpoint,
    safetensors_dtype,
)
from specforge_vocab.errors import InputError, short
from specforge_vocab.writing.draft_config import read_draft_config

logger = logging.getLogger(__name__)


STATE_FILE = "training_state.pt"


_STEP_DIR = re.compile(r"^(.+)-step(\d+)$")


def local_path(source: str) -> str:
    """A checkpoint path as SpecForge reads it: ``file://`` dropped, ``~`` expanded, made absolute."""
    text = str(source)
    text = text[len("file://") :] if text.startswith("file://") else text
    return os.path.abspath(os.path.expanduser(text))


def resolve_checkpoint_dir(source: str, *, field: str = "training.resume_from") -> str:
    """The checkpoint directory ``source`` resumes from, by SpecForge's rules (module docstring)."""
    path = local_path(source)
    if os.path.basename(path) == STATE_FILE:
        if not os.path.isfile(path):
            raise InputError(f"{field} is {source!r}, but {path} does not exist. Point it at a saved checkpoint.")
        path = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise InputError(
            f"{field} is {source!r}, but {path} does not exist. Point it at a checkpoint directory "
            f"(<output_dir>/<run_id>-step<N>), its {STATE_FILE}, or the run's output_dir."
        )
    latest = sorted(
        {
            os.path.realpath(p)
            for p in glob.glob(os.path.join(glob.escape(path), "*-latest"))
            if os.path.isfile(os.path.join(os.path.realpath(p), STATE_FILE))
        }
    )
    if len(latest) > 1:
        raise InputError(
            f"{field} is {source!r}, a run root holding several complete *-latest checkpoints ({', '.join(latest)}); "
            "SpecForge refuses to choose. Point it at one checkpoint directory."
        )
    if latest:
        return latest[0]
    runs: Dict[str, List[Tuple[int, str]]] = {}
    for candidate in glob.glob(os.path.join(glob.escape(path), "*-step*")):
        match = _STEP_DIR.match(os.path.basename(candidate))
        if match and os.path.isfile(os.path.join(candidate, STATE_FILE)):
            runs.setdefault(match.group(1), []).append((int(match.group(2)), candidate))
    if not runs:
        raise InputError(
            f"{field} is {source!r}, but {path} holds no complete checkpoint (no {STATE_FILE}, no *-latest, no "
            "<run_id>-step<N> directory with one). Point it at a saved checkpoint."
        )
    if len(runs) > 1:
        raise InputError(
            f"{field} is {source!r}, a run root holding checkpoints of several runs ({', '.join(sorted(runs))}); "
            "SpecForge refuses to choose. Point it at one checkpoint directory."
        )
    return max(next(iter(runs.values())))[1]


def _has_pretrained_weights(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in LAYOUTS)


def runtime_state_file(source: str, *, field: str = "model.draft_checkpoint_path") -> Optional[str]:
    """The ``training_state.pt`` a warm start from ``source`` reads, or None for a pretrained draft directory."""
    path = local_path(source)
    if os.path.isfile(path):
        return path if os.path.basename(path) == STATE_FILE else None
    if not os.path.isdir(path):
        return None
    direct = os.path.join(path, STATE_FILE)
    if os.path.isfile(direct) and not _has_pretrained_weights(path):
        return direct
    if not (
        glob.glob(os.path.join(glob.escape(path), "*-latest")) or glob.glob(os.path.join(glob.escape(path), "*-step*"))
    ):
        return None
    return os.path.join(resolve_checkpoint_dir(source, field=field), STATE_FILE)


def checkpoint_config_file(source: str) -> Optional[str]:
    """The config.json SpecForge uses for a warm start from ``source`` when model.draft_model_config is unset
    (None: it derives one from the target)."""
    path = local_path(source)
    if os.path.isfile(path):
        if os.path.basename(path) == CONFIG_NAME:
            return path
        sibling = os.path.join(os.path.dirname(path), CONFIG_NAME)
        return sibling if os.path.isfile(sibling) else None
    if os.path.isdir(path):
        direct = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(direct):
            return direct
        found = {
            os.path.join(os.path.realpath(p), CONFIG_NAME)
            for p in glob.glob(os.path.join(glob.escape(path), "*-latest"))
            if os.path.isfile(os.path.join(os.path.realpath(p), CONFIG_NAME))
        }
        return found.pop() if len(found) == 1 else None
    return None


@dataclasses.dataclass
class RuntimeCheckpoint:
    """A SpecForge runtime checkpoint: the tensors of ``draft_state_dict`` (memory-mapped) and, when one
    lies next to it, a config.json."""

    directory: str
    state_path: str
    tensors: Dict[str, TensorInfo]
    state: Dict[str, "torch.Tensor"] = dataclasses.field(repr=False)
    config: Optional[Dict[str, Any]] = None
    config_path: Optional[str] = None
    config_text: Optional[str] = None
    strategy: Optional[str] = None
    global_step: Optional[int] = None
    layout: str = STATE_FILE
    file_metadata: Dict[str, Optional[Dict[str, str]]] = dataclasses.field(default_factory=dict)

    @property
    def files(self) -> List[str]:
        return [STATE_FILE]

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def get(self, name: str) -> "torch.Tensor":
        return self.state[name]

    def read_all(self) -> Dict[str, "torch.Tensor"]:
        return dict(self.state)


def read_runtime_checkpoint(state_path: str, *, field: str = "checkpoint", config_source: Optional[str] = None):
    """Load ``draft_state_dict`` from a ``training_state.pt`` with ``torch.load(weights_only=True)``."""
    import torch

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable here
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        first = f"it holds an object of type {refused.group(1)}" if refused else (str(exc).splitlines() or [""])[0]
        raise InputError(
            f"{field}: cannot read {state_path} with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{first[:200]}). specforge-vocab reads checkpoints only as plain tensors and Python values, as "
            "SpecForge's warm start does; a file that needs arbitrary objects unpickled is not a SpecForge "
            "checkpoint. Point at the training_state.pt `specforge train` wrote."
        ) from None
    draft_state = state.get("draft_state_dict") if isinstance(state, dict) else None
    if not isinstance(draft_state, dict) or not draft_state:
        raise InputError(
            f"{field}: {state_path} must hold a dict with a non-empty 'draft_state_dict' (as `specforge train` "
            f"saves it), but holds {short(sorted(state) if isinstance(state, dict) else state)}."
        )
    strategy = state.get("strategy")
    if strategy is not None and strategy != "eagle3":
        raise InputError(
            f"{field}: {state_path} was written by training strategy {strategy!r}, not 'eagle3'; SpecForge refuses "
            "to warm-start an EAGLE-3 draft from it. Point at an EAGLE-3 checkpoint."
        )
    tensors: Dict[str, TensorInfo] = {}
    for name, value in draft_state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{field}: {state_path}: draft_state_dict[{str(name)!r}] must be a tensor, but is a "
                f"{type(value).__name__}. The checkpoint is damaged; use another step."
            )
        code = safetensors_dtype(value.dtype) or str(value.dtype).replace("torch.", "")
        tensors[str(name)] = TensorInfo(
            str(name), STATE_FILE, code, tuple(value.shape), value.numel() * value.element_size()
        )
    directory = os.path.dirname(state_path)
    config_path = checkpoint_config_file(config_source or state_path)
    config_text = config = None
    if config_path is not None:
        config_text, _ = _read_json(config_path, "the draft config")
        config = read_draft_config(config_path, required=("vocab_size", "hidden_size"))
    step = state.get("global_step")
    return RuntimeCheckpoint(
        directory=directory,
        state_path=state_path,
        tensors=tensors,
        state={str(k): v for k, v in draft_state.items()},
        config=config,
        config_path=config_path,
        config_text=config_text,
        strategy=strategy,
        global_step=step if isinstance(step, int) else None,
    )


def open_draft(source: str, *, field: str = "DRAFT") -> Union[DraftCheckpoint, RuntimeCheckpoint]:
    """A draft at ``source``, told apart as SpecForge's warm start does (module docstring)."""
    path = local_path(source)
    if not os.path.exists(path):
        raise InputError(
            f"{field} {source} does not exist. Point it at a draft directory (config.json + model.safetensors or "
            f"pytorch_model.bin), a SpecForge checkpoint directory or its {STATE_FILE}, or a run's output_dir."
        )
    state_path = runtime_state_file(source, field=field)
    if state_path is not None:
        return read_runtime_checkpoint(state_path, field=f"{field} {source}", config_source=source)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return read_checkpoint(path, flag=field)


def weight_file_identity(draft: Union[DraftCheckpoint, RuntimeCheckpoint]) -> Tuple[Tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of every file holding the draft's weights: what a reuse check compares."""
    paths = [draft.state_path] if isinstance(draft, RuntimeCheckpoint) else [draft.path(f) for f in draft.files]
    stats = [(os.path.abspath(p), os.stat(p)) for p in paths]
    return tuple((path, stat.st_size, stat.st_mtime_ns) for path, stat in stats)
