"""One run skeleton for every training recipe: pretrain_base and pretrain_sr (flow matching), dmd2_distill (DMD-2).

Each runner gets narrow, typed config nodes from `magi_train.__main__` (never the root config), builds its model(s),
task and data, and hands them to `fit`: run directory, seed, config.yaml, resume checkpoint, Trainer.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from magi_train.config import (
    DataConfig,
    DistillConfig,
    EMAConfig,
    FlowConfig,
    GenerateConfig,
    LoggerConfig,
    OptimConfig,
    SRConfig,
    StrategyConfig,
    TrainerConfig,
)
from magi_train.data.datamodule import ClipDataModule
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.lora import LoRAConfig, adapter_parameters, add_adapters
from magi_train.models.parallelize import ParallelConfig, ac_mode
from magi_train.models.tread import tread_config
from magi_train.models.weights import apply_dtype_policy, check_source, dcp_keys, empty_dit, load_dit
from magi_train.tasks.dmd2 import DMD2Task, validate_distill
from magi_train.tasks.ema import StudentEMA
from magi_train.tasks.pretrain import PretrainTask
from magi_train.tasks.sharding import RoleSetup
from magi_train.tasks.super_resolution import SuperResolutionTask
from magi_train.training.data_report import DataReport
from magi_train.training.resume import find_resume_checkpoint
from magi_train.training.strategies import parallel_config
from magi_train.training.trainer import (
    build_trainer,
    destroy_process_group_at_exit,
    finish_wandb,
    resolve_precision,
)
from magi_train.utils.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every training run needs besides its config groups (the root's own keys, narrowed by __main__)."""

    run_dir: Path
    seed: int
    resolved: dict[str, Any]  # the root config, written to config.yaml and stored in every checkpoint
    dry_run: bool = False
    resume: bool = False
    ckpt_path: str | None = None
    plan_tokens: int | None = (
        None  # tokens per micro-batch for the memory plan (data.max_tokens); None: 256p 5 s
    )


@dataclass
class TrainerNodes:
    """The config nodes of the Lightning Trainer."""

    trainer: TrainerConfig
    strategy: StrategyConfig
    logger: LoggerConfig


def start_run(ctx: RunContext, nodes: TrainerNodes) -> str | None:
    """Create the run directory, write config.yaml, seed every RNG; returns the checkpoint to resume from."""
    ckpt_path = find_resume_checkpoint(ctx.run_dir, ctx.ckpt_path, ctx.resume, nodes.trainer.slurm_requeue)
    try:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ctx.run_dir / "config.yaml", yaml.safe_dump(ctx.resolved, sort_keys=False))
    except OSError as err:
        raise ValueError(
            f"cannot write the run directory {ctx.run_dir} ({err.strerror}): pass hydra.run.dir=<a writable directory>"
        ) from err
    L.seed_everything(ctx.seed, workers=True)
    return ckpt_path


def _holds_teacher(ckpt_path: str | None) -> bool:
    if ckpt_path is None:
        return False
    if Path(ckpt_path).is_dir():  # fsdp2 / DeepSpeed directory
        return (Path(ckpt_path) / ".metadata").is_file() and any(
            k.startswith("state_dict.teacher.") for k in dcp_keys(Path(ckpt_path))
        )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return any(k.startswith("teacher.") for k in ckpt.get("state_dict", {}))


def sharded(strategy: StrategyConfig) -> bool:
    """strategy=fsdp2: roles are built on the meta device and each rank fills its own shards (tasks/sharding.py)."""
    return strategy.name == "fsdp2"


