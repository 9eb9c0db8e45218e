"""DMD-2 loss functions (magi_train.flow.dmd): normaliser, CFG, score sigmas, backward simulation, gradients."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from magi_train.flow import dmd
from magi_train.flow.matching import shift_sigma
from magi_train.flow.sampling import Guidance, released_sigmas, sample_distilled

# spec/dmd2.md §4 (MH 8-step row): shift-5 warp of linspace(1, 0, 9)[:-1], rounded to 4 digits
SPEC_STUDENT_8 = [1.0, 0.9722, 0.9375, 0.8929, 0.8333, 0.75, 0.625, 0.4167]
# spec/released-model.md §4.4: the exact released 8-step sigmas (grid starts at 0.999, not 1)
RELEASED_SIGMA_8 = [0.9998, 0.9720, 0.9373, 0.8926, 0.8331, 0.7497, 0.6247, 0.4164, 0.0]


class LinearScore(nn.Module):
    """A tiny conditional velocity model over a two-modality batch of [N, d] tensors (video-like, audio-like).

    cond is a [N] tensor of class ids; sigma enters linearly so that different noise levels differ."""

    def __init__(self, dims=(3, 2), num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.dims = dims
        self.net = nn.Linear(sum(dims) + 1 + num_classes, sum(dims))
        self.num_classes = num_classes
        self.calls: list = []

    def forward(self, xs, sigma, cond):
        self.calls.append(cond)
        one_hot = nn.functional.one_hot(cond, self.num_classes).to(xs[0])
        out = self.net(torch.cat([*xs, sigma.view(-1, 1), one_hot], dim=1))
        return list(out.split(list(self.dims), dim=1))


def _batch(n=4, dims=(3, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for d in dims]


# ------------------------------------------------------------------------------------------------
# normaliser


def test_dmd_gradient_matches_formula_per_sample_and_modality():
    x_g, x_r, x_f = _batch(seed=1), _batch(seed=2), _batch(seed=3)
    g = dmd.dmd_gradient(x_g, x_r, x_f)
    for gm, xg, xr, xf in zip(g, x_g, x_r, x_f, strict=True):
        norm = (xg - xr).abs().mean(dim=1, keepdim=True)  # one mean per sample of this modality
        torch.testing.assert_close(gm, (xf - xr) / norm)


@pytest.mark.parametrize("modality", [0, 1])
def test_normaliser_is_per_sample_and_per_modality(modality):
    x_g, x_r, x_f = _batch(seed=1), _batch(seed=2), _batch(seed=3)
    g = dmd.dmd_gradient(x_g, x_r, x_f)
    # scale the error |x_g - x0_real| of one sample of one modality by 3: only that g changes, by 1/3
    scaled = [x.clone() for x in x_g]
    scaled[modality][1] = x_r[modality][1] + 3 * (x_g[modality][1] - x_r[modality][1])
    g2 = dmd.dmd_gradient(scaled, x_r, x_f)
    for m in range(2):
        for i in range(4):
            expected = g[m][i] / 3 if (m, i) == (modality, 1) else g[m][i]
            torch.testing.assert_close(g2[m][i], expected)


def test_normaliser_per_sample_on_variable_size_clips():
    gen = torch.Generator().manual_seed(0)
    shapes = [[(4, 2, 3, 3), (4, 1, 2, 2)], [(5, 8), (3, 8)]]  # video-like and audio-like clips
    x_g, x_r, x_f = ([[torch.randn(s, generator=gen) for s in mod] for mod in shapes] for _ in range(3))
    g = dmd.dmd_gradient(x_g, x_r, x_f)
    for gm, xg, xr, xf in zip(g, x_g, x_r, x_f, strict=True):
        for gi, a, b, c in zip(gm, xg, xr, xf, strict=True):
            torch.testing.assert_close(gi, (c - b) / (a - b).abs().mean())
    x_g[1][0] = x_r[1][0] + 2 * (x_g[1][0] - x_r[1][0])  # audio clip 0 only
    g2 = dmd.dmd_gradient(x_g, x_r, x_f)
    torch.testing.assert_close(g2[1][0], g[1][0] / 2)
    for m, i in [(0, 0), (0, 1), (1, 1)]:
        torch.testing.assert_close(g2[m][i], g[m][i])


def test_batch_normaliser_is_per_modality():
    x_g, x_r, x_f = _batch(seed=1), _batch(seed=2), _batch(seed=3)
    g = dmd.dmd_gradient(x_g, x_r, x_f, normalizer="batch")
    for gm, xg, xr, xf in zip(g, x_g, x_r, x_f, strict=True):
        torch.testing.assert_close(gm, (xf - xr) / (xg - xr).abs().mean())
    scaled = [x_r[0] + 2 * (x_g[0] - x_r[0]), x_g[1]]  # whole video modality: audio g must not move
    g2 = dmd.dmd_gradient(scaled, x_r, x_f, normalizer="batch")
    torch.testing.assert_close(g2[0], g[0] / 2)
    torch.testing.assert_close(g2[1], g[1])
    with pytest.raises(ValueError, match="normalizer"):
        dmd.dmd_gradient(x_g, x_r, x_f, normalizer="global")


def test_gradient_nan_to_num_and_zero_normaliser():
    x_g, x_r, x_f = _batch(seed=1), _batch(seed=2), _batch(seed=3)
    x_f[0][0, 0], x_f[0][1, 1], x_f[1][2, 0] = float("nan"), float("inf"), -float("inf")
    x_g[1][3] = x_r[1][3]  # zero normaliser for one sample
    g = dmd.dmd_gradient(x_g, x_r, x_f)
    assert all(torch.isfinite(gm).all() for gm in g)
    assert g[0][0, 0] == 0 and g[0][1, 1] == 0 and g[1][2, 0] == 0
    assert g[0][0, 1] != 0  # the rest of a sample with a nan entry is kept


# ------------------------------------------------------------------------------------------------
# DMD loss and the generator step


def test_dmd_loss_gradient_is_weighted_g_over_numel():
    x_g = [x.requires_grad_(True) for x in _batch(seed=1)]
    g = _batch(seed=4)
    loss = dmd.dmd_loss(x_g, g, weights=[1.0, 0.25])
    loss.backward()
    torch.testing.assert_close(x_g[0].grad, g[0] / g[0].numel())
    torch.testing.assert_close(x_g[1].grad, 0.25 * g[1] / g[1].numel())
    torch.testing.assert_close(loss, 0.5 * g[0].pow(2).mean() + 0.25 * 0.5 * g[1].pow(2).mean())
    with pytest.raises(ValueError, match="one weight per modality"):
        dmd.dmd_loss(x_g, g, weights=[1.0])


def test_dmd_loss_gradient_on_clip_lists_is_token_weighted():
    gen = torch.Generator().manual_seed(0)
    clips = [
        torch.randn(2, 3, generator=gen).requires_grad_(True),
        torch.randn(4, 3, generator=gen).requires_grad_(True),
    ]
    g = [torch.randn(2, 3, generator=gen), torch.randn(4, 3, generator=gen)]
    dmd.dmd_loss([clips], [g]).backward()
    for c, gi in zip(clips, g, strict=True):
        torch.testing.assert_close(c.grad, gi / 18)  # 18 elements in the modality


def test_teacher_equal_critic_gives_zero_gradient():
    model = LinearScore()
    student = LinearScore(seed=1)
    x_g = dmd.student_x0(student, _batch(seed=1), 0.7, torch.tensor([0, 1, 2, 0]))
    sigma = dmd.sample_score_sigma(4, generator=torch.Generator().manual_seed(0))
    out = dmd.dmd_generator_loss(x_g, model, model, sigma, torch.tensor([0, 1, 2, 0]))
    assert all((gm == 0).all() for gm in out.g)
    out.loss.backward()
    assert all((p.grad == 0).all() for p in student.parameters())
    # a different critic does move the student (the test above can fail)
    critic = LinearScore(seed=2)
    out = dmd.dmd_generator_loss(x_g, model, critic, sigma, torch.tensor([0, 1, 2, 0]))
    assert all((gm != 0).any() for gm in out.g)


def test_generator_moves_towards_real_and_away_from_fake():
    """One gradient step on x_g with the DMD loss reduces |x_g - x0_real| when x0_fake sits on x_g."""
    x_r = _batch(seed=2)
    x_g = [x.clone().requires_grad_(True) for x in _batch(seed=1)]
    g = dmd.dmd_gradient(x_g, x_r, dmd.detach(x_g))  # critic that models the generator exactly
    dmd.dmd_loss(x_g, g).backward()
    for xg, xr in zip(x_g, x_r, strict=True):
        stepped = xg.detach() - 0.1 * xg.grad * xg.numel()
        assert (stepped - xr).norm() < (xg.detach() - xr).norm()


# ------------------------------------------------------------------------------------------------
# CFG in the real score


def test_guidance_one_is_the_conditional_prediction():
    model = LinearScore()
    x_t, sigma, cond = _batch(), torch.full((4,), 0.6), torch.tensor([0, 1, 2, 1])
    x0 = dmd.teacher_x0(model, x_t, sigma, cond, uncond=torch.zeros(4, dtype=torch.long), guidance=1.0)
    assert len(model.calls) == 1  # no unconditional pass at w = 1
    expected = dmd.predict_x0(model, x_t, sigma, cond)
    for a, b in zip(x0, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_guidance_is_ho_salimans_u_plus_w_c_minus_u():
    model = LinearScore()
    x_t, sigma = _batch(), torch.tensor([0.9, 0.3, 0.6, 0.45])
    cond, uncond = torch.tensor([0, 1, 2, 1]), torch.zeros(4, dtype=torch.long)
    c, u = dmd.predict_x0(model, x_t, sigma, cond), dmd.predict_x0(model, x_t, sigma, uncond)
    x0 = dmd.teacher_x0(model, x_t, sigma, cond, uncond, guidance=[3.0, 1.5])
    torch.testing.assert_close(x0[0], u[0] + 3.0 * (c[0] - u[0]))
    torch.testing.assert_close(x0[1], u[1] + 1.5 * (c[1] - u[1]))
    # released scales: video 5.0 while t = 1000 s > 500, then 2.0; audio 5.0 throughout
    x0 = dmd.teacher_x0(model, x_t, sigma, cond, uncond, guidance=Guidance())
    w_video = torch.tensor([5.0, 2.0, 5.0, 2.0]).view(-1, 1)
    torch.testing.assert_close(x0[0], u[0] + w_video * (c[0] - u[0]))
    torch.testing.assert_close(x0[1], u[1] + 5.0 * (c[1] - u[1]))
    with pytest.raises(ValueError, match="uncond"):
        dmd.teacher_x0(model, x_t, sigma, cond, None, guidance=2.0)


def test_released_guidance_scales():
    sigma = torch.tensor([0.98, 0.501, 0.5, 0.2])
    video, audio = dmd.guidance_scales(Guidance(), sigma, 2)
    assert video.tolist() == [5.0, 5.0, 2.0, 2.0]
    assert audio.tolist() == [5.0] * 4
    assert [w.tolist() for w in dmd.guidance_scales(None, sigma, 2)] == [[1.0] * 4] * 2
    scales = dmd.guidance_scales(lambda m, s: 1.0 + m + s, sigma, 2)
    torch.testing.assert_close(scales[1], 2.0 + sigma)
    with pytest.raises(ValueError, match="one scale per modality"):
        dmd.guidance_scales([2.0], sigma, 2)


@pytest.mark.parametrize("t", [500, 501, 499, 833])
def test_dmd_and_unipc_guidance_agree_at_the_switch(t):
    # UniPC reads the scheduler timestep t, DMD the level sigma = t / 1000: the same rule, strict >
    g = Guidance(switch_t=500)
    video, audio = dmd.guidance_scales(g, torch.tensor([t / 1000]), 2)
    unipc_video, unipc_audio = g.scales(torch.tensor(t))
    assert float(video) == float(unipc_video) == (5.0 if t > 500 else 2.0)
    assert float(audio) == float(unipc_audio) == 5.0


# ------------------------------------------------------------------------------------------------
# noise levels and backward simulation


def test_score_sigma_range_and_shifted_distribution():
    gen = torch.Generator().manual_seed(0)
    s = dmd.sample_score_sigma(20000, generator=gen)
    assert s.shape == (20000,) and s.min() >= 0.02 and s.max() <= 0.98
    assert s.unique().numel() > 15000  # one level per sample, not one per batch
    # clamp: P(s <= x) = u(x), the inverse shift; the mass above u(0.98) sits on 0.98
    for x in (0.3, 0.6, 0.9):
        u = x / (5 - 4 * x)
        assert abs((s <= x).float().mean().item() - u) < 0.015
    assert abs((s == 0.98).float().mean().item() - (1 - 0.98 / (5 - 4 * 0.98))) < 0.01
    # truncate: the shifted density restricted to [0.02, 0.98], no atom at the bounds
    t = dmd.sample_score_sigma(20000, generator=gen, method="truncate")
    assert t.min() >= 0.02 and t.max() <= 0.98 and (t == 0.98).float().mean() < 1e-3
    lo, hi = 0.02 / (5 - 4 * 0.02), 0.98 / (5 - 4 * 0.98)
    assert abs((t <= 0.6).float().mean().item() - (0.6 / (5 - 4 * 0.6) - lo) / (hi - lo)) < 0.015
    # shift 1, narrower bounds: DMD2's uniform t
    w = dmd.sample_score_sigma(20000, low=0.2, high=0.5, shift=1.0, generator=gen, method="truncate")
    assert w.min() >= 0.2 and w.max() <= 0.5 and abs(w.mean().item() - 0.35) < 0.01
    with pytest.raises(ValueError, match="bounds"):
        dmd.sample_score_sigma(4, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="method"):
        dmd.sample_score_sigma(4, method="logit")


def test_student_step_list_is_the_released_8_step_schedule():
    sigmas = dmd.student_sigmas(8)
    assert len(sigmas) == 9 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[:-1], torch.tensor(SPEC_STUDENT_8), atol=2e-3, rtol=0)
    torch.testing.assert_close(sigmas, torch.tensor(RELEASED_SIGMA_8), atol=1e-4, rtol=0)
    torch.testing.assert_close(sigmas, released_sigmas(8, 5.0))  # the distilled sampler's list
    torch.testing.assert_close(sigmas[:-1], shift_sigma(torch.linspace(0.999, 0, 9)[:-1], 5.0))


def test_step_index_depends_only_on_seed_and_step():
    ks = [dmd.sample_step_index(8, dmd.shared_generator(3, step)) for step in range(400)]
    torch.manual_seed(123)  # the global RNG does not enter
    again = [dmd.sample_step_index(8, dmd.shared_generator(3, step)) for step in range(400)]
    assert ks == again
    assert set(ks) == set(range(8))  # uniform over 0..K-1, not a constant
    assert ks != [dmd.sample_step_index(8, dmd.shared_generator(4, step)) for step in range(400)]
    with pytest.raises(ValueError, match="num_steps"):
        dmd.sample_step_index(0)


def _rank_step_indices(rank: int, world: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1000 + rank)  # ranks have different global and per-rank noise states
        per_rank = torch.Generator().manual_seed(rank)
        ks = []
        for step in range(64):
            torch.randn(rank + 1, generator=per_rank)  # per-rank draws in between (simulation noise)
            ks.append(dmd.sample_step_index(8, dmd.shared_generator(7, step)))
        gathered = [None] * world
        dist.all_gather_object(gathered, ks)
        torch.save(torch.tensor(gathered), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_step_index_identical_across_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_step_indices, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    for gathered in results:
        assert gathered.shape == (2, 64)
        assert torch.equal(gathered[0], gathered[1])  # both ranks drew the same k at every step
        assert gathered[0].unique().numel() == 8
    assert torch.equal(results[0], results[1])


class ExactX0(nn.Module):
    """Velocity of a denoiser that knows the clean sample: v = (x - x0) / s."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.sigmas: list[float] = []

    def forward(self, xs, sigma, cond):
        self.sigmas.append(float(sigma[0]))
        return [(x - x0) / sigma.view(-1, 1) for x, x0 in zip(xs, self.x0, strict=True)]


