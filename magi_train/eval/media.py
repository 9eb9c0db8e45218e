"""Reading clips for scoring (the audio track as mono float at a given rate, frames at a given fps) and the first
frame of a benchmark clip (its i2v reference); PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _check(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"clip {str(path)!r} not found")
    return path


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream of a media file as mono float32 in [-1, 1] at `sample_rate` (empty if none).

    Decoded and resampled with PyAV's swresample to s16 mono, as whisper/ffmpeg front ends do.
    """
    import av

    path = _check(path)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return np.zeros(0, dtype=np.float32)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.error.FFmpegError as err:
        raise ValueError(f"could not decode audio from {str(path)!r}: {err}") from err
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def read_frames(
    path: str | Path, fps: float | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """RGB frames `[F, H, W, 3]` uint8 of a clip and their rate.

    With `fps`, frames are taken at that rate by presentation time (the frame shown at t = k / fps, k = 0, 1,
    ...), as VideoScore2 samples 2 fps; `max_frames` then keeps evenly spaced ones. Without it, every frame.
    """
    import av

    path = _check(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"clip {str(path)!r} has no video stream")
            stream = container.streams.video[0]
            native = float(stream.average_rate or stream.guessed_rate or 25)
            frames, times = [], []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else len(times) / native)
    except av.error.FFmpegError as err:
        raise ValueError(f"could not decode video from {str(path)!r}: {err}") from err
    if not frames:
        raise ValueError(f"clip {str(path)!r} has no decodable frames")
    video = np.stack(frames)
    rate = native
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        t = np.asarray(times) - times[0]
        duration = t[-1] + 1.0 / native
        wanted = np.arange(0.0, duration - 1e-9, 1.0 / fps)
        index = np.clip(np.searchsorted(t, wanted + 1e-6, side="right") - 1, 0, len(t) - 1)
        video, rate = video[index], float(fps)
    if max_frames is not None and len(video) > max_frames:
        keep = np.linspace(0, len(video) - 1, max_frames).round().astype(int)
        rate = rate * (max_frames - 1) / max(len(video) - 1, 1)
        video = video[keep]
    return video, rate


def first_frame(path: str | Path) -> np.ndarray:
    """The first decodable frame of a video file as RGB `[H, W, 3]` uint8 (decodes nothing after it)."""
    import av

    path = _check(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"clip {str(path)!r} has no video stream")
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as err:
        raise ValueError(f"could not decode video from {str(path)!r}: {err}") from err
    raise ValueError(f"clip {str(path)!r} has no decodable frames")


def sample_like_training(
    path: str | Path, fps: float = 2.0, max_frames: int = 10, max_pixels: int | None = 960 * 720
) -> tuple[np.ndarray, float]:
    """Frames of a clip chosen and sized as VideoScore2's training data was (LLaMA-Factory's video plugin, which
    its SFT config drives with `video_fps: 2.0`, `video_maxlen: 10`, `video_max_pixels: 691200 # 960*720`):

    - n = min(total frames, `max_frames`, max(1, floor(duration * `fps`))) frames at `linspace(0, total - 1, n)`
      truncated to integers (`mm_plugin._get_video_sample_indices`);
    - a frame larger than `max_pixels` is scaled by sqrt(max_pixels / (w * h)), sides truncated, PIL's default
      filter (`_preprocess_image`).

    Returns the frames `[n, H, W, 3]` uint8 and their effective rate n / duration (what LLaMA-Factory passes to
    Qwen2.5-VL for its temporal position ids).
    """
    import math

    from PIL import Image

    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be > 0 and max_frames >= 1, got {fps} / {max_frames}")
    video, native = read_frames(path)
    total = len(video)
    duration = total / native
    n = min(total, max_frames, max(1, math.floor(duration * fps)))
    index = np.linspace(0, total - 1, n).astype(np.int32)
    frames = video[index]
    h, w = frames.shape[1:3]
    if max_pixels is not None and w * h > max_pixels:
        factor = math.sqrt(max_pixels / (w * h))
        size = (int(w * factor), int(h * factor))
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size)) for f in frames])
    return frames, n / duration
