"""recipe=dmd2_distill validation (issue 12 item 7): the distance of the student's samples to the guided teacher's and
the audio-video coupling score are logged to metrics.csv at every validation (magi_train/flow/dmd_metrics.py)."""

import math

import pytest

from magi_train.__main__ import run
from tests.recipes.test_dmd2_recipe import _columns, _dmd2, teacher_ckpt  # noqa: F401  (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KEYS = [
    f"val/{k}"
    for k in (
        "teacher_dist_video",
        "teacher_dist_audio",
        "std_ratio_video",
        "std_ratio_audio",
        "coupling_student",
        "coupling_teacher",
        "coupling_ratio",
    )
]


def test_smoke_distill_logs_teacher_distance_and_coupling(compose, tmp_path, teacher_ckpt):  # noqa: F811
    run_dir = tmp_path / "val"
    extra = [
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "data.max_tokens=512",
        "distill.generator_every=1",
    ]  # the student updates between the two validations
    run(compose(_dmd2(run_dir, teacher_ckpt, *extra)))
    cols = _columns(run_dir / "metrics.csv")
    for key in KEYS:
        assert len(cols.get(key, [])) == 2, (key, cols.get(key))  # validations at iterations 2 and 4
    for key in KEYS[:4]:
        assert all(math.isfinite(v) and v >= 0 for v in cols[key]), (key, cols[key])
    assert any(math.isfinite(v) for v in cols["val/coupling_teacher"]), cols["val/coupling_teacher"]
    # the teacher's samples are computed once per validation batch: the second validation reuses them, so the
    # student's distance changes (it trained) while nothing about the teacher's samples does
    assert cols["val/teacher_dist_video"][0] != cols["val/teacher_dist_video"][1]
    assert cols["val/coupling_teacher"][0] == cols["val/coupling_teacher"][1]
