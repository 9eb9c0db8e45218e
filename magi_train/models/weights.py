"""The one DiT weight loader: every source kind, for every consumer (init_from, DMD-2 roles, generate, eval, consolidate).

Source kinds (`source_kind`):
- "released": a released-format directory (`model.safetensors.index.json` + shards, or `model.safetensors`,
  optionally `.zst`), an index json or one `.safetensors` file (models/checkpoint.py `load_released`). It carries no
  model config: the caller names one.
- "lightning": one of our Lightning `.ckpt` files: the DiT under `model.` (pretrain / SR tasks) or `student.`
  (dmd2; its teacher and critic are not read), the resolved run config under `magi_config`, and, when trained
  with EMA, Lightning's EMA layout: `state_dict` = the averaged weights, `current_model_state` = the trained
  ("raw") ones.
- "deepspeed": a DeepSpeed ZeRO-2/3 checkpoint directory (merged to fp32 by DeepSpeed's own zero_to_fp32;
  `magi_config` in the client state of `*model_states.pt`).
- "dcp": an FSDP / torch.distributed.checkpoint directory (`.metadata` + shards; only the `model` entry is
  read; `magi_config` in Lightning's `meta.pt`).

Sharded checkpoints hold no EMA weights (EMA needs strategy=ddp).

Pickle: our files are read with `torch.load(weights_only=True)` and memory-mapped. DeepSpeed's optimizer shards and
the DCP metadata are pickles that their libraries load unrestricted, so they are first scanned and refused if they
reference anything beyond a short allow-list of plain state classes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magi_train.models.checkpoint import DTYPE_POLICIES, load_released, released_dtype
from magi_train.models.dit import DiT, DiTConfig, rope_bands
from magi_train.models.lora import is_adapter_key
from magi_train.models.shards import fill

log = logging.getLogger(__name__)

# auto: the EMA weights when the checkpoint has them, else the raw (trained) ones
WEIGHTS = ("auto", "ema", "raw")
# Where a task keeps the DiT: pretrain / SR tasks (`model`), dmd2 (`student`, the network we distil into).
TASK_PREFIXES = ("model.", "student.")
# Where FSDP2 runs keep the EMA of those (tasks/ema.py ShardedEMA), beside the raw weights in the same state dict.
EMA_PREFIXES = {"model.": "ema.", "student.": "student_ema."}
# Module names that wrappers (activation checkpointing, FSDP, torch.compile, DeepSpeed) insert into keys; the
# look-behind (start or a dot) lets adjacent parts (`_orig_mod._checkpoint_wrapped_module.`) all match.
_WRAPPER_PARTS = re.compile(
    r"(?<![^.])(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod|_forward_module)\."
)
# DiTConfig fields that change how the model runs, not its weights: never compared, reset when rebuilding.
RUNTIME_FIELDS = {"activation_checkpointing": "none", "ac_every": 1, "compile": False, "tread": None}
# the attention pattern is not in the weights: full-attention SR weights may be trained or sampled frame-locally
_ATTENTION_PATTERN = ("local_attn_layers", "frame_receptive_field")
_RUNTIME_COMPARE_SKIP = (*RUNTIME_FIELDS, "attn_backend", *_ATTENTION_PATTERN)
_SOURCE_HINT = (
    "expected a released-format DiT directory (model.safetensors.index.json with its shards, or model.safetensors), "
    "one of our checkpoints (<run_dir>/checkpoints/last.ckpt) or a sharded checkpoint directory (DeepSpeed, FSDP)"
)
# Globals DeepSpeed 0.19 pickles into ZeRO optimizer shards: plain state holders, no behaviour on load.
_DEEPSPEED_GLOBALS = {
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
}
_DCP_META = "meta.pt"  # Lightning's FSDP sharded checkpoints keep everything but tensors here


@dataclass
class LoadedDiT:
    """A DiT with its weights and where they came from (recorded in generate's JSON and in logs)."""

    model: DiT
    source: str  # "released" | "lightning" | "deepspeed" | "dcp" | "training" (a live model)
    weights: str  # "ema" | "raw" | "released"
    path: str
    task: str | None = None  # the training task of one of our checkpoints
    config: dict[str, Any] | None = None  # the run's resolved config stored in the checkpoint
    lora: dict[str, Any] | None = None  # a LoRA adapter added live (generate.lora): path, scale, rank, alpha

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "weights": self.weights,
            "task": self.task,
            "parameters": self.model.num_parameters(),
            "lora": self.lora,
        }


