"""Samplers of the released daVinci-MagiHuman pipeline (spec §4.4-4.8): flow UniPC + CFG, and the distilled
8-step re-noising sampler. One implementation for inference, training-time sample callbacks and eval; the
re-noising chain (`renoise_chain`) is also DMD-2's backward simulation.

The base sampler is diffusers' `UniPCMultistepScheduler` (order 2, bh2, flow sigmas, final sigma 0) fed
the released sigma grid `linspace(0.999, 0, n+1)[:-1]`, which it shifts by 5 exactly as the release does;
its timestep lists equal the released 32/8/5-step lists (tests/flow/test_sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from magi_train.flow.matching import Mode, add_noise, impose_conditions, shift_sigma, x0_from_velocity

# model(video_list, audio_list, text_list) -> (velocity_video_list, velocity_audio_list)
Denoiser = Callable[[list[Tensor], list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]
Modality = Tensor | list[Tensor]  # [N, ...] batched, or N per-sample tensors of any shapes
Batch = list[Modality]  # outer index: modality (video, audio, ...)
# predict_x0(x at step i, sigma_i) -> x0; sigma_i is an element of the chain's sigma list
X0Predictor = Callable[[Batch, Tensor | float], Batch]

SIGMA_START = 0.999  # released training sigmas run 0.999 -> 0 (`1 - linspace(1, 1/1000)`), spec §4.4


@dataclass
class Guidance:
    """Classifier-free guidance of the released base sampler (spec §4.5)."""

    video_scale: float = 5.0  # while t > switch_t
    video_scale_late: float = 2.0  # once t <= switch_t
    switch_t: float = 500.0
    audio_scale: float = 5.0

    def scales(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(video, audio) scales, fp32 and shaped like t, at timesteps t on the 0..1000 scale.

        The release compares the scheduler's integer timestep (strict >), so UniPC passes that; callers
        holding sigmas in [0, 1] pass 1000 * sigma (DMD-2's real score).
        """
        video = torch.where(t > self.switch_t, self.video_scale, self.video_scale_late)
        return video, torch.full_like(video, self.audio_scale)

    def frame_scales(self, t: float, num_frames: int) -> tuple[Tensor, float]:
        """(video scale per latent frame [T], audio scale) at timestep t: one value for every frame here."""
        video, audio = self.scales(torch.tensor(t))
        return torch.full((num_frames,), float(video)), float(audio)


@dataclass
class SRGuidance:
    """CFG of the SR stage when it runs with CFG (the release's sr_cfg_number = 2; its example configs run 1, no
    CFG), spec §5 item 5: the video scale is a per-latent-frame tensor, sr_video_txt_guidance_scale 3.5 but
    min(cfg_trick_value, 3.5) = 2.0 on the first cfg_trick_start_frame = 13 latent frames ("avoid over exposure
    in I2V"), at every step; audio audio_txt_guidance_scale 5.0 (the SR model's audio output is discarded)."""

    video_scale: float = 3.5
    audio_scale: float = 5.0
    trick_frames: int = 13  # 0 turns the trick off (the release's use_cfg_trick=False)
    trick_value: float = 2.0

    def frame_scales(self, t: float, num_frames: int) -> tuple[Tensor, float]:
        video = torch.full((num_frames,), self.video_scale)
        video[: self.trick_frames] = min(self.trick_value, self.video_scale)
        return video, self.audio_scale


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
        num_train_timesteps=1000,
        solver_order=order,
        prediction_type="flow_prediction",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
        use_flow_sigmas=True,
        flow_shift=shift,
    )
    sched.set_timesteps(sigmas=np.linspace(SIGMA_START, 0.0, num_steps + 1)[:-1])
    return sched


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Ho-Salimans guidance u + w (c - u); w = 1 gives the conditional prediction."""
    return uncond + scale * (cond - uncond)


def cond_uncond(
    model: Denoiser,
    video: list[Tensor],
    audio: list[Tensor],
    text: list[Tensor],
    negative_text: list[Tensor],
    batched: bool = True,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(v_cond, a_cond, v_uncond, a_uncond) of N clips: the same latents with their text and with the negative text.

    batched: the 2N branches run as 2N clips of one packed forward (per-clip varlen attention keeps them apart, so
    the result equals two forwards up to float rounding) instead of two forwards of N clips each; the release runs
    the two branches as two batch-1 calls (spec §4.5). For every caller of CFG over a `Denoiser` (the base
    sampler; DMD-2's teacher).
    """
    n = len(video)
    if not (len(audio) == len(text) == len(negative_text) == n):
        raise ValueError(
            f"cond_uncond needs one audio, text and negative text per clip, got {n} video, {len(audio)} audio, "
            f"{len(text)} text, {len(negative_text)} negative text"
        )
    if not batched:
        v_cond, a_cond = model(video, audio, text)
        v_unc, a_unc = model(video, audio, negative_text)
        return list(v_cond), list(a_cond), list(v_unc), list(a_unc)
    v_all, a_all = model([*video, *video], [*audio, *audio], [*text, *negative_text])
    return list(v_all[:n]), list(a_all[:n]), list(v_all[n:]), list(a_all[n:])


