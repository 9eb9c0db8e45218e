"""Toy metrics (magi_train.tools.toy.metrics): exact data passes the DMD-2 toy bounds, the failure kinds do not."""

import torch

from magi_train.tools.toy.gmm import NUM_CLASSES, balanced_labels, centres_2d, sample_data
from magi_train.tools.toy.metrics import evaluate, mmd2, passes, sliced_w1


def _data(n=2000, joint=False, seed=0):
    labels = balanced_labels(n)
    xs, mode = sample_data(labels, joint, torch.Generator().manual_seed(seed))
    return xs, labels, mode


def test_data_passes_the_bounds():
    xs, labels, _ = _data(joint=True)
    stats = evaluate(xs, labels)
    assert passes(stats["2d"], 8) and passes(stats["1d"], 4)
    assert abs(stats["2d"]["std"] - 0.1) < 0.01 and abs(stats["2d"]["tangential_std"] - 0.1) < 0.01
    assert abs(stats["2d"]["radial_bias"]) < 0.01
    assert stats["2d"]["class_acc"] == 1.0 and stats["1d"]["joint_acc"] == 1.0
    assert stats["2d"]["in_3std"] > 0.98  # P(|N(0, I_2)| <= 3) = 0.989


def test_failures_fail_the_bounds():
    xs, labels, mode = _data()
    blurred = [xs[0] + 0.2 * torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(1))]
    stats = evaluate(blurred, labels)["2d"]
    assert not passes(stats, 8) and stats["std"] > 0.15 and stats["in_3std"] < 0.95
    wrong_class = evaluate(xs, (labels + 1) % NUM_CLASSES)["2d"]
    assert not passes(wrong_class, 8) and wrong_class["class_acc"] == 0.0
    dropped = evaluate([torch.where((mode == 3).unsqueeze(1), centres_2d()[7], xs[0])], labels)["2d"]
    assert dropped["modes"] == 7 and not passes(dropped, 8)
    diverged = evaluate([xs[0] * 1e6], labels)["2d"]
    assert diverged["modes"] == 0 and not passes(diverged, 8)


def test_distances_to_a_reference():
    (a,), _, _ = _data(seed=0)
    (b,), _, _ = _data(seed=1)
    assert abs(mmd2(a, b)) < 0.01 < mmd2(a, 1.1 * b)
    assert sliced_w1(a, b) < 0.1 < sliced_w1(a, 1.1 * b)
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(2))
    assert abs(sliced_w1(x, x + 0.5) - 0.5) < 1e-6  # exact W1 of a shift in 1-D
