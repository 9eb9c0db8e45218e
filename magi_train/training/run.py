"""The `dmd2` runner (recipe dmd2_distill): build teacher, critic and student from their checkpoints and train them."""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from magi_train.config import DataConfig, DistillConfig
from magi_train.data.datamodule import ClipDataModule
from magi_train.eval.callback import eval_callbacks
from magi_train.models.checkpoint import load_released, released_dtype
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.parallelize import parallelize
from magi_train.training.strategies import strategy_applies_activation_checkpointing
from magi_train.tasks.dmd2 import DMD2Task, StudentEMA, validate_distill
from magi_train.training.trainer import build_trainer, find_resume_checkpoint, to_dataclass
from magi_train.models.weights import load_state_strict, read_dit_state

log = logging.getLogger(__name__)

SMOKE_COMMAND = "python -m magi_train recipe=pretrain_base experiment=smoke hydra.run.dir=outputs/smoke"
_RUNTIME_FIELDS = ("activation_checkpointing", "compile", "attn_backend")  # do not change the weights


class DistillDataModule(ClipDataModule):
    """Clip shards for distillation; the resume position counts the task's own gradient accumulation."""

    def __init__(self, cfg: DataConfig, accumulate: int = 1):
        super().__init__(cfg)
        self.accumulate = accumulate

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"consumed": self.trainer.global_step * self.accumulate}


# ---------------------------------------------------------------------------------------------------------
# role weights
# ---------------------------------------------------------------------------------------------------------


def _missing(key: str, path: str | None) -> ValueError:
    return ValueError(
        f"{key}={path}: no such checkpoint file or released-format directory. Point it at a pretraining "
        f"checkpoint (<run_dir>/checkpoints/last.ckpt) or a released-format DiT directory; for the smoke "
        f"teacher (outputs/smoke/checkpoints/last.ckpt) run `{SMOKE_COMMAND}` first"
    )


def _check_architecture(saved: dict | None, cfg: DiTConfig, key: str, path: Path) -> None:
    """A clear error when a checkpoint was trained with another model config (its config travels with it)."""
    if not saved or not isinstance(saved.get("model"), dict):
        return
    diff = []
    for f in dataclasses.fields(DiTConfig):
        if f.name in _RUNTIME_FIELDS or f.name not in saved["model"]:
            continue
        ours, theirs = getattr(cfg, f.name), saved["model"][f.name]
        if (list(ours) if isinstance(ours, tuple | list) else ours) != theirs:
            diff.append(f"model.{f.name}: checkpoint {theirs!r}, this run {ours!r}")
    if diff:
        raise ValueError(f"{key}={path} was trained with another model config ({'; '.join(diff[:4])}); "
                         "select the same model (e.g. model=tiny for the smoke checkpoint)")


def load_role_weights(model: DiT, path: str | None, key: str) -> str:
    """Copy one role's weights into `model`; returns which weights were taken.

    Accepts a released-format directory (or .safetensors / index json), one of our pretraining checkpoints
    (`model.` weights; the EMA ones when it was trained with EMA, as Lightning saves them as `state_dict`) or
    a dmd2 checkpoint (its student, EMA when saved). Every key must match.
    """
    if not path:
        raise _missing(key, path)
    p = Path(path)
    if p.is_dir() or p.suffix in (".safetensors", ".json"):
        if not p.exists():
            raise _missing(key, path)
        load_released(model, p)
        return "released"
    if not p.is_file():
        raise _missing(key, path)
    state, saved, which = read_dit_state(p)
    _check_architecture(saved, model.cfg, key, p)
    load_state_strict(model, state, f"{key}={path}")
    return which


def _empty(cfg: DiTConfig) -> DiT:
    """A DiT with uninitialised CPU storage: every tensor is then loaded (strictly) from a checkpoint."""
    with torch.device("meta"):
        model = DiT(cfg)
    return model.to_empty(device="cpu")


def cast_teacher_bf16(model: DiT) -> DiT:
    """Store the block linears in bf16 as the released base checkpoint does (spec §2.10); norms, adapter and
    heads stay fp32. The teacher then runs under bf16 autocast (DiTScore)."""
    for name, param in model.named_parameters():
        if released_dtype(name, "base") == torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)
    return model


