"""Lightning strategies from `configs/strategy/`: DDP, FSDP per TransformerLayer, DeepSpeed ZeRO-2/3 (+ offload).

The DiT keeps small fp32 islands (adapter, heads, RoPE bands, norms; see models/dit.py), so mixed precision
must autocast the compute and never cast the parameters: Lightning's defaults for FSDP (bf16 parameters and
buffers) and DeepSpeed (`bf16.enabled`, the whole module cast to bf16) would break them. Here FSDP keeps
fp32 parameters and autocasts, and DeepSpeed runs its `torch_autocast` mode (fp32 parameters, bf16 compute
and bf16 gradient communication for the block linears).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import nn

from magi_train.config import StrategyConfig
from magi_train.models.dit import ModalityLinear, TransformerLayer
from magi_train.training.checkpoint_io import MarkedDirectoryCheckpoints

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
# Strategies whose parameters or optimizer states are split across ranks: their checkpoints are directories
# of per-rank shards (FSDP with state_dict_type=full: one file) that `python -m magi_train.tools.consolidate`
# turns into one state dict.
SHARDED = ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
FSDP_STATE_DICT = ("sharded", "full")


def strategy_applies_activation_checkpointing(name: str) -> bool:
    """FSDP wraps checkpointing itself, after sharding (Lightning requires that order for FSDP1)."""
    return name == "fsdp"


def build_strategy(
    cfg: StrategyConfig, precision: str = "32-true", activation_checkpointing: bool = False
) -> str | Strategy:
    """The Lightning strategy for `cfg`; `precision` is the resolved trainer precision (e.g. bf16-mixed)."""
    name = cfg.name
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r}: use one of {', '.join(STRATEGIES)} (configs/strategy/)")
    if cfg.offload and name not in SHARDED:
        raise ValueError(
            f"strategy.offload=true needs a sharded strategy (fsdp, deepspeed_stage_2, deepspeed_stage_3), "
            f"not {name}"
        )
    options = dict(cfg.options)
    if name == "auto":
        if options:
            raise ValueError(f"strategy={name} takes no options, got {sorted(options)}")
        return name
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters, **options)
    if name == "fsdp":
        return _fsdp(cfg, precision, activation_checkpointing, options)
    return _deepspeed(cfg, int(name[-1]), precision, options)


# ---------------------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------------------


def _fsdp_classes():
    """FSDPStrategy / FSDPPrecision subclasses, built lazily (FSDP imports are slow)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    class ClippingFSDPPrecision(FSDPPrecision):
        """Lightning's FSDP precision, plus gradient clipping by global norm through the root FSDP module.

        Lightning refuses norm clipping under FSDP because `torch.nn.utils.clip_grad_norm_` would see only the
        local shards; FSDP's own `clip_grad_norm_` all-reduces the shard norms (torch FSDP docs).
        """

        root: nn.Module | None = None

        def clip_grad_by_norm(self, optimizer, clip_val: float | int) -> None:
            if self.root is None:
                raise RuntimeError("FSDP gradient clipping before the model was wrapped")
            self.root.clip_grad_norm_(clip_val)

    class MagiFSDPStrategy(MarkedDirectoryCheckpoints, FSDPStrategy):
        """FSDPStrategy that hands the wrapped root module to ClippingFSDPPrecision; sharded checkpoint
        directories get a completion marker (training/checkpoint_io.py)."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            model = super()._setup_model(model)
            if isinstance(self.precision_plugin, ClippingFSDPPrecision):
                self.precision_plugin.root = model
            return model

    return MagiFSDPStrategy, ClippingFSDPPrecision


def _fsdp(cfg: StrategyConfig, precision: str, activation_checkpointing: bool, options: dict[str, Any]):
    from torch.distributed.fsdp import MixedPrecision

    if cfg.sharding_strategy not in FSDP_SHARDING:
        raise ValueError(f"strategy.sharding_strategy={cfg.sharding_strategy!r}: use one of {FSDP_SHARDING}")
    if cfg.state_dict_type not in FSDP_STATE_DICT:
        raise ValueError(f"strategy.state_dict_type={cfg.state_dict_type!r}: use one of {FSDP_STATE_DICT}")
    strategy_cls, precision_cls = _fsdp_classes()
    kwargs: dict[str, Any] = dict(
        auto_wrap_policy={TransformerLayer},  # one FSDP unit per layer: all-gather one layer at a time
        sharding_strategy=cfg.sharding_strategy,
        state_dict_type=cfg.state_dict_type,
        cpu_offload=cfg.offload,
        limit_all_gathers=True,
        precision_plugin=precision_cls(precision),
    )
    if "mixed" in precision:
        # fp32 parameters, gradients reduced in fp32, fp32 buffers (RoPE bands); the precision plugin autocasts.
        fp32 = torch.float32
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=fp32, reduce_dtype=fp32, buffer_dtype=fp32)
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = {TransformerLayer}
    kwargs.update(options)
    return strategy_cls(**kwargs)


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
