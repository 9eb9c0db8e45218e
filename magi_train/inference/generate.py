"""Inference (recipe `generate`): prompt / image / audio -> base DiT -> latent SR -> decode -> mp4 + JSON.

Follows the released pipeline (spec §4-6, `MagiEvaluator.evaluate`): T5-Gemma text features, base
sampler = flow UniPC with CFG (negative prompt as the uncond branch) or the few-step distilled re-noising
sampler (steps and shift of the checkpoint's distillation, else the released 8 / 5), optional latent SR
(trilinear upsample, VP re-noise, SR DiT with its own UniPC steps, base audio kept), video decode by the
TurboVAED (`generate.turbo_vae`, the release's default) or the Wan2.2 VAE, Oobleck audio decode resampled
51.2 -> 44.1 kHz, H.264 + AAC mp4 via PyAV. CFG runs both branches as two clips of one packed forward
(`generate.batch_cfg`; the release runs two forwards).
The samplers are the ones of `magi_train.flow.sampling`; nothing here re-implements a sampling step.
A LoRA adapter (`generate.lora`, `generate.sr_lora`; docs/lora.md) is added live to its DiT, scaled by
`generate.lora_scale`, and recorded in the JSON.

Frame counts. As in the release, a clip of `seconds` has F = seconds*25 + 1 frames = A audio latents
(one per frame, 25 per second) and T = (F - 1) // 4 + 1 video latent frames (4 s -> 101 -> 26;
5 s -> 126 -> 32). The Wan VAE decodes T latent frames into 4(T - 1) + 1 pixel frames, which is F when
seconds*25 is a multiple of 4 and up to 3 frames fewer otherwise (5 s: 125). The release writes those
125 frames next to 5.04 s of audio; here the last decoded frame is repeated up to F, so the mp4 always
has F frames at 25 fps and its audio (A * 2048 samples at 51.2 kHz = F/25 s) has the same duration.
The model sees exactly the release's latent shapes.

a2v. The driving audio is read for F/25 s (the release reads `seconds` and gets A = seconds*25) so that
every mode has the same shapes; a file that covers `seconds` but not the last 40 ms frame is padded with
silence for that frame, a shorter one is an error. Its latents (posterior sampled, as released; audio longer
than 29 s in 29 s windows with 50 % overlap, `AudioVAE.encode_windowed`) stay clean through sampling and are
what is decoded into the output audio, as in the release.

RNG (spec §4.8): one generator seeded with `seed` on the sampling device draws, in order, the audio noise
(or the a2v posterior sample), the video noise, the distilled sampler's per-step noise, then the SR video
and SR audio noise; same seed and device give the same output.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from magi_train.codecs import (
    AudioVAE,
    LatentSize,
    TextEncoder,
    TurboVAE,
    VideoVAE,
    center_crop_resize,
    frames_for_seconds,
    latent_frames,
    latent_size,
    load_audio,
    pixel_frames,
    to_output_rate,
    write_audio_video_mp4,
)
from magi_train.codecs.audio_vae import EFFECTIVE_SAMPLE_RATE, LATENTS_PER_SECOND, OUTPUT_SAMPLE_RATE
from magi_train.codecs.text_encoder import MAX_TEXT_TOKENS
from magi_train.codecs.video_vae import SPATIAL_STRIDE, VIDEO_LATENT_CHANNELS
from magi_train.config import GenerateConfig
from magi_train.flow.sampling import sample_distilled, sample_unipc
from magi_train.flow.sr import sr_audio_condition, sr_video_input
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import LoadedDiT, check_source, load_dit
from magi_train.utils.fileio import atomic_write

log = logging.getLogger(__name__)

FPS = 25  # released EvaluationConfig.fps (spec §1)
IMAGE_RESIZE = ("center_crop", "none")
RELEASED_DISTILLED = {"steps": 8, "shift": 5.0}  # the released distilled sampler (spec §1, §4.7)

# The fixed negative prompt of the release (`MagiEvaluator.__init__`, spec §4.3): visual artefacts, then
# audio artefacts, then speech-performance artefacts, joined with ", ".
RELEASED_NEGATIVE_PROMPT = ", ".join([
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards",
    "low quality, worst quality, poor quality, noise, background noise, hiss, hum, buzz, crackle, static, "
    "compression artifacts, MP3 artifacts, digital clipping, distortion, muffled, muddy, unclear, echo, reverb, "
    "room echo, over-reverberated, hollow sound, distant, washed out, harsh, shrill, piercing, grating, tinny, "
    "thin sound, boomy, bass-heavy, flat EQ, over-compressed, abrupt cut, jarring transition, sudden silence, "
    "looping artifact, music, instrumental, sirens, alarms, crowd noise, unrelated sound effects, chaotic, "
    "disorganized, messy, cheap sound",
    "emotionless, flat delivery, deadpan, lifeless, apathetic, robotic, mechanical, monotone, flat intonation, "
    "undynamic, boring, reading from a script, AI voice, synthetic, text-to-speech, TTS, insincere, fake "
    "emotion, exaggerated, overly dramatic, melodramatic, cheesy, cringey, hesitant, unconfident, tired, weak "
    "voice, stuttering, stammering, mumbling, slurred speech, mispronounced, bad articulation, lisp, vocal "
    "fry, creaky voice, mouth clicks, lip smacks, wet mouth sounds, heavy breathing, audible inhales, "
    "plosives, p-pops, coughing, clearing throat, sneezing, speaking too fast, rushed, speaking too slow, "
    "dragged out, unnatural pauses, awkward silence, choppy, disjointed, multiple speakers, two voices, "
    "background talking, out of tune, off-key, autotune artifacts",
])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def load_text_features(path: str | Path, what: str = "generate.text_features") -> Tensor:
    """Pre-computed T5-Gemma features `[L, D]` (or `[1, L, D]`) from .npy or .safetensors -> fp32 `[L', D]`.

    Trailing all-zero rows (the release pads features to 640 tokens) are dropped, since the DiT must see
    real tokens only, and at most 640 tokens are kept.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{what}={str(p)!r}: no such file (expected .npy or .safetensors text features [L, D])"
        )
    if p.suffix == ".npy":
        try:
            feats = torch.from_numpy(np.load(p, allow_pickle=False).astype(np.float32))
        except ValueError as err:
            raise ValueError(f"{what}={str(p)!r}: not a plain numeric .npy array ({err})") from err
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(p)
        if len(tensors) != 1:
            raise ValueError(f"{what}={str(p)!r}: expected exactly one tensor, found {sorted(tensors)}")
        feats = next(iter(tensors.values())).float()
    else:
        raise ValueError(f"{what}={str(p)!r}: unsupported suffix {p.suffix!r}; use .npy or .safetensors")
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"{what}={str(p)!r}: expected [L, D] text features, got shape {list(feats.shape)}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{what}={str(p)!r}: contains NaN or inf")
    nonzero = (feats != 0).any(dim=1).nonzero()
    if nonzero.numel() == 0:
        raise ValueError(f"{what}={str(p)!r}: every row is zero (padding only)")
    real = int(nonzero[-1]) + 1
    if real < feats.shape[0]:
        log.info("%s: dropped %d trailing zero (padding) rows", p, feats.shape[0] - real)
    return feats[: min(real, MAX_TEXT_TOKENS)].contiguous()


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 RGB `[H, W, 3]`; ValueError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"generate.image={str(p)!r}: no such file")
    try:
        with Image.open(p) as img:
            arr = np.array(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"generate.image={str(p)!r} could not be read as an image: {err}") from err
    if min(arr.shape[:2]) < SPATIAL_STRIDE:
        raise ValueError(
            f"generate.image={str(p)!r} is {arr.shape[1]}x{arr.shape[0]} px: need at least "
            f"{SPATIAL_STRIDE} px per side"
        )
    return arr


