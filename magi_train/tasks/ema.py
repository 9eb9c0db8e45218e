"""Exponential moving averages of trained weights: of the pretraining DiT (Lightning's EMAWeightAveraging) and of
the DMD-2 student alone (not its teacher or critic)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import Tensor

EMA_KEY = "student_ema_state"  # where DMD2Task.on_load_checkpoint hands the saved EMA weights to StudentEMA


class EMA(EMAWeightAveraging):
    """Lightning's EMA, except that the live model keeps its raw weights when training ends.

    Lightning copies the average into the model in `on_train_end`, and ModelCheckpoint writes `last.ckpt` after
    that (checkpoint callbacks run last), so a run stopping between checkpoint steps would save the EMA weights
    as `current_model_state` and resume from them. Checkpoints already carry the EMA in `state_dict`.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class StudentEMA(Callback):
    """Exponential moving average of the student's weights (not teacher or critic), after each generator step.

    Until `start_step` iterations the average is a copy (Self-Forcing starts its EMA late, FastVideo builds it
    from trained weights). Validation runs with the EMA student. Checkpoints use Lightning's EMA layout:
    `state_dict` holds the EMA student and `current_model_state` the raw weights, so the `generate` loader
    picks the EMA student by default. Under sharded strategies the shadow is the rank's local shard.
    """

    def __init__(self, decay: float, start_step: int = 0, on_cpu: bool = False):
        self.decay, self.start_step, self.on_cpu = decay, start_step, on_cpu
        self.shadow: dict[str, Tensor] | None = None
        self._backup: dict[str, Tensor] | None = None

    def _device(self, pl_module: L.LightningModule) -> torch.device:
        return torch.device("cpu") if self.on_cpu else pl_module.device

    @staticmethod
    def _tracked(pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The student's weights that train: all of them, or its LoRA adapters only (models/lora.py)."""
        from magi_train.models.lora import is_adapter_key

        state = pl_module.student.state_dict()
        if any(is_adapter_key(k) for k in state):
            return {k: v for k, v in state.items() if is_adapter_key(k)}
        return state

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dev = self._device(pl_module)
        if self.shadow is None:
            self.shadow = {
                k: v.detach().to(dev, torch.float32, copy=True) for k, v in self._tracked(pl_module).items()
            }
        else:  # restored from a checkpoint
            self.shadow = {k: v.to(dev, torch.float32) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not pl_module.generator_stepped:
            return
        pl_module.generator_stepped = False
        for key, value in self._tracked(pl_module).items():
            target = self.shadow[key]
            if trainer.global_step <= self.start_step:
                target.copy_(value)
            else:
                target.lerp_(value.to(target.device, torch.float32), 1 - self.decay)

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow is None or trainer.sanity_checking:
            return
        state = self._tracked(pl_module)
        self._backup = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        for key, value in state.items():
            value.copy_(self.shadow[key])

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        for key, value in self._tracked(pl_module).items():
            value.copy_(self._backup[key])
        self._backup = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.shadow is None:
            return
        raw = checkpoint["state_dict"]
        checkpoint["current_model_state"] = raw
        checkpoint["state_dict"] = {**raw, **{f"student.{k}": v for k, v in self.shadow.items()}}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        ema = checkpoint.get(EMA_KEY)  # put there by DMD2Task.on_load_checkpoint
        if ema is not None:
            self.shadow = {k: v.detach().clone().float() for k, v in ema.items()}


class ShardedEMA(torch.nn.Module):
    """EMA of a module's parameters, held as this module's buffers under the same names (wrapper parts removed)
    and, under FSDP2, as the same DTensor shards: each rank averages only its own shards, and the average travels in
    the task's state dict (so in DCP checkpoints, sharded, and back exactly on resume).

    The caller decides when to update: pretraining as Lightning's EMAWeightAveraging (`update_as_lightning`), the
    DMD-2 student after each generator update (StudentEMA's schedule).
    """

    def __init__(self, decay: float, start_step: int = 0):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay}: use a value in (0, 1)")
        self.decay, self.start_step = decay, start_step
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._fsdp: list[torch.nn.Module] = []  # a plain list: not registered as submodules

    def attach(self, source: torch.nn.Module, keep=None) -> ShardedEMA:
        """Create the averages as fp32 copies of `source`'s parameters (call once the parameters are final); `keep`:
        a predicate on parameter names choosing which ones (e.g. one LoRA adapter's: models/lora.py), then no
        buffers."""
        from torch.distributed.fsdp import FSDPModule

        from magi_train.models.weights import strip_wrapper_parts

        self._fsdp = [m for m in source.modules() if isinstance(m, FSDPModule)]
        persistent = [(n, b) for n, b in source.named_buffers() if _is_persistent(source, n)]
        tensors = [*source.named_parameters(), *persistent]  # buffers (RoPE bands) are copied along
        if keep is not None:
            tensors = [(n, p) for n, p in source.named_parameters() if keep(n)]
        for name, param in tensors:
            owner = self
            *path, leaf = strip_wrapper_parts(name).split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            shadow = param.detach().to(torch.float32, copy=True)
            owner.register_buffer(leaf, shadow)
            self._pairs.append((param, shadow))
        return self

    @torch.no_grad()
    def update(self, copy: bool = False) -> None:
        """After an optimizer step: ema <- decay * ema + (1 - decay) * weight, or a plain copy of the weights."""
        for param, shadow in self._pairs:
            if copy:
                shadow.copy_(param.detach())
            else:
                shadow.lerp_(param.detach().to(shadow.dtype), 1 - self.decay)

    def update_as_lightning(self, global_step: int) -> None:
        """Lightning's EMAWeightAveraging schedule: no update while global_step - 1 < start_step, a copy at the first
        update (torch AveragedModel), then the average; so the two give the same weights step for step."""
        if global_step - 1 >= self.start_step:
            self.update(copy=global_step - 1 == self.start_step)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (twice restores): validation runs on the EMA weights."""
        for module in self._fsdp:  # FSDP2 may still hold gathered copies (e.g. the root after a forward)
            module.reshard()
        for param, shadow in self._pairs:
            tmp = param.detach().clone()
            param.detach().copy_(shadow)
            shadow.copy_(tmp)


def _is_persistent(root: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    return leaf not in module._non_persistent_buffers_set
