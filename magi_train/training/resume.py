"""Which checkpoint a training run continues from: an explicit path, `resume=true`, or a requeued Slurm job.

Only a checkpoint that passes a quick structural check is used: a torch zip file whose central directory (at the
end of the file, written last) lists the pickle and every tensor record it refers to, or a sharded directory with
its completion marker (training/checkpoint_io.py). Candidates are ordered by the training step they hold.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment

from magi_train.training.checkpoint_io import COMPLETE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that verified: its path, the training step it holds and when it was written."""

    path: Path
    step: int
    written_at: float


def _written_at(path: Path) -> float:
    """Last write time of a checkpoint file, or of the newest file in a sharded checkpoint directory."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


class _Opaque(dict):
    """Stands for every object of a checkpoint's pickle: nothing is imported or run while reading it."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Skeleton(pickle.Unpickler):
    """Unpickles a torch.save pickle into plain containers and _Opaque stand-ins, collecting tensor record keys."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.records: list[str] = []

    def find_class(self, module: str, name: str):
        return _Opaque

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        self.records.append(str(pid[2]))  # ("storage", storage type, key, location, numel)
        return None


def _file_step(path: Path) -> int:
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        archive = zipfile.ZipFile(path)  # reads the central directory only
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a complete torch zip file ({exc}): truncated or not a checkpoint") from exc
    with archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"not a torch checkpoint: {len(pickles)} data.pkl records")
        prefix = pickles[0].removesuffix("data.pkl")
        try:
            skeleton = _Skeleton(archive.read(pickles[0]))  # checks the record's CRC
            top = skeleton.load()
        except Exception as exc:  # a damaged pickle fails in many ways (bad CRC, opcode, argument)
            raise ValueError(f"unreadable pickle record: {exc!r}") from exc
        missing = [k for k in skeleton.records if f"{prefix}data/{k}" not in names]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(skeleton.records)} tensor records missing (first: data/{missing[0]})"
            )
        end = max(i.header_offset + i.compress_size for i in archive.infolist())
        if end > path.stat().st_size:
            raise ValueError("records extend past the end of the file")
    step = top.get("global_step") if isinstance(top, dict) else None
    if not isinstance(step, int):
        raise ValueError("holds no global_step: not a Lightning training checkpoint")
    return step


def _directory_step(path: Path) -> int:
    marker = path / COMPLETE
    if not marker.is_file():
        raise ValueError(
            f"directory without its completion marker {COMPLETE} (written last): a save that did not finish. If "
            f'you know it is complete, write {{"global_step": <step>}} to {marker}'
        )
    try:
        return int(json.loads(marker.read_text())["global_step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{marker} holds no global_step ({exc})") from exc


def verify_checkpoint(path: Path) -> Checkpoint:
    """Structural check of a checkpoint file or directory (no tensor data is read); ValueError says why it fails.

    A file costs the read of its zip central directory and its pickle (kilobytes to a few MB: names and shapes,
    independent of the tensor bytes), a directory the read of its marker.
    """
    try:
        step = _directory_step(path) if path.is_dir() else _file_step(path)
        return Checkpoint(path, step, _written_at(path))
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc})") from exc


def _candidates(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted({*folder.glob("last*.ckpt"), *folder.glob("step*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")})


def usable_checkpoints(run_dir: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """(the checkpoints of a run directory that verify, newest first; the others with the reason).

    Candidates: checkpoints/last*.ckpt (Lightning writes last-v1.ckpt, ... beside last.ckpt when a resumed run's
    checkpoint settings changed), checkpoints/step*.ckpt and the preemption checkpoints hpc_ckpt_N.ckpt. Newest
    means the highest training step, then the latest write (last.ckpt is written after step*.ckpt of its step).
    """
    good, bad = [], []
    for path in _candidates(run_dir):
        try:
            good.append(verify_checkpoint(path))
        except ValueError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            bad.append((path, str(exc)))
    good.sort(key=lambda c: (c.step, c.written_at), reverse=True)
    return good, bad


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies (see usable_checkpoints), or None."""
    good, _ = usable_checkpoints(run_dir)
    return good[0].path if good else None


def find_resume_checkpoint(
    run_dir: Path, ckpt_path: str | None = None, resume: bool = False, slurm_requeue: bool = True
) -> str | None:
    """ckpt_path (verified), else with resume=true the newest checkpoint of the run directory that verifies.

    A requeued Slurm job (Lightning detects Slurm; trainer.slurm_requeue) resumes from the newest checkpoint of
    its run directory without flags, as Lightning's own auto-requeue does, but never from a preemption checkpoint
    that a later last.ckpt has superseded. Checkpoints that fail verification are skipped with a warning each;
    a run directory whose checkpoints all fail is an error (never a silent restart from step 0).
    """
    if ckpt_path:
        if not Path(ckpt_path).exists():
            raise ValueError(f"ckpt_path={ckpt_path} does not exist")
        try:
            verify_checkpoint(Path(ckpt_path))
        except ValueError as exc:
            raise ValueError(f"ckpt_path={ckpt_path} is not a usable checkpoint: {exc}") from exc
        return ckpt_path
    requeued = slurm_requeue and SLURMEnvironment.detect()
    if not resume and not requeued:
        return None
    good, bad = usable_checkpoints(run_dir)
    if good:
        chosen = good[0]
        if requeued and not resume:
            log.info(
                "Slurm job with checkpoints in its run directory (requeued): resuming from %s", chosen.path
            )
        log.info("resuming from %s (step %d)", chosen.path, chosen.step)
        return str(chosen.path)
    if bad:
        listed = "; ".join(f"{p.relative_to(run_dir)}: {why}" for p, why in bad)
        raise ValueError(
            f"{'resume=true' if resume else 'requeued Slurm job'}: no checkpoint in run directory {run_dir} is "
            f"usable ({listed}). Pass ckpt_path=<a good checkpoint>, or start a new run directory"
        )
    if resume:
        raise ValueError(
            f"resume=true but {run_dir} holds no checkpoints/last.ckpt, checkpoints/step*.ckpt nor hpc_ckpt_*.ckpt: "
            "pass hydra.run.dir=<the run's directory>"
        )
    return None
