"""kill -9 in the middle of a run, then resume=true: the same per-step losses as a run that was never stopped,
for pretraining and DMD-2, on one process, on 2 DDP ranks and on 2 FSDP2 ranks (gloo; sharded checkpoint directories
with the sharded EMA), with the checkpoint on a validation step; the one-process pretraining runs route tokens (TREAD)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS, CKPT = 12, 6
COMMON = [
    "experiment=smoke",
    f"trainer.max_steps={STEPS}",
    f"trainer.checkpoint_every_n_steps={CKPT}",
    "trainer.val_check_interval=3",  # the checkpoint at step 6 falls on a validation step
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.synthetic.num_clips=64",
]
# the DDP runs go without EMA (here it only costs time); the FSDP2 runs keep theirs (on the local shards)
LAYOUTS = {
    "one process": [],
    "2 ddp ranks": ["strategy=ddp", "trainer.devices=2", "ema.decay=0"],
    "2 fsdp2 ranks": ["strategy=fsdp2", "trainer.devices=2"],
}
LOSS = {"pretrain_base": "train/loss", "dmd2_distill": "train/critic_loss"}
TREAD = "model.tread={selection_rate:0.5,start_layer_idx:1,end_layer_idx:2}"


def _losses(run_dir: Path, column: str) -> list[tuple[int, str]]:
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [(int(r["step"]), r[column]) for r in rows if r.get(column)]


def _has_step(run_dir: Path, step: int) -> bool:
    """metrics.csv holds the training loss of `step` (Lightning writes that row only after the step's checkpoint, so
    a kill in between loses it; see the notes of issue 10)."""
    try:
        return any(s == step for column in LOSS.values() for s, _ in _losses(run_dir, column))
    except (FileNotFoundError, csv.Error):
        return False


def _train(run_dir: Path, overrides: list[str], kill_after_checkpoint: int | None = None) -> None:
    """Train to the end, or kill -9 (every rank) a few steps after the checkpoint of that step appeared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "magi_train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if kill_after_checkpoint is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return
    ckpt = run_dir / "checkpoints" / f"step{kill_after_checkpoint:08d}.ckpt"
    deadline = time.time() + 300

    def written() -> bool:  # a file, or a sharded directory once its completion marker is there
        return ckpt.is_file() or (ckpt / ".complete").is_file()

    while (
        time.time() < deadline
        and proc.poll() is None
        and not (written() and _has_step(run_dir, kill_after_checkpoint - 1))
    ):
        time.sleep(0.05)
    time.sleep(0.3)  # a step or two past the checkpoint
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    _train(run_dir, ["recipe=pretrain_base", "experiment=smoke", "trainer.max_steps=2",
                     "trainer.val_check_interval=null", "data.synthetic.num_clips=8"])  # fmt: skip
    return run_dir / "checkpoints" / "last.ckpt"


# DMD-2 on DDP ranks is left out for CI time: FSDP2 covers multi-rank DMD-2 (sharded roles, per-rank streams) and DDP
# multi-rank resume is shown by pretraining
CASES = [(r, layout) for r in LOSS for layout in LAYOUTS if (r, layout) != ("dmd2_distill", "2 ddp ranks")]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "layout"), CASES)
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path, teacher, recipe, layout):
    overrides = [f"recipe={recipe}", *COMMON, *LAYOUTS[layout]]
    if (recipe, layout) == ("pretrain_base", "one process"):
        # TREAD routing on (tiny: layers 1..2) at no extra cost: its choice comes from (seed, step, data index)
        overrides.append(TREAD)
    if recipe == "dmd2_distill":
        overrides += [f"distill.teacher.checkpoint={teacher}", "distill.generator_every=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(straight, overrides)
    _train(killed, overrides, kill_after_checkpoint=CKPT)
    assert not (killed / "checkpoints" / f"step{STEPS:08d}.ckpt").exists()  # killed before the end
    _train(killed, [*overrides, "resume=true"])
    column = LOSS[recipe]
    assert [s for s, _ in _losses(straight, column)] == list(range(STEPS))
    assert _losses(killed, column) == _losses(straight, column)  # every step once, with the same loss
    if layout != "one process" and recipe == "pretrain_base":  # each rank's RNG travels with the checkpoint
        last = killed / "checkpoints" / "last.ckpt"
        rng = torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)["rng_per_rank"]
        assert len(rng) == 2
