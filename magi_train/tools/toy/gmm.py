"""Toy data for checking DMD-2 (arXiv 2405.14867) on CPU: class-conditional Gaussian mixtures given by a data
spec - "video" mode centres in any dimension, class -> mode weights (unequal, modes shared between classes) and
an optional "audio" partner whose centre is a function of the video mode (spec/dmd2.md §9)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    """A class-conditional mixture: video x_v ~ N(centres[j], std^2 I) with mode j ~ class_weights[c], and an
    optional audio partner x_a ~ N(audio_centres[j], audio_std^2 I) generated jointly with the video mode.

    `audio_centres[j]` may repeat across modes (several video modes share one audio centre); the audio
    "modes" of the metrics are the distinct rows. The null class (label `num_classes`) is the CFG branch.

    `tokens` > 1 carries every coordinate by that many identical coordinates of the model's space (`dims`), as
    the many latent tokens of a clip carry its content: the diffusion noise is independent per coordinate, so the
    content's signal-to-noise ratio is `tokens` times the base spec's and the matched timestep shift sqrt(tokens)
    times larger (SD3, arXiv 2403.03206 §5.3.2). Metrics read the base coordinates back (`readout`).
    """

    name: str
    centres: Tensor  # [M, d] video mode centres
    class_weights: Tensor  # [C, M], each row sums to 1
    std: float = 0.1
    audio_centres: Tensor | None = None  # [M, d_a]: centre of the audio partner of each video mode
    audio_std: float = 0.1
    tokens: int = 1

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"spec {self.name}: tokens={self.tokens} must be >= 1")
        m = self.centres.shape[0]
        if self.centres.dim() != 2 or self.class_weights.dim() != 2 or self.class_weights.shape[1] != m:
            raise ValueError(
                f"spec {self.name}: centres [M, d] and class_weights [C, M] disagree: "
                f"{tuple(self.centres.shape)} vs {tuple(self.class_weights.shape)}"
            )
        if (self.class_weights < 0).any() or not torch.allclose(
            self.class_weights.sum(1), torch.ones(len(self.class_weights))
        ):
            raise ValueError(f"spec {self.name}: every class's mode weights must be >= 0 and sum to 1")
        if self.audio_centres is not None and self.audio_centres.shape[0] != m:
            raise ValueError(f"spec {self.name}: audio_centres needs one row per video mode ({m})")

    @property
    def num_modes(self) -> int:
        return self.centres.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_weights.shape[0]

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def joint(self) -> bool:
        return self.audio_centres is not None

    @property
    def base_dims(self) -> tuple[int, ...]:
        """Width of each modality's content: (d,) or (d, d_a)."""
        video = (self.centres.shape[1],)
        return video + ((self.audio_centres.shape[1],) if self.audio_centres is not None else ())

    @property
    def dims(self) -> tuple[int, ...]:
        """Width of each modality in the model's space: base_dims x tokens."""
        return tuple(d * self.tokens for d in self.base_dims)

    @property
    def stds(self) -> tuple[float, ...]:
        return (self.std, self.audio_std)[: len(self.dims)]

    def audio_modes(self) -> tuple[Tensor, Tensor]:
        """(distinct audio centres [K, d_a], index of the audio centre of each video mode [M])."""
        assert self.audio_centres is not None
        unique, index = torch.unique(self.audio_centres, dim=0, return_inverse=True)
        return unique, index

    def mode_centres(self) -> list[Tensor]:
        """The centres the metrics assign samples to, per modality."""
        return [self.centres] + ([self.audio_modes()[0]] if self.joint else [])