def memory_plan(
    ctx: RunContext, nodes: TrainerNodes, model_cfg: DiTConfig, recipe: str, ac: bool, ema: bool,
    teacher_dtype: str = "bf16", lora_rank: int | None = None, base_dtype: str = "bf16",
):  # fmt: skip
    """(PlanSpec, its PlanRow for this run's GPU count) of training/memory.py; lora_rank / base_dtype: LoRA on a
    frozen base (DMD-2: one base shared by the roles)."""
    from magi_train.training.memory import PlanSpec, clip_tokens, plan

    devices = nodes.trainer.devices
    gpus = devices * nodes.trainer.num_nodes if isinstance(devices, int) and devices > 0 else 8
    strategy = "fsdp2" if sharded(nodes.strategy) else "ddp"
    spec = PlanSpec(
        recipe=recipe, strategy=strategy, cp=nodes.strategy.cp, tokens=ctx.plan_tokens or clip_tokens(448, 256, 5),
        activation_checkpointing=ac, ac_every=model_cfg.ac_every, teacher_dtype=teacher_dtype, ema=ema,
        gpus=(gpus,), lora_rank=lora_rank, base_dtype=base_dtype,
    )  # fmt: skip
    return spec, plan(model_cfg, spec)[0]


def print_plan(spec, row) -> None:
    from magi_train.training.memory import format_plan

    print(
        f"memory plan ({spec.recipe}, {spec.strategy}, cp {spec.cp}, {spec.tokens:,} tokens per micro-batch, "
        f"activation checkpointing {spec.activation_checkpointing}"
        + (f", LoRA rank {spec.lora_rank} on a {spec.base_dtype} frozen base" if spec.lora_rank else "")
        + "; GiB per GPU, python -m magi_train.tools.plan):"
    )
    print(format_plan([row]))


def check_memory(spec, row) -> None:
    """On GPUs: stop before building anything when the plan does not fit the device (training/memory.py)."""
    if not torch.cuda.is_available():
        return
    from magi_train.training.memory import GIB, check_plan

    check_plan(row, torch.cuda.get_device_properties(0).total_memory / GIB, spec)


def _parallel(
    nodes: TrainerNodes, model_cfg: DiTConfig, activation_checkpointing: bool | str, trained: bool = True
) -> ParallelConfig:
    """trained: the role trains (TREAD routing applies; a frozen teacher gets none)."""
    precision = resolve_precision(nodes.trainer.precision)
    tread = tread_config(model_cfg.tread, model_cfg.num_layers) if trained else None
    return parallel_config(
        nodes.strategy, precision, activation_checkpointing, model_cfg.ac_every, model_cfg.compile, tread
    )


def fit(
    ctx: RunContext,
    nodes: TrainerNodes,
    task: L.LightningModule,
    datamodule: L.LightningDataModule,
    callbacks: list[Callback],
    ckpt_path: str | None,
    **trainer_options: Any,
) -> dict[str, Any]:
    """Build the Trainer (training/trainer.py build_trainer) and train `task`; returns the final step and run_dir."""
    callbacks = [*callbacks, DataReport(ctx.run_dir)]  # skip counts per reason -> metrics, data_report.json
    trainer = build_trainer(
        nodes.trainer,
        nodes.strategy,
        nodes.logger,
        ctx.run_dir,
        callbacks,
        resolved=ctx.resolved,
        **trainer_options,
    )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        finish_wandb(trainer, exit_code=1)
        raise
    finally:
        destroy_process_group_at_exit()  # the strategy's setup made the group
    finish_wandb(trainer, exit_code=0)
    return {"global_step": trainer.global_step, "run_dir": str(ctx.run_dir)}


# ---------------------------------------------------------------------------------------------------------
# pretraining: the base DiT (task pretrain) and the latent SR DiT (task pretrain_sr)
# ---------------------------------------------------------------------------------------------------------


