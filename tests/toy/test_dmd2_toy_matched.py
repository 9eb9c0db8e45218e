"""The DMD-2 toy on `shared-t25` (docs/dmd2_toy.md "A spec matched to shift 5"): the shared spec with every
coordinate carried by 25 tokens, the spec that the production shift 5 = sqrt(25) is matched to. On the 2-D spec
the last student step starts at s = 0.42, where the modes overlap, and leaves mass between them (mode_tv fails,
tests/toy/test_dmd2_toy.py); here the same run meets mode_tv, the coupling and every distance bound, and what
remains at CI length is the within-mode spread. Its own module so that it runs beside test_dmd2_toy.py."""

import pytest

from magi_train.tools.toy.distill import DistillConfig, TeacherConfig, train_teacher
from magi_train.tools.toy.gmm import get_spec
from magi_train.tools.toy.study import make_bench, run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def matched():
    """(stats, failed bound names) of the finished-sample critic's student at w = 1, CI length."""
    spec = get_spec("shared-t25")
    bench = make_bench(spec, train_teacher(spec, TeacherConfig(steps=3000)), None, num_eval=2000)
    stats, bs, _ = run(bench, DistillConfig(iters=2000, batch=256, critic_samples="final"))
    fails = [b.name for b in bs if not b.ok]
    print("shared-t25", {k: round(v, 4) for k, v in stats.items()}, "fails", fails)
    return stats, fails


def test_the_matched_spec_leaves_no_mass_between_modes(matched):
    stats, fails = matched
    assert set(fails) <= {"std_ratio_video"}, (fails, stats)
    assert stats["mode_tv"] <= 0.1 and stats["joint_ratio"] >= 0.9, stats


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: on shared-t25 at CI length the within-mode spread (std_ratio_video) is below 0.7; "
    "docs/dmd2_toy.md",
)
def test_student_meets_every_bound_on_the_matched_spec(matched):
    assert matched[1] == []
