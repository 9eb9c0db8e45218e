"""Flow-matching math: noising path, velocity target, sigma sampling, losses and conditioning modes."""

import math

import pytest
import torch

from magi_train.flow import (
    Mode,
    add_noise,
    condition_velocities,
    drop_text,
    impose_conditions,
    joint_flow_loss,
    noise_clip,
    sample_modes,
    sample_sigma,
    sample_sigma_pair,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)


def test_path_endpoints_and_velocity_inverse():
    x0, eps = torch.randn(48, 2, 4, 4), torch.randn(48, 2, 4, 4)
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)
    s = 0.3
    xs = add_noise(x0, eps, s)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(xs, v, s), x0)
    # v is the time derivative of the path: d/ds [(1-s) x0 + s eps] = eps - x0
    h = 1e-3
    torch.testing.assert_close((add_noise(x0, eps, s + h) - xs) / h, v, atol=1e-3, rtol=1e-3)


def test_shift_matches_released_schedule():
    # spec §4.4: sigma 0.5 -> 5*0.5/(1+4*0.5) = 0.8333..., timestep int(833.3) = 833 in the 8-step list
    assert math.isclose(shift_sigma(torch.tensor(0.5), 5.0).item(), 5 / 6, rel_tol=1e-6)
    s = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    assert torch.all(shift_sigma(s, 5.0) >= s)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_sigma_sampling_range_and_shift(kind):
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(20000, kind, shift=1.0, generator=g)
    assert s.min() >= 0 and s.max() <= 1
    assert abs(s.mean().item() - 0.5) < 0.02  # both are symmetric around 0.5 before shifting
    shifted = sample_sigma(20000, kind, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() > 0.7
    if kind == "logit_normal":  # concentrated in the middle: fewer extremes than uniform
        assert ((s < 0.05) | (s > 0.95)).float().mean() < 0.05
    with pytest.raises(ValueError, match="unknown sigma sampling"):
        sample_sigma(4, "beta")


def test_i2v_keeps_clean_first_frame_and_no_loss_on_it():
    video, audio = torch.randn(48, 3, 4, 4), torch.randn(9, 64)
    ve, ae = torch.randn_like(video), torch.randn_like(audio)
    vi, ai, first = noise_clip(video, audio, torch.tensor(0.7), ve, ae, Mode.I2V)
    assert torch.equal(vi[:, :1], video[:, :1]) and torch.equal(first, video[:, :1])
    torch.testing.assert_close(vi[:, 1:], add_noise(video, ve, 0.7)[:, 1:])
    torch.testing.assert_close(ai, add_noise(audio, ae, 0.7))
    target_v = velocity_target(video, ve)
    # errors only on frame 0 cost nothing in i2v, but do in t2v
    pred_v = target_v.clone()
    pred_v[:, 0] += 5.0
    pred_a = velocity_target(audio, ae)
    i2v = joint_flow_loss([pred_v], [pred_a], [target_v], [pred_a], [Mode.I2V])
    t2v = joint_flow_loss([pred_v], [pred_a], [target_v], [pred_a], [Mode.T2V])
    assert i2v["loss"].item() == 0.0 and t2v["loss"].item() > 1.0


def test_a2v_clean_audio_and_no_audio_loss():
    video, audio = torch.randn(48, 2, 2, 2), torch.randn(5, 64)
    vi, ai, _ = noise_clip(
        video, audio, torch.tensor(0.5), torch.randn_like(video), torch.randn_like(audio), Mode.A2V
    )
    assert torch.equal(ai, audio)
    pv, tv = torch.zeros_like(video), torch.zeros_like(video)
    out = joint_flow_loss([pv], [torch.ones(5, 64)], [tv], [torch.zeros(5, 64)], [Mode.A2V])
    assert out["loss_audio"].item() == 0.0 and out["loss"].item() == 0.0
    out = joint_flow_loss([pv], [torch.ones(5, 64)], [tv], [torch.zeros(5, 64)], [Mode.T2V])
    assert out["loss_audio"].item() == 1.0


def test_impose_conditions_replaces_only_conditioned_clips():
    video = [torch.randn(48, 3, 2, 2) for _ in range(3)]
    audio = [torch.randn(5, 64) for _ in range(3)]
    first, clean = torch.randn(48, 1, 2, 2), torch.randn(5, 64)
    v_in, a_in = impose_conditions(video, audio, [None, first, None], [None, None, clean])
    assert v_in is not video and a_in is not audio  # new lists; the inputs are not modified
    assert all(v_in[i] is video[i] for i in (0, 2)) and all(a_in[i] is audio[i] for i in (0, 1))
    assert torch.equal(v_in[1][:, :1], first) and torch.equal(v_in[1][:, 1:], video[1][:, 1:])
    assert torch.equal(a_in[2], clean)
    v_none, a_none = impose_conditions(video, audio, None, None)  # t2v: nothing replaced
    assert all(x is y for x, y in zip(v_none + a_none, video + audio, strict=True))
    with pytest.raises(ValueError, match="one \\(or None\\) per clip"):
        impose_conditions(video, audio, [first], None)


def test_condition_velocities_give_the_condition_as_x0():
    video, audio = [torch.randn(48, 3, 2, 2) for _ in range(2)], [torch.randn(5, 64) for _ in range(2)]
    first, clean = torch.randn(48, 1, 2, 2), torch.randn(5, 64)
    sigma = torch.tensor([0.3, 0.8])
    first_v, audio_v = condition_velocities(video, audio, [first, None], [None, clean], sigma)
    assert first_v[1] is None and audio_v[0] is None
    zeros_v, zeros_a = [torch.zeros_like(x) for x in video], [torch.zeros_like(x) for x in audio]
    v, a = impose_conditions(zeros_v, zeros_a, first_v, audio_v)
    torch.testing.assert_close(x0_from_velocity(video[0], v[0], sigma[0])[:, :1], first)
    torch.testing.assert_close(x0_from_velocity(audio[1], a[1], sigma[1]), clean)
    assert not v[0][:, 1:].any() and not a[0].any() and not v[1].any()  # elsewhere the model's output stays


def test_modality_weights_and_token_weighting():
    pv, tv = [torch.ones(48, 1, 2, 2)], [torch.zeros(48, 1, 2, 2)]  # video mse 1
    pa, ta = [torch.full((5, 64), 2.0)], [torch.zeros(5, 64)]  # audio mse 4
    out = joint_flow_loss(pv, pa, tv, ta, [Mode.T2V], video_weight=0.5, audio_weight=2.0)
    assert out["loss"].item() == pytest.approx(0.5 * 1 + 2.0 * 4)
    # two clips of different size: the mean is over all elements (token-weighted)
    pv2 = [torch.ones(48, 1, 2, 2), torch.zeros(48, 3, 2, 2)]
    tv2 = [torch.zeros(48, 1, 2, 2), torch.zeros(48, 3, 2, 2)]
    out = joint_flow_loss(pv2, pa * 2, tv2, ta * 2, [Mode.T2V] * 2)
    assert out["loss_video"].item() == pytest.approx(1 / 4)


def test_text_dropout_and_mode_sampling():
    text = [torch.randn(7, 16), torch.randn(3, 16)]
    null = torch.zeros(1, 16)
    out = drop_text(text, torch.tensor([True, False]), null)
    assert torch.equal(out[0], null) and out[1] is text[1]
    modes = sample_modes(4000, {"t2v": 0.5, "i2v": 0.25, "a2v": 0.25}, torch.Generator().manual_seed(0))
    frac = {m: sum(x == m for x in modes) / len(modes) for m in Mode}
    assert abs(frac[Mode.T2V] - 0.5) < 0.03 and abs(frac[Mode.A2V] - 0.25) < 0.03
    assert set(sample_modes(50, {"t2v": 1.0, "i2v": 0.0, "a2v": 0.0})) == {Mode.T2V}
    with pytest.raises(ValueError):
        sample_modes(3, {"t2v": 0.0})


def test_sr_inputs():
    from magi_train.flow.sr import sr_audio_condition, sr_video_input, upsample_latent, zero_snr_alpha

    assert abs(zero_snr_alpha() - 0.8389) < 1e-4  # spec §5.3
    low = torch.randn(48, 3, 4, 6)
    up = upsample_latent(low, (8, 12))
    assert up.shape == (48, 3, 8, 12)
    # align_corners=True keeps the corner values exactly
    torch.testing.assert_close(up[..., 0, 0], low[..., 0, 0])
    torch.testing.assert_close(up[..., -1, -1], low[..., -1, -1])
    eps = torch.randn_like(up)
    a = 0.8389
    torch.testing.assert_close(sr_video_input(low, (8, 12), a, eps), a * up + (1 - a * a) ** 0.5 * eps)
    audio, ae = torch.randn(9, 64), torch.randn(9, 64)
    torch.testing.assert_close(sr_audio_condition(audio, ae), 0.7 * ae + 0.3 * audio)


# -- per-modality noise levels (flow.audio_sigma) ------------------------------------------------------------


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def _rank_correlation(rho: float) -> float:
    """Spearman correlation of a Gaussian copula with normal correlation rho (Pearson 1907)."""
    return 6 / math.pi * math.asin(rho / 2)


@pytest.fixture
def one_thread():
    """Sorting 40k draws is 20x faster on one thread than on two busy ones (CI shares its cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_DRAWS = 40_000
KS_MAX = 0.02  # 2.8 x sqrt(2/N): a true equal-marginal pair exceeds it with probability ~1e-7
CORR_TOL = 0.02  # 4 standard errors (1/sqrt(N)) of a rank correlation


def _pair(kind: str, audio_sigma: str, rho: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return sample_sigma_pair(N_DRAWS, kind, 3.0, 0.3, 0.8, audio_sigma, rho, generator=g)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_shared_audio_sigma_is_the_video_draw_and_uses_the_generator_as_before(kind):
    # bit-identical training under the default: the same levels and the same generator state afterwards (so the
    # modes, text dropout and noise drawn next in PretrainTask.flow_loss are unchanged too)
    g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    old = sample_sigma(64, kind, 3.0, 0.3, 0.8, generator=g_old)
    video, audio = sample_sigma_pair(64, kind, 3.0, 0.3, 0.8, "shared", 0.5, generator=g_new)
    assert torch.equal(video, old) and torch.equal(audio, old)
    assert torch.equal(torch.rand(8, generator=g_old), torch.rand(8, generator=g_new))


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
@pytest.mark.parametrize(
    ("audio_sigma", "rho"), [("independent", 0.0), ("correlated", 0.5), ("correlated", -0.7)]
)
def test_audio_sigma_keeps_the_marginal_and_has_the_asked_correlation(kind, audio_sigma, rho, one_thread):
    video, audio = _pair(kind, audio_sigma, rho)
    shared, _ = _pair(kind, "shared")
    assert torch.equal(video, shared)  # the video levels do not depend on the audio choice
    assert audio.min() >= 0 and audio.max() <= 1
    assert _ks(video, audio) < KS_MAX  # same marginal (kind, mean, std, shift)
    assert _ks(audio, _pair(kind, "independent", seed=1)[0]) < KS_MAX  # ... which is the configured one
    assert abs(_spearman(video, audio) - _rank_correlation(rho)) < CORR_TOL
    # the check can tell: video against itself is perfectly correlated, rho 0.5 is not 0.3 within the tolerance
    assert (
        _spearman(video, shared) > 0.999
        and abs(_rank_correlation(0.5) - _rank_correlation(0.3)) > 3 * CORR_TOL
    )


def test_wrong_copulas_fail_the_distribution_checks(one_thread):
    # controls: implementations a reviewer could write, which the checks above reject
    g = torch.Generator().manual_seed(0)
    video = sample_sigma(N_DRAWS, "logit_normal", 3.0, 0.3, 0.8, generator=g)
    other = sample_sigma(N_DRAWS, "logit_normal", 3.0, 0.3, 0.8, generator=g)
    mixed = 0.5 * video + math.sqrt(1 - 0.25) * other  # mixing the levels themselves: the marginal drifts
    assert _ks(video, mixed) > 5 * KS_MAX
    averaged = 0.5 * (video + other)  # correlated, but squeezed to the middle
    assert _ks(video, averaged) > 5 * KS_MAX
    # the copula applied after the shift (to logit of the shifted level) breaks the marginal of shift != 1
    z = 0.5 * torch.logit(video) + math.sqrt(0.75) * torch.randn(N_DRAWS, generator=g)
    assert _ks(video, torch.sigmoid(0.3 + 0.8 * z)) > KS_MAX
    # the normals mixed without the sqrt(1 - rho^2) factor: too wide a marginal, too weak a correlation
    z0, w = torch.randn(N_DRAWS, generator=g), torch.randn(N_DRAWS, generator=g)
    to_sigma = lambda z: shift_sigma(torch.sigmoid(0.3 + 0.8 * z), 3.0)  # noqa: E731
    unscaled = to_sigma(0.5 * z0 + w)
    assert _ks(to_sigma(z0), unscaled) > KS_MAX
    assert abs(_spearman(to_sigma(z0), unscaled) - _rank_correlation(0.5)) > CORR_TOL
    # and a fresh draw does not pass for correlation 0.5
    assert abs(_spearman(video, other) - _rank_correlation(0.5)) > 10 * CORR_TOL


def test_audio_sigma_extremes_and_bad_values(one_thread):
    video, audio = sample_sigma_pair(1000, "logit_normal", 5.0, 0.0, 1.0, "correlated", 1.0)
    torch.testing.assert_close(audio, video)  # rho = 1 is shared (up to rounding)
    video, audio = sample_sigma_pair(20_000, "uniform", 1.0, audio_sigma="correlated", correlation=-1.0)
    torch.testing.assert_close(audio, 1 - video, atol=1e-5, rtol=0)  # rho = -1: opposite quantiles
    with pytest.raises(ValueError, match=r"flow.audio_sigma='joint': use one of \['shared'"):
        sample_sigma_pair(4, audio_sigma="joint")
    with pytest.raises(ValueError, match=r"audio_sigma_correlation=1.5: a correlation in \[-1, 1\]"):
        sample_sigma_pair(4, audio_sigma="correlated", correlation=1.5)


def test_noise_clip_noises_audio_at_its_own_level_and_keeps_conditions():
    video, audio = torch.randn(48, 3, 2, 2), torch.randn(9, 64)
    ve, ae = torch.randn_like(video), torch.randn_like(audio)
    s_v, s_a = torch.tensor(0.8), torch.tensor(0.2)
    vi, ai, _ = noise_clip(video, audio, s_v, ve, ae, Mode.T2V, audio_sigma=s_a)
    torch.testing.assert_close(vi, add_noise(video, ve, 0.8))
    torch.testing.assert_close(ai, add_noise(audio, ae, 0.2))
    vi, ai, first = noise_clip(video, audio, s_v, ve, ae, Mode.I2V, audio_sigma=s_a)
    assert torch.equal(vi[:, :1], video[:, :1]) and torch.equal(first, video[:, :1])
    torch.testing.assert_close(ai, add_noise(audio, ae, 0.2))
    _, ai, _ = noise_clip(video, audio, s_v, ve, ae, Mode.A2V, audio_sigma=s_a)
    assert torch.equal(ai, audio)  # a2v: clean audio whatever its drawn level
