"""Plain, obviously-correct implementations of SpecForge's rules, written in the tests.

The loss mask (docs/SPECFORGE.md section 3): written from the documented rule, independently of
specforge_vocab.counting.masking: it renders with its own code, encodes the whole text with the
Hugging Face tokenizer call SpecForge uses, and finds each span's token range by re-encoding the
prefixes (quadratic, like SpecForge). The fast path must give the same counts, id for id.

The target's argmax at the trained positions (docs/SPECFORGE.md section 7): the steps of
SpecForge's offline path one by one (normalize_offline_sample, TargetHead.preprocess, the full
logits, argmax), with the full [L, V] logits of every sample, independently of
specforge_vocab.counting.target_counts.
"""

from __future__ import annotations

import json
import re

import numpy as np

TEMPLATES_JSON = (
    __import__("pathlib").Path(__file__).resolve().parents[1] / "specforge_vocab" / "resources" / "templates.json"
)


def load_template(name):
    raw = json.loads(TEMPLATES_JSON.read_text(encoding="utf-8"))[name]
    return {
        "assistant_header": raw["assistant_header"] or "",
        "user_header": raw["user_header"] or "",
        "end_of_turn_token": raw["end_of_turn_token"] or "",
        "system_prompt": raw["system_prompt"],
        "ignore_token": raw["ignore_token"],
        "assistant_pattern_type": raw["assistant_pattern_type"],
    }


def render(conversation, template, tokenizer):
    conv = []
    for m in conversation:
        role = m.get("role", m.get("from", ""))
        content = m.get("content") or m.get("value") or ""
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        conv.append({"role": role, "content": content})
    messages = []
    if conv[0]["role"] == "system":
        messages.append({"role": "system", "content": conv[0]["content"]})
        conv = conv[1:]
    elif template["system_prompt"]:
        messages.append({"role": "system", "content": template["system_prompt"]})
    while conv and conv[0]["role"] != "user":
        conv = conv[1:]
    for j, m in enumerate(conv):
        if j > 0:
            prev = conv[j - 1]["role"]
            if m["role"] == "tool" and prev not in ("assistant", "tool"):
                break
            if m["role"] == "assistant" and prev not in ("user", "tool"):
                break
        messages.append(m)
    if tokenizer.chat_template:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, tools=[])
        except (ValueError, TypeError):
            pass
    text = tokenizer.bos_token or ""
    for m in messages:
        if m["role"] == "system":
            text += m["content"]
        elif m["role"] == "user":
            text += template["user_header"] + m["content"]
        elif m["role"] == "assistant":
            text += template["assistant_header"] + m["content"] + template["end_of_turn_token"]
    return text


def reference_mask(text, template, tokenizer, max_length, train_only_last_turn=False):
    input_ids = tokenizer(text, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"]
    mask = [0] * len(input_ids)

    def n_tokens(s):
        return len(tokenizer.encode(s, add_special_tokens=False, truncation=True, max_length=max_length))

    if template["assistant_pattern_type"] == "longcat":
        stop = re.escape("[Round ") + r"\d+" + re.escape("] USER:")
    else:
        stop = re.escape(template["end_of_turn_token"])
    pattern = re.escape(template["assistant_header"]) + r"([\s\S]*?(?:" + stop + "|$))"
    matches = list(re.finditer(pattern, text, re.DOTALL))
    if train_only_last_turn and matches:
        matches = matches[-1:]
    for m in matches:
        a = min(n_tokens(text[: m.start(1)]), len(input_ids))
        b = min(n_tokens(text[: m.end(1)]), len(input_ids))
        for i in range(a, b):
            mask[i] = 1
    for tok in template["ignore_token"] or []:
        start = 0
        while (idx := text.find(tok, start)) != -1:
            a = min(n_tokens(text[:idx]), len(input_ids))
            b = min(n_tokens(text[: idx + len(tok)]), len(input_ids))
            for i in range(a, b):
                mask[i] = 0
            start = idx + len(tok)
    return input_ids, mask


def reference_counts(
    records,
    tokenizer,
    template_name,
    *,
    max_length=2048,
    vocab_size=None,
    is_preformatted=False,
    train_only_last_turn=False,
):
    """Histogram of loss-masked ids over ``records`` (parsed JSON objects), SpecForge's way."""
    template = load_template(template_name)
    counts = np.zeros(vocab_size or len(tokenizer), dtype=np.int64)
    for rec in records:
        if is_preformatted:
            text = rec.get("text")
            if not text:
                continue
        else:
            conv = rec.get("conversations")
            if not conv:
                continue
            text = render(conv, template, tokenizer)
        ids, mask = reference_mask(text, template, tokenizer, max_length, train_only_last_turn)
        for i, m in zip(ids, mask):
            if m:
                counts[i] += 1
    return counts


# ---------------------------------------------------------------- target argmax (section 7)


def bf16_round_by_bits(values):
    """float64 -> the nearest bfloat16 (ties to even), as float64: keep 7 of the 52 fraction bits by
    adding a rounding bias to the bit pattern (normal numbers; enough for logits)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    lowest_kept = (bits >> np.uint64(45)) & np.uint64(1)
    rounded = (bits + np.uint64((1 << 44) - 1) + lowest_kept) >> np.uint64(45) << np.uint64(45)
    return rounded.view(np.float64)


def load_feature(path):
    import gzip
    import io

    import torch

    if str(path).endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            return torch.load(io.BytesIO(handle.read()), weights_only=True)
    return torch.load(path, weights_only=True)


def sample_teachers(raw, weight, max_length):
    """(target argmax per position [L'], loss mask [L']) of one feature file, step by step as SpecForge:
    normalize_offline_sample (truncate, zero the last mask entry), TargetHead.preprocess (shift the
    hidden states left by one, zero row last), full logits W . h over the vocabulary (float64 sums of the
    exact products, rounded to bfloat16), argmax (first maximum); positions with mask 0 (which the loss
    never sees) are left 0."""
    import torch

    target = raw["hidden_state"].squeeze(0)[:max_length]
    loss_mask = raw["loss_mask"].reshape(-1)[:max_length].clone()
    loss_mask[-1] = 0
    shifted = torch.cat([target[1:], torch.zeros_like(target[:1])])
    mask = loss_mask.numpy()
    argmax = np.zeros(len(mask), dtype=np.int64)
    rows = torch.from_numpy(np.flatnonzero(mask))  # the full logits of the positions the loss sees
    logits = bf16_round_by_bits((shifted[rows].double() @ weight.double().T).numpy())
    argmax[rows.numpy()] = logits.argmax(axis=1)
    return argmax, mask


def target_argmax_counts(paths, weight, max_length):
    """Counts [V] of the target's argmax at every position with a non-zero (zeroed-last) loss mask."""
    counts = np.zeros(weight.shape[0], dtype=np.int64)
    for path in paths:
        argmax, mask = sample_teachers(load_feature(path), weight, max_length)
        for t in np.flatnonzero(mask):
            counts[argmax[t]] += 1
    return counts
