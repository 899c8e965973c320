"""Imported once by the forkserver that starts counting workers (see workers.py), so each worker
starts with transformers and the counting code already imported (a few seconds saved per start)."""

from __future__ import annotations

from transformers import AutoTokenizer  # noqa: F401

from specforge_vocab.counting import tokenizer, workers  # noqa: F401
