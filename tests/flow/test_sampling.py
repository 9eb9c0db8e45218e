"""Samplers: the released timestep lists, CFG convention and schedule, i2v/a2v conditioning, seeding."""

import pytest
import torch

from magi_train.flow import sampling
from magi_train.flow.sampling import (
    Guidance,
    SRGuidance,
    cfg_combine,
    cond_uncond,
    fresh_noise,
    make_unipc,
    released_sigmas,
    renoise_chain,
    sample_distilled,
    sample_unipc,
)

# spec/released-model.md §4.4
SPEC_T = {
    32: [
        999,
        993,
        986,
        979,
        972,
        964,
        955,
        946,
        937,
        927,
        916,
        904,
        892,
        879,
        865,
        849,
        833,
        814,
        795,
        773,
        749,
        723,
        694,
        661,
        624,
        583,
        535,
        480,
        416,
        340,
        249,
        138,
    ],
    8: [999, 972, 937, 892, 833, 749, 624, 416],
    5: [999, 952, 882, 768, 555],
}
SPEC_SIGMA_8 = [0.9998, 0.9720, 0.9373, 0.8926, 0.8331, 0.7497, 0.6247, 0.4164, 0.0]


@pytest.mark.parametrize("n", [32, 8, 5])
def test_unipc_timesteps_equal_released_lists(n):
    sched = make_unipc(n)
    assert sched.timesteps.tolist() == SPEC_T[n]
    assert sched.sigmas[-1].item() == 0.0


def test_distilled_sigmas_equal_released():
    torch.testing.assert_close(released_sigmas(8), torch.tensor(SPEC_SIGMA_8), atol=1e-4, rtol=0)


def test_cfg_noop_and_convention():
    c, u = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(cfg_combine(c, c, 5.0), c)  # equal branches: guidance is a no-op
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c)  # w = 1 is the conditional prediction
    torch.testing.assert_close(cfg_combine(c, u, 0.0), u)


def test_video_scale_switches_at_500():
    g = Guidance()
    video, audio = g.scales(torch.tensor([501, 500, 138]))
    assert video.tolist() == [5.0, 2.0, 2.0] and audio.tolist() == [5.0] * 3
    # in the 32-step schedule the first 27 steps use 5.0 and the last 5 use 2.0 (spec §4.5)
    video, _ = g.scales(torch.tensor(SPEC_T[32]))
    assert video.tolist() == [5.0] * 27 + [2.0] * 5


def test_unipc_uses_the_guidance_schedule_per_step(monkeypatch):
    seen = []

    def model(video, audio, text):
        off = float(text[0].mean())
        return [v * 0 + off for v in video], [a * 0 + off for a in audio]

    def spy(c, u, w):
        seen.append(torch.as_tensor(w).unique().tolist())  # video: one scale per latent frame
        return cfg_combine(c, u, w)

    monkeypatch.setattr(sampling, "cfg_combine", spy)
    video, audio = _noise()
    g = Guidance(video_scale=7.0, video_scale_late=3.0, switch_t=833, audio_scale=4.0)
    sample_unipc(model, video, audio, [torch.ones(1, 8)], [torch.zeros(1, 8)], num_steps=8, guidance=g)
    # per step: video scale then audio scale; t = 833 is not > 833, so the switch happens there (strict >)
    assert seen[0::2] == [[7.0]] * 4 + [[3.0]] * 4 and seen[1::2] == [[4.0]] * 8


