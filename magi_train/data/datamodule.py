"""LightningDataModule over webdataset shards of clips: packed batches, split by node and worker, resumable."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from magi_train.config import DataConfig
from magi_train.data.distributed import EvenAcrossRanks
from magi_train.data.reader import ShardDataset, expand_urls, make_loader
from magi_train.data.synthetic import write_synthetic_shards

log = logging.getLogger(__name__)


def resolve_urls(spec: str) -> list[str]:
    """A directory means every `*.tar` in it; anything else (file, brace pattern, pipe:, url) goes to webdataset."""
    return expand_urls(spec)


def ensure_synthetic(cfg: DataConfig) -> None:
    """Write the synthetic train (and val) shards once; re-runs and resumes reuse them."""
    syn = cfg.synthetic
    targets = [(Path(cfg.train_shards), syn.num_clips, syn.seed)]
    if cfg.val_shards:  # a held-out set from another seed, an eighth of the size
        targets.append((Path(cfg.val_shards), max(8, syn.num_clips // 8), syn.seed + 1))
    for out_dir, num_clips, seed in targets:
        if out_dir.is_dir() and any(out_dir.glob("*.tar")):
            continue
        log.info("writing %d synthetic clips to %s", num_clips, out_dir)
        write_synthetic_shards(
            out_dir,
            num_clips=num_clips,
            samples_per_shard=syn.samples_per_shard,
            seed=seed,
            sizes=[tuple(s) for s in syn.sizes],
            text_len=syn.text_len,
            text_dim=cfg.text_dim,
        )


class ClipDataModule(L.LightningDataModule):
    """Train (infinite, shuffled) and validation (one pass) loaders over clip shards."""

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self._train: ShardDataset | None = None
        self._pending_state: dict | None = None

    def prepare_data(self) -> None:  # called on one process per node before setup
        if self.cfg.synthetic.enabled:
            ensure_synthetic(self.cfg)

    def _dataset(self, urls: str, infinite: bool, seed: int) -> ShardDataset:
        c = self.cfg
        return ShardDataset(
            resolve_urls(urls),
            text_dim=c.text_dim,
            max_tokens=c.max_tokens,
            max_clips=c.max_clips,
            bucket_buffer=c.bucket_buffer,
            shuffle_buffer=c.shuffle_buffer if infinite else 0,
            seed=seed,
            infinite=infinite,
        )

    def train_dataloader(self):
        self._train = self._dataset(self.cfg.train_shards, infinite=True, seed=self.cfg.seed)
        if self._pending_state is not None:
            self._train.load_state_dict(self._pending_state)
            self._pending_state = None
        return make_loader(self._train, self.cfg.num_workers)

    def val_dataloader(self):
        if not self.cfg.val_shards:
            return []
        # the same number of batches on every rank: ZeRO-3 / FSDP forwards are collective (data/distributed.py)
        limit = self.trainer.limit_val_batches if self.trainer is not None else None
        dataset = self._dataset(self.cfg.val_shards, infinite=False, seed=0)
        return make_loader(EvenAcrossRanks(dataset, limit if isinstance(limit, int) else None), num_workers=0)

    # Lightning stores these in the checkpoint and hands them back on resume (before train_dataloader).
    # The count comes from the trainer, which is right whatever the number of DataLoader workers.
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"consumed": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state or None
