"""The one path: read data -> render and mask -> count -> cost model -> search -> mapping -> outputs.

The CLI, the scripts and the training hook only build settings and call these functions.
"""
from __future__ import annotations

import logging
from typing import Optional

from .counting import CountResult, CountSettings, count_dataset, save_counts

logger = logging.getLogger(__name__)


def count_to_file(settings: CountSettings, *, output: str, progress: bool = False) -> CountResult:
    """Count ``settings`` and write the counts file (safetensors, tensor 'counts' + metadata)."""
    settings.validate()
    result = count_dataset(settings, progress=progress)
    save_counts(output, result.counts, result.metadata())
    logger.info("wrote %s", output)
    return result
