"""Run by tests/counting/test_scale.py under torchrun: count with count_dataset_distributed, rank 0 writes.

Each rank writes <out-dir>/rank<r>.json ({"ok": ..., "message": ..., "seconds": ...}); exit 2 on a
user error, as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.counting.distributed import count_dataset_distributed, distributed_session
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.errors import SpecForgeVocabError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", required=True, help="CountSettings fields as JSON")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    settings = CountSettings(**json.loads(args.settings))
    rank = int(os.environ.get("RANK", "0"))
    start = time.monotonic()
    report = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    code = 0
    try:
        with distributed_session() as session:
            result = count_dataset_distributed(settings, cache_dir=args.cache_dir)
            output = os.path.join(args.out_dir, "counts.safetensors")
            if session is None:
                save_counts(output, result.counts, result.metadata())
            else:
                session.on_rank_zero(lambda: save_counts(output, result.counts, result.metadata()))
        report.update(
            ok=True,
            records_read=result.records_read,
            tokens_counted=result.tokens_counted,
            counts_sum=int(result.counts.sum()),
            metadata=result.metadata(),
        )
    except SpecForgeVocabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        report.update(ok=False, message=str(exc), kind=type(exc).__name__)
        code = exc.exit_code
    report["seconds"] = time.monotonic() - start
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
