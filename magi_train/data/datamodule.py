"""LightningDataModule over webdataset shards of clips: packed batches, split by node and worker, resumable."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lightning as L

from magi_train.config import DataConfig
from magi_train.data.distributed import EvenAcrossRanks
from magi_train.data.reader import ShardDataset, expand_urls, make_loader
from magi_train.data.synthetic import write_synthetic_shards
from magi_train.utils.fileio import atomic_write

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = "synthetic.json"  # written last: the settings of a complete synthetic shard set
# what a synthetic shard directory may hold: its shards, their indexes, the marker, temporaries of those
_OWN_FILE = re.compile(r"\.?(synthetic-\d{6}\.tar(\.index\.json)?|synthetic\.json)(\.[0-9a-f]{8}\.tmp)?")


def resolve_urls(spec: str, key: str = "shards") -> list[str]:
    """A directory means every `*.tar` in it; anything else (file, brace pattern, pipe:, url) goes to webdataset.
    `key` names the setting in errors (an empty or missing directory is one)."""
    return expand_urls(spec, key)


def _synthetic_dir(key: str, spec: str, run_dir: Path) -> Path:
    """The directory to write generated shards into, after the rule that keeps user data safe: inside the run
    directory, and missing, empty or holding only synthetic shards written there before."""
    out = Path(spec)
    inside = out.resolve().is_relative_to(run_dir.resolve()) and out.resolve() != run_dir.resolve()
    if not inside:
        raise ValueError(
            f"{key}={spec}: data.synthetic.enabled=true generates shards, and only into a directory inside the "
            f"run directory ({run_dir}); {spec} is outside it, so nothing was written there. To train on your "
            f"own shards set data.synthetic.enabled=false (or use data=shards); for generated data leave {key} "
            "at its default under ${run_dir}/data/"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{key}={spec}: exists and is not a directory (synthetic shards go into a directory)"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.fullmatch(p.name)) if out.is_dir() else []
    if foreign:
        raise ValueError(
            f"{key}={spec} holds files that are not synthetic shards ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}), so nothing was written there. Point {key} at a new or "
            "empty directory inside the run directory, or set data.synthetic.enabled=false to train on the "
            "shards in it"
        )
    return out


def ensure_synthetic(cfg: DataConfig, run_dir: str | Path) -> None:
    """Write the synthetic train (and val) shards; re-runs and resumes with the same settings reuse them.

    Never touches user data: the target must lie inside `run_dir` and be missing, empty or hold only synthetic
    shards (ValueError naming the key otherwise). A set is reused when its marker `synthetic.json` (written
    after the shards) records the same settings; otherwise, e.g. after a crash mid-write, it is rewritten.
    """
    syn = cfg.synthetic
    targets = [("data.train_shards", cfg.train_shards, syn.num_clips, syn.seed)]
    if cfg.val_shards:  # a held-out set from another seed, an eighth of the size
        targets.append(("data.val_shards", cfg.val_shards, max(8, syn.num_clips // 8), syn.seed + 1))
    out_dirs = [
        _synthetic_dir(key, spec, Path(run_dir)) for key, spec, _, _ in targets
    ]  # all, before writing
    for out_dir, (_, _, num_clips, seed) in zip(out_dirs, targets, strict=True):
        settings = {
            "num_clips": num_clips,
            "samples_per_shard": syn.samples_per_shard,
            "seed": seed,
            "sizes": [list(s) for s in syn.sizes],
            "text_len": syn.text_len,
            "text_dim": cfg.text_dim,
        }
        marker = out_dir / SYNTHETIC_MARKER
        try:
            written = json.loads(marker.read_text())
        except (OSError, ValueError):
            written = None
        if not isinstance(written, dict):
            written = {}
        names = written.get("shards")
        if written.get("settings") == settings and names and all((out_dir / n).is_file() for n in names):
            continue
        log.info("writing %d synthetic clips to %s", num_clips, out_dir)
        marker.unlink(missing_ok=True)
        paths = write_synthetic_shards(
            out_dir,
            num_clips=num_clips,
            samples_per_shard=syn.samples_per_shard,
            seed=seed,
            sizes=[tuple(s) for s in syn.sizes],
            text_len=syn.text_len,
            text_dim=cfg.text_dim,
            overwrite=True,  # only synthetic shards are there (checked above): a half-written or older set
        )
        shards = [Path(p).name for p in paths]
        atomic_write(marker, json.dumps({"settings": settings, "shards": shards}, indent=1) + "\n")


class ClipDataModule(L.LightningDataModule):
    """Train (infinite, shuffled) and validation (one pass) loaders over clip shards."""

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self._train: ShardDataset | None = None
        self._pending_state: dict | None = None
        if not cfg.synthetic.enabled:  # a wrong path is an error now, before a model is built
            resolve_urls(cfg.train_shards, "data.train_shards")
            if cfg.val_shards:
                resolve_urls(cfg.val_shards, "data.val_shards")

    def prepare_data(self) -> None:  # called on one process per node before setup
        if self.cfg.synthetic.enabled:  # the trainer's root directory is the run directory (build_trainer)
            ensure_synthetic(self.cfg, Path(self.trainer.default_root_dir))

    def _dataset(self, urls: str, infinite: bool, seed: int, key: str = "data.train_shards") -> ShardDataset:
        c = self.cfg
        return ShardDataset(
            resolve_urls(urls, key),
            text_dim=c.text_dim,
            max_tokens=c.max_tokens,
            max_clips=c.max_clips,
            bucket_buffer=c.bucket_buffer,
            shuffle_buffer=c.shuffle_buffer if infinite else 0,
            seed=seed,
            infinite=infinite,
            name=key,
            replica=self._replica(),
        )

    def _replica(self) -> tuple[int, int] | None:
        """(rank, count) among the processes that read different samples, from the strategy (fsdp2: its
        data-parallel ranks; context-parallel ranks of a group read the same clips); None without a trainer."""
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) if strategy is not None else None
        if not kwargs:
            return None
        return int(kwargs["rank"]), int(kwargs["num_replicas"])

    def train_dataloader(self):
        self._train = self._dataset(self.cfg.train_shards, infinite=True, seed=self.cfg.seed)
        if self._pending_state is not None:
            self._train.load_state_dict(self._pending_state)
            self._pending_state = None
        return make_loader(self._train, self.cfg.num_workers, seed=self.cfg.seed)

    def val_dataloader(self):
        if not self.cfg.val_shards:
            return []
        # the same number of batches on every rank: ZeRO-3 / FSDP forwards are collective (data/distributed.py)
        limit = self.trainer.limit_val_batches if self.trainer is not None else None
        dataset = self._dataset(self.cfg.val_shards, infinite=False, seed=0, key="data.val_shards")
        return make_loader(
            EvenAcrossRanks(dataset, limit if isinstance(limit, int) else None), num_workers=0, seed=1
        )

    # Lightning stores these in the checkpoint and hands them back on resume (before train_dataloader).
    # The count comes from the trainer, which is right whatever the number of DataLoader workers.
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"consumed": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state or None
