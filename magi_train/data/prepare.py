"""Real-data preparation: cut videos into 25 fps clips, encode them with the released codecs, write shards.

`python -m magi_train.data.prepare --input VIDEOS_OR_MANIFEST --out SHARDS --video-vae DIR --audio-vae DIR
--text-encoder DIR` (see `--help` and docs/data.md). The codecs are the ones the daVinci-MagiHuman release
uses (spec released-model.md §4.2, §4.7, §6): Wan2.2 VAE (posterior mean, normalised latents), Stable Audio
Open VAE run at the effective 51.2 kHz (25 latents per second, one per pixel frame) and T5-Gemma features.

Work is split into *units* of `videos_per_shard` consecutive inputs (in sorted input order); unit u becomes
shard `<prefix>-<u:06d>.tar` plus a done marker `<prefix>-<u:06d>.done.json` holding what was written and
skipped. Slurm array task i of n takes the units with u % n == i; a pool of worker processes takes units
within a task. A re-run skips units whose marker exists, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magi_train.codecs.audio_vae import (
    EFFECTIVE_SAMPLE_RATE,
    HOP,
    LATENTS_PER_SECOND,
    AudioTooShortError,
    load_audio,
)
from magi_train.codecs.video_vae import (
    SPATIAL_STRIDE,
    center_crop_resize,
    frames_for_seconds,
    latent_frames,
    pixel_frames,
)
from magi_train.data.index import index_path
from magi_train.data.schema import Clip, count_tokens
from magi_train.data.writer import write_shard
from magi_train.utils.fileio import atomic_write, remove_temps

log = logging.getLogger(__name__)

FPS = LATENTS_PER_SECOND  # 25: the release's frame rate, one audio latent per pixel frame (spec §4.2)
# 448x256 is the release's base-stage size (spec §4.2: 26*8*14 = 2912 video tokens for 4 s); its transpose
# and a square of similar area (352x352) cover portrait and square sources.
DEFAULT_BUCKETS = "448x256,256x448,352x352"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
BUCKET_MULTIPLE = 2 * SPATIAL_STRIDE  # latent H, W must be even (the DiT's 2x2 patch) at the VAE's 16x stride
_TIME_EPS = 1e-4  # seconds; container timestamps are rationals, this absorbs their float rounding


# -- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input video and its text: caption, optional dialogue transcript, language and split."""

    path: str
    caption: str | None = None
    transcript: str | None = None
    language: str | None = None
    split: str | None = None


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _source(row: dict, base: Path, where: str) -> Source:
    path = _text_or_none(row.get("path"))
    if path is None:
        raise ValueError(f"{where}: no 'path' (every manifest row needs the video file's path)")
    if not Path(path).is_absolute():
        path = str(base / path)
    transcript = row.get("transcript", row.get("dialogue"))
    return Source(
        path=path,
        caption=_text_or_none(row.get("caption")),
        transcript=_text_or_none(transcript),
        language=_text_or_none(row.get("language")),
        split=_text_or_none(row.get("split")),
    )


def read_manifest(path: str | Path) -> list[Source]:
    """Rows of a `.jsonl` or `.csv` manifest: path (relative to the manifest's folder), caption, and optional
    transcript (or dialogue), language, split."""
    path = Path(path)
    base = path.parent
    sources: list[Source] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"manifest {path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"manifest {path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                    )
                sources.append(_source(row, base, f"manifest {path}:{lineno}"))
    elif path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(
                    f"manifest {path}: the CSV header must name a 'path' column (and 'caption'; optional "
                    f"'transcript', 'language', 'split'), got {reader.fieldnames}"
                )
            for lineno, row in enumerate(reader, 2):
                sources.append(_source(row, base, f"manifest {path}:{lineno}"))
    else:
        raise ValueError(f"manifest {path}: expected a .jsonl or .csv file (or a folder of videos)")
    if not sources:
        raise ValueError(f"manifest {path} lists no video")
    return sources


