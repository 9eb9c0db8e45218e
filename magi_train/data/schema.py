"""The clip sample of magi_train's webdataset shards (DESIGN.md "Shard format") and its strict validation."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

VIDEO_CHANNELS = 48  # Wan2.2 VAE latent channels
AUDIO_CHANNELS = 64  # Stable Audio Open VAE latent channels
MAX_TEXT_TOKENS = 640  # T5-Gemma features kept per prompt (released target length)
PATCH = (1, 2, 2)  # the DiT's video patch (t, h, w)
AUDIO_PER_FRAME = 4  # audio latents per video latent frame: A = 4 * (T - 1) + 1

REQUIRED_FIELDS = ("video.npy", "audio.npy", "text.npy", "caption.txt", "meta.json")
OPTIONAL_FIELDS = ("image.npy", "lowres.npy")

_MAX_NPY_HEADER = 10_000  # bytes; a real .npy header is ~128, anything larger is hostile or broken


class SampleError(ValueError):
    """A sample that breaks the shard conventions; readers skip and count it, writers refuse it.

    `field` is the tar member at fault (`audio.npy`, ...), `kind` a short stable label of the problem used to
    count skipped samples by reason (`length`, `needs pickle`, ...), `reason` the full human explanation.
    """

    def __init__(self, key: str, field: str, reason: str, kind: str | None = None):
        super().__init__(f"sample {key!r}: {field}: {reason}")
        self.key, self.field, self.reason = key, field, reason
        self.kind = kind or reason

    @property
    def label(self) -> str:
        """`field: kind`, the key under which readers count this problem."""
        return f"{self.field}: {self.kind}"


def expected_audio_len(frames: int) -> int:
    """Audio latents of a clip with `frames` video latent frames (25 audio latents/s, video stride 4)."""
    return AUDIO_PER_FRAME * (frames - 1) + 1


def count_tokens(video_shape: tuple[int, ...], audio_len: int, text_len: int) -> int:
    """Sequence length of one clip in the DiT: patchified video + audio + text tokens."""
    _, t, h, w = video_shape
    pt, ph, pw = PATCH
    return (t // pt) * (h // ph) * (w // pw) + audio_len + text_len


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class Clip:
    """One decoded, validated clip; all tensors are fp32 on CPU."""

    key: str
    video: Tensor  # [48, T, H, W], H and W even
    audio: Tensor  # [A, 64], A = 4(T-1)+1
    text: Tensor  # [L, D], 1 <= L <= 640
    image: Tensor | None = None  # [48, 1, H, W] clean first-frame latent (i2v)
    caption: str = ""
    meta: dict = field(default_factory=dict)
    lowres: Tensor | None = None  # [48, T, h, w] SR input latent (recipe pretrain_sr)

    @property
    def num_tokens(self) -> int:
        return count_tokens(tuple(self.video.shape), self.audio.shape[0], self.text.shape[0])


def encode_npy(arr: np.ndarray) -> bytes:
    """The .npy bytes of a numeric array, never pickled."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, key: str, name: str) -> np.ndarray:
    """Parse .npy bytes as a float16/float32 array without ever unpickling.

    The header is read and the dtype checked before any data is touched, so an object array (whose data
    is a pickle) is rejected unread, and the byte count is checked against the shape (truncated members).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SampleError(key, name, f"expected raw .npy bytes, got {type(data).__name__}", "not bytes")
    data = bytes(data)
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
    except ValueError:
        if data[:1] == b"\x80":  # pickle protocol >= 2 opcode: a pickled object stored under an .npy name
            raise SampleError(
                key, name, "holds pickled data, not an .npy array (pickle is never loaded)", "needs pickle"
            ) from None
        raise SampleError(key, name, f"not an .npy file ({len(data)} bytes)", "unreadable") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_NPY_HEADER)
        else:  # 3.0 only exists for non-latin-1 structured field names, never for a latent
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, SyntaxError) as e:
        raise SampleError(key, name, f"unreadable .npy header ({e})", "unreadable") from None
    if dtype.hasobject:
        raise SampleError(key, name, f"object dtype {dtype} needs pickle to load (refused)", "needs pickle")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise SampleError(key, name, f"dtype {dtype}, expected float16 or float32", "dtype")
    count = math.prod(shape)
    payload = data[fp.tell() :]
    if len(payload) != count * dtype.itemsize:
        raise SampleError(
            key,
            name,
            f"{len(payload)} data bytes for shape {list(shape)} {dtype} "
            f"(expected {count * dtype.itemsize}): truncated or corrupt",
            "truncated",
        )
    arr = np.frombuffer(payload, dtype=dtype, count=count)
    arr = arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise SampleError(key, name, f"{bad} of {arr.size} values are NaN or Inf", "non-finite")
    return arr


def check_clip_arrays(
    key: str,
    video: np.ndarray | Tensor,
    audio: np.ndarray | Tensor,
    text: np.ndarray | Tensor,
    text_dim: int | None,
    image: np.ndarray | Tensor | None = None,
    lowres: np.ndarray | Tensor | None = None,
) -> None:
    """Raise SampleError unless the shapes follow DESIGN.md's tensor conventions (text_dim None: any width)."""
    vs = tuple(video.shape)
    if len(vs) != 4 or vs[0] != VIDEO_CHANNELS:
        raise SampleError(
            key, "video.npy", f"shape {list(vs)}, expected [{VIDEO_CHANNELS}, T, H, W]", "shape"
        )
    _, t, h, w = vs
    if t < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise SampleError(
            key,
            "video.npy",
            f"latent size T={t} H={h} W={w}: need T >= 1 and even H, W >= 2 (the DiT patchifies 1x2x2)",
            "odd size",
        )
    aus = tuple(audio.shape)
    if len(aus) != 2 or aus[1] != AUDIO_CHANNELS:
        raise SampleError(key, "audio.npy", f"shape {list(aus)}, expected [A, {AUDIO_CHANNELS}]", "shape")
    if aus[0] != expected_audio_len(t):
        raise SampleError(
            key,
            "audio.npy",
            f"length {aus[0]} != 4*(T-1)+1 = {expected_audio_len(t)} for T={t} video latent frames",
            "length",
        )
    ts = tuple(text.shape)
    if len(ts) != 2 or (text_dim is not None and ts[1] != text_dim):
        width = "D" if text_dim is None else text_dim
        raise SampleError(key, "text.npy", f"shape {list(ts)}, expected [L, {width}]", "shape")
    if not 1 <= ts[0] <= MAX_TEXT_TOKENS:
        raise SampleError(key, "text.npy", f"{ts[0]} tokens, expected 1..{MAX_TEXT_TOKENS}", "length")
    if image is not None and tuple(image.shape) != (VIDEO_CHANNELS, 1, h, w):
        raise SampleError(
            key,
            "image.npy",
            f"shape {list(image.shape)}, expected [{VIDEO_CHANNELS}, 1, {h}, {w}] "
            "(the clean first latent frame of this clip)",
            "shape",
        )
    if lowres is not None and (lowres.ndim != 4 or tuple(lowres.shape[:2]) != (VIDEO_CHANNELS, t)):
        raise SampleError(
            key, "lowres.npy", f"shape {list(lowres.shape)}, expected [{VIDEO_CHANNELS}, {t}, h, w]", "shape"
        )


