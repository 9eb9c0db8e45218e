"""`python -m magi_train.tools.consolidate CKPT OUT`: a training checkpoint, sharded or not, -> released safetensors.

CKPT is any checkpoint a magi_train run writes (read by `models/weights.py read_dit_state`): a Lightning `.ckpt`
file (auto / DDP; EMA or raw weights), a DeepSpeed ZeRO-2/3 checkpoint directory (`last.ckpt/`, one shard per
rank; merged to fp32 by DeepSpeed's own zero_to_fp32), or an FSDP sharded directory (torch.distributed.checkpoint
files plus `meta.pt`). The DiT config comes from the resolved config the run stored in the checkpoint
(`magi_config`), so no model flags are repeated. OUT is written by `models/checkpoint.py export_released`
(atomic; loads back with `load_released`).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from magi_train.models.checkpoint import DTYPE_POLICIES, export_released, export_tensors
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig
from magi_train.models.weights import (
    WEIGHTS,
    check_same_architecture,
    load_state_strict,
    model_config_from_dict,
    read_dit_state,
    source_kind,
    stream_dcp,
)


def model_config(config: dict | None, model: str | None, where: str) -> DiTConfig:
    """The DiT config stored in a checkpoint's run config, or the named size `model` (checked against it)."""
    stored = config.get("model") if isinstance(config, dict) else None
    saved = model_config_from_dict(dict(stored), where) if isinstance(stored, dict) else None
    if model is None:
        if saved is None:
            raise ValueError(f"{where} stores no model config (magi_config): pass --model <size>")
        return saved
    if model not in MODEL_CONFIGS:
        raise ValueError(f"--model {model!r}: use one of {sorted(MODEL_CONFIGS)}")
    cfg = copy.deepcopy(MODEL_CONFIGS[model])
    if saved is not None:
        check_same_architecture(saved, cfg, where)
    return cfg


def consolidate(
    path: str | Path,
    out_dir: str | Path,
    weights: str = "auto",
    dtype_policy: str = "fp32",
    model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the DiT of a training checkpoint as a released-format directory; returns out_dir. A sharded (DCP)
    checkpoint is streamed: only one output shard's tensors are in memory at a time."""
    if source_kind(path) == "dcp":
        shapes, fetch, config, _ = stream_dcp(path, weights)
        cfg = model_config(config, model, str(path))
        return export_tensors(cfg, shapes, fetch, out_dir, dtype_policy, overwrite=overwrite)
    state, config, _, _ = read_dit_state(path, weights)
    cfg = model_config(config, model, str(path))
    with torch.device("meta"):
        dit = DiT(cfg)
    load_state_strict(dit, state, str(path), assign=True)  # no second copy; export_released casts per policy
    return export_released(dit, out_dir, dtype_policy=dtype_policy, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.tools.consolidate", description=__doc__.split("\n")[0]
    )
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint directory (e.g. .../last.ckpt)")
    p.add_argument("out_dir", help="released-format directory to write")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="ema: the EMA weights, raw: the trained ones, auto (default): EMA when the checkpoint has them",
    )
    p.add_argument(
        "--dtype-policy",
        choices=DTYPE_POLICIES,
        default="fp32",
        help="fp32: every tensor fp32 (lossless); base: bf16 block linears as the base release",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model size when the checkpoint stores no config (else checked against it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    a = p.parse_args(argv)
    try:
        out = consolidate(a.checkpoint, a.out_dir, a.weights, a.dtype_policy, a.model, a.overwrite)
    except ValueError as err:  # a user error (wrong path, kind, weights or model): its message, no traceback
        p.exit(2, f"{p.prog}: error: {err}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
