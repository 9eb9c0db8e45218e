"""`python -m magi_train.tools.toy --out DIR`: the DMD-2 (arXiv 2405.14867) toy study of issue 12 on CPU - for each data
spec, guidance setting and seed: the guided teacher's reference, its own N-step samplers, and DMD-2 students
(production schedule and study variants) scored by the bounds of toy/metrics.py; writes table.md (mean and spread
over seeds), metrics.json and samples.png."""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import torch

from magi_train.flow.sampling import Guidance
from magi_train.tools.toy.distill import (
    DistillConfig,
    TeacherConfig,
    distill,
    renoise_sample,
    toy_noise,
    train_teacher,
)
from magi_train.tools.toy.gmm import SPECS, get_spec, readout
from magi_train.tools.toy.study import check, make_bench, score
from magi_train.utils.fileio import atomic_file, atomic_write

GUIDANCE = {"w1": None, "w3": 3.0, "prod": Guidance()}  # prod = the recipe's default: video 5 / 2, audio 5
# fourth study, shared-t25 at CI length: the generator moves more (lr 2e-3 against the critic's 3e-4, an update
# every second iteration), decayed so that the mode weights settle
MOVING = {"critic_samples": "final", "lr_gen": 2e-3, "ttur": 2, "lr_final": 0.05, "batch": 256}
# the same at 2x iterations with the critic restarted from the teacher every 1000 iterations: a fresh critic
# forgets the history that drifts the mode weights (docs/dmd2_toy.md, the spread at CI length)
RESTARTED = {**MOVING, "critic_reset": 1000, "iters": 2}
# study rows: name -> DistillConfig overrides (on top of the production defaults and --iters)
VARIANTS = {
    "student": {},
    "student 3x iterations": {"iters": 3},  # multiplier, see _config
    "student + GAN (DMD2)": {"gan_generator_weight": 5e-2, "gan_critic_weight": 1e-1},
    "student, score shift 1": {"score_shift": 1.0},
    "student, score sigma <= 0.8": {"score_high": 0.8},
    "student, score shift 1, TTUR 1": {"score_shift": 1.0, "ttur": 1},
    "student, TTUR 1": {"ttur": 1},
    "student, lr cosine to 0.05": {"lr_final": 0.05},
    "student 5x iterations": {"iters": 5},  # multiplier
    "student, critic on the finished sample": {"critic_samples": "final"},
    "student, critic on the finished sample, 3x iterations": {"critic_samples": "final", "iters": 3},
    "student, critic on the finished sample + GAN 1, 2x iterations": {
        "critic_samples": "final",
        "gan_generator_weight": 1.0,
        "gan_critic_weight": 1.0,
        "iters": 2,
    },
    # guided runs: the real score is the teacher fitted to its guided ODE (w = 1: no fit, the row above's run)
    "student, critic on the finished sample + GAN 1, 4x iterations, lr cosine to 0.1": {
        "critic_samples": "final",
        "gan_generator_weight": 1.0,
        "gan_critic_weight": 1.0,
        "iters": 4,
        "lr_final": 0.1,
        "guided_fit_steps": 1000,
    },
    "student, critic on the finished sample, generator lr 2e-3, TTUR 2, lr cosine to 0.05, batch 256": MOVING,
    "student, critic on the finished sample, generator lr 2e-3, TTUR 2, lr cosine to 0.05, critic restarted "
    "every 1000, 2x iterations, batch 256": RESTARTED,
    "student, one critic per step": {"critic_per_step": True},
    # guided runs of the lifted specs: finished-sample critic, real score fitted to the guided ODE
    "student, critic on the finished sample, fitted real score": {
        "critic_samples": "final",
        "guided_fit_steps": 1000,
    },
    "student, critic on the finished sample + GAN": {
        "critic_samples": "final",
        "gan_generator_weight": 5e-2,
        "gan_critic_weight": 1e-1,
    },
    "control: sign of g flipped": {"flip_sign": True},
    "control: frozen critic": {"train_critic": False},
    "control: critic x0 target": {"critic_target": "x0"},
    "control: CFG on the fake score": {"fake_guidance": True},
    "control: no backward simulation": {"backward_simulation": False},
}
KEYS = ("fails", "mode_tv", "std_ratio_video", "std_ratio_audio", "joint_ratio", "mmd2_joint", "sw1_joint")


def _config(name: str, guidance, iters: int, seed: int, steps: int = 8, shift: float = 5.0) -> DistillConfig:
    over = dict(VARIANTS[name])
    if "iters" in over:
        over["iters"] = over["iters"] * iters
    base = DistillConfig(iters=iters, guidance=guidance, seed=seed, num_steps=steps, student_shift=shift)
    return replace(base, **over)


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "inf"
    mean = sum(finite) / len(finite)
    spread = (sum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1)) ** 0.5
    return f"{mean:.3f} ± {spread:.3f}" if len(finite) > 1 else f"{mean:.3f}"


