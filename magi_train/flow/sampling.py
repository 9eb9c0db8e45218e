"""Samplers of the released daVinci-MagiHuman pipeline (spec §4.4-4.8): flow UniPC + CFG, and the distilled
8-step re-noising sampler. One implementation for inference, training-time sample callbacks and eval.

The base sampler is diffusers' `UniPCMultistepScheduler` (order 2, bh2, flow sigmas, final sigma 0) fed
the released sigma grid `linspace(0.999, 0, n+1)[:-1]`, which it shifts by 5 exactly as the release does;
its timestep lists equal the released 32/8/5-step lists (tests/flow/test_sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from magi_train.flow.matching import Mode, shift_sigma, x0_from_velocity

# model(video_list, audio_list, text_list) -> (velocity_video_list, velocity_audio_list)
Denoiser = Callable[[list[Tensor], list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]

SIGMA_START = 0.999  # released training sigmas run 0.999 -> 0 (`1 - linspace(1, 1/1000)`), spec §4.4


@dataclass
class Guidance:
    """Classifier-free guidance of the released base sampler (spec §4.5)."""

    video_scale: float = 5.0  # while t > switch_t
    video_scale_late: float = 2.0  # once t <= switch_t
    switch_t: float = 500.0
    audio_scale: float = 5.0

    def video_scale_at(self, t: float) -> float:
        return self.video_scale if t > self.switch_t else self.video_scale_late


def released_sigmas(num_steps: int, shift: float = 5.0) -> Tensor:
    """The n+1 shifted sigmas of the released schedule: shift(linspace(0.999, 0, n+1)[:-1]) then 0."""
    base = torch.from_numpy(np.linspace(SIGMA_START, 0.0, num_steps + 1)[:-1])
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=base.dtype)]).float()


def released_timesteps(num_steps: int, shift: float = 5.0) -> list[int]:
    """int(sigma * 1000) of each step: 999, 972, 937, 892, 833, 749, 624, 416 for 8 steps."""
    base = np.linspace(SIGMA_START, 0.0, num_steps + 1)[:-1]
    return (shift * base / (1 + (shift - 1) * base) * 1000).astype(np.int64).tolist()


def make_unipc(num_steps: int, shift: float = 5.0, order: int = 2):
    """diffusers UniPC configured as the released FlowUniPCMultistepScheduler, timesteps set."""
    from diffusers import UniPCMultistepScheduler  # optional dependency: magi_train[codecs]

    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=order, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=shift,
    )
    sched.set_timesteps(sigmas=np.linspace(SIGMA_START, 0.0, num_steps + 1)[:-1])
    return sched


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Ho-Salimans guidance u + w (c - u); w = 1 gives the conditional prediction."""
    return uncond + scale * (cond - uncond)


def _progress(it: Iterable, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def _impose(video: list[Tensor], audio: list[Tensor], first_frames, clean_audio):
    """Conditioning by replacement: clean first latent frame (i2v) and clean audio (a2v)."""
    for i, f in enumerate(first_frames or []):
        if f is not None:
            video[i] = torch.cat([f.to(video[i]), video[i][:, 1:]], dim=1)
    for i, a in enumerate(clean_audio or []):
        if a is not None:
            audio[i] = a.to(audio[i])
    return video, audio


@torch.no_grad()
def sample_unipc(
    model: Denoiser,
    video: list[Tensor],
    audio: list[Tensor],
    text: list[Tensor],
    negative_text: list[Tensor] | None,
    num_steps: int = 32,
    shift: float = 5.0,
    guidance: Guidance | None = None,
    first_frames: list[Tensor | None] | None = None,
    clean_audio: list[Tensor | None] | None = None,
    progress: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Base sampler: flow UniPC-2 on video and audio, CFG with the negative prompt as the uncond branch.

    video/audio: initial noise per clip. negative_text None (or guidance None) runs without CFG.
    first_frames (i2v) are re-imposed before every step and at the end; clean_audio (a2v) is held fixed
    and not updated (the released cfg-2 path).
    """
    guidance = guidance or Guidance()
    use_cfg = negative_text is not None
    n = len(video)
    scheds = [(make_unipc(num_steps, shift), make_unipc(num_steps, shift)) for _ in range(n)]
    timesteps = scheds[0][0].timesteps.tolist()
    video, audio = list(video), list(audio)
    for t in _progress(timesteps, progress, "sampling"):
        video, audio = _impose(video, audio, first_frames, clean_audio)
        v_cond, a_cond = model(video, audio, text)
        if use_cfg:
            v_unc, a_unc = model(video, audio, negative_text)
            sv = guidance.video_scale_at(t)
            v_cond = [cfg_combine(c, u, sv) for c, u in zip(v_cond, v_unc, strict=True)]
            a_cond = [cfg_combine(c, u, guidance.audio_scale) for c, u in zip(a_cond, a_unc, strict=True)]
        for i, (sv_sched, sa_sched) in enumerate(scheds):
            video[i] = sv_sched.step(v_cond[i].unsqueeze(0), t, video[i].unsqueeze(0)).prev_sample[0]
            if clean_audio is None or clean_audio[i] is None:
                audio[i] = sa_sched.step(a_cond[i].unsqueeze(0), t, audio[i].unsqueeze(0)).prev_sample[0]
    return _impose(video, audio, first_frames, clean_audio)


@torch.no_grad()
def sample_distilled(
    model: Denoiser,
    video: list[Tensor],
    audio: list[Tensor],
    text: list[Tensor],
    num_steps: int = 8,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    first_frames: list[Tensor | None] | None = None,
    clean_audio: list[Tensor | None] | None = None,
    progress: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Distilled sampler: no CFG; x0 = x - s_i v, then x = s_{i+1} eps + (1 - s_{i+1}) x0 with fresh eps.

    a2v differs from the release on purpose: the released distilled path re-noises and updates the
    clean audio too (spec §4.7, GAIR issue #44); here clean audio stays clean at every step.
    """
    sigmas = released_sigmas(num_steps, shift).tolist()
    video, audio = list(video), list(audio)
    for i in _progress(range(num_steps), progress, "sampling"):
        video, audio = _impose(video, audio, first_frames, clean_audio)
        v_pred, a_pred = model(video, audio, text)
        s, s_next = sigmas[i], sigmas[i + 1]
        for j in range(len(video)):
            x0_v = x0_from_velocity(video[j], v_pred[j], s)
            x0_a = x0_from_velocity(audio[j], a_pred[j], s)
            # one randn per clip and step, video then audio (release draw order, spec §4.8)
            eps_v = torch.randn(video[j].shape, generator=generator, device=video[j].device)
            eps_a = torch.randn(audio[j].shape, generator=generator, device=audio[j].device)
            video[j] = s_next * eps_v + (1 - s_next) * x0_v
            audio[j] = s_next * eps_a + (1 - s_next) * x0_a
    return _impose(video, audio, first_frames, clean_audio)


__all__ = [
    "Denoiser",
    "Guidance",
    "Mode",
    "cfg_combine",
    "make_unipc",
    "released_sigmas",
    "released_timesteps",
    "sample_distilled",
    "sample_unipc",
]
