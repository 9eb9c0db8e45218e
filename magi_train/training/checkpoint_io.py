"""Checkpoints that are complete or absent, on any file system: files written beside their final name and renamed
into place (a Lightning CheckpointIO), completion markers for the directories of the sharded strategies.

Lightning's own TorchCheckpointIO goes through an fsspec transaction, which stages the file in $TMPDIR and copies it
when the run directory is on another file system (a parallel FS): a kill or a full disk during the copy leaves a
partial file under the checkpoint's name. FSDP (state_dict_type=sharded) and DeepSpeed write directories with their
own code, in place; `MarkedDirectoryCheckpoints` marks such a directory complete only after every rank finished.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from magi_train.utils.fileio import atomic_stream, atomic_write, fsync_path, remove_temps

# The file, last written into a checkpoint directory, that says it is complete; it holds {"global_step": N}.
COMPLETE = ".complete"
# fileio's temporaries of a checkpoint file: .<name>.ckpt.<8 hex>.tmp
_CHECKPOINT_TEMP = re.compile(r"\.(?P<name>.+\.ckpt)\.[0-9a-f]{8}\.tmp")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the checkpoints written before it are untouched."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (torch.save reports a failed write as a RuntimeError of its zip writer)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    cause = _os_error(exc)
    code = cause.errno if cause is not None and cause.errno else errno.EIO
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointWriteError(
        code,
        f"could not write checkpoint {path}: {cause or exc} ({free} in {path.parent}); nothing was left under its "
        "name and the earlier checkpoints are intact",
    )


def remove_checkpoint_temps(folder: Path) -> list[Path]:
    """Delete the temporaries of checkpoint files that a killed writer left in `folder`; returns them."""
    if not folder.is_dir():
        return []
    names = {m["name"] for entry in folder.iterdir() if (m := _CHECKPOINT_TEMP.fullmatch(entry.name))}
    return [tmp for name in sorted(names) for tmp in remove_temps(folder / name)]


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save streamed into a hidden temporary in the destination folder, fsynced, then renamed into place.

    Every single-file checkpoint goes through here: ModelCheckpoint's (step*.ckpt, last.ckpt), the Slurm preemption
    checkpoint (hpc_ckpt_N.ckpt) and `trainer.save_checkpoint`, for every strategy that saves one file (auto, DDP,
    FSDP with state_dict_type=full); Lightning calls it on global rank 0 only. The first save into a folder deletes
    the temporaries that a killed run left there (no other process writes this run's checkpoints).
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (local files only)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in self._swept:
            self._swept.add(path.parent)
            remove_checkpoint_temps(path.parent)
        try:
            with atomic_stream(path) as stream:  # streamed: no second copy of the checkpoint in memory
                torch.save(checkpoint, stream)
        except (OSError, RuntimeError) as exc:
            raise _write_error(path, exc) from exc


def _fsync_files(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


class MarkedDirectoryCheckpoints:
    """Strategy mixin (before the Lightning strategy in the bases): a checkpoint directory gets its COMPLETE marker
    only after every rank's part of it is written and synced, and loses it before it is written again.

    For the strategies that write directories with their own code (FSDP state_dict_type=sharded: torch distributed
    checkpoint; DeepSpeed: engine.save_checkpoint), overwriting last.ckpt in place. A single-file checkpoint is
    left to the CheckpointIO. Resume (training/resume.py) uses only marked directories.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(self.broadcast(str(filepath)))
        step = int(checkpoint["global_step"])
        if self.is_global_zero and path.is_dir():
            (path / COMPLETE).unlink(missing_ok=True)
            fsync_path(path)
        self.barrier(
            "checkpoint marker removed"
        )  # no rank rewrites a directory that still claims to be complete
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if not self.broadcast(path.is_dir()):
            return
        _fsync_files(path)  # every rank: its own shards reach the disk (the others' are clean in its cache)
        self.barrier("checkpoint shards written")
        if self.is_global_zero:
            atomic_write(path / COMPLETE, json.dumps({"global_step": step}) + "\n")
