"""Read clip shards: verify and validate, skip-and-count bad samples, pack clips into token-budget batches.

Verification and counts (docs/data.md). A shard with an index (`<shard>.index.json`, data/index.py) has every
sample checked against its checksum before it is decoded, and the samples the index lists but the tar never
yielded (truncated or corrupt tar) are counted as `lost` at the end of the shard. A shard without an index
still reads, with one note per shard that it cannot be verified. Every problem is counted by reason
(`stats`): a skipped sample (`checksum`, `stray file`, `video.npy: shape`, ...), lost samples, tar read
errors, unverified shards; warnings are rate-limited per reason (LOG_FIRST in full, then one line every
LOG_EVERY), and each reader logs a summary line after an epoch with new problems. Only a reader (or, with
DataLoader workers, the whole loader) that finds no valid sample at all stops, with one error naming the
config key. Every batch carries its reader's cumulative counts (`ClipBatch.data_counts`), so the counts of
worker processes reach the main process, where `ShardLoader` keeps the latest of each worker and
`ShardDataset.report()` sums them (training/data_report.py logs and writes them).

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
- `stats` counts what this process read: with workers, each worker counts and logs its own samples, and
  `report()` in the main process sums the counts the workers sent along with their batches.
- Counts are reads: a bad sample is counted again each epoch, and a resumed reader re-counts what it
  re-reads while skipping to its position.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magi_train.data.index import index_path, read_index, sample_digest
from magi_train.data.schema import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    Clip,
    SampleError,
    count_tokens,
    validate_sample,
)

log = logging.getLogger(__name__)

LOG_FIRST = 3  # problems of one reason (a skip reason, `lost`, `tar error`, ...) reported in full ...
LOG_EVERY = 100  # ... then one line every LOG_EVERY further problems of that reason
COUNTERS = ("seen", "valid", "skipped", "lost", "tar_errors", "unverified_shards")
_EXAMPLES = 5  # shards named per problem reason in the counts
_TAIL_CHUNK = 1 << 16
_SAMPLE_MEMBERS = frozenset((*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "text.txt"))


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
    # cumulative counts of the reader that made the batch (ShardDataset.stats, its `reader` id, a few problem
    # shards): they ride on the batch because DataLoader workers are other processes. A batch without
    # clips carries counts only (a worker's last word); ShardLoader drops it after reading them.
    data_counts: dict[str, Any] = field(default_factory=dict)

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


_SHARD_HINT = (
    "give shard files, a directory of .tar shards (python -m magi_train.data.prepare writes them), a brace "
    "pattern like shard-{000000..000009}.tar, or a url webdataset opens such as pipe:...; for generated "
    "smoke data use experiment=smoke"
)


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike], what: str = "shards") -> list[str]:
    """Shard list from a directory (its *.tar), a brace pattern, `::`-joined urls, or a list of them.

    Local paths must exist (a clear error now rather than tar warnings later); urls webdataset opens
    (`pipe:...`, `s3://...` through a pipe, http) are passed through unchecked. `what` names the setting in
    error messages (`data.train_shards`).
    """
    if isinstance(urls, str | os.PathLike):
        spec = str(urls)
        if Path(spec).is_dir():
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise ValueError(f"{what}={spec}: the directory holds no .tar shards ({_SHARD_HINT})")
            return found
        out = list(wds.shardlists.expand_urls(spec))
        if out == [spec] and _is_local(spec) and not os.path.exists(spec):
            raise ValueError(f"{what}={spec}: no such file or directory ({_SHARD_HINT})")
    else:
        out = [str(u) for u in urls]
    if not out:
        raise ValueError(f"{what}={urls!r} names no shard ({_SHARD_HINT})")
    missing = [u for u in out if _is_local(u) and not os.path.exists(u)]
    if missing:
        raise ValueError(
            f"{what}: {len(missing)} of {len(out)} local shard(s) do not exist, e.g. {missing[0]} ({_SHARD_HINT})"
        )
    return out


def _dist_rank_world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def _top(reasons: Mapping[str, int], n: int = 3) -> str:
    return ", ".join(f"{r} (x{c})" for r, c in Counter(reasons).most_common(n))


def merge_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the counts of several readers (ShardDataset.stats / ClipBatch.data_counts) into one report."""
    total = dict.fromkeys(COUNTERS, 0)
    reasons: Counter = Counter()
    shards: dict[str, list[str]] = {}
    readers = 0
    for part in parts:
        readers += int(part.get("readers", 1))  # a snapshot is one reader, a merged report says how many
        for name in COUNTERS:
            total[name] += int(part.get(name, 0))
        reasons.update(part.get("skipped_by_reason", {}))
        for reason, urls in part.get("problem_shards", {}).items():
            known = shards.setdefault(reason, [])
            for url in urls:
                if url not in known and len(known) < _EXAMPLES:
                    known.append(url)
    return {
        **total,
        "skipped_by_reason": dict(reasons.most_common()),
        "problem_shards": shards,
        "readers": readers,
    }


