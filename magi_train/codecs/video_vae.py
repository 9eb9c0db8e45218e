"""Wan2.2 video VAE (diffusers AutoencoderKLWan) as a frozen codec, as in the MagiHuman release."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from magi_train.codecs.frozen import FrozenModule

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from PIL import Image

log = logging.getLogger(__name__)

VIDEO_LATENT_CHANNELS = 48
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 16

# Per-channel latent statistics of the Wan2.2 VAE (Wan2.2-TI2V-5B/Wan2.2_VAE.pth). Source: the official
# Wan-Video/Wan2.2 repository, wan/modules/vae2_2.py, `Wan2_2_VAE.__init__` (commit bf69229), where they are
# hard-coded exactly as the daVinci-MagiHuman release hard-codes them (spec §6.1); diffusers' Wan2.2 VAE
# config carries them as `latents_mean`/`latents_std`. The installed diffusers only ships the 16-channel
# Wan2.1 defaults, so a loaded config is preferred and this table is the fallback for a 48-channel VAE.
# fmt: off
WAN22_LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# fmt: on


def latent_frames(num_frames: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """Latent frames T = (num_frames - 1) // 4 + 1 (101 -> 26; the release's 5 s clip: 126 -> 32).

    Rounds down like the release: 126 frames give 32 latent frames, which decode to 125 pixel frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return (num_frames - 1) // temporal_stride + 1


def pixel_frames(num_latent_frames: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """Pixel frames decoded from `num_latent_frames` latent frames (26 -> 101)."""
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    return temporal_stride * (num_latent_frames - 1) + 1


def frames_for_seconds(seconds: float, fps: int = 25) -> int:
    """Pixel frames of a generated clip: seconds * fps + 1 (4 s -> 101)."""
    frames = seconds * fps
    if seconds <= 0 or abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"seconds * fps must be a positive whole number, got {seconds} * {fps}")
    return round(frames) + 1


class LatentSize(NamedTuple):
    """Latent grid (height, width) and the pixel size it decodes to."""

    height: int
    width: int
    stride: int = SPATIAL_STRIDE

    @property
    def pixel_height(self) -> int:
        return self.height * self.stride

    @property
    def pixel_width(self) -> int:
        return self.width * self.stride


def latent_size(width: int, height: int, stride: int = SPATIAL_STRIDE) -> LatentSize:
    """Latent (height, width) for a requested pixel size, rounded down to even dims as the release does.

    480x272 -> lat 16x30 (pixels 480x256); 1920x1088 -> 68x120.
    """
    lat_h = height // stride // 2 * 2
    lat_w = width // stride // 2 * 2
    if lat_h < 2 or lat_w < 2:
        raise ValueError(f"pixel size {width}x{height} is too small: need at least {2 * stride} px per side")
    return LatentSize(lat_h, lat_w, stride)


def _to_rgb_uint8(image: Any) -> Image.Image:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 HWC, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be HWC with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), mode="RGB")


def center_crop_resize(image: Any, width: int, height: int) -> np.ndarray:
    """Centre-crop `image` to the width:height aspect, then resize (Lanczos) -> uint8 [height, width, 3]."""
    from PIL import Image

    img = _to_rgb_uint8(image)
    src_w, src_h = img.size
    if src_h * width > src_w * height:  # too tall: keep the width, crop rows
        crop_w, crop_h = src_w, src_w * height / width
    else:  # too wide (or exact): keep the height, crop columns
        crop_w, crop_h = src_h * width / height, src_h
    left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    img = img.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
    if img.size != (width, height):
        # diffusers' VideoProcessor (used by the release) resizes with Lanczos as well.
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.array(img, dtype=np.uint8)  # a writable copy


