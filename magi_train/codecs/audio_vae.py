"""Stable-Audio-Open VAE (diffusers Oobleck) and PyAV audio/mp4 I/O, as in the MagiHuman release."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from magi_train.codecs.frozen import FrozenModule
from magi_train.utils.fileio import atomic_file

if TYPE_CHECKING:
    from diffusers import AutoencoderOobleck

log = logging.getLogger(__name__)

# The release runs the 44.1 kHz Stable Audio VAE as if audio were 51.2 kHz, so that one latent (hop 2048)
# lasts exactly one 25 fps video frame; decoded audio is stretched back by 441/512 (spec §6.3).
LATENTS_PER_SECOND = 25
HOP = 2048  # real model: prod(downsampling_ratios) = 2*4*4*8*8; AudioVAE reads it from the config
AUDIO_LATENT_CHANNELS = 64  # real model: decoder_input_channels; AudioVAE reads it from the config
EFFECTIVE_SAMPLE_RATE = HOP * LATENTS_PER_SECOND  # 51,200 Hz
OUTPUT_SAMPLE_RATE = 44100
RESAMPLE_UP, RESAMPLE_DOWN = 441, 512  # 44100 / 51200
# Driving audio longer than one window is encoded in windows (release: `load_audio_and_encode`, spec §4.7)
WINDOW_SECONDS = 29.0
WINDOW_OVERLAP = 0.5


def audio_latents_for_seconds(seconds: float) -> int:
    """Audio latents of a generated clip: seconds * 25 + 1, one per pixel frame (4 s -> 101)."""
    frames = seconds * LATENTS_PER_SECOND
    if seconds <= 0 or abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"seconds * {LATENTS_PER_SECOND} must be a positive whole number, got {seconds}")
    return round(frames) + 1


def audio_latents_for_video_latents(num_video_latents: int) -> int:
    """A = 4(T - 1) + 1 audio latents for T video latent frames (26 -> 101)."""
    if num_video_latents < 1:
        raise ValueError(f"need at least one video latent frame, got {num_video_latents}")
    return 4 * (num_video_latents - 1) + 1


def video_latents_for_audio_latents(num_audio_latents: int) -> int:
    """T = (A - 1) // 4 + 1 video latent frames for A audio latents (101 -> 26; release a2v: 100 -> 25)."""
    if num_audio_latents < 1:
        raise ValueError(f"need at least one audio latent, got {num_audio_latents}")
    return (num_audio_latents - 1) // 4 + 1


def output_num_samples(num_samples: int) -> int:
    """44.1 kHz sample count for `num_samples` at 51.2 kHz: int(n * 441 / 512) (206,848 -> 178,164)."""
    return num_samples * RESAMPLE_UP // RESAMPLE_DOWN