def fit_image(image: np.ndarray, size: LatentSize, policy: str) -> np.ndarray:
    """Apply the image size policy: centre crop + resize (release), or require the exact pixel size."""
    width, height = size.pixel_width, size.pixel_height
    if policy == "center_crop":
        return center_crop_resize(image, width, height)
    if policy == "none":
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"generate.image is {image.shape[1]}x{image.shape[0]} px but generate.image_resize=none needs "
                f"exactly the base size {width}x{height} (width x height, after rounding to multiples of 32): "
                "resize the image, or use generate.image_resize=center_crop"
            )
        return image
    raise ValueError(f"generate.image_resize={policy!r}: use one of {IMAGE_RESIZE}")


def encode_image(vae: VideoVAE, image: np.ndarray, size: LatentSize) -> Tensor:
    """uint8 `[H, W, 3]` of exactly the pixel size -> normalised first-frame latent `[48, 1, h, w]` fp32."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)[None, :, None]
    latent = vae.encode(pixels)[0]
    assert latent.shape[-2:] == (size.height, size.width), (latent.shape, size)
    return latent


def read_driving_audio(path: str | Path, seconds: float, frames: int) -> Tensor:
    """`frames / 25` s of audio at 51.2 kHz, stereo `[2, frames * 2048]`; the last frame may be silence.

    Errors when the file is shorter than `seconds`.
    """
    wanted = frames * EFFECTIVE_SAMPLE_RATE // LATENTS_PER_SECOND
    try:
        return load_audio(path, frames / LATENTS_PER_SECOND)
    except ValueError:
        pass  # maybe only the last 40 ms frame is missing; the call below raises the precise error if not
    try:
        wave = load_audio(path, seconds)
    except ValueError as err:
        raise ValueError(f"generate.audio: {err}; use a longer file or a smaller generate.seconds") from err
    log.warning(
        "generate.audio %s ends within the last frame: padded %d samples of silence",
        path,
        wanted - wave.shape[1],
    )
    return torch.nn.functional.pad(wave, (0, wanted - wave.shape[1]))


# ---------------------------------------------------------------------------------------------------------
# Pipeline: models and codecs, loaded once and reused across requests
# ---------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"generate.device={name!r} but CUDA is not available; use generate.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the DiT (None = fp32)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    raise ValueError(f"generate.precision={name!r}: use auto, fp32 or bf16")


def _codec_path(cfg: GenerateConfig, name: str, what: str) -> str:
    path = getattr(cfg, name)
    if path:
        return path
    if cfg.codecs_dir:
        return str(Path(cfg.codecs_dir) / name)
    raise ValueError(
        f"generate.{name} is not set: pass the directory of {what}, or generate.codecs_dir "
        f"(a folder holding video_vae/, audio_vae/ and text_encoder/)"
    )


WAN_VAE = "a diffusers AutoencoderKLWan (Wan2.2 VAE)"
OOBLECK_VAE = "a diffusers AutoencoderOobleck (Stable Audio Open VAE)"


def _write_tiny_codecs(cfg: GenerateConfig) -> None:
    """With `tiny_codecs`, random tiny codecs are written into `codecs_dir` (kept once complete)."""
    if not cfg.tiny_codecs:
        return
    if not cfg.codecs_dir:
        raise ValueError("generate.tiny_codecs=true needs generate.codecs_dir to write them into")
    from magi_train.codecs.tiny import write_tiny_codecs

    log.warning("writing random tiny codecs into %s: the output is noise (smoke run)", cfg.codecs_dir)
    write_tiny_codecs(cfg.codecs_dir)


def _video_codec_dtype(autocast_dtype: torch.dtype | None) -> torch.dtype:
    # the release runs the Wan2.2 VAE and the TurboVAED in the DiT's dtype (bf16 on GPU)
    return torch.bfloat16 if autocast_dtype is torch.bfloat16 else torch.float32


def _load_turbo(cfg: GenerateConfig, dtype: torch.dtype, device: torch.device) -> TurboVAE | None:
    if not cfg.turbo_vae:
        return None
    return TurboVAE.from_pretrained(cfg.turbo_vae, dtype, device, what="generate.turbo_vae")


def load_codecs(
    cfg: GenerateConfig, device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[VideoVAE, AudioVAE, str | None, TurboVAE | None]:
    """(video VAE, audio VAE, text encoder directory or None, TurboVAED decoder or None) named by `cfg`; with
    `tiny_codecs`, random tiny codecs are written into `codecs_dir` first. The text encoder is loaded later, only
    when needed. The Wan2.2 VAE is always loaded: it encodes i2v images and is the decoder without a TurboVAED."""
    video_path = _codec_path(cfg, "video_vae", WAN_VAE)
    audio_path = _codec_path(cfg, "audio_vae", OOBLECK_VAE)
    _write_tiny_codecs(cfg)
    dtype = _video_codec_dtype(autocast_dtype)
    video_vae = VideoVAE.from_pretrained(video_path, dtype, device)
    audio_vae = AudioVAE.from_pretrained(audio_path, device=device)
    text_path = cfg.text_encoder or (str(Path(cfg.codecs_dir) / "text_encoder") if cfg.codecs_dir else None)
    return video_vae, audio_vae, text_path, _load_turbo(cfg, dtype, device)


def decoders_named(cfg: GenerateConfig) -> bool:
    """Whether `cfg` names a video decoder (`turbo_vae`, `video_vae` or `codecs_dir`) and an audio VAE
    (`audio_vae` or `codecs_dir`): what `load_decoders` needs."""
    return bool(cfg.turbo_vae or cfg.video_vae or cfg.codecs_dir) and bool(cfg.audio_vae or cfg.codecs_dir)


def decoder_paths(cfg: GenerateConfig) -> tuple[str, str]:
    """(video decoder directory, audio VAE directory) of `load_decoders`: the TurboVAED when `turbo_vae` is set,
    else the Wan2.2 VAE, as `Pipeline.decoder` chooses."""
    video = cfg.turbo_vae or _codec_path(cfg, "video_vae", WAN_VAE)
    return video, _codec_path(cfg, "audio_vae", OOBLECK_VAE)


def load_decoders(
    cfg: GenerateConfig, device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[VideoVAE | TurboVAE, AudioVAE]:
    """(video decoder, audio VAE) as recipe=generate decodes with them (`Pipeline.decoder`: the TurboVAED when
    `turbo_vae` is set, else the Wan2.2 VAE), frozen in eval mode; nothing else is loaded (training-time samples:
    no text encoder, no Wan2.2 VAE beside a TurboVAED)."""
    video_path, audio_path = decoder_paths(cfg)
    _write_tiny_codecs(cfg)
    dtype = _video_codec_dtype(autocast_dtype)
    decoder = _load_turbo(cfg, dtype, device) or VideoVAE.from_pretrained(video_path, dtype, device)
    return decoder, AudioVAE.from_pretrained(audio_path, device=device)


@dataclass
class Pipeline:
    """DiTs and codecs for sampling; `generate(cfg, pipeline)` reuses them across prompts."""

    base: LoadedDiT
    video_vae: VideoVAE
    audio_vae: AudioVAE
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    distilled: bool = False
    sr: LoadedDiT | None = None
    text_encoder_path: str | None = None
    _text_encoder: TextEncoder | None = field(default=None, repr=False)
    turbo_vae: TurboVAE | None = None  # the video decoder when set (else video_vae decodes)
    _negative_cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def decoder(self) -> VideoVAE | TurboVAE:
        """The video decoder: the TurboVAED when one is loaded (generate.turbo_vae), else the Wan2.2 VAE."""
        return self.turbo_vae if self.turbo_vae is not None else self.video_vae

    @property
    def decoder_name(self) -> str:
        return "turbo" if self.turbo_vae is not None else "wan2.2"

    @property
    def text_encoder(self) -> TextEncoder:
        """The T5-Gemma encoder, loaded on first use (not needed with pre-computed features)."""
        if self._text_encoder is None:
            if self.text_encoder_path is None:
                raise ValueError(
                    "encoding a prompt (or the negative prompt of CFG) needs generate.text_encoder (a T5-Gemma "
                    "directory) or generate.codecs_dir; or pass generate.text_features and "
                    "generate.negative_text_features (or generate.cfg=false)"
                )
            self._text_encoder = TextEncoder.from_pretrained(self.text_encoder_path, device=self.device)
        return self._text_encoder

    def denoiser(self, loaded: LoadedDiT):
        """model(video, audio, text) under the pipeline's autocast."""
        model, dtype, device_type = loaded.model, self.autocast_dtype, self.device.type

        def call(video: list[Tensor], audio: list[Tensor], text: list[Tensor]):
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model(video, audio, text)

        return call


