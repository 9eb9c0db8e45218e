"""DMD-2 distillation losses as pure functions over lists of modalities (Yin et al., DMD2, arXiv 2405.14867).

A batch is a list over modalities (video, audio, ...), and each modality is either one tensor whose first
dim indexes the samples (`[N, ...]`, as in the 2-D toy) or a list of per-sample tensors of any shapes (the
DiT's variable-size clips). All modalities of a sample share one noise level s (the DiT has no timestep
input, so it could not be told different levels), and everything is done in x0 space with the
conventions of `matching.py`: x_s = (1 - s) x0 + s eps, v = eps - x0, x0 = x_s - s v.

Score models are callables `model(xs, sigma, cond) -> velocities` over such batches. `sigma` ([N], one
level per sample) is passed for models that need it (the toy MLP); a timestep-free DiT adapter ignores it.

One DMD step, as the reference code bases run it (spec/dmd2.md §2-4):
    k = sample_step_index(K, shared_generator(seed, step))        # same k on every rank
    x_k = simulate_to_step(student, noise, k, sigmas, cond)        # no grad
    x_g = student_x0(student, x_k, sigmas[k], cond)                # with grad
    out = dmd_generator_loss(x_g, teacher, critic, sample_score_sigma(N), cond, uncond, guidance)
    critic_loss(critic, detach(x_g), sample_score_sigma(N), cond)   # every iteration (TTUR), fresh sigma
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from magi_train.flow.matching import add_noise, shift_sigma, velocity_target, x0_from_velocity
from magi_train.flow.sampling import Batch, Guidance, Modality, cfg_combine, released_sigmas, renoise_chain

ScoreModel = Callable[[Batch, Tensor, Any], Batch]  # (x_s per modality, sigma [N], cond) -> velocities
# scale(modality index, sigma [N]) -> guidance scale per sample ([N] tensor or a float)
ScaleFn = Callable[[int, Tensor], Tensor | float]


# --------------------------------------------------------------------------------------------------
# batch helpers


def num_samples(xs: Batch) -> int:
    """Number of samples in a batch (checked equal across modalities)."""
    sizes = {len(m) for m in xs}
    if len(sizes) != 1:
        raise ValueError(f"modalities disagree on the number of samples: {[len(m) for m in xs]}")
    return sizes.pop()


def per_sample(values: Tensor, x: Modality) -> Tensor | list[Tensor]:
    """Broadcast per-sample values [N] against one modality: [N, 1, ...] or a list of 0-dim tensors."""
    if isinstance(x, Tensor):
        return values.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return [values[i].to(xi.device) for i, xi in enumerate(x)]


def _map(fn: Callable[..., Tensor], *mods: Modality) -> Modality:
    """Apply fn element-wise to aligned modalities (tensor-wise if batched, clip-wise if lists)."""
    if isinstance(mods[0], Tensor):
        return fn(*mods)
    return [fn(*parts) for parts in zip(*mods, strict=True)]


def _map_sigma(fn: Callable[..., Tensor], sigma: Tensor, *mods: Modality) -> Modality:
    """Like `_map`, with the per-sample sigma broadcast as the last argument."""
    s = per_sample(sigma, mods[0])
    if isinstance(mods[0], Tensor):
        return fn(*mods, s)
    return [fn(*parts, si) for *parts, si in zip(*mods, s, strict=True)]


def detach(xs: Batch) -> Batch:
    """Detached copy of a batch (a view, no data copy)."""
    return [_map(Tensor.detach, m) for m in xs]


def randn_like_batch(xs: Batch, generator: torch.Generator | None = None) -> Batch:
    """Fresh standard normal noise shaped like xs (drawn modality by modality, sample by sample)."""

    def draw(x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return [_map(draw, m) for m in xs]


def noise_batch(x0: Batch, eps: Batch, sigma: Tensor) -> Batch:
    """x_s = (1 - s) x0 + s eps per modality, with one s per sample shared by every modality."""
    return [_map_sigma(add_noise, sigma, x, e) for x, e in zip(x0, eps, strict=True)]


def x0_batch(x: Batch, v: Batch, sigma: Tensor) -> Batch:
    """x0 = x_s - s v per modality."""
    return [_map_sigma(x0_from_velocity, sigma, xi, vi) for xi, vi in zip(x, v, strict=True)]


def predict_x0(model: ScoreModel, x: Batch, sigma: Tensor, cond: Any) -> Batch:
    """x0 prediction of a velocity model (grad mode is the caller's)."""
    return x0_batch(x, model(x, sigma, cond), sigma)


def _up(x: Tensor) -> Tensor:
    """x in at least fp32 (bf16 model outputs are summed and differenced in fp32, fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _sum_numel(x: Modality) -> tuple[Tensor, int]:
    """(sum over all elements in at least fp32, number of elements) of one modality."""
    if isinstance(x, Tensor):
        return _up(x).sum(), x.numel()
    return torch.stack([_up(xi).sum() for xi in x]).sum(), sum(xi.numel() for xi in x)


def modality_mean(x: Modality) -> Tensor:
    """Mean over every element of one modality (token-weighted across variable-size samples)."""
    total, count = _sum_numel(x)
    return total / max(count, 1)


def mean_abs(xs: Batch) -> list[Tensor]:
    """mean |x| per modality (e.g. of g: the `dmdtrain_gradient_norm` the reference code bases log)."""
    return [modality_mean(_map(torch.abs, m)).detach() for m in xs]


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} loss weights for {n} modalities; pass one weight per modality")
    return list(weights)


# --------------------------------------------------------------------------------------------------
# noise levels and backward simulation


def sample_score_sigma(
    n: int,
    low: float = 0.02,
    high: float = 0.98,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    method: str = "clamp",
) -> Tensor:
    """Noise levels of the DMD and critic steps, one per sample: u ~ U[0, 1), shifted, kept in [low, high].

    method "clamp" (CausVid, Self-Forcing, FastVideo; spec/dmd2.md §2.1): shift(u) clamped to [low, high],
    which puts the clipped mass (about 9% at `high` for shift 5) on the bounds. "truncate": u drawn
    uniformly from the preimage of [low, high] under the shift, so the same shifted density without atoms.
    shift = 1 gives DMD2's uniform t in [low, high].
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"score sigma bounds must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    if shift <= 0:
        raise ValueError(f"score sigma shift must be > 0, got {shift}")
    u = torch.rand(n, generator=generator, device=device)
    if method == "clamp":
        return shift_sigma(u, shift).clamp(low, high)
    if method == "truncate":
        lo, hi = (s / (shift - (shift - 1) * s) for s in (low, high))  # inverse of the shift
        return shift_sigma(lo + (hi - lo) * u, shift).clamp(low, high)
    raise ValueError(f"unknown score sigma method {method!r}: use 'clamp' or 'truncate'")


def student_sigmas(num_steps: int, shift: float = 5.0) -> Tensor:
    """The student's step list plus a final 0: the released distilled schedule (8 steps, shift 5)."""
    return released_sigmas(num_steps, shift)


def shared_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, global step): every rank draws the same numbers at the same step."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def sample_step_index(num_steps: int, generator: torch.Generator | None = None) -> int:
    """The student step k ~ U{0..K-1} to train this iteration (DMD2 backward simulation).

    Must be identical on every rank (FSDP ranks must run the same number of forwards): seed `generator`
    with the global step, e.g. `shared_generator(seed, step)`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (the student's step count), got {num_steps}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(num_steps, (1,), generator=generator, device=device).item())


def _full_sigma(value: Tensor | float, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), float(value), device=device)


def _device(xs: Batch) -> torch.device:
    first = xs[0]
    return first.device if isinstance(first, Tensor) else first[0].device


@torch.no_grad()
def simulate_to_step(
    student: ScoreModel,
    noise: Batch,
    k: int,
    sigmas: Tensor,
    cond: Any,
    generator: torch.Generator | None = None,
) -> Batch:
    """Run the student without grad through steps 0..k-1 from pure noise; return the input of step k.

    The hops are `sampling.renoise_chain`, the distilled sampler's loop: x0 = x - s_i v, then
    x = s_{i+1} eps + (1 - s_{i+1}) x0 with fresh eps in its draw order (clip by clip, video then audio).
    k = 0 returns the noise; k = K (= len(sigmas) - 1, last sigma 0) returns the finished sample, so this is
    also the few-step sampler.
    """
    n, device = num_samples(noise), _device(noise)

    def predict(x: Batch, s: Tensor) -> Batch:
        return predict_x0(student, x, _full_sigma(s, n, device), cond)

    return renoise_chain(predict, detach(noise), sigmas, 0, k, generator)


@torch.no_grad()
def finish_from_step(
    student: ScoreModel,
    x0_k: Batch,
    k: int,
    sigmas: Tensor,
    cond: Any,
    generator: torch.Generator | None = None,
) -> Batch:
    """The finished sample of the chain whose step k predicted `x0_k`: re-noise it to s_{k+1} and run the
    student's steps k+1..K-1 without grad (the same `renoise_chain` hops, fresh noise); x0_k itself when k is
    the last step.

    What the critic learns with `critic_samples="final"`: the student's output distribution only. With the
    step's own x0 (DMD2, Self-Forcing) the critic, which is not told k, learns the mixture over steps of the
    student's x0, whose early steps lie far from the data; on the toy that mixture biases the DMD direction of
    every step (docs/dmd2_toy.md, "Convergence or bias?").
    """
    n, device = num_samples(x0_k), _device(x0_k)
    first = True

    def predict(x: Batch, s: Tensor) -> Batch:
        nonlocal first
        if first:  # step k's x0 is given: the chain's first hop re-noises it
            first = False
            return detach(x0_k)
        return predict_x0(student, x, _full_sigma(s, n, device), cond)

    return renoise_chain(predict, detach(x0_k), sigmas, k, len(sigmas) - 1, generator)


def student_x0(student: ScoreModel, x: Batch, sigma: Tensor | float, cond: Any) -> Batch:
    """The student's x0 at one step of its list (run this one with grad: it is x_g of the DMD loss)."""
    return predict_x0(student, x, _full_sigma(sigma, num_samples(x), _device(x)), cond)


