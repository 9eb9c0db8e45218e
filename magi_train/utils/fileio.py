"""Crash-safe file writes shared by every module: write a temporary file beside the target, then rename it.

Readers (a resumed run, a second Slurm task, a person) never see a half-written file: a rename within one
folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def atomic_file(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, flush it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8, newlines as given) or bytes to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_file(path, lambda tmp: Path(tmp).write_bytes(payload))
