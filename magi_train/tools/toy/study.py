"""The DMD-2 toy's test bench (arXiv 2405.14867, issue 12): for a data spec, a guidance setting and a step count,
the reference (the guided teacher's 200-step ODE), the teacher's own N-step samplers (the baselines the student
must beat) and the scoring of a distilled student against them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from magi_train.tools.toy.distill import (
    DistillConfig,
    GuidanceSpec,
    ToyMLP,
    distill,
    euler_sample,
    renoise_sample,
    toy_noise,
)
from magi_train.tools.toy.gmm import DataSpec, balanced_labels
from magi_train.tools.toy.metrics import Bound, bounds, evaluate

REFERENCE_STEPS = (
    200  # Euler steps of the reference ODE (the 2nd draw of it is the noise floor of the metrics)
)


@dataclass
class Bench:
    """Everything a student of one setting is scored against."""

    spec: DataSpec
    teacher: ToyMLP
    guidance: GuidanceSpec
    num_steps: int
    shift: float
    labels: torch.Tensor
    reference: list[torch.Tensor]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # teacher samplers' metrics

    @property
    def baseline(self) -> dict[str, float]:
        """The teacher's own N-step sampler: the distilled x0/re-noise chain with CFG at every step."""
        return self.rows["teacher N-step re-noise"]


def make_bench(
    spec: DataSpec,
    teacher: ToyMLP,
    guidance: GuidanceSpec,
    num_steps: int = 8,
    shift: float = 5.0,
    num_eval: int = 3000,
    seed: int = 100,
) -> Bench:
    """Reference and teacher baselines of one setting, with a fixed evaluation seed."""
    gen = torch.Generator().manual_seed(seed)
    labels = balanced_labels(num_eval, spec.num_classes)
    reference = euler_sample(teacher, toy_noise(spec, num_eval, gen), labels, REFERENCE_STEPS, guidance)
    bench = Bench(spec, teacher, guidance, num_steps, shift, labels, reference)
    draws = {
        "teacher ODE (2nd draw)": euler_sample(
            teacher, toy_noise(spec, num_eval, gen), labels, REFERENCE_STEPS, guidance
        ),
        "teacher N-step re-noise": renoise_sample(
            teacher, toy_noise(spec, num_eval, gen), labels, num_steps, shift, gen, guidance
        ),
        "teacher N-step Euler": euler_sample(
            teacher, toy_noise(spec, num_eval, gen), labels, num_steps, guidance, shift
        ),
    }
    bench.rows = {name: evaluate(spec, x, labels, reference) for name, x in draws.items()}
    return bench


def score(bench: Bench, student: ToyMLP, seed: int = 200) -> dict[str, float]:
    """Metrics of the student's own N-step sampler (no CFG: it is CFG-free) against the bench's reference."""
    gen = torch.Generator().manual_seed(seed)
    noise = toy_noise(bench.spec, len(bench.labels), gen)
    samples = renoise_sample(student, noise, bench.labels, bench.num_steps, bench.shift, gen)
    return evaluate(bench.spec, samples, bench.labels, bench.reference)


def check(bench: Bench, stats: dict[str, float]) -> list[Bound]:
    """The bounds of issue 12 item 2 for a student's metrics on this bench."""
    return bounds(stats, bench.baseline)


def run(bench: Bench, cfg: DistillConfig) -> tuple[dict[str, float], list[Bound], dict[str, list[float]]]:
    """Distil the bench's teacher with `cfg` (its guidance and step count set from the bench) and score it."""
    if cfg.guidance != bench.guidance or cfg.num_steps != bench.num_steps or cfg.student_shift != bench.shift:
        raise ValueError(
            f"DistillConfig (guidance {cfg.guidance}, {cfg.num_steps} steps, shift {cfg.student_shift}) does not "
            f"match the bench (guidance {bench.guidance}, {bench.num_steps} steps, shift {bench.shift})"
        )
    student, history = distill(bench.teacher, bench.spec, cfg)
    stats = score(bench, student)
    return stats, check(bench, stats), history
