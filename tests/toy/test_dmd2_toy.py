"""The DMD-2 toy (issue 12): the library's DMD-2 functions distil a guided mixture teacher (the `shared` spec: unequal
and shared modes, a 1-D audio partner set by the video mode) with the production schedule (8 steps, shift 5,
per-sample per-modality normaliser, TTUR 5, backward simulation), scored against the guided teacher's 200-step
ODE by the bounds of `toy/metrics.py`; each negative control fails a bound that the student meets.

One module fixture trains the teacher and every configuration once (CI length: 2000 iterations, batch 256)."""

from dataclasses import replace

import pytest
import torch

from magi_train.flow import dmd
from magi_train.tools.toy.distill import (
    DistillConfig,
    TeacherConfig,
    ToyMLP,
    distill,
    euler_sample,
    fit_guided,
    toy_noise,
    train_teacher,
)
from magi_train.tools.toy.gmm import shared_spec
from magi_train.tools.toy.metrics import evaluate
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
def teacher():
    torch.set_num_threads(1)
    return train_teacher(shared_spec(), TeacherConfig(steps=3000))


@pytest.fixture(scope="module")
def toy(teacher):
    """{name: (stats, failed bound names, history)} of the student and the controls at w = 1."""
    spec = shared_spec()
    bench = make_bench(spec, teacher, None, num_eval=2000)
    base = DistillConfig(**CI)
    out = {"teacher N-step": (bench.baseline, [], {})}
    runs = {"student": {}, "critic on the finished sample": dict(critic_samples="final"), **CONTROLS}
    for name, over in runs.items():
        stats, bs, history = run(bench, replace(base, **over))
        out[name] = (stats, [b.name for b in bs if not b.ok], history)
        print(name, {k: round(v, 4) for k, v in stats.items()}, "fails", out[name][1])
    return out


GUIDED = {  # w = 3, CI length: CFG inside the real score (DMD2) against a real score fitted to the guided ODE
    "CFG in the real score": {},
    "real score fitted to the guided ODE": dict(
        guided_fit_steps=500, guided_fit_pool=16384, guided_fit_ode_steps=50
    ),
    "control: CFG on the fake score": dict(fake_guidance=True),
}


@pytest.fixture(scope="module")
def guided(teacher):
    """{name: (stats, failed bound names)} of the w = 3 students of GUIDED."""
    bench = make_bench(shared_spec(), teacher, 3.0, num_eval=2000)
    out = {}
    for name, over in GUIDED.items():
        stats, bs, _ = run(bench, DistillConfig(**CI, guidance=3.0, **over))
        out[name] = (stats, [b.name for b in bs if not b.ok])
        print(name, {k: round(v, 4) for k, v in stats.items()}, "fails", out[name][1])
    return out


def test_guidance_through_a_fitted_real_score_keeps_the_coupling(guided):
    """docs/dmd2_toy.md "Guidance without CFG in the DMD gradient": CFG inside the real score decouples the audio
    from the video (the DMD fixed point is not the guided ODE's distribution); the same DMD-2 student distilled
    from a real score fitted to the guided ODE's samples, without CFG, keeps the coupling at CI length (its
    distances need the study's length)."""
    cfg_stats, cfg_fails = guided["CFG in the real score"]
    fit_stats, fit_fails = guided["real score fitted to the guided ODE"]
    assert "joint_ratio" in cfg_fails, cfg_stats  # the control fails the coupling bound
    assert {"joint_ratio", "std_ratio_audio"}.isdisjoint(fit_fails), fit_stats
    assert fit_stats["joint_ratio"] > cfg_stats["joint_ratio"] + 0.1, (fit_stats, cfg_stats)


def test_control_cfg_on_the_fake_score_fails_a_bound(guided):
    """Guidance applied to the fake score as well (issue 12 item 3), w = 3, CFG inside the real score."""
    stats, fails = guided["control: CFG on the fake score"]
    assert fails, f"negative control CFG on the fake score meets every bound: {stats}"


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
    # what it still fails on the 2-D spec: mass left between modes (tests/toy/test_dmd2_toy_matched.py)
    assert "mode_tv" in fails, stats
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


