"""Latent super-resolution training (recipe `pretrain_sr`), following the released SR stage (spec §5).

At inference the SR DiT starts from z = a*up(x_low) + sqrt(1-a^2)*eps (a = 0.8389) and runs UniPC over the
shift-5 schedule from sigma 0.9998 to 0. We train the flow that this sampler integrates: the path
x_s = (1 - s)*x0 + s*z between the clean high-resolution latent and that degraded start, target v = z - x0,
so the released 5-step sampler is consistent with the training path. The base audio enters as the fixed
condition 0.7*eps + 0.3*audio (no audio loss), and text uses the SR coordinates (model.text_coords=v1).

Low-resolution latents come from the shard's `lowres.npy` when present (the real pipeline: the VAE
encoding of the downscaled clip); otherwise they are derived by area-downsampling the high-resolution
latent by `sr_factor` (synthetic data; a cheaper stand-in for re-encoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from magi_train.data.reader import ClipBatch
from magi_train.flow import add_noise, drop_text, masked_mse, sample_sigma, velocity_target
from magi_train.flow.sr import sr_audio_condition, sr_video_input
from magi_train.tasks.pretrain import PretrainTask


def derive_lowres(video: Tensor, factor: int) -> Tensor:
    """[C, T, H, W] -> [C, T, H/f, W/f] by area averaging (time axis unchanged)."""
    c, t, h, w = video.shape
    if h % factor or w % factor:
        raise ValueError(
            f"latent {h}x{w} is not divisible by sr_factor {factor}; add lowres.npy to the shards"
        )
    return F.avg_pool3d(video[None], kernel_size=(1, factor, factor))[0]


class SuperResolutionTask(PretrainTask):
    """Flow matching from the re-noised upsampled low-resolution latent to the high-resolution latent."""

    def __init__(self, *args, sr_alpha: float, sr_audio_noise: float, sr_factor: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.flow_cfg.audio_sigma != "shared":
            raise ValueError(
                f"flow.audio_sigma={self.flow_cfg.audio_sigma} has no meaning in pretrain_sr: its audio is the fixed "
                "condition 0.7*eps + 0.3*audio (sr.audio_noise_scale), not noised along the flow path, and its loss is "
                "video only; leave flow.audio_sigma=shared"
            )
        self.sr_alpha, self.sr_audio_noise, self.sr_factor = sr_alpha, sr_audio_noise, sr_factor

    def flow_loss(self, batch: ClipBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        f, n = self.flow_cfg, len(batch)
        sigma = sample_sigma(n, f.sigma_sampling, f.shift, f.sigma_mean, f.sigma_std, generator=generator)
        drop = torch.rand(n, generator=generator) < f.text_drop_prob
        video_in, audio_in, targets = [], [], []
        for i in range(n):
            x0, audio = batch.video[i], batch.audio[i]
            low = batch.lowres[i] if batch.lowres[i] is not None else derive_lowres(x0, self.sr_factor)
            eps = torch.randn(x0.shape, generator=generator).to(x0)
            start = sr_video_input(low.to(x0), tuple(x0.shape[-2:]), self.sr_alpha, eps)
            video_in.append(add_noise(x0, start, sigma[i].item()))
            targets.append(velocity_target(x0, start))
            a_eps = torch.randn(audio.shape, generator=generator).to(audio)
            audio_in.append(sr_audio_condition(audio, a_eps, self.sr_audio_noise))
        text = drop_text(batch.text, drop, self.null_text)
        pred_video, pred_audio = self.model(video_in, audio_in, text)
        loss = masked_mse(pred_video, targets)
        loss = loss + 0.0 * sum(p.sum() for p in pred_audio)  # audio head unused; keep it in the graph (DDP)
        return {
            "loss": loss,
            "loss_video": loss,
            "loss_audio": torch.zeros((), device=loss.device),
            "sigma_mean": sigma.mean(),
        }
