"""DMD-2 validation metrics (magi_train.flow.dmd_metrics): the distance sees a collapsed or shifted student, the
coupling score sees audio that no longer follows its video."""

import math

import torch

from magi_train.flow import dmd_metrics as dm


def _clips(n=8, seed=0, coupled=True):
    """Video clips [4, 2, 3, 3] and audio [5, 6] whose every value is the clip's video mean (coupled) or another
    clip's (decoupled)."""
    gen = torch.Generator().manual_seed(seed)
    video = [torch.randn(4, 2, 3, 3, generator=gen) + 2 * torch.randn(1, generator=gen) for _ in range(n)]
    means = [v.mean() for v in video]
    if not coupled:
        means = means[3:] + means[:3]
    audio = [m * torch.ones(5, 6) for m in means]
    return [video, audio]


def judge(x_t, sigma):
    """A judge that knows the coupling: video x0 = x_t / (1 - s); audio x0 = that video's mean."""
    s = float(sigma[0])
    video = [v / (1 - s) for v in x_t[0]]
    return [video, [v.mean() * torch.ones_like(a) for v, a in zip(video, x_t[1], strict=True)]]


def test_stat_distance_and_std_ratio():
    teacher = _clips(seed=0)
    same = _clips(seed=1)
    collapsed = [[0.2 * v for v in teacher[0]], teacher[1]]
    shifted = [[v + 1.0 for v in teacher[0]], teacher[1]]
    d_same = float(dm.stat_distance(same[0], teacher[0], 0))
    assert d_same < 0.5 < float(dm.stat_distance(collapsed[0], teacher[0], 0))
    assert (
        abs(float(dm.stat_distance(shifted[0], teacher[0], 0)) - 1.0) < 1e-6
    )  # a mean shift of 1, std equal
    assert abs(float(dm.std_ratio(collapsed[0], teacher[0])) - 0.2) < 0.05
    stats = dm.latent_stats(teacher[1], -1)
    assert stats.shape == (6, 2)  # audio channels are the last dim


def test_coupling_score_sees_decoupled_audio():
    gen = torch.Generator().manual_seed(0)
    coupled = float(dm.coupling_score(judge, _clips(), 0.3, gen))
    decoupled = float(dm.coupling_score(judge, _clips(coupled=False), 0.3, gen))
    assert coupled > 1.0 and abs(decoupled) < 0.5 * coupled
    metrics = dm.distill_metrics(
        _clips(coupled=False), _clips(), judge, 0.3, torch.Generator().manual_seed(1)
    )
    assert float(metrics["coupling_ratio"]) < 0.5 and float(metrics["coupling_teacher"]) > 1.0
    assert set(metrics) == {
        "teacher_dist_video",
        "teacher_dist_audio",
        "std_ratio_video",
        "std_ratio_audio",
        "coupling_student",
        "coupling_teacher",
        "coupling_ratio",
    }


def test_swap_partners_and_length_fitting():
    assert dm.swap_partner(3) == [1, 2, 0] and dm.swap_partner(1) is None
    a = torch.arange(3.0).view(3, 1).expand(3, 2)
    assert dm.fit_length(a, torch.zeros(7, 2))[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert dm.fit_length(a, torch.zeros(2, 2))[:, 0].tolist() == [0, 1]
    single = [[torch.randn(4, 2, 3, 3)], [torch.randn(5, 6)]]
    assert math.isnan(float(dm.coupling_score(judge, single)))
    mixed = _clips(n=4)
    mixed[1][1] = mixed[1][1][:3]  # clips of different audio lengths still get a score
    assert float(dm.coupling_score(judge, mixed, 0.3)) > 1.0