def to_output_rate(wave: torch.Tensor) -> torch.Tensor:
    """Resample a decoded waveform `[..., S]` from 51.2 kHz to 44.1 kHz with FFT resampling (scipy), fp32."""
    from scipy.signal import resample

    n_out = output_num_samples(wave.shape[-1])
    out = resample(wave.detach().float().cpu().numpy(), n_out, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(wave.device)


class AudioVAE(FrozenModule):
    """Frozen Oobleck VAE: stereo waveform at 51.2 kHz `[B, 2, S]` <-> unscaled latents `[B, A, 64]`."""

    def __init__(self, model: AutoencoderOobleck):
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.hop = int(np.prod(cfg.downsampling_ratios))
        self.latent_channels = int(cfg.decoder_input_channels)
        self.audio_channels = int(cfg.audio_channels)
        # The encoder emits mean and scale stacked on channels, so it must produce twice the decoder input.
        if int(cfg.encoder_hidden_size) != 2 * self.latent_channels:
            raise ValueError(
                f"Oobleck config mismatch: encoder_hidden_size {cfg.encoder_hidden_size} must be "
                f"2 * decoder_input_channels ({self.latent_channels})"
            )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> AudioVAE:
        """Load a diffusers `AutoencoderOobleck` folder (e.g. stable-audio-open-1.0/vae); never downloads."""
        from diffusers import AutoencoderOobleck

        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"audio VAE directory {str(path)!r} not found or has no config.json: "
                "expected a diffusers AutoencoderOobleck folder (e.g. stable-audio-open-1.0/vae)"
            )
        try:
            model = AutoencoderOobleck.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"could not load a diffusers AutoencoderOobleck from {str(path)!r}: {err}"
            ) from err
        return cls(model.to(device))

    def num_latents(self, num_samples: int) -> int:
        """Latents produced for `num_samples` input samples (padded up to a whole hop)."""
        return -(-num_samples // self.hop)

    @torch.no_grad()
    def encode(
        self, wave: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Waveform `[B, 2, S]` at 51.2 kHz -> latents `[B, ceil(S / hop), C]` fp32.

        The release samples the posterior (`mean + std * eps`); `sample=False` returns the mean. S is
        zero-padded at the end to a whole number of hops.
        """
        if wave.ndim != 3 or wave.shape[1] != self.audio_channels or wave.shape[2] == 0:
            raise ValueError(f"wave must be [B, {self.audio_channels}, S>0], got {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise ValueError(f"wave must be float in [-1, 1], got dtype {wave.dtype}")
        pad = -wave.shape[2] % self.hop
        x = torch.nn.functional.pad(wave, (0, pad)).to(device=self.device, dtype=self.dtype)
        posterior = self.model.encode(x).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()  # [B, C, A]
        return z.float().transpose(1, 2).contiguous()

    @torch.no_grad()
    def encode_windowed(
        self,
        wave: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        window_seconds: float = WINDOW_SECONDS,
        overlap: float = WINDOW_OVERLAP,
    ) -> torch.Tensor:
        """`encode` for audio of any length: windows of `window_seconds`, overlapping by `overlap`, cross-faded.

        As the release encodes a2v driving audio longer than 29 s: W = 29 * 25 = 725 latents per window (the last
        one zero-padded), latent overlap O = int(W * 0.5) = 362 and step W - O = 363; inside an overlap the
        latent j in 0..O-1 is ((O - j) * previous + j * current) / O; the result is cut to ceil(S / hop), so its
        length equals `encode`'s. Audio up to one window long is encoded in one piece, as `encode` does.

        One difference, on purpose: the release advances the *audio* by int(0.5 * 29 s) = 742,400 samples = 362.5
        latents while it places each window's latents 363 apart, so window k lands k/2 latents (20 ms each) late
        against the video (60 ms by 60 s). Here the audio advances by exactly the latent step (363 * 2048
        samples), so every window's latents sit at their own time and, away from the window edges, equal the
        one-piece encoding (tests/codecs/test_audio_vae.py). Posterior samples are drawn window by window.
        """
        if wave.ndim != 3 or wave.shape[2] == 0:
            raise ValueError(f"wave must be [B, {self.audio_channels}, S>0], got {tuple(wave.shape)}")
        rate = self.hop * LATENTS_PER_SECOND
        window_latents = round(window_seconds * LATENTS_PER_SECOND)
        overlap_latents = int(window_latents * overlap)
        if window_latents < 2 or not 0 < overlap_latents < window_latents:
            raise ValueError(
                f"audio windows of {window_seconds} s ({window_latents} latents) with overlap {overlap} leave no "
                "overlap or no step: use a window of at least 2 latents (0.08 s) and 0 < overlap < 1"
            )
        window, total = window_latents * self.hop, wave.shape[2]
        if total <= window:
            return self.encode(wave, sample=sample, generator=generator)
        step_latents = window_latents - overlap_latents
        out = None
        for k, start in enumerate(range(0, total, step_latents * self.hop)):
            chunk = wave[:, :, start : start + window]
            chunk = torch.nn.functional.pad(chunk, (0, window - chunk.shape[2]))
            z = self.encode(chunk, sample=sample, generator=generator)  # [B, W, C]
            if out is None:
                out = z
            else:
                base = k * step_latents
                fade = torch.arange(overlap_latents, device=z.device, dtype=z.dtype) / overlap_latents
                fade = fade.view(1, -1, 1)  # weight of the current window, 0 at the seam's start
                seam = out[:, base : base + overlap_latents]
                mixed = (1 - fade) * seam + fade * z[:, :overlap_latents]
                out = torch.cat([out[:, :base], mixed, z[:, overlap_latents:]], dim=1)
            if start + window >= total:
                break
        assert out is not None
        wanted = self.num_latents(total)
        log.debug("encoded %.1f s of audio in %d windows of %s s", total / rate, k + 1, window_seconds)
        return out[:, :wanted].contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, A, C]` -> waveform `[B, 2, A * hop]` at 51.2 kHz, fp32 (not clamped)."""
        if latents.ndim != 3 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be [B, A, {self.latent_channels}], got {tuple(latents.shape)}")
        z = latents.transpose(1, 2).to(device=self.device, dtype=self.dtype)
        return self.model.decode(z).sample.float()


class AudioTooShortError(ValueError):
    """The audio track ends before the requested duration (a2v input, data preparation)."""


def load_audio(path: str | Path, seconds: float, sample_rate: int = EFFECTIVE_SAMPLE_RATE) -> torch.Tensor:
    """First `seconds` of any audio/video file's first audio stream -> `[2, round(seconds * 51200)]` fp32.

    Decoded and resampled to mono at `sample_rate` with PyAV (the release uses ffmpeg via whisper), then
    duplicated to two channels. For A latents ask for `A / 25` seconds (4.04 s -> 101 latents).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio file {str(path)!r} not found")
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    wanted = round(seconds * sample_rate)
    chunks: list[np.ndarray] = []
    have = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{str(path)!r} has no audio stream")
            # s16 output, as whisper.load_audio asks ffmpeg for: swresample then downmixes stereo as
            # (L + R) / 2, whereas a float output format keeps 0.707 * (L + R), 3 dB louder than the release.
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    have += chunks[-1].size
                if have >= wanted:
                    break
            else:
                for out in resampler.resample(None):  # flush the resampler's delay line
                    chunks.append(out.to_ndarray().reshape(-1))
                    have += chunks[-1].size
    except av.error.FFmpegError as err:
        raise ValueError(f"could not decode audio from {str(path)!r}: {err}") from err
    if have < wanted:
        short = wanted - have
        raise AudioTooShortError(
            f"{str(path)!r} has {have / sample_rate:.3f} s of audio but {seconds} s were requested "
            f"({short} samples = {short / sample_rate:.3f} s too short)"
        )
    mono = torch.from_numpy(np.concatenate(chunks)[:wanted].astype(np.float32) / 32768.0)
    return mono.unsqueeze(0).repeat(2, 1)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def write_audio_video_mp4(
    path: str | Path,
    frames: Any,
    wave: Any | None,
    fps: int = 25,
    sample_rate: int = OUTPUT_SAMPLE_RATE,
    crf: int = 18,
) -> Path:
    """Mux uint8 frames `[F, H, W, 3]` (H.264, yuv420p) and a float stereo wave `[2, S]` (AAC) into an mp4.

    Written with PyAV (no ffmpeg binary) to a temporary file in the same folder, then renamed, so a crash
    never leaves a half-written mp4 at `path`. `wave=None` writes a video-only file.
    """
    import av

    path = Path(path)
    video = _as_numpy(frames)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3 or video.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F > 0, got {video.dtype} {video.shape}")
    height, width = video.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
    audio = None
    if wave is not None:
        audio = _as_numpy(wave).astype(np.float32)
        if audio.ndim != 2 or audio.shape[0] != 2:
            raise ValueError(f"wave must be float [2, S] (stereo, channels first), got {audio.shape}")
        audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0))

    def mux(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            vstream = container.add_stream("libx264", rate=Fraction(fps))
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            vstream.options = {"crf": str(crf)}
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=sample_rate)
                astream.layout = "stereo"
                astream.format = "fltp"
            sent = 0  # audio samples muxed so far; audio is interleaved with video by time
            for i, image in enumerate(video):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(vstream.encode(frame))
                if astream is not None:
                    until = min(audio.shape[1], (i + 1) * sample_rate // fps)
                    sent = _mux_audio(container, astream, audio, sent, until, sample_rate)
            if astream is not None:
                sent = _mux_audio(container, astream, audio, sent, audio.shape[1], sample_rate)
                container.mux(astream.encode(None))
            container.mux(vstream.encode(None))

    atomic_file(path, mux)
    return path


def _mux_audio(container: Any, stream: Any, audio: np.ndarray, start: int, stop: int, rate: int) -> int:
    import av

    chunk = 1024  # AAC frame size
    while start < stop:
        end = min(start + chunk, stop)
        frame = av.AudioFrame.from_ndarray(audio[:, start:end], format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
        start = end
    return start


def read_mp4_info(path: str | Path) -> dict[str, Any]:
    """Frames, fps, size and audio length/rate of a video file (PyAV), for tests and eval."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video file {str(path)!r} not found")
    info: dict[str, Any] = {
        "frames": 0,
        "fps": 0.0,
        "width": 0,
        "height": 0,
        "audio_seconds": 0.0,
        "audio_rate": 0,
        "audio_channels": 0,
        "video_codec": None,
        "audio_codec": None,
    }
    with av.open(str(path)) as container:
        if container.streams.video:
            vs = container.streams.video[0]
            info.update(
                fps=float(vs.average_rate or vs.guessed_rate or 0),
                width=vs.codec_context.width,
                height=vs.codec_context.height,
                video_codec=vs.codec_context.name,
            )
            info["frames"] = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        if container.streams.audio:
            aus = container.streams.audio[0]
            rate = aus.codec_context.sample_rate
            samples = sum(f.samples for f in container.decode(audio=0))
            info.update(
                audio_rate=rate,
                audio_seconds=samples / rate if rate else 0.0,
                audio_channels=aus.codec_context.channels,
                audio_codec=aus.codec_context.name,
            )
    return info
