"""Build a Lightning Trainer from the resolved config and run a training recipe (pretrain_base)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from magi_train.config import DataConfig, FlowConfig, LoggerConfig, OptimConfig, SRConfig, TrainerConfig
from magi_train.csv_log import RunCSVLogger
from magi_train.data.datamodule import ClipDataModule
from magi_train.models.checkpoint import load_released
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.parallelize import parallelize
from magi_train.tasks.pretrain import PretrainTask
from magi_train.tasks.super_resolution import SuperResolutionTask

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


def build_strategy(cfg: DictConfig):
    name = cfg.name
    if name in ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3") and not cfg.options:
        if name == "ddp" and cfg.find_unused_parameters:
            return "ddp_find_unused_parameters_true"
        return name
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters, **cfg.options)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(**cfg.options)
    if name.startswith("deepspeed_stage_"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=int(name[-1]), **cfg.options)
    raise ValueError(f"strategy.name={name!r}: use auto, ddp, fsdp, deepspeed_stage_2 or deepspeed_stage_3")


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
    if cfg.optim.ema_decay > 0:
        callbacks.append(
            EMAWeightAveraging(decay=cfg.optim.ema_decay, device="cpu" if cfg.optim.ema_on_cpu else None)
        )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg.strategy),
        precision=resolve_precision(t.precision),
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


def load_initial_weights(model: DiT, path: str) -> None:
    """Released-format directory (safetensors) or one of our Lightning checkpoints (weights only)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        load_released(model, p)
        return
    if not p.is_file():
        raise ValueError(f"init_from={path}: no such released-format directory or checkpoint file")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from={path}: does not match the model config; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise ValueError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return cfg.ckpt_path
    if cfg.resume:
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ValueError(f"resume=true but {last} does not exist: pass hydra.run.dir=<the run's directory>")
        return str(last)
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
        load_initial_weights(model, cfg.init_from)
    print(f"parameters: {model.num_parameters():,}")
    model = parallelize(model, model_cfg.activation_checkpointing, model_cfg.compile)
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
    trainer = build_trainer(cfg, run_dir, [], resolved)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"global_step": trainer.global_step, "run_dir": str(run_dir)}
