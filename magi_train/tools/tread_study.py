"""`python -m magi_train.tools.tread_study`: does TREAD train as well? Flow-matching loss against steps and wall-clock,
with and without token routing (models/tread.py), on the learnable synthetic clips (data/synthetic.py), several seeds.

Per seed, the two runs start from the same weights, see the same batches and the same noise (PretrainTask.flow_loss
with the stream of each step), and advance one optimizer step each in turn, so that a load change on a shared machine
hits both alike; only training steps are timed. Every `--eval-every` steps both are scored on held-out clips with
fixed noise in eval mode (no routing: the function a sampler would use). Writes `<out>/tread_study.md` (table),
`<out>/tread_study.json` (every curve) and `<out>/tread_study.png` (validation loss against steps and seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from magi_train.config import FlowConfig, OptimConfig
from magi_train.data.reader import ClipBatch, pack_by_tokens
from magi_train.data.synthetic import synthetic_clips
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.tread import enable_tread, seed_tread, tread_config
from magi_train.tasks.optim import build_optimizer
from magi_train.tasks.pretrain import PretrainTask
from magi_train.tasks.sharding import stream_seed

SIZES = [(5, 16, 16), (4, 16, 24), (6, 12, 16)]  # (T, H, W) latents: 256-576 video tokens per clip


def batches(num_clips: int, seed: int, max_tokens: int, text_dim: int) -> list[ClipBatch]:
    clips = synthetic_clips(num_clips, seed, SIZES, text_len=(4, 12), text_dim=text_dim)
    return list(pack_by_tokens(clips, max_tokens))


def build_config(model: str, num_layers: int | None):
    cfg = copy.deepcopy(MODEL_CONFIGS[model])
    if num_layers:  # keep the sandwich: one modality-specific layer at each end, like tiny
        cfg.num_layers, cfg.mm_layers, cfg.gelu7_layers = num_layers, [0, num_layers - 1], [0]
    return cfg


def val_loss(task: PretrainTask, val: list[ClipBatch]) -> float:
    task.eval()
    with torch.no_grad():
        losses = [
            task.flow_loss(b, torch.Generator().manual_seed(1000 + i))["loss"].item()
            for i, b in enumerate(val)
        ]
    task.train()
    return sum(losses) / len(losses)


def run_seed(args: argparse.Namespace, seed: int, train: list[ClipBatch], val: list[ClipBatch]) -> dict:
    cfg = build_config(args.model, args.num_layers)
    tread = tread_config(
        {"selection_rate": args.rate, "start_layer_idx": args.start, "end_layer_idx": args.end},
        cfg.num_layers,
    )
    torch.manual_seed(seed)
    base = DiT(cfg)
    optim = OptimConfig(lr=args.lr, warmup_steps=20, weight_decay=0.0)
    runs = {}
    for name in ("off", "tread"):
        model = copy.deepcopy(base)
        if name == "tread":
            enable_tread(model, tread)
        task = PretrainTask(model, FlowConfig(), optim, args.steps, cfg.text_in_channels, seed=seed)
        opt, sched = build_optimizer(model, optim, args.steps)
        runs[name] = {"task": task, "opt": opt, "sched": sched, "seconds": 0.0, "curve": [], "train": []}
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            for r in runs.values():
                r["curve"].append((step, r["seconds"], val_loss(r["task"], val)))
        if step == args.steps:
            break
        batch = train[step % len(train)]
        for r in runs.values():
            task = r["task"]
            start = time.perf_counter()
            seed_tread(stream_seed(seed, step, "tread"), task.model)
            loss = task.flow_loss(batch, torch.Generator().manual_seed(stream_seed(seed, step, "train")))[
                "loss"
            ]
            loss.backward()
            r["opt"].step()
            r["sched"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["seconds"] += time.perf_counter() - start
            r["train"].append(loss.item())
    return {n: {"curve": r["curve"], "train": r["train"], "seconds": r["seconds"]} for n, r in runs.items()}


def at_seconds(curve: list[tuple[int, float, float]], seconds: float) -> float:
    """Validation loss at `seconds` of training, linear between evaluations."""
    for (_, t0, l0), (_, t1, l1) in zip(curve, curve[1:], strict=False):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / max(t1 - t0, 1e-12)
    return curve[-1][2]


def summarise(results: dict[int, dict], args: argparse.Namespace) -> str:
    def stats(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    seeds = sorted(results)
    lines = [
        f"model {args.model}{f' ({args.num_layers} layers)' if args.num_layers else ''}, {args.steps} steps, "
        f"seeds {seeds}, TREAD rate {args.rate} layers {args.start}..{args.end}; validation flow loss "
        "(mean ± sd over seeds; eval mode, fixed noise)",
        "",
        "| run | s / step | speed-up | val loss, first eval | val loss @ 1/2 steps | val loss @ end | "
        "val loss @ the off run's half time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    half_step = args.steps // 2 // args.eval_every * args.eval_every
    for name in ("off", "tread"):
        per_step = [results[s][name]["seconds"] / args.steps for s in seeds]
        speed = [results[s]["off"]["seconds"] / results[s][name]["seconds"] for s in seeds]
        first = [results[s][name]["curve"][0][2] for s in seeds]
        half = [next(v for st, _, v in results[s][name]["curve"] if st == half_step) for s in seeds]
        end = [results[s][name]["curve"][-1][2] for s in seeds]
        wall = [at_seconds(results[s][name]["curve"], results[s]["off"]["seconds"] / 2) for s in seeds]
        lines.append(
            f"| {name} | {statistics.mean(per_step):.4f} | {statistics.mean(speed):.2f}x | {stats(first)} | "
            f"{stats(half)} | {stats(end)} | {stats(wall)} |"
        )
    return "\n".join(lines)


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, colour in (("off", "tab:blue"), ("tread", "tab:orange")):
        for i, seed in enumerate(sorted(results)):
            steps, seconds, loss = zip(*results[seed][name]["curve"], strict=True)
            label = name if i == 0 else None
            axes[0].plot(steps, loss, color=colour, alpha=0.7, label=label)
            axes[1].plot(seconds, loss, color=colour, alpha=0.7, label=label)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("training seconds (fwd + bwd + step)")
    for ax in axes:
        ax.set_ylabel("validation flow loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.tools.tread_study", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="tiny")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3)  # experiment=smoke's
    p.add_argument("--max-tokens", type=int, default=1200)
    p.add_argument("--rate", type=float, default=0.5)  # the release's selection_rate
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--end", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/tread_study"))
    args = p.parse_args(argv)
    text_dim = build_config(args.model, args.num_layers).text_in_channels
    train = batches(256, 0, args.max_tokens, text_dim)
    val = batches(8, 12345, args.max_tokens, text_dim)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {seed: run_seed(args, seed, train, val) for seed in args.seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    table = summarise(results, args)
    (args.out / "tread_study.md").write_text(table + "\n")
    (args.out / "tread_study.json").write_text(json.dumps({str(k): v for k, v in results.items()}))
    plot(results, args.out / "tread_study.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
