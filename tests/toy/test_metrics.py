"""Toy metrics and bounds (magi_train.tools.toy.metrics): data passes against data, and each kind of failure the
bounds of issue 12 must catch (point masses, a 90/10 split of a class's modes, decoupled audio, blur) fails one."""

import pytest
import torch

from magi_train.tools.toy.gmm import DataSpec, balanced_labels, get_spec, readout, sample_data, shared_spec
from magi_train.tools.toy.metrics import bounds, evaluate, failed, mmd2, sliced_w1

N = 1500  # small: MMD^2 is O(N^2) and the CI machine has 2 cores


def _data(spec: DataSpec, seed: int):
    labels = balanced_labels(N, spec.num_classes)
    xs, mode = sample_data(spec, labels, torch.Generator().manual_seed(seed))
    return xs, labels, mode


@pytest.fixture(scope="module", params=["ring", "shared"])
def setting(request):
    spec = get_spec(request.param)
    ref, labels, _ = _data(spec, 0)
    data, _, mode = _data(spec, 1)
    # a weak "baseline" for the distance bounds: the data blurred by 1.5x its std
    gen = torch.Generator().manual_seed(2)
    blur = [x + 1.5 * s * torch.randn(x.shape, generator=gen) for x, s in zip(data, spec.stds, strict=True)]
    return spec, ref, labels, data, mode, evaluate(spec, blur, labels, ref)


def test_spec_shapes_and_weights():
    spec = shared_spec()
    assert spec.dims == (2, 1) and spec.num_classes == 3 and spec.num_modes == 5 and spec.joint
    shared = (spec.class_weights > 0).sum(0)
    assert (shared > 1).any() and len(set(spec.class_weights[0][spec.class_weights[0] > 0].tolist())) > 1
    _, labels, mode = _data(spec, 0)
    w = torch.bincount(mode[labels == 0], minlength=5).double() / (labels == 0).sum()
    torch.testing.assert_close(w, spec.class_weights[0].double(), atol=0.04, rtol=0)
    with pytest.raises(ValueError, match="sum to 1"):
        DataSpec("bad", spec.centres, spec.class_weights * 2)


def test_data_meets_every_bound_against_data(setting):
    spec, ref, labels, data, _, baseline = setting
    stats = evaluate(spec, data, labels, ref)
    assert failed(stats, baseline) == [], [str(b) for b in bounds(stats, baseline)]
    assert stats["joint_acc"] > 0.99 and stats["class_acc"] == 1.0
    assert abs(stats["mmd2_joint"]) < 0.005 and 0.9 < stats["std_ratio_video"] < 1.1


def test_point_masses_fail_std_ratio(setting):
    spec, ref, labels, data, mode, baseline = setting
    points = [spec.centres[mode] + 0.01 * torch.randn(N, spec.dims[0]), data[1]]
    assert "std_ratio_video" in failed(evaluate(spec, points, labels, ref), baseline)
    # squeezed along one direction only (the ring's tangential shrink of issue 12): caught too
    squeeze = data[0].clone()
    squeeze[:, 1] = spec.centres[mode][:, 1] + 0.3 * (data[0][:, 1] - spec.centres[mode][:, 1])
    assert "std_ratio_video" in failed(evaluate(spec, [squeeze, data[1]], labels, ref), baseline)


def test_a_skewed_split_of_a_class_fails_mode_tv(setting):
    spec, ref, labels, data, mode, baseline = setting
    c = 0
    modes = torch.nonzero(spec.class_weights[c]).flatten()
    main, other = modes[0], modes[1]  # move samples of class c from `other` to `main` until 90/10
    gen = torch.Generator().manual_seed(3)
    target_other = 0.1
    p_move = 1 - target_other / float(spec.class_weights[c, other] + 1e-9)
    move = (labels == c) & (mode == other) & (torch.rand(N, generator=gen) < max(p_move, 0.0))
    video = data[0].clone()
    video[move] = data[0][move] - spec.centres[other] + spec.centres[main]
    audio = data[1].clone()
    audio[move] = data[1][move] - spec.audio_centres[other] + spec.audio_centres[main]
    stats = evaluate(spec, [video, audio], labels, ref)
    assert "mode_tv" in failed(stats, baseline) and stats["joint_acc"] > 0.99  # still coupled


