"""Learnable synthetic clips for smoke runs and tests: video, audio and text latents that depend on each other.

Each clip belongs to one of a few "concepts" (8 by default). The concept fixes a travelling plane wave over
the latent grid (direction, spatial frequency, signed speed in latent pixels per frame) that is mixed into
the 48 video channels by a concept-specific matrix; an audio latent whose 64 channels oscillate at the
temporal frequency of that motion, with the phase the video has at the grid origin (audio index 4t sits at
video frame t); and text features that are a fixed random embedding of the concept plus small noise. Only
a per-clip phase is random, and video and audio share it. A model therefore has real structure to learn
(text -> content and motion, video <-> audio) instead of fitting noise. Values are about unit variance, like
normalised VAE latents. Everything is deterministic given the seed; the concepts themselves are fixed (the
same for every seed), so train and validation sets drawn with different seeds share them.

CLI: python -m magi_train.data.synthetic --out DIR --num-clips 256 [--sizes 3x4x6,2x6x6 --text-dim 3584]
"""

from __future__ import annotations

import argparse
import functools
import io
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from magi_train.data.schema import (
    AUDIO_CHANNELS,
    VIDEO_CHANNELS,
    Clip,
    encode_npy,
    expected_audio_len,
)
from magi_train.data.writer import clip_to_sample, write_shards

NUM_CONCEPTS = 8
DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = ((3, 4, 6), (2, 6, 6), (4, 4, 4))  # (T, H, W) latents
_CONCEPT_SEED = 20260311  # fixed: concepts do not depend on the data seed


@dataclass(frozen=True)
class ConceptBank:
    """The fixed parameters of every concept (arrays are read-only)."""

    direction: np.ndarray  # [C, 2] unit direction of the wave in (h, w)
    spatial_freq: np.ndarray  # [C] cycles per latent pixel
    speed: np.ndarray  # [C] signed latent pixels per latent frame
    video_mix: np.ndarray  # [C, 2, 48] (sin, cos) -> video channels
    audio_mix: np.ndarray  # [C, 2, 64] (sin, cos) -> audio channels
    text: np.ndarray  # [C, D] text embedding of the concept

    def __len__(self) -> int:
        return len(self.speed)


@functools.lru_cache(maxsize=8)
def concept_bank(text_dim: int, num_concepts: int = NUM_CONCEPTS) -> ConceptBank:
    """The concepts for a text width (cached; the same for every data seed)."""
    rng = np.random.default_rng(_CONCEPT_SEED)
    # evenly spread directions with a random rotation, so no two concepts move alike
    angle = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, num_concepts, endpoint=False)
    arrays = {
        "direction": np.stack([np.cos(angle), np.sin(angle)], -1),
        "spatial_freq": rng.uniform(0.12, 0.3, num_concepts),
        "speed": rng.uniform(0.3, 1.0, num_concepts) * rng.choice([-1.0, 1.0], num_concepts),
        # entries N(0, 1): a channel a*sin + b*cos then has variance (a^2 + b^2) / 2, on average 1
        "video_mix": rng.normal(size=(num_concepts, 2, VIDEO_CHANNELS)),
        "audio_mix": rng.normal(size=(num_concepts, 2, AUDIO_CHANNELS)),
        "text": rng.normal(size=(num_concepts, text_dim)),
    }
    for a in arrays.values():
        a.flags.writeable = False  # shared through the cache
    return ConceptBank(**arrays)


