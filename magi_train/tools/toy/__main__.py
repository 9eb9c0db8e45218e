"""`python -m magi_train.tools.toy --out DIR`: the DMD-2 (arXiv 2405.14867) toy proof on CPU - teacher, 4-step and
1-step students, negative controls, one- and two-modality variants; prints a table, saves a PNG."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from magi_train.tools.toy.distill import (
    DistillConfig,
    TeacherConfig,
    ToyMLP,
    distill,
    euler_sample,
    renoise_sample,
    toy_noise,
    train_teacher,
)
from magi_train.tools.toy.gmm import balanced_labels
from magi_train.tools.toy.metrics import evaluate, passes
from magi_train.utils.fileio import atomic_file, atomic_write

# the 1-step generator has no later step to correct it: more iterations and a faster generator (spec §9: 15k)
ONE_STEP = {"num_steps": 1, "iters": 4000, "lr_gen": 5e-4}
COLUMNS = [
    "variant",
    "part",
    "run",
    "pass",
    "modes",
    "in_3std",
    "std",
    "std_max",
    "radial_bias",
    "tangential_std",
    "class_acc",
    "joint_acc",
    "mmd2",
    "sw1",
    "train_s",
]


def run_variant(joint: bool, args: argparse.Namespace) -> tuple[list[dict], dict[str, list[torch.Tensor]]]:
    """Train the teacher and the students of one variant; return table rows and the samples to plot."""
    name = "2-D + 1-D" if joint else "2-D"
    t0 = time.perf_counter()
    teacher = train_teacher(replace(TeacherConfig(), steps=args.teacher_steps, seed=args.seed), joint=joint)
    teacher_s = time.perf_counter() - t0
    print(f"[{name}] teacher: {args.teacher_steps} steps in {teacher_s:.0f}s", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 100)
    labels = balanced_labels(args.num_eval)
    reference = euler_sample(teacher, toy_noise(args.num_eval, joint, gen), labels)  # 100-step ODE, w = 1

    base = DistillConfig(iters=args.iters, seed=args.seed)
    students = [
        ("student 4-step", base),
        ("student 1-step", replace(base, **{**ONE_STEP, "iters": args.one_step_iters})),
    ]
    if not joint and args.controls:
        students += [
            ("student 4-step, per-sample normaliser", replace(base, normalizer="per_sample")),
            ("control: sign of g flipped", replace(base, flip_sign=True)),
            ("control: frozen critic", replace(base, train_critic=False)),
        ]
    runs: list[tuple[str, ToyMLP, int | None, float]] = [
        ("teacher 100-step ODE (2nd draw)", teacher, None, teacher_s),
        ("teacher 4-step", teacher, 4, teacher_s),
        ("teacher 1-step", teacher, 1, teacher_s),
    ]
    for label, cfg in students:
        t0 = time.perf_counter()
        student, _ = distill(teacher, cfg)
        runs.append((label, student, cfg.num_steps, time.perf_counter() - t0))
        print(f"[{name}] {label}: {cfg.iters} iterations in {runs[-1][3]:.0f}s", flush=True)

    rows, plots = [], {}
    for label, model, steps, seconds in runs:
        noise = toy_noise(args.num_eval, joint, gen)
        if steps is None:
            samples = euler_sample(model, noise, labels)
        else:
            samples = renoise_sample(model, noise, labels, steps, generator=gen)
        plots[label] = samples
        for part, stats in evaluate(samples, labels, reference).items():
            ok = passes(stats, 8 if part == "2d" else 4)
            rows.append(
                {
                    "variant": name,
                    "part": part,
                    "run": label,
                    "pass": "yes" if ok else "no",
                    "train_s": round(seconds),
                    **stats,
                }
            )
    return rows, plots


def format_table(rows: list[dict]) -> str:
    """Markdown table of the metric rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(
                f"{v:.3g}"
                if isinstance(v, float) and abs(v) >= 1e3
                else f"{v:.3f}"
                if isinstance(v, float)
                else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(plots: dict[str, dict[str, list[torch.Tensor]]], path: Path, labels: torch.Tensor) -> None:
    """Scatter of the 2-D samples per run (colour = class; two-modality variant: colour = the 1-D value)."""
    import matplotlib  # optional: magi_train[dev]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(p) for p in plots.values())
    fig, axes = plt.subplots(len(plots), ncol, figsize=(1.9 * ncol, 2.1 * len(plots)), squeeze=False)
    for row, (variant, runs) in enumerate(plots.items()):
        for col in range(ncol):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if col >= len(runs):
                ax.axis("off")
                continue
            title, samples = list(runs.items())[col]
            outside = float((samples[0].abs() > 3).any(dim=1).double().mean())
            if outside > 0.5:
                ax.text(
                    0.5,
                    0.5,
                    f"diverged:\n{outside:.0%} outside the view",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=6,
                )
            x = samples[0].clamp(-3, 3).numpy()
            if len(samples) > 1:
                c, cmap, vmin, vmax = samples[1][:, 0].clamp(-2, 2).numpy(), "coolwarm", -2, 2
            else:
                c, cmap, vmin, vmax = labels.numpy(), "tab10", 0, 9
            ax.scatter(x[:, 0], x[:, 1], c=c, cmap=cmap, vmin=vmin, vmax=vmax, s=0.3, rasterized=True)
            ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_aspect("equal")
            ax.set_title(
                f"{variant}: {title}".replace(", ", ",\n").replace("control: ", "control:\n"), fontsize=6
            )
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m magi_train.tools.toy", description=__doc__)
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for table.md, metrics.json, samples.png"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps)
    parser.add_argument(
        "--iters", type=int, default=DistillConfig.iters, help="critic iterations, 4-step student"
    )
    parser.add_argument("--one-step-iters", type=int, default=ONE_STEP["iters"])
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument(
        "--no-controls",
        dest="controls",
        action="store_false",
        help="skip the negative controls and the normaliser ablation",
    )
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args(argv)
    if min(args.teacher_steps, args.iters, args.one_step_iters) < 0 or args.num_eval < 16:
        parser.error("step counts must be >= 0 and --num-eval >= 16")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny MLPs: extra intra-op threads only add overhead (and spin on shared cores)
    t0 = time.perf_counter()
    rows, plots = [], {}
    for joint in (False, True):
        r, p = run_variant(joint, args)
        rows += r
        plots["2-D + 1-D" if joint else "2-D"] = p
    table = format_table(rows)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s")
    atomic_write(args.out / "table.md", table + "\n")
    atomic_write(args.out / "metrics.json", json.dumps(rows, indent=1))
    if args.plot:
        plot(plots, args.out / "samples.png", balanced_labels(args.num_eval))
        print(f"wrote {args.out / 'samples.png'}")
    return rows


if __name__ == "__main__":
    main()