def test_simulate_to_step_runs_the_re_noising_chain():
    x0 = _batch(seed=5)
    noise = _batch(seed=6)
    sigmas = dmd.student_sigmas(4, 1.0)
    model = ExactX0(x0)
    for x, n in zip(dmd.simulate_to_step(model, noise, 0, sigmas, None), noise, strict=True):
        assert torch.equal(x, n)
    assert model.sigmas == []
    # k = 2: two hops; the input of step 2 is x0 noised to sigmas[2] with fresh noise (not the start noise)
    gen = torch.Generator().manual_seed(0)
    x2 = dmd.simulate_to_step(model, noise, 2, sigmas, None, generator=gen)
    assert model.sigmas == pytest.approx(sigmas[:2].tolist())
    eps = [(x - (1 - sigmas[2]) * c) / sigmas[2] for x, c in zip(x2, x0, strict=True)]
    assert all((e - n).abs().max() > 0.1 for e, n in zip(eps, noise, strict=True))
    assert abs(torch.cat([e.flatten() for e in eps]).std().item() - 1) < 0.5
    # k = K: the finished sample (the few-step sampler)
    out = dmd.simulate_to_step(model, noise, 4, sigmas, None, generator=gen)
    for a, b in zip(out, x0, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="step index"):
        dmd.simulate_to_step(model, noise, 5, sigmas, None)


