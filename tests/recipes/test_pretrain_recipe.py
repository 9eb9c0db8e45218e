"""The pretrain_base recipe end to end: composition, dry run, a smoke run that learns, exact resume."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from magi_train.__main__ import run
from magi_train.training.resume import newest_checkpoint

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


# recipe -> (task, what its composed nodes must hold beyond the smoke defaults)
EXPECTED = {
    "pretrain_base": ("pretrain", {"model.text_coords": "v2", "flow.text_drop_prob": 0.1}),
    "pretrain_sr": ("pretrain_sr", {"model.text_coords": "v1", "sr.alpha": 0.8389, "sr.audio_noise_scale": 0.7}),
    "dmd2_distill": ("dmd2", {"distill.teacher.checkpoint": "outputs/smoke/checkpoints/last.ckpt",
                              "distill.num_student_steps": 8, "distill.student.optim.lr": 1e-4,
                              "strategy.find_unused_parameters": True, "trainer.checkpoint_every_n_steps": 100}),
    "generate": ("generate", {"generate.base_ckpt": "outputs/smoke/checkpoints/last.ckpt", "generate.width": 32,
                              "generate.tiny_codecs": True}),
    "distill_vae": ("vae_distill", {"vae_distill.tiny_teacher": True, "data.max_clips": 1}),
    "evaluate": ("evaluate", {"eval.suite.name": "smoke", "eval.scorer.backend": "proxy",
                              "eval.asr.backend": "pocketsphinx"}),
}  # fmt: skip


def test_every_recipe_is_covered():
    assert sorted(EXPECTED) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_smoke(compose, recipe, tmp_path):
    from omegaconf import OmegaConf

    from magi_train.config import DataConfig, StrategyConfig, TrainerConfig, narrow
    from magi_train.models.dit import DiTConfig

    cfg = compose([f"recipe={recipe}", "experiment=smoke", f"run_dir={tmp_path}"])
    task, values = EXPECTED[recipe]
    assert cfg.recipe == recipe and cfg.task == task
    model = narrow(cfg.model, DiTConfig)
    assert model.hidden_size == 128 and model.num_layers == 4  # tiny
    trainer, strategy = narrow(cfg.trainer, TrainerConfig), narrow(cfg.strategy, StrategyConfig)
    assert (trainer.accelerator, trainer.precision, strategy.name) == ("cpu", "32-true", "auto")
    if task in ("pretrain", "pretrain_sr", "dmd2"):  # the training recipes read generated shards
        data = narrow(cfg.data, DataConfig)
        assert data.synthetic.enabled and data.train_shards == f"{tmp_path}/data/train"
        assert trainer.max_steps == 300
    for key, value in values.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_misspelt_key_is_an_error(compose):
    with pytest.raises(Exception, match="lrr"):
        compose(["recipe=pretrain_base", "optim.lrr=1"])
    with pytest.raises(Exception, match="recipe"):
        compose([])  # the recipe is mandatory


def test_dry_run_15b_prints_exact_parameter_count(tmp_path):
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi_train",
            "recipe=pretrain_base",
            "model=magihuman_15b",
            "dry_run=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameters: 15,299,419,136" in out.stdout
    assert (
        "memory plan (pretrain_base" in out.stdout
    )  # model state + activations per GPU (training/memory.py)
    assert time.time() - start < 120  # meta device: no 61 GB allocation


def _losses(metrics: Path) -> list[tuple[int, float]]:
    rows = list(csv.DictReader(metrics.open()))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def test_smoke_run_learns_and_resumes(compose, tmp_path):
    run_dir = tmp_path / "run"
    base = [
        "recipe=pretrain_base",
        "experiment=smoke",
        f"run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
    ]
    out = run(compose(base))
    assert out["global_step"] == 300
    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    losses = _losses(run_dir / "metrics.csv")
    early = [v for s, v in losses[:5]]
    late = [v for s, v in losses[-5:]]
    assert sum(late) / len(late) < 0.7 * sum(early) / len(early), losses
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 300
    assert saved["magi_config"]["model"]["hidden_size"] == 128  # the resolved config travels along

    out = run(compose(base + ["resume=true", "trainer.max_steps=320"]))
    assert out["global_step"] == 320
    steps = [s for s, _ in _losses(run_dir / "metrics.csv")]
    assert min(steps) < 10 and max(steps) >= 315  # the resumed run appended to the same metrics.csv


# (steps of the first run, the checkpoint resumed from): a run "killed" at step 13 resumed from the checkpoint of
# step 10, a validation step; a run stopped at 7 resumed from its end-of-training save
@pytest.mark.parametrize("stop_at, resume_from", [(13, "step00000010.ckpt"), (7, None)])
def test_resume_is_exact(compose, tmp_path, stop_at, resume_from):
    """A run resumed to 20 equals 20 straight steps: per-step losses (one metrics.csv row per step), weights, EMA
    and optimizer state, with validation on (every 5 steps, so the checkpoint at step 10 falls on one)."""
    common = [
        "recipe=pretrain_base",
        "experiment=smoke",
        "trainer.enable_progress_bar=false",
        "trainer.checkpoint_every_n_steps=10",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "data.synthetic.num_clips=64",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(compose(common + [f"run_dir={straight}", "trainer.max_steps=20"]))
    run(compose(common + [f"run_dir={split}", f"trainer.max_steps={stop_at}"]))
    resume = f"ckpt_path={split / 'checkpoints' / resume_from}" if resume_from else "resume=true"
    run(compose(common + [f"run_dir={split}", "trainer.max_steps=20", resume]))
    losses_a, losses_b = _losses(straight / "metrics.csv"), _losses(split / "metrics.csv")
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] == list(range(20))  # no step twice
    assert losses_b == losses_a  # every step's loss, before and after the resume
    val_a, val_b = (
        [r["val/loss"] for r in csv.DictReader(p.open()) if r.get("val/loss")]
        for p in (straight / "metrics.csv", split / "metrics.csv")
    )
    assert len(val_a) == 4 and val_b[-2:] == val_a[-2:]  # validations after the resume see the same model
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    # Lightning names the resumed run's last checkpoint last-v1.ckpt when it resumed from another one
    b = torch.load(newest_checkpoint(split), weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}/{name} differs after resume"
    exp_a = a["optimizer_states"][0]["state"]
    exp_b = b["optimizer_states"][0]["state"]
    assert all(torch.equal(exp_a[i]["exp_avg"], exp_b[i]["exp_avg"]) for i in exp_a)


def test_wandb_logger_offline(compose, tmp_path):
    """Each run gets its own offline W&B run, also two in one process (a Hydra multirun, pytest): Lightning
    leaves its run open, and a second WandbLogger would log into the first run's directory unless it is closed."""
    import wandb

    for name in ("a", "b"):
        run(
            compose(
                [
                    "recipe=pretrain_base",
                    "experiment=smoke",
                    "logger=wandb",
                    f"run_dir={tmp_path / name}",
                    "trainer.max_steps=6",
                    "trainer.val_check_interval=null",
                    "trainer.enable_progress_bar=false",
                    "data.synthetic.num_clips=16",
                ]
            )
        )
        assert wandb.run is None  # closed (training/trainer.py finish_wandb)
        runs = list((tmp_path / name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))  # a run `wandb sync` can upload later
        assert (tmp_path / name / "metrics.csv").is_file()  # the CSV log is always written too


