"""The DMD-2 toy (issue 12): the library's DMD-2 functions distil a guided mixture teacher (the `shared` spec: unequal
and shared modes, a 1-D audio partner set by the video mode) with the production schedule (8 steps, shift 5,
per-sample per-modality normaliser, TTUR 5, backward simulation), scored against the guided teacher's 200-step
ODE by the bounds of `toy/metrics.py`; each negative control fails a bound that the student meets.

One module fixture trains the teacher and every configuration once (CI length: 2000 iterations, batch 256)."""

from dataclasses import replace

import pytest
import torch

from magi_train.flow import dmd
from magi_train.tools.toy.distill import DistillConfig, TeacherConfig, ToyMLP, distill, train_teacher
from magi_train.tools.toy.gmm import shared_spec
from magi_train.tools.toy.study import make_bench, run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # one_thread: tests/conftest.py

CI = dict(iters=2000, batch=256)  # CI length; docs/dmd2_toy.md has the longer study
CONTROLS = {
    "sign of g flipped": dict(flip_sign=True),
    "frozen critic": dict(train_critic=False),
    "critic with an x0 target": dict(critic_target="x0"),
    "no backward simulation": dict(backward_simulation=False),
}


@pytest.fixture(scope="module")
def toy():
    """{name: (stats, failed bound names, history)} of the student and the controls at w = 1."""
    torch.set_num_threads(1)
    spec = shared_spec()
    teacher = train_teacher(spec, TeacherConfig(steps=3000))
    bench = make_bench(spec, teacher, None, num_eval=2000)
    base = DistillConfig(**CI)
    out = {"teacher N-step": (bench.baseline, [], {})}
    runs = {"student": {}, "critic on the finished sample": dict(critic_samples="final"), **CONTROLS}
    for name, over in runs.items():
        stats, bs, history = run(bench, replace(base, **over))
        out[name] = (stats, [b.name for b in bs if not b.ok], history)
        print(name, {k: round(v, 4) for k, v in stats.items()}, "fails", out[name][1])
    return out


def test_student_beats_its_initialisation(toy):
    """The student starts as the teacher, whose 8-step sampler blurs modes into point masses (std_ratio ~0.2):
    DMD-2 must restore the within-mode spread and keep the audio coupled."""
    stats, fails, history = toy["student"]
    init = toy["teacher N-step"][0]
    assert stats["std_ratio_video"] > init["std_ratio_video"] + 0.1
    assert {"joint_ratio", "std_ratio_audio"}.isdisjoint(fails), fails
    assert all(torch.isfinite(torch.tensor(history["dmd"])))


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: at CI length the production-schedule student misses mode_tv, "
    "std_ratio_video and the distance bounds; docs/dmd2_toy.md, study",
)
def test_student_meets_every_bound(toy):
    assert toy["student"][1] == []


def test_critic_on_the_finished_sample_removes_most_of_the_bias(toy):
    """docs/dmd2_toy.md "Convergence or bias?": the critic that learns the finished sample instead of the mixture
    over steps of the student's x0 fails far fewer bounds and beats the teacher's 8-step sampler on the joint
    distances, which the DMD2-style student does not."""
    stats, fails, _ = toy["critic on the finished sample"]
    base = toy["teacher N-step"][0]
    assert len(fails) + 3 <= len(toy["student"][1]), (fails, toy["student"][1])
    assert stats["mmd2_joint"] < base["mmd2_joint"] and stats["sw1_joint"] < base["sw1_joint"], stats


@pytest.mark.parametrize("control", list(CONTROLS))
def test_control_fails_a_bound(toy, control):
    stats, fails, history = toy[control]
    assert fails, f"negative control {control} meets every bound: {stats}"
    if control == "sign of g flipped":  # fails bounds the student meets
        assert {"joint_ratio", "std_ratio_audio"} <= set(fails) - set(toy["student"][1]), fails
    if control == "critic with an x0 target":  # a wrong critic objective: further from the data everywhere
        student = toy["student"][0]
        keys = [f"{d}_{m}" for d in ("mmd2", "sw1") for m in ("video", "audio", "joint")] + ["mode_tv"]
        assert [k for k in keys if stats[k] > student[k]] == keys, (stats, student)
    if (
        control == "frozen critic"
    ):  # critic = teacher for ever: the DMD direction is exactly 0, student = teacher
        assert max(history["g_abs"]) == 0.0 and not history["critic"]
        assert {"std_ratio_video", "mode_tv"} <= set(fails)


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
        "sample_gan_sigma",
        "diffusion_gan_inputs",
    ):
        counting(name)
    spec = shared_spec()
    teacher = ToyMLP(spec.dims, spec.num_classes, hidden=16, depth=2).requires_grad_(False)
    cfg = DistillConfig(iters=10, batch=8, gan_generator_weight=1e-2, gan_critic_weight=1e-2)
    distill(teacher, spec, cfg)
    assert (
        calls["dmd_generator_loss"] == calls["dmd_gradient"] == calls["dmd_loss"] == calls["teacher_x0"] == 2
    )
    assert calls["critic_loss"] == calls["simulate_to_step"] == calls["sample_step_index"] == 10
    assert calls["sample_score_sigma"] == 12  # an independent draw for every critic step and DMD step
    assert calls["sample_gan_sigma"] == 12 and calls["diffusion_gan_inputs"] == 10


def test_study_knobs():
    """The study command trains the student it scores (its step count and shift), and the lr decay ends where
    it says."""
    from magi_train.tools.toy.__main__ import _config
    from magi_train.tools.toy.distill import _cosine

    cfg = _config("student 5x iterations", None, 100, 0, steps=4, shift=1.0)
    assert (cfg.iters, cfg.num_steps, cfg.student_shift) == (500, 4, 1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = _cosine(opt, 10, 0.05)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == 2.0 and abs(lrs[5] - 2.0 * (0.05 + 0.95 * 0.5)) < 1e-12 and lrs[10] == lrs[11] == 0.1
    with pytest.raises(ValueError, match="lr_final"):
        DistillConfig(lr_final=0.0)
