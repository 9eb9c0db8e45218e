"""Checkpoint faults (issue 13): a failed, killed or out-of-space write never leaves a file under a checkpoint's
name, and resume picks the newest checkpoint that verifies, skipping broken ones with a warning."""

import errno
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from magi_train.training import checkpoint_io
from magi_train.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from magi_train.training.resume import find_resume_checkpoint, verify_checkpoint
from tests.fixtures.smoke import SMOKE_TRAIN

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = ["recipe=pretrain_base", *SMOKE_TRAIN, "trainer.checkpoint_every_n_steps=2"]  # each sets max_steps
CKPT_MB = 32  # a smoke checkpoint: tiny DiT, its AdamW state and EMA (31.6 MB)


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _steps(folder: Path) -> dict[str, int]:
    """Every file under a checkpoint name, fully loaded: a partial one fails here."""
    return {
        p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"]
        for p in folder.glob("*.ckpt")
    }


# ---------------------------------------------------------------------------------------------------------
# the CheckpointIO plugin
# ---------------------------------------------------------------------------------------------------------


def test_plugin_writes_beside_the_target_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.0123abcd.tmp").write_bytes(b"PK")  # a killed writer's temporary
    (folder / ".config.yaml.0123abcd.tmp").write_bytes(b"x")  # not a checkpoint's: kept
    target = folder / "step00000001.ckpt"
    written_in = []
    save = torch.save

    def fails_midway(obj, stream):
        written_in.append(Path(os.readlink(f"/proc/self/fd/{stream.fileno()}")).parent)
        stream.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", fails_midway)
    plugin = AtomicCheckpointIO()
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step00000001.ckpt") as err:
        plugin.save_checkpoint({"global_step": 1}, target)
    assert err.value.errno == errno.ENOSPC and "earlier checkpoints are intact" in str(err.value)
    assert written_in == [folder]  # the temporary sat in the destination folder, not in $TMPDIR
    assert not target.exists() and _hidden(folder) == [".config.yaml.0123abcd.tmp"]

    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    plugin.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert verify_checkpoint(target).step == 1 and _hidden(folder) == [".config.yaml.0123abcd.tmp"]


# ---------------------------------------------------------------------------------------------------------
# resume: verification and order
# ---------------------------------------------------------------------------------------------------------


def _save(path: Path, step: int, at: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.full((256,), float(step))}}, path)
    os.utime(path, (at, at))
    return path


