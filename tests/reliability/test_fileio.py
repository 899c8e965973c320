"""fileio, piece by piece: how groups are swapped or journaled, when the swap falls back to the
journal, recovery of what a killed run left, modes, links and signals held during a commit.
The config/mapping agreement of writing.outputs.commit_outputs is in tests/writing/test_outputs.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from reliability_helpers import leftovers

from specforge_vocab import fileio
from specforge_vocab.errors import InputError
from specforge_vocab.fileio import atomic, groups

needs_exchange = pytest.mark.skipif(
    not fileio.exchange_supported(os.getcwd()),
    reason="no renameat2(RENAME_EXCHANGE) here; the journal path is tested instead",
)


def group(directory: Path, tag: str, names=("a.json", "b.bin", "c.txt")):
    return {str(directory / name): f"{tag}:{name}" for name in names}


def contents(directory: Path):
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv(fileio.GROUP_WRITE_ENV, raising=False)


@needs_exchange
def test_a_flat_directory_is_swapped_and_other_files_keep_their_inode(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "notes.txt"
    notes.write_text("one\n")
    inode = notes.stat().st_ino
    with open(notes, "a") as handle:  # e.g. a training log being appended to
        assert fileio.atomic_write_many(group(out, "v1")) == "exchange"
        handle.write("two\n")
    assert notes.stat().st_ino == inode and notes.read_text() == "one\ntwo\n"
    assert contents(out) == {"a.json": "v1:a.json", "b.bin": "v1:b.bin", "c.txt": "v1:c.txt", "notes.txt": "one\ntwo\n"}
    assert fileio.atomic_write_many(group(out, "v2")) == "exchange"
    assert contents(out)["a.json"] == "v2:a.json"
    assert leftovers(str(tmp_path)) == [] and sorted(os.listdir(tmp_path)) == ["out"]


@needs_exchange
def test_a_symlinked_output_dir_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert fileio.atomic_write_many(group(tmp_path / "link", "v1")) == "exchange"
    assert (tmp_path / "link").is_symlink() and contents(real)["a.json"] == "v1:a.json"


@pytest.mark.parametrize("reason", ["subdirectory", "cwd", "no-renameat2", "no-hard-links", "forced"])
def test_the_journal_is_used_when_the_swap_cannot_be(tmp_path, monkeypatch, reason):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if reason == "subdirectory":
        (out / "sub").mkdir()
        (out / "sub" / "x").write_text("x")
    elif reason == "cwd":
        monkeypatch.chdir(out)
    elif reason == "no-renameat2":
        monkeypatch.setattr(groups, "_renameat2_cache", [None])
    elif reason == "no-hard-links":

        def no_link(*args, **kwargs):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    else:
        monkeypatch.setenv(fileio.GROUP_WRITE_ENV, "journal")
    assert fileio.atomic_write_many(group(out, "v1")) == "journal"
    assert contents(out) == {"a.json": "v1:a.json", "b.bin": "v1:b.bin", "c.txt": "v1:c.txt", "keep.txt": "mine"}
    assert leftovers(str(tmp_path)) == []
    if reason == "subdirectory":
        assert (out / "sub" / "x").read_text() == "x"


def test_forcing_the_swap_where_it_cannot_work_is_an_error_and_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, "exchange")
    if not fileio.exchange_supported(str(tmp_path)):
        pytest.skip("no renameat2 here")
    with pytest.raises(InputError, match=r"=exchange, but .*out cannot be swapped: it holds a subdirectory \(sub\)"):
        fileio.atomic_write_many(group(out, "v1"))
    assert os.listdir(out) == ["sub"] and leftovers(str(tmp_path)) == []
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, "sideways")
    with pytest.raises(InputError, match=r"must be one of auto, exchange, journal, but got 'sideways'"):
        fileio.atomic_write_many(group(out, "v1"))


def tree_of(directory: Path):
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["auto", "journal"])
def test_a_group_with_a_root_replaces_its_subtrees_whole_and_keeps_the_rest(tmp_path, monkeypatch, mode):
    monkeypatch.setenv(fileio.GROUP_WRITE_ENV, mode)
    out = tmp_path / "out"
    first = {str(out / "a.json"): "v1", str(out / "tree" / "k1" / "x"): "v1", str(out / "tree" / "k2" / "y"): "v1"}
    first[str(out / "extra.pt")] = "v1"
    fileio.atomic_write_many(first, root=str(out))
    (out / "notes.txt").write_text("mine")
    second = {str(out / "a.json"): "v2", str(out / "tree" / "k2" / "y"): "v2", str(out / "tree" / "k3" / "z"): "v2"}
    expected = "exchange" if mode == "auto" and fileio.exchange_supported(str(tmp_path)) else "journal"
    assert fileio.atomic_write_many(second, root=str(out), owned=["tree", "extra.pt", "absent"]) == expected
    assert tree_of(out) == {"a.json": "v2", "notes.txt": "mine", "tree/k2/y": "v2", "tree/k3/z": "v2"}
    assert not (out / "tree" / "k1").exists() and leftovers(str(tmp_path)) == []
    fileio.atomic_write_many({str(out / "a.json"): "v3"}, root=str(out), owned=["tree"])
    assert tree_of(out) == {"a.json": "v3", "notes.txt": "mine"} and not (out / "tree").exists()


def test_a_subdirectory_the_group_does_not_own_is_kept_and_a_file_in_the_way_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "theirs").mkdir(parents=True)
    (out / "theirs" / "f").write_text("theirs")
    assert fileio.atomic_write_many({str(out / "tree" / "k" / "x"): "v1"}, root=str(out), owned=["tree"]) == "journal"
    assert tree_of(out) == {"theirs/f": "theirs", "tree/k/x": "v1"}
    (out / "blocker").write_text("a file")
    with pytest.raises(InputError, match=r"blocker is a file where a directory is needed.*nothing was changed"):
        fileio.atomic_write_many({str(out / "blocker" / "x"): "v1"}, root=str(out))
    assert tree_of(out) == {"blocker": "a file", "theirs/f": "theirs", "tree/k/x": "v1"}


def test_groups_across_directories_use_one_journal(tmp_path):
    files = {**group(tmp_path / "one", "v1", ("a",)), **group(tmp_path / "two", "v1", ("b",))}
    assert fileio.atomic_write_many(files) == "journal"
    assert (tmp_path / "one" / "a").read_text() == "v1:a" and (tmp_path / "two" / "b").read_text() == "v1:b"
    assert leftovers(str(tmp_path)) == []


def test_new_files_get_the_usual_mode_and_replaced_files_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out"
    fileio.atomic_write_many(group(out, "v1"))
    fileio.atomic_write(str(tmp_path / "single.txt"), "x")
    expected = 0o666 & ~umask
    assert stat.S_IMODE((out / "a.json").stat().st_mode) == expected  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "single.txt").stat().st_mode) == expected
    os.chmod(out / "a.json", 0o640)
    os.chmod(tmp_path / "single.txt", 0o604)
    fileio.atomic_write_many(group(out, "v2"))
    fileio.atomic_write(str(tmp_path / "single.txt"), "y")
    assert stat.S_IMODE((out / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "single.txt").stat().st_mode) == 0o604


def test_a_linked_file_inside_the_directory_joins_the_group(tmp_path):
    out = tmp_path / "out"
    method = fileio.atomic_write_many(group(out, "v1"), linked={str(out / "draft_config.json"): "{}"})
    assert method in ("exchange", "journal") and (out / "draft_config.json").read_text() == "{}"


def test_a_target_name_taken_by_a_directory_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    (out / "a.json").mkdir(parents=True)
    with pytest.raises(InputError, match=r"Cannot write .*a\.json: a directory has that name"):
        fileio.atomic_write_many(group(out, "v1"))
    assert os.listdir(out) == ["a.json"] and leftovers(str(tmp_path)) == []


# --------------------------------------------------------------------------- recovery


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_recovery_removes_only_what_dead_runs_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    stale_temp = out / f".summary.json.{dead}.abcdefgh.tmp"
    live_temp = out / f".summary.json.{os.getpid()}.abcdefgh.tmp"
    stale_staging = tmp_path / f".out{fileio.STAGING_TAG}{dead}.0.abcdefgh"
    other_staging = tmp_path / f".other{fileio.STAGING_TAG}{dead}.0.abcdefgh"
    for path in (stale_temp, live_temp):
        path.write_text("x")
    for path in (stale_staging, other_staging):
        path.mkdir()
        (path / "summary.json").write_text("half")
    reader = fileio.recover_directory(str(out), clean=False)  # readers never delete
    assert not reader and stale_temp.exists() and stale_staging.exists()
    report = fileio.recover_directory(str(out))
    assert report.temps_removed == 1 and report.staging_removed == 1
    assert not stale_temp.exists() and live_temp.exists()  # a running writer's temp stays
    assert not stale_staging.exists() and other_staging.exists()  # another directory's staging is not ours


@needs_exchange
def test_recovery_of_a_swap_whose_run_died_keeps_files_written_meanwhile(tmp_path):
    """The run died after the swap, before deleting the old directory, and someone had created a
    file in the old directory during the swap: recovery moves it into the output directory."""
    out = tmp_path / "out"
    fileio.atomic_write_many(group(out, "v1"))
    old = tmp_path / "old-copy"
    old.mkdir()
    for name in ("a.json", "b.bin", "c.txt"):
        os.link(out / name, old / name)
    (old / "late.log").write_text("written during the swap")
    dead = dead_pid()
    staging = tmp_path / f".out{fileio.STAGING_TAG}{dead}.{old.stat().st_ino}.abcdefgh"
    old.rename(staging)
    report = fileio.recover_directory(str(out))
    assert report.staging_removed == 1 and report.rescued == [str(out / "late.log")]
    assert (out / "late.log").read_text() == "written during the swap" and not staging.exists()


@needs_exchange
def test_files_created_or_replaced_in_the_old_directory_during_the_swap_are_kept(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fileio.atomic_write_many(group(out, "v1"))
    (out / "log.txt").write_text("before")
    real_exchange = groups.exchange_paths

    def exchange_with_a_concurrent_writer(first, second):
        # Another process writes into the output directory after it was staged, before the swap.
        (Path(second) / "new.txt").write_text("created meanwhile")
        fileio.atomic_write(str(Path(second) / "log.txt"), "replaced meanwhile")
        real_exchange(first, second)

    monkeypatch.setattr(groups, "exchange_paths", exchange_with_a_concurrent_writer)
    fileio.atomic_write_many(group(out, "v2"))
    assert contents(out) == {
        "a.json": "v2:a.json",
        "b.bin": "v2:b.bin",
        "c.txt": "v2:c.txt",
        "log.txt": "replaced meanwhile",
        "new.txt": "created meanwhile",
    }
    assert leftovers(str(tmp_path)) == []


def test_a_journal_is_rolled_forward_and_a_damaged_one_is_reported(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("old")
    dead = dead_pid()
    temp = out / f".a.json.{dead}.abcdefgh.tmp"
    temp.write_text("new")
    journal = out / f"{fileio.JOURNAL_PREFIX}{dead}.abcdefgh.json"
    journal.write_text(
        json.dumps(
            {
                "format": fileio.JOURNAL_FORMAT,
                "version": 1,
                "moves": [{"temp": str(temp), "target": str(out / "a.json"), "size": 3}],
                "copies": [str(journal)],
            }
        )
    )
    report = fileio.recover_directory(str(out))
    assert report.journals_completed == 1 and report.files_moved == 1
    assert (out / "a.json").read_text() == "new" and os.listdir(out) == ["a.json"]
    temp.write_text("truncat")
    journal.write_text(json.dumps({"moves": [{"temp": str(temp), "target": str(out / "a.json"), "size": 99}]}))
    with pytest.raises(InputError, match=r"cannot be completed: its new version .* has 7 bytes, but 99 were written"):
        fileio.recover_directory(str(out))
    assert (out / "a.json").read_text() == "new"  # never replaced by a damaged file


def test_signals_are_held_during_a_commit_and_delivered_after(monkeypatch):
    hits = []
    with pytest.raises(KeyboardInterrupt):
        with atomic._deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            hits.append("still running")
    assert hits == ["still running"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_writable_dir_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    assert fileio.writable_dir_problem(str(tmp_path)) is None
    assert fileio.writable_dir_problem(str(tmp_path / "new" / "deeper")) is None
    assert "is an existing file" in fileio.writable_dir_problem(str(tmp_path / "file"))
    assert "because" in fileio.writable_dir_problem(str(tmp_path / "file" / "sub"))
    assert not (tmp_path / "new").exists()
