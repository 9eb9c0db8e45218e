"""The DMD-2 toy proof (issue 4 item 5): the library's DMD-2 functions distil a 2-D mixture teacher into a
4-step student that meets the acceptance bounds, and two negative controls do not."""

import pytest
import torch

from magi_train.flow import dmd
from magi_train.tools.toy.distill import (
    DistillConfig,
    TeacherConfig,
    ToyMLP,
    distill,
    renoise_sample,
    toy_noise,
    train_teacher,
)
from magi_train.tools.toy.gmm import balanced_labels
from magi_train.tools.toy.metrics import evaluate, passes

NUM_EVAL = 2000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teacher_2d() -> ToyMLP:
    return train_teacher(TeacherConfig(), joint=False)


@pytest.fixture(scope="module")
def teacher_joint() -> ToyMLP:
    return train_teacher(TeacherConfig(), joint=True)


def _metrics(model: ToyMLP, num_steps: int, seed: int = 100) -> dict[str, dict[str, float]]:
    """Metrics of the model's own few-step re-noising sampler (the distilled sampler)."""
    gen = torch.Generator().manual_seed(seed)
    labels = balanced_labels(NUM_EVAL)
    joint = len(model.dims) > 1
    samples = renoise_sample(model, toy_noise(NUM_EVAL, joint, gen), labels, num_steps, generator=gen)
    return evaluate(samples, labels)


def test_four_step_student_meets_the_bounds(teacher_2d):
    baseline = _metrics(teacher_2d, 4)["2d"]
    assert not passes(baseline, 8), f"the teacher's own 4-step sampler already passes: {baseline}"
    student, history = distill(teacher_2d, DistillConfig())
    stats = _metrics(student, 4)["2d"]
    print("teacher 4-step", baseline, "\nstudent 4-step", stats)
    assert stats["modes"] == 8
    assert stats["in_3std"] >= 0.95
    assert stats["std"] <= 0.15
    assert stats["class_acc"] >= 0.99
    assert stats["in_3std"] > baseline["in_3std"] and stats["std"] < baseline["std"]
    assert all(torch.isfinite(torch.tensor(history["dmd"])))


@pytest.mark.parametrize("control", ["flip_sign", "frozen_critic"])
def test_negative_controls_fail_the_bounds(teacher_2d, control):
    cfg = DistillConfig(flip_sign=True) if control == "flip_sign" else DistillConfig(train_critic=False)
    student, history = distill(teacher_2d, cfg)
    stats = _metrics(student, 4)["2d"]
    print(control, stats)
    assert not passes(stats, 8), f"negative control {control} passes the bounds: {stats}"
    if control == "frozen_critic":  # critic = teacher for ever: the DMD direction is exactly 0
        assert max(history["g_abs"]) == 0.0 and not history["critic"]


def test_two_modality_variant_meets_the_bounds_on_both_parts(teacher_joint):
    student, _ = distill(teacher_joint, DistillConfig())
    stats = _metrics(student, 4)
    print("joint student 4-step", stats)
    for part, num_modes in (("2d", 8), ("1d", 4)):
        s = stats[part]
        assert (
            s["modes"] == num_modes and s["in_3std"] >= 0.95 and s["std"] <= 0.15 and s["class_acc"] >= 0.99
        ), (part, s)
    assert stats["1d"]["joint_acc"] >= 0.99  # the 1-D value belongs to the 2-D mode it was generated with


def test_the_toy_runs_the_library_functions(monkeypatch):
    """The toy is the DMD-2 code of magi_train.flow.dmd, not a copy: patch it and count the calls."""
    calls: dict[str, int] = {}

    def counting(name):
        original = getattr(dmd, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(dmd, name, wrapper)

    for name in (
        "simulate_to_step",
        "student_x0",
        "dmd_generator_loss",
        "dmd_gradient",
        "dmd_loss",
        "teacher_x0",
        "critic_loss",
        "sample_score_sigma",
        "sample_step_index",
        "shared_generator",
    ):
        counting(name)
    teacher = ToyMLP((2, 1), hidden=16, depth=2).requires_grad_(False)
    distill(teacher, DistillConfig(iters=10, batch=8))
    assert (
        calls["dmd_generator_loss"] == calls["dmd_gradient"] == calls["dmd_loss"] == calls["teacher_x0"] == 2
    )
    assert calls["critic_loss"] == calls["simulate_to_step"] == calls["sample_step_index"] == 10
    assert calls["sample_score_sigma"] == 12  # an independent draw for every critic step and DMD step


def test_command_writes_the_table_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from magi_train.tools.toy.__main__ import main

    rows = main(
        [
            "--out",
            str(tmp_path),
            "--teacher-steps",
            "20",
            "--iters",
            "10",
            "--one-step-iters",
            "5",
            "--num-eval",
            "64",
        ]
    )
    runs = {r["run"] for r in rows}
    assert {
        "teacher 100-step ODE (2nd draw)",
        "teacher 4-step",
        "student 4-step",
        "student 1-step",
        "control: sign of g flipped",
        "control: frozen critic",
    } <= runs
    assert {(r["variant"], r["part"]) for r in rows} == {
        ("2-D", "2d"),
        ("2-D + 1-D", "2d"),
        ("2-D + 1-D", "1d"),
    }
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| in_3std |" in table
    assert (tmp_path / "metrics.json").stat().st_size > 0
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num-eval", "4"])
