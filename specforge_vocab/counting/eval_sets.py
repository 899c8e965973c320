"""Counts of the evaluation sets and domains, made exactly as the training data's counts were.

An evaluation set (--eval-dataset-path) or a domain (--domain) is counted with the training data's
tokenizer, template and mask, every record once: with the counting flags when this run counts, or as a
counts file records them when it was given with --counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Dict, List

import numpy as np

from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.data import dataset_files
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.errors import SettingsError


def domains_in_pass(count: CountSettings, domain_paths: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The domains whose files are all training files, counted in the training pass (not with
    --sample-size, so a domain's counts never depend on where it is counted)."""
    if not domain_paths or count.sample_size is not None:
        return {}
    training = {os.path.realpath(f) for f in dataset_files(count.dataset_paths)}
    return {
        name: paths
        for name, paths in domain_paths.items()
        if {os.path.realpath(f) for f in dataset_files(paths, flag="--domain")} <= training
    }


def eval_count_settings(
    paths: List[str], count: CountSettings, meta: Dict[str, str], vocab_size: int, *, counting: bool
) -> CountSettings:
    """Settings to count ``paths`` as the training data was counted (every record once, no sample): with
    --counts, as the counts file records (a counting flag given with it equals that); a flag fills in what
    an older file does not record."""
    if counting:
        return replace(
            count,
            dataset_paths=list(paths),
            dataset_weights=[],
            prompts_path=None,
            hidden_states_path=None,
            count_source=CountSettings.count_source,
            target_model_path=None,
            lm_head_key=CountSettings.lm_head_key,
            device=CountSettings.device,
            sample_size=None,
            target_vocab_size=vocab_size,
        )
    missing = [key for key in ("tokenizer_path", "chat_template", "max_length") if not meta.get(key)]
    if missing and not count.tokenizer_path:
        raise SettingsError(
            [
                f"--eval-dataset-path and --domain need the tokenizer and template the counts were made with, but "
                f"the counts metadata lacks {', '.join(missing)}. Pass --tokenizer-path and "
                "--chat-template (and --max-length) with --counts."
            ]
        )
    # The template file: the one given (checked equal to the recorded fields), else the one the counts recorded.
    template_file = count.chat_template_file or meta.get("chat_template_file") or None
    if template_file and not os.path.isfile(template_file):
        raise SettingsError(
            [
                f"--eval-dataset-path and --domain are counted with the chat template the counts were made with, "
                f"read from --chat-template-file {template_file} (recorded in the counts metadata), which no longer "
                "exists. Pass --chat-template-file with that template's fields."
            ]
        )

    def recorded_flag(key: str, default: bool) -> bool:
        return bool(json.loads(meta[key])) if key in meta else default

    return CountSettings(
        dataset_paths=list(paths),
        tokenizer_path=meta.get("tokenizer_path") or count.tokenizer_path,
        chat_template=meta.get("chat_template") or count.chat_template,
        max_length=int(meta["max_length"]) if meta.get("max_length") else count.max_length,
        is_preformatted=recorded_flag("is_preformatted", count.is_preformatted),
        train_only_last_turn=recorded_flag("train_only_last_turn", count.train_only_last_turn),
        chat_template_file=template_file,
        legacy_reader=recorded_flag("legacy_reader", count.legacy_reader),
        target_vocab_size=vocab_size,
        trust_remote_code=count.trust_remote_code,
    )


def count_eval_sets(
    paths, count: CountSettings, meta: Dict[str, str], vocab_size: int, *, counting: bool
) -> Dict[str, np.ndarray]:
    """Counts of each evaluation set (same tokenizer, template and mask as the training data), by name."""
    out: Dict[str, np.ndarray] = {}
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        for suffix in (".gz", ".jsonl", ".json"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        if name in out:
            name = path
        settings = eval_count_settings([path], count, meta, vocab_size, counting=counting)
        out[name] = count_dataset(settings).counts
    return out


def count_domains(
    domain_paths: Dict[str, List[str]],
    in_pass: Dict[str, np.ndarray],
    count: CountSettings,
    meta: Dict[str, str],
    vocab_size: int,
    *,
    counting: bool,
) -> Dict[str, np.ndarray]:
    """Each domain's counts: ``in_pass`` (filled by the training pass) where it has them, else counted on
    their own with the training data's settings."""
    return {
        name: in_pass[name]
        if name in in_pass
        else count_dataset(eval_count_settings(paths, count, meta, vocab_size, counting=counting)).counts
        for name, paths in domain_paths.items()
    }