class VideoVAE(FrozenModule):
    """Frozen Wan2.2 VAE: pixels in [-1, 1] <-> per-channel normalised latents `[B, 48, T, H/16, W/16]`."""

    def __init__(
        self, model: AutoencoderKLWan, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
    ):
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.latent_channels = int(cfg.z_dim)
        patch = int(cfg.patch_size or 1)
        self.pixel_channels = int(cfg.in_channels) // (patch * patch)
        # The true strides follow from the architecture; the config's scale factors must agree with them.
        arch_spatial = patch * 2 ** (len(cfg.dim_mult) - 1)
        arch_temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_stride = int(cfg.scale_factor_spatial or arch_spatial)
        self.temporal_stride = int(cfg.scale_factor_temporal or arch_temporal)
        if (self.spatial_stride, self.temporal_stride) != (arch_spatial, arch_temporal):
            raise ValueError(
                f"VAE config says strides (spatial {self.spatial_stride}, temporal {self.temporal_stride}) "
                f"but its architecture gives ({arch_spatial}, {arch_temporal}); "
                "fix scale_factor_spatial/scale_factor_temporal in config.json"
            )
        if mean is None or std is None:
            mean, std = self._stats_from_config(cfg)
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"latent mean/std need {self.latent_channels} values, got {mean.numel()}/{std.numel()}"
            )
        if bool((std <= 0).any()):
            raise ValueError("latent std values must be positive")
        self.mean = mean.view(1, -1, 1, 1, 1)
        self.std = std.view(1, -1, 1, 1, 1)

    def _stats_from_config(self, cfg: Any) -> tuple[list[float], list[float]]:
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None and len(mean) == len(std) == self.latent_channels:
            return list(mean), list(std)
        if self.latent_channels == len(WAN22_LATENT_MEAN):
            log.warning(
                "VAE config has no %d-value latents_mean/std; using the Wan2.2 table", self.latent_channels
            )
            return list(WAN22_LATENT_MEAN), list(WAN22_LATENT_STD)
        raise ValueError(
            f"VAE config has z_dim={self.latent_channels} but no matching latents_mean/latents_std "
            "(a Wan2.2 VAE has 48 of each in its config.json)"
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> VideoVAE:
        """Load a diffusers `AutoencoderKLWan` directory (config.json + weights); never downloads."""
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"video VAE directory {str(path)!r} not found or has no config.json: "
                "expected a diffusers AutoencoderKLWan folder (e.g. Wan2.2-TI2V-5B-Diffusers/vae)"
            )
        try:
            model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"could not load a diffusers AutoencoderKLWan from {str(path)!r}: {err}"
            ) from err
        return cls(model.to(device))

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise ValueError unless `pixels` is `[B, 3, 1+4k, H, W]`, H and W multiples of the stride."""
        if pixels.ndim != 5 or pixels.shape[1] != self.pixel_channels:
            raise ValueError(f"pixels must be [B, {self.pixel_channels}, F, H, W], got {tuple(pixels.shape)}")
        frames, height, width = pixels.shape[2:]
        if (frames - 1) % self.temporal_stride:
            raise ValueError(
                f"frame count must be 1 + {self.temporal_stride}k (e.g. 1, 5, ..., 101), got {frames}"
            )
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"H and W must be multiples of {self.spatial_stride}, got {height}x{width}")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be float in [-1, 1], got dtype {pixels.dtype}")

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> normalised latent `(mu - mean) / std`, fp32."""
        return (mu.float() - self.mean.to(mu.device)) / self.std.to(mu.device)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw VAE latent `z * std + mean`, fp32."""
        return latent.float() * self.std.to(latent.device) + self.mean.to(latent.device)

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels `[B, 3, F, H, W]` in [-1, 1] -> normalised latent `[B, 48, (F-1)/4+1, H/16, W/16]` fp32.

        Uses the posterior mean (as the release does) unless `sample=True`.
        """
        self.check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        posterior = self.model.encode(x).latent_dist
        mu = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.normalize(mu)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent `[B, 48, T, h, w]` -> pixels `[B, 3, 4(T-1)+1, 16h, 16w]` in [-1, 1], fp32."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"latent must be [B, {self.latent_channels}, T, h, w], got {tuple(latent.shape)}"
            )
        z = self.denormalize(latent.to(self.device)).to(self.dtype)
        return self.model.decode(z).sample.float().clamp_(-1.0, 1.0)

    def preprocess_image(self, image: Any, width: int, height: int) -> torch.Tensor:
        """uint8 HWC array or PIL image -> `[1, 3, 1, height, width]` fp32 in [-1, 1] (crop + resize)."""
        if width % self.spatial_stride or height % self.spatial_stride or width <= 0 or height <= 0:
            raise ValueError(
                f"image size must be positive multiples of {self.spatial_stride}, got {width}x{height}"
            )
        arr = center_crop_resize(image, width, height)
        pixels = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels[None, :, None]

    def encode_image(self, image: Any, width: int, height: int) -> torch.Tensor:
        """Reference image for i2v -> normalised first-frame latent `[1, 48, 1, height/16, width/16]` fp32."""
        return self.encode(self.preprocess_image(image, width, height))