def test_finish_from_step_continues_the_same_chain():
    """critic_samples=final: step k's x0 finished by the remaining steps is the whole chain's sample (same noise
    stream); the last step's x0 is already finished; the student's steps after k run, those before do not."""
    model, labels = LinearScore(), torch.tensor([0, 1, 2, 1])
    sigmas, noise = dmd.student_sigmas(4, 5.0), _batch(seed=3)
    whole = dmd.simulate_to_step(model, noise, 4, sigmas, labels, torch.Generator().manual_seed(7))
    for k in range(4):
        gen = torch.Generator().manual_seed(7)
        x_k = dmd.simulate_to_step(model, noise, k, sigmas, labels, gen)
        x0_k = dmd.detach(dmd.student_x0(model, x_k, sigmas[k], labels))
        model.calls.clear()
        done = dmd.finish_from_step(model, x0_k, k, sigmas, labels, gen)
        assert len(model.calls) == 3 - k
        for a, b in zip(done, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        if k < 3:  # control: an unfinished x0 is not the sample
            assert max(float((a - b).abs().max()) for a, b in zip(x0_k, whole, strict=True)) > 1e-3


def test_simulate_to_the_end_is_the_distilled_sampler():
    """Backward simulation and the released sampler are one chain: same noise stream, same sample."""
    gen = torch.Generator().manual_seed(0)
    video = [torch.randn(48, 2, 2, 2, generator=gen), torch.randn(48, 3, 2, 2, generator=gen)]
    audio = [torch.randn(5, 64, generator=gen), torch.randn(9, 64, generator=gen)]
    text = [torch.ones(2, 8), -torch.ones(3, 8)]

    def denoiser(video, audio, text):  # the sampler's interface: (video, audio, text) -> (v, a)
        return (
            [torch.tanh(v) + t.mean() for v, t in zip(video, text, strict=True)],
            [0.5 * a - t.mean() for a, t in zip(audio, text, strict=True)],
        )

    def score(xs, sigma, cond):  # the same model as a DMD score model (timestep-free: sigma unused)
        return list(denoiser(xs[0], xs[1], cond))

    ref = sample_distilled(denoiser, video, audio, text, 8, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    out = dmd.simulate_to_step(score, [video, audio], 8, dmd.student_sigmas(8), text, gen)
    for a, b in zip(out[0] + out[1], ref[0] + ref[1], strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# which parameters receive gradients


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_only_the_right_parameters_receive_gradients():
    teacher, critic, student = LinearScore(seed=0), LinearScore(seed=1), LinearScore(seed=2)
    cond, uncond = torch.tensor([0, 1, 2, 1]), torch.zeros(4, dtype=torch.long)
    sigmas = dmd.student_sigmas(8)
    gen = torch.Generator().manual_seed(0)
    k = dmd.sample_step_index(8, dmd.shared_generator(0, 5))
    x_k = dmd.simulate_to_step(student, _batch(seed=9), k, sigmas, cond, gen)
    assert not any(x.requires_grad for x in x_k)
    x_g = dmd.student_x0(student, x_k, sigmas[k], cond)

    # generator phase (teacher and critic still have requires_grad=True: the functions must not leak)
    out = dmd.dmd_generator_loss(
        x_g,
        teacher,
        critic,
        dmd.sample_score_sigma(4, generator=gen),
        cond,
        uncond,
        Guidance(),
        generator=gen,
    )
    out.loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(student))
    assert all(g is None for g in _grads(critic) + _grads(teacher))
    assert not any(x.requires_grad for x in out.x0_real + out.x0_fake + out.g)

    # critic phase, on the same (undetached) student output
    student.zero_grad(set_to_none=True)
    loss = dmd.critic_loss(critic, x_g, dmd.sample_score_sigma(4, generator=gen), cond, generator=gen)
    loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(critic))
    assert all(g is None for g in _grads(student) + _grads(teacher))


def test_critic_loss_is_flow_matching_on_the_given_sigma():
    critic = LinearScore()
    x_g = [x.requires_grad_(True) for x in _batch(seed=1)]
    eps, sigma, cond = _batch(seed=2), torch.tensor([0.1, 0.5, 0.7, 0.95]), torch.tensor([0, 1, 2, 0])
    seen = {}

    def recording(xs, s, c):
        seen["x"], seen["s"] = xs, s
        return critic(xs, s, c)

    loss = dmd.critic_loss(recording, x_g, sigma, cond, weights=[1.0, 0.5], eps=eps)
    assert torch.equal(seen["s"], sigma)
    for x, x0, e in zip(seen["x"], x_g, eps, strict=True):
        torch.testing.assert_close(x, (1 - sigma.view(-1, 1)) * x0.detach() + sigma.view(-1, 1) * e)
        assert not x.requires_grad
    v = critic(seen["x"], sigma, cond)
    expected = sum(
        w * (vm - (e - x0.detach())).pow(2).mean()
        for vm, e, x0, w in zip(v, eps, x_g, [1.0, 0.5], strict=True)
    )
    torch.testing.assert_close(loss, expected)


def test_shared_noise_level_across_modalities():
    x0, eps, sigma = _batch(seed=1), _batch(seed=2), torch.tensor([0.1, 0.5, 0.7, 0.95])
    for x, c, e in zip(dmd.noise_batch(x0, eps, sigma), x0, eps, strict=True):
        torch.testing.assert_close(x, (1 - sigma.view(-1, 1)) * c + sigma.view(-1, 1) * e)


def test_gan_losses_are_softplus():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = nn.functional.softplus
    torch.testing.assert_close(dmd.gan_generator_loss(fake), sp(-fake).mean())
    torch.testing.assert_close(dmd.gan_discriminator_loss(real, fake), sp(-real).mean() + sp(fake).mean())
    # the generator loss falls as the discriminator's fake logit rises
    assert dmd.gan_generator_loss(fake + 1) < dmd.gan_generator_loss(fake)


def test_gan_sigma_is_uniform_over_the_whole_range():
    """DMD2's diffusion GAN noises at t ~ U{0, 1000}: unshifted, unclamped (not the DMD step's levels)."""
    s = dmd.sample_gan_sigma(20000, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= float(s.min()) < 0.01 and 0.99 < float(s.max()) < 1.0
    assert abs(float(s.mean()) - 0.5) < 0.01 and abs(float((s < 0.25).double().mean()) - 0.25) < 0.01
    assert float(dmd.sample_gan_sigma(1000, 0.5, torch.Generator().manual_seed(0)).max()) < 0.5
    with pytest.raises(ValueError, match="GAN noise level"):
        dmd.sample_gan_sigma(4, high=0.0)


def test_diffusion_gan_noises_real_and_fake_at_the_same_level():
    real, fake, sigma = _batch(seed=1), _batch(seed=2), torch.tensor([0.0, 0.3, 0.6, 0.9])
    gen = torch.Generator().manual_seed(5)
    x_real, x_fake = dmd.diffusion_gan_inputs(real, fake, sigma, gen)
    s = sigma.view(-1, 1)
    for xr, xf, r, f in zip(x_real, x_fake, real, fake, strict=True):
        eps_r, eps_f = (xr - (1 - s) * r), (xf - (1 - s) * f)  # = s * eps: same level, per sample
        torch.testing.assert_close(xr[0], r[0])  # s = 0: clean
        torch.testing.assert_close(xf[0], f[0])
        assert not torch.allclose(eps_r[1:], eps_f[1:])  # independent noise for real and fake
    with pytest.raises(ValueError, match="one entry per sample"):
        dmd.diffusion_gan_inputs(real, fake, sigma[:2])
