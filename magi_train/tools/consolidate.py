"""`python -m magi_train.tools.consolidate CKPT OUT`: a training checkpoint, sharded or not, -> released safetensors.

CKPT is any checkpoint a magi_train run writes (read by `models/weights.py read_dit_state`): a Lightning `.ckpt`
file (auto / DDP; EMA or raw weights), a DeepSpeed ZeRO-2/3 checkpoint directory (`last.ckpt/`, one shard per
rank; merged to fp32 by DeepSpeed's own zero_to_fp32), or an FSDP sharded directory (torch.distributed.checkpoint
files plus `meta.pt`); or released-format weights, which carry no config: `--model` names their size. The DiT
config of our checkpoints comes from the resolved config the run stored in them (`magi_config`), so no model
flags are repeated. OUT is written by `models/checkpoint.py export_released` (atomic; loads back with
`load_released`).

The checkpoint of a LoRA run (lora=..., adapters only) is written merged: its base (the run's init_from or
distill.teacher.checkpoint) with its adapter (EMA by default; DMD-2: the student's) folded in.

`--merge-lora ADAPTER.safetensors [--lora-scale S]` folds a LoRA adapter (the exchange format of docs/lora.md)
into the weights before they are written (`models/lora.py merge_adapters`: W += S x alpha/rank x B A, each
expert's update into its own rows). A merge holds the whole DiT in memory (a sharded checkpoint is then read
whole, not streamed); the adapted block linears are merged in fp32.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

from magi_train.models.checkpoint import DTYPE_POLICIES, export_released, export_tensors
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig
from magi_train.models.lora import (
    LoRAConfig,
    add_adapters,
    format_metadata,
    load_adapter,
    lora_layers,
    merge_adapters,
    read_adapter,
)
from magi_train.models.weights import (
    WEIGHTS,
    check_same_architecture,
    load_dit,
    load_state_strict,
    lora_run,
    model_config_from_dict,
    read_adapter_checkpoint,
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
    merge_lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> Path:
    """Write the DiT of a training checkpoint (or of released weights) as a released-format directory, with the
    adapter `merge_lora` merged when given; returns out_dir. Without a merge a sharded (DCP) checkpoint is
    streamed: only one output shard's tensors are in memory at a time."""
    if not math.isfinite(lora_scale):
        raise ValueError(f"--lora-scale {lora_scale}: use a finite number (1.0: the adapter as trained)")
    kind = source_kind(path)
    if (
        kind in ("lightning", "dcp") and lora_run(path) is not None
    ):  # a LoRA run: its base + its adapter, merged
        if merge_lora is not None:
            raise ValueError(
                f"{path} is a LoRA run's checkpoint, merged with its own adapter: drop --merge-lora"
            )
        dit = load_dit(path, None if model is None else model_config(None, model, str(path)), weights).model
        for _, layer in lora_layers(dit):  # own fp32 copies before the merge (the base may be bf16)
            layer.weight.data = layer.weight.data.to(torch.float32, copy=True)
        merge_adapters(dit, scale=lora_scale)
        return export_released(dit, out_dir, dtype_policy=dtype_policy, overwrite=overwrite)
    # a bad adapter file fails before the (big) base is read, and so does one that cannot merge into its config
    lora_cfg = read_adapter(merge_lora, "--merge-lora")[0] if merge_lora is not None else None
    if kind == "released":
        if model is None:
            raise ValueError(
                f"{path} holds released-format weights, which carry no model config: pass --model <size> "
                f"(one of {sorted(MODEL_CONFIGS)})"
            )
        cfg = model_config(None, model, str(path))
        _check_merge(cfg, lora_cfg, merge_lora)
        dit = load_dit(path, cfg, weights, what="checkpoint").model
    elif kind == "dcp":
        shapes, fetch, config, _ = stream_dcp(path, weights)
        cfg = model_config(config, model, str(path))
        if merge_lora is None:
            return export_tensors(cfg, shapes, fetch, out_dir, dtype_policy, overwrite=overwrite)
        _check_merge(cfg, lora_cfg, merge_lora)
        dit = _assigned(cfg, fetch(list(shapes)), str(path))
    else:
        state, config, _, _ = read_dit_state(path, weights)
        cfg = model_config(config, model, str(path))
        _check_merge(cfg, lora_cfg, merge_lora)
        dit = _assigned(cfg, state, str(path))
    if merge_lora is not None:
        load_adapter(dit, merge_lora, where="--merge-lora")
        for _, layer in lora_layers(dit):  # own fp32 copies: the loaded ones may be memory-mapped or bf16
            layer.weight.data = layer.weight.data.to(torch.float32, copy=True)
        merge_adapters(dit, scale=lora_scale)
    return export_released(dit, out_dir, dtype_policy=dtype_policy, overwrite=overwrite)


def _check_merge(cfg: DiTConfig, lora_cfg: LoRAConfig | None, where: str | Path | None) -> None:
    """The merge rehearsed on a meta-device DiT (no memory, no arithmetic): its config errors before any weight is
    read (layers beyond the model, a shared linear restricted to some modalities, which has no merged form)."""
    if lora_cfg is None:
        return
    with torch.device("meta"):
        dit = DiT(copy.deepcopy(cfg))
    try:
        merge_adapters(add_adapters(dit, copy.deepcopy(lora_cfg)))
    except ValueError as err:
        raise ValueError(f"--merge-lora={where}: {err}") from err


def export_adapter(
    path: str | Path, out: str | Path, weights: str = "auto", adapter: str | None = None
) -> Path:
    """Write the adapter of a LoRA run's checkpoint (EMA by default; DMD-2: the student's) as one exchange-format
    .safetensors file (docs/lora.md), e.g. for generate.lora or another framework."""
    import safetensors.torch

    from magi_train.utils.fileio import atomic_file

    tensors, name, which, config = read_adapter_checkpoint(path, weights, adapter)
    metadata = format_metadata(LoRAConfig(**config["lora"]))  # the run's resolved `lora` node
    out = Path(out)
    atomic_file(out, lambda p: safetensors.torch.save_file(tensors, p, metadata=metadata))
    print(f"adapter {name!r} ({which} weights) of {path}: {len(tensors)} tensors")
    return out


def _assigned(cfg: DiTConfig, state: dict[str, torch.Tensor], where: str) -> DiT:
    """A DiT holding the tensors of `state` themselves (no second copy; export_released casts per policy)."""
    with torch.device("meta"):
        dit = DiT(cfg)
    load_state_strict(dit, state, where, assign=True)
    return dit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.tools.consolidate", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "checkpoint",
        help="a .ckpt file, a sharded checkpoint directory (e.g. .../last.ckpt) or a released-format directory",
    )
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
    p.add_argument(
        "--merge-lora",
        default=None,
        metavar="ADAPTER",
        help="a LoRA adapter .safetensors (docs/lora.md) to merge into the weights before writing them",
    )
    p.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help="multiplies the merged adapter's update alpha/rank x B A (default 1.0)",
    )
    p.add_argument(
        "--adapter-only",
        nargs="?",
        const="auto",
        default=None,
        metavar="NAME",
        help="write only the adapter of a LoRA run's checkpoint to out_dir (a .safetensors file); NAME: default, "
        "student (DMD-2's default) or critic",
    )
    a = p.parse_args(argv)
    if a.adapter_only is not None:
        try:
            name = None if a.adapter_only == "auto" else a.adapter_only
            print(f"wrote {export_adapter(a.checkpoint, a.out_dir, a.weights, name)}")
        except ValueError as err:
            p.exit(2, f"{p.prog}: error: {err}\n")
        return
    if a.lora_scale is not None and a.merge_lora is None:
        p.error("--lora-scale scales the adapter of --merge-lora: give --merge-lora too")
    scale = 1.0 if a.lora_scale is None else a.lora_scale
    try:
        out = consolidate(
            a.checkpoint, a.out_dir, a.weights, a.dtype_policy, a.model, a.overwrite, a.merge_lora, scale
        )
    except ValueError as err:  # a user error (a wrong path, kind, weights, model, adapter): no traceback
        p.exit(2, f"{p.prog}: error: {err}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
