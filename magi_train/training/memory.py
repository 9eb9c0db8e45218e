"""A memory planner that tells the truth before anything is allocated: per-GPU model state plus activations of a
training recipe, for a model, clip size, strategy, context parallelism and GPU count.

    python -m magi_train.tools.plan [--recipe dmd2_distill] [--model magihuman_15b] [--gpus 8 16 32 64]
                                    [--clip 448x256x5] [--strategy fsdp2] [--cp 1] [--ac]

Model state, per parameter (counts from the model config, the DiT built on the meta device):

- trainable roles (the pretrained DiT; the DMD-2 critic and student): fp32 master weights 4 B + fp32 gradients 4 B
  + AdamW exp_avg and exp_avg_sq 8 B = 16 B; bf16 compute copies exist only for the layer being gathered (FSDP2
  MixedPrecisionPolicy) or are made by autocast per op (DDP), both counted in `transient`;
- the frozen DMD-2 teacher: its weights only, bf16 block linears (2 B) and fp32 norms, adapter, heads (4 B) with
  `distill.teacher.dtype=bf16` (the released base policy), else 4 B;
- EMA (pretraining `ema.decay`, the DMD-2 student's `distill.ema.decay`): an fp32 copy, 4 B.

Under fsdp2 all of it is divided by the GPUs that shard it (dp_shard x cp = all GPUs, dp_replicate 1); under ddp
every GPU holds all of it. `transient`: the layers FSDP2 holds unsharded at once (the current one and the
prefetched next, bf16 weights, plus the fp32 gradients of one before its reduce-scatter).

Activations: the tensors autograd saves for backward, per token and layer, measured on the tiny model under bf16
autocast (`measure_activation_bytes`, with and without activation checkpointing) as bytes per token per hidden
unit, and scaled by hidden size x layers x the tokens of this GPU (its micro-batch / cp). DMD-2 trains one role at
a time (the student's backward ends before the critic's forward), so it counts one role's activations.

LoRA (`lora_rank`, issue 11): adapters A [r, in] and B [out, r] on the four block linears (linear_qkv, linear_proj,
up_gate_proj, down_proj) of every layer, one pair per expert in the modality-specific layers (`mm_layers`: E = 3,
the ModalityLinear weight [E*out, in]; E = 1 elsewhere): E * r * (in + out) parameters per linear
(`lora_parameters`). Adapters train at 16 B per parameter like a trainable role (their EMA 4 B); the base is frozen
(no gradients, no optimizer state) and stored as `base_dtype`: bf16 block linears (2 B) or fp8 e4m3 (1 B plus one
fp32 scale per output channel), the rest fp32. LoRA pretraining holds one base + one adapter set; shared-base DMD-2
holds ONE base (the teacher; critic and student are base + their own adapter) + two adapter sets + the student
adapter's EMA, against three full copies without LoRA. Activations are those of the trained forward, as above (the
backward still runs through the frozen base; the input a frozen linear no longer saves for its weight gradient is
saved for the adapter's), plus the r-wide adapter intermediates, 4 targets x r x 2 B per token and layer (bf16):
256 B per token per layer at r = 32, 0.04% of a 15B layer's 589 kB (counted, `lora_activation_bytes`).
`transient` under fsdp2: two gathered base layers in the storage dtype, one layer dequantised to bf16 (fp8), the
fp32 gradients of one layer's adapters.

NOT counted: the CUDA context and allocator fragmentation (the `margin`), communication buffers, attention
workspaces (flash attention needs O(tokens) extra), the optional GAN head of DMD-2 (about 2 h^2 parameters, in no
row), LoRA dropout (with dropout > 0 each target also saves its dropped input and mask, ~3 B per input unit per
token: about 15% of an unchecked layer; the rows assume dropout 0).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch

from magi_train.models.checkpoint import released_dtype
from magi_train.models.dit import PATCH, DiT, DiTConfig

GIB = 2**30
H100_GIB = 81559 / 1024  # H100 80GB: nvidia-smi reports 81,559 MiB of memory (79.65 GiB)
# H200 141GB (vendor spec): nvidia-smi reports 143,771 MiB (140.40 GiB; e.g. NVIDIA/cuda-samples issue 311)
H200_GIB = 143771 / 1024
LORA_TARGETS = ("linear_qkv", "linear_proj", "up_gate_proj", "down_proj")  # the block linears of every layer
# storage of LoRA's frozen base: bf16 block linears, or fp8 e4m3 (1 B + one fp32 scale per output row)
BASE_DTYPES = ("bf16", "fp8")
TRAINABLE_BYTES = {"fp32_master": 4, "fp32_grads": 4, "adamw_states": 8}
RECIPES = ("pretrain_base", "pretrain_sr", "dmd2_distill")
# Saved activations under bf16 autocast, measured with `python -m magi_train.tools.plan --measure` (tiny's structure
# at widths 128 and 256, 4 and 8 layers, 1,792 tokens; torch 2.13 CPU; docs/scale.md): bytes per token per hidden
# unit per layer (the difference of 8 and 4 layers), and outside the layers bytes per token = per-hidden x h + fixed
# (the fp32 input features; text tokens have 3,584 channels).
# full: a checkpointed layer keeps only its fp32 input (4 B per unit); selective: matmul and attention outputs
# (models/parallelize.py AC_MODES), measured the same way.
ACT_LAYER = {"none": 115.0, "full": 4.0, "selective": 24.3}
ACT_OUTSIDE_PER_HIDDEN = 8.6
ACT_OUTSIDE_FIXED = 5500.0


@dataclass
class RoleParameters:
    """Parameter counts of one DiT: in block linears (bf16 in the released base policy) and the rest."""

    block_linear: int
    other: int
    largest_layer: int  # parameters of the biggest TransformerLayer (the unit FSDP all-gathers)
    block_linear_rows: int = 0  # output channels of the block linears (one fp8 scale each)

    @property
    def total(self) -> int:
        return self.block_linear + self.other


_COUNTED: dict[str, RoleParameters] = {}  # by repr(cfg): a table plans one model many times


def role_parameters(cfg: DiTConfig) -> RoleParameters:
    """Count the DiT's parameters on the meta device (no memory), split by the released dtype policy."""
    key = repr(cfg)
    if key not in _COUNTED:
        _COUNTED[key] = _count(cfg)
    return copy.copy(_COUNTED[key])


