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
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, d]
        oi = F.scaled_dot_product_attention(qi, ki, vi, enable_gqa=qi.shape[1] != ki.shape[1])
        outs.append(oi[0].transpose(0, 1))
    return torch.cat(outs)