def scan_folder(folder: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Source]:
    """Videos under `folder` (recursive, sorted), captioned by a sidecar `<name>.txt`, or `<name>.json` with
    caption / transcript / language / split."""
    folder = Path(folder)
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    sources = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.suffix.lower() in exts):
        row: dict[str, Any] = {"path": str(p)}
        side_json, side_txt = p.with_suffix(".json"), p.with_suffix(".txt")
        if side_json.is_file():
            try:
                extra = json.loads(side_json.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"caption file {side_json}: not valid JSON ({e})") from None
            if not isinstance(extra, dict):
                raise ValueError(f"caption file {side_json}: expected a JSON object")
            row.update({k: v for k, v in extra.items() if k != "path"})
        if "caption" not in row and side_txt.is_file():
            row["caption"] = side_txt.read_text(encoding="utf-8")
        sources.append(_source(row, folder, str(p)))
    if not sources:
        raise ValueError(f"input folder {folder} holds no video file ({', '.join(sorted(exts))})")
    return sources


def list_sources(spec: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Source]:
    """A folder of videos or a .jsonl/.csv manifest -> the ordered input list (its order fixes the shards)."""
    path = Path(spec)
    if path.is_dir():
        return scan_folder(path, extensions)
    if path.is_file():
        return read_manifest(path)
    raise ValueError(f"--input {str(spec)!r}: no such folder or manifest file")


def build_prompt(src: Source) -> str:
    """The text encoded for a clip: the caption, plus the transcript as a `Dialogue:` line in the release's
    enhanced-prompt layout (`<speaker, language>: "..."`, spec §4.3) unless the caption has one already."""
    caption = src.caption or ""
    if not src.transcript or "dialogue:" in caption.lower():
        return caption
    speaker = f"<Speaker, {src.language}>" if src.language else "<Speaker>"
    return f'{caption}\n\nDialogue:\n{speaker}: "{src.transcript}"'


# -- buckets and clip timing -------------------------------------------------------------------------------------


