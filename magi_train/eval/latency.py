"""`recipe=evaluate suite=latency`: the paper's speed table (Base / Super-Res / Decode / Total seconds per clip).

Every timed run goes through `magi_train.inference.generate` with the `generate.*` settings (its per-stage
timers synchronise CUDA before reading the clock); the first `warmup` runs per row are discarded, the table
holds the median of `repeats` runs. Total = Base + SR + Decode, as in the paper's table (spec §9); text
encoding is timed and reported separately (the release encodes the prompt once per request too).

Decode is the pipeline's decoder (the TurboVAED with `generate.turbo_vae`, else the Wan2.2 VAE) plus the audio
decode. Next to it, every run also times the video decode alone of the same final latent by each loaded video
decoder, so that the table shows Turbo and Wan2.2 side by side with their ratio (the Wan2.2 VAE is always
loaded: it encodes i2v images).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from magi_train.config import EvalConfig, GenerateConfig
from magi_train.utils.fileio import atomic_write

STAGES = ("text", "base", "sr", "decode")
DECODERS = ("turbo", "wan2.2")  # video decoders timed side by side (each when loaded)
LATENCY_PROMPT = (
    "A woman sits at a wooden table in a bright kitchen and speaks to the camera with a warm smile.\n\n"
    'Dialogue:\n<Woman, English>: "Good morning, it is a lovely day."\n\nBackground Sound:\n<Quiet room tone>'
)


def _row_cfg(gcfg: GenerateConfig, row: dict[str, Any], seconds: float, output: str) -> GenerateConfig:
    unknown = set(row) - {"name", "width", "height", "sr_width", "sr_height"}
    if unknown or "name" not in row:
        raise ValueError(f"latency row {row}: needs name, width, height (optional sr_width, sr_height); "
                         f"unknown keys {sorted(unknown)}")  # fmt: skip
    return dataclasses.replace(
        gcfg, prompt=gcfg.prompt or LATENCY_PROMPT, text_features=None, image=None, audio=None, seconds=seconds,
        width=int(row.get("width", gcfg.width)), height=int(row.get("height", gcfg.height)),
        sr_width=row.get("sr_width"), sr_height=row.get("sr_height"), output=output, progress=False,
    )  # fmt: skip


def _timed_decode(decoder: Any, latent: torch.Tensor, device: torch.device) -> float:
    """Seconds of one video decode of `latent` `[48, T, h, w]` (CUDA synchronised around it)."""
    z = latent[None].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    decoder.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _ratio(m: dict[str, float]) -> str:
    if m.get("video_turbo") and m.get("video_wan2.2"):
        return f"{m['video_wan2.2'] / m['video_turbo']:.1f}x"
    return "—"


def latency_markdown(result: dict[str, Any]) -> str:
    decoder = {"turbo": "TurboVAED", "wan2.2": "Wan2.2 VAE"}.get(result.get("decoder", "wan2.2"), "?")
    lines = [
        f"# Latency: {result['seconds']}-second clip",
        "",
        f"Device `{result['device']}`, precision `{result['precision']}`, base sampler `{result['sampler']}`, decoder "
        f"{decoder}; median of {result['repeats']} runs after {result['warmup']} warm-up run(s). Total = Base + SR + "
        "Decode (video and audio). The last columns time the video decode alone of the same latents by each "
        "decoder (— where none was loaded: generate.turbo_vae).",
        "",
        "| Resolution | Text | Base | Super-Res | Decode | Total | Video decode: Turbo | Video decode: Wan2.2 "
        "| Wan2.2 / Turbo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['name']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        m = row["median_s"]
        sr = f"{m['sr']:.2f}" if row["sr"] else "—"
        video = [f"{m[f'video_{d}']:.2f}" if f"video_{d}" in m else "—" for d in DECODERS]
        lines.append(
            f"| {row['name']} | {m['text']:.2f} | {m['base']:.2f} | {sr} | {m['decode']:.2f} | {m['total']:.2f} | "
            f"{video[0]} | {video[1]} | {_ratio(m)} |"
        )
    return "\n".join(lines) + "\n"


def run_latency(
    ecfg: EvalConfig, gcfg: GenerateConfig, out_dir: Path, dry_run: bool = False
) -> dict[str, Any]:
    """Time every configured resolution; write latency.json and latency.md into `out_dir`."""
    from magi_train.inference.generate import base_sampler, generate, load_pipeline

    suite = ecfg.suite
    if not suite.resolutions:
        raise ValueError(
            "suite=latency needs eval.suite.resolutions: rows {name, width, height[, sr_width, sr_height]}"
        )
    if suite.repeats < 1 or suite.warmup < 0:
        raise ValueError(
            f"eval.suite.repeats must be >= 1 and warmup >= 0, got {suite.repeats} / {suite.warmup}"
        )
    if ecfg.checkpoint:
        gcfg = dataclasses.replace(gcfg, base_ckpt=ecfg.checkpoint, distilled_ckpt=None)
    seconds = suite.seconds or gcfg.seconds
    full = load_pipeline(gcfg)  # with the SR DiT when generate.sr_ckpt is set
    base_only = dataclasses.replace(full, sr=None)  # same loaded modules, SR stage off
    result: dict[str, Any] = {
        "seconds": seconds, "repeats": suite.repeats, "warmup": suite.warmup, "device": str(full.device),
        "precision": "bf16" if full.autocast_dtype is not None else "fp32",
        "sampler": base_sampler(gcfg, full).name,
        "decoder": full.decoder_name,
        "rows": [],
    }  # fmt: skip
    print(f"latency: device {result['device']}, precision {result['precision']}, {seconds} s clips")
    if dry_run:
        return result
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        for row in suite.resolutions:
            row = dict(row)
            needs_sr = row.get("sr_width") is not None
            if needs_sr and full.sr is None:
                result["rows"].append({"name": row["name"], "sr": True, "skipped": "no generate.sr_ckpt"})
                continue
            cfg = _row_cfg(gcfg, row, seconds, str(Path(tmp) / f"{row['name']}.mp4"))
            decoders = {"turbo": full.turbo_vae, "wan2.2": full.video_vae}
            decoders = {name: d for name, d in decoders.items() if d is not None}
            runs = []
            for k in range(suite.warmup + suite.repeats):
                res = generate(cfg, full if needs_sr else base_only)
                timings = res.info["timings_s"]
                video = {
                    f"video_{n}": _timed_decode(d, res.video_latent, full.device) for n, d in decoders.items()
                }
                if k >= suite.warmup:
                    runs.append({**{s: float(timings.get(s, 0.0)) for s in STAGES}, **video})
            median = {s: statistics.median(r[s] for r in runs) for s in runs[0]}
            median["total"] = median["base"] + median["sr"] + median["decode"]
            result["rows"].append({**row, "sr": needs_sr, "median_s": median, "runs_s": runs})
            print(f"{row['name']}: " + ", ".join(f"{k} {v:.3f} s" for k, v in median.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "latency.json", json.dumps(result, indent=2))
    atomic_write(out_dir / "latency.md", latency_markdown(result))
    print(latency_markdown(result))
    return {
        "latency": str(out_dir / "latency.json"),
        "markdown": str(out_dir / "latency.md"),
        "rows": result["rows"],
    }