# ---------------------------------------------------------------------------------------------------------
# model configs
# ---------------------------------------------------------------------------------------------------------


def model_config_from_dict(values: dict[str, Any], where: str) -> DiTConfig:
    """The DiTConfig of a saved `magi_config["model"]`; unknown fields are an error, runtime switches reset."""
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: model config has unknown fields {unknown}; was it written by another version?"
        )
    cfg = DiTConfig(**{k: _plain(v) for k, v in values.items()})
    for key, value in RUNTIME_FIELDS.items():
        setattr(cfg, key, value)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return cfg


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def check_same_architecture(saved: DiTConfig, cfg: DiTConfig, where: str) -> None:
    """A clear error when a checkpoint was trained with another model config than the one asked for."""
    diff = []
    for f in dataclasses.fields(DiTConfig):
        ours, theirs = _plain(getattr(cfg, f.name)), _plain(getattr(saved, f.name))
        if f.name not in _RUNTIME_COMPARE_SKIP and ours != theirs:
            diff.append(f"model.{f.name}: checkpoint {theirs!r}, this run {ours!r}")
        elif f.name in _ATTENTION_PATTERN and ours != theirs:
            log.info("%s: model.%s is %r here, %r where it was trained", where, f.name, ours, theirs)
    if diff:
        raise ValueError(
            f"{where} was trained with another model config ({'; '.join(diff[:4])}); select the same model "
            "(e.g. model=tiny for the smoke checkpoints)"
        )


# ---------------------------------------------------------------------------------------------------------
# state dicts of every source kind
# ---------------------------------------------------------------------------------------------------------


def source_kind(source: str | Path) -> str:
    """'released', 'lightning', 'deepspeed' or 'dcp' (see the module docstring); ValueError if it is none."""
    p = Path(source)
    if p.suffix in (".safetensors", ".json", ".zst") or (p.is_dir() and _is_released_dir(p)):
        if not p.exists() and not p.with_name(p.name + ".zst").exists():
            raise ValueError(f"{source}: no such file; {_SOURCE_HINT}")
        return "released"
    if p.is_file():
        return "lightning"
    if not p.is_dir():
        raise ValueError(f"{source} does not exist; {_SOURCE_HINT}")
    if (p / ".metadata").is_file():
        return "dcp"
    if (p / "latest").is_file() or any(p.glob("*/*model_states.pt")):
        return "deepspeed"
    present = sorted(q.name for q in p.iterdir())
    shown = ", ".join(present[:8]) + (f", ... (+{len(present) - 8} more)" if len(present) > 8 else "")
    raise ValueError(
        f"{source} is a directory of none of the known kinds (contents: {shown or 'empty'}); {_SOURCE_HINT}"
    )


def _is_released_dir(p: Path) -> bool:
    return any(p.glob("*.safetensors*")) or any(p.glob("*.safetensors.index.json"))


def strip_wrapper_parts(key: str) -> str:
    """A parameter name without the module names that wrappers (checkpointing, FSDP1, compile) insert."""
    return _WRAPPER_PARTS.sub("", key)


