"""Before SpecForge training: count, choose k, patch the draft config and put the mapping where
SpecForge loads it, on rank 0 only, and skip all of it when nothing changed since the last time.

Three entry points share one path, :func:`before_training`:

* ``specforge-vocab prepare --config run.yaml [--set section.field=value ...]`` (newer SpecForge,
  ``specforge train --config``): sets ``model.vocab_mapping_path`` in the run config (in place
  with a ``.bak``, or in ``--output-config``). For ``data.hidden_states_path`` runs the mapping
  is also copied to SpecForge's own offline cache path when the target's vocab size is known, and
  ``--count-source target-argmax`` chooses by the target's own predictions (its LM head from
  ``model.target_model_path`` / ``model.lm_head_key``; docs/SPECFORGE.md section 7).
* ``specforge-vocab pre-step -- <train_eagle3 flags>`` and ``scripts/train_eagle3.py`` (older
  SpecForge): writes the mapping at train_eagle3.py's md5 cache paths (both key versions); the
  script then hands over to SpecForge's own train_eagle3.py with the remaining flags. As there,
  lines of --train-data-path that are not valid JSON are skipped (and reported).

A run that continues from trained weights (``model.draft_checkpoint_path``, ``training.resume_from``,
``--ckpt-dir``, ``--resume`` with a saved checkpoint) gets the checkpoint's own mapping and keeps its k;
``remap`` writes a warm-start checkpoint on a fresh choice instead (specforge/continuing.py).
* ``specforge_vocab.before_training(...)``.

Reuse (specforge/reuse.py): a second call with unchanged inputs reuses the outputs; only a changed
setting searches the stored counts again; changed data recounts; ``force`` recomputes. The hand-over
(draft_vocab_size in the draft config, cache copies, ``model.vocab_mapping_path``) is re-applied on
every call.

Ranks. Under torchrun (or in an initialised process group) every rank must call this: rank 0
plans, the ranks split the counting (counting/sources.py: record shards for raw data,
record/file ``i % world_size`` for prompts and feature files) and sum with all_reduce,
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from specforge_vocab.choosing.search import SearchSettings
from specforge_vocab.choosing.serving import ServingSettings
from specforge_vocab.counting.distributed import distributed_session
from specforge_vocab.counting.engine import COUNT_SOURCES, DEVICES, CountSettings
from specforge_vocab.counting.sources import Counted, obtain_counts
from specforge_vocab.counting.target_head import DEFAULT_LM_HEAD_KEY
from specforge_vocab.drafts.checkpoint import CONFIG_NAME
from specforge_vocab.drafts.remap import RemapResult, write_warm_start
from specforge_vocab.drafts.runtime_checkpoint import STATE_FILE, open_draft
from specforge_vocab.errors import InputError, SettingsError, must
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT, atomic_write, file_lock, json_text, sha256_file
from specforge_vocab.pipeline import OutputSettings, check_settings, choose, gather_inputs, optimize
from specforge_vocab.specforge.continuing import RESUME, configured_mapping_equals, continuing_payloads
from specforge_vocab.specforge.continuing import summary_lines as continuing_summary_lines
from specforge_vocab.specforge.plan import (
    CONVERSATIONS,
    FEATURES,
    SOURCE_NAMES,
    Plan,
    plan_from_run_config,
    plan_from_train_eagle3_args,
)
from specforge_vocab.specforge.ranks import agreed, process_group, run_on_rank_zero
from specforge_vocab.specforge.reuse import Decision, decide, read_fingerprint
from specforge_vocab.specforge.run_config import resolve_path
from specforge_vocab.specforge.train_eagle3 import cache_mapping_paths, offline_cache_mapping_path
from specforge_vocab.specforge.yaml_patch import set_model_fields
from specforge_vocab.writing.draft_config import patch_draft_vocab_size
from specforge_vocab.writing.mapping import kept_ids_from_d2t, load_mapping
from specforge_vocab.writing.outputs import COUNTS_FILE, FINGERPRINT_FILE, MAPPING_FILE, SUMMARY_FILE, commit_outputs

logger = logging.getLogger(__name__)


#: --remap writes the warm-start checkpoint to <output_dir><suffix>
WARM_START_SUFFIX = "-warm-start"


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
    run_config: Optional[str] = None  # the file whose model.* fields were set
    overrides: Tuple[str, ...] = ()
    source: str = ""
    rank: int = 0
    run_fields: List[str] = dataclasses.field(default_factory=list)  # the model.* fields set in run_config
    warm_start: Optional[str] = None  # --remap: the warm-start checkpoint written
    notes: List[str] = dataclasses.field(default_factory=list)

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
            f"{float(s.get('coverage', 0.0)):.4%}  ({s.get('method')}), draft config {self.draft_config}",
        ]
        coverage = s.get("coverage_at_draft_vocab_size") or {}
        if coverage.get("target_argmax") is not None:
            lines.append(
                f"coverage at k: data tokens {coverage['data_tokens']:.4%}, target argmax "
                f"{coverage['target_argmax']:.4%} (SpecForge drops {coverage['target_positions_dropped']:.4%} of the "
                "trained positions)"
            )
        if "continuing" in s:
            lines += continuing_summary_lines(s)
        lines.append(f"mapping: {self.mapping_path} (fingerprint {str(s.get('mapping_fingerprint', ''))[:16]})")
        lines += [f"  copy at SpecForge's cache path: {p}" for p in self.cache_paths]
        lines += self.notes
        if self.run_config:
            lines.append(f"set {', '.join('model.' + f for f in self.run_fields)} in {self.run_config}")
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
    count_source: str = CountSettings.count_source,
    device: str = CountSettings.device,
    keep_draft_vocab_size: bool = False,
    force: bool = False,
    search: Optional[SearchSettings] = None,
    output_dir: Optional[str] = None,
    backup: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    progress: bool = False,
    cwd: Optional[str] = None,
    remap: bool = False,
    chat_template_file: Optional[str] = None,
) -> PrepareResult:
    """Prepare the draft vocabulary for a SpecForge run; call it on every rank.

    Give either ``run_config`` (a ``specforge train`` YAML/JSON, with ``overrides`` as
    ``section.field=value``) or ``train_eagle3_args`` (scripts/train_eagle3.py's flags; the other
    flags are ignored). Relative paths resolve from ``cwd`` (default: the current directory),
    as SpecForge resolves them. When the run continues from a checkpoint, the checkpoint's own
    mapping is handed over; ``remap`` moves the draft onto a fresh choice instead
    (specforge/continuing.py). ``count_source="target-argmax"`` (run configs with
    ``data.hidden_states_path``) chooses by the target's own predictions, read with
    ``model.target_model_path`` and ``model.lm_head_key`` on ``device``. ``chat_template_file`` holds
    the fields of a chat template registered in code (``TEMPLATE_REGISTRY.register``) under the name
    the run uses.

    >>> result = before_training("configs/llama3-8b-eagle3-run.yaml")  # doctest: +SKIP
    >>> result.k, result.mapping_path, result.reused  # doctest: +SKIP
    (13264, '/abs/cache/vocab_optimization/.../vocab_mapping.pt', False)
    """
    _check_argument_types(**locals())  # the parameters: no other name is bound yet
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
    problems = search.problems()  # every flag is checked before any work
    if count_source not in COUNT_SOURCES:
        problems.append(must("--count-source", f"one of {', '.join(COUNT_SOURCES)}", count_source))
    if device not in DEVICES:
        problems.append(must("--device", f"one of {', '.join(DEVICES)}", device))
    if train_eagle3_args is not None and count_source != CountSettings.count_source:
        problems.append(
            f"--count-source {count_source} reads offline features through a run config's data.hidden_states_path; "
            "train_eagle3.py's mapping comes from --train-data-path. Use `specforge-vocab prepare --config`."
        )
    if problems:
        raise SettingsError(problems)
    options = dict(
        keep_draft_vocab_size=keep_draft_vocab_size,
        force=force,
        search=search,
        output_dir=output_dir,
        backup=backup,
        lock_timeout=lock_timeout,
        cwd=cwd,
        remap=remap,
        chat_template_file=chat_template_file,
    )

    def make_plan() -> Plan:
        if run_config is not None:
            return plan_from_run_config(
                run_config,
                overrides=overrides,
                output_config=output_config,
                count_source=count_source,
                device=device,
                **options,
            )
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


def count_data(plan: Plan, *, session=None, progress: bool = False) -> Counted:
    """The counts of ``plan.data`` (every count source counted, with metadata), split over the ranks of ``session``."""
    data = plan.data
    return obtain_counts(
        data.count_settings(),
        cache_dir=plan.cache_dir if data.source == CONVERSATIONS else None,
        force=plan.force,
        distributed=session is not None,
        progress=progress,
        field=data.field,
    )


def _check_argument_types(**arguments: Any) -> None:
    """Refuse arguments of the wrong type, each named (a string where a list belongs would be read
    one character at a time)."""
    optional_path = (str, os.PathLike, type(None))

    def string_list(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    expected = {
        "run_config": (lambda v: isinstance(v, optional_path), "a path"),
        "train_eagle3_args": (lambda v: v is None or string_list(v), "a list of strings (the flags, one per item)"),
        "overrides": (string_list, "a list of 'section.field=value' strings"),
        "output_config": (lambda v: isinstance(v, optional_path), "a path or None"),
        "output_dir": (lambda v: isinstance(v, optional_path), "a path or None"),
        "cwd": (lambda v: isinstance(v, optional_path), "a path or None"),
        "search": (lambda v: v is None or isinstance(v, SearchSettings), "a SearchSettings or None"),
        "lock_timeout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number of seconds"),
    }
    for name in ("keep_draft_vocab_size", "force", "backup", "progress", "remap"):
        expected[name] = (lambda v: isinstance(v, bool), "True or False")
    problems = [
        must(f"before_training: {name}", what, arguments[name])
        for name, (ok, what) in expected.items()
        if not ok(arguments[name])
    ]
    if problems:
        raise SettingsError(problems)


def _write_if_different(path: str, payload: bytes) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as handle:
            if handle.read() == payload:
                return False
    atomic_write(path, payload)
    return True


def cache_copy_paths(plan: Plan, k: int, draft_config: Optional[str] = None) -> List[str]:
    """Absolute paths where SpecForge looks for a cached mapping: train_eagle3's md5 keys (current,
    then legacy; keyed on ``draft_config``, default the plan's), or newer SpecForge's offline sha256 key
    for feature files (fresh runs only: a continuing run names its mapping in the run config)."""
    paths = []
    if plan.train_args is not None:
        paths += [
            os.path.normpath(os.path.join(plan.cwd, p))
            for p in cache_mapping_paths(plan.train_args, draft_config or plan.draft_config)
        ]
    if plan.data.source == FEATURES and plan.run is not None and plan.continuation is None:
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


def write_outputs(plan: Plan, decision: Decision, counted: Optional[Counted]) -> Dict[str, Any]:
    """Rank 0: choose and write (unless reused), then hand over; fingerprint.json goes last."""

    out = plan.output_dir
    fingerprint_path = os.path.join(out, FINGERPRINT_FILE)
    mapping = os.path.join(out, MAPPING_FILE)
    if decision.action == "reuse":
        with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as handle:
            k = int(json.load(handle)["optimal_draft_vocab_size"])
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fingerprint_path)  # outputs are about to change: never pair old fingerprint with new files
        if counted is None:
            counted = obtain_counts(
                None, counts_path=os.path.join(out, COUNTS_FILE), flag=f"the stored counts in {out}"
            )
        if plan.continuation is not None and not plan.remap:
            k = _write_continuing(plan, counted)
        else:
            k = _choose_and_write(plan, counted)
    remapped = _remap(plan, mapping) if plan.remap else None
    handed = _hand_over(plan, k, mapping, remapped)
    sums = {name: sha256_file(os.path.join(out, name)) for name in (MAPPING_FILE, COUNTS_FILE, SUMMARY_FILE)}
    with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as handle:
        fingerprint = json.load(handle).get("mapping_fingerprint")
    result = {"draft_vocab_size": k, "sha256": sums, "mapping_fingerprint": fingerprint}
    stored = dict(decision.fingerprint, result=result)
    if read_fingerprint(out) != json.loads(json_text(stored)):
        atomic_write(fingerprint_path, json_text(stored))
    return {
        "k": k,
        "mapping": mapping,
        "mapping_sha256": sums[MAPPING_FILE],
        "action": decision.action,
        "reason": decision.reason,
        "warm_start": remapped.output if remapped is not None else None,
        **handed,
    }


def _choose_and_write(plan: Plan, counted: Counted) -> int:
    """A fresh choice (also the one --remap moves the draft onto), written by optimize; returns k."""
    count = plan.data.count_settings() if plan.data.source == CONVERSATIONS else CountSettings()
    to_file = plan.patch_draft_config and plan.derived_config is None and not plan.remap
    result = optimize(
        count,
        plan.search,
        OutputSettings(
            output_dir=plan.output_dir,
            config_path=plan.draft_config if to_file else None,
            backup=plan.backup,
            lock_timeout=plan.lock_timeout,
        ),
        precounted=counted,
        draft_config=None if to_file else plan.draft_config_dict(),
    )
    return result.k


def _write_continuing(plan: Plan, counted: Counted) -> int:
    """The outputs of a continuing run: the checkpoint's own mapping, its coverage and the fresh choice."""
    cont = plan.continuation
    count = plan.data.count_settings() if plan.data.source == CONVERSATIONS else CountSettings()
    output = OutputSettings(output_dir=plan.output_dir, backup=plan.backup, lock_timeout=plan.lock_timeout)
    serving = ServingSettings()
    check_settings(count, plan.search, output, serving, counting=False)
    inputs = gather_inputs(
        count, plan.search, output, serving, precounted=counted, draft_config=plan.draft_config_dict()
    )
    choice = choose(inputs, plan.search, serving, cache_dir=plan.cache_dir)
    mapping = os.path.join(plan.output_dir, MAPPING_FILE)
    keep = []
    if cont.kind == RESUME and plan.run.resolved_vocab_mapping_path == mapping:
        # SpecForge refuses to resume once this file is rewritten (it records its size and mtime).
        if not configured_mapping_equals(plan.run, cont):
            raise InputError(
                f"model.vocab_mapping_path {mapping} is not the mapping of {cont.describe()}, and prepare would have "
                "to rewrite it, which makes SpecForge refuse the resume. Resume restores the checkpoint's own d2t/t2d "
                "anyway; pass --output-dir to write this report elsewhere."
            )
        keep.append(mapping)
    settings = {"counting": dict(inputs.metadata), "output_dir": plan.output_dir, "draft_config": plan.draft_config}
    payloads = continuing_payloads(
        cont,
        inputs,
        choice,
        output_dir=plan.output_dir,
        latency_model=serving.latency.latency_model,
        settings=settings,
        keep=keep,
    )
    commit_outputs(payloads, output_dir=plan.output_dir, lock_timeout=plan.lock_timeout)
    return cont.k


