"""Before SpecForge training: count, choose k, patch the draft config and put the mapping where
SpecForge loads it, on rank 0 only, and skip all of it when nothing changed since the last time.

Three entry points share one path, :func:`before_training`:

* ``specforge-vocab prepare --config run.yaml [--set section.field=value ...]`` (newer SpecForge,
  ``specforge train --config``): sets ``model.vocab_mapping_path`` in the run config (in place
  with a ``.bak``, or in ``--output-config``). For ``data.hidden_states_path`` runs the mapping
  is also copied to SpecForge's own offline cache path when the target's vocab size is known.
* ``specforge-vocab pre-step -- <train_eagle3 flags>`` and ``scripts/train_eagle3.py`` (older
  SpecForge): writes the mapping at train_eagle3.py's md5 cache paths (both key versions); the
  script then hands over to SpecForge's own train_eagle3.py with the remaining flags. As there,
  lines of --train-data-path that are not valid JSON are skipped (and reported); with --resume
  (an existing --output-dir) or --ckpt-dir the draft weights fix draft_vocab_size, so it is kept.
* ``specforge_vocab.before_training(...)``.

Reuse (specforge/reuse.py): a second call with unchanged inputs reuses the outputs; only a changed
setting searches the stored counts again; changed data recounts; ``force`` recomputes. The hand-over
(draft_vocab_size in the draft config, cache copies, ``model.vocab_mapping_path``) is re-applied on
every call.

Ranks. Under torchrun (or in an initialised process group) every rank must call this: rank 0
plans, the ranks split the counting (:func:`~.distributed.count_dataset_distributed` for raw
data; record/file ``i % world_size`` for prompts and feature files) and sum with all_reduce,
rank 0 alone writes, and every rank then reads the same files back. An error on any rank is
raised on every rank with the same message. A gloo group started here lives under its own store
prefix and is destroyed on return, so the training script can start its own group afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.counting.counts_file import FORMAT_VERSION, load_counts
from specforge_vocab.counting.distributed import distributed_session
from specforge_vocab.counting.engine import CountAborted, CountSettings
from specforge_vocab.counting.sources import obtain_counts
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT, atomic_write, file_lock, json_text, sha256_file
from specforge_vocab.pipeline import OutputSettings, optimize
from specforge_vocab.specforge.data_files import (
    count_masked_ids,
    iter_feature_files,
    iter_prompt_records,
    list_feature_files,
)
from specforge_vocab.specforge.plan import (
    CONVERSATIONS,
    FEATURES,
    PRETOKENIZED,
    SOURCE_NAMES,
    DataSpec,
    Plan,
    plan_from_run_config,
    plan_from_train_eagle3_args,
)
from specforge_vocab.specforge.ranks import agreed, process_group, run_on_rank_zero
from specforge_vocab.specforge.reuse import Decision, decide, read_fingerprint
from specforge_vocab.specforge.train_eagle3 import cache_mapping_paths, offline_cache_mapping_path
from specforge_vocab.specforge.yaml_patch import set_vocab_mapping_path
from specforge_vocab.writing.draft_config import patch_draft_vocab_size
from specforge_vocab.writing.outputs import COUNTS_FILE, FINGERPRINT_FILE, MAPPING_FILE, SUMMARY_FILE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PrepareResult:
    """What :func:`before_training` chose and where SpecForge will find it."""

    k: int
    mapping_path: str  # absolute path of the .pt SpecForge loads
    summary: Dict[str, Any]  # summary.json
    reused: bool  # True: nothing counted or searched (inputs unchanged)
    action: str = "reuse"  # "reuse" | "search" (stored counts) | "count"
    reason: str = ""
    output_dir: str = ""
    draft_config: str = ""
    cache_paths: List[str] = dataclasses.field(default_factory=list)  # md5 / sha256 copies SpecForge finds
    run_config: Optional[str] = None  # the file whose model.vocab_mapping_path was set
    overrides: Tuple[str, ...] = ()
    source: str = ""
    rank: int = 0

    def summary_lines(self) -> List[str]:
        s = self.summary
        verb = {
            "reuse": "reused (inputs unchanged)",
            "search": "searched again on the stored counts",
            "count": "counted and searched",
        }.get(self.action, self.action)
        lines = [
            f"{verb}: {self.reason}" if self.reason else verb,
            f"data: {self.source}",
            f"loss-masked tokens counted: {int(s.get('tokens_counted', 0)):,}  unique ids: "
            f"{int(s.get('unique_tokens', 0)):,}",
            f"draft_vocab_size: {self.k:,} of {s.get('target_vocab_size', 0):,}  coverage "
            f"{float(s.get('coverage', 0.0)):.4%}  ({s.get('method')}), set in {self.draft_config}",
            f"mapping: {self.mapping_path}",
        ]
        lines += [f"  copy at SpecForge's cache path: {p}" for p in self.cache_paths]
        if self.run_config:
            lines.append(f"model.vocab_mapping_path set in {self.run_config}")
            command = f"specforge train --config {self.run_config}"
            if self.overrides:
                command += " " + " ".join(self.overrides)
                lines.append("pass `specforge train` the same overrides you gave prepare:")
            lines.append(f"next: {command}")
        return lines


def before_training(
    run_config: Optional[str] = None,
    *,
    train_eagle3_args: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    output_config: Optional[str] = None,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    progress: bool = False,
    cwd: Optional[str] = None,
    chat_template_file: Optional[str] = None,
) -> PrepareResult:
    """Prepare the draft vocabulary for a SpecForge run; call it on every rank.

    Give either ``run_config`` (a ``specforge train`` YAML/JSON, with ``overrides`` as
    ``section.field=value``) or ``train_eagle3_args`` (scripts/train_eagle3.py's flags; the other
    flags are ignored). Relative paths resolve from ``cwd`` (default: the current directory),
    as SpecForge resolves them. ``chat_template_file`` holds the fields of a chat template registered
    in code (``TEMPLATE_REGISTRY.register``) under the name the run uses.

    >>> result = before_training("configs/llama3-8b-eagle3-run.yaml")  # doctest: +SKIP
    >>> result.k, result.mapping_path, result.reused  # doctest: +SKIP
    (13264, '/abs/cache/vocab_optimization/.../vocab_mapping.pt', False)
    """
    if (run_config is None) == (train_eagle3_args is None):
        raise InputError(
            "before_training needs exactly one of run_config (a `specforge train` config file) or "
            "train_eagle3_args (scripts/train_eagle3.py's flags), but got "
            f"{'both' if run_config is not None else 'neither'}."
        )
    if train_eagle3_args is not None and (overrides or output_config):
        raise InputError(
            "overrides and output_config apply to a run config; with train_eagle3_args give the "
            "values as train_eagle3 flags instead."
        )
    cwd = os.path.abspath(cwd or os.getcwd())
    search = search if search is not None else SearchSettings()
    search.validate()  # every search flag is checked before any work
    options = dict(
        keep_draft_vocab_size=keep_draft_vocab_size,
        force=force,
        search=search,
        output_dir=output_dir,
        backup=backup,
        lock_timeout=lock_timeout,
        cwd=cwd,
        chat_template_file=chat_template_file,
    )

    def make_plan() -> Plan:
        if run_config is not None:
            return plan_from_run_config(run_config, overrides=overrides, output_config=output_config, **options)
        return plan_from_train_eagle3_args(train_eagle3_args, **options)

    with process_group(), distributed_session() as session, contextlib.ExitStack() as held:
        rank = session.rank if session is not None else 0

        def plan_and_decide() -> Tuple[Plan, Decision]:
            plan = make_plan()
            # One prepare at a time per output directory (optimize locks the directory itself).
            held.enter_context(file_lock(plan.output_dir.rstrip("/\\") + ".prepare", timeout=plan.lock_timeout))
            return plan, decide(plan)

        plan, decision = run_on_rank_zero(session, plan_and_decide)
        logger.info("%s: %s", decision.action, decision.reason)
        counted = None
        if decision.action == "count":
            counted = count_data(plan, session=session, progress=progress and rank == 0)
        info = run_on_rank_zero(session, lambda: write_outputs(plan, decision, counted))
        return agreed(session, lambda: load_result(info, plan, rank=rank))


def _local_masked_counts(data: DataSpec, rank: int, world_size: int, stop: Optional[Callable[[], bool]]) -> np.ndarray:
    """This rank's counts of prompts records / feature files, with the record count appended."""

    if data.source == PRETOKENIZED:
        arrays = iter_prompt_records(
            data.path, data.max_length, vocab_size=data.vocab_size, rank=rank, world_size=world_size
        )
    else:
        arrays = iter_feature_files(
            data.path, data.max_length, vocab_size=data.vocab_size, rank=rank, world_size=world_size
        )
    records = 0

    def counted() -> Iterator[np.ndarray]:
        nonlocal records
        for ids in arrays:
            if stop is not None and stop():
                raise CountAborted("another rank failed")
            records += 1
            yield ids

    counts = count_masked_ids(counted(), data.vocab_size)
    return np.concatenate([counts, np.array([records], dtype=np.int64)])


