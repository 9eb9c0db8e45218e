"""`python -m magi_train.tools.bench`: DiT training-step throughput (fwd+bwd time, tokens/s, peak memory, MFU).

Model FLOPs of one training step (forward + backward, the usual 3x forward; activation-checkpointing
recompute is not counted, as in MFU conventions, e.g. PaLM appendix B):

    6 * sum over tokens of the matmul weights that token uses    (linear layers: 2 FLOPs per MAC, x3)
  + 12 * num_layers * sum over clips of n_clip^2 * num_heads_q * head_dim   (QK^T and AV, non-causal, x3)

A token of a modality-specific ("sandwich") layer uses one expert: a third of that layer's stored weights.
Input adapters and output heads are counted per modality (video 192 / audio 64 / text 3584 channels; text
has no head). Norms, RoPE and the gate nonlinearity are left out (< 1%). MFU = model FLOPs / step time /
peak dense bf16 FLOP/s of the device (`--peak-tflops`; known: H100 / H200 SXM 989, A100 312).

With TREAD routing (`--tread`, models/tread.py) the routed layers count only the tokens that run them: in each
clip, all text tokens and n - floor(rate * n) of its n video and of its n audio tokens (linears and attention alike);
`--tread` times the same model with and without routing, step by step alternately, and reports both ratios.

`--compare-padded` runs the same mixed-length clips twice: packed into one varlen sequence (the model's
own path) and as the naive padded batch (every clip padded with masked tokens to the longest one, one
batched masked attention), checks that both give the same outputs and reports the speed ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

import magi_train.models.dit as dit_module
from magi_train.models.dit import MODEL_CONFIGS, PATCH, DiT, DiTConfig
from magi_train.models.parallelize import AC_MODES, ParallelConfig, parallelize
from magi_train.models.tread import TokenRouter, TreadConfig, kept_tokens, tread_config

# Peak dense bf16 tensor-core FLOP/s by device name (NVIDIA datasheets: H100 SXM5 / H200 SXM 989.4 TFLOP/s
# without sparsity, A100 SXM 312 TFLOP/s).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
FPS = 25  # video frames per second of the release (spec: 25 fps, frames = seconds*25 + 1)
VAE_STRIDE = (4, 16, 16)  # Wan2.2 VAE (t, h, w)


@dataclass(frozen=True)
class ClipShape:
    """Latent sizes of one clip: video grid (T, H, W), audio latents A, text tokens L."""

    t: int
    h: int
    w: int
    audio: int
    text: int

    @property
    def video_tokens(self) -> int:
        return (self.t // PATCH[0]) * (self.h // PATCH[1]) * (self.w // PATCH[2])

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.audio + self.text


def clip_shape(seconds: float, width: int, height: int, text_len: int) -> ClipShape:
    """Latent sizes of a clip of `seconds` at width x height pixels (DESIGN.md tensor conventions)."""
    if width % 32 or height % 32:
        raise ValueError(
            f"width and height must be multiples of 32 (VAE stride 16, patch 2), got {width}x{height}"
        )
    frames = round(seconds * FPS) + 1
    if frames < 5:
        raise ValueError(f"seconds={seconds}: a clip needs at least 4/25 s")
    t = (frames - 1) // VAE_STRIDE[0] + 1
    return ClipShape(
        t=t, h=height // VAE_STRIDE[1], w=width // VAE_STRIDE[2], audio=4 * (t - 1) + 1, text=text_len
    )


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------


def layer_matmul_params(cfg: DiTConfig) -> list[int]:
    """Per layer, the weights one token multiplies with (one expert in sandwich layers)."""
    hq, hkv, d, h = cfg.num_heads_q, cfg.num_heads_kv, cfg.head_dim, cfg.hidden_size
    qkv = h * (hq * d + 2 * hkv * d + (hq if cfg.enable_attn_gating else 0))
    attn = qkv + hq * d * h
    out = []
    for i in range(cfg.num_layers):
        inter = cfg.gelu7_intermediate if i in cfg.gelu7_layers else cfg.swiglu7_intermediate
        up = inter if i in cfg.gelu7_layers else 2 * inter
        out.append(attn + h * up + inter * h)
    return out


def block_matmul_params(cfg: DiTConfig) -> int:
    """Weights of the transformer block one token multiplies with (one expert in sandwich layers)."""
    return sum(layer_matmul_params(cfg))


def _routed(clip: ClipShape, tread: TreadConfig) -> int:
    """Tokens of a clip that run the routed layers (models/tread.py choose_bypass)."""
    rate = tread.selection_rate
    return kept_tokens(clip.video_tokens, rate) + kept_tokens(clip.audio, rate) + clip.text


def model_flops(cfg: DiTConfig, clips: list[ClipShape], tread: TreadConfig | None = None) -> float:
    """Model FLOPs of one forward + backward over a pack of clips (module docstring); tread: with routing."""
    h = cfg.hidden_size
    n_v = sum(c.video_tokens for c in clips)
    n_a = sum(c.audio for c in clips)
    n_t = sum(c.text for c in clips)
    macs = n_v * 2 * cfg.video_in_channels * h + n_a * 2 * cfg.audio_in_channels * h  # adapter + head
    macs += n_t * cfg.text_in_channels * h  # adapter only
    attention = 0
    for i, params in enumerate(layer_matmul_params(cfg)):
        routed = tread is not None and tread.start_layer_idx <= i <= tread.end_layer_idx
        lens = [_routed(c, tread) if routed else c.tokens for c in clips]
        macs += sum(lens) * params
        attention += sum(4 * n**2 * cfg.num_heads_q * cfg.head_dim for n in lens)  # forward: QK^T and AV
    return 3 * (2 * macs + attention)


# ---------------------------------------------------------------------------------------------------------
# the naive padded batch, for comparison with packing
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def padded_attention(valid: list[int], length: int) -> Iterator[None]:
    """Within the block, the DiT attends as a padded batch: [B, heads, length, length] with masked keys.

    valid: real tokens per clip (each clip is followed by length - valid padding tokens in the sequence).
    """
    mask = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]  # [B, length], True = real key

    def attention(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, backend: str = "auto"
    ):
        b = len(valid)
        assert q.shape[0] == b * length, "the padded sequence must hold len(valid) clips of `length` tokens"
        qb, kb, vb = (x.reshape(b, length, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask.to(q.device)[:, None, None, :], enable_gqa=qb.shape[1] != kb.shape[1]
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], q.shape[2])

    original = dit_module.varlen_attention
    dit_module.varlen_attention = attention
    try:
        yield
    finally:
        dit_module.varlen_attention = original


def pad_text(text: list[Tensor], clips: list[ClipShape]) -> tuple[list[Tensor], list[int], int]:
    """Append zero text tokens so that every clip has the longest clip's length (text coords v2 give every
    text token the same position, so padding leaves the real tokens' RoPE unchanged)."""
    length = max(c.tokens for c in clips)
    padded = [
        torch.cat([t, t.new_zeros(length - c.tokens, t.shape[1])]) for t, c in zip(text, clips, strict=True)
    ]
    return padded, [c.tokens for c in clips], length


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------


