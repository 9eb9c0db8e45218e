"""recipe=dmd2_distill end to end from a short pretraining run, the DiT score adapter, per-phase gradients,
exact resume of all three roles and both optimisers, and the memory-budget arithmetic."""

import copy
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magi_train.__main__ import run
from magi_train.config import DistillConfig, OptimConfig, RoleConfig, TeacherConfig
from magi_train.flow import dmd
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import load_dit
from magi_train.tasks.dmd2 import DiTCondition, DiTScore, DMD2Task

TINY = MODEL_CONFIGS["tiny"]
FAST = [
    "trainer.enable_progress_bar=false",
    "data.synthetic.num_clips=32",
    "data.max_tokens=128",
    "trainer.log_every_n_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teacher_ckpt(one_thread, compose, tmp_path_factory) -> Path:
    """A 10-step smoke pretraining run (EMA on): the teacher every distillation test starts from."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    cfg = compose([
        "recipe=pretrain_base", "experiment=smoke", f"run_dir={run_dir}", "trainer.max_steps=10",
        "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=null", *FAST,
    ])  # fmt: skip
    run(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def _dmd2(tmp: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "recipe=dmd2_distill",
        "experiment=smoke",
        f"run_dir={tmp}",
        f"distill.teacher.checkpoint={teacher}",
        "trainer.val_check_interval=null",
        *FAST,
        *extra,
    ]


def _columns(metrics: Path) -> dict[str, list[float]]:
    rows = list(csv.DictReader(metrics.open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def test_recipe_composes_with_smoke_teacher_and_uncond(compose, tmp_path):
    cfg = compose(["recipe=dmd2_distill", "experiment=smoke", f"run_dir={tmp_path}"])
    assert cfg.task == "dmd2"
    assert cfg.distill.teacher.checkpoint == "outputs/smoke/checkpoints/last.ckpt"  # the README's smoke run
    assert cfg.distill.negative_text == cfg.flow.null_text  # the uncond features the teacher learned
    assert cfg.distill.critic.optim.betas == [0.0, 0.999] and cfg.distill.generator_every == 5
    assert cfg.distill.student.optim.lr == 1e-4 and cfg.distill.critic.optim.grad_clip == 10.0
    assert cfg.distill.num_student_steps == 8 and cfg.distill.guidance.video_scale_late == 2.0
    with pytest.raises(Exception, match="lrr"):
        compose(["recipe=dmd2_distill", "distill.student.lrr=1"])


def test_missing_teacher_is_a_clear_error(compose, tmp_path):
    cfg = compose(
        [
            "recipe=dmd2_distill",
            "experiment=smoke",
            f"run_dir={tmp_path}",
            f"distill.teacher.checkpoint={tmp_path}/nope/last.ckpt",
            "distill.teacher.train_overrides=[]",
        ]
    )
    with pytest.raises(ValueError, match=r"distill.teacher.checkpoint.*nope/last.ckpt does not exist"):
        run(cfg)


def test_missing_smoke_teacher_is_trained_first(compose, tmp_path):
    """The README's first command: with no teacher at its path, the smoke experiment trains it, then distils it."""
    teacher_dir = tmp_path / "teacher"
    train = [
        "recipe=pretrain_base",
        "experiment=smoke",
        f"run_dir={teacher_dir}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=null",
        *FAST,
    ]
    cfg = compose(
        _dmd2(
            tmp_path / "dmd2",
            teacher_dir / "checkpoints" / "last.ckpt",
            "trainer.max_steps=2",
            "distill.teacher.train_overrides=[" + ",".join(f'"{o}"' for o in train) + "]",
        )
    )
    out = run(cfg)
    assert out["global_step"] == 2
    teacher = torch.load(teacher_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert teacher["magi_config"]["task"] == "pretrain" and teacher["global_step"] == 2
    assert (teacher_dir / "metrics.csv").is_file()  # logged in its own run directory
    student = torch.load(tmp_path / "dmd2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert student["magi_config"]["task"] == "dmd2"


def test_wrong_model_config_is_a_clear_error(compose, tmp_path, teacher_ckpt):
    cfg = compose(_dmd2(tmp_path, teacher_ckpt, "model.num_layers=3", "model.mm_layers=[0,2]"))
    with pytest.raises(ValueError, match="model.num_layers: checkpoint 4, this run 3"):
        run(cfg)


# ---------------------------------------------------------------------------------------------------------
# unit level: the DiT as a score model, conditioning, gradients per phase
# ---------------------------------------------------------------------------------------------------------


def _clips(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = [torch.randn(48, 2 + i % 2, 4, 4, generator=g) for i in range(n)]
    audio = [torch.randn(4 * (v.shape[1] - 1) + 1, 64, generator=g) for v in video]
    text = [torch.randn(5, TINY.text_in_channels, generator=g) for _ in range(n)]
    return video, audio, text


def _task(**distill) -> DMD2Task:
    torch.manual_seed(0)
    teacher = DiT(TINY)
    for p in teacher.parameters():  # non-zero heads so that every role predicts something
        p.data.add_(0.02 * torch.randn_like(p))
    distill.setdefault("teacher", TeacherConfig(dtype="fp32"))
    cfg = DistillConfig(**distill)
    return DMD2Task(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), cfg, TINY.text_in_channels)


def test_score_adapter_pins_i2v_frame_and_a2v_audio():
    video, audio, text = _clips()
    score = DiTScore(_task().teacher)
    first = [None, video[1][:, :1] + 1.0, None]
    clean = [None, None, audio[2] * 0.5]
    cond = DiTCondition(text, first, clean)
    sigma = torch.tensor([0.3, 0.6, 0.9])
    eps = dmd.randn_like_batch([video, audio])
    x_t = dmd.noise_batch([video, audio], eps, sigma)
    x0 = dmd.predict_x0(score, x_t, sigma, cond)
    torch.testing.assert_close(x0[0][1][:, :1], first[1])  # i2v: x0 of the first frame is the condition
    torch.testing.assert_close(x0[1][2], clean[2])  # a2v: x0 of the audio is the clean audio
    assert not torch.allclose(x0[0][0], video[0])  # elsewhere it is the model's prediction
    plain = dmd.predict_x0(score, x_t, sigma, DiTCondition(text, [None] * 3, [None] * 3))
    torch.testing.assert_close(plain[0][0], x0[0][0])  # clip 0 has no condition: same as unconditioned
    assert not torch.allclose(plain[0][1][:, 1:], x0[0][1][:, 1:])  # the pinned frame does reach the DiT


def test_each_phase_reaches_only_its_role_and_all_roles_see_the_same_conditioning():
    task = _task(batch_cfg=False)  # the teacher's two branches as two forwards (batched: the test below)
    video, audio, text = _clips()
    cond = DiTCondition(text, [None, video[1][:, :1], None], [None, None, audio[2]])
    uncond = cond.with_text([torch.zeros(1, TINY.text_in_channels)] * 3)
    seen: dict[str, list] = {"teacher": [], "critic": [], "student": []}
    for name in seen:

        def hook(module, args, name=name):
            v, a, t = args
            seen[name].append(([x[:, :1].clone() for x in v], [x.clone() for x in a], [x.clone() for x in t]))

        getattr(task, name).register_forward_pre_hook(hook)

    gen = torch.Generator().manual_seed(0)
    noise = dmd.randn_like_batch([video, audio], gen)
    x_k = dmd.simulate_to_step(task.student_score, noise, 2, task.student_sigmas, cond, gen)
    loss, x_g, logs = task.generator_objective(x_k, 2, cond, uncond, gen)
    loss.backward()
    grads = {
        n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(task, n).parameters())
        for n in ("teacher", "critic", "student")
    }
    assert grads == {"teacher": False, "critic": False, "student": True}
    assert {"dmd_loss", "g_abs_video", "g_abs_audio"} <= set(logs)
    assert float(logs["g_abs_video"]) > 0  # teacher CFG (w=5) differs from the critic: a non-zero direction

    task.zero_grad(set_to_none=True)
    loss_c, logs_c = task.critic_objective(x_g, [video, audio], cond, gen)
    loss_c.backward()
    grads = {
        n: any(p.grad is not None for p in getattr(task, n).parameters())
        for n in ("teacher", "critic", "student")
    }
    assert grads == {"teacher": False, "critic": True, "student": False}

    # conditioning: the i2v frame, the a2v audio and the text reach all three roles identically
    def pinned(record):
        v, a, t = record
        return v[1], a[2], t

    ref = pinned(seen["student"][0])
    for name in ("teacher", "critic"):
        got = pinned(seen[name][0])
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])
        assert all(torch.equal(x, y) for x, y in zip(got[2], ref[2], strict=True))
    # the teacher's second (uncond) pass differs only by the negative-prompt text
    assert len(seen["teacher"]) == 2
    torch.testing.assert_close(pinned(seen["teacher"][1])[0], ref[0])
    assert all(x.shape[0] == 1 and not x.any() for x in seen["teacher"][1][2])


