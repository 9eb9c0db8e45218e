"""Build a Lightning Trainer from the resolved config and run a training recipe (pretrain_base)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from magi_train.config import (
    DataConfig,
    FlowConfig,
    LoggerConfig,
    OptimConfig,
    SRConfig,
    StrategyConfig,
    TrainerConfig,
)
from magi_train.training.csv_log import RunCSVLogger
from magi_train.data.datamodule import ClipDataModule
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.parallelize import parallelize
from magi_train.training.strategies import strategy_applies_activation_checkpointing
from magi_train.tasks.pretrain import PretrainTask
from magi_train.tasks.super_resolution import SuperResolutionTask
from magi_train.models.weights import load_dit_weights

log = logging.getLogger(__name__)


class ConfigInCheckpoint(Callback):
    """Stores the resolved root config in every checkpoint, so sampling and resuming need no flags."""

    def __init__(self, resolved: dict[str, Any]):
        self.resolved = resolved

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["magi_config"] = self.resolved


def to_dataclass(node: DictConfig, cls: type):
    """A narrow typed config object for a builder (only the entry point sees the root config)."""
    obj = OmegaConf.to_object(node)  # resolves interpolations against the root, returns the schema class
    if not isinstance(obj, cls):
        raise TypeError(f"config node {node._key()} is {type(obj).__name__}, expected {cls.__name__}")
    return obj


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
        )
    return loggers


def build_strategy(cfg: DictConfig, precision: str = "32-true", activation_checkpointing: bool = False):
    """The Lightning strategy of `configs/strategy/` (see magi_train/training/strategies.py)."""
    from magi_train.training.strategies import build_strategy as _build

    return _build(to_dataclass(cfg, StrategyConfig), precision, activation_checkpointing)


def check_ema_strategy(cfg: DictConfig) -> None:
    """Lightning's EMA callback copies whole parameters: it cannot follow sharded ones, nor save with DeepSpeed."""
    from magi_train.training.strategies import SHARDED

    if cfg.optim.ema_decay > 0 and cfg.strategy.name in SHARDED:
        raise ValueError(
            f"optim.ema_decay={cfg.optim.ema_decay} (EMA) is not supported with strategy={cfg.strategy.name}: "
            "set optim.ema_decay=0, or train with strategy=ddp"
        )


class EMA(EMAWeightAveraging):
    """Lightning's EMA, except that the live model keeps its raw weights when training ends.

    Lightning copies the average into the model in `on_train_end`, and ModelCheckpoint writes `last.ckpt` after
    that (checkpoint callbacks run last), so a run stopping between checkpoint steps would save the EMA weights
    as `current_model_state` and resume from them. Checkpoints already carry the EMA in `state_dict`.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[Callback], resolved: dict) -> L.Trainer:
    t: TrainerConfig = to_dataclass(cfg.trainer, TrainerConfig)
    callbacks = callbacks + [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", every_n_train_steps=t.checkpoint_every_n_steps, save_last=True,
            save_top_k=1, monitor=None, filename="step{step:08d}", auto_insert_metric_name=False,
        ),
        LearningRateMonitor(logging_interval="step"),
        ConfigInCheckpoint(resolved),
    ]
    check_ema_strategy(cfg)
    if cfg.optim.ema_decay > 0:
        callbacks.append(
            EMA(decay=cfg.optim.ema_decay, device="cpu" if cfg.optim.ema_on_cpu else None)
        )
    precision = resolve_precision(t.precision)
    plugins = [SLURMEnvironment(auto_requeue=t.slurm_requeue)] if SLURMEnvironment.detect() else None
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg.strategy, precision, cfg.model.activation_checkpointing),
        precision=precision,
        plugins=plugins,
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if cfg.data.val_shards and t.val_check_interval else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        default_root_dir=str(run_dir),
        logger=build_loggers(to_dataclass(cfg.logger, LoggerConfig), run_dir, resolved),
        callbacks=callbacks,
    )


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


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """ckpt_path, else with resume=true the newest checkpoint of the run directory.

    A requeued Slurm job (Lightning detects Slurm; trainer.slurm_requeue) resumes from the newest
    checkpoint of its run directory without flags, as Lightning's own auto-requeue does, but never from a
    preemption checkpoint that a later last.ckpt has superseded.
    """
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).exists():
            raise ValueError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return cfg.ckpt_path
    newest = newest_checkpoint(run_dir)
    if cfg.resume:
        if newest is None:
            raise ValueError(
                f"resume=true but {run_dir} holds no checkpoints/last.ckpt nor hpc_ckpt_*.ckpt: "
                "pass hydra.run.dir=<the run's directory>"
            )
        return str(newest)
    if newest is not None and cfg.trainer.slurm_requeue and SLURMEnvironment.detect():
        log.info("Slurm job with checkpoints in its run directory (requeued): resuming from %s", newest)
        return str(newest)
    return None


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train the base DiT (task pretrain) or the latent SR DiT (task pretrain_sr) by flow matching."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model_cfg: DiTConfig = to_dataclass(cfg.model, DiTConfig)
    model_cfg.validate()

    if cfg.dry_run:
        with torch.device("meta"):
            model = DiT(model_cfg)
        n = model.num_parameters()
        print(f"parameters: {n:,}")
        return {"parameters": n}

    L.seed_everything(cfg.seed, workers=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    datamodule = ClipDataModule(to_dataclass(cfg.data, DataConfig))
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    model = DiT(model_cfg)
    if cfg.init_from and ckpt_path is None:  # a resumed run takes its weights from the checkpoint
        load_dit_weights(model, cfg.init_from, "init_from")
    print(f"parameters: {model.num_parameters():,}")
    # FSDP applies activation checkpointing itself, after wrapping (magi_train/training/strategies.py)
    own_ac = not strategy_applies_activation_checkpointing(cfg.strategy.name)
    model = parallelize(model, model_cfg.activation_checkpointing and own_ac, model_cfg.compile)
    common = dict(
        flow_cfg=to_dataclass(cfg.flow, FlowConfig), optim_cfg=to_dataclass(cfg.optim, OptimConfig),
        max_steps=cfg.trainer.max_steps, text_dim=cfg.data.text_dim, seed=cfg.seed,
    )
    if cfg.task == "pretrain_sr":
        sr: SRConfig = to_dataclass(cfg.sr, SRConfig)
        task = SuperResolutionTask(model, sr_alpha=sr.alpha, sr_audio_noise=sr.audio_noise_scale,
                                   sr_factor=sr.lowres_factor, **common)
    else:
        task = PretrainTask(model, **common)
    from magi_train.eval.callback import eval_callbacks  # sample + score a suite every eval.every_n_steps

    if cfg.task == "pretrain_sr" and cfg.eval.every_n_steps > 0:
        raise ValueError("eval.every_n_steps samples a base model; the SR model needs a base model's output to "
                         "upsample: evaluate SR checkpoints with recipe=evaluate (generate.sr_ckpt) instead")
    trainer = build_trainer(cfg, run_dir, eval_callbacks(cfg), resolved)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"global_step": trainer.global_step, "run_dir": str(run_dir)}
