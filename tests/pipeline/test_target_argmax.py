"""optimize on offline features with the target's LM head: k chosen on either count source, both coverages
reported (summary.json, the printed summary, the coverage plot, the counts file), and the README's worked
example (scripts/synthetic_target_features.py: real demo data, a synthetic target whose predictions differ
from the data)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from conftest import (
    LLAMA3_CONFIG,
    REPO,
    llama3_config_text,
    run_cli,
    strict_json,
    write_feature_sample,
    write_target_model,
)

from specforge_vocab.counting.counts_file import read_counts_file
from specforge_vocab.writing.mapping import kept_ids_from_d2t

V, H, K = 2000, 32, 300


def synthetic_example():
    spec = importlib.util.spec_from_file_location("synthetic", REPO / "scripts" / "synthetic_target_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def features_whose_target_disagrees(root, seed=0):
    """Data tokens from one Zipf law; the target predicts ids of another (its own preferred ids)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((V, H))
    weight = torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True)).to(torch.bfloat16)
    data_ids, target_ids = rng.permutation(V)[:800], rng.permutation(V)[:800]
    p = 1.0 / np.arange(1, 801)
    for i in range(30):
        length = 60
        ids = data_ids[rng.choice(800, size=length, p=p / p.sum())]
        predicted = target_ids[rng.choice(800, size=length, p=p / p.sum())]
        hidden = 4.0 * weight[torch.from_numpy(predicted)].float()
        mask = np.r_[np.zeros(20, np.int64), np.ones(40, np.int64)]
        write_feature_sample(root / "features" / f"data_{i}.ckpt", ids, mask, hidden.to(torch.bfloat16))
    write_target_model(root / "target", weight)
    return str(root / "features"), str(root / "target")


def optimize(tmp_path, capsys, name, *argv):
    config = tmp_path / f"{name}.json"
    config.write_text(llama3_config_text(vocab_size=V))
    out = tmp_path / name
    code, stdout, stderr = run_cli(
        ["optimize", "--config-path", str(config), "--output-dir", str(out), "--n-calls", "5", *argv], capsys
    )
    assert code == 0, stderr
    return strict_json((out / "summary.json").read_text()), out, stdout


def test_both_coverages_are_reported_and_k_is_chosen_on_the_count_source(tmp_path, capsys):
    features, target = features_whose_target_disagrees(tmp_path)
    common = ["--hidden-states-path", features, "--target-model-path", target, "--draft-vocab-size", str(K)]
    results = {}
    for source in ("tokens", "target-argmax"):
        summary, out, stdout = optimize(tmp_path, capsys, source, *common, "--count-source", source)
        counts, metadata, by_source = read_counts_file(str(out / "token_counts.safetensors"))
        assert set(by_source) == {"tokens", "target-argmax"} and np.array_equal(counts, by_source[source])
        kept = kept_ids_from_d2t(torch.load(out / "vocab_mapping.pt", weights_only=True)["d2t"])
        coverage = summary["coverage_at_draft_vocab_size"]
        by_hand = {name: by_source[name][kept].sum() / by_source[name].sum() for name in by_source}
        assert np.isclose(coverage["data_tokens"], by_hand["tokens"])
        assert np.isclose(coverage["target_argmax"], by_hand["target-argmax"])
        assert np.isclose(coverage["target_positions_dropped"], 1 - by_hand["target-argmax"])
        assert summary["count_source"] == source and summary["coverage"] == coverage["train"]
        assert "at_draft_vocab_size_target_argmax" in summary["speedup"]
        assert f"target argmax {by_hand['target-argmax']:.4%}" in stdout and "SpecForge drops" in stdout
        assert (out / "coverage_curves.png").stat().st_size > 10_000
        results[source] = (kept, coverage)
    # chosen by the target's argmax, the kept set covers more of what training keeps, and less of the data
    assert results["target-argmax"][1]["target_argmax"] > results["tokens"][1]["target_argmax"] + 0.2
    assert results["target-argmax"][1]["data_tokens"] < results["tokens"][1]["data_tokens"]


def test_counts_file_of_count_gives_the_same_choice_and_report(tmp_path, capsys):
    features, target = features_whose_target_disagrees(tmp_path, seed=1)
    argv = ["--hidden-states-path", features, "--target-model-path", target, "--count-source", "target-argmax"]
    code, _, stderr = run_cli(["count", *argv, "--output", str(tmp_path / "c.safetensors")], capsys)
    assert code == 0, stderr
    direct, _, _ = optimize(tmp_path, capsys, "direct", *argv, "--draft-vocab-size", str(K))
    reused, _, _ = optimize(
        tmp_path, capsys, "reused", "--counts", str(tmp_path / "c.safetensors"), "--draft-vocab-size", str(K)
    )
    assert direct["coverage_at_draft_vocab_size"] == reused["coverage_at_draft_vocab_size"]
    assert direct["optimal_draft_vocab_size"] == reused["optimal_draft_vocab_size"] == K


def test_holdout_needs_raw_records(tmp_path, capsys):
    features, target = features_whose_target_disagrees(tmp_path, seed=2)
    config = tmp_path / "d.json"
    config.write_text(LLAMA3_CONFIG.read_text())
    code, _, stderr = run_cli(
        ["optimize", "--hidden-states-path", features, "--target-model-path", target, "--holdout-fraction", "0.1"]
        + ["--config-path", str(config), "--output-dir", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and "--holdout-fraction and --bootstrap split raw conversation records" in stderr
    assert not (tmp_path / "o").exists() and config.read_text() == LLAMA3_CONFIG.read_text()


def test_readme_worked_example(tmp_path, capsys):
    """The README's numbers come from this run (there with the default --records 400)."""
    synthetic_example().main(["--output-dir", str(tmp_path), "--records", "60"])
    argv = ["--hidden-states-path", str(tmp_path / "features"), "--target-model-path", str(tmp_path / "target")]
    coverage = {}
    for source in ("tokens", "target-argmax"):
        out = tmp_path / source
        code, stdout, stderr = run_cli(
            ["optimize", *argv, "--count-source", source, "--draft-vocab-size", "1024", "--output-dir", str(out)],
            capsys,
        )
        assert code == 0, stderr
        coverage[source] = strict_json((out / "summary.json").read_text())["coverage_at_draft_vocab_size"]
    assert coverage["target-argmax"]["target_argmax"] > coverage["tokens"]["target_argmax"] + 0.2
    assert coverage["tokens"]["data_tokens"] > coverage["target-argmax"]["data_tokens"]


def test_target_argmax_counts_are_cached_by_file_identity(tmp_path, capsys):
    features, target = features_whose_target_disagrees(tmp_path, seed=3)
    argv = ["--hidden-states-path", features, "--target-model-path", target, "--count-source", "target-argmax"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--draft-vocab-size", str(K)]
    reused = "counts reused from the counts cache"  # the printed summary says so (a hit is no warning)
    first, _, printed = optimize(tmp_path, capsys, "first", *argv)
    assert reused not in printed
    second, _, printed = optimize(tmp_path, capsys, "second", *argv)
    assert reused in printed
    assert second["coverage_at_draft_vocab_size"] == first["coverage_at_draft_vocab_size"]
    changed = sorted((tmp_path / "features").iterdir())[0]
    sample = torch.load(changed, weights_only=True)
    sample["loss_mask"][:] = 1
    torch.save(sample, changed)  # new size and mtime: counted again
    third, _, printed = optimize(tmp_path, capsys, "third", *argv)
    assert reused not in printed
    assert third["tokens_counted"] > first["tokens_counted"]