def _masked_metadata(data: DataSpec, counts: np.ndarray, records: int) -> Dict[str, str]:

    paths = [data.path] if data.source == PRETOKENIZED else list_feature_files(data.path)
    files = [{"path": p, "size": os.path.getsize(p)} for p in paths]
    return {
        "format": "specforge-vocab-counts",
        "format_version": FORMAT_VERSION,
        "source": f"{data.field} ({SOURCE_NAMES[data.source]})",
        "data_path": data.path,
        "files": json.dumps(files, ensure_ascii=False),
        "max_length": str(data.max_length),
        "vocab_size": str(data.vocab_size),
        "records_counted": str(records),
        "tokens_counted": str(int(counts.sum())),
        "unique_tokens": str(int(np.count_nonzero(counts))),
    }


def count_data(plan: Plan, *, session=None, progress: bool = False) -> Tuple[np.ndarray, Dict[str, str]]:
    """Counts [V] and their metadata for ``plan.data``; split over the ranks of ``session``."""
    data = plan.data
    if data.source == CONVERSATIONS:
        counted = obtain_counts(
            data.count_settings(),
            cache_dir=plan.cache_dir,
            force=plan.force,
            distributed=session is not None,
            progress=progress,
        )
        return counted.counts, counted.metadata
    if session is None:
        local = _local_masked_counts(data, 0, 1, None)
        total = local
    else:
        key = run_on_rank_zero(session, lambda: f"specforge_vocab/prepare-abort/{uuid.uuid4().hex}")
        local, _ = session.agree(
            lambda: _local_masked_counts(data, session.rank, session.world_size, session.stop_flag(key)), abort_key=key
        )
        total = session.all_reduce_int64(local)
    counts, records = total[:-1].copy(), int(total[-1])
    if records == 0 or counts.sum() == 0:
        raise InputError(
            f"{data.field} {data.path}: no loss-masked tokens to count ({records} records read), so SpecForge would "
            "train on nothing. Check that loss_mask marks the assistant tokens, or point at the right data."
        )
    return counts, _masked_metadata(data, counts, records)


