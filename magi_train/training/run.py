"""One run skeleton for every training recipe: pretrain_base and pretrain_sr (flow matching), dmd2_distill (DMD-2).

Each runner gets narrow, typed config nodes from `magi_train.__main__` (never the root config), builds its model(s),
task and data, and hands them to `fit`: run directory, seed, config.yaml, resume checkpoint, Trainer.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from magi_train.config import (
    DataConfig,
    DistillConfig,
    EMAConfig,
    FlowConfig,
    LoggerConfig,
    OptimConfig,
    SRConfig,
    StrategyConfig,
    TrainerConfig,
)
from magi_train.data.datamodule import ClipDataModule
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.parallelize import parallelize
from magi_train.models.weights import apply_dtype_policy, check_source, empty_dit, load_dit
from magi_train.tasks.dmd2 import DMD2Task, validate_distill
from magi_train.tasks.ema import StudentEMA
from magi_train.tasks.pretrain import PretrainTask
from magi_train.tasks.super_resolution import SuperResolutionTask
from magi_train.training.data_report import DataReport
from magi_train.training.resume import find_resume_checkpoint
from magi_train.training.strategies import strategy_applies_activation_checkpointing
from magi_train.training.trainer import build_trainer
from magi_train.utils.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every training run needs besides its config groups (the root's own keys, narrowed by __main__)."""

    run_dir: Path
    seed: int
    resolved: dict[str, Any]  # the root config, written to config.yaml and stored in every checkpoint
    dry_run: bool = False
    resume: bool = False
    ckpt_path: str | None = None


@dataclass
class TrainerNodes:
    """The config nodes of the Lightning Trainer."""

    trainer: TrainerConfig
    strategy: StrategyConfig
    logger: LoggerConfig


def start_run(ctx: RunContext, nodes: TrainerNodes) -> str | None:
    """Create the run directory, write config.yaml, seed every RNG; returns the checkpoint to resume from."""
    ckpt_path = find_resume_checkpoint(ctx.run_dir, ctx.ckpt_path, ctx.resume, nodes.trainer.slurm_requeue)
    try:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ctx.run_dir / "config.yaml", yaml.safe_dump(ctx.resolved, sort_keys=False))
    except OSError as err:
        raise ValueError(
            f"cannot write the run directory {ctx.run_dir} ({err.strerror}): pass hydra.run.dir=<a writable directory>"
        ) from err
    L.seed_everything(ctx.seed, workers=True)
    return ckpt_path


def _holds_teacher(ckpt_path: str | None) -> bool:
    if ckpt_path is None:
        return False
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return any(k.startswith("teacher.") for k in ckpt.get("state_dict", {}))


def fit(
    ctx: RunContext,
    nodes: TrainerNodes,
    task: L.LightningModule,
    datamodule: L.LightningDataModule,
    callbacks: list[Callback],
    ckpt_path: str | None,
    **trainer_options: Any,
) -> dict[str, Any]:
    """Build the Trainer (training/trainer.py build_trainer) and train `task`; returns the final step and run_dir."""
    callbacks = [*callbacks, DataReport(ctx.run_dir)]  # skip counts per reason -> metrics, data_report.json
    trainer = build_trainer(
        nodes.trainer,
        nodes.strategy,
        nodes.logger,
        ctx.run_dir,
        callbacks,
        resolved=ctx.resolved,
        **trainer_options,
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"global_step": trainer.global_step, "run_dir": str(ctx.run_dir)}


def _own_activation_checkpointing(strategy: StrategyConfig) -> bool:
    # FSDP applies activation checkpointing itself, after wrapping (training/strategies.py)
    return not strategy_applies_activation_checkpointing(strategy.name)


# ---------------------------------------------------------------------------------------------------------
# pretraining: the base DiT (task pretrain) and the latent SR DiT (task pretrain_sr)
# ---------------------------------------------------------------------------------------------------------


def run_pretrain(
    ctx: RunContext,
    nodes: TrainerNodes,
    model_cfg: DiTConfig,
    data: DataConfig | None,
    flow: FlowConfig,
    optim: OptimConfig,
    ema: EMAConfig,
    *,
    sr: SRConfig | None = None,
    init_from: str | None = None,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Train the base DiT (sr None) or the latent SR DiT by flow matching."""
    model_cfg.validate()
    if ctx.dry_run:
        with torch.device("meta"):
            n = DiT(model_cfg).num_parameters()
        print(f"parameters: {n:,}")
        return {"parameters": n}

    assert data is not None, "only a dry run goes without data"
    ckpt_path = start_run(ctx, nodes)
    datamodule = ClipDataModule(data)
    if init_from and ckpt_path is None:  # a resumed run takes its weights from the checkpoint
        model = load_dit(init_from, model_cfg, what="init_from").model
    else:
        model = DiT(model_cfg)
    print(f"parameters: {model.num_parameters():,}")
    own_ac = _own_activation_checkpointing(nodes.strategy)
    model = parallelize(model, model_cfg.activation_checkpointing and own_ac, model_cfg.compile)
    common = dict(
        flow_cfg=flow,
        optim_cfg=optim,
        max_steps=nodes.trainer.max_steps,
        text_dim=data.text_dim,
        seed=ctx.seed,
        max_nonfinite_steps=nodes.trainer.max_nonfinite_steps,
    )
    if sr is not None:
        task = SuperResolutionTask(
            model,
            sr_alpha=sr.alpha,
            sr_audio_noise=sr.audio_noise_scale,
            sr_factor=sr.lowres_factor,
            **common,
        )
    else:
        task = PretrainTask(model, **common)
    return fit(
        ctx, nodes, task, datamodule, list(callbacks or []), ckpt_path, grad_clip=optim.grad_clip, ema=ema,
        validate=bool(data.val_shards), activation_checkpointing=model_cfg.activation_checkpointing,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# DMD-2: teacher, critic and student from their checkpoints
# ---------------------------------------------------------------------------------------------------------


class DistillDataModule(ClipDataModule):
    """Clip shards for distillation; the resume position counts the task's own gradient accumulation."""

    def __init__(self, cfg: DataConfig, accumulate: int = 1):
        super().__init__(cfg)
        self.accumulate = accumulate

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"consumed": self.trainer.global_step * self.accumulate}


