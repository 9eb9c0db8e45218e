"""What the training data lost, for people: `data/*` metrics in every logger and `<run_dir>/data_report.json`.

The counts are the training loader's `ShardDataset.report()` (data/reader.py): samples read and valid, samples
skipped by reason (`checksum`, `stray file`, `video.npy: shape`, ...), samples lost (listed in a shard's index,
never read), tar read errors and shards that could not be verified. DataLoader workers send theirs with
their batches; with several ranks the counts of all ranks are summed (one `all_gather_object`, reached by every
rank at the same step: logging steps, checkpoint saves, the end). A resumed run continues the counts stored in
its checkpoint. Counts are reads: a bad sample is counted again each epoch.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from magi_train.data.reader import COUNTERS, ShardDataset, merge_counts, summarize_counts
from magi_train.utils.fileio import atomic_write

log = logging.getLogger(__name__)

REPORT_NAME = "data_report.json"
CHECKPOINT_KEY = "magi_data_report"  # the counts so far, continued by a resumed run


def metric_name(reason: str) -> str:
    """`video.npy: shape` -> `data/skipped_video_npy_shape` (loggers and CSV headers want plain names)."""
    return "data/skipped_" + (re.sub(r"[^0-9a-z]+", "_", reason.lower()).strip("_") or "other")


def data_metrics(counts: dict[str, Any]) -> dict[str, float]:
    """The `data/*` metrics of a report: every counter, and skipped samples per reason."""
    out = {f"data/{name}": float(counts[name]) for name in COUNTERS}
    for reason, n in counts["skipped_by_reason"].items():
        key = metric_name(reason)
        out[key] = out.get(key, 0.0) + float(n)
    return out


class DataReport(Callback):
    """Logs the data counts every training step (`data/seen`, `data/skipped`, `data/skipped_<reason>`,
    `data/lost`, `data/tar_errors`, `data/unverified_shards`, ...) and writes them to
    `<run_dir>/data_report.json` (atomically) at every checkpoint save and at the end of the run."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / REPORT_NAME
        self._earlier: dict[str, Any] | None = None  # counts of the run before this resume
        self._totals: dict[str, Any] | None = None
        self._refreshed_at: int | None = None
        self._dataset: ShardDataset | None = None
        # ModelCheckpoint saves `last` after on_train_end / on_exception: its report keeps the final status
        self._status = "running"

    # -- collecting ----------------------------------------------------------------------------------------

    def _local(self, trainer) -> dict[str, Any] | None:
        # held on to: Lightning lets go of its loaders before on_train_end
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, ShardDataset):
            self._dataset = dataset
        return None if self._dataset is None else self._dataset.report()

    def _collect(self, trainer, collective: bool = True) -> dict[str, Any] | None:
        """The counts of this run so far, over every rank (collective: all ranks call it at the same point)."""
        local = self._local(trainer)
        parts = [local]
        if collective and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        now = merge_counts(parts)
        if self._earlier is None:
            return now
        return {**merge_counts([self._earlier, now]), "readers": now["readers"]}

    def _write(self, trainer, totals: dict[str, Any], status: str) -> None:
        if not trainer.is_global_zero:
            return
        report = {
            "status": status,
            "step": trainer.global_step,
            "shards": self._dataset.name,
            "summary": summarize_counts(totals),
            **totals,
            "note": "counts are reads since the run started (a bad sample is counted again each epoch); "
            "lost = listed in a shard's index but never read; unverified = shards without an index",
        }
        atomic_write(self.path, json.dumps(report, indent=1) + "\n")

    # -- hooks ---------------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # one process: read the counts every batch; several ranks: gather them at logging steps only
        every = max(1, trainer.log_every_n_steps)
        if (
            trainer.world_size == 1
            or self._refreshed_at is None
            or (step != self._refreshed_at and step % every == 0)
        ):
            self._totals = self._collect(trainer)
            self._refreshed_at = step
        if self._totals is not None:  # Lightning writes them out at its logging steps
            # CPU tensors: a Python number would become a tensor on the GPU, one synchronising copy per metric
            metrics = {k: torch.tensor(v, dtype=torch.float64) for k, v in data_metrics(self._totals).items()}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # every rank builds a checkpoint, so every rank is here; after an exception, maybe not
        totals = self._collect(trainer, collective=not self._status.startswith("stopped"))
        if totals is not None:
            checkpoint[CHECKPOINT_KEY] = totals
            self._write(trainer, totals, self._status)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._earlier = checkpoint.get(CHECKPOINT_KEY)

    def on_train_end(self, trainer, pl_module) -> None:
        self._status = "finished"
        totals = self._collect(trainer)
        if totals is None:
            return
        self._write(trainer, totals, self._status)
        if trainer.is_global_zero:
            problems = sum(totals[n] for n in COUNTERS if n not in ("seen", "valid"))
            (log.warning if problems else log.info)(
                "%s: %s (%s)", self._dataset.name, summarize_counts(totals), self.path
            )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._status = f"stopped: {type(exception).__name__}: {exception}"
        if trainer.world_size > 1:  # other ranks may never get here: no collective, no partial report
            return
        totals = self._collect(trainer, collective=False)
        if totals is not None:
            self._write(trainer, totals, self._status)
