"""The optimiser of every trained network (pretraining, SR, each DMD-2 role): AdamW with warm-up and a schedule."""

from __future__ import annotations

import math

import torch

from magi_train.config import OptimConfig


def build_optimizer(model, cfg: OptimConfig, max_steps: int):
    """AdamW over the trainable parameters of `model` (a module or (name, parameter) pairs) without weight decay on
    norm weights and biases; linear warm-up, then constant/cosine.

    Chosen by name, not by `ndim`: FSDP (use_orig_params) hands the optimizer flat 1-D shards of every matrix.
    """
    decay, no_decay = [], []
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    for name, p in named:
        if p.requires_grad:
            (no_decay if "norm" in name or name.endswith("bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={cfg.schedule!r}: use 'constant' or 'cosine'")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched
