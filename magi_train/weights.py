"""DiT weights out of our own Lightning checkpoints, for every consumer (init_from, DMD-2 roles, generate, consolidate).

A checkpoint written by any magi_train recipe holds the LightningModule's state (the DiT under `model.` for
pretrain / SR, under `student.` for dmd2), the resolved run config under `magi_config`, and, when trained with
EMA, Lightning's EMA layout: `state_dict` = the averaged weights, `current_model_state` = the trained ones.
Read with `weights_only=True` (no pickle code runs) and memory-mapped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magi_train.models.checkpoint import load_released
from magi_train.models.dit import DiT

WEIGHTS = ("auto", "ema", "raw")
# Where a task keeps the DiT: pretrain / SR tasks (`model`), dmd2 (`student`, the network we distil into).
TASK_PREFIXES = ("model.", "student.")
# Module names that wrappers (activation checkpointing, FSDP, torch.compile, DeepSpeed) insert into keys.
_WRAPPER_PARTS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod|_forward_module)\.")


def strip_task_prefix(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """LightningModule keys (`model.<dit key>`, maybe with wrapper parts) -> bare DiT keys."""
    state = {_WRAPPER_PARTS.sub(r"\1", k): v for k, v in state.items()}
    for prefix in TASK_PREFIXES:
        sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    raise ValueError(
        f"{where}: no DiT weights under {' or '.join(repr(p) for p in TASK_PREFIXES)}; keys look like "
        f"{list(state)[:4]}"
    )


def read_dit_state(path: str | Path, weights: str = "auto") -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """(bare DiT state dict, the run's resolved config or None, "ema" | "raw") of one of our checkpoints.

    weights: "auto" the EMA weights when the checkpoint has them, else the trained ones; "ema" requires them;
    "raw" the trained weights.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"could not read {path} as a Lightning checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    has_ema = "current_model_state" in ckpt
    if weights == "ema" and not has_ema:
        raise ValueError(f"weights=ema but {path} holds no EMA weights (trained with optim.ema_decay=0?)")
    use_ema = has_ema and weights != "raw"
    state = ckpt["state_dict"] if use_ema or not has_ema else ckpt["current_model_state"]
    return strip_task_prefix(state, str(path)), ckpt.get("magi_config"), "ema" if use_ema else "raw"


def load_dit_weights(model: DiT, path: str | Path, what: str, weights: str = "auto") -> str:
    """Copy weights into `model` strictly from a released-format directory / .safetensors or one of our .ckpt.

    `what` names the setting in errors (e.g. "init_from"). Returns "released", "ema" or "raw".
    """
    p = Path(path)
    if p.is_dir() or p.suffix in (".safetensors", ".json"):
        if not p.exists():
            raise ValueError(f"{what}={path}: no such released-format directory")
        load_released(model, p)
        return "released"
    if not p.is_file():
        raise ValueError(f"{what}={path}: no such released-format directory or checkpoint file")
    state, _, which = read_dit_state(p, weights)
    load_state_strict(model, state, f"{what}={path}")
    return which


def load_state_strict(model: DiT, state: dict[str, Tensor], where: str) -> None:
    """`model.load_state_dict(state, strict=True)` with one ValueError naming every missing, unexpected or
    mis-shaped key (torch raises RuntimeError for shapes only after the key check)."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: the weights do not fit the model config; missing {missing[:6]} ({len(missing)}), "
            f"unexpected {unexpected[:6]} ({len(unexpected)}), shapes {shapes[:4]} ({len(shapes)}); select the "
            "model the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)
