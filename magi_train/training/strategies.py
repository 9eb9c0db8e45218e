"""Lightning strategies from `configs/strategy/`: DDP, FSDP2 with context parallelism (`fsdp2`), DeepSpeed ZeRO-2/3.

`fsdp2` is Lightning's ModelParallelStrategy with our (dp_replicate, dp_shard, cp) mesh: every task shards its own
roles in `configure_model` with `models/parallelize.py parallelize` (FSDP2 `fully_shard` per TransformerLayer, Ulysses
over `cp`), builds them on the meta device and fills each rank's shards from the weight source. Checkpoints are
torch.distributed.checkpoint directories (model, optimizers, EMA; `meta.pt` holds the loops, data position and every
rank's RNG state). FSDP1 (`FSDPStrategy`) is retired: it cannot wrap a unit that mixes the bf16 linears and fp32 norms
of the released model, and it refuses CPU processes, so it could never be tested here; `strategy=fsdp` selects fsdp2.

The DiT keeps small fp32 islands (adapter, heads, RoPE bands, norms; see models/dit.py), so mixed precision must
autocast the compute and never cast those parameters: FSDP2 gets one MixedPrecisionPolicy per group
(models/parallelize.py) and runs under Lightning's bf16 autocast; DeepSpeed runs its `torch_autocast` mode (fp32
parameters, bf16 compute and bf16 gradient communication for the block linears).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import Strategy

from magi_train.config import StrategyConfig
from magi_train.models.dit import ModalityLinear
from magi_train.models.parallelize import ParallelConfig, build_mesh, data_parallel_rank
from magi_train.models.tread import TreadConfig
from magi_train.training.checkpoint_io import MarkedDirectoryCheckpoints

STRATEGIES = ("auto", "ddp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")
# Strategies whose parameters or optimizer states are split across ranks: their checkpoints are directories
# of per-rank shards that `python -m magi_train.tools.consolidate` turns into one state dict.
SHARDED = ("fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")


def parallel_config(
    strategy: StrategyConfig,
    precision: str,
    activation_checkpointing: bool | str,
    ac_every: int,
    compile: bool,
    tread: TreadConfig | None = None,
) -> ParallelConfig:
    """What `parallelize` applies to each trained role under this strategy and precision (activation_checkpointing:
    parallelize.AC_MODES or a bool; tread: the checked `model.tread` of models/tread.py, None = off)."""
    return ParallelConfig(
        activation_checkpointing=activation_checkpointing,
        ac_every=ac_every,
        compile=compile,
        tread=tread,
        param_dtype="bf16" if precision == "bf16-mixed" and strategy.name == "fsdp2" else "fp32",
        reshard_after_forward=strategy.reshard_after_forward,
        offload=strategy.offload and strategy.name == "fsdp2",
    )


def build_strategy(cfg: StrategyConfig, precision: str = "32-true") -> str | Strategy:
    """The Lightning strategy for `cfg`; `precision` is the resolved trainer precision (e.g. bf16-mixed)."""
    name = cfg.name
    if name == "fsdp":
        raise ValueError("strategy.name=fsdp (FSDP1) is retired: use strategy=fsdp2 (docs/scale.md)")
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r}: use one of {', '.join(STRATEGIES)} (configs/strategy/)")
    if cfg.offload and name not in SHARDED:
        raise ValueError(
            f"strategy.offload=true needs a sharded strategy (fsdp2, deepspeed_stage_2, deepspeed_stage_3), "
            f"not {name}"
        )
    if (cfg.cp > 1 or cfg.dp_replicate > 1) and name != "fsdp2":
        raise ValueError(
            f"strategy.cp={cfg.cp} / strategy.dp_replicate={cfg.dp_replicate} need strategy=fsdp2, not {name}"
        )
    options = dict(cfg.options)
    if name == "auto":
        if options:
            raise ValueError(f"strategy={name} takes no options, got {sorted(options)}")
        return name
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters, **options)
    if name == "fsdp2":
        return _fsdp2_class()(dp_replicate=cfg.dp_replicate, cp=cfg.cp, **options)
    return _deepspeed(cfg, int(name[-1]), precision, options)


def strategy_mesh(strategy: Any):
    """The (dp_replicate, dp_shard, cp) mesh of an fsdp2 strategy, None for every other strategy."""
    return getattr(strategy, "magi_mesh", None)


def strategy_data_rank(strategy: Any) -> tuple[int, int]:
    """(rank, size) among the processes that read different samples: cp ranks of one group read the same."""
    mesh = strategy_mesh(strategy)
    if mesh is not None:
        return data_parallel_rank(mesh)
    return getattr(strategy, "global_rank", 0), getattr(strategy, "world_size", 1)


# ---------------------------------------------------------------------------------------------------------
# FSDP2 + context parallel
# ---------------------------------------------------------------------------------------------------------


def _fsdp2_class():
    """ModelParallelStrategy subclass with our mesh, built lazily (its imports are slow)."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.strategies.parallel import ParallelStrategy

    class MagiFSDP2Strategy(MarkedDirectoryCheckpoints, ModelParallelStrategy):
        """Lightning's ModelParallelStrategy (FSDP2 applied by the module's configure_model, DCP checkpoints) on the
        (dp_replicate, dp_shard, cp) mesh of models/parallelize.py; checkpoint directories get a completion marker
        (training/checkpoint_io.py). The mesh is the LightningModule's `device_mesh`."""

        def __init__(self, dp_replicate: int = 1, cp: int = 1, **kwargs: Any):
            super().__init__(**kwargs)
            self.dp_replicate, self.cp = dp_replicate, cp
            self.magi_mesh = None

        def setup_environment(self) -> None:
            ParallelStrategy.setup_environment(self)
            self._setup_distributed()
            self.magi_mesh = build_mesh(self.root_device.type, self.world_size, self.dp_replicate, self.cp)
            self._device_mesh = self.magi_mesh
            self.lightning_module._device_mesh = self.magi_mesh

        @property
        def distributed_sampler_kwargs(self) -> dict[str, Any]:
            rank, size = data_parallel_rank(self.magi_mesh)
            return {"num_replicas": size, "rank": rank}

        def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
            """Lightning's sharded load, except that the module's `checkpoint_skips` prefixes (a frozen teacher loaded
            from its own source) need not be in the checkpoint, and meta.pt is read with weights_only=True."""
            return load_sharded_checkpoint(self, Path(self.broadcast(str(checkpoint_path))))

    return MagiFSDP2Strategy