def _count(cfg: DiTConfig) -> RoleParameters:
    with torch.device("meta"):
        model = DiT(cfg)
    block = [p for n, p in model.named_parameters() if released_dtype(n, "base") == torch.bfloat16]
    bf16 = sum(p.numel() for p in block)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in model.block.layers)
    rows = sum(p.shape[0] for p in block)
    return RoleParameters(
        block_linear=bf16, other=total - bf16, largest_layer=largest, block_linear_rows=rows
    )


def teacher_bytes(params: RoleParameters, dtype: str = "bf16") -> int:
    """Bytes of a frozen model's weights (the DMD-2 teacher, LoRA's base; whole model, before sharding): block
    linears in `dtype` (fp8: 1 B + a 4 B scale per output channel), the rest fp32 (fp32: all of it)."""
    if dtype == "bf16":
        return 2 * params.block_linear + 4 * params.other
    if dtype == "fp8":
        return params.block_linear + 4 * params.block_linear_rows + 4 * params.other
    if dtype == "fp32":
        return 4 * params.total
    raise ValueError(f"frozen weights dtype {dtype!r}: use bf16, fp8 or fp32")


def trainable_bytes(params: RoleParameters) -> int:
    """Bytes of one trainable role's master weights, gradients and AdamW states (before sharding)."""
    return sum(TRAINABLE_BYTES.values()) * params.total


