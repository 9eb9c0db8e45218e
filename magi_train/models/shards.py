"""The rows of a parameter that this rank holds: plain tensors hold everything, FSDP2 DTensors a shard.

Loaders read only those rows from a checkpoint (safetensors slices, memory-mapped tensors), so that no rank ever
holds a whole 15B role while loading; `fill` copies them into the local shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_slices(t: Tensor) -> tuple[slice, ...] | None:
    """The index of this rank's part of `t` in the full tensor (None: `t` is whole)."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def local(t: Tensor) -> Tensor:
    """The tensor this rank stores for `t` (its shard for a DTensor)."""
    return t.to_local() if is_sharded(t) else t


@torch.no_grad()
def fill(target: Tensor, source: Any) -> None:
    """Copy this rank's part of the full tensor `source` (a tensor, or a lazy safetensors slice) into `target`."""
    index = local_slices(target)
    part = source[index] if index is not None else source[...] if not isinstance(source, Tensor) else source
    local(target).copy_(part)


def full_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor reports its global shape


__all__ = ["fill", "full_shape", "is_sharded", "local", "local_slices"]
