"""Flow-matching math of daVinci-MagiHuman (rectified flow, x_s = (1 - s) x0 + s eps, v = eps - x0).

Pure tensor functions shared by training, distillation and sampling; no Lightning, no data code.
The model is timestep-free, so the noise level s appears only here and in the samplers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

import torch
from torch import Tensor


class Mode(StrEnum):
    """Conditioning modes (DESIGN.md): text-to-video, image(first frame)-to-video, audio-to-video."""

    T2V = "t2v"
    I2V = "i2v"
    A2V = "a2v"


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Time shift s' = k s / (1 + (k - 1) s); k = 5 in the released sampler (spec §4.4)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """The flow path x_s = (1 - s) x0 + s eps (s = 1 is pure noise)."""
    return (1 - sigma) * x0 + sigma * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target of the model: v = eps - x0."""
    return eps - x0


def x0_from_velocity(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x0 = x_s - s v."""
    return x - sigma * v


def _draw(n: int, kind: str, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """The underlying variable of a sigma marginal: u ~ U[0, 1) (uniform) or z ~ N(0, 1) (logit_normal)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.randn(n, generator=generator, device=device)
    raise ValueError(f"unknown sigma sampling {kind!r}: use 'uniform' or 'logit_normal'")


def _to_sigma(raw: Tensor, kind: str, shift: float, mean: float, std: float) -> Tensor:
    s = raw if kind == "uniform" else torch.sigmoid(mean + std * raw)
    return shift_sigma(s, shift)


def sample_sigma(
    n: int,
    kind: str = "logit_normal",
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Training noise levels, one per clip: uniform or logit-normal (SD3), then the time shift.

    With shift = 5 the training distribution leans to high noise like the released sampler's schedule.
    """
    return _to_sigma(_draw(n, kind, generator, device), kind, shift, mean, std)


AUDIO_SIGMA = ("shared", "independent", "correlated")


def check_audio_sigma(audio_sigma: str, correlation: float) -> None:
    """ValueError for an unknown `flow.audio_sigma` or a copula correlation outside [-1, 1]."""
    if audio_sigma not in AUDIO_SIGMA:
        raise ValueError(f"flow.audio_sigma={audio_sigma!r}: use one of {list(AUDIO_SIGMA)}")
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(
            f"flow.audio_sigma_correlation={correlation}: a correlation in [-1, 1] (Gaussian copula)"
        )


def sample_sigma_pair(
    n: int,
    kind: str = "logit_normal",
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    audio_sigma: str = "shared",
    correlation: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(video sigma [n], audio sigma [n]): per-clip noise levels of the two modalities.

    The DiT is timestep-free, so it has to read each modality's noise level off its own input. LTX-2's trainer
    noises audio and video at independent levels (issue 11) so that the model learns them separately (and can
    denoise one modality given a cleaner other); we offer that besides the released joint schedule:

    - shared: audio takes the clip's video level (the released sampler runs one schedule). Draws exactly what
      `sample_sigma` draws (same generator use), so losses are bit-identical to training without this option.
    - independent: a second draw of the same marginal (kind, mean, std, shift).
    - correlated: the same marginal, coupled by a Gaussian copula: the underlying standard normals z (of the
      logit-normal, or Phi^-1(u) of the uniform) have correlation `correlation` in [-1, 1]. The shift and the
      marginal transforms are monotone, so the rank correlation of the drawn levels is (6/pi) asin(rho/2) for
      either kind; 1 gives shared levels, 0 independent ones, negative values opposite ones.
    The video levels are the same draw in every mode (the first n values of the generator's stream).
    """
    check_audio_sigma(audio_sigma, correlation)
    raw = _draw(n, kind, generator, device)
    video = _to_sigma(raw, kind, shift, mean, std)
    if audio_sigma == "shared":
        return video, video
    fresh = _draw(n, kind, generator, device)
    if audio_sigma == "independent":
        return video, _to_sigma(fresh, kind, shift, mean, std)
    # correlated: mix the video draw's underlying normal with a fresh one, z_a = rho z_v + sqrt(1 - rho^2) w
    if kind == "uniform":  # to normals and back: Phi^-1(u), Phi(z); clamped so that u = 0 stays finite
        tiny = torch.finfo(raw.dtype).eps
        z_video, w = (math.sqrt(2) * torch.erfinv(2 * u.clamp(tiny, 1 - tiny) - 1) for u in (raw, fresh))
    else:
        z_video, w = raw, fresh
    z = correlation * z_video + math.sqrt(1 - correlation**2) * w
    audio_raw = 0.5 * (1 + torch.erf(z / math.sqrt(2))) if kind == "uniform" else z
    return video, _to_sigma(audio_raw, kind, shift, mean, std)


def noise_clip(
    video: Tensor,
    audio: Tensor,
    sigma: Tensor,
    video_eps: Tensor,
    audio_eps: Tensor,
    mode: Mode,
    image: Tensor | None = None,
    audio_sigma: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Noisy model inputs of one clip for its conditioning mode; audio is noised at `audio_sigma` (None: the
    video's `sigma`, the released joint schedule; `sample_sigma_pair` draws both).

    i2v: the clean first latent frame (`image`, or frame 0 of the clean video) replaces frame 0 of the
    noisy video, with no extra token or flag (spec §4.6). a2v: the clean audio latent is the audio input.
    Returns (video_in [48,T,H,W], audio_in [A,64], first_frame or None).
    """
    first = None
    if mode == Mode.I2V:
        first = video[:, :1] if image is None else image.to(video)
    clean = audio if mode == Mode.A2V else None
    (video_in,), (audio_in,) = impose_conditions(
        [add_noise(video, video_eps, sigma)],
        [add_noise(audio, audio_eps, sigma if audio_sigma is None else audio_sigma)],
        [first],
        [clean],
    )
    return video_in, audio_in, first


def impose_conditions(
    video: Sequence[Tensor],
    audio: Sequence[Tensor],
    first_frames: Sequence[Tensor | None] | None,
    clean_audio: Sequence[Tensor | None] | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Conditioning by replacement (spec §4.6-4.7): new lists in which frame 0 of clip i is first_frames[i]
    (i2v) and its audio is clean_audio[i] (a2v). None (for a list or an entry) leaves clips untouched.

    The one place where conditions enter model inputs: samplers, DMD-2 score models and pretraining noising.
    """
    video, audio = list(video), list(audio)
    for name, conds in (("first_frames", first_frames), ("clean_audio", clean_audio)):
        if conds is not None and len(conds) != len(video):
            raise ValueError(
                f"{name} has {len(conds)} entries for {len(video)} clips: one (or None) per clip"
            )
    for i, f in enumerate(first_frames or []):
        if f is not None:
            video[i] = torch.cat([f.to(video[i]), video[i][:, 1:]], dim=1)
    for i, a in enumerate(clean_audio or []):
        if a is not None:
            audio[i] = a.to(audio[i])
    return video, audio


def condition_velocities(
    video: Sequence[Tensor],
    audio: Sequence[Tensor],
    first_frames: Sequence[Tensor | None],
    clean_audio: Sequence[Tensor | None],
    sigma: Tensor,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Velocities (x_s - clean) / s of the conditioned parts of noisy inputs x_s at per-clip levels sigma [N].

    Imposed on a model's output (`impose_conditions`), they make x0 = x_s - s v equal the condition there, so
    losses in x0 space vanish on conditioned parts. Entries are None where a clip has no such condition.
    """
    first_v = [
        None if f is None else (x[:, :1] - f.to(x)) / s
        for x, f, s in zip(video, first_frames, sigma, strict=True)
    ]
    audio_v = [
        None if a is None else (x - a.to(x)) / s for x, a, s in zip(audio, clean_audio, sigma, strict=True)
    ]
    return first_v, audio_v


def masked_mse(pred: list[Tensor], target: list[Tensor], frames_from: list[int] | None = None) -> Tensor:
    """Mean squared error over every element of a pack (token-weighted, as in packed LM training).

    frames_from[i] > 0 drops the first latent frames of clip i from the loss (i2v: the clean frame).
    Clips with nothing left contribute nothing; an empty selection gives 0 with a gradient path.
    """
    total, count = pred[0].new_zeros(()), 0
    for i, (p, t) in enumerate(zip(pred, target, strict=True)):
        start = frames_from[i] if frames_from else 0
        if start:
            p, t = p[:, start:], t[:, start:]
        if p.numel():
            total = total + (p.float() - t.float()).pow(2).sum()
            count += p.numel()
    return total / max(count, 1)


def joint_flow_loss(
    pred_video: list[Tensor],
    pred_audio: list[Tensor],
    target_video: list[Tensor],
    target_audio: list[Tensor],
    modes: list[Mode],
    video_weight: float = 1.0,
    audio_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Joint video + audio flow-matching loss with per-modality weights and per-mode masks.

    i2v clips have no loss on their clean first frame; a2v clips have no audio loss. Returns
    {"loss", "loss_video", "loss_audio"}.
    """
    frames_from = [1 if m == Mode.I2V else 0 for m in modes]
    loss_video = masked_mse(pred_video, target_video, frames_from)
    keep = [i for i, m in enumerate(modes) if m != Mode.A2V]
    if keep:
        loss_audio = masked_mse([pred_audio[i] for i in keep], [target_audio[i] for i in keep])
    else:
        loss_audio = sum(p.sum() for p in pred_audio) * 0.0  # keeps every parameter in the graph (DDP)
    loss = video_weight * loss_video + audio_weight * loss_audio
    return {"loss": loss, "loss_video": loss_video, "loss_audio": loss_audio}


def sample_modes(n: int, probs: dict[str, float], generator: torch.Generator | None = None) -> list[Mode]:
    """Draw a conditioning mode per clip from {"t2v": p, "i2v": p, "a2v": p} (weights need not sum to 1)."""
    names = [Mode(k) for k, p in probs.items() if p > 0]
    if not names:
        raise ValueError(f"mode probabilities {probs} give no mode a positive weight")
    weights = torch.tensor([probs[str(m)] for m in names], dtype=torch.float)
    idx = torch.multinomial(weights, n, replacement=True, generator=generator)
    return [names[i] for i in idx.tolist()]


def drop_text(text: list[Tensor], drop: Tensor, null_text: Tensor) -> list[Tensor]:
    """Replace the text features of clips where drop[i] is true by `null_text` [L0, D].

    Trained this way the model learns the unconditional branch that classifier-free guidance uses; pass
    the negative-prompt features as null_text to match the released sampler's uncond branch.
    """
    return [null_text.to(t) if d else t for t, d in zip(text, drop.tolist(), strict=True)]