def lora_linears(cfg: DiTConfig) -> list[list[tuple[int, int, int]]]:
    """Per layer, (experts E, in, out per expert) of each LoRA target in LORA_TARGETS order, from the config (the
    layout of models/dit.py: q | k | v | one gate row per query head; SwiGLU7 up_gate has 2x rows)."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads_q, cfg.num_heads_kv
    qkv = (hq + 2 * hkv) * d + (hq if cfg.enable_attn_gating else 0)
    layers = []
    for i in range(cfg.num_layers):
        e = 3 if i in cfg.mm_layers else 1
        gelu = i in cfg.gelu7_layers
        inter = cfg.gelu7_intermediate if gelu else cfg.swiglu7_intermediate
        layers.append([(e, h, qkv), (e, hq * d, h), (e, h, inter if gelu else 2 * inter), (e, inter, h)])
    return layers


def lora_layer_parameters(cfg: DiTConfig, rank: int) -> list[int]:
    """Per layer, the parameters of its adapters of rank `rank`: E * r * (in + out) per target linear."""
    return [sum(e * rank * (i + o) for e, i, o in layer) for layer in lora_linears(cfg)]


def lora_parameters(cfg: DiTConfig, rank: int) -> int:
    """Parameters of one adapter set of rank `rank` (every layer's targets)."""
    return sum(lora_layer_parameters(cfg, rank))


def lora_activation_bytes(cfg: DiTConfig, rank: int, tokens: int, activation_checkpointing) -> int:
    """Saved r-wide adapter intermediates (bf16) of one training forward: per token, 4 targets x r x 2 B per layer;
    with full checkpointing, of the one layer its backward recomputes (selective keeps matmul outputs: all)."""
    from magi_train.models.parallelize import ac_mode

    layers = 1 if ac_mode(activation_checkpointing) == "full" else cfg.num_layers
    return len(LORA_TARGETS) * rank * 2 * tokens * layers


# ---------------------------------------------------------------------------------------------------------
# clip sizes and activations
# ---------------------------------------------------------------------------------------------------------


def clip_tokens(width: int, height: int, seconds: float, text_tokens: int = 640) -> int:
    """DiT sequence length of one clip at the released sampler's sizes (spec §4.2): latent H/16, W/16 rounded to
    even, T = (frames - 1) // 4 + 1 latent frames at 25 fps, one audio latent per frame, text up to 640 tokens."""
    lat_h, lat_w = height // 16 // 2 * 2, width // 16 // 2 * 2
    frames = int(round(seconds * 25)) + 1
    t = (frames - 1) // 4 + 1
    return t * (lat_h // PATCH[1]) * (lat_w // PATCH[2]) + frames + text_tokens


def parse_clip(spec: str) -> tuple[int, int, float]:
    """'448x256x5' -> (448, 256, 5.0): width x height x seconds."""
    try:
        w, h, s = spec.lower().split("x")
        return int(w), int(h), float(s)
    except ValueError:
        raise ValueError(f"clip {spec!r}: give WIDTHxHEIGHTxSECONDS, e.g. 448x256x5") from None


def layer_activation_bytes(activation_checkpointing: bool | str, ac_every: int = 1) -> float:
    """Saved bytes per token per hidden unit of one layer, averaged over the layers (every k-th checkpointed)."""
    from magi_train.models.parallelize import ac_mode

    mode = ac_mode(activation_checkpointing)
    if mode in ("full", "every_k") and ac_every > 1:
        return (ACT_LAYER["full"] + (ac_every - 1) * ACT_LAYER["none"]) / ac_every
    return ACT_LAYER[mode]


def measure_activation_bytes(cfg: DiTConfig, tokens: int, activation_checkpointing: bool | str) -> int:
    """Bytes autograd saves for backward in one training forward of `cfg` over ~`tokens` tokens (one clip), under
    bf16 autocast on CPU: every saved tensor counted once by storage; parameters, and autocast's bf16 copies of
    them (FSDP2 frees its gathered bf16 weights after each layer), are not activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from magi_train.models.dit import TransformerLayer
    from magi_train.models.parallelize import ParallelConfig, ac_mode, parallelize, selective_saved_ops

    torch.manual_seed(0)
    selective = ac_mode(activation_checkpointing) == "selective"
    model = parallelize(DiT(cfg), None, ParallelConfig(activation_checkpointing=activation_checkpointing))
    side = max(
        2, int(math.sqrt(max(tokens - 64, 16) / 2)) // 2 * 2
    )  # video latent 2 x side x side -> ~tokens
    video = torch.randn(cfg.video_in_channels // 4, 2, side, side)
    n_video = 2 * (side // 2) ** 2
    audio = torch.randn(max(1, (tokens - n_video) // 2), cfg.audio_in_channels)
    text = torch.randn(max(1, tokens - n_video - audio.shape[0]), cfg.text_in_channels)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        weight_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
        if ptr not in params and not weight_copy:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    # Selective checkpointing keeps the outputs of its saved ops in its own cache, which saved-tensor hooks do not
    # see: count those outputs, inside the layers, as they are made.
    cached = {"bytes": 0, "inside": 0}
    save_ops = selective_saved_ops() if selective else set()

    class CountSaved(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if cached["inside"] and func in save_ops:
                for t in out if isinstance(out, tuple | list) else (out,):
                    if isinstance(t, torch.Tensor):
                        cached["bytes"] += t.untyped_storage().nbytes()
            return out

    def enter(*_):
        cached["inside"] += 1

    def leave(*_):
        cached["inside"] -= 1

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    handles = [
        h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", torch.bfloat16),
        CountSaved() if selective else contextlib.nullcontext(),
    ):
        out_v, out_a = model([video], [audio], [text])
    for h in handles:
        h.remove()
    n = n_video + audio.shape[0] + text.shape[0]
    del out_v, out_a
    assert abs(n - tokens) <= max(64, tokens // 4), (n, tokens)
    return (sum(seen.values()) + cached["bytes"]) * tokens // n  # rescaled to exactly `tokens`


def activation_bytes(
    cfg: DiTConfig,
    tokens: int,
    activation_checkpointing: bool | str,
    recompute: bool = True,
    ac_every: int = 1,
) -> float:
    """The planner's estimate of the activations of one training forward over `tokens` tokens; with checkpointing
    and `recompute`, plus the one layer that its backward recomputes in full."""
    from magi_train.models.parallelize import ac_mode

    h = cfg.hidden_size
    layer = layer_activation_bytes(activation_checkpointing, ac_every)
    per_token = cfg.num_layers * layer * h + ACT_OUTSIDE_PER_HIDDEN * h
    per_token += ACT_OUTSIDE_FIXED
    if ac_mode(activation_checkpointing) != "none" and recompute:
        per_token += ACT_LAYER["none"] * h
    return per_token * tokens


def measure_constants(tokens: int = 1792) -> dict[str, float]:
    """Re-measure the constants above (printed by `tools/plan --measure`)."""
    out = {}
    outside = {}
    for ac in ("none", "full", "selective"):
        for h in (128, 256):
            m4 = measure_activation_bytes(tiny_like(h, 4), tokens, ac)
            m8 = measure_activation_bytes(tiny_like(h, 8), tokens, ac)
            out[f"layer ac={ac} h={h}"] = (m8 - m4) / (4 * tokens * h)
            outside[(ac, h)] = m4 / tokens - 4 * out[f"layer ac={ac} h={h}"] * h
        per_h = (outside[(ac, 256)] - outside[(ac, 128)]) / 128
        out[f"outside per hidden ac={ac}"] = per_h
        out[f"outside fixed ac={ac}"] = outside[(ac, 128)] - per_h * 128
    return out


# ---------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    """Per-GPU GiB of each part at one GPU count."""

    gpus: int
    trainable: float  # master weights, gradients, optimizer states of the trained role(s)
    teacher: float
    ema: float
    transient: float
    activations: float

    @property
    def total(self) -> float:
        return self.trainable + self.teacher + self.ema + self.transient + self.activations


@dataclass
class PlanSpec:
    recipe: str = "dmd2_distill"
    strategy: str = "fsdp2"  # fsdp2 | ddp
    cp: int = 1
    tokens: int = 0  # per micro-batch (data.max_tokens), before the cp split
    activation_checkpointing: bool | str = "none"  # models/parallelize.py AC_MODES
    ac_every: int = 1
    teacher_dtype: str = "bf16"
    ema: bool = True
    gpus: tuple[int, ...] = field(default=(8, 16, 32, 64))
    # LoRA (issue 11): adapters of this rank train on a frozen base stored in base_dtype (bf16 | fp8); DMD-2 then
    # shares one base between teacher, critic and student. None: full training (every parameter, three DMD-2 copies)
    lora_rank: int | None = None
    base_dtype: str = "bf16"


def plan(cfg: DiTConfig, spec: PlanSpec) -> list[PlanRow]:
    """One PlanRow per GPU count of `spec.gpus`."""
    if spec.recipe not in RECIPES:
        raise ValueError(f"recipe {spec.recipe!r}: plan one of {RECIPES}")
    if spec.strategy not in ("fsdp2", "ddp"):
        raise ValueError(f"strategy {spec.strategy!r}: plan fsdp2 or ddp")
    if spec.strategy == "ddp" and spec.cp != 1:
        raise ValueError("context parallelism (cp > 1) needs strategy fsdp2")
    lora = spec.lora_rank is not None
    if lora and spec.lora_rank < 1:
        raise ValueError(f"lora_rank {spec.lora_rank}: a rank >= 1 (None plans full training)")
    if spec.base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype {spec.base_dtype!r}: use one of {BASE_DTYPES}")
    if spec.base_dtype != "bf16" and not lora:
        raise ValueError(f"base_dtype {spec.base_dtype} is the frozen base of LoRA: set lora_rank too")
    params = role_parameters(cfg)
    roles = 2 if spec.recipe == "dmd2_distill" else 1
    tokens = math.ceil(spec.tokens / spec.cp)
    act = activation_bytes(cfg, tokens, spec.activation_checkpointing, ac_every=spec.ac_every)
    if lora:
        adapter = lora_parameters(cfg, spec.lora_rank)
        trained = roles * sum(TRAINABLE_BYTES.values()) * adapter  # critic + student adapters in DMD-2
        frozen = teacher_bytes(params, spec.base_dtype)  # ONE base: LoRA pretraining's and every DMD-2 role's
        ema = 4 * adapter
        act += lora_activation_bytes(cfg, spec.lora_rank, tokens, spec.activation_checkpointing)
        # two base layers gathered in their storage dtype, one of them dequantised to bf16 when fp8; the fp32
        # gradients of one layer's adapters before their reduce-scatter
        per_param = 2 * 1 + 2 if spec.base_dtype == "fp8" else 2 * 2
        largest_adapter = max(lora_layer_parameters(cfg, spec.lora_rank))
        gathered = per_param * params.largest_layer + 4 * largest_adapter
    else:
        trained = roles * trainable_bytes(params)
        frozen = teacher_bytes(params, spec.teacher_dtype) if roles == 2 else 0
        ema = 4 * params.total
        gathered = (2 * 2 + 4) * params.largest_layer
    rows = []
    for n in spec.gpus:
        if n < 1 or n % spec.cp:
            raise ValueError(f"{n} GPUs cannot hold cp={spec.cp} groups")
        shards = n if spec.strategy == "fsdp2" else 1
        transient = gathered if spec.strategy == "fsdp2" else 2 * params.largest_layer
        rows.append(
            PlanRow(
                gpus=n,
                trainable=trained / shards / GIB,
                teacher=frozen / shards / GIB,
                ema=(ema / shards / GIB) if spec.ema else 0.0,
                transient=transient / GIB,
                activations=act / GIB,
            )
        )
    return rows


def format_plan(rows: list[PlanRow], gpu_gib: float = H100_GIB) -> str:
    """A markdown table of per-GPU GiB and what is left of `gpu_gib` ("frozen": the DMD-2 teacher, LoRA's base)."""
    lines = [
        f"| GPUs | trained roles | frozen | EMA | transient | activations | total | left of {gpu_gib:.2f} GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.gpus} | {r.trainable:.2f} | {r.teacher:.2f} | {r.ema:.2f} | {r.transient:.2f} | "
            f"{r.activations:.2f} | {r.total:.2f} | {gpu_gib - r.total:.2f} |"
        )
    return "\n".join(lines)


def format_plan_rows(entries: list[tuple[str, str, float, PlanRow]]) -> str:
    """A markdown table of (setting, device name, device GiB, row): rows of different settings and devices."""
    lines = [
        "| setting | GPUs | trained | frozen | EMA | transient | activations | total | device | left |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for setting, device, gib, r in entries:
        lines.append(
            f"| {setting} | {r.gpus} | {r.trainable:.2f} | {r.teacher:.2f} | {r.ema:.2f} | {r.transient:.2f} | "
            f"{r.activations:.2f} | {r.total:.2f} | {device} ({gib:.2f}) | {gib - r.total:.2f} |"
        )
    return "\n".join(lines)


def check_plan(row: PlanRow, device_gib: float, spec: PlanSpec, margin_gib: float = 4.0) -> None:
    """Stop before training when the plan does not fit one device, saying what to change."""
    need = row.total + margin_gib
    if need <= device_gib:
        return
    hints = []
    if spec.strategy != "fsdp2":
        hints.append("strategy=fsdp2 (shards every role over the GPUs)")
    elif row.trainable + row.teacher + row.ema > device_gib / 2:
        hints.append("more GPUs (trainer.num_nodes / trainer.devices)")
    if spec.activation_checkpointing in (False, "none", "selective", "every_k") and row.activations > 1:
        hints.append("model.activation_checkpointing=full (and distill.<role>.activation_checkpointing=full)")
    if row.activations > 1:
        hints.append("strategy.cp=<2, 4, 8> (splits each sequence over GPUs) or a smaller data.max_tokens")
    raise ValueError(
        f"the memory plan needs {need:.1f} GiB per GPU (model state {row.total - row.activations:.1f}, "
        f"activations {row.activations:.1f}, margin {margin_gib:.0f}) but the device has {device_gib:.1f} GiB: "
        f"use {'; or '.join(hints) or 'a bigger device'} (python -m magi_train.tools.plan shows the table)"
    )


def tiny_like(hidden: int, layers: int = 4) -> DiTConfig:
    """`tiny`'s structure at another width (for checking the activation scaling)."""
    from magi_train.models.dit import MODEL_CONFIGS

    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    cfg.hidden_size, cfg.num_layers = hidden, layers
    cfg.mm_layers, cfg.gelu7_layers = [0, layers - 1], [0]
    return cfg


__all__ = [
    "ACT_LAYER",
    "ACT_OUTSIDE_FIXED",
    "ACT_OUTSIDE_PER_HIDDEN",
    "BASE_DTYPES",
    "H100_GIB",
    "H200_GIB",
    "LORA_TARGETS",
    "PlanRow",
    "PlanSpec",
    "RoleParameters",
    "activation_bytes",
    "layer_activation_bytes",
    "check_plan",
    "clip_tokens",
    "format_plan",
    "format_plan_rows",
    "lora_activation_bytes",
    "lora_layer_parameters",
    "lora_linears",
    "lora_parameters",
    "measure_activation_bytes",
    "measure_constants",
    "parse_clip",
    "plan",
    "role_parameters",
    "teacher_bytes",
    "tiny_like",
    "trainable_bytes",
]
