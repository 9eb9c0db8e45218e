"""Write clips as webdataset tar shards (no pickle: arrays as .npy), each shard renamed into place atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds

from magi_train.data.schema import Clip, encode_array


def clip_to_sample(clip: Clip, video_dtype=np.float16) -> dict:
    """The tar members of one clip: video/audio/text .npy, caption.txt, meta.json, optional image/lowres."""
    sample = {
        "__key__": clip.key,
        "video.npy": encode_array(clip.video.numpy().astype(video_dtype)),
        "audio.npy": encode_array(clip.audio.numpy().astype(np.float32)),
        "text.npy": encode_array(clip.text.numpy().astype(np.float16)),
        "caption.txt": clip.caption.encode("utf-8"),
        "meta.json": json.dumps(clip.meta).encode("utf-8"),
    }
    if clip.image is not None:
        sample["image.npy"] = encode_array(clip.image.numpy().astype(video_dtype))
    if clip.lowres is not None:
        sample["lowres.npy"] = encode_array(clip.lowres.numpy().astype(video_dtype))
    return sample


def write_shards(
    out_dir: str | Path, clips: Iterable[Clip], samples_per_shard: int = 256, prefix: str = "shard",
    video_dtype=np.float16,
) -> list[Path]:
    """Write `prefix-000000.tar`, ... into out_dir; a shard appears under its name only once complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer, tmp, count = None, None, 0

    def close():
        writer.close()
        final = out / f"{prefix}-{len(paths):06d}.tar"
        os.replace(tmp, final)
        paths.append(final)

    try:
        for clip in clips:
            if writer is None:
                tmp = out / f".{prefix}-{len(paths):06d}.tar.tmp"
                writer, count = wds.TarWriter(str(tmp)), 0
            writer.write(clip_to_sample(clip, video_dtype))
            count += 1
            if count == samples_per_shard:
                close()
                writer = None
        if writer is not None:
            close()
            writer = None
    finally:
        if writer is not None:  # an exception mid-shard: drop the partial file
            writer.close()
            Path(tmp).unlink(missing_ok=True)
    return paths
