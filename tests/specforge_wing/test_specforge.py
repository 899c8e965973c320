"""The host side: run configs, the YAML edit, train_eagle3 flags and cache
keys, the SpecForge stand-in (the pre-tokenized and offline readers are tested in tests/counting)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import specforge_standin as standin
import torch
import yaml
from conftest import CONFIG_YAMLS, CONFIGS, REPO, SHARED, write_text
from hypothesis import given, settings
from hypothesis import strategies as st

from specforge_vocab.errors import InputError
from specforge_vocab.specforge.run_config import DATA_SOURCES, load_run_config, read_run_config
from specforge_vocab.specforge.train_eagle3 import (
    cache_mapping_paths,
    draft_config_path_from_args,
    find_specforge_train_script,
    md5_cache_key,
    offline_cache_mapping_path,
    offline_dataset_identity,
    parse_train_eagle3_args,
    sha256_cache_key,
)
from specforge_vocab.specforge.yaml_patch import patch_vocab_mapping_text, set_vocab_mapping_path
from specforge_vocab.writing.draft_config import read_draft_vocab_sizes

# ---------------------------------------------------------------- helpers


def draft_json(path: Path, k: int, vocab: int) -> Path:
    return write_text(
        path,
        json.dumps(
            {
                "architectures": ["LlamaForCausalLMEagle3"],
                "hidden_size": 64,
                "vocab_size": vocab,
                "draft_vocab_size": k,
            },
            indent=2,
        ),
    )


def valid_mapping(k: int, vocab: int, seed: int = 0):
    """An independent valid mapping: k distinct ids, sorted; d2t = id - i."""
    kept = np.sort(np.random.default_rng(seed).choice(vocab, size=k, replace=False))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.from_numpy(kept)] = True
    return {"d2t": torch.from_numpy(kept - np.arange(k)).to(torch.int64), "t2d": t2d}


RUN_YAML = """\
# top comment
model:
  target_model_path: "meta-llama/Llama-3.1-8B-Instruct"   # target
  draft_model_config: 'draft.json'
  vocab_mapping_path: "./cache/old.pt"  # keep this comment
  torch_dtype:   bfloat16

# data section
data:
  train_data_path: ./train.jsonl
  max_length: 4096
training:
  strategy: eagle3
