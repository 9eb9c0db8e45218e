"""Distil the Wan2.2 VAE decoder into a TurboVAED (recipe `distill_vae`), the light decoder of the MagiHuman release.

The student (`magi_train/codecs/turbo_vae.py`) sees each clip's normalised latent from the shards and learns the
frames the frozen Wan2.2 decoder makes of it: L1 on pixels in [-1, 1] plus 1 - SSIM of the frames
(torchmetrics). Training decodes whole clips in one window (`is_first_chunk`: 4(T-1)+1 frames, as the
teacher); sampling later decodes in the release's overlapping windows. An exponential moving average of the
student is kept here and saved as `ema_state_dict` in every checkpoint, and exported at the end of training as
`<export_dir>/{turbo_vae.json, checkpoint.ckpt}`, the layout the release's loader and `generate.turbo_vae` read.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from magi_train.codecs.turbo_vae import TurboVAED, save_turbo_vae
from magi_train.codecs.video_vae import VideoVAE
from magi_train.config import EMAConfig, OptimConfig, VAEDistillConfig
from magi_train.data.reader import ClipBatch
from magi_train.tasks.guard import NonFiniteGuard, grad_norm
from magi_train.tasks.optim import build_optimizer

log = logging.getLogger(__name__)


def frame_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM over the frames of `[B, 3, F, H, W]` pixels in [-1, 1] (Gaussian window 11, or the largest odd
    window the frame allows)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    b, c, f, h, w = pred.shape
    k = min(11, (min(h, w) - 1) // 2 * 2 + 1)
    flat = (pred.transpose(1, 2).reshape(b * f, c, h, w), target.transpose(1, 2).reshape(b * f, c, h, w))
    return ssim(flat[0].float(), flat[1].float(), data_range=2.0, kernel_size=k, sigma=1.5 * k / 11)


def decode_losses(pred: Tensor, target: Tensor, cfg: VAEDistillConfig) -> dict[str, Tensor]:
    """L1 and 1 - SSIM of one clip's student frames against the teacher's, and their weighted sum."""
    l1 = (pred.float() - target.float()).abs().mean()
    ssim = frame_ssim(pred, target)
    return {"loss": cfg.l1_weight * l1 + cfg.ssim_weight * (1 - ssim), "l1": l1, "ssim": ssim}


class VAEDistillTask(L.LightningModule):
    """TurboVAED student <- frozen Wan2.2 decoder, on the video latents of packed clip batches."""

    def __init__(
        self,
        student: TurboVAED,
        teacher: VideoVAE,
        cfg: VAEDistillConfig,
        optim_cfg: OptimConfig,
        ema_cfg: EMAConfig,
        max_steps: int,
        max_nonfinite_steps: int = 20,
    ):
        super().__init__()
        self.student = student.train().requires_grad_(True)
        self.ema = copy.deepcopy(student).eval().requires_grad_(False)  # in state_dict: resumes with the run
        self.teacher = teacher  # not a submodule: frozen, never in the checkpoint
        self.cfg, self.optim_cfg, self.ema_cfg, self.max_steps = cfg, optim_cfg, ema_cfg, max_steps
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self._hold_schedule = False
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    # -- targets and losses ------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_frames(self, key: str, latent: Tensor) -> Tensor:
        """The Wan2.2 decoder's pixels `[1, 3, F, H, W]` of one normalised latent `[48, T, h, w]` (cached by key)."""
        if key in self._cache:
            return self._cache[key].to(self.device)
        if self.teacher.device != self.device:
            self.teacher.to(self.device)
        frames = self.teacher.decode(latent[None].to(self.device))
        if self.cfg.teacher_cache > 0:
            self._cache[key] = frames.cpu()
            while len(self._cache) > self.cfg.teacher_cache:
                self._cache.popitem(last=False)
        return frames

    def clip_losses(self, model: TurboVAED, batch: ClipBatch) -> dict[str, Tensor]:
        """Mean losses over the clips of a batch, each clip decoded in one window."""
        parts: list[dict[str, Tensor]] = []
        for key, latent in zip(batch.keys, batch.video, strict=True):
            target = self.teacher_frames(key, latent)
            z = model.denormalize(latent[None].to(self.device).float())
            pred = model.decoder(z, is_first_chunk=True)
            assert pred.shape == target.shape, (pred.shape, target.shape)
            parts.append(decode_losses(pred, target, self.cfg))
        return {name: torch.stack([p[name] for p in parts]).mean() for name in parts[0]}

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def training_step(self, batch: ClipBatch, batch_idx: int) -> Tensor | None:
        if len(batch) == 0:
            return None
        losses = self.clip_losses(self.student, batch)
        self.guard.observe(losses["loss"])
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": losses[k].detach() for k in ("l1", "ssim")}, batch_size=len(batch))
        return losses["loss"]

    @torch.no_grad()
    def validation_step(self, batch: ClipBatch, batch_idx: int) -> None:
        if len(batch) == 0:
            return
        ema = self.clip_losses(self.ema, batch)
        raw = self.clip_losses(self.student, batch)
        n = len(batch)
        self.log_dict({"val/l1": ema["l1"], "val/ssim": ema["ssim"], "val/loss": ema["loss"],
                       "val/l1_raw": raw["l1"]}, batch_size=n, sync_dist=True)  # fmt: skip

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = grad_norm(self.student.parameters())
        ok = self.guard.check(norm, self.global_step, self.trainer.strategy.reduce_boolean_decision)
        if not ok:  # skipped: no gradients, the schedule held (as tasks/pretrain.py)
            optimizer.zero_grad(set_to_none=True)
        self._hold_schedule = not ok
        self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not self._hold_schedule:
            super().lr_scheduler_step(scheduler, metric)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: ModelCheckpoint saves before that hook runs
        if self.ema_cfg.decay <= 0:
            return
        step = self.global_step + 1  # counts this step only after it
        decay = 0.0 if step <= self.ema_cfg.start_step else self.ema_cfg.decay  # a copy until start_step
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.student.parameters(), strict=True):
                e.lerp_(p.detach().to(e.dtype), 1.0 - decay)

    def exported_model(self) -> TurboVAED:
        """The weights to ship: the EMA (raw weights with ema.decay 0)."""
        return self.ema if self.ema_cfg.decay > 0 else self.student

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the release's layout next to Lightning's: TurboVAED loaders read this key of any checkpoint
        state = self.exported_model().state_dict()
        checkpoint["ema_state_dict"] = {k: v.detach().float().cpu().clone() for k, v in state.items()}
        checkpoint["turbo_vae_config"] = self.student.cfg.to_dict()
        checkpoint["nonfinite_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["nonfinite_guard"])

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_turbo_vae(Path(self.cfg.export_dir), self.exported_model())
            log.info(
                "exported the TurboVAED (%s weights) to %s", "EMA" if self.ema_cfg.decay > 0 else "raw", path
            )

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.student, self.optim_cfg, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