# --------------------------------------------------------------------------------------------------
# real score (teacher, CFG inside), DMD gradient and losses


def guidance_scales(
    guidance: Guidance | ScaleFn | Sequence[float] | float | None, sigma: Tensor, num_modalities: int
) -> list[Tensor]:
    """Per-modality, per-sample CFG scales [N] at noise levels sigma (t = 1000 s).

    Guidance: modality 0 is video (video_scale while t > switch_t, else video_scale_late), modality 1
    audio (audio_scale). A callable gets (modality index, sigma [N]); a sequence gives one constant per
    modality; a float applies to all; None means no guidance (scale 1).
    """
    ones = torch.ones_like(sigma)
    if guidance is None or isinstance(guidance, int | float):
        return [ones * (1.0 if guidance is None else float(guidance)) for _ in range(num_modalities)]
    if isinstance(guidance, Guidance):
        if num_modalities > 2:
            raise ValueError(
                f"Guidance covers (video, audio); got {num_modalities} modalities, pass a callable"
            )
        video, audio = guidance.scales(1000 * sigma)  # the release's rule is on t = 1000 s
        return [video.to(sigma), audio.to(sigma)][:num_modalities]
    if callable(guidance):
        return [ones * guidance(m, sigma) for m in range(num_modalities)]
    if len(guidance) != num_modalities:
        raise ValueError(
            f"got {len(guidance)} guidance scales for {num_modalities} modalities; "
            "pass one scale per modality"
        )
    return [ones * float(w) for w in guidance]