def check_lora(path: str, what: str) -> None:
    """Fail fast, before a DiT is loaded, when an adapter file is missing or not in the exchange format."""
    from magi_train.models.lora import read_adapter

    read_adapter(path, what)  # small next to a DiT: every tensor is read, so a truncated file fails here too


def add_lora(model: DiT, path: str, scale: float, what: str = "generate.lora") -> dict[str, Any]:
    """Add the adapter file `path` to `model` live (not merged), its update scaled by `scale`; returns what the
    output JSON records of it.

    The scale multiplies each adapted layer's alpha/rank factor (`LoRAModalityLinear.scales`), so the file is
    used as written: scale 0 adds exactly nothing to the base's outputs, scale 2 equals a file with B doubled.
    """
    from magi_train.models.lora import DEFAULT, load_adapter, lora_layers

    if not math.isfinite(scale):
        raise ValueError(f"{what}_scale={scale}: use a finite number (1.0: the adapter as trained)")
    load_adapter(model, path, DEFAULT, where=what)
    for _, layer in lora_layers(model):
        layer.scales[DEFAULT] *= scale
    lcfg = model.lora_config
    return {"path": str(path), "scale": scale, "rank": lcfg.rank, "alpha": lcfg.alpha}


def load_pipeline(cfg: GenerateConfig) -> Pipeline:
    """Load the base (or distilled) DiT, the optional SR DiT and the codecs named by `cfg`."""
    if bool(cfg.base_ckpt) == bool(cfg.distilled_ckpt):
        raise ValueError(
            "give exactly one of generate.base_ckpt (UniPC + CFG) and generate.distilled_ckpt "
            "(8-step distilled sampler); each is a .ckpt of ours or a released-format directory"
        )
    distilled = bool(cfg.distilled_ckpt)
    # (role, its weights, the setting naming the model config of released-format weights)
    roles = [("distilled" if distilled else "base", cfg.distilled_ckpt or cfg.base_ckpt, "base_model")]
    roles += [("sr", cfg.sr_ckpt, "sr_model")] if cfg.sr_ckpt else []
    # cheap checks first: loading a big DiT takes minutes
    kinds = {role: check_source(path, f"generate.{role}_ckpt") for role, path, _ in roles}
    if cfg.sr_lora and not cfg.sr_ckpt:
        raise ValueError("generate.sr_lora is an adapter of the SR DiT: it needs generate.sr_ckpt")
    for key in ("lora", "sr_lora"):
        if getattr(cfg, key):
            check_lora(getattr(cfg, key), f"generate.{key}")
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_precision(cfg.precision, device)
    video_vae, audio_vae, text_path, turbo = load_codecs(cfg, device, autocast_dtype)

    def dit(role: str, path: str, model_key: str) -> LoadedDiT:
        """One role's DiT for sampling: ours rebuild from their stored config, released ones from `model_key`."""
        what, name, model_cfg = f"generate.{role}_ckpt", getattr(cfg, model_key), None
        if kinds[role] == "released":
            if name not in MODEL_CONFIGS:
                raise ValueError(
                    f"unknown model config {name!r} for the {role} weights {path} (generate.{model_key}); "
                    f"known: {sorted(MODEL_CONFIGS)}"
                )
            model_cfg = copy.deepcopy(MODEL_CONFIGS[name])
            if role == "sr":
                model_cfg.text_coords = "v1"  # the release's SR data proxy uses coords_style v1 (spec §1)
        weights = "auto" if cfg.use_ema else "raw"
        # bf16 block linears as released (spec §2.10): a big model never holds an fp32 copy on the device
        dtype_policy = "base" if autocast_dtype is torch.bfloat16 else "fp32"
        try:
            loaded = load_dit(path, model_cfg, weights, what=what, device=device, dtype_policy=dtype_policy)
        except ValueError as err:
            if model_cfg is None:
                raise
            raise ValueError(
                f"{err}\n(the {role} model config is {name!r}: set generate.{model_key})"
            ) from err
        if cfg.use_ema and loaded.weights == "raw":
            log.warning(
                "%s=%s holds no EMA weights (trained with ema.decay=0?): using the raw ones", what, path
            )
        if loaded.task is not None and (loaded.task == "pretrain_sr") != (role == "sr"):
            log.warning(
                "%s=%s was trained by task %r; is it the right model for this role?", what, path, loaded.task
            )
        lora_key = "sr_lora" if role == "sr" else "lora"  # an adapter added live (not merged)
        if getattr(cfg, lora_key):
            loaded.lora = add_lora(
                loaded.model,
                getattr(cfg, lora_key),
                getattr(cfg, f"{lora_key}_scale"),
                f"generate.{lora_key}",
            )
        loaded.model.eval().requires_grad_(False)
        return loaded

    text_encoder = None
    uses_negative = (cfg.cfg and not distilled) or (cfg.sr_cfg and cfg.sr_ckpt)
    if cfg.prompt or (uses_negative and not cfg.negative_text_features):  # needed: load it now
        if text_path is None:
            raise ValueError(
                "a prompt (or the negative prompt of CFG) needs generate.text_encoder or codecs_dir"
            )
        text_encoder = TextEncoder.from_pretrained(text_path, device=device)
    base = dit(*roles[0])
    sr = dit(*roles[1]) if cfg.sr_ckpt else None
    return Pipeline(
        base, video_vae, audio_vae, device, autocast_dtype, distilled, sr, text_path, text_encoder, turbo
    )


