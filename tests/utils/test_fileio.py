"""The crash-safe writes of utils/fileio: files, streams and directories appear complete or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from magi_train.utils.fileio import atomic_dir, atomic_file, atomic_stream, atomic_write, remove_temps


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic_write(target, "one\n") == target
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert _names(target.parent) == ["a.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() would make it, not mkstemp's 0600


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = atomic_write(tmp_path / "a.txt", "old")
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(target, write)
    assert Path(seen[0]).parent == tmp_path and Path(seen[0]).name.startswith(".a.txt.")  # hidden, beside
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["a.txt"]


def test_atomic_stream_renames_on_success(tmp_path):
    target = tmp_path / "shard.tar"
    with atomic_stream(target) as f:
        f.write(b"abc")
        assert not target.exists()
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(".shard.tar.") and tmp.name.endswith(".tmp")
        f.write(b"def")
    assert target.read_bytes() == b"abcdef"
    assert _names(tmp_path) == ["shard.tar"]


def test_atomic_stream_failure_midway_leaves_nothing(tmp_path):
    target = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="boom"), atomic_stream(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert f.closed
    assert _names(tmp_path) == []
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_stream(target) as f:
        f.write(b"new but partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["shard.tar"]


def _fill(files: dict[str, str]):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    return write


def test_atomic_dir_writes_and_replaces_an_empty_directory(tmp_path):
    target = tmp_path / "ckpt"
    assert atomic_dir(target, _fill({"a.bin": "1", "sub/b.bin": "2"})) == target
    assert (target / "sub" / "b.bin").read_text() == "2"
    assert _names(tmp_path) == ["ckpt"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_dir(empty, _fill({"a.bin": "x"}))  # an existing empty directory is not in the way
    assert _names(empty) == ["a.bin"]


def test_atomic_dir_refuses_a_non_empty_target_without_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir(target, _fill({"old.bin": "old"}))
    called = []
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_dir(target, lambda tmp: called.append(tmp))
    assert not called  # refused before writing anything
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        atomic_dir(tmp_path / "file", _fill({}), overwrite=True)

    def appears_meanwhile(tmp: Path) -> None:  # another writer finishes first: checked again at the rename
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "theirs").write_text("theirs")

    with pytest.raises(FileExistsError):
        atomic_dir(tmp_path / "late", appears_meanwhile)
    assert _names(tmp_path / "late") == ["theirs"]
    assert _names(tmp_path) == ["ckpt", "file", "late"]


def test_atomic_dir_overwrite_swaps_in_the_new_version(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir(target, _fill({"old.bin": "old", "stale.bin": "stale"}))
    atomic_dir(target, _fill({"new.bin": "new"}), overwrite=True)
    assert _names(target) == ["new.bin"]
    assert _names(tmp_path) == ["ckpt"]  # neither the temporary nor the parked old directory is left


def test_atomic_dir_failure_midway_keeps_the_old_version(tmp_path):
    def half(tmp: Path) -> None:
        (tmp / "part.bin").write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(tmp_path / "fresh", half)
    assert _names(tmp_path) == []
    target = atomic_dir(tmp_path / "ckpt", _fill({"old.bin": "old"}))
    with pytest.raises(OSError, match="disk full"):
        atomic_dir(target, half, overwrite=True)
    assert _names(target) == ["old.bin"] and (target / "old.bin").read_text() == "old"
    assert _names(tmp_path) == ["ckpt"]


def test_atomic_dir_failed_swap_puts_the_old_version_back(tmp_path, monkeypatch):
    target = atomic_dir(tmp_path / "ckpt", _fill({"old.bin": "old"}))
    real = os.rename

    def rename(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new version's move into place fails
            raise OSError("rename failed (simulated)")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic_dir(target, _fill({"new.bin": "new"}), overwrite=True)
    assert _names(target) == ["old.bin"]
    assert _names(tmp_path) == ["ckpt"]


def test_remove_temps_deletes_only_the_targets_leftovers(tmp_path):
    target = tmp_path / "a.tar"
    leftovers = [tmp_path / ".a.tar.0123abcd.tmp", tmp_path / ".a.tar.89abcdef.old"]
    leftovers[0].write_bytes(b"partial")
    leftovers[1].mkdir()
    (leftovers[1] / "x").write_text("x")
    others = [".a.tar.b.0123abcd.tmp", ".b.tar.0123abcd.tmp", "a.tar", ".a.tar.notatemp.tmp"]
    for name in others:
        (tmp_path / name).write_text("keep")
    assert sorted(remove_temps(target)) == sorted(leftovers)
    assert _names(tmp_path) == sorted(others)
    assert remove_temps(tmp_path / "missing" / "x") == []