@torch.no_grad()
def teacher_x0(
    teacher: ScoreModel,
    x_t: Batch,
    sigma: Tensor,
    cond: Any,
    uncond: Any = None,
    guidance: Guidance | ScaleFn | Sequence[float] | float | None = None,
) -> Batch:
    """The real score's x0 with classifier-free guidance inside (Ho-Salimans: u + w (c - u)).

    Guidance is applied to the velocity, which equals applying it to x0 (x0 = x_t - s v is affine in v
    with the same x_t in both branches). `uncond` is the caller's negative-prompt / null conditioning; the
    unconditional pass is skipped when every scale is 1. The critic (fake score) never uses CFG: call
    `predict_x0` for it. A teacher with a `cond_uncond(x_t, sigma, cond, uncond)` method runs both branches at
    once (e.g. as 2N clips of one packed forward: tasks/dmd2.py DiTScore).
    """
    scales = guidance_scales(guidance, sigma, len(x_t))
    if any(bool((w != 1).any()) for w in scales):
        if uncond is None:
            raise ValueError("CFG scale != 1 needs the unconditional (negative-prompt) conditioning `uncond`")
        both = getattr(teacher, "cond_uncond", None)  # a model that runs both branches in one forward
        v, v_u = both(x_t, sigma, cond, uncond) if both is not None else (
            teacher(x_t, sigma, cond), teacher(x_t, sigma, uncond)
        )  # fmt: skip
        v = [_map_sigma(cfg_combine, w, c, u) for c, u, w in zip(v, v_u, scales, strict=True)]
    else:
        v = teacher(x_t, sigma, cond)
    return x0_batch(x_t, v, sigma)


