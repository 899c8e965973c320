"""Reading draft configs, patching draft_vocab_size byte-exactly, and vocab_size checks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import CONFIGS, SHIPPED_CONFIGS, shipped_config

from specforge_vocab.errors import InputError
from specforge_vocab.writing.draft_config import (
    check_vocab_size,
    patch_draft_vocab_size,
    patched_text,
    read_draft_config,
)

VALUE = re.compile(rb'("draft_vocab_size"\s*:\s*)(\d+)')


def copy_config(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    dst.write_bytes((CONFIGS / name).read_bytes())
    return dst


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_config_reads(name):
    config = read_draft_config(str(CONFIGS / name))
    assert config["draft_vocab_size"] == 32000
    assert config["vocab_size"] > config["draft_vocab_size"]


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_patch_changes_only_the_value_and_keeps_a_backup(name, tmp_path):
    path = copy_config(name, tmp_path)
    original = path.read_bytes()
    os.chmod(path, 0o640)
    backup = patch_draft_vocab_size(str(path), 13264)
    new = path.read_bytes()

    # Independent expectation: the single "draft_vocab_size": <digits> occurrence, digits replaced.
    assert len(VALUE.findall(original)) == 1
    assert new == VALUE.sub(rb"\g<1>13264", original)
    assert backup == str(path) + ".bak"
    assert Path(backup).read_bytes() == original
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert json.loads(new) == {**json.loads(original), "draft_vocab_size": 13264}
    assert list(json.loads(new)) == list(json.loads(original))  # key order kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name + ".bak"])

    # Patching back restores the original bytes.
    patch_draft_vocab_size(str(path), 32000, backup=False)
    assert path.read_bytes() == original


@pytest.mark.parametrize("name", [n for n in SHIPPED_CONFIGS if b'"vocab_size"' in (CONFIGS / n).read_bytes()])
def test_absent_key_is_added_after_vocab_size_in_the_files_style(name, tmp_path):
    original = (CONFIGS / name).read_bytes()
    text = original.decode()
    # Remove the draft_vocab_size member (with the separator before it).
    stripped = re.sub(r',(\s*)"draft_vocab_size"\s*:\s*\d+', "", text, count=1)
    assert "draft_vocab_size" not in stripped
    path = tmp_path / name
    path.write_text(stripped, encoding="utf-8", newline="")
    patch_draft_vocab_size(str(path), 32000)
    patched = path.read_text(encoding="utf-8")
    config = json.loads(patched)
    keys = list(config)
    assert keys.index("draft_vocab_size") == keys.index("vocab_size") + 1
    if re.search(r'"vocab_size"\s*:\s*\d+\s*,?\s*"draft_vocab_size"', text):
        # In the shipped files draft_vocab_size follows vocab_size: the exact original comes back.
        assert patched.encode() == original
    else:
        line = next(l for l in patched.splitlines() if '"draft_vocab_size"' in l)
        vocab_line = next(l for l in patched.splitlines() if '"vocab_size"' in l)
        assert line[: len(line) - len(line.lstrip())] == vocab_line[: len(vocab_line) - len(vocab_line.lstrip())]


def test_compact_and_crlf_layouts_kept():
    assert patched_text('{"vocab_size":5,"x":[1,2]}', 3) == '{"vocab_size":5,"draft_vocab_size":3,"x":[1,2]}'
    crlf = '{\r\n\t"vocab_size" : 10,\r\n\t"draft_vocab_size" : 7\r\n}\r\n'
    assert patched_text(crlf, 4) == crlf.replace(": 7", ": 4")
    assert patched_text("{}", 3) == '{"draft_vocab_size": 3}'


def test_nested_draft_vocab_size_is_not_touched():
    text = '{\n  "sub": {"draft_vocab_size": 1},\n  "vocab_size": 100,\n  "draft_vocab_size": 20\n}\n'
    out = patched_text(text, 30)
    assert json.loads(out) == {"sub": {"draft_vocab_size": 1}, "vocab_size": 100, "draft_vocab_size": 30}
    assert out == text.replace('"draft_vocab_size": 20', '"draft_vocab_size": 30')


def test_tricky_strings_and_numbers_survive():
    text = (
        '{"a": "x\\"draft_vocab_size\\": 9", "f": 1.50e+3, "u": "\\u00e9", "vocab_size": 100, "draft_vocab_size": null}'
    )
    out = patched_text(text, 42)
    assert out == text.replace('"draft_vocab_size": null', '"draft_vocab_size": 42')


def test_utf8_bom_kept(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"vocab_size": 10, "draft_vocab_size": 5}')
    assert read_draft_config(str(path), required=("vocab_size",))["vocab_size"] == 10
    patch_draft_vocab_size(str(path), 6)
    assert path.read_bytes() == b'\xef\xbb\xbf{"vocab_size": 10, "draft_vocab_size": 6}'


def test_same_value_writes_nothing(tmp_path):
    path = copy_config("llama3-8B-eagle3.json", tmp_path)
    before = os.stat(path).st_mtime_ns
    assert patch_draft_vocab_size(str(path), 32000) is None
    assert os.stat(path).st_mtime_ns == before
    assert not (tmp_path / "llama3-8B-eagle3.json.bak").exists()


def test_patch_refuses_k_above_vocab_size(tmp_path):
    path = copy_config("llama3-8B-eagle3.json", tmp_path)
    original = path.read_bytes()
    with pytest.raises(InputError, match=r"at most vocab_size \(128256\), but got 200000"):
        patch_draft_vocab_size(str(path), 200000)
    with pytest.raises(InputError, match="positive integer"):
        patch_draft_vocab_size(str(path), 0)
    assert path.read_bytes() == original


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="missing.json does not exist"):
        read_draft_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "vocab_size": 10,\n  "hidden_size": ,\n}\n')
    with pytest.raises(InputError, match=r"bad.json, line 3, column 18: the draft config is not valid JSON"):
        read_draft_config(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(InputError, match="must be a JSON object"):
        read_draft_config(str(listed))
    partial = tmp_path / "partial.json"
    partial.write_text('{"vocab_size": 10, "hidden_size": 8}')
    with pytest.raises(InputError, match="'intermediate_size', 'num_attention_heads', 'num_key_value_heads'"):
        read_draft_config(str(partial))
    typed = tmp_path / "typed.json"
    cfg = shipped_config(vocab_size="128256")
    typed.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="field 'vocab_size' must be a positive integer, but got '128256'"):
        read_draft_config(str(typed))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(InputError, match="UTF-8"):
        read_draft_config(str(latin))


def test_check_vocab_size_counts_mismatch():
    config = read_draft_config(str(CONFIGS / "llama3-8B-eagle3.json"))
    assert check_vocab_size(config, source="c.json", counts_length=128256) == 128256
    with pytest.raises(InputError) as info:
        check_vocab_size(config, source="c.json", counts_length=151936)
    text = str(info.value)
    assert "128256" in text and "151936" in text and "--target-vocab-size" in text and text.startswith("c.json")


def test_check_vocab_size_with_real_tokenizers(llama3_dir, deepseek_dir):
    from transformers import AutoTokenizer

    llama3 = read_draft_config(str(CONFIGS / "llama3-8B-eagle3.json"))
    deepseek = read_draft_config(str(CONFIGS / "deepseek-v3-671b-eagle3.json"))
    llama3_len = len(AutoTokenizer.from_pretrained(llama3_dir))
    deepseek_len = len(AutoTokenizer.from_pretrained(deepseek_dir))
    check_vocab_size(llama3, source="llama3", tokenizer_length=llama3_len)
    check_vocab_size(deepseek, source="deepseek", tokenizer_length=deepseek_len)
    # A tokenizer with more ids than the config's vocab_size cannot be served by that draft.
    with pytest.raises(InputError, match=f"tokenizer has {deepseek_len} ids"):
        check_vocab_size(llama3, source="llama3", tokenizer_length=deepseek_len)
    # Fewer tokenizer ids than vocab_size is normal (padded embeddings, e.g. Qwen3).
    qwen = read_draft_config(str(CONFIGS / "qwen3-8b-eagle3.json"))
    check_vocab_size(qwen, source="qwen", tokenizer_length=151669)


def test_check_vocab_size_bad_value():
    with pytest.raises(InputError, match="'vocab_size' must be a positive integer"):
        check_vocab_size({"vocab_size": None}, source="c.json")