"""


# ---------------------------------------------------------------- run config


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=lambda p: p.name)
def test_every_config_yaml_loads_and_points_at_a_draft_config(path):
    run = read_run_config(str(path), cwd=str(REPO))
    draft = run.draft_config_file()
    assert Path(draft).parent == CONFIGS and Path(draft).is_file()
    k, vocab = read_draft_vocab_sizes(draft)
    assert 0 < k < vocab
    assert run.data_source in DATA_SOURCES and run.max_length > 0
    templates = SHARED / "docs" / "specforge_general_templates.json"
    if templates.is_file():
        assert run.chat_template in json.loads(templates.read_text(encoding="utf-8"))


def test_config_yamls_exist():
    names = {p.name for p in CONFIG_YAMLS}
    assert {"llama3-8b-eagle3-run.yaml", "deepseek-v3-eagle3-run.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=lambda p: p.name)
def test_every_config_yaml_hands_a_mapping_to_the_standin(path, tmp_path, monkeypatch):
    """Set model.vocab_mapping_path into a copy and let the stand-in load it
    the way `specforge train --config` would (relative paths from the repo root)."""
    monkeypatch.chdir(REPO)
    run = read_run_config(str(path))
    k, vocab = read_draft_vocab_sizes(run.draft_config_file())
    mapping = tmp_path / "mapping.pt"
    torch.save(valid_mapping(k, vocab), mapping)
    out = tmp_path / path.name
    result = set_vocab_mapping_path(str(path), str(mapping), output_path=str(out))
    assert result.path == str(out) and result.changed and result.backup_path is None
    loaded_path, d2t, t2d = standin.run_config_mapping(str(out))
    assert loaded_path == str(mapping) and d2t.shape == (k,) and t2d.shape == (vocab,)

    def key_line(line):
        return line.lstrip().startswith("vocab_mapping_path:")

    before, after = path.read_text(encoding="utf-8").splitlines(), out.read_text(encoding="utf-8").splitlines()
    assert [line for line in after if key_line(line)] == [f'  vocab_mapping_path: "{mapping}"']
    assert [line for line in before if not key_line(line)] == [line for line in after if not key_line(line)]


def test_defaults_match_specforge(tmp_path):
    path = write_text(tmp_path / "run.yaml", "model:\n  target_model_path: m\ndata:\n  train_data_path: t.jsonl\n")
    run = read_run_config(str(path), cwd=str(tmp_path))
    assert (run.max_length, run.chat_template, run.cache_dir) == (2048, "llama3", "./cache")
    assert (run.is_preformatted, run.train_only_last_turn, run.vocab_mapping_path) == (False, False, "")
    assert run.draft_model_config is None
    assert run.resolved_cache_dir == str(tmp_path / "cache")


def test_overrides_are_typed_like_specforge(tmp_path):
    path = write_text(tmp_path / "run.yaml", RUN_YAML)
    raw = load_run_config(
        str(path),
        [
            "data.max_length=8192",
            "data.is_preformatted=true",
            "data.chat_template=1.0",
            "model.aux_hidden_state_layer_ids=[1, 29, 57]",
            "training.learning_rate=1e-4",
            "output_dir=./out",
            "tracking.report_to=none",
        ],
    )
    assert raw["data"]["max_length"] == 8192 and raw["data"]["is_preformatted"] is True
    assert raw["data"]["chat_template"] == "1.0"  # string fields keep the text, as in SpecForge
    assert raw["model"]["aux_hidden_state_layer_ids"] == [1, 29, 57]
    assert raw["training"]["learning_rate"] == 1e-4 and raw["output_dir"] == "./out"
    assert raw["tracking"] == {"report_to": "none"}
    assert yaml.safe_load(path.read_text()) != raw  # the file itself is untouched
    run = read_run_config(str(path), ["data.train_data_path=", "data.prompts_path=p.jsonl", "data.max_length='512'"])
    assert (run.data_source, run.data_path, run.max_length) == ("prompts_path", "p.jsonl", 512)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.max_lenght=3", "data.max_length"),
        ("data.max_length", "section.field=value"),
        ("model.target_model_path.x=1", "not a section"),
        ("nosuch.field=1", "does not exist"),
        ("model.aux_hidden_state_layer_ids=[1,", "invalid structured value"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, fragment):
    path = write_text(tmp_path / "run.yaml", RUN_YAML)
    with pytest.raises(InputError, match="--set") as info:
        load_run_config(str(path), [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("  max_length: 10\n", "sets none of them"),
        ("  train_data_path: a\n  hidden_states_path: b\n", "data.train_data_path, data.hidden_states_path"),
        ("  train_data_path: a\n  max_length: -1\n", "data.max_length' must be a positive integer"),
        ("  train_data_path: a\n  max_length: lots\n", "data.max_length' must be a positive integer"),
        ("  train_data_path: a\n  max_length: true\n", "data.max_length' must be a positive integer"),
        ("  train_data_path: a\n  is_preformatted: maybe\n", "data.is_preformatted' must be true or false"),
        ("  train_data_path: [a]\n", "data.train_data_path' must be a string"),
    ],
)
def test_bad_data_sections_are_named(tmp_path, data, fragment):
    path = write_text(tmp_path / "run.yaml", "model:\n  target_model_path: m\ndata:\n" + data)
    with pytest.raises(InputError) as info:
        read_run_config(str(path))
    assert fragment in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  a: b: c\n", "line 2: the run config is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model: 3\ndata: {}\n", "'model' must be a mapping"),
        ("data:\n  train_data_path: a\n", "no 'model' section"),
        ("model:\n  draft_model_config: d.json\ndata:\n  train_data_path: a\n", "model.target_model_path"),
    ],
)
def test_bad_run_configs_are_named(tmp_path, text, fragment):
    path = write_text(tmp_path / "run.yaml", text)
    with pytest.raises(InputError) as info:
        read_run_config(str(path))
    assert fragment in str(info.value)


def test_fields_specforge_does_not_know_are_reported(tmp_path, caplog):
    path = write_text(
        tmp_path / "run.yaml",
        "model:\n  target_model_path: m\n  vocab_map: x\n  sglang_tp: 2\ndata:\n  train_data_path: t\n",
    )
    with caplog.at_level("WARNING", logger="specforge_vocab.specforge.run_config"):
        read_run_config(str(path))
    assert "model.vocab_map" in caplog.text and "sglang_tp" not in caplog.text


def test_byte_order_mark_and_document_markers():
    text = "\ufeff---\nmodel:\n  target_model_path: m\n...\n"
    out = patch_vocab_mapping_text(text, "/m/v.pt")
    assert out == "\ufeff---\nmodel:\n  target_model_path: m\n  vocab_mapping_path: /m/v.pt\n...\n"
    assert (
        patch_vocab_mapping_text("\ufeffmodel:\n  a: 1\n", "v.pt")
        == "\ufeffmodel:\n  a: 1\n  vocab_mapping_path: v.pt\n"
    )


def test_missing_run_config(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_run_config(str(tmp_path / "nope.yaml"))


def test_json_run_config_is_read_as_json(tmp_path):
    path = write_text(
        tmp_path / "run.json",
        json.dumps({"model": {"target_model_path": "m"}, "data": {"hidden_states_path": "feat", "max_length": 64}}),
    )
    run = read_run_config(str(path))
    assert (run.data_source, run.max_length) == ("hidden_states_path", 64)
    bad = write_text(tmp_path / "run.cfg", "model:\n  target_model_path: m\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_run_config(str(bad))


def test_relative_paths_resolve_from_the_working_directory_not_the_yaml_folder(tmp_path, monkeypatch):
    """SpecForge passes config paths to os.path as written, so they start at the CWD."""
    draft_json(tmp_path / "configs" / "d.json", 8, 100)
    path = write_text(
        tmp_path / "runs" / "run.yaml",
        "model:\n  target_model_path: m\n  draft_model_config: configs/d.json\n"
        "  vocab_mapping_path: maps/v.pt\ndata:\n  prompts_path: data/p.jsonl\n  cache_dir: c\n",
    )
    monkeypatch.chdir(tmp_path)
    run = read_run_config("runs/run.yaml")
    assert run.draft_config_file() == str(tmp_path / "configs" / "d.json")
    assert run.resolved_data_path == str(tmp_path / "data" / "p.jsonl")
    assert run.resolved_vocab_mapping_path == str(tmp_path / "maps" / "v.pt")
    assert run.resolved_cache_dir == str(tmp_path / "c")
    with pytest.raises(InputError, match="current directory"):
        read_run_config(str(path), cwd=str(tmp_path / "runs")).draft_config_file()


def test_draft_config_sources(tmp_path):
    draft_json(tmp_path / "ckpt" / "config.json", 8, 100)
    (tmp_path / "empty").mkdir()
    base = "model:\n  target_model_path: m\n  draft_model_config: {}\ndata:\n  train_data_path: t\n"

    def run_for(source):
        return read_run_config(str(write_text(tmp_path / "run.yaml", base.format(source))), cwd=str(tmp_path))

    assert run_for("ckpt").draft_config_file() == str(tmp_path / "ckpt" / "config.json")
    assert run_for("file://" + str(tmp_path / "ckpt" / "config.json")).draft_config_file() == str(
        tmp_path / "ckpt" / "config.json"
    )
    with pytest.raises(InputError, match="no config.json"):
        run_for("empty").draft_config_file()
    with pytest.raises(InputError, match="Hugging Face Hub"):
        run_for("org/eagle3-draft").draft_config_file()
    with pytest.raises(InputError, match="does not exist"):
        run_for("missing.json").draft_config_file()
    with pytest.raises(InputError, match="is not set"):
        run_for("''").draft_config_file()


# ---------------------------------------------------------------- YAML edit


def test_existing_value_is_replaced_and_every_other_byte_kept(tmp_path):
    path = write_text(tmp_path / "run.yaml", RUN_YAML)
    result = set_vocab_mapping_path(str(path), "/maps/new.pt")
    assert result.changed and result.backup_path == str(path) + ".bak"
    assert Path(result.backup_path).read_bytes() == RUN_YAML.encode()
    expected = RUN_YAML.replace(
        '  vocab_mapping_path: "./cache/old.pt"  # keep this comment',
        '  vocab_mapping_path: "/maps/new.pt"  # keep this comment',
    )
    assert expected != RUN_YAML and path.read_text(encoding="utf-8") == expected


@pytest.mark.parametrize(
    "line, new_line",
    [
        ("  vocab_mapping_path: ./old.pt", "  vocab_mapping_path: /m/v.pt"),
        ("  vocab_mapping_path: './old.pt'   # c", "  vocab_mapping_path: '/m/v.pt'   # c"),
        ('  vocab_mapping_path: ""', '  vocab_mapping_path: "/m/v.pt"'),
        ("  vocab_mapping_path:", "  vocab_mapping_path: /m/v.pt"),
        ("  vocab_mapping_path:  # set by prepare", "  vocab_mapping_path: /m/v.pt  # set by prepare"),
        ('  "vocab_mapping_path" : x', '  "vocab_mapping_path" : /m/v.pt'),
    ],
)
def test_value_styles(line, new_line):
    text = f"model:\n  target_model_path: m\n{line}\n  torch_dtype: bfloat16\ndata:\n  train_data_path: t\n"
    assert patch_vocab_mapping_text(text, "/m/v.pt") == text.replace(line, new_line)


def test_missing_key_is_inserted_with_the_section_indentation():
    lines = [
        "# run\n",
        "model:\n",
        "    target_model_path: m   # four-space indent\n",
        "    draft_model_config: d.json\n",
        "    # trailing comment of the section\n",
        "\n",
        "# data\n",
        "data:\n",
        "    train_data_path: t\n",
    ]
    out = patch_vocab_mapping_text("".join(lines), "/m/v.pt")
    assert out == "".join(lines[:4] + ["    vocab_mapping_path: /m/v.pt\n"] + lines[4:])


def test_insertion_follows_double_quoting_crlf_and_a_missing_final_newline():
    text = 'model:\r\n  target_model_path: "m"\r\n  draft_model_config: "d.json"'
    out = patch_vocab_mapping_text(text, "/m/v.pt")
    assert (
        out == 'model:\r\n  target_model_path: "m"\r\n  draft_model_config: "d.json"\r\n  vocab_mapping_path: "/m/v.pt"'
    )


def test_crlf_file_keeps_its_line_endings():
    text = RUN_YAML.replace("\n", "\r\n")
    out = patch_vocab_mapping_text(text, "/m/v.pt")
    assert out.count("\r\n") == text.count("\r\n") and "\n" not in out.replace("\r\n", "")
    assert yaml.safe_load(out)["model"]["vocab_mapping_path"] == "/m/v.pt"


@pytest.mark.parametrize(
    "value",
    [
        "true",
        "null",
        "123",
        "a: b",
        "x #y",
        "!tag",
        "- a",
        "~",
        "'q'",
        '"',
        "é/ü.pt",
        "2024-01-01",
        " lead",
        "C:\\maps\\v.pt",
        "%x",
        "@x",
        "a\tb",
    ],
)
def test_values_needing_quotes_round_trip(value):
    for style_line in ("  vocab_mapping_path: old", "  vocab_mapping_path: 'old'", '  vocab_mapping_path: "old"'):
        text = f"model:\n  target_model_path: m\n{style_line}\ndata:\n  train_data_path: t\n"
        assert yaml.safe_load(patch_vocab_mapping_text(text, value))["model"]["vocab_mapping_path"] == value


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_any_path_round_trips(value):
    text = "model:\n  target_model_path: m  # t\n  vocab_mapping_path: old\n  x: 1\ndata:\n  train_data_path: t\n"
    out = patch_vocab_mapping_text(text, value)
    assert yaml.safe_load(out) == {
        "model": {"target_model_path": "m", "vocab_mapping_path": value, "x": 1},
        "data": {"train_data_path": "t"},
    }
    assert out.splitlines()[:2] == text.splitlines()[:2] and out.splitlines()[-3:] == text.splitlines()[-3:]


@pytest.mark.parametrize(
    "text, expected",
    [
        (  # a flow mapping
            "model: {target_model_path: m}\ndata: {train_data_path: t}\n",
            'model: {target_model_path: m, vocab_mapping_path: "/m/v.pt"}\ndata: {train_data_path: t}\n',
        ),
        (  # a flow mapping over several lines, with comments, a trailing comma and an anchor
            "model: &m { # the model\n  target_model_path: 'm,}',\n  draft_model_config: d.json, # cfg\n}\n",
            "model: &m { # the model\n  target_model_path: 'm,}',\n  draft_model_config: d.json, "
            'vocab_mapping_path: "/m/v.pt" # cfg\n}\n',
        ),
        (  # a flow mapping that has the key already (quoted key, no space after the colon)
            'model: {"vocab_mapping_path":"old.pt", target_model_path: m}\n',
            'model: {"vocab_mapping_path":"/m/v.pt", target_model_path: m}\n',
        ),
        (  # an anchor on the model section
            "model: &base\n  target_model_path: m\nother: *base\n",
            "model: &base\n  target_model_path: m\n  vocab_mapping_path: /m/v.pt\nother: *base\n",
        ),
        (  # an anchor on the value
            "model:\n  target_model_path: m\n  vocab_mapping_path: &a x\ndata:\n  train_data_path: t\n",
            "model:\n  target_model_path: m\n  vocab_mapping_path: &a /m/v.pt\ndata:\n  train_data_path: t\n",
        ),
        (  # a block scalar
            "model:\n  target_model_path: m\n  vocab_mapping_path: |\n    x.pt\n\n  torch_dtype: bf16\n",
            "model:\n  target_model_path: m\n  vocab_mapping_path: /m/v.pt\n\n  torch_dtype: bf16\n",
        ),
        (  # a plain value over two lines
            "model:\n  target_model_path: m\n  vocab_mapping_path: a\n    b\ndata:\n  train_data_path: t\n",
            "model:\n  target_model_path: m\n  vocab_mapping_path: /m/v.pt\ndata:\n  train_data_path: t\n",
        ),
        (  # a quoted value over two lines
            'model:\n  target_model_path: m\n  vocab_mapping_path: "a\n    b"\ndata:\n  train_data_path: t\n',
            'model:\n  target_model_path: m\n  vocab_mapping_path: "/m/v.pt"\ndata:\n  train_data_path: t\n',
        ),
        (  # an alias as the value
            "paths:\n  m: &p old.pt\nmodel:\n  target_model_path: m\n  vocab_mapping_path: *p\n",
            "paths:\n  m: &p old.pt\nmodel:\n  target_model_path: m\n  vocab_mapping_path: /m/v.pt\n",
        ),
    ],
)
def test_other_yaml_forms_are_patched_exactly(tmp_path, text, expected):
    path = write_text(tmp_path / "run.yaml", text)
    set_vocab_mapping_path(str(path), "/m/v.pt")
    assert path.read_text() == expected
    assert (tmp_path / "run.yaml.bak").read_text() == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  target_model_path: m\n  vocab_mapping_path: a\n  vocab_mapping_path: b\n", "appears 2 times"),
        ("model:\n  target_model_path: m\n  vocab_mapping_path: [a]\n", "must be a string"),
        ("data:\n  train_data_path: t\n", "no block 'model:' section"),
        ("model:\n  target_model_path: m\nmodel:\n  target_model_path: n\n", "expected exactly one"),
        ("base: &b\n  target_model_path: m\nmodel: *b\n", "an alias of another section"),
        ("{model: {target_model_path: m}}\n", "found 0 top-level 'model:' lines"),
        ("model:\n  target_model_path: m\n  note: |+\n    text\n\ndata:\n  train_data_path: t\n", "re-reading"),
    ],
)
def test_odd_layouts_are_refused_and_the_file_is_untouched(tmp_path, text, fragment):
    path = write_text(tmp_path / "run.yaml", text)
    with pytest.raises(InputError) as info:
        set_vocab_mapping_path(str(path), "/m/v.pt")
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert path.read_text() == text and not (tmp_path / "run.yaml.bak").exists()
    if "must be a string" not in fragment and "no block" not in fragment:
        assert "Pass --output-config NEW.yaml" in str(info.value)
        out = tmp_path / "new.yaml"  # the suggestion works: a re-serialised copy with the key set
        set_vocab_mapping_path(str(path), "/m/v.pt", output_path=str(out))
        assert path.read_text() == text
        expected = yaml.safe_load(text)
        expected["model"]["vocab_mapping_path"] = "/m/v.pt"
        assert yaml.safe_load(out.read_text()) == expected


def test_unchanged_value_writes_nothing(tmp_path):
    path = write_text(tmp_path / "run.yaml", RUN_YAML)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    result = set_vocab_mapping_path(str(path), "./cache/old.pt")
    assert not result.changed and result.backup_path is None
    assert path.stat().st_mtime_ns == 1_000_000_000 and not (tmp_path / "run.yaml.bak").exists()


def test_output_path_leaves_the_original_alone_and_in_place_keeps_the_mode(tmp_path):
    path = write_text(tmp_path / "run.yaml", RUN_YAML)
    path.chmod(0o640)
    out = tmp_path / "new" / "run.yaml"
    result = set_vocab_mapping_path(str(path), "/m/v.pt", output_path=str(out))
    assert path.read_text() == RUN_YAML and not (tmp_path / "run.yaml.bak").exists()
    assert yaml.safe_load(out.read_text())["model"]["vocab_mapping_path"] == "/m/v.pt" and result.changed
    set_vocab_mapping_path(str(path), "/m/v.pt", backup=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and not (tmp_path / "run.yaml.bak").exists()


def test_json_run_config_is_patched_keeping_key_order(tmp_path):
    data = {"model": {"target_model_path": "m", "draft_model_config": "d.json"}, "data": {"train_data_path": "t"}}
    path = write_text(tmp_path / "run.json", json.dumps(data, indent=4) + "\n")
    set_vocab_mapping_path(str(path), "/m/v.pt")
    text = path.read_text()
    data["model"]["vocab_mapping_path"] = "/m/v.pt"
    assert text == json.dumps(data, indent=4) + "\n"


# ---------------------------------------------------------------- train_eagle3

BASE_FLAGS = [
    "--target-model-path",
    "meta-llama/Llama-3.1-8B-Instruct",
    "--draft-model-config",
    "configs/d.json",
    "--train-data-path",
    "./cache/dataset/sharegpt.jsonl",
    "--output-dir",
    "out",
]


def test_parser_defaults_and_pass_through():
    args, rest = parse_train_eagle3_args(
        BASE_FLAGS + ["--learning-rate", "1e-4", "--report-to", "wandb", "--verbose", "--tp-size", "2"]
    )
    assert (args.chat_template, args.max_length, args.cache_dir) == ("llama3", 2048, "./cache")
    assert (args.is_preformatted, args.train_only_last_turn, args.vocab_mapping_path) == (False, False, None)
    assert rest == ["--learning-rate", "1e-4", "--report-to", "wandb", "--verbose", "--tp-size", "2"]
    args, _ = parse_train_eagle3_args(
        BASE_FLAGS + ["--max-length=4096", "--is-preformatted", "--chat-template", "qwen"]
    )
    assert (args.max_length, args.is_preformatted, args.chat_template) == (4096, True, "qwen")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (BASE_FLAGS[2:], "--target-model-path"),
        (BASE_FLAGS + ["--max-len", "4096"], "abbreviation of --max-length"),
        (BASE_FLAGS + ["--cache-d=/tmp"], "abbreviation of --cache-dir"),
        (BASE_FLAGS + ["--max-length", "many"], "invalid int value"),
    ],
)
def test_bad_flags_are_named(argv, fragment):
    with pytest.raises(InputError) as info:
        parse_train_eagle3_args(argv)
    assert fragment in str(info.value)


def test_md5_keys_equal_hashlib_of_specforges_format_string():
    text = "./cache/dataset/sharegpt.jsonl-2048-llama3-meta-llama/Llama-3.1-8B-Instruct"
    assert (
        md5_cache_key(
            "./cache/dataset/sharegpt.jsonl", 2048, "llama3", "meta-llama/Llama-3.1-8B-Instruct", 32000, 128256
        )
        == hashlib.md5((text + "-32000-128256").encode()).hexdigest()
    )
    assert (
        md5_cache_key(
            "./cache/dataset/sharegpt.jsonl",
            2048,
            "llama3",
            "meta-llama/Llama-3.1-8B-Instruct",
            32000,
            128256,
            legacy=True,
        )
        == hashlib.md5(text.encode()).hexdigest()
    )
    # the flag strings are used as typed: "./x" and "x" are different keys
    assert md5_cache_key("x", 1, "t", "m", 2, 3) != md5_cache_key("./x", 1, "t", "m", 2, 3)


def test_cache_paths_follow_the_draft_config_and_ckpt_dir(tmp_path):
    draft = draft_json(tmp_path / "d.json", 16000, 128256)
    args, _ = parse_train_eagle3_args(
        [
            "--target-model-path",
            "tm",
            "--draft-model-config",
            str(draft),
            "--train-data-path",
            "t.jsonl",
            "--cache-dir",
            "c",
            "--max-length",
            "512",
        ]
    )
    current, legacy = cache_mapping_paths(args, draft_config_path_from_args(args))
    assert current == os.path.join(
        "c", "vocab_mapping", hashlib.md5(b"t.jsonl-512-llama3-tm-16000-128256").hexdigest() + ".pt"
    )
    assert legacy == os.path.join("c", "vocab_mapping", hashlib.md5(b"t.jsonl-512-llama3-tm").hexdigest() + ".pt")
    draft_json(tmp_path / "ckpt" / "config.json", 8000, 128256)
    args.ckpt_dir = str(tmp_path / "ckpt")
    assert draft_config_path_from_args(args) == str(tmp_path / "ckpt" / "config.json")
    assert cache_mapping_paths(args, draft_config_path_from_args(args))[0].endswith(
        hashlib.md5(b"t.jsonl-512-llama3-tm-8000-128256").hexdigest() + ".pt"
    )
    args.ckpt_dir = str(tmp_path / "nope")
    with pytest.raises(InputError, match="--ckpt-dir"):
        draft_config_path_from_args(args)
    args.ckpt_dir, args.draft_model_config = None, None
    with pytest.raises(InputError, match="--draft-model-config is not given"):
        draft_config_path_from_args(args)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"vocab_size": 100}, "draft_vocab_size"),
        ({"vocab_size": 100, "draft_vocab_size": 10.0}, "draft_vocab_size"),
        ({"vocab_size": True, "draft_vocab_size": 10}, "vocab_size"),
    ],
)
def test_bad_draft_sizes(config, fragment):
    with pytest.raises(InputError, match=fragment):
        read_draft_vocab_sizes(config)


@pytest.mark.parametrize("legacy", [False, True])
def test_standin_train_eagle3_finds_and_installs_the_mapping(tmp_path, monkeypatch, legacy):
    monkeypatch.chdir(tmp_path)
    draft_json(tmp_path / "configs" / "d.json", 300, 5000)
    argv = [
        "--target-model-path",
        "tm",
        "--draft-model-config",
        "configs/d.json",
        "--train-data-path",
        "data/t.jsonl",
        "--max-length",
        "1024",
        "--output-dir",
        "o",
        "--learning-rate",
        "1e-4",
    ]
    args, _ = parse_train_eagle3_args(argv)
    with pytest.raises(standin.WouldBuildOwnMapping):
        standin.train_eagle3_mapping(argv, legacy=legacy)
    paths = cache_mapping_paths(args, draft_config_path_from_args(args))
    mapping = valid_mapping(300, 5000, seed=3)
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(mapping, path)
    found, d2t, t2d = standin.train_eagle3_mapping(argv, legacy=legacy)
    assert found == paths[1 if legacy else 0]
    assert torch.equal(d2t, mapping["d2t"]) and torch.equal(t2d, mapping["t2d"])


def test_standin_rejects_a_mapping_of_the_wrong_shape_or_dtype(tmp_path):
    draft = draft_json(tmp_path / "d.json", 300, 5000)
    torch.save(valid_mapping(200, 5000), tmp_path / "small.pt")
    with pytest.raises(RuntimeError):
        standin.install_mapping(str(tmp_path / "small.pt"), str(draft))
    bad = valid_mapping(300, 5000)
    bad["d2t"] = bad["d2t"].to(torch.bfloat16)
    torch.save(bad, tmp_path / "float.pt")
    with pytest.raises(AssertionError, match="d2t"):
        standin.install_mapping(str(tmp_path / "float.pt"), str(draft))


def test_sha256_key_and_offline_identity(tmp_path, monkeypatch):
    assert sha256_cache_key("abc", 128256, 32000) == hashlib.sha256(b"abc:128256:32000").hexdigest()
    monkeypatch.chdir(tmp_path)
    for name in ("feat/rows_2-4/data_2.ckpt", "feat/rows_0-2/data_0.ckpt.gz", "feat/rows_0-2/notes.txt"):
        write_text(tmp_path / name, "x" * len(name))
    identity = offline_dataset_identity("feat", 2048)
    expected_files = [
        [str(tmp_path / n), os.stat(tmp_path / n).st_size, os.stat(tmp_path / n).st_mtime_ns]
        for n in ("feat/rows_0-2/data_0.ckpt.gz", "feat/rows_2-4/data_2.ckpt")
    ]
    assert json.loads(identity) == {"files": expected_files, "kind": "offline-features-v1", "max_length": 2048}
    assert identity.startswith('{"files": [["')  # sorted keys, json.dumps default separators
    path = write_text(tmp_path / "run.yaml", "model:\n  target_model_path: m\ndata:\n  hidden_states_path: feat\n")
    run = read_run_config(str(path))
    assert offline_cache_mapping_path(run, 128256, 32000) == str(
        tmp_path / "cache" / "vocab_mapping" / (hashlib.sha256(f"{identity}:128256:32000".encode()).hexdigest() + ".pt")
    )


def test_find_specforge_train_script(tmp_path, monkeypatch):
    script = write_text(tmp_path / "SpecForge" / "scripts" / "train_eagle3.py", "print('hi')\n")
    assert find_specforge_train_script(str(script)) == str(script)
    with pytest.raises(InputError, match="--specforge-script .* does not exist"):
        find_specforge_train_script(str(tmp_path / "nope.py"))
    assert importlib.util.find_spec("specforge") is None, "a real SpecForge is installed; this test assumes none"
    with pytest.raises(InputError, match="no 'specforge' package is installed"):
        find_specforge_train_script()
    write_text(tmp_path / "wheel" / "specforge" / "__init__.py", "")
    monkeypatch.syspath_prepend(str(tmp_path / "wheel"))
    importlib.invalidate_caches()
    with pytest.raises(InputError, match="wheel installs do not ship scripts"):
        find_specforge_train_script()
    write_text(tmp_path / "SpecForge" / "specforge" / "__init__.py", "")
    monkeypatch.syspath_prepend(str(tmp_path / "SpecForge"))
    importlib.invalidate_caches()
    assert find_specforge_train_script() == str(script)