def _diff(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    return a.to(dtype) - b.to(dtype)


def _abs_diff(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    return (a.to(dtype) - b.to(dtype)).abs()


def _finite(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_gradient(
    x_g: Batch, x0_real: Batch, x0_fake: Batch, normalizer: str = "per_sample", min_norm: float = 1e-6
) -> Batch:
    """The DMD direction g = (x0_fake - x0_real) / mean|x_g - x0_real|, per modality, constant (no grad).

    normalizer "per_sample" (DMD2, CausVid, Self-Forcing): one mean per sample and per modality, so video
    and audio are normalised separately; "batch" (FastVideo): one mean per modality over the whole batch;
    "none": no normalisation. The normaliser is floored at `min_norm` and non-finite g entries are zeroed
    (the reference code bases apply nan_to_num). Computed in at least fp32.
    """
    if normalizer not in ("per_sample", "batch", "none"):
        raise ValueError(f"unknown DMD normalizer {normalizer!r}: use 'per_sample', 'batch' or 'none'")
    out = []
    for xg, xr, xf in zip(detach(x_g), detach(x0_real), detach(x0_fake), strict=True):
        dtype = torch.promote_types((xg if isinstance(xg, Tensor) else xg[0]).dtype, torch.float32)
        direction = _map(partial(_diff, dtype=dtype), xf, xr)
        if normalizer == "none":
            g = direction
        else:
            err = _map(partial(_abs_diff, dtype=dtype), xg, xr)
            if normalizer == "batch":
                norm = modality_mean(err).to(dtype).clamp_min(min_norm).expand(len(err))
            elif isinstance(err, Tensor):
                norm = err.flatten(1).mean(1).clamp_min(min_norm)
            else:
                norm = torch.stack([e.mean() for e in err]).clamp_min(min_norm)
            g = _map_sigma(torch.div, norm, direction)
        out.append(_map(_finite, g))
    return out


def _stop_grad_sq(x: Tensor, g: Tensor) -> Tensor:
    x = _up(x)
    return (x - (x - g.to(x.dtype)).detach()).pow(2)


def dmd_loss(x_g: Batch, g: Batch, weights: Sequence[float] | None = None) -> Tensor:
    """Stop-gradient form sum_m w_m * 0.5 * mean_m((x_g - sg(x_g - g))^2), whose gradient is g.

    Reduction: the mean runs over every element of modality m across the batch (N_m elements in all,
    token-weighted for variable-size samples), so d loss / d x_g[m] = w_m * g[m] / N_m exactly. Per-modality
    means keep a small modality (audio) from being swamped by a large one (video); `weights` (one per
    modality, default 1) sets their balance. Its value is about 0.5 mean(g^2) and does not track progress.
    """
    ws = _weights(weights, len(x_g))
    total = None
    for xg, gm, w in zip(x_g, g, ws, strict=True):
        sq = _map(_stop_grad_sq, xg, gm)
        term = w * 0.5 * modality_mean(sq)
        total = term if total is None else total + term
    return total


@dataclass
class DMDOutput:
    """Result of one generator-side DMD evaluation: the loss and what is worth logging or plotting."""

    loss: Tensor
    g: Batch
    x0_real: Batch
    x0_fake: Batch
    sigma: Tensor


def dmd_generator_loss(
    x_g: Batch,
    teacher: ScoreModel,
    critic: ScoreModel,
    sigma: Tensor,
    cond: Any,
    uncond: Any = None,
    guidance: Guidance | ScaleFn | Sequence[float] | float | None = None,
    normalizer: str = "per_sample",
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    eps: Batch | None = None,
) -> DMDOutput:
    """Noise x_g at sigma with fresh noise, query the real score (CFG) and the fake score (no CFG) without
    grad, and return the DMD loss on x_g. Neither score network receives gradients from it."""
    x_t = noise_batch(detach(x_g), eps if eps is not None else randn_like_batch(x_g, generator), sigma)
    x0_real = teacher_x0(teacher, x_t, sigma, cond, uncond, guidance)
    with torch.no_grad():
        x0_fake = predict_x0(critic, x_t, sigma, cond)
    g = dmd_gradient(x_g, x0_real, x0_fake, normalizer)
    return DMDOutput(dmd_loss(x_g, g, weights), g, x0_real, x0_fake, sigma)


def _velocity_sq(v: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    return (_up(v) - _up(velocity_target(x0, eps))).pow(2)


def critic_loss(
    critic: ScoreModel,
    x_g: Batch,
    sigma: Tensor,
    cond: Any,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    eps: Batch | None = None,
) -> Tensor:
    """Flow-matching loss of the fake score on detached generator samples: mean_m |v - (eps - x_g)|^2.

    Draw sigma independently of the DMD step (`sample_score_sigma`). Conditional branch only, no CFG;
    per-modality means weighted like `dmd_loss`. No gradient reaches the generator.
    """
    x0 = detach(x_g)
    eps = eps if eps is not None else randn_like_batch(x0, generator)
    v = critic(noise_batch(x0, eps, sigma), sigma, cond)
    ws = _weights(weights, len(x0))
    total = None
    for vm, x0m, em, w in zip(v, x0, eps, ws, strict=True):
        sq = _map(_velocity_sq, vm, x0m, em)
        term = w * modality_mean(sq)
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------------
# optional GAN term (DMD2: non-saturating, discriminator head on the critic)


def sample_gan_sigma(
    n: int, high: float = 1.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """Noise levels of the diffusion-GAN term, one per sample: s ~ U[0, high), unshifted and unclamped.

    DMD2 noises the discriminator's inputs at t ~ U{0, diffusion_gan_max_timestep} with max 1000 in every recipe
    (sd_guidance.py `compute_cls_logits`), i.e. uniformly over the whole training range, not at the DMD step's
    shifted and clamped levels. Use one draw for the real and the fake batch (`diffusion_gan_inputs`).
    """
    if not 0.0 < high <= 1.0:
        raise ValueError(f"GAN noise level bound must be in (0, 1], got {high}")
    return high * torch.rand(n, generator=generator, device=device)


def diffusion_gan_inputs(
    real: Batch, fake: Batch, sigma: Tensor, generator: torch.Generator | None = None
) -> tuple[Batch, Batch]:
    """Real and (detached or not) fake clean samples noised at the same levels sigma [N], independent noise.

    Sample i of both batches gets noise level sigma[i], so the discriminator compares real and fake at matched
    noise levels (the distributions DMD2 draws them from are the same; FastGen pairs them per sample,
    `gan_use_same_t_noise`) and cannot tell them apart by how noisy they are.
    """
    if num_samples(real) != num_samples(fake) or num_samples(real) != len(sigma):
        raise ValueError(
            f"diffusion GAN: real ({num_samples(real)}), fake ({num_samples(fake)}) and sigma ({len(sigma)}) "
            "must have one entry per sample each"
        )
    return (
        noise_batch(real, randn_like_batch(real, generator), sigma),
        noise_batch(fake, randn_like_batch(fake, generator), sigma),
    )


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss mean softplus(-D(x_g)) (DMD2 weight 5e-3 for SDXL)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss mean softplus(-D(real)) + mean softplus(D(fake)) on detached fakes (DMD2 1e-2)."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


__all__ = [
    "Batch",
    "DMDOutput",
    "Modality",
    "ScoreModel",
    "critic_loss",
    "detach",
    "diffusion_gan_inputs",
    "dmd_generator_loss",
    "dmd_gradient",
    "dmd_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "guidance_scales",
    "mean_abs",
    "modality_mean",
    "noise_batch",
    "num_samples",
    "per_sample",
    "predict_x0",
    "randn_like_batch",
    "sample_gan_sigma",
    "sample_score_sigma",
    "sample_step_index",
    "shared_generator",
    "simulate_to_step",
    "student_sigmas",
    "student_x0",
    "teacher_x0",
    "x0_batch",
]
