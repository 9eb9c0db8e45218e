"""Write clips as webdataset tar shards (DESIGN.md "Shard format"): .npy without pickle, atomic per shard, each
with an index of its samples and their checksums beside it (data/index.py)."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from magi_train.data.index import index_path, sample_digest, write_index
from magi_train.data.schema import check_clip_arrays, encode_npy
from magi_train.utils.fileio import atomic_stream

log = logging.getLogger(__name__)


def _numpy(x: Any) -> np.ndarray:
    """Tensor or array -> numpy on CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _cast(key: str, name: str, arr: np.ndarray, dtype: np.dtype) -> bytes:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the key
        out = arr.astype(dtype)
    if not np.isfinite(out).all():  # e.g. |x| > 65504 overflows float16: the reader would reject it anyway
        raise ValueError(
            f"sample {key!r}: {name}: non-finite values after casting to {np.dtype(dtype).name} "
            "(NaN/Inf in the clip, or values beyond the float16 range: store it as float32)"
        )
    return encode_npy(out)


def clip_to_sample(clip: Any, video_dtype: Any = np.float16, text_dim: int | None = None) -> dict[str, Any]:
    """The tar members of one Clip-like object (attributes key, video, audio, text; optional image, lowres,
    caption, meta). Shapes are checked first, so a writer never produces a sample the reader would skip."""
    key = str(clip.key)
    if not key or "." in key:  # webdataset splits member names at the first dot: `a.b.video.npy` is key `a`
        raise ValueError(f"sample key {key!r}: must be non-empty and contain no '.'")
    video, audio, text = _numpy(clip.video), _numpy(clip.audio), _numpy(clip.text)
    image = None if getattr(clip, "image", None) is None else _numpy(clip.image)
    lowres = None if getattr(clip, "lowres", None) is None else _numpy(clip.lowres)
    check_clip_arrays(key, video, audio, text, text_dim, image, lowres)
    vdt = np.dtype(video_dtype)
    if vdt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"video_dtype={vdt}: shards store float16 or float32")
    sample = {
        "__key__": key,
        "video.npy": _cast(key, "video.npy", video, vdt),
        "audio.npy": _cast(key, "audio.npy", audio, np.float32),  # small, and unscaled: keep full precision
        "text.npy": _cast(key, "text.npy", text, np.float16),
        "caption.txt": str(getattr(clip, "caption", "") or "").encode("utf-8"),
        "meta.json": json.dumps(dict(getattr(clip, "meta", None) or {})).encode("utf-8"),
    }
    if image is not None:
        sample["image.npy"] = _cast(key, "image.npy", image, vdt)
    if lowres is not None:
        sample["lowres.npy"] = _cast(key, "lowres.npy", lowres, vdt)
    return sample


def _checked_samples(
    samples: Iterable[Any], video_dtype: Any, text_dim: int | None
) -> Iterator[dict[str, Any]]:
    seen_keys: set[str] = set()
    for item in samples:
        sample = clip_to_sample(item, video_dtype, text_dim)
        if sample["__key__"] in seen_keys:  # duplicate keys would merge or shadow each other when read
            raise ValueError(f"sample key {sample['__key__']!r} written twice")
        seen_keys.add(sample["__key__"])
        yield sample


def _write_tar(path: Path, first: dict[str, Any], rest: Iterable[dict[str, Any]]) -> int:
    """Stream samples into one tar at `path`, then its index (both atomic: nothing appears under either name
    unless it was completely written)."""
    index_path(path).unlink(missing_ok=True)  # a stale index must never describe the new tar
    digests: dict[str, str] = {}
    with atomic_stream(path) as stream:
        sink = wds.TarWriter(stream, encoder=False, mtime=0.0)  # mtime: reproducible bytes
        for sample in itertools.chain([first], rest):
            sink.write(sample)
            # exactly the members TarWriter wrote: it skips keys starting with "_"
            digests[sample["__key__"]] = sample_digest({k: v for k, v in sample.items() if k[0] != "_"})
        sink.close()  # writes the tar end and closes the tar only; atomic_stream syncs and renames the file
    write_index(path, digests)
    return len(digests)


def write_shard(
    path: str | Path, samples: Iterable[Any], video_dtype: Any = np.float16, text_dim: int | None = None
) -> int:
    """Write all `samples` (Clip-like, see clip_to_sample) as one shard at `path`, atomically, and its index
    `<path>.index.json`; returns how many. With no samples nothing is written and `path` is left as it was."""
    checked = _checked_samples(samples, video_dtype, text_dim)
    first = next(checked, None)
    return 0 if first is None else _write_tar(Path(path), first, checked)


def write_shards(
    out_dir: str | Path,
    samples: Iterable[Any],
    samples_per_shard: int,
    prefix: str = "shard",
    video_dtype: Any = np.float16,
    text_dim: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write `prefix-000000.tar`, `prefix-000001.tar`, ... into out_dir and return their paths.

    samples: Clip-like objects (see clip_to_sample). Video (and image/lowres) are stored as video_dtype,
    text as float16, audio as float32. Each shard is written to a hidden temporary file in out_dir, synced
    and renamed into place when complete, so a crash never leaves a partial shard under a final name; its
    index `<shard>.index.json` (sample count and checksums, data/index.py) follows the same way.
    Refuses to mix with existing `prefix-*.tar` shards unless overwrite=True, which also deletes stale
    shards of that prefix beyond the ones written (a re-run with fewer clips leaves no old shard behind).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix={prefix!r}: a plain file-name stem without '/' or '.'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    existing = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds {len(existing)} shard(s) named {prefix}-NNNNNN.tar: write to another "
            "directory or prefix, or pass overwrite=True to replace them"
        )

    paths: list[str] = []
    checked = _checked_samples(samples, video_dtype, text_dim)
    for first in checked:  # one shard per pass; islice takes the rest of it from the same iterator
        final = out / f"{prefix}-{len(paths):06d}.tar"
        _write_tar(final, first, itertools.islice(checked, samples_per_shard - 1))
        paths.append(str(final))
    if overwrite:
        for stale in existing:
            if str(stale) not in paths:
                stale.unlink(missing_ok=True)
                index_path(stale).unlink(missing_ok=True)
                log.info("removed stale shard %s", stale)
    return paths
