"""Known user errors end with one short message naming the key and the fix, exit code 2; bugs keep their traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "magi_train", *overrides],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["recipe=dmd2_distill", "distill.teacher.checkpoint=/nope/last.ckpt", "distill.teacher.train_overrides=[]"],
         "distill.teacher.checkpoint=/nope/last.ckpt"),
        (["recipe=pretrain_base", "init_from=/nope/base"], "init_from=/nope/base"),
        (["recipe=pretrain_base", "strategy.name=zero9"], "strategy.name='zero9'"),
        (["recipe=pretrain_base", "trainer.devices=0"], "devices=0"),
    ],
)  # fmt: skip
def test_user_error_is_one_short_message_with_exit_2(tmp_path, overrides, names):
    out = _cli(*overrides, "experiment=smoke", "data.synthetic.num_clips=8", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Warning" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and names in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    printed = [
        line for line in (out.stdout + out.stderr).splitlines() if line.strip() and "Warning" not in line
    ]
    assert len(printed) <= 3, printed


@pytest.mark.parametrize("key", ["run_dir", "hydra.run.dir"])
def test_unwritable_run_directory_names_hydra_run_dir(tmp_path, key):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    where = [f"run_dir={blocker / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    if key == "hydra.run.dir":
        where = [f"hydra.run.dir={blocker / 'run'}"]
    out = _cli("recipe=pretrain_base", "experiment=smoke", *where, cwd=tmp_path)
    assert out.returncode == 2 and "hydra.run.dir" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) <= 3, out.stderr


def test_only_errors_raised_by_magi_train_are_shortened():
    """Control: a ValueError raised inside a library (or Python) is a bug and keeps its traceback."""
    from magi_train.__main__ import raised_by_us
    from magi_train.training.resume import find_resume_checkpoint

    with pytest.raises(ValueError) as info:
        int("x")
    assert not raised_by_us(info.value)
    with pytest.raises(ValueError) as info:
        find_resume_checkpoint(Path("/nonexistent-run"), resume=True)
    assert raised_by_us(info.value)
