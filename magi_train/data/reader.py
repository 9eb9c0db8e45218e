"""Read clip shards with webdataset: validate, skip-and-count bad samples, pack clips into token-budget batches.

Splitting. Shards are split by node (`webdataset.split_by_node`) and then by DataLoader worker
(`webdataset.split_by_worker`). Where there are fewer shards than nodes (or than workers on a node), every
reader of that level reads the same shards and keeps every n-th valid sample instead, with a warning: each
clip is still seen exactly once per epoch, at the price of reading more. Training (infinite=True) reshuffles
the shard order each epoch with `seed + epoch`, identically on every rank, so the split stays a partition.

Resuming. `state_dict()` holds the number of batches handed out (`consumed`) and, when the dataset was
iterated in this process (num_workers=0), the position `(epoch, batch_in_epoch)`. The stream is fully
determined by the seed (shard order per epoch, shuffle buffer per epoch and reader, packing restarted per
epoch), so with num_workers=0 a resumed dataset jumps to its epoch and re-reads only that epoch up to the
position: the next batch is exactly the one an uninterrupted run would have produced. Limits:

- With W DataLoader workers each worker produces its own stream and the DataLoader takes batches round-robin
  (worker 0, 1, ...). Only `consumed` is known in the main process (`make_loader` counts batches reaching the
  consumer); on resume worker w skips ceil((consumed - w) / W) of its own batches. No batch is repeated or
  lost, but the DataLoader restarts its round-robin at worker 0, so the order of the next W batches can
  differ from an uninterrupted run. Resume with the same number of workers and nodes; other numbers give
  an approximate position. Workers skip by re-reading (webdataset has no random access).
- Non-infinite datasets (validation) resume within the current pass only.
- `stats` counts what this process read: with workers, each worker counts and logs its own samples.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magi_train.data.schema import Clip, SampleError, count_tokens, validate_sample

log = logging.getLogger(__name__)

LOG_FIRST = 5  # problems (bad samples, unreadable tar data) reported one by one ...
LOG_EVERY = 500  # ... then one summary line every LOG_EVERY further problems


@dataclass
class ClipBatch:
    """A packed batch: variable-shaped clips as lists; the DiT packs them into one varlen sequence."""

    keys: list[str]
    video: list[Tensor]  # each [48, T, H, W]
    audio: list[Tensor]  # each [A, 64]
    text: list[Tensor]  # each [L, D]
    image: list[Tensor | None] = field(default_factory=list)  # [48, 1, H, W] or None
    captions: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    lowres: list[Tensor | None] = field(default_factory=list)  # [48, T, h, w] or None (SR)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        """Total DiT sequence length of the batch (video patches + audio + text over all clips)."""
        return sum(
            count_tokens(tuple(v.shape), a.shape[0], t.shape[0])
            for v, a, t in zip(self.video, self.audio, self.text, strict=True)
        )

    @classmethod
    def from_clips(cls, clips: list[Clip]) -> ClipBatch:
        return cls(
            keys=[c.key for c in clips],
            video=[c.video for c in clips],
            audio=[c.audio for c in clips],
            text=[c.text for c in clips],
            image=[c.image for c in clips],
            captions=[c.caption for c in clips],
            meta=[c.meta for c in clips],
            lowres=[c.lowres for c in clips],
        )

    def pin_memory(self) -> ClipBatch:
        """Called by the DataLoader (pin_memory=True): page-locked copies for asynchronous host-to-GPU copies."""

        def pin(ts: list[Tensor | None]) -> list[Tensor | None]:
            return [None if t is None else t.pin_memory() for t in ts]

        return dataclasses.replace(
            self,
            video=pin(self.video),
            audio=pin(self.audio),
            text=pin(self.text),
            image=pin(self.image),
            lowres=pin(self.lowres),
        )


def pack_by_tokens(
    clips: Iterable[Clip], max_tokens: int, max_clips: int | None = None
) -> Iterator[ClipBatch]:
    """Greedily pack consecutive clips into batches of at most max_tokens tokens (and max_clips clips).

    A clip longer than max_tokens is never dropped: it forms a batch of its own (with one warning per call).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips={max_clips}: must be >= 1 or None")
    pending: list[Clip] = []
    tokens, oversized = 0, 0
    for clip in clips:
        n = clip.num_tokens
        if pending and (tokens + n > max_tokens or (max_clips is not None and len(pending) >= max_clips)):
            yield ClipBatch.from_clips(pending)
            pending, tokens = [], 0
        oversized += _warn_oversized(clip, n, max_tokens, oversized)
        pending.append(clip)
        tokens += n
    if pending:
        yield ClipBatch.from_clips(pending)


