"""The clip sample of magi_train's webdataset shards (DESIGN.md "Shard format") and its validation."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

VIDEO_CHANNELS = 48  # Wan2.2 VAE latent channels
AUDIO_CHANNELS = 64  # Stable Audio Open VAE latent channels
MAX_TEXT_TOKENS = 640  # T5-Gemma features kept per prompt (released target length)
PATCH = (1, 2, 2)
FLOAT_DTYPES = (np.float16, np.float32)


class SampleError(ValueError):
    """A sample that breaks the shard conventions; readers skip and count it."""

    def __init__(self, key: str, field_name: str, reason: str):
        super().__init__(f"sample {key!r}: {field_name}: {reason}")
        self.key, self.field, self.reason = key, field_name, reason


@dataclass
class Clip:
    """One decoded, validated clip; tensors are fp32."""

    key: str
    video: Tensor  # [48, T, H, W]
    audio: Tensor  # [A, 64], A = 4(T-1)+1
    text: Tensor  # [L, D]
    caption: str = ""
    meta: dict = field(default_factory=dict)
    image: Tensor | None = None  # [48, 1, H, W] clean first-frame latent (i2v)
    lowres: Tensor | None = None  # [48, T, h, w] SR input latent

    @property
    def num_tokens(self) -> int:
        _, t, h, w = self.video.shape
        return t * (h // 2) * (w // 2) + self.audio.shape[0] + self.text.shape[0]


def encode_array(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _array(raw: dict, key: str, name: str, required: bool = True) -> np.ndarray | None:
    data = raw.get(name)
    if data is None:
        if required:
            raise SampleError(key, name, "missing")
        return None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle data from shards
    except Exception as e:  # truncated bytes, not an .npy, or an object array that needs pickle
        raise SampleError(key, name, f"not a readable .npy without pickle ({type(e).__name__}: {e})") from None
    if arr.dtype.type not in FLOAT_DTYPES:
        raise SampleError(key, name, f"dtype {arr.dtype} (expected float16 or float32)")
    if not np.isfinite(arr).all():
        raise SampleError(key, name, "contains NaN or Inf")
    return arr


def validate_sample(raw: dict, text_dim: int) -> Clip:
    """Decode the raw bytes of one webdataset sample into a Clip, checking every convention."""
    key = str(raw.get("__key__", "?"))
    video = _array(raw, key, "video.npy")
    if video.ndim != 4 or video.shape[0] != VIDEO_CHANNELS:
        raise SampleError(key, "video.npy", f"shape {list(video.shape)}, expected [{VIDEO_CHANNELS}, T, H, W]")
    _, t, h, w = video.shape
    if t < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise SampleError(key, "video.npy", f"latent size T={t} H={h} W={w}: H and W must be even (1x2x2 patches)")
    audio = _array(raw, key, "audio.npy")
    a_len = 4 * (t - 1) + 1
    if audio.ndim != 2 or audio.shape[1] != AUDIO_CHANNELS:
        raise SampleError(key, "audio.npy", f"shape {list(audio.shape)}, expected [A, {AUDIO_CHANNELS}]")
    if audio.shape[0] != a_len:
        raise SampleError(key, "audio.npy", f"length {audio.shape[0]} != 4*(T-1)+1 = {a_len} for T={t}")
    text = _array(raw, key, "text.npy")
    if text.ndim != 2 or text.shape[1] != text_dim or not 1 <= text.shape[0] <= MAX_TEXT_TOKENS:
        raise SampleError(key, "text.npy", f"shape {list(text.shape)}, expected [1..{MAX_TEXT_TOKENS}, {text_dim}]")
    image = _array(raw, key, "image.npy", required=False)
    if image is not None and image.shape != (VIDEO_CHANNELS, 1, h, w):
        raise SampleError(key, "image.npy", f"shape {list(image.shape)}, expected [{VIDEO_CHANNELS}, 1, {h}, {w}]")
    lowres = _array(raw, key, "lowres.npy", required=False)
    if lowres is not None and (lowres.ndim != 4 or lowres.shape[:2] != (VIDEO_CHANNELS, t)):
        raise SampleError(key, "lowres.npy", f"shape {list(lowres.shape)}, expected [{VIDEO_CHANNELS}, {t}, h, w]")
    meta = {}
    if raw.get("meta.json") is not None:
        try:
            meta = json.loads(raw["meta.json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError(key, "meta.json", f"not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise SampleError(key, "meta.json", f"a JSON {type(meta).__name__}, expected an object")
    caption = raw.get("caption.txt", b"")
    caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)

    def tensor(a):
        return None if a is None else torch.from_numpy(a.astype(np.float32))

    return Clip(key, tensor(video), tensor(audio), tensor(text), caption, meta, tensor(image), tensor(lowres))
