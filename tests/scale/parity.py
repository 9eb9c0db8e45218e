"""Parity harness (torchtitan-style): train a recipe on fixed global batches under one parallelism layout and write
the per-step losses, so that layouts can be compared step for step.

The global batch of iteration `it` is `ranks x accumulate` micro-batches, micro-batch g made from a seed of
(it, g); data-parallel rank r reads g = r * accumulate + m. The tasks draw every random number of a micro-batch
from a stream of (it, g) too (tasks/sharding.py stream_seed), so one process accumulating 2 micro-batches and two
FSDP2 ranks (or 2 x 2 with context parallelism, whose cp ranks share g) run the same computation.

    torchrun --nproc_per_node 2 tests/scale/parity.py --recipe pretrain_base --strategy fsdp2 --out DIR ...
    python tests/scale/parity.py --recipe pretrain_base --accumulate 2 --out DIR ...
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from magi_train.__main__ import compose
from magi_train.config import (
    DataConfig,
    DistillConfig,
    EMAConfig,
    FlowConfig,
    LoggerConfig,
    LoRAConfig,
    OptimConfig,
    SRConfig,
    StrategyConfig,
    TrainerConfig,
    narrow,
)
from magi_train.data.reader import ClipBatch
from magi_train.models.dit import DiTConfig
from magi_train.training.run import RunContext, TrainerNodes, run_distill, run_pretrain

# (latent frames, height, width, audio latents, text tokens) of the clips of a micro-batch: different lengths
SHAPES = [(2, 4, 4, 5, 3), (1, 2, 4, 1, 2), (3, 4, 2, 9, 4)]


def _seed(*parts) -> int:
    return (
        int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")
        >> 1
    )


def micro_batch(it: int, g: int, text_dim: int) -> ClipBatch:
    gen = torch.Generator().manual_seed(_seed("parity", it, g))
    clips = SHAPES[: 2 + (it + g) % 2]  # 2 or 3 clips
    video = [torch.randn(48, t, h, w, generator=gen) for t, h, w, _, _ in clips]
    audio = [torch.randn(a, 64, generator=gen) for *_, a, _ in clips]
    text = [torch.randn(n, text_dim, generator=gen) for *_, n in clips]
    n = len(clips)
    keys = [f"it{it}-g{g}-{j}" for j in range(n)]
    return ClipBatch(keys=keys, video=video, audio=audio, text=text, image=[None] * n, lowres=[None] * n)


class GlobalBatches(IterableDataset):
    def __init__(self, rank: int, accumulate: int, text_dim: int, start: int = 0):
        super().__init__()
        self.rank, self.accumulate, self.text_dim, self.start = rank, accumulate, text_dim, start

    def __iter__(self):
        for it in itertools.count(self.start):  # a resumed run goes on from its iteration
            for m in range(self.accumulate):
                yield micro_batch(it, self.rank * self.accumulate + m, self.text_dim)


class ParityData(L.LightningDataModule):
    def __init__(self, accumulate: int, text_dim: int):
        super().__init__()
        self.accumulate, self.text_dim = accumulate, text_dim

    def train_dataloader(self):
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {"rank": 0}
        start = self.trainer.global_step  # restored before the dataloaders are made
        data = GlobalBatches(int(kwargs["rank"]), self.accumulate, self.text_dim, start)
        return DataLoader(data, batch_size=None, num_workers=0)

    def val_dataloader(self):
        return []


class Recorder(Callback):
    """Every value a task logs under train/, per iteration (averaged over micro-batches and ranks at the end)."""

    def __init__(self, out: Path):
        self.out, self.records = out, []

    def setup(self, trainer, pl_module, stage: str) -> None:
        log = pl_module.log

        def recording(name, value, *args, **kwargs):
            if name.startswith("train/") and self._it is not None:
                self.records.append((self._it, name, float(value)))
            return log(name, value, *args, **kwargs)

        self._it = None
        pl_module.log = recording

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._it = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        records = self.records
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        if trainer.is_global_zero:
            sums: dict[str, dict[int, list[float]]] = {}
            for it, name, value in records:
                sums.setdefault(name, {}).setdefault(it, []).append(value)
            means = {n: {it: sum(v) / len(v) for it, v in sorted(d.items())} for n, d in sums.items()}
            self.out.write_text(json.dumps(means))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", required=True, choices=["pretrain_base", "pretrain_sr", "dmd2_distill"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--init", required=True, help="released-format weights: init_from / the DMD-2 teacher")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    run_dir = Path(a.run_dir)
    overrides = [
        f"recipe={a.recipe}", "experiment=smoke", f"run_dir={run_dir}", f"trainer.devices={a.devices}",
        f"strategy={a.strategy}", f"trainer.max_steps={a.steps}", f"trainer.accumulate_grad_batches={a.accumulate}",
        "trainer.val_check_interval=null", f"trainer.checkpoint_every_n_steps={a.steps}",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "eval.every_n_steps=0",
        f"ema.decay={a.ema}", f"distill.ema.decay={a.ema}", "distill.ema.start_step=2", "ema.start_step=2",
        f"init_from={a.init}", f"distill.teacher.checkpoint={a.init}", "distill.generator_every=2",
        *([f"strategy.cp={a.cp}"] if a.strategy == "fsdp2" else []), *a.overrides,
    ]  # fmt: skip
    cfg = compose(overrides)
    ctx = RunContext(
        run_dir=run_dir, seed=cfg.seed, resolved=OmegaConf.to_container(cfg, resolve=True), resume=cfg.resume
    )
    nodes = TrainerNodes(
        narrow(cfg.trainer, TrainerConfig),
        narrow(cfg.strategy, StrategyConfig),
        narrow(cfg.logger, LoggerConfig),
    )
    model, data = narrow(cfg.model, DiTConfig), narrow(cfg.data, DataConfig)
    text_dim = model.text_in_channels
    data.text_dim = text_dim
    recorder = Recorder(run_dir / "losses.json")
    lora = narrow(cfg.lora, LoRAConfig) if cfg.lora is not None else None
    datamodule = ParityData(a.accumulate, text_dim)
    if a.recipe == "dmd2_distill":
        run_distill(ctx, nodes, model, data, narrow(cfg.distill, DistillConfig), callbacks=[recorder],
                    datamodule=datamodule, lora=lora)  # fmt: skip
    else:
        sr = narrow(cfg.sr, SRConfig) if a.recipe == "pretrain_sr" else None
        run_pretrain(
            ctx, nodes, model, data, narrow(cfg.flow, FlowConfig), narrow(cfg.optim, OptimConfig),
            narrow(cfg.ema, EMAConfig), sr=sr, init_from=a.init, callbacks=[recorder], datamodule=datamodule,
            lora=lora,
        )  # fmt: skip


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        # Under torchrun with gloo, about 1 launch in 16 aborted after the run had finished and written its files:
        # "terminate called without an active exception" (SIGABRT) during interpreter finalization, with no Python
        # frame left, even with the group destroyed first. The harness's results are on disk: leave without
        # finalization, so the exit status says whether the run worked.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
