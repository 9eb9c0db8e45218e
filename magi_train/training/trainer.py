"""The Lightning Trainer of every training recipe, built from narrow config nodes: strategy, precision, loggers,
checkpoints (with the run's config inside), EMA and gradient clipping."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from magi_train.config import EMAConfig, LoggerConfig, StrategyConfig, TrainerConfig
from magi_train.tasks.ema import EMA
from magi_train.training.checkpoint_io import AtomicCheckpointIO
from magi_train.training.csv_log import RunCSVLogger
from magi_train.training.progress import StepProgressBar
from magi_train.training.strategies import SHARDED, build_strategy


class ConfigInCheckpoint(Callback):
    """Stores the resolved root config in every checkpoint, so sampling and resuming need no flags."""

    def __init__(self, resolved: dict[str, Any]):
        self.resolved = resolved

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["magi_config"] = self.resolved


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_loggers(cfg: LoggerConfig, run_dir: Path, resolved: dict[str, Any]) -> list[Logger]:
    """A CSV log always (run_dir/metrics.csv); W&B on request, offline unless configured otherwise."""
    loggers: list[Logger] = [RunCSVLogger(run_dir)]
    if cfg.wandb and cfg.mode != "disabled":
        if cfg.mode not in ("offline", "online"):
            raise ValueError(f"logger.mode={cfg.mode!r}: use offline, online or disabled")
        loggers.append(
            WandbLogger(
                project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=list(cfg.tags),
                save_dir=str(run_dir), offline=cfg.mode == "offline", config=resolved,
            )
        )  # fmt: skip
    return loggers


def finish_wandb(trainer: L.Trainer, exit_code: int) -> None:
    """Close the W&B runs of `trainer`'s loggers. Lightning's WandbLogger leaves its run open, and the next
    WandbLogger in the same process (the next job of a Hydra multirun, the next test) would reuse it: its
    metrics and media would go into the earlier run's directory."""
    for logger in trainer.loggers:
        # _experiment: set on the rank that opened a run; reading .experiment would open one to close it
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=exit_code)
            logger._experiment = None


def destroy_process_group_at_exit() -> None:
    """Destroy the process groups when the interpreter exits, while it is still alive, as Lightning does for NCCL
    only (fabric/utilities/distributed.py): otherwise a gloo group is torn down with the interpreter
    (pytorch/pytorch#179291). Registered once per process; a no-op if the group is already destroyed."""
    if dist.is_available() and dist.is_initialized():
        atexit.unregister(_destroy_process_group)  # one registration, however many runs the process makes
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_ema_strategy(ema: EMAConfig | None, strategy: StrategyConfig) -> None:
    """Lightning's EMA callback copies whole parameters: it cannot follow sharded ones, nor save with DeepSpeed.
    Under fsdp2 the task keeps its own EMA on the local shards (tasks/ema.py ShardedEMA) and passes none here."""
    if ema is not None and ema.decay > 0 and strategy.name in SHARDED:
        raise ValueError(
            f"ema.decay={ema.decay} (EMA) is not supported with strategy={strategy.name}: set ema.decay=0, or "
            "train with strategy=fsdp2 or ddp"
        )


def build_trainer(
    trainer: TrainerConfig,
    strategy: StrategyConfig,
    logger: LoggerConfig,
    run_dir: Path,
    callbacks: list[Callback],
    *,
    resolved: dict[str, Any],
    grad_clip: float = 0.0,
    ema: EMAConfig | None = None,
    accumulate_grad_batches: int | None = None,
    validate: bool = True,
) -> L.Trainer:
    """A Lightning Trainer for one run.

    resolved: the root config, stored in every checkpoint. grad_clip: max global grad norm of automatic
    optimisation (0 = off; manual-optimisation tasks clip per role themselves). ema: EMA of the trained weights
    (None or decay 0 = off). accumulate_grad_batches: None = trainer.accumulate_grad_batches (a task that
    accumulates itself passes 1). validate: the data has a validation split.
    """
    check_ema_strategy(ema, strategy)
    callbacks = callbacks + [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", every_n_train_steps=trainer.checkpoint_every_n_steps, save_last=True,
            save_top_k=1, monitor=None, filename="step{step:08d}", auto_insert_metric_name=False,
        ),
        LearningRateMonitor(logging_interval="step"),
        ConfigInCheckpoint(resolved),
    ]  # fmt: skip
    if ema is not None and ema.decay > 0:
        start = ema.start_step or None
        callbacks.append(
            EMA(decay=ema.decay, device="cpu" if ema.on_cpu else None, update_starting_at_step=start)
        )
    if trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())  # the step out of max_steps (Lightning's bar shows epochs)
    precision = resolve_precision(trainer.precision)
    plugins: list[Any] = [AtomicCheckpointIO()]  # checkpoint files complete or absent, on any file system
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=trainer.slurm_requeue))
    accumulate = (
        trainer.accumulate_grad_batches if accumulate_grad_batches is None else accumulate_grad_batches
    )
    return L.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=build_strategy(strategy, precision),
        precision=precision,
        plugins=plugins,
        max_steps=trainer.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=grad_clip or None,
        log_every_n_steps=trainer.log_every_n_steps,
        val_check_interval=trainer.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer.limit_val_batches if validate and trainer.val_check_interval else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=trainer.enable_progress_bar,
        deterministic=trainer.deterministic,
        default_root_dir=str(run_dir),
        logger=build_loggers(logger, run_dir, resolved),
        callbacks=callbacks,
    )
