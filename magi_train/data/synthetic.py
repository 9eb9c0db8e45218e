"""Learnable synthetic clips for smoke runs and tests: video, audio and text that depend on each other.

Each clip belongs to one of a few "concepts". The concept fixes a moving spatial wave pattern mixed over
the 48 video channels (direction, spatial frequency, speed), an audio pattern over the 64 audio channels
whose temporal frequency follows the video motion, and the text embedding. A per-clip random phase is
shared by video and audio. A model can therefore learn real structure (text -> content, video <-> audio)
instead of fitting noise. Values are about unit variance, like normalised VAE latents.

CLI: python -m magi_train.data.synthetic --out DIR --num-clips 256
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from magi_train.data.schema import AUDIO_CHANNELS, VIDEO_CHANNELS, Clip, encode_array
from magi_train.data.writer import write_shards

NUM_CONCEPTS = 8
_CONCEPT_SEED = 20260311  # concepts are fixed across data seeds so train and val share them


def concept_tables(text_dim: int, num_concepts: int = NUM_CONCEPTS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_CONCEPT_SEED)
    angle = np.linspace(0, 2 * np.pi, num_concepts, endpoint=False)
    return {
        "direction": np.stack([np.cos(angle), np.sin(angle)], -1),  # wave direction in (h, w)
        "spatial_freq": rng.uniform(0.15, 0.35, num_concepts),  # cycles per latent pixel
        "speed": rng.uniform(0.3, 1.0, num_concepts) * rng.choice([-1, 1], num_concepts),  # pixels / frame
        "video_mix": rng.normal(size=(num_concepts, 2, VIDEO_CHANNELS)) / math.sqrt(2),
        "audio_mix": rng.normal(size=(num_concepts, 2, AUDIO_CHANNELS)) / math.sqrt(2),
        "text": rng.normal(size=(num_concepts, text_dim)).astype(np.float32),
    }


def synthetic_clip(
    rng: np.random.Generator, key: str, size: tuple[int, int, int], text_len: int, text_dim: int,
    tables: dict[str, np.ndarray], concept: int | None = None, noise: float = 0.1,
) -> Clip:
    t, h, w = size
    c = int(rng.integers(len(tables["speed"]))) if concept is None else concept
    phase = rng.uniform(0, 2 * np.pi)
    dh, dw = tables["direction"][c]
    k = 2 * np.pi * tables["spatial_freq"][c]
    speed = tables["speed"][c]
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    arg = k * (dh * hh + dw * ww - speed * tt) + phase
    basis = np.stack([np.sin(arg), np.cos(arg)])  # [2, T, H, W]
    video = np.einsum("bc,bthw->cthw", tables["video_mix"][c], basis) * math.sqrt(2)
    video += noise * rng.normal(size=video.shape)
    # audio latent i sits at video-latent time i/4; its temporal frequency is the video's k*speed
    a_len = 4 * (t - 1) + 1
    a_time = np.arange(a_len) / 4.0
    a_arg = -k * speed * a_time + phase
    a_basis = np.stack([np.sin(a_arg), np.cos(a_arg)])  # [2, A]
    audio = np.einsum("bc,ba->ac", tables["audio_mix"][c], a_basis) * math.sqrt(2)
    audio += noise * rng.normal(size=audio.shape)
    text = tables["text"][c][None].repeat(text_len, 0) + noise * rng.normal(size=(text_len, text_dim))
    meta = {"fps": 25, "seconds": (a_len - 1) / 25, "source": "synthetic", "language": "en",
            "concept": c, "latent_size": [t, h, w], "split": "train"}
    return Clip(
        key=key,
        video=torch.from_numpy(video.astype(np.float32)),
        audio=torch.from_numpy(audio.astype(np.float32)),
        text=torch.from_numpy(text.astype(np.float32)),
        caption=f"synthetic concept {c}",
        meta=meta,
    )


def synthetic_clips(num_clips: int, seed: int, sizes: list[tuple[int, int, int]], text_len: int, text_dim: int):
    tables = concept_tables(text_dim)
    rng = np.random.default_rng(seed)
    for i in range(num_clips):
        size = tuple(sizes[int(rng.integers(len(sizes)))])
        yield synthetic_clip(rng, f"syn{seed:04d}-{i:06d}", size, text_len, text_dim, tables)


def write_synthetic_shards(
    out_dir: str | Path, num_clips: int, samples_per_shard: int = 64, seed: int = 0,
    sizes: list[tuple[int, int, int]] = ((3, 4, 6), (2, 6, 6), (4, 4, 4)), text_len: int = 8,
    text_dim: int = 3584,
) -> list[Path]:
    clips = synthetic_clips(num_clips, seed, list(sizes), text_len, text_dim)
    return write_shards(out_dir, clips, samples_per_shard, prefix="synthetic", video_dtype=np.float32)


def write_corrupt_shard(path: str | Path, text_dim: int, good: int = 2) -> dict[str, str]:
    """A shard with `good` valid clips and one clip per planted defect; returns key -> defect."""
    import io
    import pickle

    import webdataset as wds

    from magi_train.data.writer import clip_to_sample

    tables = concept_tables(text_dim)
    rng = np.random.default_rng(0)
    base = lambda key: clip_to_sample(synthetic_clip(rng, key, (2, 4, 4), 3, text_dim, tables))  # noqa: E731
    nan = np.full((48, 2, 4, 4), np.nan, np.float32)
    buf = io.BytesIO()
    pickle.dump({"not": "an array"}, buf)
    defects = {
        "bad-channels": ("video.npy", encode_array(np.zeros((47, 2, 4, 4), np.float32))),
        "bad-audio-len": ("audio.npy", encode_array(np.zeros((4, 64), np.float32))),
        "has-nan": ("video.npy", encode_array(nan)),
        "no-text": ("text.npy", None),
        "pickled": ("audio.npy", buf.getvalue()),
        "object-npy": ("text.npy", _object_npy()),
        "truncated": ("video.npy", encode_array(np.zeros((48, 2, 4, 4), np.float32))[:40]),
        "bad-meta": ("meta.json", b"{not json"),
    }
    with wds.TarWriter(str(path)) as sink:
        for i in range(good):
            sink.write(base(f"good-{i}"))
        for key, (member, value) in defects.items():
            sample = base(key)
            if value is None:
                del sample[member]
            else:
                sample[member] = value
            sink.write(sample)
    return {k: v[0] for k, v in defects.items()}


def _object_npy() -> bytes:
    buf = __import__("io").BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # only readable with pickle
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-clips", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-len", type=int, default=8)
    p.add_argument("--text-dim", type=int, default=3584)
    args = p.parse_args(argv)
    paths = write_synthetic_shards(args.out, args.num_clips, args.samples_per_shard, args.seed,
                                   text_len=args.text_len, text_dim=args.text_dim)
    print(f"wrote {args.num_clips} clips in {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    main()