def test_sr_smoke_run_learns(compose, tmp_path):
    """recipe=pretrain_sr: the SR DiT learns to restore video from the re-noised upsampled low-res latent; with
    frame-local attention in two layers, as the 1080p SR model (a window of 0 latent frames: every clip is cut)."""
    run_dir = tmp_path / "sr"
    cfg = compose(
        [
            "recipe=pretrain_sr",
            "experiment=smoke",
            f"run_dir={run_dir}",
            "model.local_attn_layers=[1,2]",
            "model.frame_receptive_field=0",
            "trainer.enable_progress_bar=false",
            "trainer.max_steps=150",
            "trainer.val_check_interval=null",
        ]
    )
    assert cfg.model.text_coords == "v1" and cfg.sr.alpha == pytest.approx(0.8389)
    out = run(cfg)
    assert out["global_step"] == 150
    losses = _losses(run_dir / "metrics.csv")
    early = [v for s, v in losses[:3]]
    late = [v for s, v in losses[-3:]]
    assert sum(late) / len(late) < 0.7 * sum(early) / len(early), losses


def test_values_are_logged_on_the_step_they_belong_to(compose, tmp_path):
    """With rows every 5th step, each row's grad norm and loss are that step's (as in a run logging every step)."""
    common = ["recipe=pretrain_base", "experiment=smoke", "trainer.enable_progress_bar=false", "trainer.max_steps=10",
              "trainer.val_check_interval=null", "data.synthetic.num_clips=16"]  # fmt: skip
    rows = {}
    for every in (1, 5):
        run(compose([*common, f"run_dir={tmp_path / str(every)}", f"trainer.log_every_n_steps={every}"]))
        table = csv.DictReader((tmp_path / str(every) / "metrics.csv").open())
        rows[every] = {int(r["step"]): r for r in table if r.get("train/loss")}
    assert sorted(rows[5]) == [4, 9]
    for step, row in rows[5].items():
        assert row["train/grad_norm"] == rows[1][step]["train/grad_norm"], step
        assert row["train/loss"] == rows[1][step]["train/loss"], step