def format_table(results: dict[tuple[str, str, str], list[dict]]) -> str:
    """Markdown: one row per (spec, guidance, run), mean ± std over seeds of the key metrics."""
    lines = ["| spec | guidance | run | seeds | " + " | ".join(KEYS) + " |", "|" + "---|" * (4 + len(KEYS))]
    for (spec, guidance, name), rows in results.items():
        cells = [_fmt([float(r[k]) for r in rows]) if all(k in r for r in rows) else "" for k in KEYS]
        lines.append(f"| {spec} | {guidance} | {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(samples: dict[str, list[torch.Tensor]], path: Path) -> None:
    """Scatter of the video samples per run, coloured by the audio value."""
    import matplotlib  # optional: magi_train[dev]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 4
    nrow = math.ceil(len(samples) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.3 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([]), ax.axis("off")
    for ax, (title, xs) in zip(axes.flat, samples.items(), strict=False):
        ax.axis("on")
        x = xs[0].clamp(-3, 3).numpy()
        c = xs[1][:, 0].clamp(-2, 2).numpy() if len(xs) > 1 else None
        ax.scatter(x[:, 0], x[:, 1], c=c, cmap="coolwarm", vmin=-2, vmax=2, s=0.3, rasterized=True)
        ax.set_xlim(-2.6, 2.6), ax.set_ylim(-2.6, 2.6), ax.set_aspect("equal")
        head, _, run = title.partition(": ")
        ax.set_title(head + ":\n" + "\n".join(textwrap.wrap(run, 36)), fontsize=6)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m magi_train.tools.toy", description=__doc__)
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for table.md, metrics.json, samples.png"
    )
    parser.add_argument("--specs", nargs="+", default=["shared"], choices=sorted(SPECS))
    parser.add_argument("--guidance", nargs="+", default=["w1", "w3", "prod"], choices=sorted(GUIDANCE))
    parser.add_argument("--runs", nargs="+", default=["student"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8, help="student (and baseline) steps")
    parser.add_argument(
        "--shift", type=float, default=5.0, help="shift of the student's (and baseline's) steps"
    )
    parser.add_argument("--iters", type=int, default=DistillConfig.iters)
    parser.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps)
    parser.add_argument("--num-eval", type=int, default=3000)
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args(argv)
    if min(args.iters, args.teacher_steps) < 0 or args.num_eval < 16 or args.steps < 1:
        parser.error("step counts must be >= 0, --steps >= 1 and --num-eval >= 16")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny MLPs: extra intra-op threads only add overhead (and spin on shared cores)
    results: dict[tuple[str, str, str], list[dict]] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    t0 = time.perf_counter()
    for spec_name in args.specs:
        spec = get_spec(spec_name)
        for seed in args.seeds:
            teacher = train_teacher(spec, replace(TeacherConfig(), steps=args.teacher_steps, seed=seed))
            for g_name in args.guidance:
                guidance = GUIDANCE[g_name]
                bench = make_bench(
                    spec, teacher, guidance, args.steps, args.shift, num_eval=args.num_eval, seed=100 + seed
                )
                for name, row in bench.rows.items():
                    fails = (
                        [b.name for b in check(bench, row) if not b.ok]
                        if name != "teacher N-step re-noise"
                        else []
                    )
                    results.setdefault((spec_name, g_name, name), []).append({**row, "fails": len(fails)})
                if seed == args.seeds[0]:
                    samples[f"{spec_name} {g_name}: reference ODE"] = readout(spec, bench.reference)
                for name in args.runs:
                    cfg = _config(name, guidance, args.iters, seed, args.steps, args.shift)
                    t1 = time.perf_counter()
                    student, _ = distill(teacher, spec, cfg)
                    stats = score(bench, student)
                    fails = [b.name for b in check(bench, stats) if not b.ok]
                    results.setdefault((spec_name, g_name, name), []).append(
                        {**stats, "fails": len(fails), "failed": fails, "train_s": time.perf_counter() - t1}
                    )
                    print(
                        f"[{spec_name} {g_name} seed {seed}] {name}: fails {fails} ({time.perf_counter() - t1:.0f}s)",
                        flush=True,
                    )
                    if seed == args.seeds[0]:
                        gen = torch.Generator().manual_seed(0)
                        noise = toy_noise(spec, args.num_eval, gen)
                        samples[f"{spec_name} {g_name}: {name}"] = readout(
                            spec, renoise_sample(student, noise, bench.labels, args.steps, args.shift, gen)
                        )
    table = format_table(results)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s")
    atomic_write(args.out / "table.md", table + "\n")
    flat = [{"spec": k[0], "guidance": k[1], "run": k[2], "seeds": v} for k, v in results.items()]
    atomic_write(args.out / "metrics.json", json.dumps(flat, indent=1))
    if args.plot:
        plot(samples, args.out / "samples.png")
        print(f"wrote {args.out / 'samples.png'}")
    return results


if __name__ == "__main__":
    main()
