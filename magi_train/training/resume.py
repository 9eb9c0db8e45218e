"""Which checkpoint a training run continues from: an explicit path, `resume=true`, or a requeued Slurm job."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def _written_at(path: Path) -> float:
    """Last write time of a checkpoint file, or of the newest file in a sharded checkpoint directory."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The latest of <run_dir>/checkpoints/last*.ckpt and the preemption checkpoints <run_dir>/hpc_ckpt_N.ckpt.

    A checkpoint is a file, or a directory for sharded strategies (DeepSpeed, FSDP state_dict_type=sharded).
    Lightning writes last-v1.ckpt, ... beside last.ckpt when a resumed run's checkpoint settings changed.
    """
    found = [*(run_dir / "checkpoints").glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max(found, key=_written_at, default=None)


def find_resume_checkpoint(
    run_dir: Path, ckpt_path: str | None = None, resume: bool = False, slurm_requeue: bool = True
) -> str | None:
    """ckpt_path, else with resume=true the newest checkpoint of the run directory.

    A requeued Slurm job (Lightning detects Slurm; trainer.slurm_requeue) resumes from the newest
    checkpoint of its run directory without flags, as Lightning's own auto-requeue does, but never from a
    preemption checkpoint that a later last.ckpt has superseded.
    """
    if ckpt_path:
        if not Path(ckpt_path).exists():
            raise ValueError(f"ckpt_path={ckpt_path} does not exist")
        return ckpt_path
    newest = newest_checkpoint(run_dir)
    if resume:
        if newest is None:
            raise ValueError(
                f"resume=true but {run_dir} holds no checkpoints/last.ckpt nor hpc_ckpt_*.ckpt: "
                "pass hydra.run.dir=<the run's directory>"
            )
        return str(newest)
    if newest is not None and slurm_requeue and SLURMEnvironment.detect():
        log.info("Slurm job with checkpoints in its run directory (requeued): resuming from %s", newest)
        return str(newest)
    return None
