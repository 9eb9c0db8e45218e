"""Apply activation checkpointing and torch.compile to an unchanged DiT from outside (torchtitan order).

Sharding (FSDP / DeepSpeed) is applied by the Lightning strategy; this file only wraps layers, and the
wrappers keep the released state-dict key names (checkpoint_wrapper strips its own prefix).
"""

from __future__ import annotations

import functools

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from magi_train.models.dit import DiT, TransformerLayer


def parallelize(model: DiT, activation_checkpointing: bool = False, compile: bool = False) -> DiT:
    """Wrap each TransformerLayer with non-reentrant activation checkpointing, then compile each layer."""
    if activation_checkpointing:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(
                checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
            ),
            check_fn=lambda m: isinstance(m, TransformerLayer),
        )
    if compile:
        for layer in model.block.layers:
            layer.compile(dynamic=True)  # in place: state-dict keys unchanged (no `_orig_mod.`)
    return model