def _write_if_different(path: str, payload: bytes) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as handle:
            if handle.read() == payload:
                return False
    atomic_write(path, payload)
    return True


def cache_copy_paths(plan: Plan, k: int) -> List[str]:
    """Absolute paths where SpecForge looks for a cached mapping: train_eagle3's md5 keys (current,
    then legacy), or newer SpecForge's offline sha256 key for feature files."""
    paths = []
    if plan.train_args is not None:
        paths += [
            os.path.normpath(os.path.join(plan.cwd, p)) for p in cache_mapping_paths(plan.train_args, plan.draft_config)
        ]
    if plan.data.source == FEATURES and plan.run is not None:
        if plan.target_vocab_size is None:
            logger.info(
                "The target model's config.json is not local, so the offline cache copy is skipped "
                "(model.vocab_mapping_path is what SpecForge loads)."
            )
        elif plan.target_vocab_size != plan.data.vocab_size:
            logger.warning(
                "The target model's vocab size %d differs from the draft config's vocab_size %d; "
                "SpecForge's own offline cache key would not match this mapping, so no copy is written there.",
                plan.target_vocab_size,
                plan.data.vocab_size,
            )
        else:
            paths.append(offline_cache_mapping_path(plan.run, plan.target_vocab_size, k))
    return paths


