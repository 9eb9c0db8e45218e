"""The latency table (recipe=evaluate suite=latency) times the TurboVAED and the Wan2.2 decoder side by side."""

import dataclasses
import json

import pytest
import torch

from magi_train.config import EvalConfig, EvalSuiteConfig, GenerateConfig
from magi_train.eval.latency import run_latency
from magi_train.models.dit import MODEL_CONFIGS, DiT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from magi_train.codecs.tiny import write_tiny_codecs

    root = tmp_path_factory.mktemp("latency")
    write_tiny_codecs(root / "codecs")
    torch.manual_seed(0)
    student = DiT(MODEL_CONFIGS["tiny"])
    config = {
        "task": "dmd2",
        "model": dataclasses.asdict(MODEL_CONFIGS["tiny"]),
        "distill": {"num_student_steps": 2, "shift": 5.0},
    }
    sd = {"student." + k: v for k, v in student.state_dict().items()}
    torch.save({"state_dict": sd, "magi_config": config}, root / "dmd.ckpt")
    return root


def _eval_cfg() -> EvalConfig:
    rows = [{"name": "32px", "width": 32, "height": 32}, {"name": "sr", "width": 32, "height": 32,
                                                           "sr_width": 64, "sr_height": 64}]  # fmt: skip
    return EvalConfig(suite=EvalSuiteConfig(name="latency", kind="latency", seconds=0.36, resolutions=rows,
                                            repeats=2, warmup=1))  # fmt: skip


def _gen_cfg(root, **kw) -> GenerateConfig:
    return GenerateConfig(distilled_ckpt=str(root / "dmd.ckpt"), prompt="a cat", codecs_dir=str(root / "codecs"),
                          device="cpu", progress=False, **kw)  # fmt: skip


def test_latency_reports_turbo_and_wan_decode_side_by_side(setup, tmp_path):
    out = run_latency(_eval_cfg(), _gen_cfg(setup, turbo_vae=str(setup / "codecs/turbo_vae")), tmp_path)
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["decoder"] == "turbo"
    row = {r["name"]: r for r in out["rows"]}["32px"]
    assert len(row["runs_s"]) == 2 and all(
        r["video_turbo"] > 0 and r["video_wan2.2"] > 0 for r in row["runs_s"]
    )
    md = (tmp_path / "latency.md").read_text()
    assert (
        "| Resolution | Text | Base | Super-Res | Decode | Total | Video decode: Turbo | Video decode: Wan2.2"
        in md
    )
    m = row["median_s"]
    line = next(ln for ln in md.splitlines() if ln.startswith("| 32px |"))
    assert (
        f"| {m['video_turbo']:.2f} | {m['video_wan2.2']:.2f} | {m['video_wan2.2'] / m['video_turbo']:.1f}x |"
        in line
    )
    assert "| sr | skipped: no generate.sr_ckpt |" in md and "decoder TurboVAED" in md


def test_latency_without_turbo_has_only_the_wan_column(setup, tmp_path):
    out = run_latency(_eval_cfg(), _gen_cfg(setup), tmp_path)
    row = out["rows"][0]
    assert "video_turbo" not in row["median_s"] and row["median_s"]["video_wan2.2"] > 0
    line = next(ln for ln in (tmp_path / "latency.md").read_text().splitlines() if ln.startswith("| 32px |"))
    assert line.endswith("| — | " + f"{row['median_s']['video_wan2.2']:.2f} | — |")
