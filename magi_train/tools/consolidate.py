"""`python -m magi_train.tools.consolidate CKPT OUT`: a training checkpoint, sharded or not, -> released safetensors.

CKPT is any checkpoint a magi_train run writes: a Lightning `.ckpt` file (auto / DDP), a DeepSpeed ZeRO-2/3
checkpoint directory (`last.ckpt/`, one shard per rank; merged to fp32 by DeepSpeed's own zero_to_fp32),
or an FSDP sharded directory (torch.distributed.checkpoint files plus `meta.pt`). The DiT config comes from
the resolved config the run stored in the checkpoint (`magi_config`), so no model flags are repeated.
OUT is written by `models/checkpoint.py export_released` (atomic; loads back with `load_released`).

Pickle: our checkpoints are read with `torch.load(weights_only=True)`. DeepSpeed's optimizer shards and the
DCP metadata are pickles that their libraries load unrestricted, so they are first scanned and refused if
they reference anything beyond a short allow-list of plain state classes.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magi_train.models.checkpoint import DTYPE_POLICIES, export_released
from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.weights import read_dit_state, strip_task_prefix

WEIGHTS = ("auto", "ema", "current")
# Globals DeepSpeed 0.19 pickles into ZeRO optimizer shards: plain state holders, no behaviour on load.
_DEEPSPEED_GLOBALS = {
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
}
_FSDP_META = "meta.pt"  # Lightning's FSDP sharded checkpoints keep everything but tensors here


def checkpoint_kind(path: Path) -> str:
    """'lightning' (one file), 'deepspeed' (ZeRO directory) or 'fsdp' (distributed-checkpoint directory)."""
    if path.is_file():
        return "lightning"
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    if (path / ".metadata").is_file():
        return "fsdp"
    if (
        (path / "latest").is_file()
        or any(path.glob("*/mp_rank_00_model_states.pt"))
        or any(path.glob("*/zero_pp_rank_0_mp_rank_00_model_states.pt"))
    ):
        return "deepspeed"
    raise ValueError(
        f"{path} is a directory but neither a DeepSpeed checkpoint (a `latest` file and a tag folder of "
        "*_model_states.pt) nor an FSDP sharded one (a `.metadata` file): pass a checkpoint, e.g. "
        "<run_dir>/checkpoints/last.ckpt"
    )


def _check_pickle_globals(files: list[Path], allowed: set[str]) -> None:
    """Refuse torch.save files that reference globals outside `allowed` (checked without unpickling)."""
    for f in files:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed
        if unsafe:
            raise ValueError(
                f"{f} references {sorted(unsafe)}: refusing to unpickle it (not a plain checkpoint)"
            )


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` only if it uses torch.distributed.checkpoint classes and plain containers."""

    _SAFE = {
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("torch.serialization", "_get_layout"),  # layout by name, e.g. torch.strided
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),  # the checkpoint id
    }

    def find_class(self, module: str, name: str):
        ok = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in self._SAFE
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in distributed-checkpoint metadata")
        return super().find_class(module, name)


def _deepspeed_tag_dir(path: Path) -> Path:
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    tag_dir = path / tag if tag else next(p.parent for p in path.glob("*/*model_states.pt"))
    if not tag_dir.is_dir():
        raise ValueError(
            f"DeepSpeed checkpoint {path}: its `latest` names {tag!r}, which is not a folder there"
        )
    return tag_dir


def _load_deepspeed(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = _deepspeed_tag_dir(path)
    files = sorted(tag_dir.glob("*.pt"))
    _check_pickle_globals(files, _DEEPSPEED_GLOBALS)
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    client = torch.load(model_states[0], map_location="cpu", weights_only=True, mmap=True)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)  # merges the ZeRO shards
    return strip_task_prefix(state, str(path)), client.get("magi_config")


def _load_fsdp(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    with (path / ".metadata").open("rb") as f:
        _MetadataUnpickler(f).load()  # a safety scan: FileSystemReader unpickles it unrestricted
    loaded: dict[str, Any] = {}
    # Only the "model" entry: the optimizer states beside it are twice as large and not needed here.
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={"model"}),
        no_dist=True,
    )
    if "model" not in loaded:
        raise ValueError(
            f"FSDP checkpoint {path} has no 'model' entry (not written by Lightning's FSDPStrategy?)"
        )
    meta_file = path / _FSDP_META
    meta = torch.load(meta_file, map_location="cpu", weights_only=True) if meta_file.is_file() else {}
    return strip_task_prefix(loaded["model"], str(path)), meta.get("magi_config")


def load_checkpoint_weights(path: str | Path, weights: str = "auto") -> tuple[dict[str, Tensor], dict | None]:
    """(DiT state dict in fp32 with released key names, the run's resolved config or None) of a checkpoint.

    weights: "ema" the EMA weights, "current" the trained weights, "auto" EMA when the checkpoint has them.
    Sharded checkpoints (DeepSpeed, FSDP) never hold EMA weights (EMA needs strategy=ddp).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "lightning":
        state, config, _ = read_dit_state(path, "raw" if weights == "current" else weights)
    else:
        if weights == "ema":
            raise ValueError(f"weights=ema but {path} is a sharded {kind} checkpoint, which holds no EMA")
        state, config = (_load_deepspeed if kind == "deepspeed" else _load_fsdp)(path)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, config


def model_config_from(config: dict | None, override: str | None = None) -> DiTConfig:
    """The DiT config of a checkpoint's stored run config, or a named size (`--model tiny|small|...`)."""
    from magi_train.models.dit import MODEL_CONFIGS

    if override is not None:
        if override not in MODEL_CONFIGS:
            raise ValueError(f"--model {override!r}: use one of {sorted(MODEL_CONFIGS)}")
        return MODEL_CONFIGS[override]
    if not config or "model" not in config:
        raise ValueError("the checkpoint stores no run config (magi_config): pass --model <size>")
    fields = DiTConfig.__dataclass_fields__
    return DiTConfig(**{k: v for k, v in config["model"].items() if k in fields})


def consolidate(
    path: str | Path,
    out_dir: str | Path,
    weights: str = "auto",
    dtype_policy: str = "fp32",
    model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the DiT of a training checkpoint as a released-format directory; returns out_dir."""
    state, config = load_checkpoint_weights(path, weights)
    cfg = model_config_from(config, model)
    with torch.device("meta"):
        dit = DiT(cfg)
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        shapes = [
            f"{k} {found[k]} != {expected[k]}"
            for k in expected.keys() & found.keys()
            if found[k] != expected[k]
        ]
        raise ValueError(
            f"{path} does not match the model config ({cfg.num_layers} layers, hidden {cfg.hidden_size}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {sorted(shapes)[:4]}"
        )
    dit.load_state_dict(state, strict=True, assign=True)
    return export_released(dit, out_dir, dtype_policy=dtype_policy, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m magi_train.tools.consolidate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint directory (e.g. .../last.ckpt)")
    p.add_argument("out_dir", help="released-format directory to write")
    p.add_argument(
        "--weights", choices=WEIGHTS, default="auto", help="EMA or trained weights (default: auto)"
    )
    p.add_argument(
        "--dtype-policy",
        choices=DTYPE_POLICIES,
        default="fp32",
        help="fp32: every tensor fp32 (lossless); base: bf16 block linears as the base release",
    )
    p.add_argument("--model", default=None, help="model size when the checkpoint stores no config")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    a = p.parse_args(argv)
    out = consolidate(a.checkpoint, a.out_dir, a.weights, a.dtype_policy, a.model, a.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
