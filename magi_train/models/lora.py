"""Low-rank adapters (LoRA, Hu et al., arXiv 2106.09685) on the DiT's block linears, added from outside the model.

`add_adapters(model, cfg, names)` replaces each targeted `ModalityLinear` by a `LoRAModalityLinear` that shares the
base weight (state-dict keys of the base unchanged) and adds, per adapter name, one low-rank pair per expert: in the
modality-specific (sandwich) layers the video, audio and text experts each get their own pair on their own slice of
the stacked weight; in the shared layers one pair (`shared`) serves the tokens of the configured modalities. The base
is frozen, the adapters train; B starts at zero, so an adapted model starts equal to its base.

Several adapters can live in one model (shared-base DMD-2: `critic` and `student` on the one frozen base, which is
also the teacher); `active(name)` chooses the one that the forwards inside it use, `active(NONE)` the bare base.
Outside any `active`, a model with one adapter uses it. The choice is process state read by each layer, so
activation checkpointing captures it at the forward and restores it for the recompute (`recompute_contexts`).

Why by hand and not PEFT: a `ModalityLinear` routes token slices through a packed layout and stacks its experts on
the output dim, so PEFT's LoRA layers (nn.Linear / Conv) do not apply and its custom-module hook would still need
this forward and this merge; PEFT's `set_adapter` also flips `requires_grad` to switch adapters, which under FSDP2
loses gradients (the parameters are gathered with the flag of their first all-gather; see tasks/dmd2.py), while
the two DMD-2 adapters must both stay trainable and switch many times per step.

Exported adapters (`adapter_tensors` / `save_adapter`) are safetensors with keys `<module>.<expert>.lora_A.weight`
[r, in] and `<module>.<expert>.lora_B.weight` [out, r] (module = released key path, e.g.
`block.layers.0.attention.linear_qkv`; expert = video | audio | text | shared) and metadata rank, alpha, targets,
modalities, layers (docs/lora.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magi_train.models.dit import NUM_MODALITIES, DiT, ModalityLinear, PackedSeq
from magi_train.models.shards import fill, is_sharded

TARGETS = ("linear_qkv", "linear_proj", "up_gate_proj", "down_proj")  # the block linears
_PARENT = {"linear_qkv": "attention", "linear_proj": "attention", "up_gate_proj": "mlp", "down_proj": "mlp"}
EXPERTS = ("video", "audio", "text")  # the released expert order of stacked weights (dit.VIDEO, AUDIO, TEXT)
SHARED = "shared"  # the one pair of a shared (single-expert) linear
DEFAULT = "default"  # the adapter name of LoRA pretraining
NONE = ""  # active(NONE): the bare base (the DMD-2 teacher of a shared base)
FORMAT = "magi_train.lora.v1"


@dataclass
class LoRAConfig:
    """Adapters of one model (group `lora`; docs/lora.md). Only the adapters train; the base stays frozen."""

    rank: int = 32
    alpha: float = 32.0  # the update is scaled by alpha / rank (Hu et al.)
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    layers: list[int] | None = None  # layer indices; None = every layer
    modalities: list[str] = field(default_factory=lambda: list(EXPERTS))  # experts / tokens adapted
    # dmd2_distill: one frozen base for teacher, critic (base + critic adapter) and student (base + student adapter);
    # false: three copies of the base, each trainable role with its own adapter (the reference of the shared one)
    shared_base: bool = True

    def validate(self, num_layers: int) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid lora config: {msg}")

        if self.rank < 1:
            fail(f"lora.rank={self.rank}: use 1 or more")
        if self.alpha <= 0:
            fail(f"lora.alpha={self.alpha}: use a positive scale (the update is alpha / rank x B A)")
        if not 0 <= self.dropout < 1:
            fail(f"lora.dropout={self.dropout}: use a probability in [0, 1)")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            fail(f"lora.targets={list(self.targets)}: choose from {list(TARGETS)}")
        bad = sorted(set(self.modalities) - set(EXPERTS))
        if bad or not self.modalities:
            fail(f"lora.modalities={list(self.modalities)}: choose from {list(EXPERTS)}")
        if self.layers is not None:
            out = [i for i in self.layers if not 0 <= i < num_layers]
            if out or not self.layers:
                fail(f"lora.layers={list(self.layers)}: give indices in [0, {num_layers}) or null for all")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------------------------------------------------
# the active adapter
# ---------------------------------------------------------------------------------------------------------

_active: list[str | None] = [None]  # None: a model's only adapter; NONE: the base; else an adapter name


@contextlib.contextmanager
def active(name: str | None) -> Iterator[None]:
    """Forwards inside use adapter `name` (NONE: the base alone; None: each model's only adapter)."""
    before = _active[0]
    _active[0] = name
    try:
        yield
    finally:
        _active[0] = before


def current() -> str | None:
    """The adapter chosen by the innermost `active` (None outside any)."""
    return _active[0]


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of activation checkpointing: the recompute runs with the adapter of the original forward."""
    return contextlib.nullcontext(), active(_active[0])


# ---------------------------------------------------------------------------------------------------------
# the adapted linear
# ---------------------------------------------------------------------------------------------------------


class LoRAPair(nn.Module):
    """delta(x) = B A x for one expert: A [r, in], B [out, r] (B zero at the start)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) default for A

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B)


class LoRAModalityLinear(ModalityLinear):
    """A ModalityLinear (same weight Parameter, same key) with low-rank adapters per expert (module docstring)."""

    def __init__(self, base: ModalityLinear, modalities: list[str]):
        nn.Module.__init__(self)
        self.num_modality = base.num_modality
        self.weight = base.weight  # shared: the base's key, shards and storage are unchanged
        self.lora = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.dropouts: dict[str, float] = {}
        # which modality ids an expert covers: one each in a sandwich layer, the configured ones in a shared layer
        self.covers = {EXPERTS.index(m) for m in modalities}
        self.experts = [m for m in EXPERTS if m in modalities] if self.num_modality > 1 else [SHARED]

    def add(self, name: str, rank: int, alpha: float, dropout: float) -> None:
        out = self.weight.shape[0] // self.num_modality
        self.lora[name] = nn.ModuleDict(
            {e: LoRAPair(self.weight.shape[1], out, rank).to(self.weight.device) for e in self.experts}
        )
        self.scales[name], self.dropouts[name] = alpha / rank, dropout

    def chosen(self) -> str | None:
        name = _active[0]
        if name is None:
            if len(self.lora) > 1:
                raise RuntimeError(
                    f"a model with adapters {sorted(self.lora)} ran outside models.lora.active(...): choose one"
                )
            return next(iter(self.lora), None)
        return name if name in self.lora else None

    def _delta(self, name: str, expert: str, x: Tensor) -> Tensor:
        p = self.dropouts[name]
        if p and self.training:
            x = F.dropout(x, p)
        pair = self.lora[name][expert]
        return pair(x.to(pair.A.dtype)) * self.scales[name]  # autocast, if on, computes it in bf16

    def forward(self, x: Tensor, seq: PackedSeq | None = None) -> Tensor:
        name = self.chosen()
        if name is None:
            return super().forward(x, seq)
        if self.num_modality == 1:
            out = F.linear(x, self.weight)
            if len(self.covers) == NUM_MODALITIES:
                return out + self._delta(name, SHARED, x).to(out.dtype)
            parts = seq.by_modality(x)  # the delta on the configured modalities' tokens only
            deltas = [
                self._delta(name, SHARED, p) if m in self.covers else p.new_zeros(p.shape[0], out.shape[1])
                for m, p in enumerate(parts)
            ]
            return out + seq.from_modality(deltas).to(out.dtype)
        parts = seq.by_modality(x)
        weights = self.weight.chunk(self.num_modality)
        outs = []
        for m, (p, w) in enumerate(zip(parts, weights, strict=True)):
            y = F.linear(p, w)
            if m in self.covers:
                y = y + self._delta(name, EXPERTS[m], p).to(y.dtype)
            outs.append(y)
        return seq.from_modality(outs)

    @torch.no_grad()
    def merge(self, name: str, scale: float = 1.0) -> None:
        """weight += scale x alpha/r x B A, each expert's delta into its own rows of the stacked weight."""
        if self.num_modality == 1 and len(self.covers) < NUM_MODALITIES:
            raise ValueError(
                f"adapter {name!r} of a shared linear adapts only some modalities "
                f"({[EXPERTS[m] for m in sorted(self.covers)]}): it has "
                "no merged form (one shared weight serves every token); load it live (generate.lora) instead"
            )
        out = self.weight.shape[0] // self.num_modality
        for expert, pair in self.lora[name].items():
            first = 0 if expert == SHARED else EXPERTS.index(expert) * out
            rows = slice(first, first + out)
            delta = (pair.B.float() @ pair.A.float()) * (self.scales[name] * scale)
            self.weight[rows] += delta.to(self.weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# building, initialising, freezing
# ---------------------------------------------------------------------------------------------------------


def target_paths(model: DiT, cfg: LoRAConfig) -> list[str]:
    """Module paths of the targeted linears, in layer order (released key paths)."""
    layers = range(model.cfg.num_layers) if cfg.layers is None else sorted(set(cfg.layers))
    return [f"block.layers.{i}.{_PARENT[t]}.{t}" for i in layers for t in TARGETS if t in cfg.targets]


def add_adapters(model: DiT, cfg: LoRAConfig, names: tuple[str, ...] = (DEFAULT,), seed: int = 0) -> DiT:
    """Add adapters `names` to `model` in place (before parallelize) and freeze everything else; returns it.

    On a materialised model the adapters are initialised from `seed` (A drawn per adapter and module from a stream of
    their names, so the same on any rank count or module tree); on the meta device call `init_adapters` once the
    model is materialised."""
    cfg.validate(model.cfg.num_layers)
    model.requires_grad_(False)
    for path in target_paths(model, cfg):
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, leaf)
        if not isinstance(linear, LoRAModalityLinear):
            linear = LoRAModalityLinear(linear, list(cfg.modalities))
            setattr(parent, leaf, linear)
        for name in names:
            if name in linear.lora:
                raise ValueError(f"adapter {name!r} already exists on {path}")
            linear.add(name, cfg.rank, cfg.alpha, cfg.dropout)
    model.lora_config = cfg  # plain attribute: read by export and the tasks
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    if not any(p.is_meta for p in adapter_parameters(model)):
        init_adapters(model, seed)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRAModalityLinear]]:
    """(released module path, layer) of every adapted linear (wrapper parts removed from the path)."""
    from magi_train.models.weights import strip_wrapper_parts

    for name, module in model.named_modules():
        if isinstance(module, LoRAModalityLinear):
            yield strip_wrapper_parts(name + ".").rstrip("."), module


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters of `model` (of adapter `name` only, if given)."""
    return [
        p
        for _, layer in lora_layers(model)
        for adapter, pairs in layer.lora.items()
        if name is None or adapter == name
        for p in pairs.parameters()
    ]


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter (`...<linear>.lora.<name>.<expert>.A|B`)."""
    return ".lora." in key


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A ~ kaiming-uniform from a stream of (seed, adapter, module, expert), B = 0; fills only local shards."""
    for path, layer in lora_layers(model):
        for adapter, pairs in layer.lora.items():
            for expert, pair in pairs.items():
                key = f"{seed}:{adapter}:{path}:{expert}"
                digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
                rank, fan_in = pair.A.shape
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
                fill(pair.A, (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound)
                fill(pair.B, torch.zeros(tuple(pair.B.shape)))


@torch.no_grad()
def merge_adapters(model: nn.Module, name: str | None = None, scale: float = 1.0) -> None:
    """Fold adapter `name` (None: the only one) into the base weights, then drop every adapter; plain weights only."""
    for _, layer in lora_layers(model):
        if is_sharded(layer.weight):
            raise ValueError(
                "merge the adapters of a whole model (consolidate it first), not of FSDP2 shards"
            )
        chosen = name if name is not None else _only(layer)
        layer.merge(chosen, scale)
    remove_adapters(model)


def remove_adapters(model: nn.Module) -> None:
    """Put plain ModalityLinears back (same weight Parameters): the model is a bare DiT again."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAModalityLinear)]
    for name, layer in found:
        parent_path, _, leaf = name.rpartition(".")
        plain = ModalityLinear.__new__(ModalityLinear)
        nn.Module.__init__(plain)
        plain.num_modality, plain.weight = layer.num_modality, layer.weight
        setattr(model.get_submodule(parent_path), leaf, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config


def _only(layer: LoRAModalityLinear) -> str:
    if len(layer.lora) != 1:
        raise ValueError(f"the model holds adapters {sorted(layer.lora)}: name the one to use")
    return next(iter(layer.lora))


# ---------------------------------------------------------------------------------------------------------
# the exchange format
# ---------------------------------------------------------------------------------------------------------


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The adapter `name` (None: the only one) in the exchange format (module docstring), whole tensors on CPU."""
    out = {}
    for path, layer in lora_layers(model):
        chosen = name if name is not None else _only(layer)
        for expert, pair in layer.lora[chosen].items():
            for tensor, part in ((pair.A, "lora_A"), (pair.B, "lora_B")):
                full = tensor.full_tensor() if is_sharded(tensor) else tensor
                out[f"{path}.{expert}.{part}.weight"] = full.detach().float().cpu().contiguous()
    return out


def format_metadata(cfg: LoRAConfig) -> dict[str, str]:
    """safetensors metadata (strings only) of an exported adapter."""
    values = asdict(cfg)
    values.pop("shared_base")
    return {"format": FORMAT, **{k: json.dumps(v) for k, v in values.items()}}


def config_from_metadata(metadata: dict[str, str] | None, where: str) -> LoRAConfig:
    if not metadata or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a magi_train adapter file (metadata format={(metadata or {}).get('format')!r}, "
            f"expected {FORMAT!r}); docs/lora.md describes the keys and metadata to write"
        )
    try:
        values = {
            k: json.loads(metadata[k])
            for k in ("rank", "alpha", "dropout", "targets", "layers", "modalities")
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{where}: adapter metadata incomplete or not JSON ({err}); see docs/lora.md"
        ) from err
    return LoRAConfig(**values)


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` as one safetensors file (atomic)."""
    import safetensors.torch

    from magi_train.utils.fileio import atomic_file

    cfg = model.lora_config
    tensors = adapter_tensors(model, name)
    atomic_file(Path(path), lambda p: safetensors.torch.save_file(tensors, p, metadata=format_metadata(cfg)))
    return Path(path)


def read_adapter(path: str | Path, where: str = "lora") -> tuple[LoRAConfig, dict[str, Tensor]]:
    """(config, tensors) of an adapter file in the exchange format."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{where}={path} does not exist: give an adapter .safetensors (docs/lora.md)")
    try:
        with safe_open(path, framework="pt") as f:
            cfg = config_from_metadata(f.metadata(), f"{where}={path}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError as err:  # not a safetensors file, or a truncated one
        raise ValueError(
            f"{where}={path} is not a readable safetensors file ({err}); see docs/lora.md"
        ) from err
    return cfg, tensors


def load_adapter(model: DiT, path: str | Path, name: str = DEFAULT, where: str = "lora") -> DiT:
    """Add the adapter of file `path` to `model` (a bare or adapted DiT) as adapter `name`, strictly."""
    cfg, tensors = read_adapter(path, where)
    return add_adapter_tensors(model, cfg, tensors, name, f"{where}={path}")


def add_adapter_tensors(
    model: DiT, cfg: LoRAConfig, tensors: dict[str, Tensor], name: str, where: str
) -> DiT:
    """Add adapter `name` of config `cfg` with the exchange-format `tensors` to `model`, strictly."""
    try:
        add_adapters(model, cfg, (name,))
    except ValueError as err:  # e.g. metadata layers beyond this model's: name the file, not a config group
        raise ValueError(f"{where} does not fit this model: {err} (from its metadata)") from err
    own = {}
    for mod_path, layer in lora_layers(model):
        for expert, pair in layer.lora[name].items():
            own[f"{mod_path}.{expert}.lora_A.weight"] = pair.A
            own[f"{mod_path}.{expert}.lora_B.weight"] = pair.B
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    shapes = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in tensors and tensors[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where} does not fit this model: missing {missing[:4]} ({len(missing)}), unexpected "
            f"{unexpected[:4]} ({len(unexpected)}), shapes {shapes[:3]}; was it trained for another model config?"
        )
    with torch.no_grad():
        for key, t in own.items():
            fill(t, tensors[key])
    return model


__all__ = [
    "DEFAULT",
    "EXPERTS",
    "NONE",
    "SHARED",
    "TARGETS",
    "LoRAConfig",
    "LoRAModalityLinear",
    "LoRAPair",
    "active",
    "adapter_parameters",
    "adapter_tensors",
    "add_adapter_tensors",
    "add_adapters",
    "init_adapters",
    "is_adapter_key",
    "load_adapter",
    "lora_layers",
    "merge_adapters",
    "read_adapter",
    "recompute_contexts",
    "remove_adapters",
    "save_adapter",
    "target_paths",
]
