"""Every draft config under configs/ is SpecForge's file of the same name, byte for byte: the table
records where each comes from (path, commit, sha256 of SpecForge's file). The run YAMLs are ours and
configs/README.md says so."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CONFIG_YAMLS, CONFIGS, SHIPPED_CONFIGS

SPECFORGE_COMMIT = "a6b6b0230009d15ec2a97a57384e6f53f0f96946"  # sgl-project/SpecForge, 2026-08-08

# shipped file -> (path in SpecForge, sha256 of that file at SPECFORGE_COMMIT)
FROM_SPECFORGE = {
    "llama3-8B-eagle3.json": (
        "configs/llama3-8B-eagle3.json",
        "204d6ee21d58cef1f9a593b4c461bf1ea9c18cac1f060b1bca7c67a72450b011",
    ),
    "qwen3-8b-eagle3.json": (
        "configs/qwen3-8b-eagle3.json",
        "d9278a81b79fbf7b60342dabdd70a02f483369770062de70fc655afdebbf2477",
    ),
    "qwen3-32b-eagle3.json": (
        "configs/qwen3-32b-eagle3.json",
        "a9f4304fb9e53e0e42ae16c8c76e48a0194e899df3b8b7d68ede5bb68d3ed92d",
    ),
    "deepseek-v3-671b-eagle3.json": (
        "configs/deepseek-v3-671b-eagle3.json",
        "4e064a39547513de24b3dbc3aa25156fcc0e211628f8288c319726b9c8c37be8",
    ),
    "gpt-oss-20B-eagle3.json": (
        "configs/gpt-oss-20B-eagle3.json",
        "860ba87f2d6e41b30759f779e12392e33a2176b23cca385f2ceb2c4dfb71a3c7",
    ),
}

# A SpecForge git directory (a clone or a bare mirror), when this machine has one; elsewhere the
# check against it is skipped and the recorded sha256 stands alone.
SPECFORGE_MIRROR = Path(os.environ.get("SPECFORGE_GIT_DIR", "/work/.mirror/sgl-project+SpecForge/repo"))


def test_every_shipped_draft_config_has_a_recorded_source():
    assert sorted(FROM_SPECFORGE) == SHIPPED_CONFIGS


@pytest.mark.parametrize("name", sorted(FROM_SPECFORGE))
def test_a_shipped_draft_config_is_specforges_file_byte_for_byte(name):
    _, sha256 = FROM_SPECFORGE[name]
    assert hashlib.sha256((CONFIGS / name).read_bytes()).hexdigest() == sha256


@pytest.mark.parametrize("name", sorted(FROM_SPECFORGE))
def test_the_recorded_source_is_specforges_file_in_the_mirror(name):
    if not SPECFORGE_MIRROR.is_dir():
        pytest.skip(f"no SpecForge mirror at {SPECFORGE_MIRROR}: the recorded sha256 is checked on its own")
    path, sha256 = FROM_SPECFORGE[name]
    theirs = subprocess.run(
        ["git", "-C", str(SPECFORGE_MIRROR), "show", f"{SPECFORGE_COMMIT}:{path}"], capture_output=True, check=True
    ).stdout
    assert hashlib.sha256(theirs).hexdigest() == sha256
    assert (CONFIGS / name).read_bytes() == theirs


def test_the_readme_of_configs_names_each_source_and_labels_ours():
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| ")}
    for name, (path, _) in FROM_SPECFORGE.items():
        assert f"sgl-project/SpecForge `{path}` at {SPECFORGE_COMMIT[:8]}" in rows[name], name
    for path in CONFIG_YAMLS:
        assert "ours" in rows[path.name], path.name
