"""Launching: local submitit multirun, the Slurm launcher config as sbatch renders it, the sandwich sweep,
the sbatch template, and SIGUSR1 -> checkpoint -> requeue -> resume under a (simulated) Slurm job."""

import itertools
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

import magi_train.training.run as train_module
from magi_train.__main__ import run
from magi_train.config import register_configs
from magi_train.models.dit import DiTConfig

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(REPO / "configs")


def compose_with_hydra(overrides: list[str]):
    """The root config including its `hydra` node (launcher, sweeper), as a -m run composes it."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_submitit_local_multirun_runs_both_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi_train",
            "-m",
            "recipe=pretrain_base",
            "experiment=smoke",
            "hydra/launcher=submitit_local",
            "optim.lr=1e-3,3e-4",
            "trainer.max_steps=2",
            "trainer.val_check_interval=null",
            "trainer.enable_progress_bar=false",
            "data.synthetic.num_clips=32",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    lrs = {}
    for job in ("0", "1"):
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2
        lrs[job] = ckpt["magi_config"]["optim"]["lr"]
    assert sorted(lrs.values()) == [3e-4, 1e-3]
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit


def render_sbatch(launcher: dict, folder: Path) -> str:
    """The sbatch script hydra-submitit-launcher would submit (its launch(), without the submission)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {
        k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")
    }
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=launcher["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")


def test_slurm_launcher_renders_requeueable_multinode_job(tmp_path, monkeypatch):
    _executable(tmp_path / "srun", "#!/bin/sh\n")  # submitit checks that srun exists, nothing more
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cfg = compose_with_hydra(
        [
            "recipe=pretrain_base",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=h100",
            "hydra.launcher.account=proj42",
            "hydra.launcher.timeout_min=600",
            "trainer.devices=8",
            "trainer.num_nodes=2",
        ]
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    text = render_sbatch(launcher, tmp_path / "submitit")
    for line in (
        "--partition=h100",
        "--account=proj42",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--time=600",
        "--requeue",
        "--signal=USR1@120",
    ):
        assert f"#SBATCH {line}\n" in text, text
    assert "USR2" not in text  # Lightning, not submitit, handles the pre-emption signal


def test_slurm_launcher_needs_numeric_devices():
    cfg = compose_with_hydra(["recipe=pretrain_base", "hydra/launcher=slurm"])  # trainer.devices=auto
    with pytest.raises(Exception, match=r"trainer\.devices=8"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_sandwich_sweep_composes_every_run_with_wandb_group_and_tags():
    base = ["recipe=pretrain_base", "experiment=sweep_sandwich", "data.train_shards=/data/shards"]
    params = compose_with_hydra(base).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    runs = list(itertools.product(*axes))
    assert len(runs) == 12  # 3 sandwich depths x gating on/off x 2 learning rates
    seen = set()
    for run_overrides in runs:
        cfg = compose_with_hydra(base + list(run_overrides))
        DiTConfig(**OmegaConf.to_container(cfg.model)).validate()
        mm = list(cfg.model.mm_layers)
        depth = len(mm) // 2
        assert mm == list(range(depth)) + list(range(24 - depth, 24))  # symmetric sandwich of `small`
        assert cfg.logger.wandb and cfg.logger.group == "sweep_sandwich"
        tags = list(cfg.logger.tags)
        assert f"gating={cfg.model.enable_attn_gating}" in tags and f"lr={cfg.optim.lr}" in tags
        seen.add((depth, cfg.model.enable_attn_gating, cfg.optim.lr, cfg.logger.name))
    assert {d for d, *_ in seen} == {1, 2, 4} and len(seen) == 12  # distinct runs, distinct W&B names


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_sbatch_template_starts_ranks_in_a_job_fixed_run_dir(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # one "task": drop srun's own options, run the command with the task's rank variables
    _executable(
        bin_dir / "srun",
        '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n',
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "RUN_ROOT": str(tmp_path / "runs"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "magi",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1",
    }
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "train.sbatch"), "recipe=pretrain_base", "model=tiny", "dry_run=true"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "parameters: 1,970,816" in out.stdout  # the tiny model, built by the rank the template started
    run_dir = tmp_path / "runs" / "magi" / "4242"
    saved = OmegaConf.load(run_dir / ".hydra" / "rank0" / "overrides.yaml")
    assert "trainer.devices=1" in saved and "trainer.num_nodes=1" in saved
    assert (run_dir / "rank0.log").is_file()


class _PreemptAt(Callback):
    """Plays Slurm: sends SIGUSR1 to this process after a given training step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_sigusr1_saves_requeues_and_the_requeued_job_resumes(compose, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    # `scontrol requeue <id>`: record it, then stop the job as Slurm does (SIGTERM to the job's processes)
    _executable(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "magi",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(key, value)

    build = train_module.build_trainer
    preempt = [_PreemptAt(3)]
    monkeypatch.setattr(
        train_module,
        "build_trainer",
        lambda *args, **kwargs: build(*args[:4], args[4] + preempt, **kwargs),
    )
    run_dir = tmp_path / "run"
    overrides = [
        "recipe=pretrain_base",
        "experiment=smoke",
        f"run_dir={run_dir}",
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.val_check_interval=null",
        "trainer.enable_progress_bar=false",
        "data.synthetic.num_clips=16",
    ]
    with pytest.raises(SIGTERMException):
        run(compose(overrides))
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] == 3  # newer than checkpoints/last.ckpt (step 2)

    preempt.clear()  # the requeued job: same command, same run directory, no flags
    find = train_module.find_resume_checkpoint
    chosen = []
    monkeypatch.setattr(
        train_module, "find_resume_checkpoint", lambda *a: chosen.append(find(*a)) or chosen[-1]
    )
    out = run(compose(overrides))
    assert chosen == [str(run_dir / "hpc_ckpt_1.ckpt")]  # the preemption checkpoint, not last.ckpt (step 2)
    assert out["global_step"] == 4