def pipeline_for_model(
    cfg: GenerateConfig,
    model: DiT,
    device: torch.device,
    distilled: bool,
    config: dict[str, Any] | None = None,
    path: str = "training",
) -> Pipeline:
    """A pipeline around a live DiT (training-time evaluation) with the codecs named by `cfg`.

    `config` plays the role of a checkpoint's stored run config (e.g. {"task": "dmd2", "distill": {...}} gives
    the distilled sampler its steps and shift). The checkpoint fields and `device` of `cfg` are not used.
    """
    autocast_dtype = resolve_precision(cfg.precision, device)
    video_vae, audio_vae, text_path, turbo = load_codecs(cfg, device, autocast_dtype)
    task = config.get("task") if config else None
    base = LoadedDiT(model, source="training", weights="raw", path=path, task=task, config=config)
    return Pipeline(
        base, video_vae, audio_vae, device, autocast_dtype, distilled, None, text_path, turbo_vae=turbo
    )


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """Paths written and the tensors behind them (on CPU)."""

    video_path: Path
    json_path: Path
    video_latent: Tensor  # final video latent [48, T, h, w] (after SR when it ran)
    base_video_latent: Tensor  # output of the base stage
    audio_latent: Tensor  # [A, 64], the latents decoded into the output audio
    image_latent: Tensor | None  # i2v conditioning latent at the base size [48, 1, h, w]
    frames: np.ndarray  # uint8 [F, H, W, 3] as muxed
    wave: Tensor  # [2, S] at 44.1 kHz as muxed
    info: dict[str, Any]


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 4)


