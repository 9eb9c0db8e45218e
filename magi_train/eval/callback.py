"""Training-time evaluation: a Lightning callback that samples a small suite with the model being trained every N
steps (through `magi_train.inference.generate`, the one sampler), scores the clips and logs the means and a few
sample videos with sound (W&B) to the trainer's loggers.

Sampling runs on rank 0 with the unwrapped `pl_module.model` while the other ranks wait at a barrier, so it
suits single-device and DDP runs; sharded models (FSDP, DeepSpeed stage 3) need every rank in each forward and
are not supported (use recipe=evaluate on the saved checkpoints instead).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from magi_train.config import DistillConfig, EvalConfig, GenerateConfig
from magi_train.eval.report import summarize_model
from magi_train.eval.runner import (
    SUITE_MEDIA,
    bootstrap_settings,
    generate_config,
    load_scorers,
    prompt_config,
    score_clip,
)
from magi_train.eval.suite import suite_prompts

log = logging.getLogger(__name__)


def sampling_model(pl_module: L.LightningModule) -> tuple[torch.nn.Module, bool, dict[str, Any] | None]:
    """(the DiT to sample, whether it is a distilled student, the run config its sampler reads).

    A dmd2 task's `student` runs the distilled sampler without CFG, with the task's `num_student_steps` and
    `shift` (as a checkpoint of the run would); the `model` of a pretraining task runs UniPC with CFG.
    """
    student = getattr(pl_module, "student", None)
    if isinstance(student, torch.nn.Module):
        distill = getattr(pl_module, "cfg", None)
        config = None
        if isinstance(distill, DistillConfig):
            config = {
                "task": "dmd2",
                "distill": {"num_student_steps": distill.num_student_steps, "shift": distill.shift},
            }
        return student, True, config
    return pl_module.model, False, None


@contextmanager
def training_rng_untouched() -> Iterator[None]:
    """Restore the global RNG states (torch, CUDA, NumPy, Python) afterwards: sampling, codec loading and scoring
    draw from them, and the training stream must go on as if they had not run (exact resume with the callback
    on, which a resumed run does not repeat)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EvalCallback(L.Callback):
    """Every `every_n_steps` optimizer steps: sample, score and log `eval/<column>` (and `eval/<column>_low/_high`).

    `gen_cfg` (with `eval.generate_overrides`) gives the codecs, sizes, steps and guidance; its checkpoint and SR
    fields are ignored: the live model is sampled at the base size with its current, non-EMA weights.
    """

    def __init__(self, eval_cfg: EvalConfig, gen_cfg: GenerateConfig, run_dir: str | Path):
        if eval_cfg.every_n_steps <= 0:
            raise ValueError(f"EvalCallback needs eval.every_n_steps > 0, got {eval_cfg.every_n_steps}")
        if eval_cfg.suite.kind != "quality":
            raise ValueError(
                f"EvalCallback needs a quality suite (prompts or a benchmark folder), got suite "
                f"{eval_cfg.suite.name!r} of kind {eval_cfg.suite.kind!r}"
            )
        self.eval_cfg, self.run_dir = eval_cfg, Path(run_dir)
        gen_cfg = generate_config(eval_cfg, gen_cfg)
        self.gen_cfg = dataclasses.replace(gen_cfg, sr_width=None, sr_height=None, progress=False)
        media = self.run_dir / "eval_callback" / SUITE_MEDIA
        self.prompts = suite_prompts(eval_cfg.suite, eval_cfg.callback_prompts, media)
        self._pipe = None  # codecs and the live model, set up at the first evaluation
        self._scorer = self._asr = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.eval_cfg.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            with training_rng_untouched():
                self.evaluate(trainer, pl_module, step)
        trainer.strategy.barrier("magi_train_eval_callback")

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Any]:
        from magi_train.inference.generate import generate, pipeline_for_model

        model, distilled, config = sampling_model(pl_module)
        if self._pipe is None:
            self._pipe = pipeline_for_model(self.gen_cfg, model, pl_module.device, distilled, config)
            self._scorer, self._asr = load_scorers(self.eval_cfg)
        self._pipe.base.model, self._pipe.base.path = model, f"training step {step}"
        was_training = model.training
        model.eval()
        try:
            clip_dir = self.run_dir / "eval_callback" / f"step{step:08d}"
            records, speech = [], []
            for p in self.prompts:
                cfg = prompt_config(self.gen_cfg, p, self.eval_cfg.suite.seconds, clip_dir / f"{p.id}.mp4")
                generate(cfg, self._pipe)
                record, s = score_clip(
                    p, cfg.output, self._scorer, self._asr, self.eval_cfg.asr.normalizer,
                    fold_chinese=self.eval_cfg.asr.fold_chinese,
                )  # fmt: skip
                records.append(record)
                if s is not None:
                    speech.append(s)
        finally:
            model.train(was_training)
        summary = summarize_model(f"step{step}", records, speech, bootstrap_settings(self.eval_cfg))
        metrics = {}
        for key, est in summary["columns"].items():
            for suffix, name in (("", "value"), ("_low", "low"), ("_high", "high")):
                if est[name] is not None:
                    metrics[f"eval/{key}{suffix}"] = float(est[name])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            self._log_videos(logger, records[: self.eval_cfg.callback_videos], step)
        log.info(
            "eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items() if "_" not in k[5:]}
        )
        return summary

    @staticmethod
    def _log_videos(logger: Any, records: list[dict[str, Any]], step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(logger, WandbLogger) or not records:
            return
        import wandb

        videos = [
            wandb.Video(r["path"], format="mp4", caption=r["id"]) for r in records
        ]  # mp4 keeps the sound
        logger.experiment.log({"eval/samples": videos}, step=step)


def eval_callbacks(eval_cfg: EvalConfig, gen_cfg: GenerateConfig, run_dir: str | Path) -> list[L.Callback]:
    """[EvalCallback] when `eval.every_n_steps > 0`, else [] (for the training runners' callback lists)."""
    if eval_cfg.every_n_steps <= 0:
        return []
    return [EvalCallback(eval_cfg, gen_cfg, run_dir)]