def ring_spec() -> DataSpec:
    """The first toy: 8 modes on a circle of radius 2 (std 0.1), class c owns the opposite modes c and c + 4
    equally; audio partner at -1.5, -0.5, 0.5, 1.5 with mode j -> centre 2 (j mod 2) + j // 4, so a class's two
    modes get two adjacent audio centres (a sample hedging between its modes lands between them)."""
    angle = 2 * math.pi * torch.arange(8) / 8
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    weights = torch.zeros(4, 8)
    for c in range(4):
        weights[c, c] = weights[c, c + 4] = 0.5
    j = torch.arange(8)
    audio = torch.tensor([-1.5, -0.5, 0.5, 1.5])[2 * (j % 2) + j // 4].unsqueeze(1)
    return DataSpec("ring", centres, weights, 0.1, audio, 0.1)


def shared_spec() -> DataSpec:
    """Unequal and shared modes: 5 modes on a pentagon of radius 1.5 (std 0.12), 3 classes,
    class 0 = {0: 0.7, 1: 0.3}, class 1 = {1: 0.5, 2: 0.25, 3: 0.25}, class 2 = {3: 0.2, 4: 0.8} (modes 1
    and 3 are shared), and a 1-D audio partner at -1.6, -0.8, 0, 0.8, 1.6 (std 0.1) set by the video mode."""
    angle = 2 * math.pi * torch.arange(5) / 5 + math.pi / 2
    centres = 1.5 * torch.stack([angle.cos(), angle.sin()], dim=1)
    weights = torch.tensor(
        [
            [0.7, 0.3, 0.0, 0.0, 0.0],
            [0.0, 0.5, 0.25, 0.25, 0.0],
            [0.0, 0.0, 0.0, 0.2, 0.8],
        ]
    )
    audio = torch.tensor([-1.6, -0.8, 0.0, 0.8, 1.6]).unsqueeze(1)
    return DataSpec("shared", centres, weights, 0.12, audio, 0.1)


def lifted(spec: DataSpec, tokens: int) -> DataSpec:
    """`spec` with every coordinate carried by `tokens` coordinates (DataSpec.tokens)."""
    return replace(spec, name=f"{spec.name}-t{tokens}", tokens=tokens)


def shared_t25_spec() -> DataSpec:
    """The shared spec on 25 tokens per coordinate (video 50-D, audio 25-D): the spec for which the production
    shift 5 = sqrt(25) gives the content the noise levels that shift 1 gives the 2-D spec."""
    return lifted(shared_spec(), 25)


def ring_t25_spec() -> DataSpec:
    return lifted(ring_spec(), 25)


SPECS = {"ring": ring_spec, "shared": shared_spec, "shared-t25": shared_t25_spec, "ring-t25": ring_t25_spec}


def get_spec(name: str) -> DataSpec:
    if name not in SPECS:
        raise ValueError(f"unknown toy data spec {name!r}: use one of {sorted(SPECS)}")
    return SPECS[name]()


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... (equal class counts for evaluation)."""
    return torch.arange(n) % num_classes


def sample_data(
    spec: DataSpec, labels: Tensor, generator: torch.Generator | None = None
) -> tuple[list[Tensor], Tensor]:
    """Data for class labels [N]: ([video [N, d]] or [video, audio [N, d_a]], video mode [N])."""
    n = labels.shape[0]
    mode = torch.multinomial(spec.class_weights[labels], 1, generator=generator).squeeze(1)
    video = spec.centres[mode] + spec.std * torch.randn(n, spec.centres.shape[1], generator=generator)
    xs = [video]
    if spec.joint:
        audio_c = spec.audio_centres[mode]
        xs.append(audio_c + spec.audio_std * torch.randn(audio_c.shape, generator=generator))
    return [x.repeat_interleave(spec.tokens, dim=1) for x in xs], mode


def readout(spec: DataSpec, xs: list[Tensor]) -> list[Tensor]:
    """Base coordinates of samples in the model's space: the mean over each coordinate's tokens."""
    return [x.unflatten(1, (-1, spec.tokens)).mean(2) for x in xs]


def off_content(spec: DataSpec, xs: list[Tensor]) -> list[Tensor]:
    """Per sample, the rms of what is not content (the spread of a coordinate's tokens about their mean): 0 for
    data; what a model leaves of the noise in the directions the data does not occupy."""
    return [
        (x.unflatten(1, (-1, spec.tokens)) - r.unsqueeze(2)).square().mean((1, 2)).sqrt()
        for x, r in zip(xs, readout(spec, xs), strict=True)
    ]
