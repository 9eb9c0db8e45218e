"""The single-stream "sandwich" DiT of daVinci-MagiHuman (arXiv 2603.21986), as released (GAIR-NLP @ 209209b).

One Transformer denoises video and audio latents jointly, conditioned on text features, with no timestep
input and no cross-attention: every clip is the token sequence [video | audio | text] and all tokens meet
in one bidirectional self-attention. Layers listed in `mm_layers` keep separate weights per modality
(video, audio, text), stacked on the output dim exactly as the released checkpoints store them; the
others share one set. Several clips are packed into one sequence with per-clip (varlen) attention.

The module tree is named like the released checkpoint so that `checkpoint.py` only has to check keys,
shapes and dtypes. This file holds no Lightning, Hydra, data or distributed code (see `parallelize.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magi_train.models.attention import frame_ids, local_varlen_attention, varlen_attention

VIDEO, AUDIO, TEXT = 0, 1, 2  # modality ids; also the expert order in stacked weights (released order)
NUM_MODALITIES = 3
VIDEO_LATENT_CHANNELS = 48  # Wan2.2 VAE z_dim
PATCH = (1, 2, 2)  # video patch (t, h, w)


@dataclass
class DiTConfig:
    """Architecture of one DiT. Defaults are the released 15B model (`inference/common/config.py`)."""

    num_layers: int = 40
    hidden_size: int = 5120
    head_dim: int = 128
    num_heads_kv: int = 8  # GQA groups ("num_query_groups")
    mm_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 36, 37, 38, 39])
    gelu7_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    enable_attn_gating: bool = True
    video_in_channels: int = VIDEO_LATENT_CHANNELS * 4  # 48 channels x 1x2x2 patch
    audio_in_channels: int = 64
    text_in_channels: int = 3584  # T5-Gemma-9B encoder width
    text_coords: str = "v2"  # "v2": base/distill (text has no rotation); "v1": SR model (t in [0, 1])
    # frame-local attention (the released 1080p SR model, spec §2.8): in these layers a video query of latent frame i
    # sees the video keys of frames i - R .. i + R (R = frame_receptive_field) and every audio/text key
    local_attn_layers: list[int] = field(default_factory=list)
    frame_receptive_field: int = 11  # released DataProxyConfig
    rope_temperature: float = 10000.0
    norm_eps: float = 1e-6
    # runtime options, applied from outside by parallelize(); they do not change the weights
    # none | full | selective | every_k (true = full, false = none); parallelize.py AC_MODES
    activation_checkpointing: Any = "none"
    ac_every: int = 1  # full / every_k: checkpoint every k-th layer (1 = all)
    compile: bool = False
    attn_backend: str = "auto"  # auto | flash | sdpa
    tread: Any = (
        None  # TREAD token routing in training forwards: null | released | {selection_rate, ...} (tread.py)
    )

    @property
    def num_heads_q(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def gelu7_intermediate(self) -> int:
        return self.hidden_size * 4

    @property
    def swiglu7_intermediate(self) -> int:
        # int(h * 4 * 2/3) rounded down to a multiple of 4: 13652 for h = 5120 (released)
        return int(self.hidden_size * 4 * 2 / 3) // 4 * 4

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid model config: {msg}")

        if self.hidden_size % self.head_dim:
            fail(f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 8:
            fail(f"head_dim {self.head_dim} must be a multiple of 8 (RoPE uses head_dim/8 bands per axis)")
        if self.num_heads_q % self.num_heads_kv:
            fail(f"{self.num_heads_q} query heads are not divisible into {self.num_heads_kv} KV groups")
        if self.frame_receptive_field < 0:
            fail(f"frame_receptive_field must be >= 0 latent frames, got {self.frame_receptive_field}")
        for name in ("mm_layers", "gelu7_layers", "local_attn_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                fail(f"{name} has layer indices {bad} outside [0, {self.num_layers})")
        if self.text_coords not in ("v1", "v2"):
            fail(f"text_coords must be 'v1' or 'v2', got {self.text_coords!r}")
        if self.attn_backend not in ("auto", "flash", "sdpa"):
            fail(f"attn_backend must be auto, flash or sdpa, got {self.attn_backend!r}")
        # the runtime options' own checks live with the code that applies them, outside this file
        from magi_train.models.parallelize import ac_mode
        from magi_train.models.tread import tread_config

        ac_mode(self.activation_checkpointing)
        tread_config(self.tread, self.num_layers)


# ---------------------------------------------------------------------------------------------------------
# Packing: several clips -> one token sequence with per-clip attention
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PackedSeq:
    """Layout of a packed sequence [v1 a1 t1 | v2 a2 t2 | ...] shared by every layer of one forward."""

    cu_seqlens: Tensor  # [B+1] int32, clip boundaries
    max_seqlen: int
    modality: Tensor  # [L] long, VIDEO/AUDIO/TEXT per token
    perm: Tensor  # [L] gather index that sorts tokens by modality (stable)
    inv_perm: Tensor  # [L] inverse of perm
    sizes: list[int]  # token count per modality, in modality order
    rope: Tensor  # [L, 3/4 * head_dim] fp32: [sin_t sin_h sin_w | cos_t cos_h cos_w]
    video_grids: list[tuple[int, int, int]]  # (T, H, W) latent size per clip
    audio_lens: list[int]
    frame: Tensor | None = None  # [L] long latent frame of each video token, -1 for audio/text (local layers)

    def by_modality(self, x: Tensor) -> list[Tensor]:
        """Split token rows [L, ...] into per-modality blocks (video, audio, text)."""
        return list(x[self.perm].split(self.sizes))

    def from_modality(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts)[self.inv_perm]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, backend: str, window: int | None = None) -> Tensor:
        """Per-clip attention of this layout's tokens, frame-local within `window` latent frames when given; a
        context-parallel layout (models/parallelize.py) overrides it to exchange heads for tokens across its ranks
        around the same attention."""
        if window is None:
            return varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, backend)
        return local_varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, self.frame, window, backend)


def patchify(video: Tensor) -> Tensor:
    """[C, T, H, W] -> [T*(H/2)*(W/2), C*4]; tokens row-major (t, h, w), channel index c*4 + kh*2 + kw.

    This is the released input order (unfoldNd: channel outermost), not the output order (see unpatchify).
    """
    c, t, h, w = video.shape
    x = video.reshape(c, t, h // 2, 2, w // 2, 2)  # c t h kh w kw
    return x.permute(1, 2, 4, 0, 3, 5).reshape(t * (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], channels: int = VIDEO_LATENT_CHANNELS) -> Tensor:
    """[T*(H/2)*(W/2), 4*C] -> [C, T, H, W]; the head's channel index is (kh*2 + kw)*C + c (C innermost)."""
    t, h, w = grid
    x = tokens.reshape(t, h // 2, w // 2, 2, 2, channels)  # t h w kh kw c
    return x.permute(5, 0, 1, 3, 2, 4).reshape(channels, t, h, w)


def rope_bands(head_dim: int, temperature: float = 10000.0) -> Tensor:
    """temperature^(-k/n) for k < n = head_dim/8: the frequencies of each of the 3 RoPE axes."""
    n = head_dim // 8
    return temperature ** (-torch.arange(n, dtype=torch.float64) / n)


def _axis_positions(size: int, ref: int, offset: float, centred: bool) -> Tensor:
    """Rescaled positions (coord - centre) * (ref-1)/(size-1) of one axis, as the released Fourier embed."""
    coord = torch.arange(size, dtype=torch.float64) + offset
    if size == 1:
        scale = 1.0  # released: scale forced to 1 when size == ref == 1 (v1 text of length 1: see docs)
    else:
        scale = (ref - 1) / (size - 1)
    centre = (size - 1) / 2 if centred else 0.0
    return (coord - centre) * scale


def token_positions(
    grid: tuple[int, int, int], audio_len: int, text_len: int, text_coords: str = "v2"
) -> Tensor:
    """Per-token (t, h, w) positions [L, 3] of one clip [video | audio | text], in latent-patch units.

    Video: t in 0..T-1, h/w centred. Audio latent i at time i*(T-1)/(A-1) = i/4 on the video-latent axis.
    Text v2 (base/distill): offset -L with ref 1 -> scale 0, i.e. no rotation at all. Text v1 (SR): i/(L-1).
    """
    t, hp, wp = grid[0], grid[1] // 2, grid[2] // 2
    tt, hh, ww = torch.meshgrid(
        _axis_positions(t, t, 0, False),
        _axis_positions(hp, hp, 0, True),
        _axis_positions(wp, wp, 0, True),
        indexing="ij",
    )
    video = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=-1)
    audio = torch.zeros(audio_len, 3, dtype=torch.float64)
    audio[:, 0] = _axis_positions(audio_len, (audio_len - 1) // 4 + 1, 0, False)
    text = torch.zeros(text_len, 3, dtype=torch.float64)
    if text_coords == "v2":
        text[:, 0] = _axis_positions(text_len, 1, -text_len, False)
    else:
        text[:, 0] = _axis_positions(text_len, 2, 0, False)
    return torch.cat([video, audio, text])


def rope_table(positions: Tensor, bands: Tensor) -> Tensor:
    """[L, 3] positions x [n] bands -> [L, 6n] = [sin_t sin_h sin_w | cos_t cos_h cos_w] (fp32)."""
    angles = (positions.double()[:, :, None] * bands.double()[None, None, :]).flatten(1)  # [L, 3n]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate the first 3/4 of each head's dims of x [L, heads, d] ("rotate half": dim j pairs with j+r/2)."""
    sin, cos = rope[:, None, :].chunk(2, dim=-1)  # [L, 1, r/2] each
    r = 2 * sin.shape[-1]
    x_rot, x_pass = x[..., :r].float(), x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


def pack(
    video: list[Tensor], audio: list[Tensor], text: list[Tensor], cfg: DiTConfig, bands: Tensor
) -> tuple[Tensor, PackedSeq]:
    """Pack clips into token rows. Returns the per-modality input tokens (modality-sorted) and the layout."""
    if not (len(video) == len(audio) == len(text)) or not video:
        raise ValueError(
            f"need the same non-zero number of video, audio and text entries, got "
            f"{len(video)}, {len(audio)}, {len(text)}"
        )
    device = video[0].device
    modality, positions, lens, frames = [], [], [], []
    vid_tokens, aud_tokens, txt_tokens, grids = [], [], [], []
    for i, (v, a, s) in enumerate(zip(video, audio, text, strict=True)):
        if v.ndim != 4 or v.shape[0] * 4 != cfg.video_in_channels or v.shape[2] % 2 or v.shape[3] % 2:
            raise ValueError(
                f"clip {i}: video latent must be [{cfg.video_in_channels // 4}, T, H, W] with even H, W; "
                f"got {list(v.shape)}"
            )
        if a.ndim != 2 or a.shape[1] != cfg.audio_in_channels:
            raise ValueError(
                f"clip {i}: audio latent must be [A, {cfg.audio_in_channels}], got {list(a.shape)}"
            )
        if s.ndim != 2 or s.shape[1] != cfg.text_in_channels or s.shape[0] < 1:
            raise ValueError(
                f"clip {i}: text features must be [L>=1, {cfg.text_in_channels}], got {list(s.shape)}"
            )
        grid = tuple(v.shape[1:])
        vt = patchify(v)
        grids.append(grid)
        vid_tokens.append(vt)
        aud_tokens.append(a)
        txt_tokens.append(s)
        counts = (vt.shape[0], a.shape[0], s.shape[0])
        modality += [torch.full((n,), m, dtype=torch.long) for m, n in enumerate(counts)]
        positions.append(token_positions(grid, a.shape[0], s.shape[0], cfg.text_coords))
        frames.append(frame_ids(grid, a.shape[0], s.shape[0]))
        lens.append(sum(counts))
    modality_t = torch.cat(modality).to(device)
    perm = torch.argsort(modality_t, stable=True)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    layout = PackedSeq(
        cu_seqlens=cu.to(device),
        max_seqlen=max(lens),
        modality=modality_t,
        perm=perm,
        inv_perm=inv_perm,
        sizes=[sum(t.shape[0] for t in toks) for toks in (vid_tokens, aud_tokens, txt_tokens)],
        rope=rope_table(torch.cat(positions), bands.cpu()).to(device),
        video_grids=grids,
        audio_lens=[a.shape[0] for a in audio],
        frame=torch.cat(frames).to(device),
    )
    inputs = [torch.cat(vid_tokens), torch.cat(aud_tokens), torch.cat(txt_tokens)]
    return inputs, layout


# ---------------------------------------------------------------------------------------------------------
# Modality-aware building blocks
# ---------------------------------------------------------------------------------------------------------


class ModalityRMSNorm(nn.Module):
    """Zero-centred RMSNorm, x * rsqrt(mean(x^2) + eps) * (w + 1), in fp32; one weight per modality if mm."""

    def __init__(self, dim: int, num_modality: int = 1, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_modality, self.eps = dim, num_modality, eps
        self.weight = nn.Parameter(torch.zeros(dim * num_modality))  # released layout: experts stacked

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (weight.float() + 1)).to(
            x.dtype
        )

    def forward(self, x: Tensor, seq: PackedSeq | None = None) -> Tensor:
        if self.num_modality == 1:
            return self._norm(x, self.weight)
        parts = seq.by_modality(x)
        weights = self.weight.chunk(self.num_modality)
        return seq.from_modality([self._norm(p, w) for p, w in zip(parts, weights, strict=True)])


class ModalityLinear(nn.Module):
    """Bias-free linear; with num_modality=3 the weight is [3*out, in], expert m = rows m*out:(m+1)*out."""

    def __init__(self, in_features: int, out_features: int, num_modality: int = 1):
        super().__init__()
        self.num_modality = num_modality
        self.weight = nn.Parameter(torch.empty(out_features * num_modality, in_features))
        for w in self.weight.chunk(num_modality):
            nn.init.normal_(w, std=in_features**-0.5)

    def forward(self, x: Tensor, seq: PackedSeq | None = None) -> Tensor:
        if self.num_modality == 1:
            return F.linear(x, self.weight)
        parts = seq.by_modality(x)
        weights = self.weight.chunk(self.num_modality)
        return seq.from_modality([F.linear(p, w) for p, w in zip(parts, weights, strict=True)])


def swiglu7(x: Tensor, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """GPT-OSS-style clamped SwiGLU; gate and linear rows are interleaved (even row = gate of unit j)."""
    glu, lin = x[..., ::2].clamp(max=limit), x[..., 1::2].clamp(-limit, limit)
    return glu * torch.sigmoid(alpha * glu) * (lin + 1)


def gelu7(x: Tensor, alpha: float = 1.702) -> Tensor:
    """Clamped sigmoid-GELU approximation used (ungated) in the released first layers."""
    x = x.clamp(max=7.0)
    return x * torch.sigmoid(alpha * x)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig, num_modality: int, local: bool = False):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.frame_receptive_field if local else None  # None: the clip's full attention
        hq, hkv, d = cfg.num_heads_q, cfg.num_heads_kv, cfg.head_dim
        # q | k | v | one gate logit per query head (the gate rows exist only with gating on)
        self.split = [hq * d, hkv * d, hkv * d] + ([hq] if cfg.enable_attn_gating else [])
        self.pre_norm = ModalityRMSNorm(cfg.hidden_size, num_modality, cfg.norm_eps)
        self.linear_qkv = ModalityLinear(cfg.hidden_size, sum(self.split), num_modality)
        self.q_norm = ModalityRMSNorm(d, num_modality, cfg.norm_eps)
        self.k_norm = ModalityRMSNorm(d, num_modality, cfg.norm_eps)
        self.linear_proj = ModalityLinear(hq * d, cfg.hidden_size, num_modality)

    def forward(self, h: Tensor, seq: PackedSeq) -> Tensor:
        cfg, n = self.cfg, h.shape[0]
        qkv = self.linear_qkv(self.pre_norm(h, seq), seq)  # [L, 7208] for 15B
        q, k, v, *gate = qkv.split(self.split, dim=-1)
        q = self.q_norm(q.reshape(n, cfg.num_heads_q, cfg.head_dim), seq)
        k = self.k_norm(k.reshape(n, cfg.num_heads_kv, cfg.head_dim), seq)
        q, k = apply_rope(q.float(), seq.rope), apply_rope(k.float(), seq.rope)
        dtype = v.dtype  # bf16 under autocast, fp32 otherwise
        v = v.reshape(n, cfg.num_heads_kv, cfg.head_dim)
        out = seq.attend(q.to(dtype), k.to(dtype), v, cfg.attn_backend, self.window)
        if gate:  # per-head sigmoid gate on the attention output, before linear_proj
            out = out * torch.sigmoid(gate[0].float()).to(out.dtype)[..., None]
        return self.linear_proj(out.reshape(n, -1), seq)


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig, num_modality: int, gelu: bool):
        super().__init__()
        self.gelu = gelu
        inter = cfg.gelu7_intermediate if gelu else cfg.swiglu7_intermediate
        self.pre_norm = ModalityRMSNorm(cfg.hidden_size, num_modality, cfg.norm_eps)
        # released name even when not gated; swiglu7 needs 2x rows (gate and linear, interleaved)
        self.up_gate_proj = ModalityLinear(cfg.hidden_size, inter if gelu else 2 * inter, num_modality)
        self.down_proj = ModalityLinear(inter, cfg.hidden_size, num_modality)

    def forward(self, h: Tensor, seq: PackedSeq) -> Tensor:
        x = self.up_gate_proj(self.pre_norm(h, seq), seq)
        x = (gelu7(x.float()) if self.gelu else swiglu7(x.float())).to(x.dtype)
        return self.down_proj(x, seq)


class TransformerLayer(nn.Module):
    """Pre-norm attention and MLP with plain residuals; the residual stream h stays fp32."""

    def __init__(self, cfg: DiTConfig, index: int):
        super().__init__()
        num_modality = NUM_MODALITIES if index in cfg.mm_layers else 1
        self.attention = Attention(cfg, num_modality, local=index in cfg.local_attn_layers)
        self.mlp = MLP(cfg, num_modality, gelu=index in cfg.gelu7_layers)

    def forward(self, h: Tensor, seq: PackedSeq) -> Tensor:
        h = h + self.attention(h, seq).float()
        return h + self.mlp(h, seq).float()


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.router = None  # training-time token routing, installed from outside (models/tread.py)

    def forward(self, h: Tensor, seq: PackedSeq) -> Tensor:
        if self.router is not None and self.training and torch.is_grad_enabled():
            return self.router(self.layers, h, seq)
        for layer in self.layers:
            h = layer(h, seq)
        return h


class FourierEmbed(nn.Module):
    """Holds the RoPE frequency bands (released key `adapter.rope.bands`, loaded from checkpoints)."""

    def __init__(self, head_dim: int, temperature: float):
        super().__init__()
        self.register_buffer("bands", rope_bands(head_dim, temperature).float(), persistent=True)