def test_decoupled_audio_fails_joint_ratio(setting):
    spec, ref, labels, data, _, baseline = setting
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    same_class = labels[perm] == labels  # shuffle the audio within each class: marginals kept, coupling lost
    audio = torch.where(same_class.unsqueeze(1), data[1][perm], data[1])
    stats = evaluate(spec, [data[0], audio], labels, ref)
    assert "joint_ratio" in failed(stats, baseline)
    assert abs(stats["mmd2_audio"]) < 0.01  # the audio alone still looks right: only the coupling catches it


def test_divergence_and_blur_fail_the_distance_bounds(setting):
    spec, ref, labels, data, _, baseline = setting
    worse = [x + 3 * s * torch.randn(x.shape) for x, s in zip(data, spec.stds, strict=True)]
    assert {"mmd2_video", "sw1_video", "mmd2_joint"} <= set(
        failed(evaluate(spec, worse, labels, ref), baseline)
    )
    diverged = evaluate(spec, [x * 1e6 for x in data], labels, ref)
    assert diverged["mmd2_joint"] == float("inf") and "sw1_joint" in failed(diverged, baseline)


def test_distances_to_a_reference():
    spec = get_spec("ring")
    (a,), _, _ = _data(DataSpec("v", spec.centres, spec.class_weights), 0)
    (b,), _, _ = _data(DataSpec("v", spec.centres, spec.class_weights), 1)
    bw = (0.05, 0.2, 0.5, 1.0, 2.0)
    assert abs(mmd2(a, b, bw)) < 0.01 < mmd2(a, 1.1 * b, bw)
    assert sliced_w1(a, b) < 0.1 < sliced_w1(a, 1.1 * b)
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(2))
    assert abs(sliced_w1(x, x + 0.5) - 0.5) < 1e-6  # exact W1 of a shift in 1-D


def test_lifted_spec_carries_the_base_content():
    """shared-t25: each coordinate on 25 tokens; metrics read the base coordinates back, and what is not content
    (a model's leftover noise in the directions the data does not occupy) is reported as off_content."""
    base, spec = shared_spec(), get_spec("shared-t25")
    assert spec.dims == (50, 25) and spec.base_dims == base.dims == (2, 1)
    labels = balanced_labels(N, spec.num_classes)
    xs, mode = sample_data(spec, labels, torch.Generator().manual_seed(0))
    base_xs, base_mode = sample_data(base, labels, torch.Generator().manual_seed(0))
    assert torch.equal(mode, base_mode) and all(
        torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(readout(spec, xs), base_xs, strict=True)
    )
    assert torch.equal(xs[0][:, :25], base_xs[0][:, :1].expand(-1, 25))  # coordinate 0 on tokens 0..24
    ref, _ = sample_data(spec, labels, torch.Generator().manual_seed(1))
    stats = evaluate(spec, xs, labels, ref)
    assert stats.pop("off_content_video") < 1e-6 and stats.pop("off_content_audio") < 1e-6  # data: 0
    assert stats == pytest.approx(evaluate(base, base_xs, labels, readout(spec, ref)), rel=1e-4, abs=1e-6)
    noisy = [x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) for x in xs]
    assert evaluate(spec, noisy, labels, ref)["off_content_video"] == pytest.approx(
        0.1 * (24 / 25) ** 0.5, rel=0.05
    )
    with pytest.raises(ValueError, match="tokens=0"):
        DataSpec("bad", base.centres, base.class_weights, tokens=0)