def _warn_oversized(clip: Clip, n: int, max_tokens: int, seen: int) -> int:
    """1 if the clip alone exceeds the token budget (warned about the first time only), else 0."""
    if n <= max_tokens:
        return 0
    if seen == 0:
        log.warning(
            "clip %s has %d tokens > max_tokens=%d: it becomes a batch of its own (raise max_tokens or re-cut "
            "long clips; further ones are not reported)", clip.key, n, max_tokens,
        )  # fmt: skip
    return 1


def bucket_key(clip: Clip) -> tuple[int, int, int]:
    """Aspect-ratio / duration bucket of a clip: its video latent shape (T, H, W)."""
    _, t, h, w = clip.video.shape
    return int(t), int(h), int(w)


def pack_bucketed(
    clips: Iterable[Clip], max_tokens: int, max_clips: int | None = None, buffer: int = 256
) -> Iterator[ClipBatch]:
    """Pack clips to a token budget like pack_by_tokens, but each batch holds clips of one bucket only.

    Clips wait in per-bucket queues (same latent T, H, W: same aspect ratio, resolution and duration, so
    their token counts differ only by text length). A queue becomes a batch when the next clip would break
    max_tokens or max_clips; when `buffer` clips are waiting in all, the fullest queue is emitted early,
    which bounds memory. At the end every queue is emitted: no clip is lost. Deterministic for a given
    clip stream, so resuming by re-reading the stream gives the same batches. `buffer` should hold a few
    batches per bucket (buckets x clips per batch x 2, say).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips={max_clips}: must be >= 1 or None")
    if buffer < 1:
        raise ValueError(f"bucket buffer={buffer}: must be >= 1 clip")
    queues: dict[tuple[int, int, int], list[Clip]] = {}
    tokens: dict[tuple[int, int, int], int] = {}
    held, oversized = 0, 0
    for clip in clips:
        key, n = bucket_key(clip), clip.num_tokens
        queue = queues.setdefault(key, [])
        if queue and (tokens[key] + n > max_tokens or (max_clips is not None and len(queue) >= max_clips)):
            yield ClipBatch.from_clips(queue)
            held -= len(queue)
            queue.clear()
            tokens[key] = 0
        oversized += _warn_oversized(clip, n, max_tokens, oversized)
        queue.append(clip)
        tokens[key] = tokens.get(key, 0) + n
        held += 1
        if held >= buffer:  # the fullest queue is nearest to a full batch: emit it
            full = max((k for k in queues if queues[k]), key=lambda k: tokens[k])
            yield ClipBatch.from_clips(queues[full])
            held -= len(queues[full])
            queues[full].clear()
            tokens[full] = 0
    for queue in queues.values():
        if queue:
            yield ClipBatch.from_clips(queue)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and url != "-"


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard list from a directory (its *.tar), a brace pattern, `::`-joined urls, or a list of them.

    Local paths must exist (a clear error now rather than tar warnings later); urls webdataset opens
    (`pipe:...`, `s3://...` through a pipe, http) are passed through unchecked.
    """
    if isinstance(urls, str | os.PathLike):
        spec = str(urls)
        if Path(spec).is_dir():
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise ValueError(f"shards: directory {spec} holds no .tar shards")
            return found
        out = list(wds.shardlists.expand_urls(spec))
    else:
        out = [str(u) for u in urls]
    if not out:
        raise ValueError(f"shards: {urls!r} names no shard")
    missing = [u for u in out if _is_local(u) and not os.path.exists(u)]
    if missing:
        raise ValueError(
            f"shards: {len(missing)} of {len(out)} local shard(s) do not exist, e.g. {missing[0]} "
            "(give shard files, a directory, a brace pattern like shard-{000000..000009}.tar, "
            "or a url webdataset opens such as pipe:...)"
        )
    return out