def test_critic_samples_final_is_the_finished_chain():
    """distill.critic_samples=final: the critic learns the student's finished sample of the chain step k belongs
    to (dmd.finish_from_step), not step k's x0; `step` (the default, DMD2) passes step k's x0 through."""
    video, audio, text = _clips()
    cond = DiTCondition(text, [None] * 3, [None] * 3)
    task = _task(critic_samples="final")
    sigmas, k = task.student_sigmas, 5
    noise = dmd.randn_like_batch([video, audio], torch.Generator().manual_seed(1))
    whole = dmd.simulate_to_step(
        task.student_score, noise, len(sigmas) - 1, sigmas, cond, torch.Generator().manual_seed(2)
    )
    gen = torch.Generator().manual_seed(2)
    x_k = dmd.simulate_to_step(task.student_score, noise, k, sigmas, cond, gen)
    x_g = dmd.student_x0(task.student_score, x_k, sigmas[k], cond)
    final = task.critic_samples(x_g, k, cond, gen)
    for got, want, step in zip(final, whole, x_g, strict=True):
        for a, b, c in zip(got, want, step, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert (a - c).abs().max() > 1e-4  # step k's x0 is not the finished sample
    assert _task().critic_samples(x_g, k, cond, gen) is x_g
    with pytest.raises(ValueError, match="critic_samples"):
        _task(critic_samples="last")


def test_batched_teacher_guidance_equals_two_forwards():
    """distill.batch_cfg: the teacher's conditional and unconditional branches as 2N clips of one packed forward
    give the guided x0 of two forwards (with i2v / a2v conditions pinned)."""
    task = _task()
    video, audio, text = _clips()
    cond = DiTCondition(text, [None, video[1][:, :1], None], [None, None, audio[2]])
    uncond = cond.with_text([torch.zeros(1, TINY.text_in_channels)] * 3)
    sigma = torch.tensor([0.3, 0.6, 0.9])
    x_t = dmd.noise_batch([video, audio], dmd.randn_like_batch([video, audio]), sigma)
    calls = []
    task.teacher.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    batched = DiTScore(task.teacher, batch_cfg=True)
    two = DiTScore(task.teacher, batch_cfg=False)
    a = dmd.teacher_x0(batched, x_t, sigma, cond, uncond, task.cfg.guidance)
    b = dmd.teacher_x0(two, x_t, sigma, cond, uncond, task.cfg.guidance)
    assert calls == [6, 3, 3]  # one forward of 2N clips, then two of N
    for xa, xb in zip(a, b, strict=True):
        for p, q in zip(xa, xb, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    c = dmd.teacher_x0(two, x_t, sigma, cond, cond, task.cfg.guidance)  # control: uncond matters
    assert max(float((p - q).abs().max()) for p, q in zip(a[0], c[0], strict=True)) > 1e-3
    assert task.teacher_score.cond_uncond is not None  # the recipe default: batched


def test_gan_inputs_are_real_and_fake_at_the_same_uniform_levels(monkeypatch):
    """DMD2's diffusion GAN: the discriminator sees real and fake clips noised at the same per-clip level, drawn
    uniformly over the whole training range (not at the DMD step's shifted, clamped levels)."""
    task = _task(gan=True)
    video, audio, text = _clips()
    cond = DiTCondition(text, [None] * 3, [None] * 3)
    drawn, paired, seen = [], [], []
    sample, pair = dmd.sample_gan_sigma, dmd.diffusion_gan_inputs

    def sampling(*args, **kwargs):
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    def pairing(real, fake, sigma, generator=None):
        paired.append(sigma)
        return pair(real, fake, sigma, generator)

    monkeypatch.setattr(dmd, "sample_gan_sigma", sampling)
    monkeypatch.setattr(dmd, "diffusion_gan_inputs", pairing)
    task.critic.register_forward_pre_hook(lambda m, args: seen.append([v.clone() for v in args[0]]))
    gen = torch.Generator().manual_seed(0)
    fake = [[v + 0.5 for v in video], [a - 0.5 for a in audio]]
    task.critic_objective(fake, [video, audio], cond, gen)
    assert len(drawn) == 1 and paired == drawn and len(drawn[0]) == 3  # one level per clip for both batches
    # passes: the critic loss, then fake and real at the GAN levels (clip 0 differs from the loss pass's)
    assert len(seen) == 3 and not torch.equal(seen[0][0], seen[1][0])


def test_invalid_roles_are_rejected():
    with pytest.raises(ValueError, match="distill.teacher.dtype='fp16'"):
        _task(teacher=TeacherConfig(dtype="fp16"))
    with pytest.raises(ValueError, match="distill.critic.optim.betas"):
        _task(critic=RoleConfig(optim=OptimConfig(betas=[0.9])))
    with pytest.raises(ValueError, match="distill.student.optim.schedule='cosine'"):
        _task(student=RoleConfig(optim=OptimConfig(schedule="cosine")))


# ---------------------------------------------------------------------------------------------------------
# end to end: logs, checkpoints, exact resume; GAN, bf16 teacher, samples, teacher-less checkpoints
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2])
def test_smoke_distill_logs_checkpoints_and_resumes_exactly(compose, tmp_path, teacher_ckpt, accumulate):
    common = [
        "trainer.checkpoint_every_n_steps=3",
        "distill.ema.start_step=0",
        "distill.generator_every=2",
        f"trainer.accumulate_grad_batches={accumulate}",
        "trainer.val_check_interval=3",  # the checkpoint at iteration 3 falls on a validation
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = run(compose(_dmd2(straight, teacher_ckpt, *common, "trainer.max_steps=6")))
    assert out["global_step"] == 6  # global_step counts iterations (critic updates), not optimizer steps
    run(compose(_dmd2(split, teacher_ckpt, *common, "trainer.max_steps=3")))
    run(compose(_dmd2(split, teacher_ckpt, *common, "trainer.max_steps=6", "resume=true")))
    per_step = {}
    for name in ("straight", "split"):
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        critic = [(r["step"], r["train/critic_loss"]) for r in rows if r.get("train/critic_loss")]
        # rows are micro-batches; the generator steps every 2nd iteration (Lightning repeats an on-step value on
        # the rows that do not log it)
        gen = [r for r in rows if r.get("train/dmd_loss") and int(r["step"]) // accumulate % 2 == 0]
        dmd = [(r["step"], r["train/dmd_loss"]) for r in gen]
        per_step[name] = (critic, dmd)
    assert len(per_step["straight"][0]) == 6 * accumulate and len(per_step["straight"][1]) == 3 * accumulate
    assert per_step["split"] == per_step["straight"]  # every iteration's losses, before and after the resume

    cols = _columns(straight / "metrics.csv")
    for key in (
        "train/dmd_loss",
        "train/g_abs_video",
        "train/g_abs_audio",
        "train/critic_loss",
        "train/lr_student",
        "train/lr_critic",
        "train/grad_norm_student",
        "train/grad_norm_critic",
    ):
        assert cols.get(key) and all(v == v for v in cols[key]), key  # logged and finite
    assert cols["train/lr_student"][-1] == pytest.approx(1e-4)  # the smoke experiment's per-role lr

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for role in ("teacher.", "critic.", "student."):
        assert any(k.startswith(role) for k in a["state_dict"]), role
    assert len(a["optimizer_states"]) == 2 and len(a["lr_schedulers"]) == 2
    assert a["magi_config"]["task"] == "dmd2"
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"] == 6 * accumulate
    assert (
        a["DistillDataModule"]["consumed"] == 6 * accumulate
    )  # data position: micro-batches, not iterations
    for key in ("state_dict", "current_model_state"):  # EMA student (Lightning layout) and raw weights
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}/{name} differs after resume"
    ema, raw = a["state_dict"], a["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if k.startswith("student."))  # EMA is not a copy
    assert all(torch.equal(ema[k], raw[k]) for k in raw if not k.startswith("student."))  # only the student
    teacher0 = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    for k, v in teacher0.items():  # the teacher is frozen: still the pretraining (EMA) weights
        assert torch.equal(raw["teacher." + k.removeprefix("model.")], v)
    assert any(not torch.equal(raw["critic." + k.removeprefix("model.")], v) for k, v in teacher0.items())
    for opt in range(2):
        sa, sb = a["optimizer_states"][opt]["state"], b["optimizer_states"][opt]["state"]
        assert sa and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # a dmd2 checkpoint can seed another role (e.g. distill.student.checkpoint): its EMA student
    loaded = load_dit(straight / "checkpoints" / "last.ckpt", TINY, what="distill.student.checkpoint")
    assert loaded.weights == "ema" and loaded.config["task"] == "dmd2"
    assert all(torch.equal(v, ema["student." + k]) for k, v in loaded.model.state_dict().items())


def test_gan_bf16_teacher_samples_and_teacherless_checkpoint(compose, tmp_path, teacher_ckpt):
    run_dir = tmp_path / "gan"
    extra = [
        "distill.gan=true",
        "distill.teacher.dtype=bf16",
        "distill.save_teacher=false",
        "distill.generator_every=2",
        "distill.sample_clips=1",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.checkpoint_every_n_steps=3",
    ]
    run(compose(_dmd2(run_dir, teacher_ckpt, *extra)))
    cols = _columns(run_dir / "metrics.csv")
    for key in (
        "train/gan_generator_loss",
        "train/gan_critic_loss",
        "val/g_abs_video",
        "val/teacher_gap_audio",
    ):
        assert cols.get(key), key
    sample = load_file(run_dir / "samples" / "step00000003" / "clip0.safetensors")
    assert set(sample) == {
        f"{s}_{m}" for s in ("student", "teacher_x0", "critic_x0") for m in ("video", "audio")
    }
    assert sample["student_video"].shape[0] == 48 and sample["student_audio"].shape[1] == 64
    assert (run_dir / "samples" / "step00000003" / "clip0.png").stat().st_size > 0

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # re-loaded from its path
    assert any(k.startswith("disc.") for k in ckpt["state_dict"])  # the GAN head trains with the critic
    out = run(compose(_dmd2(run_dir, teacher_ckpt, *extra[:-3], "trainer.max_steps=4", "resume=true")))
    assert out["global_step"] == 4
