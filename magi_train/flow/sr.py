"""Latent super-resolution inputs of the released SR stage (spec §5): trilinear upsampling, VP re-noise.

The SR DiT denoises `a*up(x_low) + sqrt(1-a^2)*eps` with a = 0.8389, and sees the base audio mixed as
`0.7*eps + 0.3*audio` as a fixed condition; its audio output is discarded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def zero_snr_alpha(
    index: int = 220, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> float:
    """sqrt(alpha_bar) at `index` of SD's scaled-linear DDPM schedule rescaled to zero terminal SNR.

    The release's ZeroSNRDDPMDiscretization with noise_value 220 gives a = 0.8389 (spec §5.3); the
    rescaling (Lin et al. 2023, "Common diffusion noise schedules are flawed") keeps step 0 and sends the
    last step to 0.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    s = torch.cumprod(1 - betas, 0).sqrt()
    rescaled = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return rescaled[index].item()


def upsample_latent(lowres: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, T, h, w] -> [C, T, H, W] trilinear, align_corners=True, time axis unchanged (spec §5.2)."""
    c, t = lowres.shape[:2]
    return F.interpolate(lowres[None].float(), size=(t, *size), mode="trilinear", align_corners=True)[0]


def sr_video_input(lowres: Tensor, size: tuple[int, int], alpha: float, eps: Tensor) -> Tensor:
    """Variance-preserving re-noise of the upsampled latent: a*x + sqrt(1 - a^2)*eps."""
    return alpha * upsample_latent(lowres, size) + math.sqrt(1 - alpha**2) * eps


def sr_audio_condition(audio: Tensor, eps: Tensor, noise_scale: float = 0.7) -> Tensor:
    """The base audio as the SR model sees it: noise_scale*eps + (1 - noise_scale)*audio (released 0.7)."""
    return noise_scale * eps + (1 - noise_scale) * audio
