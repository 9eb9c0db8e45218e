"""`python -m magi_train.tools.audio_sigma_study`: the smoke comparison of per-modality noise levels (issue 11 item 4).

Trains `experiment=smoke` (the tiny DiT on the learnable synthetic clips) once per `flow.audio_sigma` choice, from
the same data, and per seed the same initialisation and noise stream (`--seeds`, default 0 and 1), then reports

- the training loss curves per modality (train/loss_video, train/loss_audio of metrics.csv, in windows of steps)
  and their mean over the last steps. These are NOT comparable across choices: each is measured under its own
  noise-level distribution;
- a validation loss at FIXED common levels, the same for every choice: each trained model (its checkpoint's EMA
  weights when it has them, as `load_dit` picks) on the validation clips, t2v, no text dropout, the same noise per
  batch, at (video, audio) levels on the diagonal (what the released joint sampler visits) and off it (what only
  separate levels train).

    python -m magi_train.tools.audio_sigma_study [--steps 600] [--out outputs/audio_sigma_study]
        [--choices shared independent correlated:0.5] [--seeds 0 1] [--override lora=default --override ...]
        [--threads 1]

`--override` passes Hydra overrides to every training run (e.g. LoRA adapters, another model size).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from magi_train.__main__ import compose, run
from magi_train.config import DataConfig, FlowConfig, OptimConfig, narrow
from magi_train.data.datamodule import ClipDataModule
from magi_train.models.weights import load_dit
from magi_train.tasks.pretrain import PretrainTask
from magi_train.utils.fileio import atomic_write

DIAGONAL = (0.2, 0.5, 0.8)  # shared levels s_video = s_audio
OFF_DIAGONAL = ((0.8, 0.2), (0.2, 0.8))  # (video, audio): one modality much cleaner than the other
LAST = 50  # steps averaged for the final training losses


def parse_choice(text: str) -> tuple[str, float]:
    """'shared' | 'independent' | 'correlated:RHO' -> (flow.audio_sigma, flow.audio_sigma_correlation)."""
    name, _, rho = text.partition(":")
    if name == "correlated":
        try:
            return name, float(rho or 0.5)
        except ValueError:
            raise ValueError(f"choice {text!r}: give correlated:RHO with RHO a number in [-1, 1]") from None
    if rho or name not in ("shared", "independent"):
        raise ValueError(f"choice {text!r}: use shared, independent or correlated:RHO")
    return name, 0.0


def train_losses(metrics: Path) -> list[tuple[int, float, float]]:
    """(step, train/loss_video, train/loss_audio) rows of a run's metrics.csv."""
    with metrics.open() as f:
        return [
            (int(r["step"]), float(r["train/loss_video"]), float(r["train/loss_audio"]))
            for r in csv.DictReader(f)
            if r.get("train/loss_video")
        ]


@torch.no_grad()
def fixed_level_losses(
    run_dir: Path, overrides: list[str], seed: int = 0
) -> tuple[dict[str, dict[str, float]], str]:
    """Validation loss_video / loss_audio of the run's last checkpoint at every fixed (video, audio) level pair
    ("0.8/0.2": video 0.8, audio 0.2), and which weights were evaluated ("ema" or "raw")."""
    cfg = compose(overrides)
    data = narrow(cfg.data, DataConfig)
    loaded = load_dit(run_dir / "checkpoints" / "last.ckpt", what="the study's checkpoint")
    model = loaded.model.eval()
    flow = FlowConfig(mode_probs={"t2v": 1.0}, text_drop_prob=0.0)  # every clip's audio is noised and scored
    task = PretrainTask(model, flow, OptimConfig(), max_steps=1, text_dim=data.text_dim)
    batches = list(ClipDataModule(data).val_dataloader())
    out = {}
    for sv, sa in [(s, s) for s in DIAGONAL] + list(OFF_DIAGONAL):
        sums = {"loss_video": 0.0, "loss_audio": 0.0}
        for i, batch in enumerate(batches):
            n = len(batch)
            gen = torch.Generator().manual_seed(seed * 100_003 + i)  # the same noise for every model
            res = task.flow_loss(batch, gen, sigmas=(torch.full((n,), sv), torch.full((n,), sa)))
            for k in sums:
                sums[k] += res[k].item() / len(batches)
        out[f"{sv:g}/{sa:g}"] = sums
    return out, loaded.weights


