"""Evaluation passes with the same number of batches on every rank (needed by sharded-parameter strategies).

The shard reader splits a finite validation set by rank, so ranks may get different numbers of packed
batches. Under DDP that only skews the average, but under ZeRO-3 and FSDP every forward pass gathers
parameters collectively: a rank with one batch more waits forever (DeepSpeed reports "a disagreement on
list length between rank0 and rank1"). Every rank therefore keeps the first N batches of its pass, N the
smallest count over ranks (an all-reduce of one integer before the pass).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _min_over_ranks(n: int) -> int:
    """The smallest n over all ranks (NCCL reduces CUDA tensors only)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class EvenAcrossRanks(IterableDataset):
    """One pass over `dataset` (a finite iterable of batches) truncated to the same length on every rank.

    limit: at most this many batches per rank (e.g. the trainer's limit_val_batches). With a limit, the
    first `limit` batches are held in memory while the ranks agree on the count; without one, the pass is
    counted first and read a second time.
    """

    def __init__(self, dataset: Iterable[Any], limit: int | None = None):
        super().__init__()
        if limit is not None and limit < 0:
            raise ValueError(f"EvenAcrossRanks: limit must be >= 0 or None, got {limit}")
        self.dataset, self.limit = dataset, limit

    def __iter__(self) -> Iterator[Any]:
        if _world() == 1:
            yield from itertools.islice(self.dataset, self.limit)
            return
        if self.limit is not None:
            held = list(itertools.islice(self.dataset, self.limit))
            yield from held[: _min_over_ranks(len(held))]
            return
        n = _min_over_ranks(sum(1 for _ in self.dataset))
        yield from itertools.islice(self.dataset, n)
