"""Runner of recipe `distill_vae`: a TurboVAED student distilled from the Wan2.2 VAE decoder (tasks/vae_distill.py).

Same skeleton as the DiT recipes (training/run.py): run directory, config.yaml, seed, resume checkpoint, the
Lightning Trainer of training/trainer.py over the clip shards of `data`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from magi_train.codecs.tiny import write_tiny_video_vae
from magi_train.codecs.turbo_vae import TurboVAED, load_turbo_vaed
from magi_train.codecs.video_vae import VideoVAE
from magi_train.config import DataConfig, EMAConfig, OptimConfig, VAEDistillConfig
from magi_train.data.datamodule import ClipDataModule
from magi_train.tasks.vae_distill import VAEDistillTask
from magi_train.training.run import RunContext, TrainerNodes, fit, start_run

log = logging.getLogger(__name__)


def build_student(cfg: VAEDistillConfig) -> TurboVAED:
    """The student: `vae_distill.student` from random weights, or the TurboVAED of `vae_distill.init_from`."""
    if cfg.init_from:
        model = load_turbo_vaed(cfg.init_from, what="vae_distill.init_from")
        if model.cfg != cfg.student:
            log.info("vae_distill.init_from brings its own architecture; vae_distill.student is not used")
        return model.float().requires_grad_(True)
    return TurboVAED(cfg.student)


def load_teacher(cfg: VAEDistillConfig, device: torch.device) -> VideoVAE:
    if cfg.tiny_teacher:
        log.warning("writing a random tiny Wan2.2 VAE at %s as the teacher (smoke run)", cfg.teacher)
        write_tiny_video_vae(cfg.teacher)
    teacher = VideoVAE.from_pretrained(cfg.teacher, device=device)
    if teacher.latent_channels != cfg.student.latent_channels and not cfg.init_from:
        raise ValueError(
            f"vae_distill.teacher={cfg.teacher} has {teacher.latent_channels} latent channels but "
            f"vae_distill.student.latent_channels={cfg.student.latent_channels}"
        )
    return teacher


def run_vae_distill(
    ctx: RunContext,
    nodes: TrainerNodes,
    data: DataConfig | None,
    cfg: VAEDistillConfig,
    optim: OptimConfig,
    ema: EMAConfig,
) -> dict[str, Any]:
    """Train the student, checkpoint it (with `ema_state_dict`) and export it to `cfg.export_dir`."""
    cfg.student.validate("vae_distill.student")
    if ctx.dry_run:
        with torch.device("meta"):
            n = sum(p.numel() for p in TurboVAED(cfg.student).parameters())
        print(f"parameters: {n:,}")
        return {"parameters": n}
    assert data is not None, "only a dry run goes without data"
    if not 0 <= ema.decay < 1:
        raise ValueError(f"ema.decay={ema.decay}: use 0 (off: export the raw weights) or a value in (0, 1)")
    ckpt_path = start_run(ctx, nodes)
    student = build_student(cfg)
    teacher = load_teacher(cfg, torch.device("cpu"))  # moved to the training device on first use
    print(f"parameters: {sum(p.numel() for p in student.parameters()):,} (student)")
    task = VAEDistillTask(
        student, teacher, cfg, optim, ema, nodes.trainer.max_steps, nodes.trainer.max_nonfinite_steps
    )
    out = fit(
        ctx, nodes, task, ClipDataModule(data), [], ckpt_path, grad_clip=optim.grad_clip,
        validate=bool(data.val_shards),
    )  # fmt: skip
    out["turbo_vae"] = str(Path(cfg.export_dir))
    return out