def strip_task_prefix(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """LightningModule keys (`model.<dit key>`, maybe with wrapper parts) -> bare DiT keys."""
    state = {_WRAPPER_PARTS.sub("", k): v for k, v in state.items()}
    for prefix in TASK_PREFIXES:
        sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    raise ValueError(
        f"{where}: no DiT weights under {' or '.join(repr(p) for p in TASK_PREFIXES)}; keys look like {list(state)[:4]}"
    )


def _read_lightning(path: Path, weights: str) -> tuple[dict[str, Tensor], dict | None, str]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"could not read {path} as a Lightning checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    has_ema = "current_model_state" in ckpt
    if weights == "ema" and not has_ema:
        raise ValueError(f"weights=ema but {path} holds no EMA weights (trained with ema.decay=0?)")
    use_ema = has_ema and weights != "raw"
    state = ckpt["state_dict"] if use_ema or not has_ema else ckpt["current_model_state"]
    return strip_task_prefix(state, str(path)), ckpt.get("magi_config"), "ema" if use_ema else "raw"


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
    """The tag folder that `latest` names (else the only one holding model states)."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise ValueError(
                f"DeepSpeed checkpoint {path}: its `latest` names {tag!r}, which is not a folder there"
            )
        return path / tag
    tags = sorted({q.parent for q in path.glob("*/*model_states.pt")})
    if len(tags) != 1:
        raise ValueError(
            f"DeepSpeed checkpoint {path} has no `latest` file and {len(tags)} tag folders: name one"
        )
    return tags[0]


def _read_deepspeed(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = _deepspeed_tag_dir(path)
    _check_pickle_globals(sorted(tag_dir.glob("*.pt")), _DEEPSPEED_GLOBALS)
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    client = torch.load(model_states[0], map_location="cpu", weights_only=True, mmap=True)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)  # merges the ZeRO shards
    return strip_task_prefix(state, str(path)), client.get("magi_config")


def dcp_keys(path: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    with (path / ".metadata").open("rb") as f:
        _MetadataUnpickler(f).load()  # a safety scan: FileSystemReader unpickles it unrestricted
    return list(FileSystemReader(path).read_metadata().state_dict_metadata)


def _dcp_model_entry(path: Path, keys: list[str]) -> str:
    """The entry holding the module's weights: `state_dict` (Lightning ModelParallelStrategy) or `model` (FSDP1)."""
    for entry in ("state_dict", "model"):
        if any(k.startswith(entry + ".") for k in keys):
            return entry
    raise ValueError(
        f"distributed checkpoint {path} has no 'state_dict' or 'model' entry (not written by Lightning?)"
    )


def dcp_task_prefix(path: Path, weights: str) -> tuple[str, str]:
    """(flattened key prefix of the DiT weights in a DCP checkpoint, "ema" | "raw") for `weights`."""
    keys = dcp_keys(path)
    entry = _dcp_model_entry(path, keys)
    for prefix in TASK_PREFIXES:
        if any(k.startswith(f"{entry}.{prefix}") for k in keys):
            ema = EMA_PREFIXES[prefix]
            has_ema = any(k.startswith(f"{entry}.{ema}") for k in keys)
            if weights == "ema" and not has_ema:
                raise ValueError(f"weights=ema but {path} holds no EMA weights (trained with ema.decay=0?)")
            use_ema = has_ema and weights != "raw"
            return f"{entry}.{ema if use_ema else prefix}", "ema" if use_ema else "raw"
    raise ValueError(f"{path}: no DiT weights under {' or '.join(TASK_PREFIXES)} in its '{entry}' entry")


def _read_dcp(path: Path, weights: str = "auto") -> tuple[dict[str, Tensor], dict | None, str]:
    """The whole DiT of a DCP checkpoint in one read (only its entry: the optimizer states beside it are twice as
    large and not needed); `stream_dcp` reads it a few tensors at a time."""
    shapes, fetch, config, which = stream_dcp(path, weights)
    return fetch(list(shapes)), config, which


def stream_dcp(path: str | Path, weights: str = "auto"):
    """(shapes, fetch, run config, "ema" | "raw") of the DiT in a DCP checkpoint, read a few tensors at a time:
    `fetch(keys)` loads just those DiT keys (consolidate streams a 15B checkpoint into safetensors this way)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    prefix, which = dcp_task_prefix(path, weights)
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    by_key = {_WRAPPER_PARTS.sub("", k.removeprefix(prefix)): k for k in metadata if k.startswith(prefix)}
    shapes = {k: tuple(metadata[full].size) for k, full in by_key.items()}

    def fetch(keys: list[str]) -> dict[str, Tensor]:
        loaded: dict[str, Any] = {}
        wanted = {by_key[k] for k in keys}
        _load_state_dict(loaded, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=wanted),
                         no_dist=True)  # fmt: skip
        flat = _flatten(loaded)
        return {k: flat[by_key[k]] for k in keys}

    meta_file = path / _DCP_META
    meta = torch.load(meta_file, map_location="cpu", weights_only=True) if meta_file.is_file() else {}
    return shapes, fetch, meta.get("magi_config"), which


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_dit_state(
    source: str | Path, weights: str = "auto"
) -> tuple[dict[str, Tensor], dict | None, str, str]:
    """(bare DiT state dict, the run's resolved config or None, "ema" | "raw", kind) of one of our checkpoints.

    Any kind but "released" (which is streamed into a model by `load_dit`). weights: "auto" the EMA weights when
    the checkpoint has them, else the raw ones; "ema" requires them (an error for sharded checkpoints, which never
    hold them); "raw" the trained weights. The tensors may be memory-mapped from the file: copy before writing.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    path = Path(source)
    kind = source_kind(path)
    if kind == "released":
        raise ValueError(
            f"{source} is a released-format checkpoint (no EMA, no config): load it with load_dit(source, cfg)"
        )
    if kind == "lightning":
        state, config, which = _read_lightning(path, weights)
        return state, config, which, kind
    if kind == "dcp":
        state, config, which = _read_dcp(path, weights)
        return state, config, which, kind
    if weights == "ema":
        raise ValueError(f"weights=ema but {path} is a DeepSpeed checkpoint, which holds no EMA weights")
    state, config = _read_deepspeed(path)
    return state, config, "raw", kind


# ---------------------------------------------------------------------------------------------------------
# LoRA runs: checkpoints hold adapters only; the base is the run's init_from / distill.teacher.checkpoint
# ---------------------------------------------------------------------------------------------------------

# state-dict prefixes of adapters: raw (pretrain / SR `model.`, shared-base DMD-2 `base.`, three-copy DMD-2 `student.`)
# and EMA (ShardedEMA `ema.` / `student_ema.`; StudentEMA's Lightning layout puts the EMA student under `student.`)
_ADAPTER_RAW = ("model.", "base.", "student.")
_ADAPTER_EMA = ("ema.", "student_ema.")


def _run_config(path: Path, kind: str) -> dict | None:
    """The run config stored in one of our checkpoints; None if there is none or the file does not read (the
    loaders then say what is wrong with it)."""
    try:
        if kind == "lightning":
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return ckpt.get("magi_config") if isinstance(ckpt, dict) else None
        if kind == "dcp" and (path / _DCP_META).is_file():
            meta = torch.load(path / _DCP_META, map_location="cpu", weights_only=True)
            return meta.get("magi_config") if isinstance(meta, dict) else None
    except Exception:  # torch raises several types for a corrupt or foreign file
        return None
    return None


def lora_run(source: str | Path) -> dict | None:
    """The run config of a LoRA training checkpoint (its `lora` node set), else None."""
    path = Path(source)
    kind = source_kind(path)
    config = _run_config(path, kind) if kind in ("lightning", "dcp") else None
    return config if isinstance(config, dict) and config.get("lora") else None


def _adapter_entries(path: Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(state_dict, current_model_state or None) restricted to adapter keys, wrapper parts removed."""
    from magi_train.models.lora import is_adapter_key

    if kind == "lightning":
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        parts = [ckpt["state_dict"], ckpt.get("current_model_state")]
    else:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        keys = [k for k in dcp_keys(path) if k.startswith("state_dict.") and is_adapter_key(k)]
        loaded: dict[str, Any] = {}
        _load_state_dict(loaded, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                         no_dist=True)  # fmt: skip
        parts = [{k.removeprefix("state_dict."): v for k, v in _flatten(loaded).items()}, None]
    return tuple(
        None if p is None else {_WRAPPER_PARTS.sub("", k): v for k, v in p.items() if is_adapter_key(k)}
        for p in parts
    )


def read_adapter_checkpoint(
    source: str | Path, weights: str = "auto", adapter: str | None = None
) -> tuple[dict[str, Tensor], str, str, dict]:
    """(adapter tensors in the exchange format of models/lora.py, its name, "ema" | "raw", run config) of a LoRA
    run's checkpoint (.ckpt or DCP directory). adapter: which one (default: `default`, DMD-2's `student`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    path = Path(source)
    config = lora_run(path)
    if config is None:
        raise ValueError(f"{source} is not the checkpoint of a LoRA run (its config has no lora settings)")
    name = adapter or ("student" if config.get("task") == "dmd2" else "default")
    state, raw_state = _adapter_entries(path, source_kind(path))
    raw_state = raw_state if raw_state is not None else state
    lightning_ema = (
        raw_state is not state
    )  # StudentEMA layout: state_dict holds the EMA student under `student.`

    def pick(entries: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
        out = {}
        for key, value in entries.items():
            prefix, _, rest = key.partition("block.")
            path_part, _, tail = rest.partition(".lora.")
            owner, expert, ab = tail.split(".")
            if prefix in prefixes and owner == name:
                out[f"block.{path_part}.{expert}.lora_{ab}.weight"] = value.float()
        return out

    ema = pick(state, _ADAPTER_EMA + (("student.",) if lightning_ema else ()))
    if weights == "ema" and not ema:
        raise ValueError(
            f"weights=ema but {source} holds no EMA of adapter {name!r} (trained with ema.decay=0?)"
        )
    if ema and weights != "raw":
        return ema, name, "ema", config
    raw = pick(raw_state, _ADAPTER_RAW)
    if not raw:
        raise ValueError(f"{source} holds no adapter {name!r}: name one (critic, student, default)")
    return raw, name, "raw", config


def lora_base_source(config: dict) -> tuple[str, str]:
    """(the base weights of a LoRA run, the key naming them): init_from, or the DMD-2 teacher."""
    if config.get("task") == "dmd2":
        return config["distill"]["teacher"]["checkpoint"], "distill.teacher.checkpoint"
    return config.get("init_from"), "init_from"


def _load_lora_run(source: str | Path, cfg: DiTConfig | None, weights: str, what: str, device, dtype_policy):
    """A LoRA run's checkpoint as a DiT: its base (from where the run read it) with the trained adapter live."""
    from magi_train.models.lora import LoRAConfig as _LoRAConfig
    from magi_train.models.lora import add_adapter_tensors

    tensors, name, which, config = read_adapter_checkpoint(source, weights)
    base, key = lora_base_source(config)
    stored = model_config_from_dict(dict(config["model"]), f"{what}={source}")
    if cfg is not None:
        check_same_architecture(stored, cfg, f"{what}={source}")
    try:
        loaded = load_dit(base, cfg or stored, what=f"{what}={source} -> its base ({key})", device=device,
                          dtype_policy=dtype_policy)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{err}; a LoRA checkpoint needs the base it was trained on") from err
    lora_cfg = _LoRAConfig(**config["lora"])  # the run's resolved `lora` node
    add_adapter_tensors(loaded.model, lora_cfg, tensors, name, f"{what}={source}")
    meta = {"path": str(source), "adapter": name, "weights": which, "base": str(base), "rank": lora_cfg.rank}
    return LoadedDiT(loaded.model, source_kind(source), which, str(source), config.get("task"), config, meta)


# ---------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------


def load_state_strict(model: DiT, state: dict[str, Tensor], where: str, assign: bool = False) -> None:
    """`model.load_state_dict(state, strict=True)` with one ValueError naming every missing, unexpected or
    mis-shaped key (torch raises RuntimeError for shapes only after the key check).

    assign=False copies (and casts) each tensor into the model's own storage, whatever its device and dtype;
    assign=True makes the model (e.g. one on the meta device) hold the state's tensors themselves, no copy.
    """
    check_keys(model.state_dict(), state, where)
    model.load_state_dict(state, strict=True, assign=assign)


def check_keys(own: dict[str, Tensor], state: dict[str, Tensor], where: str) -> None:
    """One ValueError naming every missing, unexpected or mis-shaped key of `state` against the model's `own`
    (DTensor shards report their global shape)."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: the weights do not fit the model config; missing {missing[:6]} ({len(missing)}), "
            f"unexpected {unexpected[:6]} ({len(unexpected)}), shapes {shapes[:4]} ({len(shapes)}); select the "
            "model the checkpoint was trained with"
        )


def empty_dit(cfg: DiTConfig, device: str | torch.device = "cpu", dtype_policy: str = "fp32") -> DiT:
    """A DiT with uninitialised storage on `device`: every tensor is then loaded (strictly) from a checkpoint.

    dtype_policy "base" stores the block linears in bf16 as the released base checkpoint (spec §2.10), so a big
    model never holds an fp32 copy on the device; norms, adapter and heads stay fp32. Run it under bf16 autocast.
    """
    with torch.device("meta"):
        model = DiT(cfg)
    return apply_dtype_policy(model, dtype_policy).to_empty(device=device)


def apply_dtype_policy(model: DiT, dtype_policy: str) -> DiT:
    """Store each parameter in the dtype of the policy, in place ("fp32": all fp32; "base": the block linears in
    bf16 as the released base checkpoint, spec §2.10; norms, adapter and heads fp32)."""
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy={dtype_policy!r}: use one of {DTYPE_POLICIES}")
    for name, param in model.named_parameters():
        param.data = param.data.to(released_dtype(name, dtype_policy))
    return model


def check_source(source: str | Path | None, what: str) -> str:
    """Fail fast, before anything is loaded, when a weight source is unset or of no known kind; returns the kind."""
    if not source:
        raise ValueError(f"{what} is not set; {_SOURCE_HINT}")
    try:
        return source_kind(source)
    except ValueError as err:  # its messages start with the source: "<what>=<source> does not exist; ..."
        raise ValueError(f"{what}={err}") from err


def load_dit(
    source: str | Path,
    cfg: DiTConfig | None = None,
    weights: str = "auto",
    *,
    what: str = "checkpoint",
    device: str | torch.device = "cpu",
    dtype_policy: str = "fp32",
) -> LoadedDiT:
    """Build a DiT and load its weights strictly from any source kind (module docstring).

    cfg: the model config; required for released weights (they carry none), else checked against the config
    stored in the checkpoint (None: rebuild from it). weights: "auto" | "ema" | "raw" (`read_dit_state`) for our
    checkpoints; released weights are what they are ("ema" is an error there). dtype_policy: `empty_dit`.
    `what` names the setting in errors (e.g. "init_from", "distill.teacher.checkpoint"). The model is returned
    as built (train mode, trainable): callers that sample set `.eval().requires_grad_(False)`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    kind = check_source(source, what)
    path = Path(source)
    if kind == "released":
        if cfg is None:
            raise ValueError(
                f"{what}={source}: released-format weights carry no model config; name one (model=...)"
            )
        if weights == "ema":
            raise ValueError(
                f"weights=ema but {what}={source} is released-format (no EMA / raw split): use auto"
            )
        model = empty_dit(copy.deepcopy(cfg), device, dtype_policy)
        try:
            load_released(model, path)
        except FileNotFoundError as err:
            raise ValueError(f"{what}={source}: {err}; {_SOURCE_HINT}") from err
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err
        return LoadedDiT(model, "released", "released", str(path))
    if lora_run(path) is not None:  # adapters only: the run's base with them, live
        return _load_lora_run(path, cfg, weights, what, device, dtype_policy)
    state, config, which, kind = read_dit_state(path, weights)
    stored = config.get("model") if isinstance(config, dict) else None
    if cfg is None:
        if not isinstance(stored, dict):
            raise ValueError(
                f"{what}={source} stores no model config (magi_config): not written by magi_train; name the model"
            )
        cfg = model_config_from_dict(dict(stored), f"{what}={source}")
    elif isinstance(stored, dict):
        check_same_architecture(
            model_config_from_dict(dict(stored), f"{what}={source}"), cfg, f"{what}={source}"
        )
    model = empty_dit(copy.deepcopy(cfg), device, dtype_policy)
    load_state_strict(model, state, f"{what}={source}")
    if weights == "auto" and which == "raw":
        log.info("%s=%s holds no EMA weights: loaded the raw (trained) ones", what, source)
    task = config.get("task") if isinstance(config, dict) else None
    return LoadedDiT(model, kind, which, str(path), task, config)


# ---------------------------------------------------------------------------------------------------------
# sharded models (FSDP2): built on the meta device, sharded, materialised, then filled rank by rank
# ---------------------------------------------------------------------------------------------------------


def _init_value(name: str, shape: tuple[int, ...], cfg: DiTConfig, generator: torch.Generator) -> Tensor:
    """The value DiT.__init__ gives parameter `name` (same distributions; drawn from a per-name stream)."""
    if name.endswith("rope.bands"):
        return rope_bands(cfg.head_dim, cfg.rope_temperature).float()
    if name.startswith("final_linear_") or name.endswith("norm.weight") or "_norm" in name.rsplit(".", 2)[-2]:
        return torch.zeros(shape)  # zero heads; zero-centred RMSNorm weights
    if name.startswith("adapter."):  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
        fan_in = shape[1] if len(shape) == 2 else _ADAPTER_FAN_IN[name.rsplit(".", 2)[-2]](cfg)
        return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
    return torch.randn(shape, generator=generator) * shape[1] ** -0.5  # ModalityLinear: N(0, 1/in) per expert


_ADAPTER_FAN_IN = {
    "video_embedder": lambda c: c.video_in_channels,
    "audio_embedder": lambda c: c.audio_in_channels,
    "text_embedder": lambda c: c.text_in_channels,
}


@torch.no_grad()
def init_weights(model: DiT, seed: int) -> DiT:
    """Initialise a materialised (possibly sharded) DiT as DiT.__init__ does, with every tensor drawn from a stream of
    its own name and `seed`: the same weights whatever the number of ranks, each rank filling only its shards."""
    for name, t in model.state_dict(keep_vars=True).items():
        if is_adapter_key(name):
            continue  # LoRA adapters have their own initialisation (models/lora.py init_adapters)
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        fill(t, _init_value(name, tuple(t.shape), model.cfg, gen))
    return model


def load_into(model: DiT, source: str | Path, weights: str = "auto", *, what: str = "checkpoint") -> str:
    """Fill a materialised, possibly sharded DiT from any weight source, strictly; returns "ema" | "raw" |
    "released". Released safetensors are read as slices and our checkpoints memory-mapped, so each rank reads
    only the rows of its own shards (no rank holds a whole role)."""
    kind = check_source(source, what)
    if kind == "released":
        if weights == "ema":
            raise ValueError(
                f"weights=ema but {what}={source} is released-format (no EMA / raw split): use auto"
            )
        try:
            load_released(model, Path(source))
        except FileNotFoundError as err:
            raise ValueError(f"{what}={source}: {err}; {_SOURCE_HINT}") from err
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err
        return "released"
    state, config, which, _ = read_dit_state(source, weights)
    stored = config.get("model") if isinstance(config, dict) else None
    if isinstance(stored, dict):
        where = f"{what}={source}"
        check_same_architecture(model_config_from_dict(dict(stored), where), model.cfg, where)
    # the weights of a base: LoRA adapters on it are initialised (or resumed) apart from it
    own = {k: t for k, t in model.state_dict(keep_vars=True).items() if not is_adapter_key(k)}
    check_keys(own, state, f"{what}={source}")
    for key, t in own.items():
        fill(t, state[key])
    return which


__all__ = [
    "stream_dcp",
    "dcp_keys",
    "dcp_task_prefix",
    "strip_wrapper_parts",
    "init_weights",
    "load_into",
    "lora_base_source",
    "lora_run",
    "read_adapter_checkpoint",
    "DTYPE_POLICIES",
    "WEIGHTS",
    "LoadedDiT",
    "check_same_architecture",
    "apply_dtype_policy",
    "check_source",
    "empty_dit",
    "load_dit",
    "load_state_strict",
    "model_config_from_dict",
    "read_dit_state",
    "source_kind",
    "strip_task_prefix",
]
