"""Toy data for checking DMD-2 (arXiv 2405.14867) on CPU: a class-conditional ring of 8 Gaussians in 2-D and
a jointly generated 1-D mixture, the toy stand-in for video + audio (spec/dmd2.md §9)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_MODES = 8
NUM_CLASSES = 4  # class c owns the opposite modes c and c + 4
NULL_CLASS = NUM_CLASSES  # label of the unconditional branch (label dropout / CFG)
RADIUS = 2.0
STD = 0.1
CENTRES_1D = (-1.5, -0.5, 0.5, 1.5)


def centres_2d() -> Tensor:
    """The 8 mode centres [8, 2] on a circle of radius 2, mode j at angle 2 pi j / 8."""
    angle = 2 * math.pi * torch.arange(NUM_MODES) / NUM_MODES
    return RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


def centres_1d() -> Tensor:
    """The 4 centres [4, 1] of the 1-D part."""
    return torch.tensor(CENTRES_1D).unsqueeze(1)


def mode_class(mode: Tensor) -> Tensor:
    """Class owning each 2-D mode (j mod 4)."""
    return mode % NUM_CLASSES


def mode_to_1d(mode: Tensor) -> Tensor:
    """Index of the 1-D centre tied to each 2-D mode: 2 (j mod 2) + j // 4.

    The two (opposite) modes of a class get two different, adjacent 1-D centres, so the 1-D value can only
    be right if it is generated jointly with the 2-D point; classes 0, 2 own centres -1.5, -0.5 and classes
    1, 3 own 0.5, 1.5. Adjacent on purpose: a sample that hedges between its class's two modes lands between
    its own centres (caught by "in 3 std"), not on another class's centre.
    """
    return 2 * (mode % 2) + mode // NUM_CLASSES


def class_1d_centres(label: Tensor) -> Tensor:
    """[N, 2] indices of the 1-D centres a class can produce (those of its modes c and c + 4)."""
    return torch.stack([mode_to_1d(label), mode_to_1d(label + NUM_CLASSES)], dim=1)


def balanced_labels(n: int) -> Tensor:
    """Labels 0, 1, 2, 3, 0, 1, ... (equal class counts for evaluation)."""
    return torch.arange(n) % NUM_CLASSES


def sample_data(
    labels: Tensor, joint: bool = False, generator: torch.Generator | None = None
) -> tuple[list[Tensor], Tensor]:
    """Data for the given class labels [N]: ([x2 [N, 2]] or [x2, x1 [N, 1]], mode [N]).

    Each sample picks one of its class's two modes uniformly; the 1-D value sits at the centre tied to
    that mode, both with std 0.1.
    """
    n = labels.shape[0]
    mode = labels + NUM_CLASSES * torch.randint(2, (n,), generator=generator)
    x2 = centres_2d()[mode] + STD * torch.randn(n, 2, generator=generator)
    if not joint:
        return [x2], mode
    x1 = centres_1d()[mode_to_1d(mode)] + STD * torch.randn(n, 1, generator=generator)
    return [x2, x1], mode
