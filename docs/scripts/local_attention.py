"""Frame-local attention of the 1080p SR DiT (docs/super_resolution.md): exactness against one dense masked SDPA and
the time of one local attention call against the clip's full attention.

    python docs/scripts/local_attention.py            # CPU: SDPA per latent frame, fp32, 1 thread, a short clip
    python docs/scripts/local_attention.py --cuda     # GPU: compiled flex attention, bf16, the released 1080p clip

The GPU run uses the released geometry (15B heads: 40 query / 8 KV heads of 128; 1920x1088 -> 68x120 latent ->
34x60 = 2040 tokens a frame, 26 latent frames for 4 s, R = 11); its exactness check is against a dense mask on
a shorter clip (the dense mask of 53k tokens does not fit).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from magi_train.models.attention import (
    frame_ids,
    local_attention_mask,
    local_varlen_attention,
    varlen_attention,
)


def layout(frames: int, h: int, w: int, audio: int, text: int):
    frame = frame_ids((frames, h, w), audio, text)
    cu = torch.tensor([0, frame.numel()], dtype=torch.int32)
    return frame, cu, frame.numel()


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (compilation on CUDA)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda" if a.cuda else "cpu")
    dtype = torch.bfloat16 if a.cuda else torch.float32
    sync = torch.cuda.synchronize if a.cuda else (lambda: None)
    if not a.cuda:
        torch.set_num_threads(1)
    hq, hkv, d = (40, 8, 128) if a.cuda else (4, 2, 32)
    window = 11 if a.cuda else 2
    g = torch.Generator(dev).manual_seed(0)

    # exactness on a short clip (dense mask fits)
    frame, cu, n = layout(16 if a.cuda else 8, 16, 16, 101, 64)
    q, k, v = (torch.randn(n, h, d, generator=g, device=dev, dtype=dtype) for h in (hq, hkv, hkv))
    out = local_varlen_attention(q, k, v, cu, n, frame, 2, backend="auto")
    mask = local_attention_mask(cu, frame, 2).to(dev)
    qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    print(f"max |local - dense masked| = {(out.float() - ref.float()).abs().max().item():.2e} ({dtype})")

    # speed on the benchmark clip
    frames, h, w = (26, 68, 120) if a.cuda else (16, 16, 28)
    frame, cu, n = layout(frames, h, w, 101, 640 if a.cuda else 64)
    q, k, v = (torch.randn(n, hh, d, generator=g, device=dev, dtype=dtype) for hh in (hq, hkv, hkv))
    with torch.no_grad():
        t_local = timed(lambda: local_varlen_attention(q, k, v, cu, n, frame, window), 3, sync)
        t_full = timed(lambda: varlen_attention(q, k, v, cu, n), 3, sync)
    print(f"{n} tokens ({frames} latent frames, R = {window}), heads {hq}/{hkv}x{d}, {dev} {dtype}")
    print(f"local {t_local * 1e3:.1f} ms, full {t_full * 1e3:.1f} ms, local/full {t_local / t_full:.2f}")


if __name__ == "__main__":
    main()
