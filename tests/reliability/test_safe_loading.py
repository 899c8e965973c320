"""Safe loading: no user file is ever unpickled as arbitrary objects, and no tokenizer runs its
own code unless --trust-remote-code is given.

The source scan parses every module of the package (AST, not grep) and fails on:
- ``torch.load(...)`` (under any alias, or ``from torch import load``) without ``weights_only=True``;
- ``pickle``/``dill``/``marshal`` loads, ``numpy.load(..., allow_pickle=True)``, ``yaml.load``/``unsafe_load``;
- ``from_pretrained(..., trust_remote_code=True)`` or a literal ``trust_remote_code=True`` anywhere.
"""

from __future__ import annotations

import ast
import json
from typing import List

import pytest
from conftest import REPO, remote_code_tokenizer

from specforge_vocab.errors import InputError

PACKAGE = REPO / "specforge_vocab"
UNSAFE_MODULES = {"pickle", "dill", "marshal", "cloudpickle", "joblib", "_pickle"}
UNSAFE_FUNCTIONS = {"load", "loads", "Unpickler"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<source>") -> List[str]:
    """Every unsafe loading call in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    torch_names, torch_load_names, numpy_names, yaml_names, unsafe_names = (
        {"torch"},
        set(),
        {"np", "numpy"},
        {"yaml"},
        set(),
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if alias.name == "torch":
                    torch_names.add(bound)
                elif alias.name == "numpy":
                    numpy_names.add(bound)
                elif alias.name == "yaml":
                    yaml_names.add(bound)
                elif alias.name.split(".")[0] in UNSAFE_MODULES:
                    unsafe_names.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module == "torch" and alias.name == "load":
                    torch_load_names.add(alias.asname or "load")
                if node.module.split(".")[0] in UNSAFE_MODULES and alias.name in UNSAFE_FUNCTIONS:
                    unsafe_names.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and _is_true(node.value):
            found.append(f"{filename}:{node.value.lineno}: trust_remote_code=True")
        if not isinstance(node, ast.Call):
            continue
        func, where = node.func, f"{filename}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        is_torch_load = (owner in torch_names and name == "load") or (
            isinstance(func, ast.Name) and name in torch_load_names
        )
        if is_torch_load and not _is_true(keywords.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if owner in unsafe_names or (isinstance(func, ast.Name) and name in unsafe_names):
            if name in UNSAFE_FUNCTIONS or isinstance(func, ast.Name):
                found.append(f"{where}: {owner + '.' if owner else ''}{name} (unpickles arbitrary objects)")
        if owner in numpy_names and name == "load" and _is_true(keywords.get("allow_pickle")):
            found.append(f"{where}: numpy.load(allow_pickle=True)")
        if owner in yaml_names and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append(f"{where}: yaml.{name} (use yaml.safe_load)")
    return found


def test_package_never_loads_unsafely():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [
        p for f in files for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
    ]
    assert problems == [], "\n".join(problems)


def test_every_torch_load_in_the_package_was_seen():
    """The scan is not vacuous: it sees the package's real torch.load calls (all with weights_only=True)."""
    seen = 0
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                seen += 1
                assert any(k.arg == "weights_only" and _is_true(k.value) for k in node.keywords), (
                    f"{path}:{node.lineno}"
                )
    assert seen >= 2


@pytest.mark.parametrize(
    "source,expected",
    [
        ("import torch\ntorch.load(p)\n", "torch.load without weights_only=True"),
        ("import torch as T\nT.load(p, weights_only=False)\n", "torch.load without weights_only=True"),
        ("from torch import load\nload(p, map_location='cpu')\n", "torch.load without weights_only=True"),
        ("import pickle\npickle.load(f)\n", "pickle.load"),
        ("from pickle import loads as l\nl(b)\n", "l (unpickles"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "numpy.load(allow_pickle=True)"),
        ("import yaml\nyaml.load(text)\n", "yaml.load"),
        ("AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n", "trust_remote_code=True"),
    ],
)
def test_the_scan_catches_each_unsafe_form(source, expected):
    problems = unsafe_calls(source)
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_scan_accepts_safe_forms():
    source = (
        "import torch\nimport yaml\nimport numpy as np\ntorch.load(p, weights_only=True)\nyaml.safe_load(t)\n"
        "np.load(p)\nAutoTokenizer.from_pretrained(p, trust_remote_code=flag)\n"
    )
    assert unsafe_calls(source) == []


def test_tokenizer_asking_for_remote_code_is_refused_without_the_flag(tmp_path, capsys):
    from specforge_vocab.cli.main import main
    from specforge_vocab.counting.tokenizer import load_tokenizer

    folder = remote_code_tokenizer(tmp_path / "evil", "EvilTokenizer")
    with pytest.raises(InputError, match=r"(?s)evil.*pass --trust-remote-code if you trust it") as info:
        load_tokenizer(str(folder))
    assert "Traceback" not in str(info.value)
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    code = main(
        [
            "count",
            "--dataset-path",
            str(data),
            "--tokenizer-path",
            str(folder),
            "--output",
            str(tmp_path / "c.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err
    assert not (folder / "RAN").exists(), "the tokenizer's own code ran without --trust-remote-code"
    assert not (tmp_path / "c.safetensors").exists()


def test_tokenizer_with_a_builtin_class_and_remote_code_loads_the_builtin_and_never_runs_the_code(tmp_path):
    from specforge_vocab.counting.tokenizer import load_tokenizer

    folder = remote_code_tokenizer(tmp_path / "mixed", "PreTrainedTokenizerFast")
    tokenizer = load_tokenizer(str(folder))
    assert "EvilTokenizer" not in type(tokenizer).__name__
    assert not (folder / "RAN").exists(), "the tokenizer's own code ran without --trust-remote-code"