def summarize_counts(counts: Mapping[str, Any]) -> str:
    """One line for people: `40 read, 35 valid; 3 skipped (checksum (x2), ...), 2 lost, ...`."""
    problems = []
    if counts.get("skipped"):
        problems.append(f"{counts['skipped']} skipped ({_top(counts.get('skipped_by_reason', {}), 5)})")
    labels = {"lost": "lost", "tar_errors": "tar errors", "unverified_shards": "unverified shards"}
    for name, label in labels.items():
        if counts.get(name):
            problems.append(f"{counts[name]} {label}")
    head = f"{counts.get('seen', 0)} samples read, {counts.get('valid', 0)} valid"
    return f"{head}; {', '.join(problems) if problems else 'no problems'}"


def _tail_problem(tar: tarfile.TarFile) -> str | None:
    """Why a tar stream ended early, judged by what follows its last header; None at a proper end.

    tarfile ends a stream silently at a corrupt header, or at a cut on a header boundary. A complete archive
    ends with zero blocks (the end-of-archive marker and its padding), so anything else is a problem.
    """
    rest = tar.fileobj.read(_TAIL_CHUNK)
    if not rest:
        return "no end-of-archive marker: the tar is truncated"
    while rest:
        if rest.count(0) != len(rest):
            return "a corrupt tar header: the rest of the shard cannot be read"
        rest = tar.fileobj.read(_TAIL_CHUNK)
    return None