def load_sharded_checkpoint(strategy: Any, path: Path) -> dict[str, Any]:
    """Fill the (sharded) module and its optimizers from a DCP checkpoint directory; returns the rest (meta.pt)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is not a sharded (fsdp2) checkpoint directory: resume it with its own strategy"
        )
    module = strategy.lightning_module
    skip = getattr(module, "checkpoint_skip", None)  # a predicate on keys (LoRA: everything but the adapters)
    if skip is None:
        prefixes = tuple(getattr(module, "checkpoint_skips", ())) or ("\0",)
        skip = lambda key: key.startswith(prefixes)  # noqa: E731
    full = get_model_state_dict(module)
    model_state = {k: v for k, v in full.items() if not skip(k)}
    state = {"state_dict": model_state}
    dcp.load(state, checkpoint_id=path)
    strict = len(model_state) == len(full)
    set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
    for idx, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key])
    return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------


def deepspeed_autocast_config(precision: str) -> dict[str, Any] | None:
    """DeepSpeed `torch_autocast` section for bf16-mixed (None for full precision)."""
    if precision != "bf16-mixed":
        return None
    linear = f"{ModalityLinear.__module__}.{ModalityLinear.__qualname__}"
    return {
        "enabled": True,
        "dtype": "bfloat16",
        # gradients of these modules are communicated in the low precision; the fp32 adapter and heads
        # (plain nn.Linear) keep fp32 communication
        "lower_precision_safe_modules": [linear],
    }


def unhook_packed_outputs(engine) -> int:
    """Remove ZeRO-3's module hooks from the DiT root; returns how many were removed.

    ZeRO-3 records the order in which modules run (forward and backward) and requires it to be identical
    on every rank and step. It attaches a backward hook to every tensor a module returns, and the DiT
    returns one velocity tensor per packed clip: the number of clips varies per batch and rank, so the
    recorded orders disagree ("disagreement on list length between rank0 and rank1"). The DiT root owns no
    parameters (all live in its submodules, which keep their hooks), so it needs no fetch of its own.
    """
    from magi_train.models.dit import DiT

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return 0
    roots = [m for m in engine.module.modules() if isinstance(m, DiT)]
    assert all(not list(m.parameters(recurse=False)) for m in roots), "the DiT root must own no parameters"
    dicts = [id(d) for m in roots for d in (m._forward_hooks, m._forward_pre_hooks)]
    removed = 0
    for hooks in (offload.forward_hooks, offload.backward_hooks):
        for handle in list(hooks):
            ref = handle.hooks_dict_ref()
            if ref is not None and id(ref) in dicts:
                handle.remove()
                hooks.remove(handle)
                removed += 1
    return removed


def _deepspeed_class():
    """DeepSpeedStrategy subclass, built on first use (deepspeed imports are slow; tests swap the base)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class MagiDeepSpeedStrategy(MarkedDirectoryCheckpoints, DeepSpeedStrategy):
        """DeepSpeedStrategy whose ZeRO-3 engine does not trace the DiT root (see unhook_packed_outputs) and whose
        checkpoint directories get a completion marker (training/checkpoint_io.py)."""

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            engine, ds_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
            if self.zero_stage_3:
                unhook_packed_outputs(engine)
            return engine, ds_optimizer

    return MagiDeepSpeedStrategy


def _deepspeed(cfg: StrategyConfig, stage: int, precision: str, options: dict[str, Any]):
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"strategy=deepspeed_stage_{stage} needs DeepSpeed: pip install 'magi_train[distributed]'"
        )
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    if precision not in ("bf16-mixed", "32-true"):
        raise ValueError(
            f"trainer.precision={precision} with DeepSpeed: use bf16-mixed (DeepSpeed torch_autocast) or "
            "32-true (*-true casts the whole DiT, including its fp32 adapter and heads; DeepSpeed's fp16 "
            "autocast has no loss scaling under ZeRO)"
        )
    autocast = deepspeed_autocast_config(precision)
    kwargs: dict[str, Any] = dict(
        stage=stage,
        offload_optimizer=cfg.offload,
        offload_parameters=cfg.offload and stage == 3,
        logging_batch_size_per_gpu=1,  # packed batches have no fixed batch size; only used for DS logging
        # Mixed precision is DeepSpeed's autocast, so Lightning must neither cast the module nor the inputs.
        precision_plugin=DeepSpeedPrecision("32-true" if autocast else precision),
    )
    kwargs.update(options)
    strategy = _deepspeed_class()(**kwargs)
    if autocast:
        strategy.config["torch_autocast"] = autocast
    if cfg.offload:
        # ZeRO-Offload runs the optimizer step on CPU. DeepSpeed insists on its compiled CPUAdam unless told
        # otherwise; torch's AdamW (our optimizer) runs there too, slower but with no C++ extension to build.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy
