"""Per-clip (varlen) bidirectional attention over a packed sequence: flash-attn on CUDA, SDPA elsewhere.

The released model runs one dense attention over a batch-1 sequence; packing several clips needs a
block-diagonal pattern instead, so that no token attends across clips and no compute goes to padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def resolve_backend(backend: str, q: Tensor) -> str:
    """'auto' picks flash-attn when it is installed and q is a CUDA half tensor, else SDPA."""
    if backend == "flash":
        if _flash_varlen() is None:
            raise ValueError(
                "attn_backend=flash but flash-attn is not installed: pip install 'magi_train[gpu]'"
            )
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attn_backend=flash needs CUDA fp16/bf16 inputs, got {q.device} {q.dtype}")
        return "flash"
    if backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen():
        return "flash"
    return "sdpa"


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """[n, Hq, d] x [m, Hkv, d] -> [n, Hq, d], non-causal, GQA."""
    qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(qi, ki, vi, enable_gqa=qi.shape[1] != ki.shape[1])
    return out[0].transpose(0, 1)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, backend: str = "auto"
) -> Tensor:
    """Non-causal attention restricted to each clip of a packed sequence.

    q: [L, Hq, d]; k, v: [L, Hkv, d] with Hq a multiple of Hkv (GQA: query head h uses KV head
    h // (Hq/Hkv)); cu_seqlens: [B+1] int32 clip boundaries. Returns [L, Hq, d]. Scale 1/sqrt(d).
    """
    if resolve_backend(backend, q) == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
    # One SDPA call per clip: measured faster on CPU than one call with a dense block-diagonal mask
    # (shared/ENVIRONMENT.md: 228 ms vs 955 ms forward at 4096 tokens), and exact.
    bounds = cu_seqlens.tolist()
    return torch.cat([_sdpa(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


# ---------------------------------------------------------------------------------------------------------
# Frame-local attention (the release's 1080p SR model, spec §2.8)
# ---------------------------------------------------------------------------------------------------------


def frame_ids(grid: tuple[int, int, int], audio_len: int, text_len: int) -> Tensor:
    """[L] latent frame of each token of one clip [video | audio | text]; -1 marks audio and text (global)."""
    t, h, w = grid
    video = torch.arange(t).repeat_interleave((h // 2) * (w // 2))
    return torch.cat([video, torch.full((audio_len + text_len,), -1, dtype=torch.long)])


def sees(q_frame: Tensor, k_frame: Tensor, window: int) -> Tensor:
    """Whether a query of latent frame q_frame sees a key of frame k_frame (same clip): video queries see the video
    keys of frames within `window` and every audio/text key; audio/text queries (frame -1) see every key.
    Released `calc_local_qk_range`: key frames [i - R, i + R] clipped to the clip's video."""
    return (q_frame < 0) | (k_frame < 0) | ((q_frame - k_frame).abs() <= window)


def local_attention_mask(cu_seqlens: Tensor, frame: Tensor, window: int) -> Tensor:
    """[L, L] bool: the keys each query of a packed sequence sees in a local layer (the reference for tests)."""
    clip = torch.bucketize(torch.arange(frame.numel()), cu_seqlens.cpu().long()[1:], right=True)
    f = frame.cpu()
    return (clip[:, None] == clip[None, :]) & sees(f[:, None], f[None, :], window)


def local_blocks(q: Tensor, k: Tensor, v: Tensor, frame: Tensor, window: int) -> Tensor:
    """Frame-local attention of ONE clip through SDPA: one call per latent frame (its queries against the video keys
    of the frames in the window plus every audio/text key), one for the audio and text queries over every key.
    Exact, and differentiable (CPU has flex attention without backward)."""
    f = frame.cpu()
    groups, outs = [], []
    glob = (f < 0).nonzero()[:, 0]
    if glob.numel():
        groups.append(glob)
        outs.append(_sdpa(q[glob.to(q.device)], k, v))
    for u in torch.unique(f[f >= 0]).tolist():
        rows = (f == u).nonzero()[:, 0]
        keys = sees(torch.tensor(u), f, window).nonzero()[:, 0].to(q.device)
        groups.append(rows)
        outs.append(_sdpa(q[rows.to(q.device)], k[keys], v[keys]))
    order = torch.cat(groups).to(q.device)
    return torch.cat(outs)[torch.argsort(order)]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, frame: Tensor, window: int, compiled: bool = True
) -> Tensor:
    """The same pattern over the whole packed sequence in one flex-attention call (a block mask from the clip and
    frame ids: blocks outside every clip's window are skipped). Used on CUDA; `compiled=False` runs flex attention
    eagerly (forward only on CPU: for tests of the mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[0]
    clip = torch.bucketize(torch.arange(n, device=q.device), cu_seqlens.long()[1:].to(q.device), right=True)
    f = frame.to(q.device)

    def mask_mod(b, h, qi, ki):
        return (clip[qi] == clip[ki]) & sees(f[qi], f[ki], window)

    mask = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    attend = _compiled_flex() if compiled else flex_attention
    qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, k, v))
    return attend(qi, ki, vi, block_mask=mask, enable_gqa=qi.shape[1] != ki.shape[1])[0].transpose(0, 1)


def local_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    frame: Tensor,
    window: int,
    backend: str = "auto",
) -> Tensor:
    """Frame-local attention of a packed sequence (q, k, v as varlen_attention; frame: [L] from frame_ids).

    A clip whose video spans at most window + 1 latent frames is attended in full (every query sees every key:
    the same result, one call); otherwise CUDA half inputs take one flex-attention call (attn_backend auto or
    flash), the rest SDPA per query block."""
    bounds = cu_seqlens.tolist()
    f = frame.cpu()
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        video = f[start:end][f[start:end] >= 0]
        spans.append(int(video.max() - video.min()) if video.numel() else 0)
    if max(spans) <= window:
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend)
    if backend != "sdpa" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flex_local(q, k, v, cu_seqlens, frame, window)
    outs = []
    for (start, end), span in zip(zip(bounds[:-1], bounds[1:], strict=True), spans, strict=True):
        qi, ki, vi = q[start:end], k[start:end], v[start:end]
        outs.append(_sdpa(qi, ki, vi) if span <= window else local_blocks(qi, ki, vi, f[start:end], window))
    return torch.cat(outs)
