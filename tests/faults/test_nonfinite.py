"""The non-finite guard (tasks/guard.py, issue 13): NaN/inf steps are skipped and counted, a diverging run stops with
a clear error and a non-zero exit, and no checkpoint is written from NaN/inf weights."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.__main__ import run
from magi_train.tasks.dmd2 import DMD2Task
from magi_train.tasks.guard import NonFiniteGuard, NonFiniteTrainingError, check_checkpoint_finite
from magi_train.tasks.pretrain import PretrainTask
from tests.fixtures.smoke import SMOKE_TRAIN

REPO = Path(__file__).resolve().parents[2]
SMOKE = [*SMOKE_TRAIN, "trainer.log_every_n_steps=1"]  # each test sets its max_steps
# lr 1e6 without warm-up: finite loss at steps 0-1, NaN gradients from step 2 on. Checkpoints every 2 steps (not 5),
# so that one is written before the divergence and must survive it.
DIVERGE = [
    "recipe=pretrain_base", *SMOKE, "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=2",
    "optim.lr=1e6", "optim.warmup_steps=0", "trainer.max_nonfinite_steps=3",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _columns(metrics: Path) -> dict[str, list[float]]:
    rows = list(csv.DictReader(metrics.open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def _all_finite(path: Path) -> bool:
    """Every floating tensor of the checkpoint file is finite (independent of the guard's own walk), except the
    callbacks' bookkeeping (ModelCheckpoint's kth_value is inf by design)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.pop("callbacks")
    found = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            found.append(bool(torch.isfinite(v).all()))

    walk(ckpt)
    return len(found) > 10 and all(found)


def _snapshots(monkeypatch, cls, *prefixes: str) -> dict[int, dict[str, torch.Tensor]]:
    """Weights after every step, by the global_step reached (the task classes define no on_train_batch_end)."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        state = self.state_dict()
        snaps[self.global_step] = {k: v.clone() for k, v in state.items() if k.startswith(prefixes)}

    monkeypatch.setattr(cls, "on_train_batch_end", on_train_batch_end, raising=False)
    return snaps


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def control(one_thread, compose, tmp_path_factory) -> Path:
    """A normal 4-step smoke run (EMA on): skips nothing; also the DMD-2 teacher."""
    run_dir = tmp_path_factory.mktemp("control")
    run(compose(["recipe=pretrain_base", *SMOKE, f"run_dir={run_dir}", "trainer.max_steps=4"]))
    return run_dir


def test_a_normal_run_skips_nothing(control):
    cols = _columns(control / "metrics.csv")
    assert len(cols["train/nonfinite_steps"]) == 4 and set(cols["train/nonfinite_steps"]) == {0.0}
    ckpt = torch.load(control / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite_guard"] == {"total": 0, "consecutive": 0}


def test_diverging_run_stops_with_a_clear_error_and_keeps_a_finite_checkpoint(compose, tmp_path):
    with pytest.raises(
        NonFiniteTrainingError, match=r"3 steps in a row .*trainer.max_nonfinite_steps=3.*optim.lr"
    ):
        run(compose([*DIVERGE, f"run_dir={tmp_path}"]))
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts and (tmp_path / "checkpoints" / "last.ckpt") in ckpts
    for path in ckpts:
        assert _all_finite(path), path


def test_diverging_run_exits_non_zero_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "magi_train", *DIVERGE, f"run_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "training diverged" in proc.stderr + proc.stdout
    assert "trainer.max_nonfinite_steps=3" in proc.stderr + proc.stdout


def test_single_nan_loss_and_nan_gradient_are_skipped_counted_and_resume_exactly(
    compose, tmp_path, monkeypatch
):
    """Step 3: NaN loss; step 5: finite loss, one NaN gradient. Both skipped, weights and LR kept, training goes on;
    a run split after the skipped step 3 (4 + 4 steps) ends bit-identical to the straight one."""
    flow_loss, nan = PretrainTask.flow_loss, float("nan")

    def nan_loss_at_3(self, batch, generator=None):
        out = flow_loss(self, batch, generator)
        if self.training and self.global_step == 3:
            out["loss"] = out["loss"] * nan
        return out

    def nan_grad_at_5(self):
        if self.global_step == 5:
            next(self.model.parameters()).grad.view(-1)[0] = nan

    monkeypatch.setattr(PretrainTask, "flow_loss", nan_loss_at_3)
    monkeypatch.setattr(PretrainTask, "on_after_backward", nan_grad_at_5)
    snaps = _snapshots(monkeypatch, PretrainTask, "model.")
    common = ["recipe=pretrain_base", *SMOKE, "optim.warmup_steps=10", "trainer.checkpoint_every_n_steps=100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(compose([*common, f"run_dir={straight}", "trainer.max_steps=8"]))
    assert sorted(snaps) == list(range(1, 9))  # training continued to max_steps
    for skipped in (3, 5):  # snaps[s + 1]: the weights after step s
        assert _same(snaps[skipped + 1], snaps[skipped], "model.")
        assert not _same(snaps[skipped + 2], snaps[skipped + 1], "model.")
    cols = _columns(straight / "metrics.csv")
    assert cols["train/nonfinite_steps"] == [0, 0, 0, 1, 1, 2, 2, 2]  # cumulative, by step
    lr = cols["train/lr"]  # warm-up: the schedule moves only on updates taken
    assert lr[4] == lr[3] > lr[2] and lr[6] == lr[5] > lr[4] and lr[7] > lr[6]
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == 8  # a skipped step still counts: data position and cadence follow it
    assert a["nonfinite_guard"] == {"total": 2, "consecutive": 0}
    assert all(int(s["step"]) == 6 for s in a["optimizer_states"][0]["state"].values())  # AdamW: 6 updates
    assert a["lr_schedulers"][0]["last_epoch"] == 6

    run(compose([*common, f"run_dir={split}", "trainer.max_steps=4"]))
    saved = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["nonfinite_guard"] == {"total": 1, "consecutive": 1}  # saved within a run of skipped steps
    run(compose([*common, f"run_dir={split}", "trainer.max_steps=8", "resume=true"]))
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["nonfinite_guard"] == a["nonfinite_guard"] and b["lr_schedulers"] == a["lr_schedulers"]
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in ("step", "exp_avg", "exp_avg_sq"))


def test_a_checkpoint_of_nan_weights_is_refused_and_the_earlier_one_kept(compose, tmp_path, monkeypatch):
    """The last line of defence: weights that turn NaN behind the guard's back are never written."""

    def poison_after_step_2(self, outputs, batch, batch_idx):
        if self.global_step == 3:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(PretrainTask, "on_train_batch_end", poison_after_step_2, raising=False)
    overrides = ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2"]
    with pytest.raises(NonFiniteTrainingError, match=r"refusing to write the checkpoint of step 4.*model\."):
        run(compose(["recipe=pretrain_base", *SMOKE, f"run_dir={tmp_path}", *overrides]))
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["last.ckpt", "step00000002.ckpt"]
    assert all(_all_finite(p) for p in ckpts)
    assert torch.load(ckpts[0], weights_only=True)["global_step"] == 2


