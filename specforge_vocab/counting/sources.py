"""The one door to token counts: a counts file, or counting (through the counts cache, across ranks).

``optimize`` (pipeline.py), ``prepare`` (specforge/prepare.py), ``trim`` (drafts/trim.py) and the
``count`` command all get their counts here, so a counts file is validated, a cache hit is reused
and a count is spread over the ranks in one way only. The three data sources SpecForge trains
from are counted here: raw conversations (``--dataset-path``, also a prompts file that holds
conversations), pre-tokenized prompts (``--prompts-path``) and offline features
(``--hidden-states-path``, with ``--count-source target-argmax`` the target's own predictions;
counting/tokenized.py).

>>> counted = obtain_counts(None, counts_path=None)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from specforge_vocab.counting.cache import COUNTS_SUBDIR, cached_count
from specforge_vocab.counting.count import CountResult, count_dataset
from specforge_vocab.counting.counts_file import read_counts_file
from specforge_vocab.counting.distributed import count_dataset_distributed
from specforge_vocab.counting.engine import CountSettings, Tally
from specforge_vocab.counting.tokenized import count_tokenized
from specforge_vocab.counting.tokenized import summary_lines as tokenized_summary_lines

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Counted:
    """Counts [V] with the metadata a counts file stores; ``result`` when raw conversations were
    counted just now (or taken from the cache), None otherwise. ``by_source``: every count source
    counted ("tokens", "target-argmax"), for the coverage report; empty when only ``counts`` is known."""

    counts: np.ndarray
    metadata: Dict[str, str]
    result: Optional[CountResult] = None
    cache_hit: bool = False
    by_source: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def tallies(self) -> Sequence[Tally]:
        return self.result.tallies if self.result is not None else ()

    def summary_lines(self) -> List[str]:
        if self.result is not None:
            return self.result.summary_lines()
        if self.metadata.get("count_source"):
            return tokenized_summary_lines(self.metadata)
        return []


def as_conversations(settings: CountSettings) -> CountSettings:
    """A prompts file that holds raw conversations is counted as SpecForge reads it: like --dataset-path."""
    if settings.prompts_path and settings.reads_conversations:
        return dataclasses.replace(settings, dataset_paths=[settings.prompts_path], prompts_path=None)
    return settings


def obtain_counts(
    settings: Optional[CountSettings],
    *,
    counts_path: Optional[str] = None,
    cache_dir: Optional[str] = None,
    force: bool = False,
    distributed: bool = False,
    progress: bool = False,
    tallies: Sequence[Tally] = (),
    flag: str = "--counts",
    field: Optional[str] = None,
) -> Counted:
    """Counts from ``counts_path`` (a file of `specforge-vocab count`), else counted from ``settings``.

    ``cache_dir`` reuses (and stores) counts by a fingerprint of the data, tokenizer and options
    (None: always count; prompts and features by their files' paths, sizes and mtimes, and the LM
    head's file, as SpecForge identifies features); ``distributed`` splits the counting over the ranks
    of the process group and sums it; ``tallies`` are filled in the same pass (a cache hit cannot
    fill them, so it is not used then; prompts and features have no tallies). ``field`` names a
    prompts or features source in messages (e.g. data.hidden_states_path; default: its flag).
    """
    if counts_path is not None:
        counts, metadata, companions = read_counts_file(counts_path, flag=flag)
        return Counted(counts, metadata, by_source=companions)
    if settings is None:
        raise ValueError("obtain_counts needs count settings or a counts file")
    settings = as_conversations(settings)
    if not settings.reads_conversations:
        if tallies:
            raise ValueError("held-out and bootstrap tallies need raw conversation records")
        counted = count_tokenized(
            settings, distributed=distributed, progress=progress, field=field, cache_dir=cache_dir, force=force
        )
        if counted.cache_hit:  # said in the summary (pipeline.OptimizeResult), not as a warning
            logger.info("Reusing the counts cached in %s.", os.path.join(cache_dir, COUNTS_SUBDIR))
        return Counted(counted.counts, counted.metadata, by_source=counted.by_source, cache_hit=counted.cache_hit)
    if distributed:
        result = count_dataset_distributed(
            settings, progress=progress, tallies=tallies, cache_dir=cache_dir, force=force
        )
        return Counted(result.counts, result.metadata(), result)
    if cache_dir is None:
        result = count_dataset(settings, progress=progress, tallies=tallies)
        return Counted(result.counts, result.metadata(), result)
    result, hit = cached_count(settings, cache_dir=cache_dir, progress=progress, force=force, tallies=tallies)
    if hit:  # expected on a rerun, so not a warning; the summary says where the counts came from
        logger.info("Reusing the counts cached in %s.", os.path.join(cache_dir, COUNTS_SUBDIR))
    return Counted(result.counts, result.metadata(), result, cache_hit=hit)
