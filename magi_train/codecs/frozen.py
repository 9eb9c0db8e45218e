"""What every codec wrapper (video / audio VAE, TurboVAE, text encoder) shares: one frozen torch module as
`self.model`, its device and dtype, and moving it."""

from __future__ import annotations

from typing import Self

import torch


class FrozenModule:
    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move the wrapped weights (buffers a wrapper keeps apart, e.g. the video VAE's normalisation, stay)."""
        self.model.to(device=device, dtype=dtype)
        return self
