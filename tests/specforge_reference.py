"""A plain, obviously-correct implementation of SpecForge's per-record tokens and loss mask, for every
parser type (docs/SPECFORGE.md sections 3 and 3b; SpecForge a6b6b023, specforge/data/parse.py and
preprocessing.py).

Written from the documented rule, independently of specforge_vocab.counting: it renders with its own
code (the tokenizer's chat template with SpecForge's arguments, or the fallback; harmony's own
blocks), encodes the whole text with the Hugging Face call SpecForge uses, and finds each span's token
range by re-encoding the prefixes (general / thinking / glm, quadratic like SpecForge) or by the
offsets-containment test of one encoding with offsets (openai-harmony). Where SpecForge raises, this
raises too (no attempt to name the problem). The fast path must give the same ids and masks.

The target's argmax at the trained positions (docs/SPECFORGE.md section 7): the steps of
SpecForge's offline path one by one (normalize_offline_sample, TargetHead.preprocess, the full
logits, argmax), with the full [L, V] logits of every sample, independently of
specforge_vocab.counting.target_counts.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

TEMPLATES_JSON = Path(__file__).resolve().parents[1] / "specforge_vocab" / "resources" / "templates.json"

GENERAL_KEYS = ("role", "content", "tool_calls")
THINKING_KEYS = ("role", "content", "tool_calls", "reasoning_content", "name", "tool_call_id")
PARSE_PARAMS = ("self", "conversation", "max_length", "preformatted", "train_only_last_turn", "tool")
HARMONY_SPAN = r"<\|start\|>assistant([\s\S]*?)(?=<\|start\|>user<\|message\|>|$)"
HARMONY_EFFORT_BLOCK = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: {}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


def load_template(name):
    """SpecForge's template ``name`` as a dict of its eight fields (a dict passes through)."""
    if isinstance(name, dict):
        return dict(name)
    return dict(json.loads(TEMPLATES_JSON.read_text(encoding="utf-8"))["templates"][name])


# ---------------------------------------------------------------- records -> text


def tools_of(record):
    value = record.get("tools")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return []
    return value if isinstance(value, list) else []


def columns_of(record, all_columns=()):
    """Every column but conversations, id and tools; None for the data's other columns it lacks."""
    columns = {k: v for k, v in record.items() if k not in ("conversations", "id", "tools")}
    for name in all_columns:
        columns.setdefault(name, None)
    return columns


def normalize(message):
    role = message.get("role", message.get("from", ""))
    content = message.get("content") or message.get("value") or ""
    if role in ("human", "user"):
        role = "user"
    elif role in ("gpt", "assistant"):
        role = "assistant"
    out = {**message, "role": role, "content": content}
    out.pop("from", None)
    out.pop("value", None)
    return out


def sanitize(message, keys):
    out = {k: v for k, v in message.items() if k in keys}
    if "tool_calls" not in out:
        return out
    calls = out["tool_calls"]
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            out.pop("tool_calls")
            return out
    if isinstance(calls, list):
        clean_calls = []
        for call in calls:
            if not isinstance(call, dict):
                continue
            clean = {"id": call.get("id", ""), "type": call.get("type", "function")}
            function = call.get("function", {})
            if isinstance(function, dict):
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        arguments = {}
                clean["function"] = {"name": function.get("name", ""), "arguments": arguments}
            clean_calls.append(clean)
        out["tool_calls"] = clean_calls
    return out


def messages_for(conversation, template):
    keys = THINKING_KEYS if template.get("parser_type") == "thinking" else GENERAL_KEYS
    conv = [normalize(m) for m in conversation]
    messages = []
    if conv[0]["role"] == "system":
        messages.append({"role": "system", "content": conv[0]["content"]})
        conv = conv[1:]
    elif template.get("system_prompt"):
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
        messages.append(sanitize(m, keys))
    return messages


def fallback(messages, template, tokenizer):
    text = tokenizer.bos_token or ""
    for m in messages:
        if m["role"] == "system":
            text += f"{m['content']}"
        elif m["role"] == "user":
            text += f"{template.get('user_header') or ''}{m['content']}"
        elif m["role"] == "assistant":
            text += f"{template.get('assistant_header') or ''}{m['content']}{template.get('end_of_turn_token') or ''}"
    return text


def harmony_render(conversation):
    text = ""
    for j, m in enumerate(conversation):
        if j == 0 and m["role"] != "system" and m["role"] != "assistant_reasoning_effort":
            text = HARMONY_EFFORT_BLOCK.format("low")
        role, content = m["role"], m["content"]
        if role == "system":
            text = f"<|start|>system<|message|>{content}<|end|>"
        elif role == "assistant_reasoning_effort":
            text = HARMONY_EFFORT_BLOCK.format(content.lower())
        elif role == "user":
            text += f"<|start|>user<|message|>{content}<|end|>"
        elif role in ("assistant_analysis", "assistant_commentary", "assistant_final"):
            text += f"<|start|>assistant<|channel|>{role[len('assistant_') :]}<|message|>{content}<|end|>"
        else:
            raise ValueError(f"Unknown role: {role}")
    return text


