"""Joint audio-video flow-matching pretraining of the DiT (recipe `pretrain_base`).

The LightningModule only wires the model and the pure functions of `magi_train.flow` together.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from magi_train.config import FlowConfig, OptimConfig
from magi_train.data.reader import ClipBatch
from magi_train.flow import (
    Mode,
    check_audio_sigma,
    drop_text,
    joint_flow_loss,
    noise_clip,
    sample_modes,
    sample_sigma_pair,
    velocity_target,
)
from magi_train.models.dit import DiT
from magi_train.models.lora import adapter_parameters, is_adapter_key
from magi_train.models.tread import seed_tread
from magi_train.tasks.ema import ShardedEMA
from magi_train.tasks.guard import NonFiniteGuard, check_checkpoint_finite, grad_norm
from magi_train.tasks.optim import build_optimizer
from magi_train.tasks.sharding import RoleSetup, device_mesh, micro_index, prepare_role, stream_seed


def check_adapter_checkpoint(own: dict, saved: dict, skip) -> None:
    """A LoRA checkpoint must hold exactly the adapters (and their EMA) of this run: one error naming the rest."""
    want = {k for k in own if not skip(k)}
    missing, unexpected = sorted(want - saved.keys()), sorted(saved.keys() - want)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match this LoRA setup (lora.rank / targets / layers / modalities, model?): missing "
            f"{missing[:4]} ({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})"
        )


def load_null_text(spec: str, text_dim: int) -> Tensor:
    """Features used for dropped text: 'null' = one zero token, else a .npy file [L, text_dim]."""
    if spec == "null":
        return torch.zeros(1, text_dim)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"flow.null_text={spec!r}: not 'null' and not an existing .npy file of [L, {text_dim}]"
        )
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != text_dim or not 1 <= arr.shape[0] <= 640:
        raise ValueError(
            f"flow.null_text {path}: expected [L<=640, {text_dim}] features, got {list(arr.shape)}"
        )
    return torch.from_numpy(arr.astype(np.float32))


class PretrainTask(L.LightningModule):
    """Flow matching on packed batches of clips with t2v / i2v / a2v mixing and text dropout."""

    def __init__(
        self,
        model: DiT,
        flow_cfg: FlowConfig,
        optim_cfg: OptimConfig,
        max_steps: int,
        text_dim: int,
        seed: int = 0,
        max_nonfinite_steps: int = 20,
        setup: RoleSetup | None = None,
        sharded_ema: tuple[float, int] | None = None,
    ):
        """model: with its weights, or on the meta device under strategy=fsdp2 (filled from setup.source in
        configure_model). setup: how configure_model parallelises it. sharded_ema: (decay, start_step) of the EMA
        kept on the local shards under fsdp2 (other strategies use Lightning's EMA callback)."""
        super().__init__()
        self.model = model
        # only LoRA adapters train (models/lora.py): checkpoints then hold only them (and their EMA)
        self.lora = bool(adapter_parameters(model))
        self.setup_cfg = setup or RoleSetup()
        self.sharded_ema = sharded_ema
        self.ema: ShardedEMA | None = None
        self._configured = False
        check_audio_sigma(flow_cfg.audio_sigma, flow_cfg.audio_sigma_correlation)  # before any training
        self.flow_cfg, self.optim_cfg = flow_cfg, optim_cfg
        self.max_steps, self.seed = max_steps, seed
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self._hold_schedule = False  # the current step was skipped: lr_scheduler_step leaves the schedule
        self.register_buffer("null_text", load_null_text(flow_cfg.null_text, text_dim), persistent=False)

    def configure_model(self) -> None:
        if self._configured:
            return
        self._configured = True
        mesh = device_mesh(self)
        prepare_role(self.model, self.setup_cfg, mesh, self.device, self.seed)
        if self.sharded_ema is not None:
            if mesh is None and not self.lora:
                raise ValueError(
                    "the sharded EMA is for strategy=fsdp2 or LoRA; other strategies use the EMA callback"
                )
            keep = is_adapter_key if self.lora else None  # LoRA: the average of the adapters only
            self.ema = ShardedEMA(*self.sharded_ema).attach(self.model, keep=keep)

    def checkpoint_skip(self, key: str) -> bool:
        """State-dict keys a checkpoint leaves out (fsdp2 resume loads without them): LoRA's frozen base."""
        return self.lora and not is_adapter_key(key)

    # -- the objective -----------------------------------------------------------------------------------

    def flow_loss(
        self,
        batch: ClipBatch,
        generator: torch.Generator | None = None,
        sigmas: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One flow-matching loss evaluation on a packed batch (also used for validation, seeded). sigmas: fixed
        (video [N], audio [N]) noise levels instead of drawn ones (evaluation at common levels)."""
        f, n, dev = self.flow_cfg, len(batch), self.device
        if sigmas is None:
            sigmas = sample_sigma_pair(
                n, f.sigma_sampling, f.shift, f.sigma_mean, f.sigma_std, f.audio_sigma,
                f.audio_sigma_correlation, generator=generator,
            )  # fmt: skip
        sigma, audio_sigma = (s.to(dev) for s in sigmas)
        modes = sample_modes(n, f.mode_probs, generator=generator)
        drop = torch.rand(n, generator=generator) < f.text_drop_prob
        video_in, audio_in, v_target, a_target = [], [], [], []
        for i in range(n):
            video, audio = batch.video[i], batch.audio[i]
            v_eps = torch.randn(video.shape, generator=generator).to(video)
            a_eps = torch.randn(audio.shape, generator=generator).to(audio)
            vi, ai, _ = noise_clip(
                video, audio, sigma[i], v_eps, a_eps, modes[i], batch.image[i], audio_sigma[i]
            )
            video_in.append(vi)
            audio_in.append(ai)
            v_target.append(velocity_target(video, v_eps))
            a_target.append(velocity_target(audio, a_eps))
        text = drop_text(batch.text, drop, self.null_text)
        pred_video, pred_audio = self.model(video_in, audio_in, text)
        out = joint_flow_loss(
            pred_video, pred_audio, v_target, a_target, modes, f.video_loss_weight, f.audio_loss_weight
        )
        out["sigma_mean"] = sigma.mean()
        out["sigma_audio_mean"] = audio_sigma.mean()
        out["frac_i2v"] = torch.tensor(sum(m == Mode.I2V for m in modes) / n)
        out["frac_a2v"] = torch.tensor(sum(m == Mode.A2V for m in modes) / n)
        return out

    def training_step(self, batch: ClipBatch, batch_idx: int) -> Tensor:
        # noise, levels, modes and text dropout from a stream of this micro-batch's data index: independent of the
        # layout (ranks x accumulation), different on every rank, and exact on resume
        acc = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        index = micro_index(self, batch_idx % acc, acc)
        gen = torch.Generator().manual_seed(stream_seed(self.seed, self.global_step, "train", index))
        seed_tread(stream_seed(self.seed, self.global_step, "tread", index), self.model)  # TREAD's choice
        out = self.flow_loss(batch, generator=gen)
        self.guard.observe(out["loss"])
        n = len(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/loss_video", out["loss_video"], batch_size=n)
        self.log("train/loss_audio", out["loss_audio"], batch_size=n)
        for key, name in (("sigma_mean", "sigma_video"), ("sigma_audio_mean", "sigma_audio")):
            if key in out:  # the batch's mean drawn levels (SR draws no audio level)
                self.log(f"train/{name}", out[key], batch_size=n)
        self.log("train/clips", float(n), batch_size=n)
        self.log("train/tokens", float(batch.num_tokens), batch_size=n)
        return out["loss"]

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if (
            self.ema is not None
        ):  # here, not in on_train_batch_end: ModelCheckpoint saves before that hook runs
            self.ema.update_as_lightning(self.global_step + 1)  # global_step counts this step only after it

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None and not self.trainer.sanity_checking:
            self.ema.swap()  # validate the EMA weights, as Lightning's EMA callback does

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None and not self.trainer.sanity_checking:
            self.ema.swap()

    def validation_step(self, batch: ClipBatch, batch_idx: int) -> None:
        # Fixed noise per validation batch so that curves across checkpoints and runs are comparable.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + batch_idx)
        out = self.flow_loss(batch, generator=gen)
        for k in ("loss", "loss_video", "loss_audio"):
            self.log(f"val/{k}", out[k], batch_size=len(batch), sync_dist=True)

    # -- optimisation --------------------------------------------------------------------------------------

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model, self.optim_cfg, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # after backward (and the unscaling of fp16 gradients), before clipping and the step
        norm = grad_norm(self.model.parameters())
        ok = self.guard.check(norm, self.global_step, self.trainer.strategy.reduce_boolean_decision)
        if not ok:
            # Skipped, yet the step is taken with no gradients (AdamW then changes nothing), so global_step still
            # advances: it counts the batches consumed, and the data position, checkpoint cadence and max_steps
            # follow it, so a resumed run replays an uninterrupted one exactly.
            optimizer.zero_grad(set_to_none=True)
        self._hold_schedule = not ok
        # every step (the guard computes it anyway): Lightning writes the value of the step it logs
        self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/nonfinite_steps", float(self.guard.total))

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # The schedule follows the updates taken: a skipped warm-up step must not raise the next step's LR.
        if not self._hold_schedule:
            super().lr_scheduler_step(scheduler, metric)

    # -- exact resume: RNG state travels with the checkpoint -----------------------------------------------

    # Stored as tensors and plain Python values only, so the checkpoint loads with weights_only=True.

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # after the callbacks' hooks (EMA layouts included) and before Lightning writes anything
        if self.lora:  # the frozen base is re-read from init_from on resume
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not self.checkpoint_skip(k)
            }
        check_checkpoint_finite(
            checkpoint, self.global_step, "optim.lr", self.trainer.strategy.reduce_boolean_decision
        )
        checkpoint["nonfinite_guard"] = self.guard.state_dict()
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        # every rank draws its own noise (its clips differ): each rank's state is saved, rank 0 writes them all
        checkpoint["rng"] = rng
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, rng)
            checkpoint["rng_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied just before the first resumed step: building the dataloader iterator in between draws
        # from the global RNG, which the uninterrupted run did at its start, not at this step.
        if self.lora and "state_dict" in checkpoint:  # fsdp2 loads its sharded state itself (checkpoint_skip)
            check_adapter_checkpoint(self.state_dict(), checkpoint["state_dict"], self.checkpoint_skip)
            self.strict_loading = False  # the base is not in it
        per_rank = checkpoint.get("rng_per_rank") or []
        same_world = len(per_rank) == self.trainer.world_size
        self._resume_rng = per_rank[self.global_rank] if same_world else checkpoint.get("rng")
        if "nonfinite_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["nonfinite_guard"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        rng, self._resume_rng = getattr(self, "_resume_rng", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