def study(choices: list[str], steps: int, out: Path, extra: list[str], seeds: list[int]) -> dict[str, dict]:
    """{choice: {seed: results}}: one training run per choice and seed (the seed sets initialisation and noise)."""
    results: dict[str, dict] = {}
    for choice in choices:
        name, rho = parse_choice(choice)
        for seed in seeds:
            run_dir = out / f"{choice.replace(':', '_')}_seed{seed}"
            overrides = [
                "recipe=pretrain_base", "experiment=smoke", f"run_dir={run_dir}", f"seed={seed}",
                f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", f"flow.audio_sigma={name}",
                f"flow.audio_sigma_correlation={rho}", *extra,
            ]  # fmt: skip
            run(compose(overrides))
            curve = train_losses(run_dir / "metrics.csv")
            last = [r for r in curve if r[0] >= steps - LAST]
            fixed, weights = fixed_level_losses(run_dir, overrides)
            results.setdefault(choice, {})[seed] = {
                "train_video_last": sum(r[1] for r in last) / len(last),
                "train_audio_last": sum(r[2] for r in last) / len(last),
                "curve": curve,
                "fixed": fixed,
                "weights": weights,
            }
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _numbers(run: dict, pairs: list[str]) -> dict[str, float]:
    """The reported numbers of one run, flat: training (last steps), each fixed pair, the diagonal mean."""
    n = {"train video": run["train_video_last"], "train audio": run["train_audio_last"]}
    for p in pairs:
        n[f"{p} video"], n[f"{p} audio"] = run["fixed"][p]["loss_video"], run["fixed"][p]["loss_audio"]
    for m in ("video", "audio"):
        n[f"diagonal {m}"] = _mean([n[f"{p} {m}"] for p in pairs[: len(DIAGONAL)]])
    return n


def report(results: dict[str, dict], steps: int, extra: list[str]) -> str:
    pairs = [f"{s:g}/{s:g}" for s in DIAGONAL] + [f"{v:g}/{a:g}" for v, a in OFF_DIAGONAL]
    seeds = sorted({seed for runs in results.values() for seed in runs})
    weights = {r["weights"] for runs in results.values() for r in runs.values()}
    window = max(steps // 6, 1)
    starts = range(0, steps, window)
    lines = [
        f"{steps} steps per run, seeds {', '.join(map(str, seeds))}; overrides: {' '.join(extra) or 'none'}",
        "",
        f"Training losses (video / audio), mean over windows of {window} steps and over the seeds; not comparable "
        "across choices:",
        "",
        "| choice | " + " | ".join(f"{a}-{min(a + window, steps)}" for a in starts) + " |",
        "|---|" + "---:|" * len(starts),
    ]
    for choice, runs in results.items():
        cells = []
        for a in starts:
            rows = [x for r in runs.values() for x in r["curve"] if a <= x[0] < a + window]
            cells.append(
                f"{_mean([x[1] for x in rows]):.3f} / {_mean([x[2] for x in rows]):.3f}" if rows else "-"
            )
        lines.append(f"| {choice} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Final training losses (mean of the last {LAST} steps) and validation losses at fixed (video/audio) "
        f"levels, the same noise for every model, {'/'.join(sorted(weights))} weights (video / audio); per seed, "
        "then the mean over seeds:",
        "",
        "| choice | seed | train, last | " + " | ".join(f"val {p}" for p in pairs) + " | val diagonal mean |",
        "|---|---|---:|" + "---:|" * (len(pairs) + 1),
    ]
    for choice, runs in results.items():
        per_seed = [(str(seed), _numbers(r, pairs)) for seed, r in sorted(runs.items())]
        if len(per_seed) > 1:
            per_seed.append(("mean", {k: _mean([n[k] for _, n in per_seed]) for k in per_seed[0][1]}))
        for label, n in per_seed:
            cells = [f"{n[f'{p} video']:.3f} / {n[f'{p} audio']:.3f}" for p in pairs]
            lines.append(
                f"| {choice} | {label} | {n['train video']:.3f} / {n['train audio']:.3f} | "
                + " | ".join(cells)
                + f" | {n['diagonal video']:.3f} / {n['diagonal audio']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m magi_train.tools.audio_sigma_study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("outputs/audio_sigma_study"))
    ap.add_argument("--choices", nargs="+", default=["shared", "independent", "correlated:0.5"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per choice and seed")
    ap.add_argument("--override", action="append", default=[], help="a Hydra override for every run (repeat)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the tiny model runs fastest on one)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # two threads on two busy cores ran the smoke steps ~15x slower here
    if args.steps < LAST:
        raise SystemExit(f"--steps {args.steps}: at least {LAST} (the final losses average the last {LAST})")
    for choice in args.choices:
        parse_choice(choice)  # a bad choice stops before any training
    results = study(args.choices, args.steps, args.out, args.override, args.seeds)
    text = report(results, args.steps, args.override)
    atomic_write(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write(args.out / "report.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