def parse_buckets(spec: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """`"448x256,256x448"` (WIDTHxHEIGHT) or [(w, h), ...] -> validated (width, height) pixel buckets."""
    if isinstance(spec, str):
        try:
            items = [tuple(int(x) for x in s.lower().split("x")) for s in spec.split(",") if s.strip()]
        except ValueError:
            items = []
        if not items or any(len(b) != 2 for b in items):
            raise ValueError(
                f"buckets {spec!r}: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], e.g. 448x256,256x448"
            )
    else:
        items = [tuple(int(x) for x in b) for b in spec]
    for w, h in items:
        if w <= 0 or h <= 0 or w % BUCKET_MULTIPLE or h % BUCKET_MULTIPLE:
            raise ValueError(
                f"bucket {w}x{h}: width and height must be positive multiples of {BUCKET_MULTIPLE} (the VAE's "
                f"{SPATIAL_STRIDE}x stride times the DiT's 2x2 patch), e.g. 448x256"
            )
    if len(set(items)) != len(items):
        raise ValueError(f"buckets {spec!r}: listed twice")
    return items  # type: ignore[return-value]


def nearest_bucket(width: float, height: float, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to width/height (in log ratio; ties: the first listed)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"source size {width}x{height}: must be positive")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def clip_frames(seconds: float) -> int:
    """Pixel frames per clip: `seconds*25 + 1`, rounded down to 1 + 4k so the VAE's 4x time stride gives
    A = 4(T-1)+1 audio latents for T video latents (4 s -> 101; 5 s -> 125, as the release decodes 126)."""
    return pixel_frames(latent_frames(frames_for_seconds(seconds, FPS)))


def frames_at_fps(
    frames: Iterable[tuple[float | None, Any]], fps: float, last_duration: float
) -> Iterator[Any]:
    """Resample a timed frame stream to a constant rate: for each output time g/fps, the source frame on
    screen then (the latest one starting at or before it). Times are made relative to the first frame; a
    missing time continues from the previous one by `last_duration`. The last frame lasts `last_duration`."""
    g, prev, prev_t, t0 = 0, None, 0.0, None
    for t, item in frames:
        if t is None:  # relative already
            t = prev_t + last_duration if prev is not None else 0.0
        else:
            t0 = t if t0 is None else t0
            t = t - t0
        while prev is not None and g / fps < t - _TIME_EPS:
            yield prev
            g += 1
        prev, prev_t = item, t
    if prev is not None:
        while g / fps < prev_t + last_duration - _TIME_EPS:
            yield prev
            g += 1


# -- per-video processing ----------------------------------------------------------------------------------------


class Skip(Exception):
    """An input that yields no clip: `reason` is a short stable label counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Settings:
    """Everything a worker needs; plain values so that it pickles to spawned processes."""

    input: str
    out: str
    video_vae: str
    audio_vae: str
    text_encoder: str
    seconds: float = 4.0
    buckets: list[tuple[int, int]] = field(default_factory=lambda: parse_buckets(DEFAULT_BUCKETS))
    max_clips_per_video: int = 0  # 0: every whole clip that fits
    videos_per_shard: int = 16
    prefix: str = "clips"
    split: str = "train"
    task_index: int = 0
    num_tasks: int = 1
    workers: int = 1
    device: str = "cpu"
    vae_dtype: str = "float32"
    text_dtype: str = "bfloat16"
    audio_posterior: str = "sample"  # the release samples the audio posterior (spec §4.7); or "mean"
    video_dtype: str = "float16"
    threads: int = 0  # torch CPU threads per worker; 0: cores / workers
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS

    @property
    def frames(self) -> int:
        return clip_frames(self.seconds)

    def check(self) -> None:
        """Raise ValueError on settings that cannot work, naming the flag."""
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"--task-index {self.task_index} must be in [0, --num-tasks={self.num_tasks})")
        for name in ("videos_per_shard", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_clips_per_video < 0:
            raise ValueError(f"--max-clips-per-video must be >= 0 (0 = all), got {self.max_clips_per_video}")
        try:
            frames = self.frames
        except ValueError as err:
            raise ValueError(f"--seconds {self.seconds}: {err} (e.g. 4 -> 101 frames)") from None
        if frames < 5:  # one latent frame would be a still image
            raise ValueError(
                f"--seconds {self.seconds}: a clip needs at least 0.16 s (5 frames, 2 latent frames)"
            )
        if not self.prefix or not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ValueError(f"--prefix {self.prefix!r}: letters, digits, '_' and '-' only")
        if self.audio_posterior not in ("sample", "mean"):
            raise ValueError(f"--audio-posterior {self.audio_posterior!r}: 'sample' or 'mean'")
        for name in ("vae_dtype", "text_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: one of {sorted(_DTYPES)}"
                )
        if self.video_dtype not in ("float16", "float32"):
            raise ValueError(f"--video-dtype {self.video_dtype!r}: float16 or float32")
        parse_buckets(self.buckets)
        for name in ("video_vae", "audio_vae", "text_encoder"):
            path = Path(getattr(self, name))
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"--{name.replace('_', '-')} {str(path)!r}: not a local model folder with config.json "
                    "(codecs are loaded from local folders only, never downloaded)"
                )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Codecs:
    """The three frozen encoders, loaded on first use (a resumed run with nothing left loads none)."""

    def __init__(self, settings: Settings, device: str | None = None):
        self.settings, self.device = settings, device or settings.device
        self._loaded: tuple | None = None

    def get(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            from magi_train.codecs import AudioVAE, TextEncoder, VideoVAE

            s, dev = self.settings, self.device
            vae_dtype = _DTYPES[s.vae_dtype]
            self._loaded = (
                VideoVAE.from_pretrained(s.video_vae, dtype=vae_dtype, device=dev),
                AudioVAE.from_pretrained(s.audio_vae, dtype=vae_dtype, device=dev),
                TextEncoder.from_pretrained(s.text_encoder, dtype=_DTYPES[s.text_dtype], device=dev),
            )
            if self._loaded[1].hop != HOP:
                raise ValueError(
                    f"audio VAE {s.audio_vae}: hop {self._loaded[1].hop}, expected {HOP} "
                    "(25 latents per second at 51.2 kHz, spec §6.3)"
                )
        return self._loaded


def _open(path: str) -> Any:
    import av

    if not Path(path).is_file():
        raise Skip("not found", f"no file {path}")
    try:
        return av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise Skip("unreadable", f"{type(e).__name__}: {e}") from None


def _display_size(stream: Any) -> tuple[int, int]:
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    sar = stream.sample_aspect_ratio or cc.sample_aspect_ratio
    if sar and float(sar) > 0 and float(sar) != 1.0:  # anamorphic: stretch to the displayed width
        width = int(round(width * float(sar)))
    if width <= 0 or height <= 0:
        raise Skip("unreadable", f"video stream has no frame size ({width}x{height})")
    return width, height


def _key(index: int, path: str, clip: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:48] or "video"
    return f"{index:08d}-{stem}-{clip:03d}"


def _video_clips(
    container: Any, bucket: tuple[int, int], frames: int, max_clips: int, display: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Consecutive clips of `frames` frames at 25 fps, centre-cropped and resized to the bucket ->
    uint8 [frames, H, W, 3]; a trailing part shorter than a clip is dropped."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    last = 1.0 / float(rate) if rate else 1.0 / FPS
    width, height = bucket
    stored = (int(stream.codec_context.width), int(stream.codec_context.height))
    resize_kwargs = {} if display == stored else {"width": display[0], "height": display[1]}
    timed = ((f.time, f) for f in container.decode(stream))
    buf: list[np.ndarray] = []
    done, cached, cached_img = 0, None, None
    for frame in frames_at_fps(timed, FPS, last):
        if frame is not cached:  # a source frame shown in several output slots is converted once
            cached = frame
            cached_img = center_crop_resize(frame.to_image(**resize_kwargs), width, height)
        buf.append(cached_img)
        if len(buf) == frames:
            yield np.stack(buf)
            buf, done = [], done + 1
            if max_clips and done >= max_clips:
                return


def _load_clip_audio(path: str, clips: int, frames: int) -> tuple[torch.Tensor, int]:
    """Mono-to-stereo 51.2 kHz audio for the first `clips` clips (fewer when the track is shorter)."""
    seconds = frames / FPS  # one clip spans frames/25 s: A = frames latents of HOP samples each

    def load(k: int) -> torch.Tensor:
        return load_audio(path, k * seconds, EFFECTIVE_SAMPLE_RATE)

    try:
        return load(clips), clips
    except ValueError as first:
        lo, hi, best = 1, clips - 1, None  # binary search for the most clips the track covers
        while lo <= hi:
            mid = (lo + hi) // 2
            try:
                best = (load(mid), mid)
                lo = mid + 1
            except ValueError:
                hi = mid - 1
        if best is None:
            reason = "audio too short" if isinstance(first, AudioTooShortError) else "unreadable audio"
            raise Skip(reason, str(first)) from None
        return best


@dataclass
class VideoResult:
    """What one input gave: its clips, or a skip with its reason; dropped clips by reason."""

    clips: list[Clip] = field(default_factory=list)
    skip: Skip | None = None
    dropped: Counter = field(default_factory=Counter)


def process_source(index: int, src: Source, s: Settings, codecs: Codecs) -> VideoResult:
    """Cut, resize and encode one video. Input problems become a counted Skip, never an exception.

    Video clips are encoded as they are decoded (only latents are kept, so long videos fit in memory); the
    audio track is checked once the first clip is complete and read for all clips at the end.
    """
    import av

    result = VideoResult()
    frames = s.frames
    latents: list[torch.Tensor] = []
    try:
        if not src.caption:
            raise Skip("no caption", "the manifest row or sidecar file gives no caption")
        with contextlib.closing(_open(src.path)) as container:
            if not container.streams.video:
                raise Skip("no video stream")
            if not container.streams.audio:
                raise Skip("no audio stream", "clips are trained with their sound: give videos with audio")
            stream = container.streams.video[0]
            display = _display_size(stream)
            bucket = nearest_bucket(*display, s.buckets)
            src_fps = float(stream.average_rate or stream.guessed_rate or 0)
            video_vae, audio_vae, text_encoder = codecs.get()  # outside the decode guard below
            clips = _video_clips(container, bucket, frames, s.max_clips_per_video, display)
            while True:
                try:
                    pixels = next(clips)  # uint8 [frames, H, W, 3]
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError) as e:  # a corrupt tail keeps the clips before it
                    if not latents:
                        raise Skip("unreadable", f"decoding failed: {type(e).__name__}: {e}") from None
                    result.dropped["decode error"] += 1
                    log.warning("%s: decoding stopped after %d clip(s): %s", src.path, len(latents), e)
                    break
                if not latents:  # fail fast on a broken track before encoding the whole video
                    _load_clip_audio(src.path, 1, frames)
                x = torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float().div_(127.5).sub_(1.0)
                latents.append(video_vae.encode(x)[0].cpu())  # [48, T, H/16, W/16]
        if not latents:
            raise Skip("too short", f"less than one {frames}-frame clip ({frames / FPS:.2f} s) of video")
        wave, usable = _load_clip_audio(src.path, len(latents), frames)
        if usable < len(latents):
            result.dropped["audio shorter than video"] += len(latents) - usable
            latents = latents[:usable]
    except Skip as skip:
        result.skip = skip
        return result

    prompt = build_prompt(src)
    text = text_encoder.encode([prompt])[0].float().cpu()  # [L, 3584], L <= 640 real tokens
    span = frames * HOP
    width, height = bucket
    for k, video in enumerate(latents):
        key = _key(index, src.path, k)
        gen = None
        if s.audio_posterior == "sample":  # seeded by the key: a re-run writes the same latents
            gen = torch.Generator(device=audio_vae.device).manual_seed(zlib.crc32(key.encode()))
        audio = audio_vae.encode(
            wave[None, :, k * span : (k + 1) * span], sample=s.audio_posterior == "sample", generator=gen
        )[0].cpu()  # [A, 64], A = frames
        meta = {
            "fps": FPS,
            "seconds": (frames - 1) / FPS,
            "source": src.path,
            "start": k * frames / FPS,  # seconds from the first video frame
            "language": src.language,
            "pixel_size": [height, width],
            "split": src.split or s.split,
            "bucket": f"{width}x{height}",
            "source_size": [display[1], display[0]],
            "source_fps": src_fps,
        }
        if src.transcript:
            meta["transcript"] = src.transcript
        result.clips.append(Clip(key=key, video=video, audio=audio, text=text, caption=prompt, meta=meta))
    return result


# -- units, markers, the run -------------------------------------------------------------------------------------


def num_units(num_sources: int, videos_per_shard: int) -> int:
    """Units (= shards) for the input list: consecutive groups of videos_per_shard inputs."""
    return -(-num_sources // videos_per_shard)


def task_units(total_units: int, task_index: int, num_tasks: int) -> list[int]:
    """Units of one Slurm array task: u % num_tasks == task_index (the tasks partition the units)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index {task_index} must be in [0, num_tasks={num_tasks})")
    return list(range(task_index, total_units, num_tasks))


def _shard_name(prefix: str, unit: int) -> str:
    return f"{prefix}-{unit:06d}.tar"


def _marker_path(out: Path, prefix: str, unit: int) -> Path:
    return out / f"{prefix}-{unit:06d}.done.json"


def process_unit(
    unit: int,
    items: list[tuple[int, Source]],
    s: Settings,
    codecs: Codecs,
    on_video: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Encode one unit's videos into one shard (atomic), then write its done marker; returns the marker."""
    start = time.monotonic()
    out = Path(s.out)
    final = out / _shard_name(s.prefix, unit)
    remove_temps(final)  # leftovers of an interrupted attempt (this task alone owns the unit)
    remove_temps(index_path(final))
    skipped: list[dict[str, str]] = []
    dropped: Counter = Counter()
    buckets: Counter = Counter()
    tokens: list[int] = []

    def clips() -> Iterator[Clip]:
        for index, src in items:
            res = process_source(index, src, s, codecs)
            if res.skip is not None:
                skipped.append({"path": src.path, "reason": res.skip.reason, "detail": res.skip.detail})
                log.info("skipped %s: %s", src.path, res.skip)
            dropped.update(res.dropped)
            for clip in res.clips:
                buckets[clip.meta["bucket"]] += 1
                tokens.append(count_tokens(tuple(clip.video.shape), clip.audio.shape[0], clip.text.shape[0]))
            yield from res.clips
            if on_video is not None:
                on_video()

    written = write_shard(final, clips(), video_dtype=np.dtype(s.video_dtype))
    if not written:  # no clip: no shard (and none left over from an earlier run with other inputs)
        final.unlink(missing_ok=True)
        index_path(final).unlink(missing_ok=True)
    marker = {
        "unit": unit,
        "shard": final.name if written else None,
        "inputs": [src.path for _, src in items],
        "videos": len(items),
        "clips": len(tokens),
        "skipped": skipped,
        "dropped_clips": dict(dropped),
        "buckets": dict(buckets),
        "tokens": {"min": min(tokens), "max": max(tokens), "sum": sum(tokens)} if tokens else None,
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    atomic_write(_marker_path(out, s.prefix, unit), json.dumps(marker, indent=1, sort_keys=True))
    return marker


_WORKER: dict[str, Any] = {}


def _init_worker(s: Settings, counter: Any) -> None:
    with counter.get_lock():
        rank = counter.value
        counter.value += 1
    device = s.device
    if device.startswith("cuda") and ":" not in device and torch.cuda.device_count() > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"  # spread the pool over the node's GPUs
    torch.set_num_threads(s.threads or max(1, (os.cpu_count() or 1) // s.workers))
    logging.basicConfig(level=logging.WARNING)
    _WORKER["codecs"] = Codecs(s, device)


def _worker_unit(unit: int, items: list[tuple[int, Source]], s: Settings) -> dict[str, Any]:
    return process_unit(unit, items, s, _WORKER["codecs"])


def _check_run_config(out: Path, s: Settings, sources: list[Source]) -> None:
    """Pin what fixes shard contents in <out>/<prefix>.prepare.json; a re-run with other values is refused."""
    digest = hashlib.sha256("\n".join(src.path for src in sources).encode()).hexdigest()
    pinned = {
        "seconds": s.seconds,
        "frames": s.frames,
        "buckets": [f"{w}x{h}" for w, h in s.buckets],
        "videos_per_shard": s.videos_per_shard,
        "max_clips_per_video": s.max_clips_per_video,
        "prefix": s.prefix,
        "num_inputs": len(sources),
        "inputs_sha256": digest,
    }
    path = out / f"{s.prefix}.prepare.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k}: {old.get(k)} -> {v}" for k, v in sorted(pinned.items()) if old.get(k) != v]
        if changed:
            raise ValueError(
                f"{out} was prepared with other settings ({'; '.join(changed)}): finished shards would not "
                "match. Use another --out or --prefix, or restore the settings"
            )
    else:
        atomic_write(path, json.dumps(pinned, indent=1, sort_keys=True))


def _summarise(
    markers: list[dict], s: Settings, written_now: int, elapsed: float, out: Path
) -> dict[str, Any]:
    skipped = Counter(item["reason"] for m in markers for item in m["skipped"])
    dropped: Counter = Counter()
    buckets: Counter = Counter()
    for m in markers:
        dropped.update(m["dropped_clips"])
        buckets.update(m["buckets"])
    toks = [m["tokens"] for m in markers if m["tokens"]]
    clips = sum(m["clips"] for m in markers)
    videos = sum(m["videos"] for m in markers)
    return {
        "task_index": s.task_index,
        "num_tasks": s.num_tasks,
        "out": str(out),
        "shards": sorted(m["shard"] for m in markers if m["shard"]),
        "units": len(markers),
        "units_done_now": written_now,
        "units_already_done": len(markers) - written_now,
        "videos": videos,
        "videos_used": videos - sum(skipped.values()),
        "videos_skipped": sum(skipped.values()),
        "clips_written": clips,
        "skipped": dict(sorted(skipped.items())),
        "skipped_files": [dict(item) for m in markers for item in m["skipped"]],
        "dropped_clips": dict(sorted(dropped.items())),
        "buckets": dict(sorted(buckets.items())),
        "tokens_per_clip": {
            "min": min(t["min"] for t in toks),
            "mean": sum(t["sum"] for t in toks) / clips,
            "max": max(t["max"] for t in toks),
        }
        if toks
        else None,
        "frames_per_clip": s.frames,
        "elapsed_s": round(elapsed, 3),
    }


def run_prepare(s: Settings, progress: bool = True) -> dict[str, Any]:
    """Prepare this task's units (skipping finished ones), write and return the task's report."""
    from tqdm.auto import tqdm

    s.check()
    start = time.monotonic()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = list_sources(s.input, s.extensions)
    _check_run_config(out, s, sources)
    total = num_units(len(sources), s.videos_per_shard)
    mine = task_units(total, s.task_index, s.num_tasks)
    units = {u: list(enumerate(sources))[u * s.videos_per_shard : (u + 1) * s.videos_per_shard] for u in mine}

    markers: dict[int, dict] = {}
    todo: list[int] = []
    for u in mine:
        mp_ = _marker_path(out, s.prefix, u)
        if mp_.is_file():
            marker = json.loads(mp_.read_text(encoding="utf-8"))
            if marker.get("inputs") != [src.path for _, src in units[u]]:
                raise ValueError(f"{mp_}: written for other inputs; the input list changed (use a new --out)")
            if marker.get("shard") and not (out / marker["shard"]).is_file():
                todo.append(u)  # shard deleted by hand: redo it
            else:
                markers[u] = marker
        else:
            todo.append(u)

    log.info(
        "task %d/%d: %d of %d unit(s), %d already done",
        s.task_index,
        s.num_tasks,
        len(mine),
        total,
        len(mine) - len(todo),
    )
    bar = tqdm(
        total=sum(len(units[u]) for u in todo),
        unit="video",
        desc=f"prepare task {s.task_index}/{s.num_tasks}",
        disable=not progress,
        mininterval=1.0,
    )
    with bar:
        if s.workers == 1 or len(todo) <= 1:
            codecs = Codecs(s)
            for u in todo:
                markers[u] = process_unit(u, units[u], s, codecs, on_video=lambda: bar.update(1))
                bar.set_postfix(clips=sum(m["clips"] for m in markers.values()))
        else:
            ctx = mp.get_context("spawn")  # CUDA-safe, and no forked torch thread pools
            counter = ctx.Value("i", 0)
            pool = ProcessPoolExecutor(
                min(s.workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(s, counter)
            )
            try:
                futures = {pool.submit(_worker_unit, u, units[u], s): u for u in todo}
                for fut in as_completed(futures):
                    u = futures[fut]
                    markers[u] = fut.result()  # re-raises a worker's error here
                    bar.update(len(units[u]))
                    bar.set_postfix(clips=sum(m["clips"] for m in markers.values()))
            except BaseException:  # stop queued units now; finished ones keep their markers for a re-run
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    report = _summarise([markers[u] for u in mine], s, len(todo), time.monotonic() - start, out)
    report["settings"] = {k: v for k, v in asdict(s).items() if k != "extensions"}
    atomic_write(
        out / f"{s.prefix}.report-task{s.task_index:04d}-of-{s.num_tasks:04d}.json",
        json.dumps(report, indent=1, sort_keys=True),
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of a task report."""
    lines = [
        f"prepare task {report['task_index']}/{report['num_tasks']}: {report['units']} shard unit(s) "
        f"({report['units_done_now']} done now, {report['units_already_done']} already done), "
        f"{len(report['shards'])} shard(s) in {report['out']}",
        f"videos: {report['videos']} ({report['videos_used']} used, {report['videos_skipped']} skipped)",
        f"clips written: {report['clips_written']} of {report['frames_per_clip']} frames"
        + (
            f"; by bucket: {', '.join(f'{b}: {n}' for b, n in report['buckets'].items())}"
            if report["buckets"]
            else ""
        ),
    ]
    if report["tokens_per_clip"]:
        t = report["tokens_per_clip"]
        lines.append(f"tokens per clip: min {t['min']}, mean {t['mean']:.0f}, max {t['max']}")
    if report["skipped"]:
        lines.append("skipped videos: " + ", ".join(f"{r}: {n}" for r, n in report["skipped"].items()))
        for item in report["skipped_files"][:10]:
            lines.append(
                f"  {item['path']}: {item['reason']}" + (f" ({item['detail']})" if item["detail"] else "")
            )
        if len(report["skipped_files"]) > 10:
            lines.append(f"  ... and {len(report['skipped_files']) - 10} more (see the report json)")
    if report["dropped_clips"]:
        lines.append("dropped clips: " + ", ".join(f"{r}: {n}" for r, n in report["dropped_clips"].items()))
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------------------------------


def _slurm_task() -> tuple[int, int]:
    """(task index, task count) of a Slurm job array, 0-based even for --array=1-N; (0, 1) outside one."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    try:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    except ValueError:
        raise ValueError(
            "SLURM_ARRAY_TASK_ID / _MIN / _COUNT are not integers: pass --task-index/--num-tasks"
        ) from None
    return index, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.data.prepare",
        description="Cut videos into 25 fps clips, encode video (Wan2.2 VAE), audio (Stable Audio VAE at "
        "51.2 kHz) and captions (T5-Gemma) and write webdataset shards of magi_train's format.",
    )
    p.add_argument("--input", required=True, help="folder of videos (captions in <name>.txt / <name>.json) or a "
                   ".jsonl/.csv manifest with path, caption[, transcript, language, split]")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder for shards, done markers and reports")
    p.add_argument("--video-vae", required=True, help="local diffusers AutoencoderKLWan folder (Wan2.2 VAE)")
    p.add_argument("--audio-vae", required=True, help="local diffusers AutoencoderOobleck folder")
    p.add_argument("--text-encoder", required=True, help="local T5-Gemma folder with its tokenizer")
    p.add_argument(
        "--seconds", type=float, default=4.0, help="clip length; frames = seconds*25+1 (default 4)"
    )
    p.add_argument(
        "--buckets", default=DEFAULT_BUCKETS, help=f"WxH pixel buckets (default {DEFAULT_BUCKETS})"
    )
    p.add_argument("--max-clips-per-video", type=int, default=0, help="0 = every whole clip (default)")
    p.add_argument("--videos-per-shard", type=int, default=16)
    p.add_argument("--prefix", default="clips", help="shard name prefix (default clips)")
    p.add_argument("--split", default="train", help="meta.json split when the manifest gives none")
    index, count = _slurm_task()
    p.add_argument(
        "--task-index", type=int, default=index, help="default: $SLURM_ARRAY_TASK_ID (- _MIN) or 0"
    )
    p.add_argument("--num-tasks", type=int, default=count, help="default: $SLURM_ARRAY_TASK_COUNT or 1")
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own codecs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--text-dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--audio-posterior", default="sample", choices=["sample", "mean"])
    p.add_argument("--video-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: cores / workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = Settings(
        input=args.input,
        out=args.out,
        video_vae=args.video_vae,
        audio_vae=args.audio_vae,
        text_encoder=args.text_encoder,
        seconds=args.seconds,
        buckets=parse_buckets(args.buckets),
        max_clips_per_video=args.max_clips_per_video,
        videos_per_shard=args.videos_per_shard,
        prefix=args.prefix,
        split=args.split,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
        workers=args.workers,
        device=args.device,
        vae_dtype=args.vae_dtype,
        text_dtype=args.text_dtype,
        audio_posterior=args.audio_posterior,
        video_dtype=args.video_dtype,
        threads=args.threads,
    )
    if s.threads and s.workers == 1:
        torch.set_num_threads(s.threads)
    report = run_prepare(s, progress=not args.no_progress)
    print(format_report(report))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad flags or inputs: one clear line, no traceback
        sys.exit(f"error: {err}")
