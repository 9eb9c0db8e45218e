"""Validation metrics of DMD-2 distillation (issue 12 item 7): how far the student's samples are from the guided
teacher's on a fixed validation set, per modality, and whether the student's audio still follows its video.

Pure tensor functions over the `dmd.Batch` layout (a list over modalities of per-clip tensors). The channel axis
of a modality is given explicitly: 0 for video latents [48, T, H, W], -1 for audio latents [A, 64].

- `latent_stats` / `stat_distance`: per-channel mean and std over every token of every clip; the distance is the
  RMS over channels of the differences of both, in latent units. A collapsing student (shrinking spread, drifting
  mean, the DMD over-saturation of spec/dmd2.md §6) moves it away from 0; `std_ratio` says which way.
- `coupling_score`: the teacher as a judge of the joint distribution. Both modalities of every clip are noised at
  one level and the teacher's x0 error is measured once with the clip's own audio and once with the audio of
  another clip (tiled or cropped to length) beside the same video. For samples whose audio belongs to their video the swapped
  pairs are harder to denoise; the score is the relative increase of the error, (E_swapped - E_own) / E_own,
  and 0 when audio and video are independent. Compare the student's with the teacher's own samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from magi_train.flow import dmd

# x0 of a score model with its conditioning (e.g. the teacher with CFG): (x_t, sigma [N]) -> x0
X0Fn = Callable[[dmd.Batch, Tensor], dmd.Batch]


def _channels_last(x: Tensor, channel_dim: int) -> Tensor:
    """[tokens, C] view of one clip."""
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).double()


@torch.no_grad()
def latent_stats(clips: Sequence[Tensor], channel_dim: int) -> Tensor:
    """[C, 2] per-channel (mean, std) over every token of every clip."""
    tokens = torch.cat([_channels_last(x, channel_dim) for x in clips])
    return torch.stack([tokens.mean(0), tokens.std(0, correction=0)], dim=1)


@torch.no_grad()
def stat_distance(a: Sequence[Tensor], b: Sequence[Tensor], channel_dim: int) -> Tensor:
    """RMS over channels of the differences of per-channel mean and std between two sets of clips (0 = equal)."""
    sa, sb = latent_stats(a, channel_dim), latent_stats(b, channel_dim)
    return (sa - sb).pow(2).sum(1).mean().sqrt()


@torch.no_grad()
def std_ratio(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Overall std of the clips a over that of b (< 1: a is narrower, e.g. a collapsing student)."""

    def std(clips: Sequence[Tensor]) -> Tensor:
        flat = torch.cat([x.double().flatten() for x in clips])
        return flat.std(correction=0)

    return std(a) / std(b).clamp_min(1e-12)


def swap_partner(n: int) -> list[int] | None:
    """For every clip, the clip whose audio it is paired with in the swapped pairs: the next one in a cycle (None
    for fewer than 2 clips: the coupling cannot be measured on such a batch)."""
    return [(i + 1) % n for i in range(n)] if n >= 2 else None


def fit_length(x: Tensor, like: Tensor) -> Tensor:
    """Another clip's audio [A', C] fitted to the length of `like` [A, C] by cyclic tiling / cropping in time."""
    reps = -(-like.shape[0] // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[: like.shape[0]]


@torch.no_grad()
def coupling_score(
    x0_fn: X0Fn, samples: dmd.Batch, sigma: float = 0.5, generator: torch.Generator | None = None
) -> Tensor:
    """Relative increase of the judge's x0 error (both modalities, per-modality means) when every clip's audio is
    replaced by another clip's: (E_swapped - E_own) / E_own; nan for a batch of one clip.

    samples: [video clips, audio clips]; the judge sees video i with audio i, then video i with audio partner(i),
    under the same noise and conditioning of clip i (its text: the video's prompt); audio of another length is
    tiled or cropped to clip i's length (`fit_length`)."""
    video, audio = samples
    partner = swap_partner(len(audio))
    if partner is None:
        return torch.tensor(float("nan"))
    n = len(video)
    s = torch.full((n,), float(sigma), device=video[0].device)
    eps = dmd.randn_like_batch(samples, generator)
    swapped = [list(video), [fit_length(audio[j], audio[i]) for i, j in enumerate(partner)]]

    def error(x0: dmd.Batch) -> Tensor:
        x_t = dmd.noise_batch(x0, eps, s)
        pred = x0_fn(x_t, s)
        return sum(
            dmd.modality_mean([(p.float() - t.float()).pow(2) for p, t in zip(pm, tm, strict=True)])
            for pm, tm in zip(pred, x0, strict=True)
        )

    own, other = error(samples), error(swapped)
    return ((other - own) / own.clamp_min(1e-12)).detach()


def distill_metrics(
    student: dmd.Batch, teacher: dmd.Batch, x0_fn: X0Fn, sigma: float = 0.5, generator: Any = None
) -> dict[str, Tensor]:
    """The validation metrics of one batch: per-modality stat distance and std ratio of the student's samples to the
    teacher's, and the coupling score of both (and the student's over the teacher's)."""
    out: dict[str, Tensor] = {}
    for m, (name, channel_dim) in enumerate((("video", 0), ("audio", -1))):
        out[f"teacher_dist_{name}"] = stat_distance(student[m], teacher[m], channel_dim).float()
        out[f"std_ratio_{name}"] = std_ratio(student[m], teacher[m]).float()
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))

    def gen() -> torch.Generator | None:  # the same noise for the student's and the teacher's samples
        if seed is None:
            return None
        return torch.Generator(device=student[0][0].device).manual_seed(seed)

    out["coupling_student"] = coupling_score(x0_fn, student, sigma, gen()).float()
    out["coupling_teacher"] = coupling_score(x0_fn, teacher, sigma, gen()).float()
    out["coupling_ratio"] = out["coupling_student"] / out["coupling_teacher"].clamp_min(1e-12)
    return out


__all__ = [
    "coupling_score",
    "distill_metrics",
    "latent_stats",
    "stat_distance",
    "std_ratio",
    "fit_length",
    "swap_partner",
]