def _without_tensor_records(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if "/data/" not in info.filename:
                zout.writestr(info, zin.read(info))


def test_resume_skips_broken_checkpoints_with_a_warning_and_orders_by_step(tmp_path, caplog):
    now = time.time()
    ckpts = tmp_path / "checkpoints"
    good = _save(ckpts / "step00000004.ckpt", 4, now - 30)
    last = ckpts / "last.ckpt"
    last.write_bytes(b"")  # what a kill during Lightning's cross-file-system copy left
    os.utime(last, (now, now))
    assert find_resume_checkpoint(tmp_path, resume=True) == str(good)
    assert any("last.ckpt" in r.message and "0 bytes" in r.message for r in caplog.records)

    caplog.clear()
    last.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated: no central directory
    _without_tensor_records(good, ckpts / "last-v1.ckpt")  # a directory listing without the tensor data
    (tmp_path / "hpc_ckpt_2.ckpt" / "checkpoint").mkdir(parents=True)  # a sharded save that did not finish
    assert find_resume_checkpoint(tmp_path, resume=True) == str(good)
    warned = {Path(r.args[0]).name: str(r.args[1]) for r in caplog.records if r.levelname == "WARNING"}
    assert set(warned) == {"last.ckpt", "last-v1.ckpt", "hpc_ckpt_2.ckpt"}, warned
    assert "truncated" in warned["last.ckpt"] and "tensor records missing" in warned["last-v1.ckpt"]
    assert ".complete" in warned["hpc_ckpt_2.ckpt"]

    (tmp_path / "hpc_ckpt_2.ckpt" / ".complete").write_text('{"global_step": 5}')
    assert find_resume_checkpoint(tmp_path, resume=True) == str(
        tmp_path / "hpc_ckpt_2.ckpt"
    )  # step, not mtime
    old = _save(tmp_path / "hpc_ckpt_1.ckpt", 6, now - 100)
    assert find_resume_checkpoint(tmp_path, resume=True) == str(old)

    with pytest.raises(ValueError, match=r"ckpt_path=.*last.ckpt is not a usable checkpoint: .*truncated"):
        find_resume_checkpoint(tmp_path, ckpt_path=str(last))
    assert find_resume_checkpoint(tmp_path, ckpt_path=str(good)) == str(good)
    for p in (good, old):
        p.write_bytes(b"")
    shutil.rmtree(tmp_path / "hpc_ckpt_2.ckpt")
    with pytest.raises(ValueError, match=rf"no checkpoint in run directory {tmp_path} is usable"):
        find_resume_checkpoint(tmp_path, resume=True)


# ---------------------------------------------------------------------------------------------------------
# real runs with the run directory on its own small file system
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """mount(size_mb) -> a fresh tmpfs of that size (another file system than $TMPDIR); remount(size_mb) grows it."""
    mounts = []

    def mount(size_mb: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    def remount(where: Path, size_mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(where)], check=True)

    mount.remount = remount
    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_fails_clearly_and_resume_takes_the_previous_checkpoint(
    small_fs, compose, one_thread, caplog
):
    from magi_train.__main__ import run

    fs = small_fs(2 * CKPT_MB + 16)  # step 2's two checkpoints and the data fit, step 4's does not
    run_dir = fs / "run"
    with pytest.raises(CheckpointWriteError, match=r"step00000004.ckpt: .*No space left") as err:
        run(compose([*TINY_RUN, "trainer.max_steps=4", f"run_dir={run_dir}"]))
    assert err.value.errno == errno.ENOSPC
    ckpts = run_dir / "checkpoints"
    assert _steps(ckpts) == {"last.ckpt": 2, "step00000002.ckpt": 2} and _hidden(ckpts) == []

    (ckpts / "last.ckpt").write_bytes(b"")  # and the old failure on top: a 0-byte last.ckpt
    small_fs.remount(fs, 5 * CKPT_MB)
    chosen = find_resume_checkpoint(run_dir, resume=True)
    assert chosen == str(ckpts / "step00000002.ckpt")
    assert any("last.ckpt" in r.message and "0 bytes" in r.message for r in caplog.records)
    out = run(compose([*TINY_RUN, "trainer.max_steps=4", f"run_dir={run_dir}", "resume=true"]))
    assert out["global_step"] == 4
    assert verify_checkpoint(Path(find_resume_checkpoint(run_dir, resume=True))).step == 4


def _temps_past(folder: Path, size: int):
    for entry in os.scandir(folder):
        try:
            if entry.name.endswith(".tmp") and entry.stat().st_size >= size:
                yield entry.name
        except FileNotFoundError:  # renamed into place meanwhile
            pass


def test_kill_during_a_checkpoint_write_leaves_nothing_unreadable(small_fs, compose, one_thread, tmp_path):
    """kill -9 while a checkpoint after the first ones is being written (8 MB of 32 in), $TMPDIR elsewhere."""
    from magi_train.__main__ import run

    (tmp_path / "tmpdir").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the write is missed only if it falls between two polls
        run_dir = small_fs(6 * CKPT_MB) / "run"
        ckpts = run_dir / "checkpoints"
        overrides = [*TINY_RUN, "trainer.max_steps=6", f"run_dir={run_dir}"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "magi_train", *overrides], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        killed_during = None
        try:
            while proc.poll() is None and killed_during is None:
                if (ckpts / "last.ckpt").exists():
                    killed_during = next(_temps_past(ckpts, 8 * 2**20), None)  # well into the tensor data
                    if killed_during:
                        proc.kill()
                time.sleep(0.0005)
        finally:
            proc.kill()
            proc.wait()
        if killed_during:
            break
    else:
        pytest.fail("no checkpoint write was caught in 3 runs")

    steps = _steps(ckpts)  # every file under a checkpoint name loads completely
    assert steps and max(steps.values()) in (2, 4), (steps, killed_during)
    newest = max(steps.values())
    chosen = Path(find_resume_checkpoint(run_dir, resume=True))
    assert steps[chosen.name] == newest
    out = run(compose([*overrides, "resume=true"]))
    assert out["global_step"] == 6
    assert max(_steps(ckpts).values()) == 6 and _hidden(ckpts) == []  # the killed writer's temporary swept