class Adapter(nn.Module):
    """Per-modality input projections (with bias, fp32) and the RoPE bands; no timestep embedding."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.video_embedder = nn.Linear(cfg.video_in_channels, cfg.hidden_size)
        self.text_embedder = nn.Linear(cfg.text_in_channels, cfg.hidden_size)
        self.audio_embedder = nn.Linear(cfg.audio_in_channels, cfg.hidden_size)
        self.rope = FourierEmbed(cfg.head_dim, cfg.rope_temperature)

    def forward(self, inputs: list[Tensor], seq: PackedSeq) -> Tensor:
        video, audio, text = inputs
        with torch.autocast(video.device.type, enabled=False):  # adapter is fp32 in the release
            parts = [
                self.video_embedder(video.float()),
                self.audio_embedder(audio.float()),
                self.text_embedder(text.float()),
            ]
        return seq.from_modality(parts)


class DiT(nn.Module):
    """Timestep-free joint audio-video DiT. `forward(video, audio, text)` returns velocities v = eps - x0."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.adapter = Adapter(cfg)
        self.block = TransformerBlock(cfg)
        self.final_norm_video = ModalityRMSNorm(cfg.hidden_size, 1, cfg.norm_eps)
        self.final_norm_audio = ModalityRMSNorm(cfg.hidden_size, 1, cfg.norm_eps)
        self.final_linear_video = nn.Linear(cfg.hidden_size, cfg.video_in_channels, bias=False)
        self.final_linear_audio = nn.Linear(cfg.hidden_size, cfg.audio_in_channels, bias=False)
        # Zero heads: an untrained model predicts v = 0 (a common DiT init choice, e.g. adaLN-zero DiT).
        nn.init.zeros_(self.final_linear_video.weight)
        nn.init.zeros_(self.final_linear_audio.weight)

    def forward(
        self, video: list[Tensor], audio: list[Tensor], text: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Denoise a pack of clips.

        video: per clip [48, T, H, W] noisy latent (H, W even); audio: per clip [A, 64]; text: per clip
        [L, 3584] features of the real tokens only (no padding). Returns per-clip velocity predictions of
        the same shapes as video and audio, in fp32.
        """
        inputs, seq = pack(video, audio, text, self.cfg, self.adapter.rope.bands)
        h = self.adapter(inputs, seq)  # [L, hidden] fp32 residual stream
        h = self.block(h, seq)
        hv, ha, _ = seq.by_modality(h)
        with torch.autocast(h.device.type, enabled=False):  # heads are fp32 in the release
            v_tokens = self.final_linear_video(self.final_norm_video(hv.float()))
            a_tokens = self.final_linear_audio(self.final_norm_audio(ha.float()))
        v_per_clip = v_tokens.split([math.prod((g[0], g[1] // 2, g[2] // 2)) for g in seq.video_grids])
        out_video = [unpatchify(t, g) for t, g in zip(v_per_clip, seq.video_grids, strict=True)]
        out_audio = list(a_tokens.split(seq.audio_lens))
        return out_video, out_audio

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------------
# Named sizes
# ---------------------------------------------------------------------------------------------------------

MODEL_CONFIGS: dict[str, DiTConfig] = {
    # The released architecture (15,299,419,136 parameters).
    "magihuman_15b": DiTConfig(),
    # The released 1080p SR DiT (env SR2_1080, spec §2.8): the same weights' architecture with frame-local
    # attention in 32 layers (full attention only in 3, 7, ..., 31: post_override_config) and the SR text coordinates.
    "magihuman_15b_sr1080": DiTConfig(
        text_coords="v1",
        local_attn_layers=sorted(set(range(40)) - {3, 7, 11, 15, 19, 23, 27, 31}),
    ),
    # ~1.4B, same structure (2 modality-specific layers at each end), for ablations on a few GPUs.
    "small": DiTConfig(
        num_layers=24,
        hidden_size=2048,
        head_dim=128,
        num_heads_kv=4,
        mm_layers=[0, 1, 22, 23],
        gelu7_layers=[0, 1],
    ),
    # For tests and CPU smoke runs: every feature of the real model at toy width.
    "tiny": DiTConfig(
        num_layers=4,
        hidden_size=128,
        head_dim=32,
        num_heads_kv=2,
        mm_layers=[0, 3],
        gelu7_layers=[0],
    ),
}
