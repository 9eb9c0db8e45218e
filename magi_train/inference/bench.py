"""Speed of two parts of sampling, for docs/turbo_vae.md: TurboVAED vs Wan2.2 video decode of the same latents, and
batched (one packed forward) vs unbatched (two forwards) classifier-free guidance.

    python -m magi_train.inference.bench decode [--frames 5 --height 8 --width 8] [--turbo DIR] [--wan DIR]
    python -m magi_train.inference.bench guidance [--model bench --frames 4 --height 8 --width 8 --clips 1]

Without --turbo / --wan the decoders are the released architectures (TinyShallow_7_7 config; diffusers
AutoencoderKLWan with the Wan2.2 VAE config) with random weights: the work per frame is the same as with the
trained weights. Each timing is the median of --repeats runs after --warmup runs, the two variants interleaved
run by run (a shared machine's load then weighs on both alike); results are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from magi_train.codecs.turbo_vae import TurboVAE, TurboVAEConfig, TurboVAED
from magi_train.codecs.video_vae import VideoVAE
from magi_train.flow.sampling import cond_uncond
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig

# diffusers AutoencoderKLWan with the Wan2.2-TI2V-5B VAE configuration (spec §6.1): encoder 160, decoder 256
WAN22 = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, scale_factor_temporal=4,
)  # fmt: skip
# a mid-size DiT of the released structure for CPU guidance timings (~110M parameters)
BENCH_DIT = DiTConfig(num_layers=8, hidden_size=1024, head_dim=128, num_heads_kv=2, mm_layers=[0, 7],
                      gelu7_layers=[0])  # fmt: skip


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` calls (CUDA synchronised)."""
    out = []
    for k in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= warmup:
            out.append(time.perf_counter() - start)
    return out


def interleaved(
    variants: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved call by call (one of each per round), so
    that a change of load on a shared machine weighs on all of them alike."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for k in range(warmup + repeats):
        for name, fn in variants.items():
            t = timed(fn, device, 1, 0)[0]
            if k >= warmup:
                runs[name].append(t)
    return {name: statistics.median(values) for name, values in runs.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@torch.no_grad()
def bench_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    if args.turbo:
        turbo = TurboVAE.from_pretrained(args.turbo, dtype, device)
    else:
        torch.manual_seed(0)
        turbo = TurboVAE(TurboVAED(TurboVAEConfig()).to(device, dtype))
    if args.wan:
        wan = VideoVAE.from_pretrained(args.wan, dtype, device)
    else:
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        wan = VideoVAE(AutoencoderKLWan(**WAN22).to(device, dtype))
    latent = torch.randn(1, 48, args.frames, args.height, args.width, device=device)
    result = {"bench": "decode", "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "latent": list(latent.shape), "pixels": list(turbo.decode(latent).shape)}  # fmt: skip
    decoders = {"turbo": turbo, "wan2.2": wan}
    variants = {name: (lambda d=dec: d.decode(latent)) for name, dec in decoders.items()}
    for name, seconds in interleaved(variants, device, args.repeats, args.warmup).items():
        result[f"{name}_s"] = round(seconds, 4)
    result["wan_over_turbo"] = round(result["wan2.2_s"] / result["turbo_s"], 2)
    return result


@torch.no_grad()
def bench_guidance(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = BENCH_DIT if args.model == "bench" else MODEL_CONFIGS[args.model]
    torch.manual_seed(0)
    model = DiT(cfg).to(device).eval()
    g = torch.Generator(device).manual_seed(0)
    n, frames, h, w = args.clips, args.frames, args.height, args.width
    audio_len = 4 * (frames - 1) + 1
    video = [torch.randn(48, frames, h, w, generator=g, device=device) for _ in range(n)]
    audio = [torch.randn(audio_len, 64, generator=g, device=device) for _ in range(n)]
    text = [torch.randn(args.text_len, cfg.text_in_channels, generator=g, device=device) for _ in range(n)]
    negative = [
        torch.randn(args.negative_len, cfg.text_in_channels, generator=g, device=device) for _ in range(n)
    ]

    def call(batched: bool):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return cond_uncond(model, video, audio, text, negative, batched=batched)

    tokens = n * (frames * (h // 2) * (w // 2) + audio_len) * 2 + n * (args.text_len + args.negative_len)
    result = {"bench": "guidance", "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "model": args.model, "parameters": model.num_parameters(), "clips": n,
              "tokens_per_step": tokens}  # fmt: skip
    variants = {"batched": lambda: call(True), "two_forwards": lambda: call(False)}
    for name, seconds in interleaved(variants, device, args.repeats, args.warmup).items():
        result[f"{name}_s"] = round(seconds, 4)
    result["two_forwards_over_batched"] = round(result["two_forwards_s"] / result["batched_s"], 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m magi_train.inference.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("what", choices=["decode", "guidance"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32"
    )
    parser.add_argument("--frames", type=int, default=None, help="latent frames (decode 5, guidance 4)")
    parser.add_argument("--height", type=int, default=8, help="latent height")
    parser.add_argument("--width", type=int, default=8, help="latent width")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--turbo", help="a TurboVAED directory (default: random released architecture)")
    parser.add_argument(
        "--wan", help="a diffusers Wan2.2 VAE directory (default: random Wan2.2 architecture)"
    )
    parser.add_argument("--model", default="bench", help="guidance: 'bench' (~110M) or a MODEL_CONFIGS name")
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--negative-len", type=int, default=160)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype or "", None)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.frames is None:
        args.frames = 5 if args.what == "decode" else 4
    if args.what == "guidance" and args.model != "bench" and args.model not in MODEL_CONFIGS:
        parser.error(f"--model {args.model!r}: use 'bench' or one of {sorted(MODEL_CONFIGS)}")
    result = (bench_decode if args.what == "decode" else bench_guidance)(args, device, dtype)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
