"""Non-finite guard of every training task (issue 13): a step with a NaN/inf loss or gradient norm is skipped and
counted, too many in a row stop the run, and no checkpoint is ever written from non-finite weights.

A skipped step keeps Lightning's step count: the optimizer step is still taken, but with every gradient set to
None, which AdamW treats as "no update" (parameters, moments and its step count stay as they are). The LR schedule
is held by the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

log = logging.getLogger(__name__)

FIXES = (
    "lower the learning rate ({lr_key}), lengthen its warm-up, keep gradient clipping on, and check the data for "
    "NaN/inf latents or features"
)
# weights (with the EMA layouts of tasks/ema.py: average in state_dict, raw weights aside) and AdamW moments
CHECKED_KEYS = ("state_dict", "current_model_state", "optimizer_states")


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: too many non-finite steps in a row, or NaN/inf weights at a checkpoint."""


def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """Global L2 norm (fp32) of the gradients of `params`; 0 when none has one.

    FSDP2 gradients are DTensor shards: their squared sums are added over the ranks that shard them (one
    all-reduce per mesh), so every rank gets the norm of the whole gradient."""
    from torch.distributed.tensor import DTensor

    plain: list[Tensor] = []
    sharded: dict[object, list[Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sharded.setdefault(g.device_mesh, []).append(g)
        else:
            plain.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float32))
    total = torch.stack(plain).pow(2).sum() if plain else torch.zeros(())
    for mesh, grads in sharded.items():
        local = torch.stack(
            [torch.linalg.vector_norm(g.to_local().detach(), dtype=torch.float32) for g in grads]
        )
        sq = local.pow(2).sum()
        for dim, placement in enumerate(grads[0].placements):
            if placement.is_shard():
                torch.distributed.all_reduce(sq, group=mesh.get_group(dim))
        total = total.to(sq.device) + sq
    return total.sqrt()


class NonFiniteGuard:
    """Decides per optimizer step whether to update, and counts the skipped steps of one optimizer (role).

    `observe` every (micro-batch) loss, then `check` the gradient norm once per optimizer step. The counts travel
    with the checkpoint (`state_dict`), so a resumed run logs and stops exactly as the uninterrupted one would.
    """

    def __init__(self, max_consecutive: int, lr_key: str = "optim.lr", role: str | None = None):
        if max_consecutive < 1:
            raise ValueError(
                f"trainer.max_nonfinite_steps={max_consecutive}: the number of non-finite steps in a row that "
                "stops the run; use >= 1 (1 = stop at the first)"
            )
        self.max_consecutive, self.lr_key, self.role = max_consecutive, lr_key, role
        self.total = 0  # skipped steps of the run
        self.consecutive = 0  # skipped steps since the last update
        self._loss_finite: Tensor | None = None  # of the micro-batches since the last check

    def observe(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def check(self, norm: Tensor, step: int, reduce: Callable[..., bool] | None = None) -> bool:
        """True: take the update. False: skip it (counted, warned). Raises NonFiniteTrainingError at the limit.

        reduce: the strategy's `reduce_boolean_decision`, so that every rank takes the same decision (sharded
        gradient norms are local to the rank).
        """
        finite = torch.isfinite(norm).all()
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(finite.device)
        self._loss_finite = None
        ok = bool(finite)  # the one host sync of the guard per step
        if reduce is not None:
            ok = reduce(ok, all=True)
        if ok:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        who = f" of the {self.role}" if self.role else ""
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training diverged: {self.consecutive} steps in a row{who} (the last at step {step}) had a NaN/inf "
                f"loss or gradient norm, and trainer.max_nonfinite_steps={self.max_consecutive} stops the run there. "
                f"Those updates were skipped: the weights are those before the first of them, and no checkpoint was "
                f"written from NaN/inf weights. Fix: {FIXES.format(lr_key=self.lr_key)}."
            )
        if rank_zero_only.rank == 0:  # every rank takes the same decision; one line per step
            log.warning(
                "step %d: NaN/inf loss or gradient norm%s (grad norm %s): update skipped, LR schedule held "
                "(%d in a row, %d in all; %d in a row stop the run: trainer.max_nonfinite_steps)",
                step, who, f"{float(norm):.4g}", self.consecutive, self.total, self.max_consecutive,
            )  # fmt: skip
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


def nonfinite_tensors(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors with NaN/inf among a checkpoint's weights, EMA and optimizer states."""
    bad: list[str] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}/{i}")
        elif isinstance(value, Tensor):
            # a DTensor (FSDP2 shards): this rank's part; the decision is then reduced over ranks
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append(name)

    for key in CHECKED_KEYS:
        if key in checkpoint:
            walk(checkpoint[key], key)
    return bad


def check_checkpoint_finite(
    checkpoint: dict[str, Any], step: int, lr_key: str, reduce: Callable[..., bool] | None = None
) -> None:
    """Raise NonFiniteTrainingError before a checkpoint with NaN/inf weights is written (the last line of defence:
    the guard skips non-finite steps, but a finite, huge one can still overflow). Called from `on_save_checkpoint`,
    which Lightning runs on every rank before it writes, and before ModelCheckpoint removes an older checkpoint."""
    bad = nonfinite_tensors(checkpoint)
    ok = not bad
    if reduce is not None:
        ok = reduce(ok, all=True)
    if not ok:
        where = f"{len(bad)} tensors, e.g. {', '.join(bad[:4])}" if bad else "tensors of another rank"
        raise NonFiniteTrainingError(
            f"refusing to write the checkpoint of step {step}: NaN/inf in {where}. The earlier checkpoints are kept. "
            f"Fix: {FIXES.format(lr_key=lr_key)}."
        )
