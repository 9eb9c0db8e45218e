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
from pathlib import Path
from typing import Any

import lightning as L
import torch

from magi_train.eval.asr import load_asr
from magi_train.eval.report import summarize_model
from magi_train.eval.runner import score_clip
from magi_train.eval.suite import load_suite
from magi_train.eval.videoscore import load_scorer

log = logging.getLogger(__name__)


def sampling_model(pl_module: L.LightningModule) -> tuple[torch.nn.Module, bool]:
    """(the DiT to sample, whether it is a distilled student): a dmd2 task's `student` runs the 8-step
    sampler without CFG; the `model` of the pretraining task runs UniPC with CFG."""
    student = getattr(pl_module, "student", None)
    if isinstance(student, torch.nn.Module):
        return student, True
    return pl_module.model, False


class EvalCallback(L.Callback):
    """Every `every_n_steps` optimizer steps: sample, score and log `eval/<column>` (and `eval/<column>_low/_high`).

    `gen_cfg` (a GenerateConfig) gives the codecs, sizes, steps and guidance; its checkpoint fields are ignored
    (the live model is sampled with its current, non-EMA weights).
    """

    def __init__(self, eval_cfg: Any, gen_cfg: Any, out_dir: str | Path):
        if eval_cfg.every_n_steps <= 0:
            raise ValueError(f"EvalCallback needs eval.every_n_steps > 0, got {eval_cfg.every_n_steps}")
        if not eval_cfg.suite.prompts:
            raise ValueError("EvalCallback needs a quality suite with prompts (eval.suite.prompts)")
        self.cfg, self.gen_cfg, self.out_dir = eval_cfg, gen_cfg, Path(out_dir)
        self.prompts = load_suite(eval_cfg.suite.prompts, eval_cfg.callback_prompts)
        self._codecs = None
        self._scorer = self._asr = None
        self._last_step = -1

    def _pipeline(self, model: torch.nn.Module, step: int, device: torch.device, distilled: bool):
        from magi_train.codecs import AudioVAE, VideoVAE
        from magi_train.inference.checkpoints import LoadedDiT
        from magi_train.inference.generate import Pipeline

        g = self.gen_cfg
        if self._codecs is None:
            if g.tiny_codecs and g.codecs_dir:
                from magi_train.codecs.tiny import write_tiny_codecs

                write_tiny_codecs(g.codecs_dir)
            root = Path(g.codecs_dir) if g.codecs_dir else None
            paths = {
                k: getattr(g, k) or (str(root / k) if root else None)
                for k in ("video_vae", "audio_vae", "text_encoder")
            }
            if not paths["video_vae"] or not paths["audio_vae"]:
                raise ValueError(
                    "EvalCallback needs generate.codecs_dir (or generate.video_vae and audio_vae)"
                )
            self._codecs = (
                VideoVAE.from_pretrained(paths["video_vae"], device=device),
                AudioVAE.from_pretrained(paths["audio_vae"], device=device),
                paths["text_encoder"],
            )
        video_vae, audio_vae, text_path = self._codecs
        base = LoadedDiT(model, source="training", weights="raw", path=f"training step {step}")
        return Pipeline(base, video_vae, audio_vae, device, None, distilled, None, text_path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.cfg.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self.evaluate(trainer, pl_module, step)
        trainer.strategy.barrier("magi_train_eval_callback")

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Any]:
        from magi_train.inference.generate import generate

        model, distilled = sampling_model(pl_module)
        was_training = model.training
        model.eval()
        try:
            pipe = self._pipeline(model, step, pl_module.device, distilled)
            if self._scorer is None:
                sc = self.cfg.scorer
                kwargs = (
                    {"fps": sc.fps}
                    if sc.backend == "proxy"
                    else {"device": sc.device, "dtype": sc.dtype, "fps": sc.fps}
                )
                self._scorer = load_scorer(sc.backend, sc.path, **kwargs)
                self._asr = load_asr(
                    self.cfg.asr.backend, self.cfg.asr.path, self.cfg.asr.device, self.cfg.asr.dtype
                )
            clip_dir = self.out_dir / "eval_callback" / f"step{step:08d}"
            records, speech = [], []
            for p in self.prompts:
                cfg = dataclasses.replace(
                    self.gen_cfg, prompt=p.prompt, text_features=None, image=p.image, audio=p.audio,
                    seconds=p.seconds or self.cfg.suite.seconds or self.gen_cfg.seconds, sr_width=None,
                    sr_height=None, seed=p.seed if p.seed is not None else self.gen_cfg.seed,
                    output=str(clip_dir / f"{p.id}.mp4"), progress=False,
                )  # fmt: skip
                generate(cfg, pipe)
                record, s = score_clip(p, cfg.output, self._scorer, self._asr, self.cfg.asr.normalizer)
                records.append(record)
                if s is not None:
                    speech.append(s)
        finally:
            model.train(was_training)
        boot = {
            "n_resamples": self.cfg.bootstrap_resamples,
            "confidence": self.cfg.confidence,
            "seed": self.cfg.seed,
        }
        summary = summarize_model(f"step{step}", records, speech, boot)
        metrics = {}
        for key, est in summary["columns"].items():
            for suffix, field in (("", "value"), ("_low", "low"), ("_high", "high")):
                if est[field] is not None:
                    metrics[f"eval/{key}{suffix}"] = float(est[field])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            self._log_videos(logger, records[: self.cfg.callback_videos], step)
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


def eval_callbacks(cfg: Any) -> list[L.Callback]:
    """[EvalCallback] when `cfg.eval.every_n_steps > 0`, else [] (for the training runners' callback lists)."""
    from omegaconf import OmegaConf

    if "eval" not in cfg or cfg.eval.every_n_steps <= 0:
        return []
    ecfg = OmegaConf.to_object(cfg.eval)
    gcfg = dataclasses.replace(OmegaConf.to_object(cfg.generate), **ecfg.generate_overrides)
    return [EvalCallback(ecfg, gcfg, cfg.run_dir)]
