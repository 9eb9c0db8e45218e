"""Sample-quality metrics of the DMD-2 toy (arXiv 2405.14867; spec/dmd2.md §9): mode coverage, spread,
class accuracy, joint consistency, RBF MMD^2 and sliced Wasserstein-1 against reference samples.

Definitions (the same for the 2-D ring and the 1-D part; "mode" = mixture component, std 0.1):
- a sample is *assigned* to its nearest mode centre; it is *in 3 std* if that distance is <= 3 * 0.1;
- a mode is *covered* if more than 10% of its uniform share (1/8 of the samples on the ring, 1/4 on
  the 1-D part) lies in 3 std of it (spec/dmd2.md §9);
- *std* = per-axis standard deviation of all samples assigned to a mode, averaged over axes and covered
  modes; *std_max* the largest of them (0.1 for perfect samples; samples between modes inflate both);
- ring only: *radial_bias* = mean radius - 2 of the samples in 3 std, *radial_std* / *tangential_std* =
  std along the radius / along the circle per mode (mode-seeking DMD shrinks the tangential one);
- *class accuracy* = fraction of samples whose nearest mode belongs to the conditioning class;
- *joint accuracy* (two-modality toy) = fraction whose 1-D nearest centre is the one tied to the nearest
  2-D mode, i.e. the two parts were generated as one sample;
- *MMD^2*: unbiased estimate with a sum of RBF kernels, bandwidths 0.05, 0.2, 0.5, 1, 2;
- *SW1*: mean over 256 random unit directions of the 1-D Wasserstein-1 between projected samples
  (exact W1 for 1-D data).
"""

from __future__ import annotations

import torch
from torch import Tensor

from magi_train.tools.toy.gmm import (
    RADIUS,
    STD,
    centres_1d,
    centres_2d,
    class_1d_centres,
    mode_class,
    mode_to_1d,
)

BANDWIDTHS = (0.05, 0.2, 0.5, 1.0, 2.0)


def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = BANDWIDTHS) -> float:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with a sum of RBF kernels exp(-d^2 / 2h^2)."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
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


def _mode_stats(x: Tensor, centres: Tensor, min_share: float) -> tuple[dict[str, float], Tensor]:
    """Coverage / spread statistics of samples x [n, d] around centres [k, d]; returns (stats, nearest)."""
    x = x.double()
    dist = torch.cdist(x, centres.double())
    d_min, nearest = dist.min(dim=1)
    inside = d_min <= 3 * STD
    shares = torch.stack([(inside & (nearest == j)).double().mean() for j in range(len(centres))])
    covered = shares >= min_share / len(centres)
    stds = []  # [d] per covered mode
    for j in torch.nonzero(covered).flatten().tolist():
        pts = x[nearest == j]
        if len(pts) > 1:
            stds.append(pts.std(dim=0))
    stats = {
        "modes": int(covered.sum()),
        "in_3std": float(inside.double().mean()),
        "std": float(torch.stack(stds).mean()) if stds else float("nan"),
        "std_max": float(torch.stack(stds).max()) if stds else float("nan"),
        "min_share": float(shares.min()),
    }
    if x.shape[1] == 2:  # ring: spread along the radius and along the circle, bias of the radius
        radius = x.norm(dim=1)
        tangent = torch.stack([-centres[nearest, 1], centres[nearest, 0]], dim=1).double() / RADIUS
        stats["radial_bias"] = float((radius - RADIUS)[inside].mean()) if inside.any() else float("nan")
        stats["radial_std"] = _mean_std_per_mode(radius, nearest, covered)
        stats["tangential_std"] = _mean_std_per_mode((x * tangent).sum(dim=1), nearest, covered)
    return stats, nearest


def _mean_std_per_mode(values: Tensor, nearest: Tensor, covered: Tensor) -> float:
    """Std of a scalar per sample within each covered mode, averaged over modes."""
    stds = [
        values[nearest == j].std()
        for j in torch.nonzero(covered).flatten().tolist()
        if (nearest == j).sum() > 1
    ]
    return float(torch.stack(stds).mean()) if stds else float("nan")


def evaluate(
    samples: list[Tensor], labels: Tensor, reference: list[Tensor] | None = None, min_share: float = 0.1
) -> dict[str, dict[str, float]]:
    """Metrics per part ("2d", and "1d" for the two-modality toy) of samples conditioned on `labels`.

    Non-finite samples (a diverged run) count as outside every mode; MMD/SW1 are then reported as inf.
    """
    x2 = torch.nan_to_num(samples[0].detach().double(), nan=1e6, posinf=1e6, neginf=-1e6)
    out: dict[str, dict[str, float]] = {}
    stats, mode2 = _mode_stats(x2, centres_2d(), min_share)
    stats["class_acc"] = float((mode_class(mode2) == labels).double().mean())
    out["2d"] = stats
    if len(samples) > 1:
        x1 = torch.nan_to_num(samples[1].detach().double(), nan=1e6, posinf=1e6, neginf=-1e6)
        stats1, mode1 = _mode_stats(x1, centres_1d(), min_share)
        stats1["class_acc"] = float(
            (class_1d_centres(labels) == mode1.unsqueeze(1)).any(dim=1).double().mean()
        )
        stats1["joint_acc"] = float((mode_to_1d(mode2) == mode1).double().mean())
        out["1d"] = stats1
    if reference is not None:
        for part, x, ref in zip(out, samples, reference, strict=False):
            if torch.isfinite(x).all() and x.abs().max() < 1e3:
                out[part]["mmd2"] = mmd2(x, ref)
                out[part]["sw1"] = sliced_w1(x, ref)
            else:
                out[part]["mmd2"] = out[part]["sw1"] = float("inf")
    return out


def passes(
    stats: dict[str, float], num_modes: int, in_3std: float = 0.95, std: float = 0.15, class_acc: float = 0.99
) -> bool:
    """The acceptance bounds of the toy test (spec/dmd2.md §9) for one part."""
    return (
        stats["modes"] == num_modes
        and stats["in_3std"] >= in_3std
        and stats["std"] <= std
        and stats["class_acc"] >= class_acc
    )
