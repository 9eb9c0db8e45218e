"""Two-process training on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 train the smoke model to the same
weights, ZeRO checkpoints resume (under bf16 autocast), and consolidate into released safetensors."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.models.checkpoint import load_released
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import read_dit_state, source_kind
from magi_train.tools.consolidate import consolidate

REPO = Path(__file__).resolve().parents[2]
DS_SCRIPT = Path(__file__).with_name("deepspeed_cpu.py")
# Same data, seed and steps for every strategy; no EMA (sharded strategies refuse it) and fp32 compute, so
# that the strategies can be compared weight for weight.
COMMON = [
    "recipe=pretrain_base",
    "experiment=smoke",
    "trainer.devices=2",
    "trainer.max_steps=2",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "ema.decay=0",
    "data.synthetic.num_clips=64",
    "data.synthetic.samples_per_shard=16",
]


def launch(entry: list[str], run_dir: Path, *overrides: str) -> str:
    """Run one 2-process training (Lightning starts rank 1 itself); returns its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, *entry, *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the log of rank 1, which Lightning started
    return log


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def val_losses(run_dir: Path) -> list[float]:
    return [
        float(r["val/loss"]) for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/loss")
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    launch(["-m", "magi_train"], run_dir, "strategy=ddp")
    return run_dir


@pytest.fixture(scope="module")
def ddp_weights(ddp_run) -> dict[str, torch.Tensor]:
    state, _, _, _ = read_dit_state(ddp_run / "checkpoints" / "last.ckpt")
    return state


def test_ddp_two_processes_train_validate_and_checkpoint(ddp_run, ddp_weights):
    ckpt = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    losses = train_losses(ddp_run)
    assert sorted(losses) == [0, 1] and all(math.isfinite(v) for v in losses.values())
    assert val_losses(ddp_run) and all(
        math.isfinite(v) for v in val_losses(ddp_run)
    )  # validation ran, synced
    assert (
        ddp_weights["final_linear_video.weight"].abs().sum() > 0
    )  # zero-initialised head: the optimizer stepped


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_resumes_and_consolidates(stage, ddp_weights, tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    launch([str(DS_SCRIPT)], run_dir, f"strategy=deepspeed_stage_{stage}")
    ckpt_dir = run_dir / "checkpoints" / "last.ckpt"
    assert source_kind(ckpt_dir) == "deepspeed"
    shards = sorted(p.name for p in (ckpt_dir / "checkpoint").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO partition per rank

    # ZeRO and DDP compute the same updates: same weights after the same two steps (fp32; only the
    # all-reduce order differs)
    state, config, _, _ = read_dit_state(ckpt_dir)
    assert config["strategy"]["name"] == f"deepspeed_stage_{stage}"
    assert state.keys() == ddp_weights.keys()
    for key, value in ddp_weights.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)

    # resume the ZeRO checkpoint for one more step, now under DeepSpeed's bf16 autocast
    log = launch(
        [str(DS_SCRIPT)],
        run_dir,
        f"strategy=deepspeed_stage_{stage}",
        "trainer.max_steps=3",
        "resume=true",
        "trainer.precision=bf16-mixed",
    )
    assert "Restored all states from the checkpoint" in log
    client = torch.load(next((ckpt_dir / "checkpoint").glob("*model_states.pt")), weights_only=True)
    assert client["global_step"] == 3
    assert client["ds_config"]["torch_autocast"]["enabled"] and "bf16" not in client["ds_config"]
    losses = train_losses(run_dir)
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())

    out = consolidate(ckpt_dir, tmp_path / "released")
    model = DiT(MODEL_CONFIGS["tiny"])
    load_released(model, out)
    resumed = model.state_dict()
    moved = sum((resumed[k] - v).abs().sum() for k, v in ddp_weights.items() if v.is_floating_point())
    assert moved > 0  # the third step changed the weights
