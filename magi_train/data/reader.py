"""Read clip shards with webdataset: validate, skip-and-count bad samples, pack clips into token-budget batches.

Resuming: the dataset can fast-forward a number of consumed batches (state_dict / load_state_dict). The
stream is deterministic given the seed (shard order per epoch, shuffle buffer), so a resumed run sees the
same next batches with num_workers=0. With W DataLoader workers each worker skips its own share; the
DataLoader restarts its round-robin at worker 0, so the order of the first W batches after a resume can
differ. Fast-forwarding re-reads the skipped samples (webdataset has no random access).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magi_train.data.schema import Clip, SampleError, validate_sample

log = logging.getLogger(__name__)
_FULL_WARNINGS = 10  # bad samples reported one by one; after that, a summary every _SUMMARY_EVERY
_SUMMARY_EVERY = 1000


@dataclass
class ClipBatch:
    """A packed batch: variable-shaped clips as lists (the DiT packs them into one varlen sequence)."""

    keys: list[str]
    video: list[Tensor]
    audio: list[Tensor]
    text: list[Tensor]
    image: list[Tensor | None] = field(default_factory=list)
    lowres: list[Tensor | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return sum(
            v.shape[1] * (v.shape[2] // 2) * (v.shape[3] // 2) + a.shape[0] + t.shape[0]
            for v, a, t in zip(self.video, self.audio, self.text, strict=True)
        )

    @classmethod
    def from_clips(cls, clips: list[Clip]) -> ClipBatch:
        return cls(
            keys=[c.key for c in clips], video=[c.video for c in clips], audio=[c.audio for c in clips],
            text=[c.text for c in clips], image=[c.image for c in clips], lowres=[c.lowres for c in clips],
            captions=[c.caption for c in clips], meta=[c.meta for c in clips],
        )


def pack_by_tokens(clips: Iterable[Clip], max_tokens: int, max_clips: int | None = None) -> Iterator[ClipBatch]:
    """Greedy packing of consecutive clips while the batch stays within max_tokens (and max_clips)."""
    pending: list[Clip] = []
    tokens, warned = 0, False
    for clip in clips:
        n = clip.num_tokens
        if pending and (tokens + n > max_tokens or (max_clips and len(pending) >= max_clips)):
            yield ClipBatch.from_clips(pending)
            pending, tokens = [], 0
        if n > max_tokens and not warned:
            log.warning("clip %s has %d tokens > max_tokens=%d: it forms a batch of its own", clip.key, n, max_tokens)
            warned = True
        pending.append(clip)
        tokens += n
    if pending:
        yield ClipBatch.from_clips(pending)


def expand_urls(urls: str | list[str]) -> list[str]:
    if isinstance(urls, str):
        return list(wds.shardlists.expand_urls(urls))
    return [str(u) for u in urls]


class ShardDataset(IterableDataset):
    """Packed ClipBatches from webdataset shards, split by node and by DataLoader worker."""

    def __init__(
        self,
        urls: str | list[str],
        text_dim: int,
        max_tokens: int,
        max_clips: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        infinite: bool = False,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.text_dim, self.max_tokens, self.max_clips = text_dim, max_tokens, max_clips
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self.stats: Counter = Counter()
        self.skipped_by_reason: Counter = Counter()
        self._consumed = 0  # batches handed out (main process; see the module docstring for workers)
        self._resume_from = 0

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_from = self._consumed = int(state.get("consumed", 0))

    # -- iteration -----------------------------------------------------------------------------------------

    def _shards(self, epoch: int) -> list[str]:
        urls = list(self.urls)
        if self.infinite:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
        picked = list(wds.split_by_worker(wds.split_by_node(urls)))
        if not picked:
            log.warning("this node/worker got none of the %d shards: use more shards than nodes x workers",
                        len(urls))
        return picked

    def _tar_error(self, exn: Exception) -> bool:
        self.stats["tar_errors"] += 1
        self._last_tar_error = f"{type(exn).__name__}: {exn}"
        log.warning("unreadable shard data skipped: %s", self._last_tar_error)
        return True  # continue

    def _clips_of_shard(self, url: str) -> Iterator[Clip]:
        seen = valid = 0
        reasons: Counter = Counter()
        self._last_tar_error = None
        errors_before = self.stats["tar_errors"]
        for raw in wds.tarfile_to_samples(handler=self._tar_error)(iter([{"url": url}])):
            seen += 1
            self.stats["seen"] += 1
            try:
                clip = validate_sample(raw, self.text_dim)
            except SampleError as e:
                reasons[f"{e.field}: {e.reason.split(' (')[0]}"] += 1
                self._skip(e)
                continue
            valid += 1
            self.stats["valid"] += 1
            yield clip
        if valid == 0 and (seen or self.stats["tar_errors"] > errors_before):
            detail = ", ".join(f"{r} (x{n})" for r, n in reasons.most_common(3)) or self._last_tar_error
            raise ValueError(f"shard {url} has no valid sample ({seen} read): {detail}. "
                             "Check the shard format (DESIGN.md) or remove the shard from the list.")

    def _skip(self, err: SampleError) -> None:
        self.stats["skipped"] += 1
        self.skipped_by_reason[err.field] += 1
        n = self.stats["skipped"]
        if n <= _FULL_WARNINGS:
            log.warning("skipped bad sample (%d so far): %s", n, err)
        elif n % _SUMMARY_EVERY == 0:
            log.warning("skipped %d bad samples so far, by field: %s", n, dict(self.skipped_by_reason))

    def _shuffled(self, clips: Iterator[Clip], rng: random.Random) -> Iterator[Clip]:
        if self.shuffle_buffer <= 1:
            yield from clips
            return
        buf: list[Clip] = []
        for clip in clips:
            buf.append(clip)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _epoch_clips(self, epoch: int) -> Iterator[Clip]:
        for url in self._shards(epoch):
            yield from self._clips_of_shard(url)

    def __iter__(self) -> Iterator[ClipBatch]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        skip = math.ceil((self._resume_from - wid) / nworkers) if self._resume_from > wid else 0
        epoch = 0
        while True:
            rng = random.Random(hash((self.seed, epoch, rank, wid)))
            clips = self._shuffled(self._epoch_clips(epoch), rng)
            produced = 0
            for batch in pack_by_tokens(clips, self.max_tokens, self.max_clips):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                self._consumed += 1
                yield batch
            if self.stats["valid"] == 0:
                raise ValueError(f"no valid clip in {len(self.urls)} shard(s) starting {self.urls[0]}")
            if not self.infinite:
                return
            if produced == 0:
                return  # this worker owns no shard: end instead of spinning
            epoch += 1


def _identity(x):
    return x


def make_loader(dataset: ShardDataset, num_workers: int = 0) -> DataLoader:
    """DataLoader over an already-batching dataset (batch_size=None)."""
    return DataLoader(
        dataset, batch_size=None, collate_fn=_identity, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )
