#!/usr/bin/env python
"""SpecForge's scripts/train_eagle3.py with the specforge-vocab pre-step in front.

    torchrun --nproc-per-node 8 scripts/train_eagle3.py \
        --specforge-script /path/to/SpecForge/scripts/train_eagle3.py \
        --target-model-path ./Llama-3.1-8B-Instruct --draft-model-config configs/llama3-8B-eagle3.json \
        --train-data-path train.jsonl --chat-template llama3 --output-dir outputs/llama3-8b-eagle3 ...

It counts --train-data-path exactly as training masks it, chooses draft_vocab_size, patches the
draft config, and writes the d2t/t2d mapping where train_eagle3.py looks for it
(<cache-dir>/vocab_mapping/<md5 key>.pt, both key versions); then it runs SpecForge's own
train_eagle3.py in this process with every other flag unchanged. Its own flags:
--specforge-script, --keep-draft-vocab-size, --vocab-force, --vocab-output-dir, --vocab-no-backup
and the search flags with a --vocab- prefix (--vocab-n-calls, --vocab-coverage-weight, ...);
see --help. With --resume or --ckpt-dir the draft weights fix draft_vocab_size, so it is kept.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specforge_vocab.cli.training import train_eagle3_main

if __name__ == "__main__":
    sys.exit(train_eagle3_main(sys.argv[1:]))