class _Recorder:
    """A stand-in denoiser: velocity = x * 0.1 + text mean; records the text of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, audio, text):
        self.calls.append([t.mean().item() for t in text])
        shift = [t.mean() for t in text]
        return [v * 0.1 + s for v, s in zip(video, shift, strict=True)], [
            a * 0.1 + s for a, s in zip(audio, shift, strict=True)
        ]


def _noise(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 3, 2, 2, generator=g)], [torch.randn(9, 64, generator=g)]


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_unipc_cfg_runs_uncond_with_negative_prompt_and_equal_branches_match_no_cfg(batch_cfg):
    video, audio = _noise()
    text, neg = [torch.ones(3, 8)], [torch.zeros(2, 8)]
    rec = _Recorder()
    sample_unipc(rec, video, audio, text, neg, num_steps=5, batch_cfg=batch_cfg)
    if batch_cfg:  # one forward per step: the clip with its prompt, then with the negative prompt
        assert rec.calls == [[1.0, 0.0]] * 5
    else:  # cond then uncond (negative prompt) each step
        assert len(rec.calls) == 10 and rec.calls[0] == [1.0] and rec.calls[1] == [0.0]
    a = sample_unipc(_Recorder(), video, audio, text, text, num_steps=5, batch_cfg=batch_cfg)
    b = sample_unipc(_Recorder(), video, audio, text, None, num_steps=5)
    torch.testing.assert_close(a, b)


def test_sr_guidance_scales_each_latent_frame_as_released():
    video, audio = SRGuidance().frame_scales(999, 26)  # spec §5 item 5: sr_cfg_number 2 with the cfg trick
    assert video.tolist() == [2.0] * 13 + [3.5] * 13 and audio == 5.0
    assert SRGuidance().frame_scales(555, 26)[0].tolist() == video.tolist()  # no switch over the SR steps
    assert SRGuidance().frame_scales(999, 5)[0].tolist() == [2.0] * 5
    assert SRGuidance(trick_frames=0).frame_scales(999, 4)[0].tolist() == [3.5] * 4  # use_cfg_trick False
    assert SRGuidance(video_scale=1.5).frame_scales(999, 15)[0].tolist() == [1.5] * 15  # min(2.0, 1.5)


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_sr_guidance_gives_each_frame_its_scale(batch_cfg):
    """With a frame-wise denoiser, frames 0..12 of the SR-guided sample equal a run guided at 2.0 everywhere and
    frames 13.. one at 3.5."""
    g = torch.Generator().manual_seed(0)
    video, audio = [torch.randn(48, 16, 2, 2, generator=g)], [torch.randn(61, 64, generator=g)]
    text, neg = [torch.ones(3, 8)], [torch.zeros(2, 8)]

    def run(guidance):
        return sample_unipc(_Recorder(), video, audio, text, neg, 5, guidance=guidance, batch_cfg=batch_cfg)

    (sr,), _ = run(SRGuidance())
    (low,), _ = run(Guidance(video_scale=2.0, video_scale_late=2.0))
    (high,), _ = run(Guidance(video_scale=3.5, video_scale_late=3.5))
    torch.testing.assert_close(sr[:, :13], low[:, :13], atol=1e-6, rtol=0)
    torch.testing.assert_close(sr[:, 13:], high[:, 13:], atol=1e-6, rtol=0)
    assert (low - high).abs().max() > 1e-2  # control: the two scales give different frames


def _random_tiny_dit(seed=0):
    """The tiny DiT with every weight random (its zero-initialised norms and heads would make branches equal)."""
    from magi_train.models.dit import MODEL_CONFIGS, DiT

    torch.manual_seed(seed)
    model = DiT(MODEL_CONFIGS["tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _clips(seed=0):
    """Two clips of different sizes; prompts and negative prompts of different lengths (width 3584)."""
    g = torch.Generator().manual_seed(seed)
    video = [torch.randn(48, 2, 4, 4, generator=g), torch.randn(48, 3, 2, 4, generator=g)]
    audio = [torch.randn(5, 64, generator=g), torch.randn(9, 64, generator=g)]
    text = [torch.randn(5, 3584, generator=g), torch.randn(3, 3584, generator=g)]
    negative = [torch.randn(7, 3584, generator=g), torch.randn(7, 3584, generator=g)]
    return video, audio, text, negative


def test_batched_cond_uncond_equals_two_forwards_of_the_dit():
    model = _random_tiny_dit()
    video, audio, text, negative = _clips()
    with torch.no_grad():
        packed = cond_uncond(model, video, audio, text, negative, batched=True)
        separate = cond_uncond(model, video, audio, text, negative, batched=False)
        one_by_one = [model([video[i]], [audio[i]], [t[i]]) for t in (text, negative) for i in range(2)]
    for got, want in zip(packed, separate, strict=True):
        assert len(got) == 2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and equal to the release's batch-1 calls, one clip and one branch at a time
    torch.testing.assert_close(packed[0] + packed[2], [v[0][0] for v in one_by_one], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1] + packed[3], [v[1][0] for v in one_by_one], atol=1e-5, rtol=0)
    # control: the branches differ, so the equality above is not between identical tensors
    assert (packed[0][0] - packed[2][0]).abs().max() > 1e-2


def test_batched_guidance_sampler_equals_two_forwards_per_step():
    model = _random_tiny_dit(1)
    video, audio, text, negative = _clips(1)
    g = Guidance()
    out = [
        sample_unipc(model, video, audio, text, negative, num_steps=4, guidance=g, batch_cfg=b)
        for b in (True, False)
    ]
    # float rounding of the packed GEMMs (~1e-6 per forward) grows by the guidance scale 5 over the steps
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)
    no_cfg = sample_unipc(model, video, audio, text, None, num_steps=4)
    assert (out[0][0][0] - no_cfg[0][0]).abs().max() > 1e-3  # guidance changed the result


def test_cond_uncond_needs_one_negative_per_clip():
    video, audio, text, negative = _clips()
    with pytest.raises(ValueError, match="negative text per clip"):
        cond_uncond(_Recorder(), video, audio, text, negative[:1])


@pytest.mark.parametrize("sampler", ["unipc", "distilled"])
def test_i2v_first_frame_bit_identical_and_a2v_audio_fixed(sampler):
    video, audio = _noise()
    first = torch.randn(48, 1, 2, 2)
    clean = torch.randn(9, 64)
    text = [torch.ones(3, 8)]
    if sampler == "unipc":
        out_v, out_a = sample_unipc(
            _Recorder(), video, audio, text, None, 5, first_frames=[first], clean_audio=[clean]
        )
    else:
        out_v, out_a = sample_distilled(
            _Recorder(),
            video,
            audio,
            text,
            8,
            first_frames=[first],
            clean_audio=[clean],
            generator=torch.Generator().manual_seed(0),
        )
    assert torch.equal(out_v[0][:, :1], first)
    assert torch.equal(out_a[0], clean)
    assert not torch.equal(out_v[0][:, 1:], video[0][:, 1:])


def test_distilled_sampler_is_seeded():
    video, audio = _noise()
    text = [torch.ones(3, 8)]
    runs = [
        sample_distilled(_Recorder(), video, audio, text, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0][0], runs[1][0][0]) and torch.equal(runs[0][1][0], runs[1][1][0])
    other = sample_distilled(_Recorder(), video, audio, text, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other[0][0], runs[0][0][0])


def test_distilled_sampler_recovers_x0_of_an_exact_denoiser():
    # a denoiser that knows x0 returns v = (x - x0)/s; the last step (s_next = 0) must return x0 exactly
    x0_v, x0_a = torch.randn(48, 2, 2, 2), torch.randn(5, 64)
    sig = released_sigmas(8).tolist()
    step = {"i": 0}

    def oracle(video, audio, text):
        s = sig[step["i"]]
        step["i"] += 1
        return [(video[0] - x0_v) / s], [(audio[0] - x0_a) / s]

    out_v, out_a = sample_distilled(
        oracle, [torch.randn_like(x0_v)], [torch.randn_like(x0_a)], [torch.ones(1, 8)]
    )
    torch.testing.assert_close(out_v[0], x0_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a[0], x0_a, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the re-noising chain shared by the distilled sampler and DMD-2's backward simulation


def test_fresh_noise_draws_clip_by_clip_video_then_audio():
    # [video clips, audio clips]; expected draw order v0, a0, v1, a1 (spec §4.8)
    x = [[torch.zeros(2, 3), torch.zeros(4)], [torch.zeros(5), torch.zeros(1, 2)]]
    eps = fresh_noise(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected = [torch.randn(s, generator=g) for s in [(2, 3), (5,), (4,), (1, 2)]]
    for got, want in zip([eps[0][0], eps[1][0], eps[0][1], eps[1][1]], expected, strict=True):
        assert torch.equal(got, want)
    batched = fresh_noise([torch.zeros(3, 2), torch.zeros(3, 1)], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(batched[0], torch.randn(3, 2, generator=g))
    assert torch.equal(batched[1], torch.randn(3, 1, generator=g))
    assert fresh_noise([torch.zeros(2, dtype=torch.bfloat16)])[0].dtype == torch.float32  # fp32, as released
    with pytest.raises(ValueError, match="one layout"):
        fresh_noise([torch.zeros(2, 1), [torch.zeros(1)]])


def test_sample_distilled_is_the_chain_with_the_released_draw_order():
    # the loop as the release writes it (step_ddim): one randn per clip and step, video then audio
    video = [torch.randn(48, 2, 2, 2), torch.randn(48, 3, 2, 2)]
    audio = [torch.randn(7, 64), torch.randn(4, 64)]
    text = [torch.ones(2, 8), torch.zeros(1, 8)]
    sig = released_sigmas(8).tolist()
    g = torch.Generator().manual_seed(3)
    v_ref, a_ref = list(video), list(audio)
    for i in range(8):
        v_pred, a_pred = _Recorder()(v_ref, a_ref, text)
        for j in range(2):
            x0_v, x0_a = v_ref[j] - sig[i] * v_pred[j], a_ref[j] - sig[i] * a_pred[j]
            eps_v = torch.randn(v_ref[j].shape, generator=g)
            eps_a = torch.randn(a_ref[j].shape, generator=g)
            v_ref[j] = sig[i + 1] * eps_v + (1 - sig[i + 1]) * x0_v
            a_ref[j] = sig[i + 1] * eps_a + (1 - sig[i + 1]) * x0_a
    g = torch.Generator().manual_seed(3)
    out_v, out_a = sample_distilled(_Recorder(), video, audio, text, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(out_v + out_a, v_ref + a_ref, strict=True))


def test_renoise_chain_splits_at_any_step():
    # steps 0..k-1 then k..K-1 with one generator = the whole chain (backward simulation, then the rest)
    x = [[torch.randn(3, 2)], [torch.randn(4)]]
    sig = released_sigmas(8)

    def predict(x, s):
        return [[0.5 * c - s for c in m] for m in x]

    whole = renoise_chain(predict, x, sig, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    split = renoise_chain(predict, renoise_chain(predict, x, sig, 0, 3, g), sig, 3, None, g)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, split, strict=True))
    assert renoise_chain(predict, x, sig, 2, 2) == x  # no steps: the state unchanged
    with pytest.raises(ValueError, match="step index"):
        renoise_chain(predict, x, sig, 0, 9)
