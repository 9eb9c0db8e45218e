"""Load a DiT for sampling from one of our Lightning checkpoints or from a released-format directory.

A Lightning `.ckpt` of magi_train carries the resolved root config under `magi_config` (train.py), so the
DiT is rebuilt from `magi_config["model"]` with no flags repeated. With EMA on, Lightning's
`EMAWeightAveraging` saves the averaged weights as `state_dict` and the raw ones as `current_model_state`;
`use_ema=True` takes the former, `use_ema=False` the latter. A released-format directory
(`model.safetensors.index.json` + shards, or `model.safetensors`) needs a model config name
(`MODEL_CONFIGS`); the SR role always uses the SR text coordinates ("v1", spec §5.5).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from magi_train.models.checkpoint import load_released, released_dtype
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig
from magi_train.models.weights import load_state_strict, read_dit_state

log = logging.getLogger(__name__)

ROLES = ("base", "distilled", "sr")
# Prefixes under which a Lightning module may hold the DiT: `model.` (pretrain, pretrain_sr), then the
# student/generator role names of a distillation module.
_RUNTIME_FIELDS = {"activation_checkpointing": False, "compile": False}  # training-only switches
_RELEASED_HINT = (
    "expected a released-format DiT directory (model.safetensors.index.json with its shards, or "
    "model.safetensors) or a magi_train Lightning checkpoint (.ckpt, e.g. <run_dir>/checkpoints/last.ckpt)"
)


@dataclass
class LoadedDiT:
    """A DiT ready for sampling and where its weights came from (recorded in the output JSON)."""

    model: DiT
    source: str  # "lightning" | "released"
    weights: str  # "ema" | "raw" | "released"
    path: str
    task: str | None = None  # the training task of a Lightning checkpoint

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "weights": self.weights,
            "task": self.task,
            "parameters": self.model.num_parameters(),
        }


def _model_config_from_dict(values: dict[str, Any], where: str) -> DiTConfig:
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: model config has unknown fields {unknown}; was it written by another version?"
        )
    cfg = DiTConfig(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})
    for key, value in _RUNTIME_FIELDS.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def _build_empty(cfg: DiTConfig, device: torch.device, bf16_linears: bool) -> DiT:
    """The DiT with uninitialised storage on `device` (every tensor is then loaded from the checkpoint).

    bf16_linears: store the block linears in bf16 (the released base dtype policy, spec §2.10) from the
    start, so a big model never holds an fp32 copy on the device; run it under bf16 autocast.
    """
    with torch.device("meta"):
        model = DiT(cfg)
    if bf16_linears:
        for name, param in model.named_parameters():
            if released_dtype(name, "base") == torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
    return model.to_empty(device=device)


def load_lightning(
    path: Path, device: torch.device, use_ema: bool = True, bf16_linears: bool = False
) -> LoadedDiT:
    """Rebuild the DiT from `magi_config["model"]` of one of our checkpoints and load EMA or raw weights."""
    state, config, weights = read_dit_state(path, "auto" if use_ema else "raw")
    if config is None:
        raise ValueError(
            f"{path} has no 'magi_config': not written by magi_train (the resolved config is needed to "
            "rebuild the model); for released weights pass their directory instead"
        )
    if use_ema and weights == "raw":
        log.warning("%s holds no EMA weights (trained with optim.ema_decay=0?): using the raw weights", path)
    cfg = _model_config_from_dict(dict(config.get("model") or {}), str(path))
    model = _build_empty(cfg, device, bf16_linears)
    load_state_strict(model, state, str(path))
    return LoadedDiT(model.eval().requires_grad_(False), "lightning", weights, str(path), config.get("task"))


def check_exists(path: str | Path, role: str) -> None:
    """Fail fast, before anything is loaded, when a checkpoint path does not exist."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    p = Path(path)
    if not p.exists() and not p.with_name(p.name + ".zst").exists():
        raise ValueError(f"{role} checkpoint {str(p)!r} does not exist: {_RELEASED_HINT}")


def load_dit(
    path: str | Path,
    role: str,
    model_name: str = "magihuman_15b",
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    bf16_linears: bool = False,
) -> LoadedDiT:
    """The DiT of one sampling role ("base", "distilled" or "sr") from a `.ckpt` or a released directory.

    Weights are copied (and cast) into the model's storage; see `_build_empty` for `bf16_linears`.
    """
    check_exists(path, role)
    device = torch.device(device)
    p = Path(path)
    if p.is_file() and p.suffix not in (".safetensors", ".json", ".zst"):
        loaded = load_lightning(p, device, use_ema, bf16_linears)
        trained_sr = loaded.task == "pretrain_sr"
        if trained_sr != (role == "sr"):
            log.warning(
                "%s checkpoint %s was trained by task %r; is it the right model for this role?",
                role,
                p,
                loaded.task,
            )
        return loaded
    if model_name not in MODEL_CONFIGS:
        raise ValueError(
            f"unknown model config {model_name!r} for {role} weights {p}; known: {sorted(MODEL_CONFIGS)}"
        )
    cfg = copy.deepcopy(MODEL_CONFIGS[model_name])
    if role == "sr":
        cfg.text_coords = "v1"  # the release's SR data proxy uses coords_style v1 (spec §1)
    model = _build_empty(cfg, device, bf16_linears)
    try:
        load_released(model, p)
    except FileNotFoundError as err:
        raise ValueError(f"{role} checkpoint {str(p)!r}: {err}; {_RELEASED_HINT}") from err
    except ValueError as err:
        key = "sr_model" if role == "sr" else "base_model"
        raise ValueError(f"{err}\n(the {role} model config is {model_name!r}: set generate.{key})") from err
    return LoadedDiT(model.eval().requires_grad_(False), "released", "released", str(p))
