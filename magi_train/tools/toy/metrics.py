"""Distribution-matching metrics of the DMD-2 toy (arXiv 2405.14867; spec/dmd2.md §9) for any `DataSpec`, and the
bounds a distilled student must meet against the guided teacher's many-step ODE (the reference).

Per modality ("video", "audio") and for the concatenation ("joint"):
- *mmd2*: unbiased MMD^2 with a sum of RBF kernels, bandwidths (0.5, 2, 5, 10, 20) x the modality's std;
- *sw1*: sliced Wasserstein-1 (256 random directions; exact W1 in 1-D).
Mode statistics (a sample is *assigned* to its nearest centre; *inside* if within 4 std of it):
- *std_ratio*: the smallest, over the reference's modes, of the student's within-mode std divided by the
  reference's, where the within-mode std is sqrt of the smallest eigenvalue of the covariance of the samples
  inside the mode (so a mode squeezed in any one direction counts); 0 for a mode the student lost;
- *mode_tv*: the largest, over classes, total variation between the student's and the reference's video mode
  weights within the class (one extra bin for samples inside no mode);
- *joint_acc*: the fraction whose nearest audio centre is the partner of their nearest video mode (the two
  modalities were generated as one sample); *joint_ratio* = student / reference;
- *class_acc*: the fraction whose nearest video mode has weight > 0 in the conditioning class;
- *in_3std*: the fraction within 3 std of its nearest centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from magi_train.tools.toy.gmm import DataSpec, off_content, readout

BANDWIDTH_FACTORS = (0.5, 2.0, 5.0, 10.0, 20.0)  # x std: 0.05 ... 2 for std 0.1 (spec/dmd2.md §9)
INSIDE = 4.0  # a sample belongs to a mode within 4 std of its centre (outside: an extra bin)
MIN_SHARE = 0.01  # modes holding less of the reference are left out of std_ratio (too few points)
MODALITIES = ("video", "audio")

# the acceptance bounds of issue 12 item 2 (the distances are bounded by the teacher's own N-step sampler)
STD_RATIO_MIN = 0.7
MODE_TV_MAX = 0.1  # weights of a class's modes; sampling noise of 3000 samples is ~0.02-0.03
JOINT_RATIO_MIN = 0.9


def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...]) -> float:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with a sum of RBF kernels exp(-d^2 / 2h^2)."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)

    def k_sum(a: Tensor, b: Tensor, same: bool) -> Tensor:
        d2 = torch.cdist(a, b).pow_(2)
        total = sum(torch.exp(-d2 / (2 * h * h)).sum() for h in bandwidths)
        return total - (len(bandwidths) * len(a) if same else 0.0)  # drop the diagonal k(x, x) = 1 terms

    return float(
        k_sum(x, x, True) / (n * (n - 1))
        + k_sum(y, y, True) / (m * (m - 1))
        - 2 * k_sum(x, y, False) / (n * m)
    )


def sliced_w1(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between x [n, d] and y [m, d] (quantiles compared on a common grid)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    if d == 1:
        dirs = torch.ones(1, 1, dtype=x.dtype)
    else:
        dirs = torch.randn(num_projections, d, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    q = (torch.arange(1000, dtype=x.dtype) + 0.5) / 1000
    px = torch.quantile((x @ dirs.T), q, dim=0)
    py = torch.quantile((y @ dirs.T), q, dim=0)
    return float((px - py).abs().mean())


def _finite(x: Tensor) -> Tensor:
    return torch.nan_to_num(x.detach().double(), nan=1e6, posinf=1e6, neginf=-1e6)


def assign(x: Tensor, centres: Tensor, std: float) -> tuple[Tensor, Tensor, Tensor]:
    """(nearest centre [n], inside 4 std [n] bool, distance [n]) of samples x [n, d]."""
    dist = torch.cdist(_finite(x), centres.double())
    d_min, nearest = dist.min(dim=1)
    return nearest, d_min <= INSIDE * std, d_min


def mode_stds(x: Tensor, centres: Tensor, std: float) -> Tensor:
    """Within-mode std per centre [K]: sqrt of the smallest covariance eigenvalue of the samples inside the
    mode (nan for a mode with fewer than 3 samples inside)."""
    nearest, inside, _ = assign(x, centres, std)
    x = _finite(x)
    out = torch.full((len(centres),), float("nan"), dtype=torch.float64)
    for j in range(len(centres)):
        pts = x[inside & (nearest == j)]
        if len(pts) >= 3:
            cov = torch.atleast_2d(torch.cov(pts.T))
            out[j] = torch.linalg.eigvalsh(cov)[0].clamp_min(0).sqrt()
    return out


def class_mode_weights(x: Tensor, labels: Tensor, spec: DataSpec) -> Tensor:
    """[C, M + 1]: per class, the fraction of its samples in each video mode (last bin: inside no mode)."""
    nearest, inside, _ = assign(x, spec.centres, spec.std)
    bins = torch.where(inside, nearest, spec.num_modes)
    out = torch.zeros(spec.num_classes, spec.num_modes + 1, dtype=torch.float64)
    for c in range(spec.num_classes):
        sel = bins[labels == c]
        if len(sel):
            out[c] = torch.bincount(sel, minlength=spec.num_modes + 1).double() / len(sel)
    return out


def joint_accuracy(samples: list[Tensor], spec: DataSpec) -> float:
    """Fraction of samples whose nearest audio centre is the partner of their nearest video mode."""
    audio_centres, partner = spec.audio_modes()
    video_mode, _, _ = assign(samples[0], spec.centres, spec.std)
    audio_mode, _, _ = assign(samples[1], audio_centres, spec.audio_std)
    return float((partner[video_mode] == audio_mode).double().mean())


def _diverged(samples: list[Tensor]) -> bool:
    return any(not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 1e3 for x in samples)


def evaluate(
    spec: DataSpec, samples: list[Tensor], labels: Tensor, reference: list[Tensor] | None = None
) -> dict[str, float]:
    """Metrics of samples ([video [n, d]] or [video, audio]) conditioned on labels [n]; with `reference` (samples of
    the same labels, e.g. the guided teacher's ODE) also the distances and the ratios to it. A diverged run
    (non-finite or |x| > 1e3) gets inf distances."""
    samples = [s.detach() for s in samples]
    out: dict[str, float] = {}
    if spec.tokens > 1:  # the content of a lifted spec, and the rms of what is not content (0 for data)
        for name, off in zip(MODALITIES, off_content(spec, samples), strict=False):
            out[f"off_content_{name}"] = float(off.mean())
        samples = readout(spec, samples)
        reference = None if reference is None else readout(spec, reference)
    centres = spec.mode_centres()
    video_mode, _, _ = assign(samples[0], spec.centres, spec.std)
    out["class_acc"] = float((spec.class_weights[labels, video_mode] > 0).double().mean())
    for name, x, c, std in zip(MODALITIES, samples, centres, spec.stds, strict=False):
        _, _, dist = assign(x, c, std)
        out[f"in_3std_{name}"] = float((dist <= 3 * std).double().mean())
        out[f"std_{name}"] = float(torch.nanmean(mode_stds(x, c, std)))
    if spec.joint:
        out["joint_acc"] = joint_accuracy(samples, spec)
    if reference is None:
        return out
    reference = [r.detach() for r in reference]
    weights = class_mode_weights(samples[0], labels, spec)
    ref_weights = class_mode_weights(reference[0], labels, spec)
    out["mode_tv"] = float(0.5 * (weights - ref_weights).abs().sum(1).max())
    for name, x, r, c, std in zip(MODALITIES, samples, reference, centres, spec.stds, strict=False):
        ref_nearest, ref_inside, _ = assign(r, c, std)
        share = torch.bincount(ref_nearest[ref_inside], minlength=len(c)).double() / len(r)
        ratio = mode_stds(x, c, std) / mode_stds(r, c, std)
        ratio = torch.nan_to_num(ratio, nan=0.0)[share >= MIN_SHARE]  # a lost mode counts as ratio 0
        out[f"std_ratio_{name}"] = float(ratio.min())
    if spec.joint:
        out["joint_ratio"] = out["joint_acc"] / max(joint_accuracy(reference, spec), 1e-9)
    parts = list(zip(MODALITIES, samples, reference, spec.stds, strict=False))
    if spec.joint:
        parts.append(("joint", torch.cat(samples, 1), torch.cat(reference, 1), min(spec.stds)))
    diverged = _diverged(samples)
    for name, x, r, std in parts:
        if diverged:
            out[f"mmd2_{name}"] = out[f"sw1_{name}"] = float("inf")
            continue
        out[f"mmd2_{name}"] = mmd2(x, r, tuple(f * std for f in BANDWIDTH_FACTORS))
        out[f"sw1_{name}"] = sliced_w1(x, r)
    return out


@dataclass
class Bound:
    """One acceptance bound: `value` must be <= (or >=) `limit`."""

    name: str
    value: float
    limit: float
    upper: bool  # True: value <= limit

    @property
    def ok(self) -> bool:
        return self.value <= self.limit if self.upper else self.value >= self.limit

    def __str__(self) -> str:
        return f"{self.name} {self.value:.4g} {'<=' if self.upper else '>='} {self.limit:.4g}: {'ok' if self.ok else 'FAIL'}"


def bounds(stats: dict[str, float], baseline: dict[str, float]) -> list[Bound]:
    """The bounds of a student's metrics `stats` (from `evaluate` with the reference): every MMD^2 and SW1 no larger
    than the teacher's own N-step sampler's (`baseline`, same N, same reference), std_ratio >= 0.7, mode_tv <= 0.1
    and joint_ratio >= 0.9."""
    out = [Bound(key, stats[key], baseline[key], True) for key in stats if key.startswith(("mmd2_", "sw1_"))]
    out += [Bound(k, stats[k], STD_RATIO_MIN, False) for k in stats if k.startswith("std_ratio_")]
    out.append(Bound("mode_tv", stats["mode_tv"], MODE_TV_MAX, True))
    if "joint_ratio" in stats:
        out.append(Bound("joint_ratio", stats["joint_ratio"], JOINT_RATIO_MIN, False))
    return out


def failed(stats: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """Names of the bounds that `stats` fails (empty: the student meets all of them)."""
    return [b.name for b in bounds(stats, baseline) if not b.ok]