def _text_member(raw: Mapping, key: str, name: str) -> str:
    data = raw[name]
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(key, name, f"not UTF-8 ({e})", "not utf-8") from None


def validate_sample(raw: Mapping, text_dim: int) -> Clip:
    """Decode the raw bytes of one webdataset sample into a Clip, checking every convention.

    Raises SampleError naming the key, the member and the problem: missing members, unreadable or pickled
    .npy, non-float dtypes, NaN/Inf, wrong shapes (channels, A = 4(T-1)+1, even H/W, 1 <= L <= 640,
    width text_dim), image/lowres that do not match the video, meta.json that is not a JSON object.
    """
    key = raw.get("__key__")
    if not key:
        raise SampleError("?", "__key__", "sample without a key", "missing")
    key = str(key)
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None:
            hint = ""
            if name == "text.npy" and raw.get("text.txt") is not None:
                hint = " (the sample has text.txt only: encode it to T5-Gemma features first)"
            raise SampleError(
                key, name, f"missing{hint}; a sample needs {', '.join(REQUIRED_FIELDS)}", "missing"
            )
    video = decode_npy(raw["video.npy"], key, "video.npy")
    audio = decode_npy(raw["audio.npy"], key, "audio.npy")
    text = decode_npy(raw["text.npy"], key, "text.npy")
    image = decode_npy(raw["image.npy"], key, "image.npy") if raw.get("image.npy") is not None else None
    lowres = decode_npy(raw["lowres.npy"], key, "lowres.npy") if raw.get("lowres.npy") is not None else None
    check_clip_arrays(key, video, audio, text, text_dim, image, lowres)
    try:
        meta = json.loads(_text_member(raw, key, "meta.json"))
    except json.JSONDecodeError as e:
        raise SampleError(key, "meta.json", f"not valid JSON ({e})", "invalid json") from None
    if not isinstance(meta, dict):
        raise SampleError(
            key, "meta.json", f"a JSON {type(meta).__name__}, expected an object", "not an object"
        )
    caption = _text_member(raw, key, "caption.txt")

    def tensor(a: np.ndarray | None) -> Tensor | None:
        # always copy: frombuffer arrays are read-only views of the tar bytes
        return None if a is None else torch.from_numpy(np.array(a, dtype=np.float32, order="C"))

    return Clip(
        key=key,
        video=tensor(video),
        audio=tensor(audio),
        text=tensor(text),
        image=tensor(image),
        caption=caption,
        meta=meta,
        lowres=tensor(lowres),
    )