def render(record, template, tokenizer, all_columns=()):
    """The text SpecForge tokenizes for a conversation record, or None when it skips the record."""
    conversation = record.get("conversations")
    if not conversation:
        return None
    columns = columns_of(record, all_columns)
    if any(k in PARSE_PARAMS for k in columns):
        raise TypeError("a column has the name of a parse() parameter")
    if template.get("parser_type") == "openai-harmony":
        if columns:
            raise TypeError("HarmonyParser.parse() takes no extra keyword arguments")
        return harmony_render(conversation)
    messages = messages_for(conversation, template)
    own = {"tokenize": False, "add_generation_prompt": False}
    if template.get("parser_type") == "thinking":
        own["add_special_tokens"] = False
        if template.get("enable_thinking"):
            columns["enable_thinking"] = True
    elif template.get("parser_type") == "glm":
        columns.setdefault("enable_thinking", False)
    if "messages" in columns or any(k in own for k in columns):
        return fallback(messages, template, tokenizer)  # a keyword given twice: TypeError, caught
    tools = tools_of(record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tokenizer.apply_chat_template(messages, tools=tools if tools else None, **own, **columns)
    except (ValueError, TypeError):
        return fallback(messages, template, tokenizer)


# ---------------------------------------------------------------- text -> ids and mask


def span_regex(template):
    header = re.escape(f"{template.get('assistant_header')}")
    kind = template.get("assistant_pattern_type")
    if kind == "longcat":
        return header + r"([\s\S]*?(?:" + re.escape("[Round ") + r"\d+" + re.escape("] USER:") + "|$))"
    if kind == "inkling":
        stops = "|".join(re.escape(s) for s in ("<|message_user|>", "<|message_tool|>", "<|message_system|>"))
        return header + r"([\s\S]*?(?:" + stops + "|$))"
    eot = re.escape(template.get("end_of_turn_token"))  # None raises TypeError, as in SpecForge
    if kind == "glm":
        return header + r"(?:</think>)?([\s\S]*?(?:" + eot + "|$))"
    return header + r"([\s\S]*?(?:" + eot + "|$))"


def reference_mask(text, template, tokenizer, max_length, train_only_last_turn=False):
    """general / thinking / glm: regex spans, token ranges by re-encoding each prefix."""
    pattern = span_regex(template)
    ids = tokenizer(text, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)

    def n_tokens(s):
        return len(tokenizer.encode(s, add_special_tokens=False, truncation=True, max_length=max_length))

    matches = list(re.finditer(pattern, text, re.DOTALL))
    if train_only_last_turn and matches:
        matches = matches[-1:]
    for m in matches:
        for i in range(min(n_tokens(text[: m.start(1)]), len(ids)), min(n_tokens(text[: m.end(1)]), len(ids))):
            mask[i] = 1
    for token in template.get("ignore_token") or []:
        start = 0
        while (idx := text.find(token, start)) != -1:
            for i in range(min(n_tokens(text[:idx]), len(ids)), min(n_tokens(text[: idx + len(token)]), len(ids))):
                mask[i] = 0
            start = idx + len(token)
    return list(ids), mask


def harmony_mask(text, tokenizer, max_length, train_only_last_turn=False):
    """openai-harmony: token i is trained iff its offsets lie inside a span."""
    enc = tokenizer(text, return_offsets_mapping=True, max_length=max_length, truncation=True, add_special_tokens=False)
    matches = list(re.finditer(HARMONY_SPAN, text))
    if train_only_last_turn and matches:
        matches = matches[-1:]
    mask = [0] * len(enc["input_ids"])
    for m in matches:
        for i, (ts, te) in enumerate(enc["offset_mapping"]):
            if ts >= m.start(1) and te <= m.end(1):
                mask[i] = 1
    return list(enc["input_ids"]), mask


def reference_example(
    record, tokenizer, template, *, max_length=2048, train_only_last_turn=False, is_preformatted=False, all_columns=()
):
    """(input_ids, loss_mask) of one record as SpecForge builds them, or None when SpecForge skips it."""
    template = load_template(template)
    harmony = template.get("parser_type") == "openai-harmony"
    if not harmony:
        span_regex(template)  # built with the parser: a None end-of-turn fails for every record
    text = record.get("text") or None if is_preformatted else render(record, template, tokenizer, all_columns)
    if text is None:  # SpecForge skips a record whose source (conversation or text) is empty
        return None
    if harmony:
        return harmony_mask(text, tokenizer, max_length, train_only_last_turn)
    return reference_mask(text, template, tokenizer, max_length, train_only_last_turn)


def data_columns(records):
    """The columns ``datasets`` gives every record: all top-level keys of all records but the reserved ones."""
    names = []
    for record in records:
        for key in record:
            if key not in ("conversations", "id", "tools") and key not in names:
                names.append(key)
    return names


def reference_counts(
    records,
    tokenizer,
    template,
    *,
    max_length=2048,
    vocab_size=None,
    is_preformatted=False,
    train_only_last_turn=False,
):
    """Histogram of loss-masked ids over ``records`` (parsed JSON objects), SpecForge's way."""
    counts = np.zeros(vocab_size or len(tokenizer), dtype=np.int64)
    columns = () if is_preformatted else data_columns(records)
    for record in records:
        example = reference_example(
            record,
            tokenizer,
            template,
            max_length=max_length,
            train_only_last_turn=train_only_last_turn,
            is_preformatted=is_preformatted,
            all_columns=columns,
        )
        if example is None:
            continue
        for i, m in zip(*example):
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