class _Echo(torch.nn.Module):
    """Stands in for the DiT: predicts its noisy inputs, so flow_loss's inputs can be read off what it saw."""

    def forward(self, video, audio, text):
        self.seen = (video, audio)
        return video, audio


def test_audio_sigma_reaches_the_audio_input_and_pretrain_sr_refuses_it():
    from magi_train.config import FlowConfig, OptimConfig
    from magi_train.data.reader import ClipBatch
    from magi_train.tasks.pretrain import PretrainTask
    from magi_train.tasks.super_resolution import SuperResolutionTask

    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(48, 2, 2, 2, generator=g), torch.randn(5, 64, generator=g)
    batch = ClipBatch(keys=["a"], video=[video], audio=[audio], text=[torch.zeros(1, 8)], image=[None])
    flow = FlowConfig(mode_probs={"t2v": 1.0}, text_drop_prob=0.0)
    task = PretrainTask(_Echo(), flow, OptimConfig(), max_steps=1, text_dim=8)
    # video clean (s = 0), audio pure noise (s = 1), and the reverse: each modality at its own level
    task.flow_loss(batch, g, sigmas=(torch.zeros(1), torch.ones(1)))
    (v_in,), (a_in,) = task.model.seen
    assert torch.equal(v_in, video) and not torch.allclose(a_in, audio, atol=0.1)
    task.flow_loss(batch, g, sigmas=(torch.ones(1), torch.zeros(1)))
    (v_in,), (a_in,) = task.model.seen
    assert torch.equal(a_in, audio) and not torch.allclose(v_in, video, atol=0.1)
    with pytest.raises(ValueError, match="flow.audio_sigma='both': use one of"):
        PretrainTask(_Echo(), FlowConfig(audio_sigma="both"), OptimConfig(), max_steps=1, text_dim=8)
    with pytest.raises(ValueError, match=r"audio_sigma_correlation=-2.0: a correlation in \[-1, 1\]"):
        PretrainTask(_Echo(), FlowConfig(audio_sigma="correlated", audio_sigma_correlation=-2.0), OptimConfig(),
                     max_steps=1, text_dim=8)  # fmt: skip
    with pytest.raises(ValueError, match="flow.audio_sigma=independent has no meaning in pretrain_sr"):
        SuperResolutionTask(_Echo(), FlowConfig(audio_sigma="independent"), OptimConfig(), max_steps=1, text_dim=8,
                            sr_alpha=0.8, sr_audio_noise=0.7, sr_factor=2)  # fmt: skip


def test_audio_sigma_study_choices():
    from magi_train.tools.audio_sigma_study import parse_choice

    assert parse_choice("shared") == ("shared", 0.0) and parse_choice("correlated:-0.25") == (
        "correlated",
        -0.25,
    )
    for bad in ("joint", "independent:0.5", "correlated:high"):
        with pytest.raises(ValueError, match=f"choice '{bad}'"):
            parse_choice(bad)
