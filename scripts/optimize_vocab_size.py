#!/usr/bin/env python
"""Drop-in for the paper's optimize_vocab_size.py: the same flags and defaults (but --max-length,
which defaults to SpecForge's 2048), backed by `specforge-vocab optimize`.

    python scripts/optimize_vocab_size.py --dataset-path train.jsonl --tokenizer-path ./Llama-3.1-8B-Instruct \
        --chat-template llama3 --n-calls 100 --config-path configs/llama3-8B-eagle3.json

Besides the paper's outputs it writes the d2t/t2d mapping (vocab_mapping.pt) that the draft needs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specforge_vocab.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["optimize", *sys.argv[1:]]))