def synthetic_clip(
    rng: np.random.Generator,
    key: str,
    frames_T: int,
    height: int,
    width: int,
    text_len: int,
    text_dim: int,
    *,
    concept: int | None = None,
    num_concepts: int = NUM_CONCEPTS,
    noise: float = 0.1,
    with_image: bool = False,
    split: str = "train",
) -> Clip:
    """One clip of latent size (frames_T, height, width); the concept is drawn from rng unless given.

    with_image adds the clean first latent frame as `image` (i2v conditioning).
    """
    bank = concept_bank(text_dim, num_concepts)
    c = int(rng.integers(num_concepts)) if concept is None else int(concept)
    if not 0 <= c < num_concepts:
        raise ValueError(f"concept={c}: must be in [0, {num_concepts})")
    phase = rng.uniform(0, 2 * np.pi)
    k = 2 * np.pi * bank.spatial_freq[c]  # radians per latent pixel
    omega = k * bank.speed[c]  # radians per latent frame: the pattern moves by `speed` pixels per frame
    dh, dw = bank.direction[c]
    t, h, w = np.meshgrid(np.arange(frames_T), np.arange(height), np.arange(width), indexing="ij")
    arg = k * (dh * h + dw * w) - omega * t + phase
    basis = np.stack([np.sin(arg), np.cos(arg)])  # [2, T, H, W]
    video = np.einsum("bc,bthw->cthw", bank.video_mix[c], basis)
    video += noise * rng.standard_normal(video.shape)
    # audio index i sits at video latent time i/4: it follows the phase the video has at the grid origin
    a_len = expected_audio_len(frames_T)
    a_arg = -omega * (np.arange(a_len) / 4.0) + phase
    audio = np.einsum("bc,ba->ac", bank.audio_mix[c], np.stack([np.sin(a_arg), np.cos(a_arg)]))
    audio += noise * rng.standard_normal(audio.shape)
    text = bank.text[c][None] + noise * rng.standard_normal((text_len, text_dim))
    meta = {
        "fps": 25,
        "seconds": 4 * (frames_T - 1) / 25,
        "source": "synthetic",
        "language": "en",
        "pixel_size": [height * 16, width * 16],
        "split": split,
        "concept": c,
    }
    video_t = torch.from_numpy(video.astype(np.float32))
    return Clip(
        key=key,
        video=video_t,
        audio=torch.from_numpy(audio.astype(np.float32)),
        text=torch.from_numpy(text.astype(np.float32)),
        image=video_t[:, :1].clone() if with_image else None,
        caption=f"synthetic concept {c}: a wave pattern moving at {bank.speed[c]:+.2f} latent pixels per frame",
        meta=meta,
    )


def synthetic_clips(
    num_clips: int,
    seed: int,
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    text_len: int | tuple[int, int] = 8,
    text_dim: int = 3584,
    **clip_kwargs,
) -> Iterator[Clip]:
    """num_clips clips with sizes drawn from `sizes` and text lengths from text_len (an int or a (lo, hi)
    inclusive range); keys `syn<seed>-<index>`."""
    sizes = [tuple(int(x) for x in s) for s in sizes]
    if not sizes or any(len(s) != 3 for s in sizes):
        raise ValueError(f"sizes={sizes}: give (T, H, W) latent sizes")
    lo, hi = (text_len, text_len) if isinstance(text_len, int) else (int(text_len[0]), int(text_len[1]))
    rng = np.random.default_rng(seed)
    for i in range(num_clips):
        t, h, w = sizes[int(rng.integers(len(sizes)))]
        n_text = int(rng.integers(lo, hi + 1))
        yield synthetic_clip(rng, f"syn{seed:04d}-{i:06d}", t, h, w, n_text, text_dim, **clip_kwargs)


def write_synthetic_shards(
    out_dir: str | Path,
    num_clips: int,
    samples_per_shard: int = 64,
    seed: int = 0,
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    text_dim: int = 3584,
    text_len: int | tuple[int, int] = 8,
    video_dtype: type = np.float16,
    prefix: str = "synthetic",
    overwrite: bool = False,
    **clip_kwargs,
) -> list[str]:
    """Write num_clips synthetic clips (mixed sizes, to exercise packing) as shards; returns their paths."""
    clips = synthetic_clips(num_clips, seed, sizes, text_len, text_dim, **clip_kwargs)
    return write_shards(
        out_dir,
        clips,
        samples_per_shard,
        prefix=prefix,
        video_dtype=video_dtype,
        text_dim=text_dim,
        overwrite=overwrite,
    )


# -- planted defects (tests of the reader) ---------------------------------------------------------------------


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"not": "a latent"}], dtype=object), allow_pickle=True)  # data part is a pickle
    return buf.getvalue()