def write_outputs(
    plan: Plan, decision: Decision, counted: Optional[Tuple[np.ndarray, Dict[str, str]]]
) -> Dict[str, Any]:
    """Rank 0: search and write (unless reused), then hand over; fingerprint.json goes last."""

    out = plan.output_dir
    fingerprint_path = os.path.join(out, FINGERPRINT_FILE)
    mapping = os.path.join(out, MAPPING_FILE)
    if decision.action == "reuse":
        with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as handle:
            k = int(json.load(handle)["optimal_draft_vocab_size"])
        if not plan.keep_draft_vocab_size:
            patch_draft_vocab_size(plan.draft_config, k, backup=plan.backup)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fingerprint_path)  # outputs are about to change: never pair old fingerprint with new files
        if counted is None:
            counted = load_counts(os.path.join(out, COUNTS_FILE), flag=f"the stored counts in {out}")
        count = plan.data.count_settings() if plan.data.source == CONVERSATIONS else CountSettings()
        result = optimize(
            count,
            plan.search,
            OutputSettings(
                output_dir=out, config_path=plan.draft_config, backup=plan.backup, lock_timeout=plan.lock_timeout
            ),
            precounted=counted,
        )
        k = result.k
    with open(mapping, "rb") as handle:
        payload = handle.read()
    copies = cache_copy_paths(plan, k)
    for path in copies:
        _write_if_different(path, payload)
    run_config = None
    if plan.run is not None:
        patched = set_vocab_mapping_path(
            plan.run.config_path, mapping, output_path=plan.output_config, backup=plan.backup
        )
        run_config = patched.path
    sums = {name: sha256_file(os.path.join(out, name)) for name in (MAPPING_FILE, COUNTS_FILE, SUMMARY_FILE)}
    stored = dict(decision.fingerprint, result={"draft_vocab_size": k, "sha256": sums})
    if read_fingerprint(out) != json.loads(json_text(stored)):
        atomic_write(fingerprint_path, json_text(stored))
    return {
        "k": k,
        "mapping": mapping,
        "mapping_sha256": sums[MAPPING_FILE],
        "copies": copies,
        "run_config": run_config,
        "action": decision.action,
        "reason": decision.reason,
    }


def load_result(info: Dict[str, Any], plan: Plan, *, rank: int = 0) -> PrepareResult:
    """Every rank: read back what rank 0 wrote (it must be visible here too) into a PrepareResult."""
    mapping = info["mapping"]
    for path in [mapping, *info["copies"]]:
        if not os.path.isfile(path) or sha256_file(path) != info["mapping_sha256"]:
            raise InputError(
                f"{path}, written by rank 0, is {'missing' if not os.path.isfile(path) else 'different'} on rank "
                f"{rank}. Every rank must see the same files: put the output and cache directories on a filesystem "
                "shared by all nodes (--output-dir, cache_dir), or run `specforge-vocab prepare` once before launching."
            )
    with open(os.path.join(plan.output_dir, SUMMARY_FILE), encoding="utf-8") as handle:
        summary = json.load(handle)
    return PrepareResult(
        k=int(info["k"]),
        mapping_path=mapping,
        summary=summary,
        reused=info["action"] == "reuse",
        action=info["action"],
        reason=info["reason"],
        output_dir=plan.output_dir,
        draft_config=plan.draft_config,
        cache_paths=list(info["copies"]),
        run_config=info["run_config"],
        overrides=tuple(plan.overrides),
        source=f"{plan.data.field} {plan.data.path} ({SOURCE_NAMES[plan.data.source]})",
        rank=rank,
    )