def build_roles(
    model_cfg: DiTConfig,
    cfg: DistillConfig,
    load_teacher: bool = True,
    load_trainable: bool = True,
    own_checkpointing: bool = True,
) -> tuple[DiT, DiT, DiT]:
    """(teacher, critic, student). The critic and student copy the teacher unless given their own checkpoint.

    With load_* false the roles stay uninitialised: a resumed run fills them from its checkpoint. With
    own_checkpointing false the strategy applies activation checkpointing (FSDP, from
    model.activation_checkpointing) and the per-role switches are not used.
    """
    if load_teacher:
        loaded = load_dit(cfg.teacher.checkpoint, model_cfg, what="distill.teacher.checkpoint")
        log.info("teacher: %s weights of %s", loaded.weights, cfg.teacher.checkpoint)
        teacher = loaded.model
    else:
        teacher = empty_dit(model_cfg)

    def trainable(name: str) -> DiT:
        role = getattr(cfg, name)
        if not load_trainable:
            return empty_dit(model_cfg)
        if role.checkpoint is None:
            return copy.deepcopy(teacher)  # before the teacher's bf16 cast: fp32 master weights
        loaded = load_dit(role.checkpoint, model_cfg, what=f"distill.{name}.checkpoint")
        log.info("%s: %s weights of %s", name, loaded.weights, role.checkpoint)
        return loaded.model

    critic, student = trainable("critic"), trainable("student")
    if cfg.teacher.dtype == "bf16":
        apply_dtype_policy(teacher, "base")  # block linears in bf16 as released; run under bf16 autocast
    teacher = parallelize(teacher, False, model_cfg.compile)  # no backward through it: no checkpointing
    critic = parallelize(critic, cfg.critic.activation_checkpointing and own_checkpointing, model_cfg.compile)
    student = parallelize(
        student, cfg.student.activation_checkpointing and own_checkpointing, model_cfg.compile
    )
    return teacher, critic, student


def run_distill(
    ctx: RunContext,
    nodes: TrainerNodes,
    model_cfg: DiTConfig,
    data: DataConfig | None,
    distill: DistillConfig,
    *,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """DMD-2 distillation of a pretrained DiT into a few-step CFG-free student (task dmd2).

    Manual optimisation: clipping, accumulation and the student's EMA are the task's and StudentEMA's, so the
    Trainer gets none of them (optim.* and ema.* of the root are not used).
    """
    model_cfg.validate()
    validate_distill(distill)
    if ctx.dry_run:
        from magi_train.training.memory import format_table, memory_table, role_parameters

        counts = role_parameters(model_cfg)
        print(f"parameters per role: {counts.total:,} (teacher, critic and student each)")
        print(format_table(memory_table(counts, teacher_dtype=distill.teacher.dtype)))
        return {"parameters": counts.total}
    assert data is not None, "only a dry run goes without data"

    ckpt_path = start_run(ctx, nodes)
    holds_teacher = _holds_teacher(ckpt_path)  # else the teacher is loaded from its own checkpoint
    if not holds_teacher:
        check_source(distill.teacher.checkpoint, "distill.teacher.checkpoint")
    accumulate = nodes.trainer.accumulate_grad_batches
    datamodule = DistillDataModule(data, accumulate)
    teacher, critic, student = build_roles(
        model_cfg, distill, load_teacher=not holds_teacher, load_trainable=ckpt_path is None,
        own_checkpointing=_own_activation_checkpointing(nodes.strategy),
    )  # fmt: skip
    print(
        f"parameters: {student.num_parameters():,} per role (teacher {distill.teacher.dtype}, critic, student)"
    )
    task = DMD2Task(
        teacher, critic, student, distill, text_dim=data.text_dim, seed=ctx.seed, accumulate=accumulate,
        sample_dir=str(ctx.run_dir / "samples"), max_nonfinite_steps=nodes.trainer.max_nonfinite_steps,
    )  # fmt: skip
    ema = distill.ema
    own = [StudentEMA(ema.decay, ema.start_step, ema.on_cpu)] if ema.decay > 0 else []
    log.info("dmd2: trainer.max_steps counts iterations = critic updates")
    # expected here: the frozen teacher is in eval mode; checkpoints hold the post-update state of an iteration
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    return fit(
        ctx, nodes, task, datamodule, own + list(callbacks or []), ckpt_path, accumulate_grad_batches=1,
        validate=bool(data.val_shards), activation_checkpointing=model_cfg.activation_checkpointing,
    )  # fmt: skip