def _progress(it: Iterable, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def fresh_noise(x: Batch, generator: torch.Generator | None = None) -> Batch:
    """Standard normal noise shaped like x in the released distilled sampler's draw order (spec §4.8): clip
    by clip, and video before audio within a clip. A batch of batched [N, ...] modalities counts as one clip.

    Drawn in at least fp32 (the release draws fp32 noise; fp64 states get fp64 noise).
    """

    def draw(t: Tensor) -> Tensor:
        dtype = torch.promote_types(t.dtype, torch.float32)
        return torch.randn(t.shape, generator=generator, dtype=dtype, device=t.device)

    if all(isinstance(m, Tensor) for m in x):
        return [draw(m) for m in x]
    if any(isinstance(m, Tensor) for m in x):
        raise ValueError("a batch mixes batched [N, ...] modalities and per-clip lists; use one layout")
    eps: list[list[Tensor]] = [[] for _ in x]
    for clip in zip(*x, strict=True):
        for m, part in enumerate(clip):
            eps[m].append(draw(part))
    return eps


def renoise_chain(
    predict_x0: X0Predictor,
    x: Batch,
    sigmas: Sequence[float] | Tensor,
    start: int = 0,
    stop: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Batch:
    """Re-noising steps start..stop-1: x0 = predict_x0(x, s_i), then x = s_{i+1} eps + (1 - s_{i+1}) x0.

    stop None runs to the end; eps is fresh at every step (`fresh_noise`). sigmas holds K + 1 levels ending
    at 0, so the full chain returns the last x0. This one loop is the distilled sampler (`sample_distilled`)
    and DMD-2's backward simulation (`dmd.simulate_to_step`, steps 0..k-1); grad mode is the caller's.
    """
    num_steps = len(sigmas) - 1
    stop = num_steps if stop is None else stop
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(
            f"step index range {start}..{stop} outside 0..{num_steps} of a {num_steps}-step list"
        )
    x = list(x)
    for i in _progress(range(start, stop), progress, "sampling"):
        x0 = predict_x0(x, sigmas[i])
        eps, s_next = fresh_noise(x0, generator), sigmas[i + 1]
        x = [
            add_noise(m, e, s_next)
            if isinstance(m, Tensor)
            else [add_noise(c, ce, s_next) for c, ce in zip(m, e, strict=True)]
            for m, e in zip(x0, eps, strict=True)
        ]
    return x


@torch.no_grad()
def sample_unipc(
    model: Denoiser,
    video: list[Tensor],
    audio: list[Tensor],
    text: list[Tensor],
    negative_text: list[Tensor] | None,
    num_steps: int = 32,
    shift: float = 5.0,
    guidance: Guidance | SRGuidance | None = None,
    first_frames: list[Tensor | None] | None = None,
    clean_audio: list[Tensor | None] | None = None,
    progress: bool = False,
    batch_cfg: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """Base sampler: flow UniPC-2 on video and audio, CFG with the negative prompt as the uncond branch.

    video/audio: initial noise per clip. negative_text None runs without CFG (guidance None: the released base
    scales; SRGuidance: the SR stage's per-frame video scales).
    first_frames (i2v) are re-imposed before every step and at the end; clean_audio (a2v) is held fixed
    and not updated (the released cfg-2 path). batch_cfg: both CFG branches in one packed forward
    (`cond_uncond`); False runs two forwards per step as the release does.
    """
    guidance = guidance or Guidance()
    use_cfg = negative_text is not None
    n = len(video)
    scheds = [(make_unipc(num_steps, shift), make_unipc(num_steps, shift)) for _ in range(n)]
    timesteps = scheds[0][0].timesteps.tolist()
    video, audio = list(video), list(audio)
    for t in _progress(timesteps, progress, "sampling"):
        video, audio = impose_conditions(video, audio, first_frames, clean_audio)
        if use_cfg:
            v_cond, a_cond, v_unc, a_unc = cond_uncond(model, video, audio, text, negative_text, batch_cfg)
            scales = [guidance.frame_scales(t, v.shape[1]) for v in video]
            v_cond = [  # [T] per-frame scales broadcast over [C, T, H, W]
                cfg_combine(c, u, sv.to(c)[:, None, None])
                for c, u, (sv, _) in zip(v_cond, v_unc, scales, strict=True)
            ]
            a_cond = [cfg_combine(c, u, sa) for c, u, (_, sa) in zip(a_cond, a_unc, scales, strict=True)]
        else:
            v_cond, a_cond = model(video, audio, text)
        for i, (sv_sched, sa_sched) in enumerate(scheds):
            video[i] = sv_sched.step(v_cond[i].unsqueeze(0), t, video[i].unsqueeze(0)).prev_sample[0]
            if clean_audio is None or clean_audio[i] is None:
                audio[i] = sa_sched.step(a_cond[i].unsqueeze(0), t, audio[i].unsqueeze(0)).prev_sample[0]
    return impose_conditions(video, audio, first_frames, clean_audio)


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
    clean audio too (spec §4.7, GAIR issue #44); here clean audio stays clean at every step. Noise: one
    randn per clip and step, video then audio (`fresh_noise`, the release's order).
    """

    def predict(x: Batch, s: float) -> Batch:
        video, audio = impose_conditions(x[0], x[1], first_frames, clean_audio)  # before every forward
        v_pred, a_pred = model(video, audio, text)
        return [
            [x0_from_velocity(xi, vi, s) for xi, vi in zip(xs, vs, strict=True)]
            for xs, vs in ((video, v_pred), (audio, a_pred))
        ]

    sigmas = released_sigmas(num_steps, shift).tolist()
    x = [list(video), list(audio)]
    video, audio = renoise_chain(predict, x, sigmas, generator=generator, progress=progress)
    return impose_conditions(video, audio, first_frames, clean_audio)


__all__ = [
    "Batch",
    "Denoiser",
    "Guidance",
    "Modality",
    "SRGuidance",
    "Mode",
    "X0Predictor",
    "cfg_combine",
    "cond_uncond",
    "fresh_noise",
    "make_unipc",
    "released_sigmas",
    "released_timesteps",
    "renoise_chain",
    "sample_distilled",
    "sample_unipc",
]
