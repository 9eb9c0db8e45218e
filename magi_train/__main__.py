"""`python -m magi_train recipe=<name> [overrides]`: the Hydra entry point of every recipe.

The only place that sees the root config: `run` narrows it once into typed nodes and hands each runner its own.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from magi_train.config import (
    DataConfig,
    DistillConfig,
    EMAConfig,
    EvalConfig,
    FlowConfig,
    GenerateConfig,
    LoggerConfig,
    LoRAConfig,
    OptimConfig,
    SRConfig,
    StrategyConfig,
    TeacherConfig,
    TrainerConfig,
    VAEDistillConfig,
    narrow,
    register_configs,
)
from magi_train.models.dit import DiTConfig

register_configs()
log = logging.getLogger("magi_train")
PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = str(PACKAGE.parent / "configs")
TASKS = ("pretrain", "pretrain_sr", "dmd2", "vae_distill", "generate", "evaluate")


def compose(overrides: list[str]) -> DictConfig:
    """The root config of `python -m magi_train <overrides>` (inside a Hydra app or outside one, as in tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def ensure_teacher(teacher: TeacherConfig) -> None:
    """Train the DMD-2 teacher first when its checkpoint is missing and the config says how (the smoke teacher)."""
    if not teacher.checkpoint or Path(teacher.checkpoint).exists() or not teacher.train_overrides:
        return
    command = " ".join(["python -m magi_train", *teacher.train_overrides])
    log.info(
        "distill.teacher.checkpoint=%s does not exist: training it first (%s)", teacher.checkpoint, command
    )
    run(compose(list(teacher.train_overrides)))
    if not Path(teacher.checkpoint).exists():
        raise ValueError(
            f"distill.teacher.train_overrides ran `{command}` but it wrote no {teacher.checkpoint}: make the "
            "overrides' run directory the teacher checkpoint's (run_dir=<dir> for <dir>/checkpoints/last.ckpt)"
        )


def run(cfg: DictConfig) -> Any:
    """Run the recipe's task on a composed config (tests call this directly)."""
    if cfg.task not in TASKS:
        raise ValueError(f"recipe {cfg.recipe!r} names task {cfg.task!r}; known tasks: {list(TASKS)}")
    # heavy imports after Hydra has parsed the command line
    if cfg.task == "generate":
        from magi_train.inference.generate import run_generate

        return run_generate(narrow(cfg.generate, GenerateConfig), dry_run=cfg.dry_run)
    if cfg.task == "evaluate":
        from magi_train.eval.runner import run_evaluate

        gen, ev = narrow(cfg.generate, GenerateConfig), narrow(cfg.eval, EvalConfig)
        return run_evaluate(ev, gen, cfg.run_dir, dry_run=cfg.dry_run)

    from magi_train.eval.callback import eval_callbacks
    from magi_train.training.run import RunContext, TrainerNodes, run_distill, run_pretrain

    ctx = RunContext(
        run_dir=Path(cfg.run_dir), seed=cfg.seed, resolved=OmegaConf.to_container(cfg, resolve=True),
        dry_run=cfg.dry_run, resume=cfg.resume, ckpt_path=cfg.ckpt_path,
        plan_tokens=OmegaConf.select(cfg, "data.max_tokens", default=None, throw_on_missing=False),
    )  # fmt: skip
    nodes = TrainerNodes(
        narrow(cfg.trainer, TrainerConfig),
        narrow(cfg.strategy, StrategyConfig),
        narrow(cfg.logger, LoggerConfig),
    )
    if cfg.task == "vae_distill":  # recipe distill_vae: a TurboVAED from the Wan2.2 decoder (no DiT)
        from magi_train.training.run_vae import run_vae_distill

        data = None if cfg.dry_run else narrow(cfg.data, DataConfig)
        return run_vae_distill(
            ctx, nodes, data, narrow(cfg.vae_distill, VAEDistillConfig), narrow(cfg.optim, OptimConfig),
            narrow(cfg.ema, EMAConfig),
        )  # fmt: skip
    model = narrow(cfg.model, DiTConfig)
    lora = narrow(cfg.lora, LoRAConfig) if cfg.lora is not None else None
    data = None if cfg.dry_run else narrow(cfg.data, DataConfig)  # a dry run reads no data (it may be unset)
    callbacks = []
    if cfg.eval.every_n_steps > 0 and not cfg.dry_run:
        if cfg.task == "pretrain_sr":
            raise ValueError(
                "eval.every_n_steps samples a base model; the SR model needs a base model's output to upsample: "
                "evaluate SR checkpoints with recipe=evaluate (generate.sr_ckpt) instead"
            )
        callbacks = eval_callbacks(
            narrow(cfg.eval, EvalConfig), narrow(cfg.generate, GenerateConfig), cfg.run_dir
        )
    if cfg.task == "dmd2":
        distill = narrow(cfg.distill, DistillConfig)
        if not cfg.dry_run:
            ensure_teacher(distill.teacher)
        codecs = narrow(cfg.generate, GenerateConfig)  # its decoders turn validation samples into mp4s
        return run_distill(ctx, nodes, model, data, distill, callbacks=callbacks, lora=lora, codecs=codecs)
    sr = narrow(cfg.sr, SRConfig) if cfg.task == "pretrain_sr" else None
    return run_pretrain(
        ctx, nodes, model, data, narrow(cfg.flow, FlowConfig), narrow(cfg.optim, OptimConfig),
        narrow(cfg.ema, EMAConfig), sr=sr, init_from=cfg.init_from, callbacks=callbacks, lora=lora,
    )  # fmt: skip


def raised_by_us(err: BaseException) -> bool:
    """Whether magi_train code raised `err`: our ValueErrors are messages for users (STYLE.md 14: `assert` guards
    internal invariants), while one raised inside a library is a bug to show with its traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from magi_train.tasks.guard import NonFiniteTrainingError
    from magi_train.training.progress import route_lightning_logging

    route_lightning_logging()  # after Hydra set up its log handlers: one line per record
    try:
        run(cfg)
    except (
        MisconfigurationException
    ) as err:  # Lightning's word on trainer.* values (devices, accelerator, ...)
        print(f"error: the trainer.* settings: {err}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, NonFiniteTrainingError) as err:
        if not raised_by_us(err):
            raise
        log.debug("user error", exc_info=err)  # its traceback, with hydra.verbose=magi_train
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)  # a SystemExit passes through Hydra's handler, which would print the traceback


if __name__ == "__main__":
    main()