def test_checkpoint_check_covers_ema_layout_and_optimizer_state():
    finite = {"state_dict": {"w": torch.ones(2)}, "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}}
    check_checkpoint_finite(finite, 1, "optim.lr")
    for key, value in (
        ("current_model_state", {"w": torch.tensor([1.0, float("nan")])}),  # raw weights beside the EMA
        ("optimizer_states", [{"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}}]),
    ):
        with pytest.raises(NonFiniteTrainingError, match=f"{key}/"):
            check_checkpoint_finite({**finite, key: value}, 1, "optim.lr")
    with pytest.raises(ValueError, match="trainer.max_nonfinite_steps=0"):
        NonFiniteGuard(0)


def test_dmd2_skips_each_roles_nan_for_that_role_only(compose, tmp_path, monkeypatch, control):
    """Iteration 1: NaN student loss; iteration 3: NaN critic loss. Each role skips only its own update."""
    gen_obj, critic_obj, nan = DMD2Task.generator_objective, DMD2Task.critic_objective, float("nan")

    def generator_objective(self, *args):
        loss, x_g, logs = gen_obj(self, *args)
        return (loss * nan if self.global_step == 1 else loss), x_g, logs

    def critic_objective(self, *args):
        loss, logs = critic_obj(self, *args)
        return (loss * nan if self.global_step == 3 else loss), logs

    monkeypatch.setattr(DMD2Task, "generator_objective", generator_objective)
    monkeypatch.setattr(DMD2Task, "critic_objective", critic_objective)
    snaps = _snapshots(monkeypatch, DMD2Task, "student.", "critic.")
    run_dir = tmp_path / "dmd2"
    teacher = control / "checkpoints" / "last.ckpt"
    overrides = [f"distill.teacher.checkpoint={teacher}", "distill.generator_every=1", "trainer.max_steps=5"]
    out = run(
        compose(["recipe=dmd2_distill", *SMOKE, f"run_dir={run_dir}", "data.max_tokens=128", *overrides])
    )
    assert out["global_step"] == 5
    after = {it: snaps[it + 1] for it in range(5)}  # weights after iteration it
    assert _same(after[1], after[0], "student.") and not _same(after[1], after[0], "critic.")
    assert _same(after[3], after[2], "critic.") and not _same(after[3], after[2], "student.")
    assert not _same(after[2], after[1], "student.") and not _same(after[4], after[3], "critic.")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite_guard"] == {r: {"total": 1, "consecutive": 0} for r in ("student", "critic")}
    for opt in range(2):  # student, critic: 4 updates each, and 4 schedule steps
        assert all(int(s["step"]) == 4 for s in ckpt["optimizer_states"][opt]["state"].values())
        assert ckpt["lr_schedulers"][opt]["last_epoch"] == 4
    cols = _columns(run_dir / "metrics.csv")
    assert cols["train/nonfinite_steps_student"][-1] == cols["train/nonfinite_steps_critic"][-1] == 1
    assert cols["train/nonfinite_steps"][-1] == 2
