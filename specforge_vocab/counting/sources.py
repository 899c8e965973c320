"""The one door to token counts: a counts file, or counting (through the counts cache, across ranks).

``optimize`` (pipeline.py), ``prepare`` (specforge/prepare.py) and ``trim`` (drafts/trim.py) all
get their counts here, so a counts file is validated, a cache hit is reused and a count is
spread over the ranks in one way only.

>>> counted = obtain_counts(None, counts_path=None)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np

from specforge_vocab.counting.cache import COUNTS_SUBDIR, cached_count
from specforge_vocab.counting.count import CountResult, count_dataset
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.counting.distributed import count_dataset_distributed
from specforge_vocab.counting.engine import CountSettings, Tally

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Counted:
    """Counts [V] with the metadata a counts file stores; ``result`` when they were counted just now
    (or taken from the cache), None when read from a counts file."""

    counts: np.ndarray
    metadata: Dict[str, str]
    result: Optional[CountResult] = None
    cache_hit: bool = False

    @property
    def tallies(self) -> Sequence[Tally]:
        return self.result.tallies if self.result is not None else ()


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
) -> Counted:
    """Counts from ``counts_path`` (a file of `specforge-vocab count`), else counted from ``settings``.

    ``cache_dir`` reuses (and stores) counts by a fingerprint of the data, tokenizer and options
    (None: always count); ``distributed`` splits the counting over the ranks of the process group
    and sums it; ``tallies`` are filled in the same pass (a cache hit cannot fill them, so it is
    not used then).
    """
    if counts_path is not None:
        counts, metadata = load_counts(counts_path, flag=flag)
        return Counted(counts, metadata)
    if settings is None:
        raise ValueError("obtain_counts needs count settings or a counts file")
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
