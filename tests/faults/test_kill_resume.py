"""kill -9 in the middle of a run, then resume=true: the same per-step losses as a run that was never stopped."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "recipe=pretrain_base",
    "experiment=smoke",
    "trainer.max_steps=24",
    "trainer.checkpoint_every_n_steps=10",
    "trainer.val_check_interval=5",  # the checkpoint at step 10 falls on a validation step
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.synthetic.num_clips=64",
]


def _losses(run_dir: Path) -> list[tuple[int, str]]:
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [(int(r["step"]), r["train/loss"]) for r in rows if r.get("train/loss")]


def _train(run_dir: Path, *extra: str, kill_after_step: int | None = None) -> None:
    """Train to the end, or kill -9 a few steps after the checkpoint of `kill_after_step` appeared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "magi_train", *COMMON, f"hydra.run.dir={run_dir}", *extra]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if kill_after_step is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return
    deadline = time.time() + 300
    ckpt = run_dir / "checkpoints" / f"step{kill_after_step:08d}.ckpt"
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps past the checkpoint
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(straight)
    _train(killed, kill_after_step=10)  # a few steps after the checkpoint of step 10, before the next (20)
    assert not (killed / "checkpoints" / "step00000020.ckpt").exists()
    _train(killed, "resume=true")
    assert _losses(killed) == _losses(straight)  # every step once, with the same loss
    assert [s for s, _ in _losses(straight)] == list(range(24))
