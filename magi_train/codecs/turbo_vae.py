"""TurboVAED: the light LTX-style video decoder the daVinci-MagiHuman release decodes with (spec §6.2).

A decode-only student distilled from the Wan2.2 VAE decoder: normalised Wan2.2 latents `[B, 48, T, h, w]`
-> pixels `[B, 3, 4(T-1)+1, 16h, 16w]` in [-1, 1]. Written after the release's
`inference/model/turbo_vaed/turbo_vaed_module.py` (GAIR-NLP/daVinci-MagiHuman): the module tree and parameter
names are the release's, so its checkpoint (`turbo_vae/checkpoint-340000.ckpt`, `ema_state_dict`) loads with a
strict key check, and its config json (`TurboV3-Wan22-TinyShallow_7_7.json`) builds the same architecture.

Architecture (config lists are in encoder order; the decoder reverses them):
    conv_in (3x3x3) -> mid_block (resnets) -> up_blocks (optional channel-changing resnet `conv_in`, one
    `WanResample` upsampler: "upsample3d" = time_conv (3x1x1, d -> 2d) interleaved to 2T (the first chunk drops
    its first frame) then nearest-exact 2x + conv 3x3, "upsample2d" = spatial only; resnets after an upsampler
    start with ReLU) -> parameter-free RMSNorm -> SiLU -> conv_out -> unpatchify(2).
"Causal" convolutions pad time symmetrically by replicating the edge frames ((k-1)/2 each side); RMSNorms
have no weights (eps 1e-8, over channels; the resnet shortcut norm uses resnet_norm_eps).
Decoding runs in overlapping windows of latent frames (first_chunk_size, then step_size) with one latent frame
of context on each inner side, whose 4 pixel frames are trimmed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magi_train.codecs.frozen import FrozenModule
from magi_train.codecs.video_vae import VIDEO_LATENT_CHANNELS, WAN22_LATENT_MEAN, WAN22_LATENT_STD
from magi_train.utils.fileio import atomic_dir

log = logging.getLogger(__name__)

CONFIG_NAME = (
    "turbo_vae.json"  # what `save_turbo_vae` writes; the release ships TurboV3-Wan22-TinyShallow_7_7.json
)
CHECKPOINT_NAME = "checkpoint.ckpt"  # the release ships checkpoint-340000.ckpt
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
NORM_EPS = 1e-8  # of every weight-free RMSNorm of the release except the resnet shortcut's
# keys of the release's config json (diffusers ConfigMixin / the Turbo-VAED training code) that do not shape the
# decoder: read and ignored like diffusers' from_config does
IGNORED_KEYS = frozenset({
    "in_channels", "patch_size_t", "scaling_factor", "architectures", "timestep_conditioning",
    "decoder_inject_noise", "upsample_residual", "upsample_factor", "is_video_dc_ae",
    "aligned_feature_projection_mode", "aligned_feature_projection_dim", "aligned_blks_indices",
})  # fmt: skip


@dataclass
class TurboVAEConfig:
    """The decoder's config json. Defaults: the released `TurboV3-Wan22-TinyShallow_7_7.json` (spec §6.2 [3p])."""

    latent_channels: int = VIDEO_LATENT_CHANNELS
    out_channels: int = 3
    decoder_block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    decoder_layers_per_block: list[int] = field(default_factory=lambda: [2, 2, 2, 3, 3])  # mid block last
    decoder_spatio_temporal_scaling: list[bool] = field(default_factory=lambda: [False, True, True, True])
    decoder_spatio_only: list[bool] = field(default_factory=lambda: [False, True, False, False])
    decoder_is_dw_conv: list[bool] = field(default_factory=lambda: [False] * 5)
    decoder_dw_kernel_size: int = 5
    decoder_causal: bool = False  # the release asserts False
    patch_size: int = 2  # the release asserts 2
    resnet_norm_eps: float = 1e-6
    use_unpatchify: bool = True
    first_chunk_size: int = 7  # latent frames of the first decode window
    step_size: int = 7  # latent frames of every later window
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "TurboVAED config") -> TurboVAEConfig:
        """Known keys -> fields; `_`-prefixed and non-architecture keys ignored; anything else named and ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in names and k not in IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            log.warning("%s: ignoring keys that do not shape the decoder: %s", where, unknown)
        values = {k: raw[k] for k in names if k in raw}
        for key in ("decoder_block_out_channels", "decoder_layers_per_block", "decoder_spatio_temporal_scaling",
                    "decoder_spatio_only", "decoder_is_dw_conv"):  # fmt: skip
            if key in values:
                if not isinstance(values[key], list | tuple):
                    raise ValueError(f"{where}: {key} must be a list, got {values[key]!r}")
                values[key] = list(values[key])
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> TurboVAEConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"TurboVAED config {str(path)!r} could not be read as JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"TurboVAED config {str(path)!r} must hold a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "TurboVAED", **dataclasses.asdict(self)}

    @property
    def num_blocks(self) -> int:
        return len(self.decoder_block_out_channels)

    def strides(self) -> tuple[int, int]:
        """(spatial, temporal) upsampling of the architecture: 2 per scaling block (time too unless spatio-only),
        and 2 more in space from unpatchify / the pixel-shuffle upsampler."""
        scaled = [s for s in self.decoder_spatio_temporal_scaling]
        temporal = [s and not o for s, o in zip(scaled, self.decoder_spatio_only, strict=True)]
        return 2 ** sum(scaled) * self.patch_size, 2 ** sum(temporal)

    def validate(self, where: str = "TurboVAED config") -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"{where}: {msg}")

        n = self.num_blocks
        for key, want in (("decoder_layers_per_block", n + 1), ("decoder_spatio_temporal_scaling", n),
                          ("decoder_spatio_only", n), ("decoder_is_dw_conv", n + 1)):  # fmt: skip
            if len(getattr(self, key)) != want:
                fail(f"{key} needs {want} entries for {n} blocks, got {getattr(self, key)}")
        if n < 1 or min(self.decoder_block_out_channels) < 1 or min(self.decoder_layers_per_block) < 0:
            fail("decoder_block_out_channels must be positive and decoder_layers_per_block non-negative")
        if self.patch_size != 2:
            fail(f"patch_size must be 2 (as released), got {self.patch_size}")
        if self.decoder_causal:
            fail("decoder_causal must be false (the released decoder pads time symmetrically)")
        if not self.use_unpatchify and self.decoder_block_out_channels[0] % 4:
            fail("without use_unpatchify the first block's channels must be a multiple of 4 (pixel shuffle)")
        if self.first_chunk_size < 1 or self.step_size < 1:
            fail(f"first_chunk_size and step_size must be >= 1, got {self.first_chunk_size}/{self.step_size}")
        spatial, temporal = self.strides()
        if (spatial, temporal) != (self.spatial_compression_ratio, self.temporal_compression_ratio):
            fail(
                f"the blocks upsample {spatial}x in space and {temporal}x in time but the config says "
                f"spatial_compression_ratio {self.spatial_compression_ratio}, temporal_compression_ratio "
                f"{self.temporal_compression_ratio}"
            )


# ---------------------------------------------------------------------------------------------------------
# Layers (names as released)
# ---------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Weight-free RMSNorm over the channel dim (1), statistics in fp32, result in x's dtype."""
    variance = x.float().pow(2).mean(1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


def _triple(k: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return k if isinstance(k, tuple) else (k, k, k)


def _pad_time(x: Tensor, kernel_t: int) -> Tensor:
    """Replicate the first / last frame (k-1)/2 times on each side ("causal" in name only)."""
    if kernel_t <= 1:
        return x
    pad = (kernel_t - 1) // 2
    return torch.cat(
        [x[:, :, :1].expand(-1, -1, pad, -1, -1), x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2
    )


class CausalConv3d(nn.Module):
    """Conv3d with zero padding in space and edge-replicate padding in time (release: TurboVAEDCausalConv3d)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        _, kh, kw = self.kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, padding=(0, kh // 2, kw // 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_pad_time(x, self.kernel_size[0]))


class DepthwiseSeparableConv3d(nn.Module):
    """Depthwise conv then 1x1x1 pointwise conv (release: TurboVAEDCausalDepthwiseSeperableConv3d)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        _, kh, kw = self.kernel_size
        self.depthwise_conv = nn.Conv3d(
            in_channels, in_channels, self.kernel_size, padding=(0, kh // 2, kw // 2), groups=in_channels
        )
        self.pointwise_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(_pad_time(x, self.kernel_size[0])))


class ResnetBlock3d(nn.Module):
    """RMSNorm -> act -> conv -> RMSNorm -> SiLU -> conv, plus (RMSNorm -> 1x1 conv) shortcut when channels change.

    `relu_first`: the release's `is_upsampler_modified` (resnets after an upsampler start with ReLU).
    """

    def __init__(
        self, cin: int, cout: int, eps: float, relu_first: bool = False, dw: bool = False, dw_k: int = 3
    ):
        super().__init__()
        conv, k = (DepthwiseSeparableConv3d, dw_k) if dw else (CausalConv3d, 3)
        self.eps, self.relu_first = eps, relu_first
        self.conv1 = conv(cin, cout, k)
        self.conv2 = conv(cout, cout, k)
        self.conv_shortcut = conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = rms_norm(x, NORM_EPS)
        h = F.relu(h) if self.relu_first else F.silu(h)
        h = self.conv1(h)
        h = self.conv2(F.silu(rms_norm(h, NORM_EPS)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(rms_norm(x, self.eps))
        return h + x


class WanResample(nn.Module):
    """2x upsampling: "upsample3d" doubles time (time_conv d -> 2d, interleaved) then space; "upsample2d" space.

    Per frame: nearest-exact 2x (in fp32) then a 3x3 conv (`resample.1`, as the release's Sequential).
    """

    def __init__(self, dim: int, mode: str, out_dim: int):
        super().__init__()
        assert mode in ("upsample2d", "upsample3d"), mode
        self.mode = mode
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, out_dim, 3, padding=1))  # fmt: skip
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if mode == "upsample3d" else None

    def forward(self, x: Tensor, is_first_chunk: bool) -> Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None:
            # channels (n c) -> frames (t n): output frame 2t+n comes from channel block n
            x = self.time_conv(x).view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            if is_first_chunk:
                x = x[:, :, 1:]  # 1 + 4k frames: the first latent frame stands for one pixel frame
        t = x.shape[2]
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [(b t), c, h, w]
        frames = self.resample[0](frames.float()).to(x.dtype)
        frames = self.resample[1](frames)
        return frames.view(b, t, -1, 2 * h, 2 * w).transpose(1, 2)


class MidBlock3d(nn.Module):
    def __init__(self, dim: int, num_layers: int, eps: float, dw: bool, dw_k: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3d(dim, dim, eps, dw=dw, dw_k=dw_k) for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UpBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, eps: float, scale: bool, spatio_only: bool,
                 dw: bool, dw_k: int):  # fmt: skip
        super().__init__()
        self.conv_in = ResnetBlock3d(cin, cout, eps, dw=dw, dw_k=dw_k) if cin != cout else None
        mode = "upsample2d" if spatio_only else "upsample3d"
        self.upsamplers = nn.ModuleList([WanResample(cout, mode, cout)]) if scale else None
        self.resnets = nn.ModuleList(
            ResnetBlock3d(cout, cout, eps, relu_first=scale, dw=dw, dw_k=dw_k) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, is_first_chunk: bool) -> Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        for up in self.upsamplers or ():
            x = up(x, is_first_chunk)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class Conv2dSplitUpsampler(nn.Module):
    """3x3 conv then pixel shuffle 2x (used instead of unpatchify when use_unpatchify is false)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """[B, C*p*p, F, h, w] -> [B, C, F, h*p, w*p]; channel c*p*p + i*p + j goes to row offset j, column offset i
    (the release's / Wan's channel order)."""
    b, cp, f, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, f, h, w)  # b c i j f h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cp // (p * p), f, h * p, w * p)


class TurboVAEDDecoder3d(nn.Module):
    """The decoder network of one window: latent `[B, 48, T, h, w]` (de-normalised) -> pixels."""

    def __init__(self, cfg: TurboVAEConfig):
        super().__init__()
        channels = list(reversed(cfg.decoder_block_out_channels))
        layers = list(reversed(cfg.decoder_layers_per_block))
        scaling = list(reversed(cfg.decoder_spatio_temporal_scaling))
        spatio_only = list(reversed(cfg.decoder_spatio_only))
        dw = list(reversed(cfg.decoder_is_dw_conv))
        eps, dw_k = cfg.resnet_norm_eps, cfg.decoder_dw_kernel_size
        self.patch_size, self.use_unpatchify = cfg.patch_size, cfg.use_unpatchify
        self.conv_in = CausalConv3d(cfg.latent_channels, channels[0], 3)
        self.mid_block = MidBlock3d(channels[0], layers[0], eps, dw[0], dw_k)
        self.up_blocks = nn.ModuleList(
            UpBlock3d(cin, cout, layers[i + 1], eps, scaling[i], spatio_only[i], dw[i + 1], dw_k)
            for i, (cin, cout) in enumerate(zip([channels[0], *channels[:-1]], channels, strict=True))
        )
        out = channels[-1]
        self.upsampler2d_1 = None
        if not cfg.use_unpatchify:
            self.upsampler2d_1 = Conv2dSplitUpsampler(out)
            out //= 4
        conv_out = cfg.out_channels * cfg.patch_size**2 if cfg.use_unpatchify else cfg.out_channels
        self.conv_out = CausalConv3d(out, conv_out, 3)

    def forward(self, z: Tensor, is_first_chunk: bool = True) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x, is_first_chunk)
        if self.upsampler2d_1 is not None:
            x = F.silu(rms_norm(x, NORM_EPS))
            x = torch.stack([self.upsampler2d_1(x[:, :, t]) for t in range(x.shape[2])], dim=2)
        x = self.conv_out(F.silu(rms_norm(x, NORM_EPS)))
        return unpatchify(x, self.patch_size) if self.use_unpatchify else x


class TurboVAED(nn.Module):
    """The released decoder: Wan2.2 de-normalisation, then `decoder` over overlapping windows of latent frames."""

    def __init__(self, cfg: TurboVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.decoder = TurboVAEDDecoder3d(cfg)
        n = cfg.latent_channels
        if n == len(WAN22_LATENT_MEAN):
            mean, std = torch.tensor(WAN22_LATENT_MEAN), torch.tensor(WAN22_LATENT_STD)
        else:  # a decoder of other latents: identity normalisation
            mean, std = torch.zeros(n), torch.ones(n)
        # not part of the checkpoint (the release holds them as plain tensors)
        self.register_buffer("latent_mean", mean.view(1, n, 1, 1, 1), persistent=False)
        self.register_buffer("latent_inv_std", (1.0 / std).view(1, n, 1, 1, 1), persistent=False)

    def denormalize(self, latent: Tensor) -> Tensor:
        """Normalised latent -> raw Wan2.2 latent, `z / (1/std) + mean` in fp32 as released."""
        z = latent.float() / self.latent_inv_std.float() + self.latent_mean.float()
        return z.to(latent.dtype)

    def windows(self, num_frames: int) -> tuple[int, list[tuple[int, int, bool, int, int]]]:
        """(padding frames, [(start, stop, is_first, trim_left, trim_right)]) of the release's sliding decode.

        Frames are padded (last frame repeated) to first_chunk_size + n * step_size; the first window gets one
        extra frame on the right, middle ones one on each side, the last one on the left; each context frame
        costs `temporal_compression_ratio` pixel frames, trimmed.
        """
        first, step, ctx = self.cfg.first_chunk_size, self.cfg.step_size, self.cfg.temporal_compression_ratio
        if num_frames < first:
            pad = first - num_frames
        else:
            pad = -(num_frames - first) % step
        total = num_frames + pad
        if total == first:
            return pad, [(0, total, True, 0, 0)]
        spans = [(0, first + 1, True, 0, ctx)]
        for i in range(first, total, step):
            last = i + step == total
            spans.append((i - 1, i + step if last else i + step + 1, False, ctx, 0 if last else ctx))
        return pad, spans

    def decode_raw(self, z: Tensor) -> Tensor:
        """De-normalised latent `[B, C, T, h, w]` -> pixels `[B, 3, 4(T-1)+1, 16h, 16w]`, window by window."""
        pad, spans = self.windows(z.shape[2])
        if pad:
            z = torch.cat([z, z[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        chunks = []
        for start, stop, first, left, right in spans:
            out = self.decoder(z[:, :, start:stop], is_first_chunk=first)
            chunks.append(out[:, :, left : out.shape[2] - right])
        out = torch.cat(chunks, dim=2)
        return out[:, :, : out.shape[2] - pad * self.cfg.temporal_compression_ratio]

    def forward(self, latent: Tensor) -> Tensor:
        """Normalised latent `[B, C, T, h, w]` -> pixels (not clamped)."""
        return self.decode_raw(self.denormalize(latent))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the released layout
# ---------------------------------------------------------------------------------------------------------


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def decoder_state_dict(ckpt: Any, where: str = "TurboVAED checkpoint") -> dict[str, Tensor]:
    """`ema_state_dict` of a released-layout checkpoint -> keys of `TurboVAED` (`decoder.*`), as the release loads it:
    a `module.` prefix is stripped, keys with neither `decoder.` nor `encoder.` prefix belong to the decoder, and
    other keys (an encoder, training-only heads) are not part of it."""
    if not isinstance(ckpt, dict) or "ema_state_dict" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{where}: no 'ema_state_dict' (a TurboVAED checkpoint holds one); found {found}")
    state = ckpt["ema_state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{where}: 'ema_state_dict' is empty or not a dict of tensors")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if not any(k.startswith(("decoder.", "encoder.")) for k in state):
        state = {f"decoder.{k}": v for k, v in state.items()}
    kept = {k: v for k, v in state.items() if k.startswith("decoder.")}
    if len(kept) < len(state):
        log.info("%s: %d tensors outside the decoder not loaded", where, len(state) - len(kept))
    if not kept:
        raise ValueError(
            f"{where}: 'ema_state_dict' holds no decoder tensors (keys: {_listing(sorted(state))})"
        )
    bad = sorted(k for k, v in kept.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {_listing(bad)}")
    return kept


def load_decoder_weights(
    model: TurboVAED, state: dict[str, Tensor], where: str = "TurboVAED checkpoint"
) -> None:
    """Strict load: every key of the model present with its shape, no key left over; else a ValueError listing them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {list(state[k].shape)} (model {list(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise ValueError(
            f"{where} does not match the TurboVAED built from its config json: "
            + "; ".join(problems)
            + " (is the json the one shipped with this checkpoint?)"
        )
    model.load_state_dict(state, strict=True)


def find_turbo_files(path: str | Path, what: str = "turbo_vae") -> tuple[Path, Path]:
    """(config json, checkpoint) of a TurboVAED directory: one `*.json` and one `*.ckpt`/`.pt`/`.pth` file."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"{what}={str(root)!r} is not a directory: give the folder holding the TurboVAED config json and its "
            "checkpoint (the release's turbo_vae/ with TurboV3-Wan22-TinyShallow_7_7.json, checkpoint-340000.ckpt)"
        )
    jsons = sorted(p for p in root.glob("*.json") if p.is_file())
    ckpts = sorted(p for p in root.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    for kind, found in (("config .json", jsons), ("checkpoint (.ckpt/.pt/.pth)", ckpts)):
        if len(found) != 1:
            names = [p.name for p in found] or "none"
            raise ValueError(f"{what}={str(root)!r} must hold exactly one {kind} file, found {names}")
    return jsons[0], ckpts[0]


def load_turbo_vaed(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    what: str = "turbo_vae",
) -> TurboVAED:  # fmt: skip
    """Build the TurboVAED of a directory's config json and strictly load its checkpoint's `ema_state_dict`."""
    config_path, ckpt_path = find_turbo_files(path, what)
    cfg = TurboVAEConfig.from_json(config_path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (
        Exception
    ) as err:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError) for bad files
        raise ValueError(f"{what}: could not read {str(ckpt_path)!r} as a torch checkpoint: {err}") from err
    model = TurboVAED(cfg)
    load_decoder_weights(model, decoder_state_dict(ckpt, str(ckpt_path)), str(ckpt_path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_turbo_vae(path: str | Path, model: TurboVAED, overwrite: bool = True) -> Path:
    """Write `path/turbo_vae.json` + `path/checkpoint.ckpt` ({"ema_state_dict": decoder.*}) atomically, the layout
    `load_turbo_vaed` and the release's loader read. Weights are saved in fp32."""
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=2))
        torch.save({"ema_state_dict": state}, tmp / CHECKPOINT_NAME)

    return atomic_dir(path, write, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------
# The codec: the same decode() as VideoVAE
# ---------------------------------------------------------------------------------------------------------


class TurboVAE(FrozenModule):
    """Frozen TurboVAED as a video decoder: normalised latent `[B, 48, T, h, w]` -> pixels in [-1, 1], like
    `VideoVAE.decode` (it has no encoder: image latents for i2v still come from the Wan2.2 VAE)."""

    name = "turbo"

    def __init__(self, model: TurboVAED, path: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.path = path
        self.latent_channels = model.cfg.latent_channels
        self.spatial_stride = model.cfg.spatial_compression_ratio
        self.temporal_stride = model.cfg.temporal_compression_ratio

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        what: str = "turbo_vae",
    ) -> TurboVAE:  # fmt: skip
        return cls(load_turbo_vaed(path, dtype, device, what), str(path))

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent `[B, 48, T, h, w]` -> pixels `[B, 3, 4(T-1)+1, 16h, 16w]` in [-1, 1], fp32."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"latent must be [B, {self.latent_channels}, T, h, w], got {tuple(latent.shape)}"
            )
        # as released: the latent is cast to the decoder's dtype first, then de-normalised in fp32
        z = self.model.denormalize(latent.to(device=self.device, dtype=self.dtype))
        return self.model.decode_raw(z).float().clamp_(-1.0, 1.0)