def test_real_score_fitted_to_the_guided_ode(teacher):
    """fit_guided: flow matching on the guided ODE's samples gives a model whose plain (w = 1) ODE is the guided
    ODE's distribution; the control is the teacher's own plain ODE, a different distribution."""
    spec = shared_spec()
    bench = make_bench(spec, teacher, 3.0, num_eval=2000)
    fitted, (video, audio), labels = fit_guided(teacher, spec, 3.0, 400, pool=8192, ode_steps=50)
    assert video.shape == (8192, 2) and audio.shape == (8192, 1) and labels.shape == (8192,)
    gen = torch.Generator().manual_seed(3)
    stats = {
        name: evaluate(
            spec, euler_sample(model, toy_noise(spec, 2000, gen), bench.labels), bench.labels, bench.reference
        )
        for name, model in (("fitted", fitted), ("teacher", teacher))
    }
    print(
        {
            n: {k: round(v, 4) for k, v in st.items() if k in ("mode_tv", "mmd2_joint")}
            for n, st in stats.items()
        }
    )
    assert stats["teacher"]["mode_tv"] > 0.2 and stats["fitted"]["mode_tv"] < 0.1, stats
    assert stats["fitted"]["mmd2_joint"] < 0.2 * stats["teacher"]["mmd2_joint"], stats


def test_one_critic_per_step(monkeypatch):
    """critic_per_step: step k's DMD direction uses the fake score of the critic that learns step k's samples,
    and there is one such critic for each of the K steps."""
    used: dict[str, list] = {"critic": [], "fake": []}
    steps: list[int] = []
    for name, key, index in (("critic_loss", "critic", 0), ("dmd_generator_loss", "fake", 2)):
        original = getattr(dmd, name)

        def wrapper(*args, _o=original, _k=key, _i=index, **kwargs):
            used[_k].append((len(steps) - 1, id(args[_i])))
            return _o(*args, **kwargs)

        monkeypatch.setattr(dmd, name, wrapper)
    original_step = dmd.sample_step_index
    monkeypatch.setattr(dmd, "sample_step_index", lambda *a: steps.append(original_step(*a)) or steps[-1])
    spec = shared_spec()
    teacher = ToyMLP(spec.dims, spec.num_classes, hidden=16, depth=2).requires_grad_(False)
    distill(teacher, spec, DistillConfig(iters=60, batch=8, ttur=1, critic_per_step=True))
    critic_of_step = {steps[i]: c for i, c in used["critic"]}
    assert len(set(critic_of_step.values())) == len(critic_of_step) == 8  # one critic per step, all trained
    assert all(critic_of_step[steps[i]] == c for i, c in used["critic"])
    assert all(critic_of_step[steps[i]] == c for i, c in used["fake"])  # DMD at step k: critic k's score


def test_critic_restarts_from_the_real_score(monkeypatch):
    """critic_reset = N: the critic that takes iteration N's step is the teacher again (fresh AdamW moments),
    the one of iteration N - 1 is not."""
    seen: list[dict[str, torch.Tensor]] = []
    original = dmd.critic_loss

    def wrapper(critic, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in critic.state_dict().items()})
        return original(critic, *args, **kwargs)

    monkeypatch.setattr(dmd, "critic_loss", wrapper)
    spec = shared_spec()
    teacher = ToyMLP(spec.dims, spec.num_classes, hidden=16, depth=2).requires_grad_(False)
    distill(teacher, spec, DistillConfig(iters=12, batch=8, ttur=1, critic_reset=5, critic_samples="final"))
    same = [all(torch.equal(v, teacher.state_dict()[k]) for k, v in s.items()) for s in seen]
    assert same == [i % 5 == 0 for i in range(12)], same
    with pytest.raises(ValueError, match="critic_reset"):
        DistillConfig(critic_reset=-1)


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