def _remap(plan: Plan, mapping: str) -> RemapResult:
    """--remap: the warm-start checkpoint on the fresh mapping in ``mapping``, next to the output directory."""
    cont = plan.continuation
    d2t, _t2d = load_mapping(mapping)
    text = None
    if plan.derived_config is None:
        with open(plan.draft_config, encoding="utf-8") as handle:
            text = handle.read()
    draft = open_draft(os.path.join(cont.checkpoint, STATE_FILE) if cont.runtime else cont.checkpoint)
    target = plan.run.target_model_path if plan.run is not None else plan.train_args.target_model_path
    return write_warm_start(
        draft,
        cont.kept,
        kept_ids_from_d2t(d2t),
        output=plan.output_dir.rstrip("/\\") + WARM_START_SUFFIX,
        config=plan.draft_config_dict(),
        config_text=text,
        vocab_size=cont.vocab_size,
        target_model_path=resolve_path(target, cwd=plan.cwd),
        lm_head_key=plan.run.lm_head_key if plan.run is not None else DEFAULT_LM_HEAD_KEY,
        source=cont.describe(),
    )


def _hand_over(plan: Plan, k: int, mapping: str, remapped: Optional[RemapResult]) -> Dict[str, Any]:
    """Put the mapping (and the draft config, and the warm start) where SpecForge looks; every call, idempotent."""
    notes: List[str] = []
    cont = plan.continuation
    keep = plan.keep_draft_vocab_size and cont is None  # a continuing run's k is the checkpoint's, whatever the flag
    if plan.patch_draft_config and plan.derived_config is None and not plan.remap and not keep:
        patch_draft_vocab_size(plan.draft_config, k, backup=plan.backup)
    if plan.derived_config is not None and remapped is None and (cont is None or cont.kind != RESUME):
        derived = json_text(dict(plan.derived_config, draft_vocab_size=k))
        if _write_if_different(plan.draft_config, derived.encode("utf-8")):
            logger.info("Wrote the draft config derived from the target to %s.", plan.draft_config)
    warm_config = os.path.join(remapped.output, CONFIG_NAME) if remapped is not None else None
    copies = cache_copy_paths(plan, k, warm_config)
    with open(mapping, "rb") as handle:
        payload = handle.read()
    for path in copies:
        _write_if_different(path, payload)
    run_config, fields = None, {}
    if plan.run is not None and cont is not None and cont.kind == RESUME:
        same = configured_mapping_equals(plan.run, cont)
        state = {True: "holds this same mapping", False: "holds ANOTHER mapping (ignored on resume)", None: "is unset"}
        notes.append(
            "training.resume_from: SpecForge restores the checkpoint's own d2t/t2d, so the run config and the files "
            f"it names are left unchanged (SpecForge refuses a resume once they change); model.vocab_mapping_path "
            f"{state[same]}"
        )
    elif plan.run is not None:
        if cont is not None and remapped is None and configured_mapping_equals(plan.run, cont) is False:
            notes.append(
                f"model.vocab_mapping_path named another mapping ({plan.run.vocab_mapping_path}); SpecForge would have "
                "copied it over the trained rows. It now names the checkpoint's own."
            )
        if plan.derived_config is not None and remapped is None:
            fields["draft_model_config"] = plan.draft_config
        if remapped is not None:
            fields["draft_checkpoint_path"] = remapped.output
            fields["draft_model_config"] = warm_config
        fields["vocab_mapping_path"] = mapping
        run_config = set_model_fields(
            plan.run.config_path, fields, output_path=plan.output_config, backup=plan.backup
        ).path
    if remapped is not None:
        notes.append(remapped.summary_line())
        if plan.train_args is not None:
            notes.append(f"continue with --ckpt-dir {remapped.output} (scripts/train_eagle3.py passes it on itself)")
    return {"copies": copies, "run_config": run_config, "run_fields": list(fields), "notes": notes}


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
        draft_config=os.path.join(info["warm_start"], CONFIG_NAME) if info["warm_start"] else plan.draft_config,
        cache_paths=list(info["copies"]),
        run_config=info["run_config"],
        overrides=tuple(plan.overrides),
        source=f"{plan.data.field} {plan.data.path} ({SOURCE_NAMES[plan.data.source]})",
        rank=rank,
        run_fields=list(info["run_fields"]),
        warm_start=info["warm_start"],
        notes=list(info["notes"]),
    )