def _check_request(cfg: GenerateConfig) -> None:
    """Checks of the request alone, before any model is loaded."""
    if not cfg.prompt and not cfg.text_features:
        raise ValueError("give generate.prompt (text) or generate.text_features (a .npy/.safetensors file)")
    if cfg.prompt and cfg.text_features:
        raise ValueError("give only one of generate.prompt and generate.text_features")
    if (cfg.sr_width is None) != (cfg.sr_height is None):
        raise ValueError("set both generate.sr_width and generate.sr_height, or neither")
    try:
        frames_for_seconds(cfg.seconds, FPS)
    except ValueError as err:
        raise ValueError(f"generate.seconds={cfg.seconds}: {err} (e.g. 4, 5 or 0.2)") from err
    if cfg.image_resize not in IMAGE_RESIZE:
        raise ValueError(f"generate.image_resize={cfg.image_resize!r}: use one of {IMAGE_RESIZE}")
    for name in ("steps", "distilled_steps", "sr_steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"generate.{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 < cfg.sr_alpha <= 1:
        raise ValueError(f"generate.sr_alpha must be in (0, 1], got {cfg.sr_alpha}")


def _check_sr(cfg: GenerateConfig, pipe: Pipeline) -> None:
    if pipe.sr is not None and cfg.sr_width is None:
        raise ValueError("an SR checkpoint is loaded: set generate.sr_width and generate.sr_height")
    if cfg.sr_width is not None and pipe.sr is None:
        raise ValueError("generate.sr_width/sr_height need generate.sr_ckpt (the SR DiT)")


def base_cfg(cfg: GenerateConfig, pipe: Pipeline) -> bool:
    return cfg.cfg and not pipe.distilled


def sr_cfg(cfg: GenerateConfig, pipe: Pipeline) -> bool:
    return cfg.sr_cfg and pipe.sr is not None


def _text(cfg: GenerateConfig, pipe: Pipeline) -> tuple[Tensor, Tensor | None]:
    """Prompt features and, when the base or the SR sampler uses CFG, the uncond (negative prompt) features."""
    if cfg.text_features:
        text = load_text_features(cfg.text_features)
    else:
        text = pipe.text_encoder.encode([cfg.prompt])[0]
    negative = None
    if base_cfg(cfg, pipe) or sr_cfg(cfg, pipe):
        if cfg.negative_text_features:
            negative = load_text_features(cfg.negative_text_features, "generate.negative_text_features")
        else:
            prompt = RELEASED_NEGATIVE_PROMPT if cfg.negative_prompt is None else cfg.negative_prompt
            if prompt not in pipe._negative_cache:  # encoded once, as in the release
                pipe._negative_cache[prompt] = pipe.text_encoder.encode([prompt])[0]
            negative = pipe._negative_cache[prompt]
    models = [pipe.base] + ([pipe.sr] if pipe.sr is not None else [])
    for feats, name in ((text, "text"), (negative, "negative text")):
        for loaded in models if feats is not None else []:
            width = loaded.model.cfg.text_in_channels
            if feats.shape[1] != width:
                raise ValueError(
                    f"{name} features are {feats.shape[1]} wide but the DiT of {loaded.path} "
                    f"takes {width} (T5-Gemma-9B gives 3584)"
                )
    return text.to(pipe.device), None if negative is None else negative.to(pipe.device)


def _to_uint8(pixels: Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (x*0.5 + 0.5, clamp, as the release)."""
    video = pixels.float().mul(0.5).add(0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def decode_clip(
    decoder: VideoVAE | TurboVAE, audio_vae: AudioVAE, video: Tensor, audio: Tensor, frames: int
) -> tuple[np.ndarray, Tensor]:
    """Latents of one clip -> (uint8 frames `[F, H, W, 3]`, stereo wave `[2, S]` at 44.1 kHz on the CPU), ready
    for `write_audio_video_mp4` at 25 fps. The video latent `[48, T, h, w]` decodes into 4(T - 1) + 1 frames, the
    last repeated up to `frames` (module docstring); the audio latent `[A, 64]` decodes at 51.2 kHz, resampled."""
    pixels = decoder.decode(video[None].float())[0]
    decoded = pixels.shape[1]
    assert decoded == pixel_frames(video.shape[1]), (decoded, video.shape)
    rgb = _to_uint8(pixels)
    if decoded < frames:
        rgb = np.concatenate([rgb, np.repeat(rgb[-1:], frames - decoded, axis=0)])
    wave = to_output_rate(audio_vae.decode(audio[None].float())[0]).cpu()
    return rgb, wave


@dataclass(frozen=True)
class BaseSampler:
    """The base stage's sampler, its settings and where each came from (recorded in the output JSON)."""

    kind: str  # "unipc" | "distilled"
    steps: int
    shift: float
    cfg: bool  # UniPC with classifier-free guidance
    settings_from: dict[str, str]  # steps / shift -> "generate.<key>" | "checkpoint" | "released"

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.steps}" + ("+cfg" if self.cfg else "")


def base_sampler(cfg: GenerateConfig, pipe: Pipeline) -> BaseSampler:
    """UniPC with `generate.steps` / `generate.shift`, or the distilled sampler of a distilled checkpoint.

    The distilled sampler takes `generate.distilled_steps` / `generate.distilled_shift` when set, else the
    values a dmd2 checkpoint of ours was distilled with (`distill.num_student_steps` / `distill.shift` of its
    stored config), else the released 8 steps at shift 5 (released-format directories carry no config).
    """
    if not pipe.distilled:
        return BaseSampler(
            "unipc", cfg.steps, cfg.shift, cfg.cfg, {"steps": "generate.steps", "shift": "generate.shift"}
        )
    config = pipe.base.config or {}
    stored = (config.get("distill") or {}) if config.get("task") == "dmd2" else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, key in (("steps", "num_student_steps"), ("shift", "shift")):
        if getattr(cfg, f"distilled_{name}") is not None:
            values[name], sources[name] = getattr(cfg, f"distilled_{name}"), f"generate.distilled_{name}"
        elif stored.get(key) is not None:
            values[name], sources[name] = stored[key], "checkpoint"
        else:
            values[name], sources[name] = RELEASED_DISTILLED[name], "released"
    return BaseSampler("distilled", int(values["steps"]), float(values["shift"]), False, sources)


@torch.no_grad()
def generate(cfg: GenerateConfig, pipeline: Pipeline | None = None) -> GenerateResult:
    """One clip: sample, optionally super-resolve, decode and write `cfg.output` (.mp4) plus a .json.

    `pipeline` (from `load_pipeline`) lets callers such as eval reuse loaded models across prompts; its
    checkpoint/codec settings win over those of `cfg`, every other field of `cfg` applies.
    """
    total_start = time.perf_counter()
    _check_request(cfg)
    pipe = pipeline or load_pipeline(cfg)
    _check_sr(cfg, pipe)
    device, timer = pipe.device, _Timer(pipe.device)
    frames = frames_for_seconds(cfg.seconds, FPS)
    num_audio, num_latent = frames, latent_frames(frames)
    base_size = latent_size(cfg.width, cfg.height)
    sr_size = latent_size(cfg.sr_width, cfg.sr_height) if pipe.sr is not None else None
    if (base_size.pixel_width, base_size.pixel_height) != (cfg.width, cfg.height):
        log.info(
            "base size %dx%d rounded to %dx%d (latent %dx%d)",
            cfg.width,
            cfg.height,
            base_size.pixel_width,
            base_size.pixel_height,
            base_size.width,
            base_size.height,
        )
    mode = "+".join(m for m, on in (("i2v", cfg.image), ("a2v", cfg.audio)) if on) or "t2v"  # both may apply
    gen = torch.Generator(device).manual_seed(cfg.seed)

    with timer("text"):
        text, negative = _text(cfg, pipe)

    image = read_image(cfg.image) if cfg.image else None
    with timer("inputs"):  # i2v image and a2v audio encoding
        image_latent = (
            encode_image(pipe.video_vae, fit_image(image, base_size, cfg.image_resize), base_size)
            if image is not None
            else None
        )
        clean_audio = None
        if cfg.audio:
            wave_in = read_driving_audio(cfg.audio, cfg.seconds, frames).to(device)
            # longer than 29 s: in overlapping windows, as released (spec §4.7)
            clean_audio = pipe.audio_vae.encode_windowed(wave_in[None], sample=True, generator=gen)[
                0, :num_audio
            ]
            assert clean_audio.shape[0] == num_audio, clean_audio.shape

    # initial noise in the release's order: audio, then video (spec §4.2)
    audio0 = (
        clean_audio
        if clean_audio is not None
        else torch.randn((num_audio, pipe.audio_vae.latent_channels), generator=gen, device=device)
    )
    video0 = torch.randn(
        (VIDEO_LATENT_CHANNELS, num_latent, base_size.height, base_size.width), generator=gen, device=device
    )
    first = [image_latent.to(device)] if image_latent is not None else None
    held_audio = [clean_audio] if clean_audio is not None else None

    sampler = base_sampler(cfg, pipe)
    with timer("base"):
        model = pipe.denoiser(pipe.base)
        if pipe.distilled:
            (video,), (audio,) = sample_distilled(
                model,
                [video0],
                [audio0],
                [text],
                num_steps=sampler.steps,
                shift=sampler.shift,
                generator=gen,
                first_frames=first,
                clean_audio=held_audio,
                progress=cfg.progress,
            )
        else:
            (video,), (audio,) = sample_unipc(
                model,
                [video0],
                [audio0],
                [text],
                [negative] if base_cfg(cfg, pipe) else None,
                num_steps=sampler.steps,
                shift=sampler.shift,
                guidance=cfg.guidance,
                first_frames=first,
                clean_audio=held_audio,
                progress=cfg.progress,
                batch_cfg=cfg.batch_cfg,
            )
    base_video = video

    sr_info = None
    if pipe.sr is not None:
        with timer("sr"):
            sr_image = None
            if image is not None:  # re-encoded at the SR size (spec §4.6)
                policy = "center_crop"  # "none" fixes the base size; the SR size is a resize by definition
                sr_image = encode_image(pipe.video_vae, fit_image(image, sr_size, policy), sr_size).to(device)
            eps = torch.randn(
                (VIDEO_LATENT_CHANNELS, num_latent, sr_size.height, sr_size.width),
                generator=gen,
                device=device,
            )
            sr_in = sr_video_input(base_video, (sr_size.height, sr_size.width), cfg.sr_alpha, eps)
            audio_eps = torch.randn(audio.shape, generator=gen, device=device)
            sr_audio = sr_audio_condition(audio, audio_eps, cfg.sr_audio_noise_scale)
            # released SR: no CFG (sr_cfg_number 1) unless generate.sr_cfg; audio held fixed, its output discarded
            (video,), _ = sample_unipc(
                pipe.denoiser(pipe.sr),
                [sr_in],
                [sr_audio],
                [text],
                [negative] if sr_cfg(cfg, pipe) else None,
                num_steps=cfg.sr_steps,
                shift=cfg.shift,
                guidance=cfg.sr_guidance,
                batch_cfg=cfg.batch_cfg,
                first_frames=[sr_image] if sr_image is not None else None,
                clean_audio=[sr_audio],
                progress=cfg.progress,
            )
        sr_info = {
            "pixel_size": [sr_size.pixel_width, sr_size.pixel_height],
            "latent_size": [sr_size.height, sr_size.width],
            "steps": cfg.sr_steps,
            "cfg": dataclasses.asdict(cfg.sr_guidance) if sr_cfg(cfg, pipe) else None,
            "checkpoint": pipe.sr.describe(),
        }

    with timer("decode"):
        rgb, wave = decode_clip(pipe.decoder, pipe.audio_vae, video, audio, frames)
    decoded = pixel_frames(num_latent)

    out = Path(cfg.output)
    with timer("mux"):
        write_audio_video_mp4(out, rgb, wave, fps=FPS, sample_rate=OUTPUT_SAMPLE_RATE)
    timer.times["total"] = round(time.perf_counter() - total_start, 4)

    info = {
        "output": str(out),
        "mode": mode,
        "sampler": sampler.name,
        "seed": cfg.seed,
        "seconds": cfg.seconds,
        "fps": FPS,
        "frames": frames,
        "decoded_frames": decoded,
        "repeated_last_frames": frames - decoded,
        "latent_frames": num_latent,
        "audio_latents": num_audio,
        "audio_sample_rate": OUTPUT_SAMPLE_RATE,
        "audio_samples": int(wave.shape[1]),
        "text_tokens": int(text.shape[0]),
        "negative_text_tokens": None if negative is None else int(negative.shape[0]),
        "base": {
            "pixel_size": [base_size.pixel_width, base_size.pixel_height],
            "latent_size": [base_size.height, base_size.width],
            "steps": sampler.steps,
            "shift": sampler.shift,
            "settings_from": sampler.settings_from,
            "checkpoint": pipe.base.describe(),
        },
        "sr": sr_info,
        "decoder": {"kind": pipe.decoder_name, "path": pipe.turbo_vae.path if pipe.turbo_vae else None},
        "batch_cfg": bool(cfg.batch_cfg and negative is not None),
        "device": str(device),
        "precision": "bf16" if pipe.autocast_dtype is torch.bfloat16 else "fp32",
        "timings_s": timer.times,
        "settings": dataclasses.asdict(cfg),
    }
    json_path = out.with_suffix(".json")
    atomic_write(json_path, json.dumps(info, indent=2, default=str))
    log.info(
        "wrote %s (%d frames, %.2f s audio) and %s",
        out,
        frames,
        wave.shape[1] / OUTPUT_SAMPLE_RATE,
        json_path,
    )
    return GenerateResult(
        out,
        json_path,
        video.cpu(),
        base_video.cpu(),
        audio.cpu(),
        None if image_latent is None else image_latent.cpu(),
        rgb,
        wave,
        info,
    )


def run_generate(gen_cfg: GenerateConfig, dry_run: bool = False) -> dict[str, Any]:
    """Runner of recipe `generate`: one mp4 + JSON (dry_run: load everything, sample nothing)."""
    _check_request(gen_cfg)
    pipe = load_pipeline(gen_cfg)
    if dry_run:
        _check_sr(gen_cfg, pipe)
        plan = {
            "base": pipe.base.describe(),
            "sampler": dataclasses.asdict(base_sampler(gen_cfg, pipe)),
            "sr": pipe.sr.describe() if pipe.sr else None,
        }
        print(plan)
        return plan
    result = generate(gen_cfg, pipe)
    print(f"wrote {result.video_path} and {result.json_path}")
    return {
        "output": str(result.video_path),
        "json": str(result.json_path),
        "timings_s": result.info["timings_s"],
    }