def random_inputs(cfg: DiTConfig, clips: list[ClipShape], device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ch = cfg.video_in_channels // 4

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    video = [rand(ch, c.t, c.h, c.w) for c in clips]
    audio = [rand(c.audio, cfg.audio_in_channels) for c in clips]
    text = [rand(c.text, cfg.text_in_channels) for c in clips]
    return video, audio, text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss_gib() -> float:
    """High-water mark of this process's resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def train_step(model: DiT, video, audio, text, dtype: torch.dtype | None) -> tuple[float, float | None]:
    """(seconds, peak GPU memory in GiB or None on CPU) of one forward + backward (loss = mean square of
    the velocities)."""
    device = video[0].device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        v, a = model(video, audio, text)
    loss = sum(x.square().mean() for x in v) + sum(x.square().mean() for x in a)
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    return seconds, peak


def measure_runs(
    runs: list[Callable[[], tuple[float, float | None]]], steps: int, warmup: int
) -> list[tuple[float, float | None]]:
    """(median seconds, peak memory) of each run; the runs alternate step by step, so that a load change
    on a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    peaks: list[float | None] = [None] * len(runs)
    for i in range(warmup + steps):
        for j, run in enumerate(runs):
            seconds, peak = run()
            if peak is not None:
                peaks[j] = max(peaks[j] or 0.0, peak)
            if i >= warmup:
                times[j].append(seconds)
    return [(sorted(t)[len(t) // 2], p) for t, p in zip(times, peaks, strict=True)]


def outputs(model: DiT, video, audio, text) -> tuple[list[Tensor], list[Tensor]]:
    with torch.no_grad():
        return model(video, audio, text)


def build_model(args: argparse.Namespace, device: torch.device) -> DiT:
    cfg = MODEL_CONFIGS[args.model]
    cfg = replace(
        cfg,
        attn_backend=args.attn_backend,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        mm_layers=list(cfg.mm_layers),
        gelu7_layers=list(cfg.gelu7_layers),
    )
    if args.num_layers:  # keep the sandwich: the same number of modality-specific layers at each end
        ends = len([i for i in cfg.mm_layers if i < cfg.num_layers // 2])
        n = args.num_layers
        cfg = replace(
            cfg,
            num_layers=n,
            mm_layers=sorted(set(range(ends)) | set(range(max(0, n - ends), n))),
            gelu7_layers=[i for i in cfg.gelu7_layers if i < n],
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg)
    for p in model.parameters():  # the release's zero-init heads would give zero gradients everywhere
        if p.ndim >= 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    plan = ParallelConfig(
        activation_checkpointing=cfg.activation_checkpointing, ac_every=cfg.ac_every, compile=cfg.compile
    )
    return parallelize(model, None, plan)


def mixed_clips(base: ClipShape, count: int) -> list[ClipShape]:
    """`count` clips from 1/count to all of the base duration, text from 1/4 to all of its length."""
    out = []
    for i in range(1, count + 1):
        t = max(2, round(base.t * i / count))
        out.append(
            ClipShape(t, base.h, base.w, 4 * (t - 1) + 1, max(1, round(base.text * (i + 1) / (count + 1))))
        )
    return out


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = {"bf16": torch.bfloat16, "fp32": None}[
        args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ]
    model = build_model(args, device)
    cfg = model.cfg
    base = clip_shape(args.seconds, args.width, args.height, args.text_len)
    clips = mixed_clips(base, args.batch) if args.compare_padded else [base] * args.batch
    video, audio, text = random_inputs(cfg, clips, device)
    peak = device_peak(device, args.peak_tflops)
    rows = []

    tread = None
    if args.tread:
        fields = ("selection_rate", "start_layer_idx", "end_layer_idx")
        values = (args.tread_rate, args.tread_start, args.tread_end)
        tread = tread_config(dict(zip(fields, values, strict=True)), cfg.num_layers)

    def row(
        path: str, measured: tuple[float, float | None], tokens: int, computed_tokens: int, routing=None
    ) -> dict:
        flops = model_flops(cfg, clips, routing)
        seconds, gpu_peak = measured
        mem, mem_kind = (
            (gpu_peak, "GPU") if gpu_peak is not None else (process_peak_rss_gib(), "RSS, whole run")
        )
        return {
            "path": path,
            "model": args.model + (f" ({cfg.num_layers} layers)" if args.num_layers else ""),
            "params": model.num_parameters(),
            "clips": len(clips),
            "tokens": tokens,
            "computed": computed_tokens,
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_mem_gib": mem,
            "mem_kind": mem_kind,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "dtype": "bf16" if dtype else "fp32",
            "attn": args.attn_backend,
            "compile": args.compile,
            "ac": args.activation_checkpointing,
            "flops": flops,
        }

    tokens = sum(c.tokens for c in clips)
    runs = [lambda: train_step(model, video, audio, text, dtype)]
    if args.compare_padded:
        if cfg.text_coords != "v2":
            raise ValueError("--compare-padded pads with text tokens and needs text_coords v2 (base models)")
        padded, valid, length = pad_text(text, clips)

        def padded_step() -> float:
            with padded_attention(valid, length):
                return train_step(model, video, audio, padded, dtype)

        runs.append(padded_step)
    if tread is not None:
        router = TokenRouter(tread)

        def tread_step() -> tuple[float, float | None]:
            model.block.router = router
            try:
                return train_step(model, video, audio, text, dtype)
            finally:
                model.block.router = None

        runs.append(tread_step)
    measured = measure_runs(runs, args.steps, args.warmup)
    rows.append(row("packed", measured[0], tokens, tokens))
    if tread is not None:
        routed = sum(_routed(c, tread) for c in clips)
        layers = tread.end_layer_idx - tread.start_layer_idx + 1
        rows.append(row(f"tread {tread.selection_rate:g} L{tread.start_layer_idx}-{tread.end_layer_idx}",
                        measured[-1], tokens, routed, tread))  # fmt: skip
        rows[-1]["step_ratio"] = measured[0][0] / measured[-1][0]
        rows[-1]["flop_ratio"] = rows[0]["flops"] / rows[-1]["flops"]
        rows[-1]["routed_layers"] = layers
    if args.compare_padded:
        with padded_attention(valid, length):
            pv, pa = outputs(model, video, audio, padded)
        qv, qa = outputs(model, video, audio, text)
        err = max((x - y).abs().max().item() for x, y in zip(pv + pa, qv + qa, strict=True))
        scale = max(y.abs().max().item() for y in qv + qa)
        rows.append(row("padded", measured[1], tokens, length * len(clips)))
        rows[-1]["max_rel_diff"] = err / scale
        rows[-1]["padded_over_packed"] = measured[1][0] / measured[0][0]
    return rows


def format_table(rows: list[dict]) -> str:
    head = [
        "path",
        "model",
        "params",
        "clips",
        "tokens",
        "computed",
        "dtype",
        "attn",
        "compile",
        "ac",
        "step (s)",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak mem (GiB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["path"],
            r["model"],
            f"{r['params'] / 1e6:.1f}M",
            r["clips"],
            r["tokens"],
            r["computed"],
            r["dtype"],
            r["attn"],
            "on" if r["compile"] else "off",
            r["ac"],
            f"{r['step_s']:.4f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tflops']:.3f}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{r['peak_mem_gib']:.2f} ({r['mem_kind']})",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    padded = [r for r in rows if "padded_over_packed" in r]
    for r in rows:
        if "step_ratio" in r:
            lines.append(
                f"\nwithout / with TREAD: step time {r['step_ratio']:.2f}x, model FLOPs {r['flop_ratio']:.2f}x "
                f"({r['routed_layers']} routed layers; 'computed' = tokens in a routed layer); device: {r['device']}"
            )
    for r in padded:
        lines.append(
            f"\npadded / packed step time: {r['padded_over_packed']:.2f}x (max relative output "
            f"difference {r['max_rel_diff']:.1e}); device: {r['device']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m magi_train.tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="tiny")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers of the same width (mid sizes)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--text-len", type=int, default=640, help="text tokens per clip (released maximum 640)")
    p.add_argument("--batch", type=int, default=1, help="clips per packed batch")
    p.add_argument("--attn-backend", choices=["auto", "flash", "sdpa"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each layer")
    p.add_argument(
        "--activation-checkpointing", nargs="?", const="full", default="none", choices=AC_MODES,
        help="none | full (the bare flag) | selective | every_k (with model ac_every)",
    )  # fmt: skip
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)"
    )
    p.add_argument(
        "--compare-padded",
        action="store_true",
        help="mixed-length clips (--batch of them, 1/batch .. 1 of --seconds): packed vs padded batch",
    )
    p.add_argument(
        "--tread", action="store_true", help="also time TREAD routing (the same model, alternately)"
    )
    p.add_argument("--tread-rate", type=float, default=0.5, help="selection_rate (default: the release's)")
    p.add_argument("--tread-start", type=int, default=2, help="first routed layer (default: the release's)")
    p.add_argument("--tread-end", type=int, default=25, help="last routed layer, inclusive (the release's)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --warmup >= 0")
    if args.num_layers is not None and args.num_layers < 2:
        p.error("--num-layers must be >= 2")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    try:
        rows = measure(args)
    except ValueError as err:  # a bad --tread range: the message says what fits
        raise SystemExit(f"bench: {err}") from None
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