def run_pretrain(
    ctx: RunContext,
    nodes: TrainerNodes,
    model_cfg: DiTConfig,
    data: DataConfig | None,
    flow: FlowConfig,
    optim: OptimConfig,
    ema: EMAConfig,
    *,
    sr: SRConfig | None = None,
    init_from: str | None = None,
    callbacks: list[Callback] | None = None,
    datamodule: L.LightningDataModule | None = None,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """Train the base DiT (sr None) or the latent SR DiT by flow matching. datamodule: instead of the clip shards
    of `data` (any LightningDataModule yielding ClipBatch; `data` still gives text_dim). lora: train adapters on
    the frozen base of `init_from` instead (models/lora.py); checkpoints then hold the adapters only."""
    model_cfg.validate()
    recipe = "pretrain_sr" if sr is not None else "pretrain_base"
    lora_rank = lora.rank if lora is not None else None
    spec, row = memory_plan(
        ctx, nodes, model_cfg, recipe, model_cfg.activation_checkpointing, ema.decay > 0, lora_rank=lora_rank
    )
    if ctx.dry_run:
        with torch.device("meta"):
            n = DiT(model_cfg).num_parameters()
        print(f"parameters: {n:,}")
        print_plan(spec, row)
        return {"parameters": n, "plan_gib": row.total}

    assert data is not None, "only a dry run goes without data"
    check_memory(spec, row)
    ckpt_path = start_run(ctx, nodes)
    datamodule = datamodule or ClipDataModule(data)
    # a resumed run takes its weights from the checkpoint; with LoRA only the adapters are there, the base is re-read
    source = init_from if ckpt_path is None or lora is not None else None
    if lora is not None and not init_from:
        raise ValueError(
            "lora trains adapters on a pretrained base: set init_from=<released directory or .ckpt> (e.g. the "
            "README's smoke run, outputs/smoke/checkpoints/last.ckpt)"
        )
    # LoRA under bf16-mixed: the frozen base keeps its block linears in bf16 (as released); fp32 otherwise
    bf16 = resolve_precision(nodes.trainer.precision) == "bf16-mixed"
    policy = "base" if lora is not None and bf16 else "fp32"
    setup = RoleSetup(
        _parallel(nodes, model_cfg, model_cfg.activation_checkpointing), what="init_from", dtype_policy=policy
    )
    sharded_ema = None
    if sharded(nodes.strategy):  # built on meta; each rank fills its shards in configure_model
        with torch.device("meta"):
            model = DiT(model_cfg)
        setup.source = source
        if ema.decay > 0 and ema.on_cpu:
            raise ValueError("ema.on_cpu=true is not supported with strategy=fsdp2 (the EMA is sharded)")
    elif source:
        model = load_dit(source, model_cfg, what="init_from", dtype_policy=policy).model
    else:
        model = DiT(model_cfg)
    if lora is not None:  # before parallelize; on the meta device they are initialised in configure_model
        add_adapters(model, lora, seed=ctx.seed)
    if ema.decay > 0 and (sharded(nodes.strategy) or lora is not None):
        sharded_ema, ema = (ema.decay, ema.start_step), None  # on the local shards / of the adapters only
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {model.num_parameters():,} ({trained:,} trained)")
    common = dict(
        flow_cfg=flow,
        optim_cfg=optim,
        max_steps=nodes.trainer.max_steps,
        text_dim=data.text_dim,
        seed=ctx.seed,
        max_nonfinite_steps=nodes.trainer.max_nonfinite_steps,
        setup=setup,
        sharded_ema=sharded_ema,
    )
    if sr is not None:
        task = SuperResolutionTask(
            model,
            sr_alpha=sr.alpha,
            sr_audio_noise=sr.audio_noise_scale,
            sr_factor=sr.lowres_factor,
            **common,
        )
    else:
        task = PretrainTask(model, **common)
    return fit(
        ctx, nodes, task, datamodule, list(callbacks or []), ckpt_path, grad_clip=optim.grad_clip, ema=ema,
        validate=bool(data.val_shards),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# DMD-2: teacher, critic and student from their checkpoints
# ---------------------------------------------------------------------------------------------------------


class DistillDataModule(ClipDataModule):
    """Clip shards for distillation; the resume position counts the task's own gradient accumulation."""

    def __init__(self, cfg: DataConfig, accumulate: int = 1):
        super().__init__(cfg)
        self.accumulate = accumulate

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"consumed": self.trainer.global_step * self.accumulate}


def build_roles(
    model_cfg: DiTConfig,
    cfg: DistillConfig,
    load_teacher: bool = True,
    load_trainable: bool = True,
    on_meta: bool = False,
) -> tuple[DiT, DiT, DiT]:
    """(teacher, critic, student). The critic and student copy the teacher unless given their own checkpoint.

    With load_* false the roles stay uninitialised: a resumed run fills them from its checkpoint. on_meta
    (strategy=fsdp2): every role is built on the meta device and filled shard by shard in configure_model from
    the sources of `role_setups`.
    """
    if on_meta:
        with torch.device("meta"):
            return DiT(model_cfg), DiT(model_cfg), DiT(model_cfg)
    if load_teacher:
        loaded = load_dit(cfg.teacher.checkpoint, model_cfg, what="distill.teacher.checkpoint")
        log.info("teacher: %s weights of %s", loaded.weights, cfg.teacher.checkpoint)
        teacher = loaded.model
    else:
        teacher = empty_dit(model_cfg)

    def trainable(name: str) -> DiT:
        role = getattr(cfg, name)
        if not load_trainable:
            return empty_dit(model_cfg)
        if role.checkpoint is None:
            return copy.deepcopy(teacher)  # before the teacher's bf16 cast: fp32 master weights
        loaded = load_dit(role.checkpoint, model_cfg, what=f"distill.{name}.checkpoint")
        log.info("%s: %s weights of %s", name, loaded.weights, role.checkpoint)
        return loaded.model

    critic, student = trainable("critic"), trainable("student")
    if cfg.teacher.dtype == "bf16":
        apply_dtype_policy(teacher, "base")  # block linears in bf16 as released; run under bf16 autocast
    return teacher, critic, student


def role_setups(
    nodes: TrainerNodes,
    model_cfg: DiTConfig,
    cfg: DistillConfig,
    load_teacher: bool = True,
    load_trainable: bool = True,
) -> dict[str, RoleSetup]:
    """How configure_model makes each role ready: checkpointing per role (never the teacher, no backward through
    it); under fsdp2 also the source each rank fills its shards from (critic and student: their own checkpoint or
    the teacher's) and the teacher's storage dtypes."""
    on_meta = sharded(nodes.strategy)
    teacher_src = cfg.teacher.checkpoint if on_meta and load_teacher else None

    def source(name: str) -> str | None:
        if not (on_meta and load_trainable):
            return None
        return getattr(cfg, name).checkpoint or cfg.teacher.checkpoint

    return {
        "teacher": RoleSetup(
            _parallel(nodes, model_cfg, False, trained=False), teacher_src, "auto",
            "base" if on_meta and cfg.teacher.dtype == "bf16" else "fp32", "distill.teacher.checkpoint",
        ),
        "critic": RoleSetup(
            _parallel(nodes, model_cfg, cfg.critic.activation_checkpointing), source("critic"),
            what="distill.critic.checkpoint",
        ),
        "student": RoleSetup(
            _parallel(nodes, model_cfg, cfg.student.activation_checkpointing), source("student"),
            what="distill.student.checkpoint",
        ),
    }  # fmt: skip


def run_distill(
    ctx: RunContext,
    nodes: TrainerNodes,
    model_cfg: DiTConfig,
    data: DataConfig | None,
    distill: DistillConfig,
    *,
    callbacks: list[Callback] | None = None,
    datamodule: L.LightningDataModule | None = None,
    lora: LoRAConfig | None = None,
    codecs: GenerateConfig | None = None,
) -> dict[str, Any]:
    """DMD-2 distillation of a pretrained DiT into a few-step CFG-free student (task dmd2). lora: critic and student
    are the teacher plus their own adapters (models/lora.py), on one shared frozen base if lora.shared_base.
    codecs: the generate.* node, whose decoders (when named) turn validation samples into mp4s (docs/dmd2.md).

    Manual optimisation: clipping, accumulation and the student's EMA are the task's and StudentEMA's, so the
    Trainer gets none of them (optim.* and ema.* of the root are not used).
    """
    model_cfg.validate()
    validate_distill(distill)
    from magi_train.training.memory import layer_activation_bytes

    # the plan counts one role's activations: the role that keeps more of them
    ac = max(
        (ac_mode(distill.student.activation_checkpointing), ac_mode(distill.critic.activation_checkpointing)),
        key=lambda mode: layer_activation_bytes(mode, model_cfg.ac_every),
    )
    shared_lora = (
        lora is not None and lora.shared_base
    )  # the planner's LoRA rows: one base for the three roles
    spec, row = memory_plan(
        ctx, nodes, model_cfg, "dmd2_distill", ac, distill.ema.decay > 0 and not distill.ema.on_cpu,
        distill.teacher.dtype, lora_rank=lora.rank if shared_lora else None,
    )  # fmt: skip
    if ctx.dry_run:
        from magi_train.training.memory import role_parameters

        counts = role_parameters(model_cfg)
        roles = (
            "one base for teacher, critic and student" if shared_lora else "teacher, critic and student each"
        )
        print(f"parameters per role: {counts.total:,} ({roles})")
        print_plan(spec, row)
        return {"parameters": counts.total, "plan_gib": row.total}
    assert data is not None, "only a dry run goes without data"
    check_memory(spec, row)

    if lora is not None and (distill.critic.checkpoint or distill.student.checkpoint):
        raise ValueError(
            "with lora the critic and student are the teacher plus zero-initialised adapters: unset "
            "distill.critic.checkpoint / distill.student.checkpoint"
        )
    ckpt_path = start_run(ctx, nodes)
    # LoRA checkpoints hold the adapters only: the base is re-read from the teacher's source
    holds_teacher = lora is None and _holds_teacher(ckpt_path)  # else loaded from its own checkpoint
    if not holds_teacher:
        check_source(distill.teacher.checkpoint, "distill.teacher.checkpoint")
    accumulate = nodes.trainer.accumulate_grad_batches
    datamodule = datamodule or DistillDataModule(data, accumulate)
    load_teacher, load_trainable = not holds_teacher, ckpt_path is None or lora is not None
    on_meta = sharded(nodes.strategy)
    base = None
    if lora is not None and lora.shared_base:  # one base: teacher = base, critic / student = base + adapter
        if on_meta:
            with torch.device("meta"):
                base = DiT(model_cfg)
        else:
            policy = "base" if distill.teacher.dtype == "bf16" else "fp32"  # bf16 block linears, read as such
            base = load_dit(
                distill.teacher.checkpoint, model_cfg, what="distill.teacher.checkpoint", dtype_policy=policy
            ).model
        add_adapters(base, lora, ("critic", "student"), seed=ctx.seed)
        teacher = critic = student = base  # the task makes them AdapterRoles of the base
    else:
        teacher, critic, student = build_roles(model_cfg, distill, load_teacher, load_trainable, on_meta)
        if lora is not None:  # three copies of the base (the reference of the shared one)
            add_adapters(critic, lora, ("critic",), seed=ctx.seed)
            add_adapters(student, lora, ("student",), seed=ctx.seed)
    setups = role_setups(nodes, model_cfg, distill, load_teacher, load_trainable)
    trained = (
        sum(p.numel() for p in adapter_parameters(student, "student")) if lora else student.num_parameters()
    )
    print(
        f"parameters: {student.num_parameters():,} per role (teacher {distill.teacher.dtype}, critic, student); "
        f"{trained:,} trained per role" + (", one shared base" if base is not None else "")
    )
    task = DMD2Task(
        teacher, critic, student, distill, text_dim=data.text_dim, seed=ctx.seed, accumulate=accumulate,
        sample_dir=str(ctx.run_dir / "samples"), max_nonfinite_steps=nodes.trainer.max_nonfinite_steps,
        setups=setups, sharded_ema=(distill.ema.decay, distill.ema.start_step) if on_meta and distill.ema.decay > 0
        else None, base=base, codecs=codecs,
    )  # fmt: skip
    ema = distill.ema
    if on_meta and ema.on_cpu and ema.decay > 0:
        raise ValueError("distill.ema.on_cpu=true is not supported with strategy=fsdp2 (the EMA is sharded)")
    own = [StudentEMA(ema.decay, ema.start_step, ema.on_cpu)] if ema.decay > 0 and not on_meta else []
    log.info("dmd2: trainer.max_steps counts iterations = critic updates")
    # expected here: the frozen teacher is in eval mode; checkpoints hold the post-update state of an iteration
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    return fit(
        ctx, nodes, task, datamodule, own + list(callbacks or []), ckpt_path, accumulate_grad_batches=1,
        validate=bool(data.val_shards),
    )  # fmt: skip
