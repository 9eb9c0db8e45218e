"""Crash-safe file writes shared by every module: write a temporary file beside the target, then rename it.

Readers (a resumed run, a second Slurm task, a person) never see a half-written file or directory: a rename
within one folder is atomic on POSIX file systems. Temporaries are hidden and sit beside their target (same
file system), named `.<target name>.<8 hex>.tmp`; `remove_temps` deletes the ones a killed writer left behind.
They are created with the permissions a plain `open()` or `mkdir()` would give (umask applies), not 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.(tmp|old)")


def fsync_path(path: str | Path) -> None:
    """Flush a file or folder to disk, best effort (some file systems refuse to open or sync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _beside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")


def _new_temp_file(path: Path) -> tuple[Path, int]:
    """Create a fresh hidden temporary file beside `path`; returns it and an fd open for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _beside(path, "tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # 2^-32 per try
            continue


def atomic_file(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, flush it, then rename it over `path`.

    `tmp` exists (empty) when `write` is called and ends in `.tmp`: pass the format to writers that guess it
    from the extension (`savefig(tmp, format="png")`).
    """
    path = Path(path)
    tmp, fd = _new_temp_file(path)
    os.close(fd)
    try:
        write(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)  # makes the rename itself durable
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8, newlines as given) or bytes to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_file(path, lambda tmp: Path(tmp).write_bytes(payload))


@contextlib.contextmanager
def atomic_stream(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary stream on a temporary file beside `path`, for writers that stream (tar shards).

    On leaving the block normally the stream is flushed, synced, closed and renamed over `path`; on an error
    it is closed and deleted, and `path` is left as it was. The caller must not close the stream itself.
    """
    path = Path(path)
    tmp, fd = _new_temp_file(path)
    stream = os.fdopen(fd, "wb")
    try:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(tmp, path)
    except BaseException:
        stream.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _check_dir_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")


def atomic_dir(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp)` on an empty temporary directory beside `path`, sync it, then rename it to `path`.

    An existing empty directory is replaced; a non-empty one only with overwrite=True, else FileExistsError
    (checked before `write` and again before the rename). A directory cannot be renamed over a non-empty
    one, so the old one is first renamed aside, the new one moved in and only then is the old one deleted:
    a failure at any point leaves `path` holding the old or the new version, complete (it is missing only
    between those two renames). On an error the temporary directory is deleted.
    """
    path = Path(path)
    _check_dir_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _beside(path, "tmp")
        try:
            tmp.mkdir(0o777)  # not mkdtemp: its 0700 would make a shared checkpoint unreadable to others
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        _fsync_tree(tmp)
        _check_dir_target(path, overwrite)  # again: something may have appeared while we were writing
        if not path.exists():
            os.rename(tmp, path)
        else:
            old = _beside(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    return path


def remove_temps(path: str | Path) -> list[Path]:
    """Delete the temporaries that interrupted atomic writes of `path` left beside it; returns them.

    Only for a caller that knows no other process is writing `path` right now (it would lose its temporary).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        m = _TEMP.fullmatch(entry.name)
        if m and m["name"] == path.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            found.append(entry)
    return found
