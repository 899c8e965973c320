"""The one path: read data -> render and mask -> count -> cost model -> search -> mapping -> outputs.

The CLI, the scripts and the training hook only build settings and call these functions.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from .cost import DraftArchitecture, draft_flops, lm_head_share
from .counting import CountResult, CountSettings, count_dataset, load_counts, save_counts
from .draft_config import check_vocab_size, patch_draft_vocab_size, read_draft_config
from .errors import SettingsError, must
from .fileio import atomic_write_many, file_lock, json_text
from .mapping import check_mapping, mapping_from_counts
from .report import full_results, render_optimization_results, summary_dict
from .search import SearchResult, SearchSettings, search

logger = logging.getLogger(__name__)


def count_to_file(settings: CountSettings, *, output: str, progress: bool = False) -> CountResult:
    """Count ``settings`` and write the counts file (safetensors, tensor 'counts' + metadata)."""
    settings.validate()
    result = count_dataset(settings, progress=progress)
    save_counts(output, result.counts, result.metadata())
    logger.info("wrote %s", output)
    return result


# ---------------------------------------------------------------- optimize


@dataclass
class OutputSettings:
    """Where results go and which files are patched; one field per flag."""

    output_dir: str = "./cache/vocab_optimization"
    config_path: Optional[str] = None
    counts_path: Optional[str] = None
    cache_dir: str = "./cache"
    no_cache: bool = False
    backup: bool = True
    lock_timeout: float = 600.0

    def problems(self) -> List[str]:
        out = []
        if self.counts_path is not None and not os.path.isfile(self.counts_path):
            out.append(f"--counts {self.counts_path} does not exist. Write one with `specforge-vocab count ... --output FILE`.")
        if self.config_path is not None and not os.path.isfile(self.config_path):
            out.append(f"--config-path {self.config_path} does not exist. Point it at the draft model config JSON.")
        if not isinstance(self.lock_timeout, (int, float)) or self.lock_timeout < 0:
            out.append(must("--lock-timeout", "a number of seconds >= 0", self.lock_timeout))
        return out


@dataclass
class OptimizeResult:
    """Everything `optimize` decided and wrote."""

    search: SearchResult
    arch: DraftArchitecture
    counts: np.ndarray
    summary: Dict[str, object]
    files: Dict[str, str]
    config_backup: Optional[str] = None
    count_result: Optional[CountResult] = None

    @property
    def k(self) -> int:
        return self.search.k

    def summary_lines(self) -> List[str]:
        s, arch, V = self.search, self.arch, self.search.vocab_size
        full, draft = draft_flops(arch, V), draft_flops(arch, s.k)
        lines = list(self.count_result.summary_lines()) if self.count_result is not None else []
        lines += [
            f"draft_vocab_size: {s.k:,} of {V:,} ({s.method} pick)  coverage {s.pick.coverage:.4%}  "
            f"utility {s.pick.utility:.6f}",
        ]
        if s.exact is not None and s.tpe is not None:
            lines.append(f"TPE pick {s.tpe.pick.k:,} (utility {s.tpe.pick.utility:.6f}) vs exact optimum "
                         f"{s.exact.pick.k:,} (utility {s.exact.pick.utility:.6f}); gap {s.utility_gap:.2e}")
        lines.append(f"draft FLOPs per token: {full / 1e6:,.1f} M at V -> {draft / 1e6:,.1f} M at k "
                     f"({1 - draft / full:.1%} less; LM head is {lm_head_share(arch):.1%} of draft FLOPs at V)")
        lines.append("wrote: " + ", ".join(self.files.values()))
        if self.config_backup:
            lines.append(f"backup of the original config: {self.config_backup}")
        return lines


def _mapping_payloads(d2t, t2d, metadata: Dict[str, str]) -> Tuple[bytes, bytes]:
    import io

    import torch
    from safetensors.torch import save

    buffer = io.BytesIO()
    torch.save({"d2t": d2t, "t2d": t2d}, buffer)
    return buffer.getvalue(), save({"d2t": d2t.contiguous(), "t2d": t2d.contiguous()}, metadata=metadata)


def resolve_counts(count: CountSettings, output: OutputSettings, *, vocab_size: Optional[int],
                   progress: bool = False) -> Tuple[np.ndarray, Optional[CountResult], Dict[str, str]]:
    """Counts from --counts, else counted (V from the draft config when it has one)."""
    if output.counts_path is not None:
        counts, metadata = load_counts(output.counts_path)
        return counts, None, metadata
    if count.target_vocab_size is None and vocab_size is not None:
        count = replace(count, target_vocab_size=vocab_size)
    result = count_dataset(count, progress=progress)
    return result.counts, result, result.metadata()


def optimize(count: CountSettings, search_settings: SearchSettings, output: OutputSettings, *,
             progress: bool = False, precounted: Optional[Tuple[np.ndarray, Dict[str, str]]] = None) -> OptimizeResult:
    """Count (or load counts), choose k, write summary/results/plot/counts/mapping, patch the config.

    ``precounted`` = (counts, metadata) skips counting (used by the training hook's other readers).
    """
    problems = output.problems() + search_settings.problems()
    if output.counts_path is None and precounted is None:
        problems = count.problems() + problems
    if problems:
        raise SettingsError(problems)
    config = read_draft_config(output.config_path) if output.config_path else None
    config_v = config.get("vocab_size") if config else None
    if precounted is not None:
        (counts, counts_meta), count_result = precounted, None
    else:
        counts, count_result, counts_meta = resolve_counts(count, output, vocab_size=config_v, progress=progress)
    V = int(counts.shape[0])
    if config is not None:
        tokenizer_length = count_result.tokenizer_length if count_result else _int_or_none(counts_meta.get("tokenizer_length"))
        check_vocab_size(config, source=output.config_path, tokenizer_length=tokenizer_length, counts_length=V)
        arch = DraftArchitecture.from_config(config, source=output.config_path)
    else:
        arch = DraftArchitecture.paper(4096, 14336, 32, 8, V)
        logger.warning("No --config-path: using the paper's Llama-3-8B draft shapes for the FLOPs model.")
    result = search(counts, arch, search_settings)
    d2t, t2d = mapping_from_counts(counts, result.k)
    check_mapping(d2t, t2d, draft_vocab_size=result.k, vocab_size=V, source="the new mapping")

    extra = {"counting": {k: v for k, v in counts_meta.items()}, "output_dir": output.output_dir,
             "config_path": output.config_path, "counts_path": output.counts_path}
    tokens = int(counts.sum())
    summary = summary_dict(result, arch, tokens_counted=tokens, unique_tokens=int(np.count_nonzero(counts)),
                           settings=extra)
    from safetensors.numpy import save as save_numpy

    mapping_meta = {"draft_vocab_size": str(result.k), "vocab_size": str(V), "format": "specforge-vocab-mapping"}
    pt_bytes, st_bytes = _mapping_payloads(d2t, t2d, mapping_meta)
    d = output.output_dir
    files = {
        "summary": os.path.join(d, "summary.json"),
        "full_results": os.path.join(d, "full_results.json"),
        "plot": os.path.join(d, "optimization_results.png"),
        "counts": os.path.join(d, "token_counts.safetensors"),
        "mapping_pt": os.path.join(d, "vocab_mapping.pt"),
        "mapping_safetensors": os.path.join(d, "vocab_mapping.safetensors"),
    }
    payloads = {
        files["full_results"]: json_text(full_results(result)),
        files["plot"]: render_optimization_results(result),
        files["counts"]: save_numpy({"counts": np.ascontiguousarray(counts)}, metadata=counts_meta),
        files["mapping_pt"]: pt_bytes,
        files["mapping_safetensors"]: st_bytes,
        files["summary"]: json_text(summary),  # last: its presence means the set is complete
    }
    backup = None
    with file_lock(os.path.abspath(d), timeout=output.lock_timeout):
        atomic_write_many(payloads)
        if output.config_path:
            backup = patch_draft_vocab_size(output.config_path, result.k, backup=output.backup)
            files["config"] = output.config_path
    return OptimizeResult(result, arch, counts, summary, files, backup, count_result)


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
