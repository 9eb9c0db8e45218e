"""recipe=distill_vae: a tiny TurboVAED learns a tiny Wan2.2 decoder's frames; its EMA loads as a released one."""

import numpy as np
import pytest
import torch

from magi_train.__main__ import run
from magi_train.codecs.turbo_vae import (
    TurboVAE,
    TurboVAEConfig,
    TurboVAED,
    decoder_state_dict,
    load_decoder_weights,
)
from magi_train.codecs.video_vae import VideoVAE
from magi_train.data.reader import ShardDataset, expand_urls
from magi_train.tasks.vae_distill import decode_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _l1(model: TurboVAED, teacher: VideoVAE, latents: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(np.mean([(model(z[None]) - teacher.decode(z[None])).abs().mean() for z in latents]))


def test_smoke_run_lowers_the_decode_error_and_exports_a_released_layout(compose, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["recipe=distill_vae", "experiment=smoke", f"run_dir={run_dir}", "trainer.max_steps=20",
                 "trainer.val_check_interval=10", "trainer.checkpoint_every_n_steps=10", "trainer.limit_val_batches=2",
                 "data.synthetic.num_clips=16", "data.synthetic.samples_per_shard=8", "trainer.enable_progress_bar=false",
                 "ema.start_step=5"]  # fmt: skip
    cfg = compose(overrides)
    out = run(cfg)
    assert out["global_step"] == 20
    teacher = VideoVAE.from_pretrained(run_dir / "codecs/video_vae")
    val = ShardDataset(expand_urls(str(run_dir / "data/val")), text_dim=3584, max_tokens=4096, infinite=False)
    latents = [v for batch in val for v in batch.video][:6]
    # the exported EMA decodes closer to the teacher than the student it started from (same seed, same config)
    exported = TurboVAE.from_pretrained(run_dir / "turbo_vae")
    student_cfg = TurboVAEConfig(**{k: v for k, v in cfg.vae_distill.student.items()})
    torch.manual_seed(cfg.seed)
    initial = TurboVAED(student_cfg)
    before, after = _l1(initial, teacher, latents), _l1(exported.model, teacher, latents)
    assert after < 0.9 * before, (before, after)
    # the Lightning checkpoint carries the same weights as `ema_state_dict`, read by the TurboVAED loader
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    from_ckpt = TurboVAED(TurboVAEConfig.from_dict(ckpt["turbo_vae_config"]))
    load_decoder_weights(from_ckpt, decoder_state_dict(ckpt))
    for (k, a), b in zip(from_ckpt.state_dict().items(), exported.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    metrics = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/l1", "train/ssim", "val/l1", "val/l1_raw", "val/ssim"} <= set(metrics)


def test_losses_are_zero_for_the_teacher_itself():
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    cfg = compose_cfg()
    losses = decode_losses(x, x, cfg)
    assert float(losses["l1"]) == 0 and float(losses["ssim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(losses["loss"]) == pytest.approx(0.0, abs=1e-5)
    worse = decode_losses(x.flip(-1), x, cfg)
    assert float(worse["loss"]) > 0.1


def compose_cfg():
    from magi_train.config import VAEDistillConfig

    return VAEDistillConfig(teacher="unused")


def test_dry_run_counts_the_released_student(compose, capsys, tmp_path):
    out = run(
        compose(["recipe=distill_vae", "dry_run=true", "vae_distill.teacher=/nowhere", f"run_dir={tmp_path}"])
    )
    assert out == {"parameters": 107_122_892}  # TinyShallow_7_7 (magi_train/codecs/turbo_vae.py)
    assert "parameters: 107,122,892" in capsys.readouterr().out
