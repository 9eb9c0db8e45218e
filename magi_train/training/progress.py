"""What a run prints in the terminal: a progress bar over optimizer steps, and Lightning's log lines once each."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities.rank_zero import rank_zero_module
from tqdm.contrib.logging import logging_redirect_tqdm

# loggers to which `import lightning` adds a StreamHandler of its own (lightning/__init__.py always; the
# subpackages when the root logger has no handler yet), which prints every record a second time beside Hydra's
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
TIP_PREFIX = "💡 Tip:"


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TIP_PREFIX)


def route_lightning_logging() -> None:
    """Send Lightning's log records through the root logger's handlers (Hydra's console and <job>.log) only.

    Call it after Hydra has configured logging (inside the `@hydra.main` function); importing this module
    imports Lightning, whose handlers it then takes off. Without root handlers (a test calling `run(cfg)`)
    Lightning keeps its own, or its INFO lines would vanish.
    """
    # Lightning advertises litlogger (Trainer(logger=...)) and litmodels (checkpointing without a
    # ModelCheckpoint) at INFO and has no switch for it (Lightning-AI/pytorch-lightning#21294): drop exactly
    # those records, at the one logger `rank_zero_info` writes to, so other INFO lines stay.
    rank_zero_module.log.addFilter(_not_a_tip)  # the same function object each time: added once
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def _console_handler(logger: logging.Logger) -> logging.Handler | None:
    return next(
        (
            h
            for h in logger.handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
        ),  # not a FileHandler
        None,
    )


class StepProgressBar(TQDMProgressBar):
    """A training bar counting optimizer steps (`trainer.global_step`) out of `trainer.max_steps`.

    Lightning's bars count batches per epoch ("Epoch 0/-2" when training by max_steps on an iterable
    dataset). This one shows "train 120/300 |███| [00:40<01:00, 3.00it/s, loss=0.412]", resumes at the
    checkpoint's step, and counts a step once however many batches it accumulates. Validation draws its
    bar on the same line and clears it when done, so the layout is one line in a terminal and in a Slurm
    log alike; log records go through `tqdm.write` while the bar is up, so they never land inside it.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._redirect = ExitStack()

    @property
    def train_description(self) -> str:
        return "train"

    @property
    def validation_description(self) -> str:
        return "val"

    def init_train_tqdm(self) -> Tqdm:
        max_steps = self.trainer.max_steps
        return Tqdm(
            desc=self.train_description,
            total=max_steps if max_steps > 0 else None,
            initial=self.trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def init_validation_tqdm(self) -> Tqdm:
        in_fit = self.trainer.state.fn == "fit"
        return Tqdm(
            desc=self.validation_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=not in_fit,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = logging.getLogger()
        if self.is_enabled and _console_handler(root) is not None:
            self._redirect.enter_context(logging_redirect_tqdm([root]))
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # an epoch is a pass over the shards: the step count runs on across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar.disable or step == bar.n:  # an accumulation micro-batch: no optimizer step yet
            return
        bar.n = step
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar too

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_progress_bar is not None and not trainer.sanity_checking:
            self.train_progress_bar.clear()  # the validation bar takes the line; on_validation_end redraws it
        super().on_validation_start(trainer, pl_module)

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.val_progress_bar
        bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
        desc = "sanity" if trainer.sanity_checking else self.validation_description
        loaders = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        bar.set_description_str(desc if len(loaders) == 1 else f"{desc} {dataloader_idx}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._redirect.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._redirect.close()  # restore Hydra's console handler before the traceback is logged

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The `prog_bar` metrics without their "train/" prefix; no v_num (the run directory names the run)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {k.removeprefix("train/"): v for k, v in metrics.items()}