def write_corrupt_shard(path: str | Path, text_dim: int, good: int = 2) -> dict[str, str]:
    """A shard holding `good` valid clips and one clip per planted defect.

    Returns {key: the `field: kind` label the reader must count it under} for every defective clip.
    """
    rng = np.random.default_rng(0)

    def sample(key: str) -> dict:
        return clip_to_sample(synthetic_clip(rng, key, 2, 4, 4, 3, text_dim))  # A = 5

    video = encode_npy(np.zeros((VIDEO_CHANNELS, 2, 4, 4), np.float32))
    defects: dict[str, tuple[str, str, bytes | None]] = {
        "bad-channels": ("video.npy: shape", "video.npy", encode_npy(np.zeros((47, 2, 4, 4), np.float32))),
        "odd-width": (
            "video.npy: odd size",
            "video.npy",
            encode_npy(np.zeros((VIDEO_CHANNELS, 2, 4, 5), np.float16)),
        ),
        "has-nan": (
            "video.npy: non-finite",
            "video.npy",
            encode_npy(np.full((VIDEO_CHANNELS, 2, 4, 4), np.nan, np.float32)),
        ),
        "truncated": ("video.npy: truncated", "video.npy", video[:-100]),
        "truncated-header": ("video.npy: unreadable", "video.npy", video[:40]),
        "bad-audio-len": (
            "audio.npy: length",
            "audio.npy",
            encode_npy(np.zeros((4, AUDIO_CHANNELS), np.float32)),
        ),
        "float64-audio": (
            "audio.npy: dtype",
            "audio.npy",
            encode_npy(np.zeros((5, AUDIO_CHANNELS), np.float64)),
        ),
        "pickled": (
            "audio.npy: needs pickle",
            "audio.npy",
            pickle.dumps(np.zeros((5, AUDIO_CHANNELS), np.float32)),
        ),
        "object-npy": ("text.npy: needs pickle", "text.npy", _object_npy()),
        "no-text": ("text.npy: missing", "text.npy", None),
        "text-too-long": ("text.npy: length", "text.npy", encode_npy(np.zeros((641, text_dim), np.float16))),
        "wrong-text-dim": (
            "text.npy: shape",
            "text.npy",
            encode_npy(np.zeros((3, text_dim + 1), np.float16)),
        ),
        "bad-image": (
            "image.npy: shape",
            "image.npy",
            encode_npy(np.zeros((VIDEO_CHANNELS, 1, 2, 2), np.float16)),
        ),
        "bad-meta": ("meta.json: invalid json", "meta.json", b"{not json"),
        "meta-list": ("meta.json: not an object", "meta.json", b"[1, 2]"),
    }
    with open(path, "wb") as stream:
        sink = wds.TarWriter(stream, encoder=False, mtime=0.0)
        for i in range(good):
            sink.write(sample(f"good-{i}"))
        for key, (_, member, value) in defects.items():
            s = sample(key)
            if value is None:
                del s[member]
            else:
                s[member] = value
            sink.write(s)
        sink.close()
    return {key: label for key, (label, _, _) in defects.items()}


# -- CLI -------------------------------------------------------------------------------------------------------


def _parse_sizes(spec: str) -> list[tuple[int, int, int]]:
    try:
        sizes = [tuple(int(x) for x in item.lower().split("x")) for item in spec.split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 3 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes {spec!r}: expected TxHxW[,TxHxW...], e.g. 3x4x6,2x6x6")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.data.synthetic",
        description="Write learnable synthetic clips as webdataset shards.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-clips", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=list(DEFAULT_SIZES),
        help="latent sizes TxHxW, comma separated (H, W even)",
    )
    p.add_argument("--text-len", type=int, default=8)
    p.add_argument("--text-dim", type=int, default=3584)
    p.add_argument("--video-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--with-image", action="store_true", help="store the clean first frame as image.npy")
    p.add_argument("--prefix", default="synthetic")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the same prefix")
    args = p.parse_args(argv)

    tally: Counter = Counter()
    tokens: list[int] = []

    def counted() -> Iterator[Clip]:
        for clip in synthetic_clips(
            args.num_clips, args.seed, args.sizes, args.text_len, args.text_dim, with_image=args.with_image
        ):
            tally[clip.meta["concept"]] += 1
            tokens.append(clip.num_tokens)
            yield clip

    paths = write_shards(
        args.out,
        counted(),
        args.samples_per_shard,
        prefix=args.prefix,
        video_dtype=np.dtype(args.video_dtype),
        text_dim=args.text_dim,
        overwrite=args.overwrite,
    )
    size_mib = sum(Path(q).stat().st_size for q in paths) / 2**20
    print(f"wrote {len(tokens)} clips in {len(paths)} shard(s) ({size_mib:.1f} MiB) to {args.out}")
    if tokens:
        print(f"tokens per clip: min {min(tokens)}, mean {sum(tokens) / len(tokens):.0f}, max {max(tokens)}")
        print("clips per concept: " + ", ".join(f"{c}: {n}" for c, n in sorted(tally.items())))


if __name__ == "__main__":
    main()