def _dist_rank_world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def _top(reasons: Counter, n: int = 3) -> str:
    return ", ".join(f"{r} (x{c})" for r, c in reasons.most_common(n))


class ShardDataset(IterableDataset):
    """ClipBatches packed to a token budget from webdataset shards, split by node and worker (see module doc).

    urls: shard paths, a directory, a brace pattern, or anything webdataset opens (e.g. `pipe:`).
    shuffle_buffer: clips held for shuffling (0 = read order). infinite: repeat epochs forever with a fresh
    shard order per epoch (training); otherwise one pass in the given order (validation).
    bucket_buffer: 0 packs clips in stream order (pack_by_tokens); > 0 packs each batch from one
    aspect-ratio / duration bucket, holding up to that many clips (pack_bucketed).
    Bad samples are skipped, counted (`stats`) and logged; a shard with no valid sample among those read,
    or a reader that finds no valid sample at all, raises ValueError naming the shards and reasons.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        text_dim: int,
        max_tokens: int,
        max_clips: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        infinite: bool = False,
        bucket_buffer: int = 0,
    ):
        super().__init__()
        if text_dim < 1 or max_tokens < 1 or shuffle_buffer < 0 or (max_clips is not None and max_clips < 1):
            raise ValueError(
                f"ShardDataset: need text_dim >= 1, max_tokens >= 1, max_clips >= 1 or None, "
                f"shuffle_buffer >= 0 (got {text_dim}, {max_tokens}, {max_clips}, {shuffle_buffer})"
            )
        if bucket_buffer < 0:
            raise ValueError(f"ShardDataset: bucket_buffer={bucket_buffer}: 0 (no bucketing) or >= 1 clips")
        self.bucket_buffer = bucket_buffer
        self.urls = expand_urls(urls)
        self.text_dim, self.max_tokens, self.max_clips = text_dim, max_tokens, max_clips
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self._counts: Counter = Counter()
        self._reasons: Counter = Counter()
        self._consumed = 0  # batches handed to the consumer of this process (see make_loader for workers)
        self._position: tuple[int, int] | None = None  # (epoch, batches of it consumed), in-process only
        self._resume: dict | None = None
        self._warned_split = False
        # Spawned DataLoader workers lose the process group; the rank seen at construction is the fallback.
        self._launch_rank, self._launch_world = _dist_rank_world()

    # -- counters and state --------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """Samples seen / valid / skipped (and by `field: kind` reason) and tar-level errors, this process."""
        return {
            "seen": self._counts["seen"],
            "valid": self._counts["valid"],
            "skipped": self._counts["skipped"],
            "tar_errors": self._counts["tar_errors"],
            "skipped_by_reason": dict(self._reasons),
        }

    def state_dict(self) -> dict[str, int]:
        state = {"consumed": self._consumed}
        if self._position is not None:
            state["epoch"], state["batch_in_epoch"] = self._position
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; takes effect at the next iteration (see the module doc for workers)."""
        if not isinstance(state, dict) or "consumed" not in state:
            raise ValueError(
                f"ShardDataset.load_state_dict: expected {{'consumed': int, ...}}, got {state!r}"
            )
        self._consumed = int(state["consumed"])
        has_pos = "epoch" in state and "batch_in_epoch" in state
        self._position = (int(state["epoch"]), int(state["batch_in_epoch"])) if has_pos else None
        self._resume = dict(state)

    # -- splitting -----------------------------------------------------------------------------------------

    def _reader(self) -> tuple[int, int, int, int, bool]:
        """(rank, world, worker, num_workers, rank_is_live) of the process iterating."""
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if world == 1 and self._launch_world > 1:
            return self._launch_rank, self._launch_world, worker, workers, False
        return rank, world, worker, workers, True

    def _assign(self, epoch: int, reader: tuple[int, int, int, int, bool]) -> tuple[list[str], int, int]:
        """Shards this reader opens, and (stride, offset): it keeps valid samples i with i % stride == offset."""
        rank, world, worker, workers, live = reader
        urls = list(self.urls)
        if self.infinite:  # same permutation on every rank and worker, so the split below stays a partition
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(urls)
        stride, offset, fallback = 1, 0, []
        if world > 1:
            if len(urls) >= world:  # urls[rank::world] is split_by_node's own rule, for a lost process group
                urls = list(wds.split_by_node(urls)) if live else urls[rank::world]
            else:
                stride, offset = world, rank
                fallback.append(f"{len(urls)} shard(s) for {world} nodes")
        if workers > 1:
            if len(urls) >= workers:
                urls = list(wds.split_by_worker(urls))
            else:
                stride, offset = stride * workers, offset * workers + worker
                fallback.append(f"{len(urls)} shard(s) for {workers} workers on this node")
        if fallback and not self._warned_split:
            self._warned_split = True
            log.warning(
                "%s: too few shards to split by shard, so readers share shards and each keeps every "
                "%d-th sample (each clip is still seen once per epoch, but shards are read %dx). "
                "Write more, smaller shards (at least nodes x workers).",
                "; ".join(fallback),
                stride,
                stride,
            )
        return urls, stride, offset

    # -- reading -------------------------------------------------------------------------------------------

    def _problem(self, counter: str, message: str) -> None:
        """Rate-limited warning: the first LOG_FIRST problems in full, then periodic summaries."""
        self._counts[counter] += 1
        n = self._counts["skipped"] + self._counts["tar_errors"]
        if n <= LOG_FIRST:
            more = f" (further problems are summarised every {LOG_EVERY})" if n == LOG_FIRST else ""
            log.warning("%s%s", message, more)
        elif n % LOG_EVERY == 0:
            log.warning(
                "%d problems so far: %d of %d samples skipped, %d tar errors; top reasons: %s",
                n,
                self._counts["skipped"],
                self._counts["seen"],
                self._counts["tar_errors"],
                _top(self._reasons, 5) or "-",
            )

    def _read_shard(self, url: str, reasons: Counter, tar_errors: list[str]) -> Iterator[Clip]:
        def on_tar_error(exn: Exception) -> bool:
            msg = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            tar_errors.append(msg)
            self._problem("tar_errors", f"unreadable tar data in {url} skipped: {msg}")
            return True  # warn and continue with the next sample / shard

        read = valid = 0
        for raw in wds.tarfile_to_samples(handler=on_tar_error)(iter([{"url": url}])):
            read += 1
            self._counts["seen"] += 1
            try:
                clip = validate_sample(raw, self.text_dim)
            except SampleError as e:
                reasons[e.label] += 1
                self._reasons[e.label] += 1
                self._problem("skipped", f"skipped bad sample in {url}: {e}")
                continue
            valid += 1
            self._counts["valid"] += 1
            yield clip
        if read and not valid:  # a shard of garbage is a data bug, not noise: stop and say which one
            raise ValueError(
                f"shard {url}: none of its {read} samples is valid; most common problems: "
                f"{_top(reasons)}. Fix or regenerate the shard, or remove it from the shard list."
            )

    def _epoch_clips(self, epoch: int, reader: tuple[int, int, int, int, bool]) -> Iterator[Clip]:
        shards, stride, offset = self._assign(epoch, reader)
        index = 0
        report: dict[str, str] = {}
        for url in shards:
            reasons: Counter = Counter()
            tar_errors: list[str] = []
            for clip in self._read_shard(url, reasons, tar_errors):
                keep = index % stride == offset
                index += 1
                if keep:
                    yield clip
            report[url] = _top(reasons) or (tar_errors[-1] if tar_errors else "no samples")
        if shards and index == 0:
            listed = "; ".join(f"{u}: {r}" for u, r in list(report.items())[:5])
            more = f" and {len(report) - 5} more" if len(report) > 5 else ""
            raise ValueError(
                f"no valid sample in any of the {len(shards)} shard(s) of this reader: {listed}{more}"
            )

    def _shuffled(self, clips: Iterator[Clip], rng: random.Random) -> Iterator[Clip]:
        if self.shuffle_buffer <= 1:
            yield from clips
            return
        buf: list[Clip] = []
        for clip in clips:
            buf.append(clip)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _start(self, workers: int, worker: int, in_process: bool) -> tuple[int, int]:
        """(first epoch, batches to skip) for this reader, consuming a pending resume state."""
        state, self._resume = self._resume, None
        if not state:
            return 0, 0
        if in_process and "epoch" in state and "batch_in_epoch" in state:
            return int(state["epoch"]), int(state["batch_in_epoch"])
        consumed = int(state.get("consumed", 0))
        if workers > 1:  # round-robin: worker w produced batches w, w+W, ... of the consumed ones
            return 0, max(0, -(-(consumed - worker) // workers))
        return 0, consumed

    def __iter__(self) -> Iterator[ClipBatch]:
        reader = self._reader()
        rank, _, worker, workers, _ = reader
        in_process = get_worker_info() is None
        epoch, skip = self._start(workers, worker, in_process)
        while True:
            rng = random.Random(f"clips:{self.seed}:{epoch}:{rank}:{worker}")
            clips = self._shuffled(self._epoch_clips(epoch, reader), rng)
            produced = 0
            if self.bucket_buffer:
                batches = pack_bucketed(clips, self.max_tokens, self.max_clips, self.bucket_buffer)
            else:
                batches = pack_by_tokens(clips, self.max_tokens, self.max_clips)
            for batch in batches:
                produced += 1
                if skip:
                    skip -= 1
                    continue
                if in_process:
                    self._consumed += 1
                    self._position = (epoch, produced)
                yield batch
            if not self.infinite:
                if in_process:
                    self._position = None  # a finished pass: the next iteration starts a new one
                return
            if produced == 0:  # valid samples exist (else _epoch_clips raised) but none for this reader
                log.warning(
                    "reader rank %d worker %d got no clip in epoch %d: it stops; give the dataset more "
                    "clips than nodes x workers",
                    rank,
                    worker,
                    epoch,
                )
                return
            epoch += 1


def _identity(x: Any) -> Any:
    return x


class ShardLoader(DataLoader):
    """DataLoader that counts batches reaching the consumer into its ShardDataset (for state_dict with workers)."""

    def __iter__(self):
        it = super().__iter__()
        ds = self.dataset
        if self.num_workers == 0 or not isinstance(ds, ShardDataset):
            return it  # in-process iteration counts itself
        ds._resume = None  # the workers now hold their copy of it; a later re-spawn must not skip again
        ds._position = None  # positions live in the workers; only the consumed count is known here
        return self._counting(it, ds)

    @staticmethod
    def _counting(it: Iterator[ClipBatch], ds: ShardDataset) -> Iterator[ClipBatch]:
        for batch in it:
            ds._consumed += 1
            yield batch


def make_loader(dataset: ShardDataset, num_workers: int = 0, pin_memory: bool | None = None) -> DataLoader:
    """DataLoader over an already batching dataset: batch_size=None, identity collate, persistent workers.

    pin_memory defaults to "CUDA is available" (ClipBatch.pin_memory pins every tensor).
    """
    return ShardLoader(
        dataset,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
