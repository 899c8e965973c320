"""Imported once by the forkserver that starts counting workers (see parallel.py), so each worker
starts with transformers and the counting code already imported (a few seconds saved per start)."""
from transformers import AutoTokenizer  # noqa: F401

from . import parallel, tokenizer  # noqa: F401