def build_roles(
    model_cfg: DiTConfig, cfg: DistillConfig, load_teacher: bool = True, load_trainable: bool = True,
    own_checkpointing: bool = True,
) -> tuple[DiT, DiT, DiT]:
    """(teacher, critic, student). The critic and student copy the teacher unless given their own checkpoint.

    With load_* false the roles stay uninitialised: a resumed run fills them from its checkpoint. With
    own_checkpointing false the strategy applies activation checkpointing (FSDP, from
    model.activation_checkpointing) and the per-role switches are not used.
    """
    teacher = _empty(model_cfg)
    if load_teacher:
        source = load_role_weights(teacher, cfg.teacher.checkpoint, "distill.teacher.checkpoint")
        log.info("teacher: %s weights of %s", source, cfg.teacher.checkpoint)

    def trainable(name: str) -> DiT:
        role = getattr(cfg, name)
        if not load_trainable:
            return _empty(model_cfg)
        if role.checkpoint is None:
            return copy.deepcopy(teacher)  # before the teacher's bf16 cast: fp32 master weights
        model = _empty(model_cfg)
        source = load_role_weights(model, role.checkpoint, f"distill.{name}.checkpoint")
        log.info("%s: %s weights of %s", name, source, role.checkpoint)
        return model

    critic, student = trainable("critic"), trainable("student")
    if cfg.teacher.dtype == "bf16":
        cast_teacher_bf16(teacher)
    teacher = parallelize(teacher, False, model_cfg.compile)  # no backward through it: no checkpointing
    critic = parallelize(critic, cfg.critic.activation_checkpointing and own_checkpointing, model_cfg.compile)
    student = parallelize(student, cfg.student.activation_checkpointing and own_checkpointing, model_cfg.compile)
    return teacher, critic, student


def _holds_teacher(ckpt_path: str) -> bool:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return any(k.startswith("teacher.") for k in ckpt.get("state_dict", {}))


def lightning_view(cfg: DictConfig) -> DictConfig:
    """The root config as `build_trainer` should see it for manual optimisation: per-role clipping and
    accumulation are done by the task, the student EMA by StudentEMA (never an EMA of all three roles)."""
    view = copy.deepcopy(cfg)
    OmegaConf.set_readonly(view, False)
    view.optim.grad_clip = 0.0
    view.optim.ema_decay = 0.0
    view.trainer.accumulate_grad_batches = 1
    return view


# ---------------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------------


def run_distill(cfg: DictConfig) -> dict[str, Any]:
    """DMD-2 distillation of a pretrained DiT into a few-step CFG-free student (task dmd2)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model_cfg: DiTConfig = to_dataclass(cfg.model, DiTConfig)
    model_cfg.validate()
    dcfg: DistillConfig = to_dataclass(cfg.distill, DistillConfig)
    validate_distill(dcfg)

    if cfg.dry_run:
        from magi_train.training.memory import format_table, memory_table, role_parameters

        counts = role_parameters(model_cfg)
        print(f"parameters per role: {counts.total:,} (teacher, critic and student each)")
        print(format_table(memory_table(counts, teacher_dtype=dcfg.teacher.dtype)))
        return {"parameters": counts.total}

    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    holds_teacher = ckpt_path is not None and _holds_teacher(ckpt_path)
    if not holds_teacher:
        p = Path(dcfg.teacher.checkpoint) if dcfg.teacher.checkpoint else None
        if p is None or not p.exists():
            raise _missing("distill.teacher.checkpoint", dcfg.teacher.checkpoint)
    L.seed_everything(cfg.seed, workers=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    accumulate = cfg.trainer.accumulate_grad_batches
    datamodule = DistillDataModule(to_dataclass(cfg.data, DataConfig), accumulate)
    # FSDP applies activation checkpointing itself, after wrapping (magi_train/training/strategies.py)
    own_ac = not strategy_applies_activation_checkpointing(cfg.strategy.name)
    teacher, critic, student = build_roles(model_cfg, dcfg, load_teacher=not holds_teacher,
                                           load_trainable=ckpt_path is None, own_checkpointing=own_ac)
    print(f"parameters: {student.num_parameters():,} per role (teacher {dcfg.teacher.dtype}, critic, student)")
    task = DMD2Task(teacher, critic, student, dcfg, text_dim=cfg.data.text_dim, seed=cfg.seed,
                    accumulate=accumulate, sample_dir=str(run_dir / "samples"))
    callbacks = [StudentEMA(dcfg.ema_decay, dcfg.ema_start_step, dcfg.ema_on_cpu)] if dcfg.ema_decay > 0 else []
    callbacks += eval_callbacks(cfg)  # eval.every_n_steps > 0: sample the student (8 steps, no CFG) and score it
    log.info("dmd2: optim.* is unused (each role has its own optimiser under distill.<role>); "
             "trainer.max_steps counts iterations = critic updates")
    # expected here: the frozen teacher is in eval mode; checkpoints hold the post-update state of an iteration
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    trainer = build_trainer(lightning_view(cfg), run_dir, callbacks, resolved)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"global_step": trainer.global_step, "run_dir": str(run_dir)}
