"""A CSV logger whose metrics.csv is one truthful table across resumes: a resumed run appends to it (Lightning's
writer would delete it), first dropping the rows of the steps it trains again, and every rewrite is atomic
(utils/fileio.py)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from magi_train.utils.fileio import atomic_write


def _step_of(row: dict[str, str]) -> int | None:
    value = row.get("step")
    return int(float(value)) if value not in (None, "") else None


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes an existing metrics.csv here; keep it and continue its header.
        self._continuing = os.path.isfile(self.metrics_file_path)
        if self._continuing:
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        # The first row of a continued run (a resume) tells where it restarts: rows from that step on were logged
        # by the run that was killed, and are about to be logged again with the resumed run's values.
        if self._continuing and step is not None:
            self._continuing = False
            self.drop_from_step(step)
        super().log_metrics(metrics_dict, step)

    def _rewrite(self, fieldnames: list[str], keep: Callable[[dict[str, str]], bool]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, out.getvalue())

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._rewrite(fieldnames, lambda row: True)  # Lightning's rewrite truncates the file in place

    def drop_from_step(self, step: int) -> None:
        """Forget every row (written or pending) of steps >= `step`: a resumed run logs them again."""
        self.metrics = [m for m in self.metrics if m.get("step") is None or m["step"] < step]
        if os.path.isfile(self.metrics_file_path):
            self._rewrite(self.metrics_keys, lambda row: (s := _step_of(row)) is None or s < step)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing <run_dir>/metrics.csv, appending across resumes."""

    def __init__(self, run_dir) -> None:
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
