"""Reuse: ``fingerprint.json`` records what the outputs of a prepare call came from, so the next
call with unchanged inputs does no work.

Two parts. *counting*: for raw conversations the counts cache's fingerprint (data files by size and
sha256, tokenizer files, template strings, max_length, mask options, V); for pre-tokenized prompts
the file's size and sha256; for offline feature files their paths, sizes and mtimes (the identity
SpecForge itself uses). *choice*: the search settings, the draft config (without
``draft_vocab_size``, which prepare writes) and, for a run that continues from a checkpoint, the
checkpoint (its weight files and mapping fingerprint). :func:`decide` compares them with the stored ones:
reuse, search the stored counts again, or count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

from specforge_vocab.counting.cache import HashMemo, counting_fingerprint, memo_for
from specforge_vocab.counting.engine import COUNTING_VERSION
from specforge_vocab.counting.features import list_feature_files
from specforge_vocab.counting.target_head import head_file_identity
from specforge_vocab.errors import short
from specforge_vocab.fileio import json_text, sha256_file
from specforge_vocab.specforge.plan import CONVERSATIONS, PRETOKENIZED, Plan
from specforge_vocab.version import __version__
from specforge_vocab.writing.outputs import COUNTS_FILE, FINGERPRINT_FILE, MAPPING_FILE, SUMMARY_FILE, recover_outputs

logger = logging.getLogger(__name__)


FINGERPRINT_FORMAT = "specforge-vocab-prepare"


FINGERPRINT_VERSION = 1


@dataclasses.dataclass
class Decision:
    action: str  # "reuse" | "search" | "count"
    reason: str
    fingerprint: Dict[str, Any]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _memo(plan: Plan):

    return memo_for(plan.cache_dir)


def counting_identity(plan: Plan, memo=None) -> Dict[str, Any]:
    """Everything that decides the counts of ``plan.data`` (see the module docstring)."""

    memo = memo if memo is not None else HashMemo(None)
    data = plan.data
    if data.source == CONVERSATIONS:
        return {"source": CONVERSATIONS, "counts": counting_fingerprint(data.count_settings(), memo=memo)}
    if data.source == PRETOKENIZED:
        files = [{"size": os.path.getsize(data.path), "sha256": memo.sha256(data.path)}]
    else:
        files = []
        for path in list_feature_files(data.path):
            stat = os.stat(path)
            files.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    identity = {
        "source": data.source,
        "counting_version": COUNTING_VERSION,
        "files": files,
        "max_length": data.max_length,
        "vocab_size": data.vocab_size,
    }
    if data.count_source != "tokens":  # the target's predictions: its LM head decides them too
        identity["count_source"] = data.count_source
        identity["target_head"] = head_file_identity(data.target_model_path, data.lm_head_key)
    return identity


def choice_identity(plan: Plan) -> Dict[str, Any]:
    """Everything besides the counts that decides k and the mapping."""

    config = plan.draft_config_dict()
    if not plan.keep_draft_vocab_size:
        config.pop("draft_vocab_size", None)  # we write it: our own patch must not look like a change

    identity = {
        "tool_version": __version__,
        "search": dataclasses.asdict(plan.search),
        "keep_draft_vocab_size": plan.keep_draft_vocab_size,
        "draft_config_sha256": hashlib.sha256(_canonical(config).encode()).hexdigest(),
    }
    if plan.continuation is not None:
        identity["continuing"] = plan.continuation.identity()
    return identity


def fingerprint(plan: Plan, memo=None) -> Dict[str, Any]:
    return {
        "format": FINGERPRINT_FORMAT,
        "version": FINGERPRINT_VERSION,
        "counting": counting_identity(plan, memo),
        "choice": choice_identity(plan),
    }


def read_fingerprint(output_dir: str) -> Optional[Dict[str, Any]]:
    """The stored fingerprint, or None when absent or unreadable (then everything is recomputed)."""
    path = os.path.join(output_dir, FINGERPRINT_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if (
        not isinstance(stored, dict)
        or stored.get("format") != FINGERPRINT_FORMAT
        or stored.get("version") != FINGERPRINT_VERSION
    ):
        return None
    return stored


def _first_difference(old: Any, new: Any, where_: str) -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{where_}.{key} {'added' if key not in old else 'removed'}"
            found = _first_difference(old[key], new[key], f"{where_}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{where_}: {len(old)} -> {len(new)} entries"
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{where_}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{where_}: {short(old, 60)} -> {short(new, 60)}"


def _outputs_intact(output_dir: str, stored: Dict[str, Any], names: Sequence[str]) -> Optional[str]:
    """None when every named output exists with its recorded sha256, else what is wrong."""
    recorded = (stored.get("result") or {}).get("sha256") or {}
    for name in names:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if recorded.get(name) != sha256_file(path):
            return f"{name} changed since it was written"
    return None


def decide(plan: Plan) -> Decision:
    """Reuse everything, search the stored counts again, or count (rank 0; reads only)."""

    recover_outputs(plan.output_dir, plan.draft_config)  # finish what an interrupted run left, if anything
    memo = _memo(plan)
    current = json.loads(json_text(fingerprint(plan, memo)))  # as it will read back from fingerprint.json
    stored = read_fingerprint(plan.output_dir)
    if plan.force:
        return Decision("count", "--force", current)
    if stored is None:
        return Decision("count", f"no earlier results in {plan.output_dir}", current)
    changed = _first_difference(stored.get("counting"), current["counting"], "counting")
    if changed:
        return Decision("count", f"input changed ({changed})", current)
    broken = _outputs_intact(plan.output_dir, stored, [COUNTS_FILE])
    if broken:
        return Decision("count", broken, current)
    memo.save()  # the data hashes are known good from here on (a count that fails saves nothing)
    changed = _first_difference(stored.get("choice"), current["choice"], "choice")
    if changed:
        return Decision("search", f"setting changed ({changed}); the data are unchanged", current)
    broken = _outputs_intact(plan.output_dir, stored, [MAPPING_FILE, SUMMARY_FILE])
    if broken:
        return Decision("search", broken, current)
    return Decision("reuse", f"same data, settings and draft config as in {plan.output_dir}", current)