class ShardDataset(IterableDataset):
    """ClipBatches packed to a token budget from webdataset shards, split by node and worker (see module doc).

    urls: shard paths, a directory, a brace pattern, or anything webdataset opens (e.g. `pipe:`).
    shuffle_buffer: clips held for shuffling (0 = read order). infinite: repeat epochs forever with a fresh
    shard order per epoch (training); otherwise one pass in the given order (validation).
    bucket_buffer: 0 packs clips in stream order (pack_by_tokens); > 0 packs each batch from one
    aspect-ratio / duration bucket, holding up to that many clips (pack_bucketed).
    name: the setting the urls come from (`data.train_shards`), named in messages.
    Samples are verified against the shard's index and validated; bad ones are skipped, counted (`stats`) and
    logged (module doc). A reader that finds no valid sample at all in a pass raises ValueError naming
    `name`, the shards and the reasons (with DataLoader workers: ShardLoader, when no worker found one).
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
        name: str = "shards",
        replica: tuple[int, int] | None = None,
    ):
        """replica: (rank, count) of this process among the readers of different samples, when that is not the
        process group's (context-parallel ranks of one data-parallel group read the same samples)."""
        super().__init__()
        if text_dim < 1 or max_tokens < 1 or shuffle_buffer < 0 or (max_clips is not None and max_clips < 1):
            raise ValueError(
                f"ShardDataset: need text_dim >= 1, max_tokens >= 1, max_clips >= 1 or None, "
                f"shuffle_buffer >= 0 (got {text_dim}, {max_tokens}, {max_clips}, {shuffle_buffer})"
            )
        if bucket_buffer < 0:
            raise ValueError(f"ShardDataset: bucket_buffer={bucket_buffer}: 0 (no bucketing) or >= 1 clips")
        self.bucket_buffer, self.name = bucket_buffer, name
        self.urls = expand_urls(urls, name)
        self.text_dim, self.max_tokens, self.max_clips = text_dim, max_tokens, max_clips
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self._counts: Counter = Counter()  # COUNTERS of this process
        self._reasons: Counter = Counter()  # skipped samples by reason
        self._logged: Counter = Counter()  # problems by reason, for rate-limited warnings
        self._problem_shards: dict[str, list[str]] = {}  # reason -> the first few shards with it
        self._unverified: set[str] = set()  # shards noted as unverifiable (once each)
        self._worker_counts: dict[str, dict[str, Any]] = {}  # latest counts per worker (set by ShardLoader)
        self._reader_id = "main"
        self._epoch_valid = 0  # valid samples of the last finished pass of this reader
        self._consumed = 0  # batches handed to the consumer of this process (see make_loader for workers)
        self._position: tuple[int, int] | None = None  # (epoch, batches of it consumed), in-process only
        self._resume: dict | None = None
        self._warned_split = False
        # Spawned DataLoader workers lose the process group; the rank seen at construction is the fallback.
        self._launch_rank, self._launch_world = replica or _dist_rank_world()
        self._replica = replica

    # -- counters and state --------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """What this process read: samples seen / valid / skipped (and by reason), samples lost (listed in an
        index, never read), tar read errors, shards that could not be verified (no index)."""
        return {**{name: self._counts[name] for name in COUNTERS}, "skipped_by_reason": dict(self._reasons)}

    def _snapshot(self) -> dict[str, Any]:
        shards = {reason: list(urls) for reason, urls in self._problem_shards.items()}
        return {**self.stats, "problem_shards": shards, "reader": self._reader_id}

    def report(self) -> dict[str, Any]:
        """The counts of every reader of this dataset known to this process (merge_counts): its own and, with
        DataLoader workers, the latest each worker sent with its batches."""
        parts = list(self._worker_counts.values())
        if not parts or any(self._counts.values()):
            parts.insert(0, self._snapshot())
        return merge_counts(parts)

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
        if self._replica is not None:  # the data-parallel rank, whatever the process group says
            return self._replica[0], self._replica[1], worker, workers, False
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

    def _problem(self, reason: str, message: str) -> None:
        """Rate-limited warning per reason: the first LOG_FIRST in full, then one line every LOG_EVERY."""
        self._logged[reason] += 1
        n = self._logged[reason]
        if n <= LOG_FIRST:
            more = f" (further {reason!r} problems: one line every {LOG_EVERY})" if n == LOG_FIRST else ""
            log.warning("%s%s", message, more)
        elif n % LOG_EVERY == 0:
            log.warning("%s: %d %r problems so far (%s)", self.name, n, reason, summarize_counts(self.stats))

    def _problems(self) -> int:
        return sum(self._counts[name] for name in COUNTERS if name not in ("seen", "valid"))

    def _mark(self, url: str, reason: str) -> None:
        urls = self._problem_shards.setdefault(reason, [])
        if url not in urls and len(urls) < _EXAMPLES:
            urls.append(url)

    def _skip(self, url: str, reason: str, message: str, reasons: Counter) -> None:
        self._counts["skipped"] += 1
        self._reasons[reason] += 1
        reasons[reason] += 1
        self._mark(url, reason)
        self._problem(reason, f"skipped sample ({reason}) in {url}: {message}")

    def _shard_index(self, url: str) -> dict[str, str] | None:
        """The shard's index {key: digest}, or None with one note per shard that it cannot be verified."""
        if not _is_local(url):
            why = "it is not a local file (indexes are read beside local shards only)"
        else:
            try:
                index = read_index(url)
            except ValueError as e:
                why = str(e)
            else:
                if index is not None:
                    return index
                why = f"it has no index {index_path(url).name} (written by another tool or an older writer)"
        if url not in self._unverified:
            self._unverified.add(url)
            self._counts["unverified_shards"] += 1
            self._mark(url, "unverified")
            self._problem(
                "unverified",
                f"shard {url} cannot be verified: {why}; samples are still validated, but lost samples and "
                "flipped bytes in it go unnoticed (rewrite it with magi_train.data.write_shards to verify it)",
            )
        return None

    def _tar_files(self, url: str, tar_errors: list[str]) -> Iterator[tuple[str, bytes]]:
        """(member name, bytes) of the regular files of one tar, in order; a read error ends the shard."""

        def error(message: str) -> None:
            tar_errors.append(message)
            self._counts["tar_errors"] += 1
            self._mark(url, "tar error")
            self._problem("tar error", f"shard {url}: {message}")

        try:
            stream = wds.gopen(url)
        except Exception as e:  # any failure to open is a counted tar error, never fatal
            error(f"cannot be opened ({type(e).__name__}: {e})")
            return
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()
                tar.members = []  # a stream: keep no member list
            problem = _tail_problem(tar)
            if problem is not None:
                error(problem)
        except Exception as e:  # tarfile, zlib and OS errors alike end this shard only
            error(f"unreadable tar data, the rest of the shard is skipped ({type(e).__name__}: {e})")
        finally:
            try:
                stream.close()  # a pipe: reports a non-zero exit status here
            except Exception as e:  # the same for a pipe that exited with an error
                error(f"closing failed ({type(e).__name__}: {e})")

    def _tar_samples(self, url: str, tar_errors: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {suffix: bytes}) per sample, grouping consecutive files as webdataset does (key = the name up
        to its first dot). A file without a dot in its name comes alone with no members (a stray file)."""
        key, members = None, {}
        for name, data in self._tar_files(url, tar_errors):
            prefix, suffix = wds.tariterators.base_plus_ext(name)
            if prefix is None or prefix != key or suffix.lower() in members:
                if key is not None:
                    yield key, members
                key, members = prefix, {}
            if prefix is None:
                yield name, {}
                continue
            members[suffix.lower()] = data
        if key is not None:
            yield key, members

    @staticmethod
    def _check(key: str, members: dict[str, bytes], index: dict[str, str] | None, done: set[str]):
        """(reason, message) of a sample that must not be decoded, else None."""
        if not members.keys() & _SAMPLE_MEMBERS:
            return (
                "stray file",
                f"{key!r} (members {sorted(members)}): not a sample, a file that does not belong",
            )
        if key in done:
            return "duplicate key", f"{key!r}: a second sample with this key in the shard"
        if index is not None:
            if key not in index:
                return "not in index", f"{key!r}: the shard's index does not list it"
            if sample_digest(members) != index[key]:
                return (
                    "checksum",
                    f"{key!r}: its bytes do not match the checksum in the shard's index (corrupt)",
                )
        return None

    def _read_shard(self, url: str, reasons: Counter, tar_errors: list[str]) -> Iterator[Clip]:
        index = self._shard_index(url)
        unread = dict.fromkeys(index or ())  # the index's keys not read yet, in tar order
        done: set[str] = set()
        for key, members in self._tar_samples(url, tar_errors):
            self._counts["seen"] += 1
            problem = self._check(key, members, index, done)
            done.add(key)
            unread.pop(key, None)
            if problem is not None:
                self._skip(url, *problem, reasons)
                continue
            try:
                clip = validate_sample({"__key__": key, **members}, self.text_dim)
            except SampleError as e:
                self._skip(url, e.label, str(e), reasons)
                continue
            self._counts["valid"] += 1
            yield clip
        if unread:  # listed in the index, never read: the tar is truncated or corrupt
            n = len(unread)
            self._counts["lost"] += n
            reasons["lost"] += n
            self._mark(url, "lost")
            self._problem(
                "lost",
                f"shard {url}: {n} of the {len(index)} samples of its index were never read (truncated or "
                f"corrupt tar; the first: {next(iter(unread))!r}): lost",
            )

    def _nothing_valid(self, where: str, detail: str, counts: Mapping[str, Any]) -> ValueError:
        return ValueError(
            f"{self.name}: no valid sample in any of the {len(self.urls)} shard(s) {where}: {detail}. "
            f"Counts: {summarize_counts(counts)}. Fix or regenerate the shards, or point {self.name} at "
            "other shards."
        )

    def _epoch_clips(self, epoch: int, reader: tuple[int, int, int, int, bool]) -> Iterator[Clip]:
        shards, stride, offset = self._assign(epoch, reader)
        before = self._problems()
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
        self._epoch_valid = index
        if self._problems() != before:  # the summary line of a pass with problems
            log.warning(
                "%s: reader %s, after epoch %d: %s",
                self.name,
                self._reader_id,
                epoch,
                summarize_counts(self.stats),
            )
        if shards and index == 0 and get_worker_info() is None:  # workers: ShardLoader decides (all of them)
            rank, world = reader[0], reader[1]
            listed = "; ".join(f"{u}: {r}" for u, r in list(report.items())[:5])
            more = f" and {len(report) - 5} more" if len(report) > 5 else ""
            where = "of this reader" + (f" (rank {rank} of {world})" if world > 1 else "")
            raise self._nothing_valid(where, listed + more, self.stats)

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

    def _counts_only(self) -> ClipBatch:
        return ClipBatch(keys=[], video=[], audio=[], text=[], data_counts=self._snapshot())

    def __iter__(self) -> Iterator[ClipBatch]:
        reader = self._reader()
        rank, _, worker, workers, _ = reader
        in_process = get_worker_info() is None
        self._reader_id = f"rank{rank}/worker{worker}"
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
                batch.data_counts = self._snapshot()
                yield batch
            if not self.infinite:
                if in_process:
                    self._position = None  # a finished pass: the next iteration starts a new one
                else:
                    yield self._counts_only()  # the counts after the last batch
                return
            if produced == 0:
                if self._epoch_valid == 0:  # only in a worker: in-process, _epoch_clips raised
                    log.warning(
                        "%s: reader %s found no valid sample in its shards in epoch %d: it stops (the other "
                        "workers go on)", self.name, self._reader_id, epoch,
                    )  # fmt: skip
                else:
                    log.warning(
                        "%s: reader %s got no clip in epoch %d: it stops; give the dataset more clips than "
                        "nodes x workers", self.name, self._reader_id, epoch,
                    )  # fmt: skip
                if not in_process:
                    yield self._counts_only()
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
        produced = 0
        for batch in it:
            if batch.data_counts:
                ds._worker_counts[batch.data_counts["reader"]] = batch.data_counts
            if not len(batch):  # counts only: a worker's last word
                continue
            ds._consumed += 1
            produced += 1
            yield batch
        if not produced:  # every worker stopped without a clip: the one data problem that stops a run
            counts = ds.report()
            detail = f"most common problems: {_top(counts['skipped_by_reason']) or '-'}"
            examples = sorted({u for urls in counts["problem_shards"].values() for u in urls})[:5]
            if examples:
                detail += f"; shards with problems include {', '.join(examples)}"
            raise ds._nothing_valid(f"(read by {counts['readers']} DataLoader worker(s))", detail, counts)


def make_loader(
    dataset: ShardDataset, num_workers: int = 0, pin_memory: bool | None = None, seed: int = 0
) -> DataLoader:
    """DataLoader over an already batching dataset: batch_size=None, identity collate, persistent workers.

    pin_memory defaults to "CUDA is available" (ClipBatch.pin_memory pins every tensor). The loader draws its
    workers' base seed from a generator of its own (seeded by `seed`), never from the global torch RNG: a
    validation pass between two training steps then leaves the training stream untouched (exact resume).
    """
    return ShardLoader(
        dataset,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
