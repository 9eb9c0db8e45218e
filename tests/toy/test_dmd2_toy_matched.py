"""The DMD-2 toy on `shared-t25` (docs/dmd2_toy.md "A spec matched to shift 5"): the shared spec with every
coordinate carried by 25 tokens, the spec that the production shift 5 = sqrt(25) is matched to. On the 2-D spec
the last student step starts at s = 0.42, where the modes overlap, and leaves mass between them (mode_tv fails,
tests/toy/test_dmd2_toy.py); here the same run meets mode_tv, the coupling and every distance bound, and what
remains at CI length is the within-mode spread. Its own module so that it runs beside test_dmd2_toy.py."""

import pytest

from magi_train.tools.toy.__main__ import RESTARTED
from magi_train.tools.toy.distill import DistillConfig, TeacherConfig, train_teacher
from magi_train.tools.toy.gmm import get_spec
from magi_train.tools.toy.study import make_bench, run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # one_thread: tests/conftest.py

CI_ITERS = 2000
FINAL = dict(batch=256, critic_samples="final")


@pytest.fixture(scope="module")
def bench():
    spec = get_spec("shared-t25")
    return make_bench(spec, train_teacher(spec, TeacherConfig(steps=3000)), None, num_eval=2000)


def _student(bench, **config):
    """(stats, failed bound names) of a w = 1 student on the bench."""
    stats, bs, _ = run(bench, DistillConfig(**config))
    fails = [b.name for b in bs if not b.ok]
    print("shared-t25", config, {k: round(v, 4) for k, v in stats.items()}, "fails", fails)
    return stats, fails


@pytest.fixture(scope="module")
def matched(bench):
    """The finished-sample critic's student at CI length (2000 iterations)."""
    return _student(bench, iters=CI_ITERS, **FINAL)


@pytest.fixture(scope="module")
def moving(bench):
    """The study's row (docs/dmd2_toy.md "The spread at CI length"): the generator at lr 2e-3 every second
    iteration, decayed, the critic restarted from the teacher every 1000 iterations, 2x CI length (the row's
    iters is a multiplier, as in the study command)."""
    return _student(bench, **{**RESTARTED, "iters": RESTARTED["iters"] * CI_ITERS})


def test_the_matched_spec_leaves_no_mass_between_modes(matched):
    stats, fails = matched
    assert set(fails) <= {"std_ratio_video"}, (fails, stats)
    assert stats["mode_tv"] <= 0.1 and stats["joint_ratio"] >= 0.9, stats


def test_a_moving_generator_with_a_restarted_critic_widens_the_modes(bench, matched, moving):
    """The plain run's spread stays at its initialisation's (the teacher's 8-step sampler); the moving
    generator's grows past it while the mode weights, the coupling and the distances hold."""
    start = bench.baseline["std_ratio_video"]
    stats, fails = moving
    assert set(fails) <= {"std_ratio_video"}, (fails, stats)
    assert stats["mode_tv"] <= 0.1 and stats["joint_ratio"] >= 0.9, stats
    assert stats["std_ratio_video"] >= start + 0.03, (stats["std_ratio_video"], start)
    assert matched[0]["std_ratio_video"] < start + 0.03, (matched[0]["std_ratio_video"], start)  # the control


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: on shared-t25 the within-mode spread (std_ratio_video) of the closest setting is below 0.7 "
    "on this seed (6 of 8 seeds meet every bound); docs/dmd2_toy.md",
)
def test_student_meets_every_bound_on_the_matched_spec(moving):
    assert moving[1] == []
