"""Per-GPU memory of DMD-2 model state (teacher + critic + student) under ZeRO-3 / FSDP full sharding.

    python -m magi_train.tools.plan [--model magihuman_15b] [--gpus 8 32 64] [--gpu-gib 79.65]

Parameter counts come from the model config (the DiT built on the meta device). Counted, per parameter and
divided evenly over the GPUs (full sharding of every role):

- teacher (frozen): its weights only, stored as DMD2Task stores it: with dtype bf16 the block linears in
  bf16 (2 B) and norms, adapter and heads in fp32 (4 B), the released base policy; with fp32 all 4 B;
- critic and student (trainable, mixed precision as in DeepSpeed ZeRO-3 bf16): bf16 working weights 2 B
  + fp32 master weights 4 B + fp32 gradients 4 B + AdamW exp_avg and exp_avg_sq 8 B = 18 B;
- student EMA: an fp32 copy, 4 B, sharded (or 0 with distill.ema.on_cpu=true).

NOT counted: activations (they depend on clip size, packing and activation checkpointing), the transient
unsharded layer that FSDP / ZeRO-3 all-gathers for each forward and backward (printed separately), the
optional GAN head (about 2 h^2 parameters), communication buckets, the CUDA context and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magi_train.models.checkpoint import released_dtype
from magi_train.models.dit import DiT, DiTConfig

GIB = 2**30
H100_GIB = 81559 / 1024  # H100 80GB: nvidia-smi reports 81,559 MiB of memory (79.65 GiB)
# bytes per trainable parameter: bf16 weights, fp32 master, fp32 grads, AdamW (2 fp32 moments)
TRAINABLE_BYTES = {"bf16_weights": 2, "fp32_master": 4, "fp32_grads": 4, "adamw_states": 8}


@dataclass
class RoleParameters:
    """Parameter counts of one DiT: in block linears (bf16 in the released base policy) and the rest."""

    block_linear: int
    other: int
    largest_layer: int  # parameters of the biggest TransformerLayer (the unit FSDP all-gathers)

    @property
    def total(self) -> int:
        return self.block_linear + self.other


def role_parameters(cfg: DiTConfig) -> RoleParameters:
    """Count the DiT's parameters on the meta device (no memory), split by the released dtype policy."""
    with torch.device("meta"):
        model = DiT(cfg)
    bf16 = sum(p.numel() for n, p in model.named_parameters() if released_dtype(n, "base") == torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in model.block.layers)
    return RoleParameters(block_linear=bf16, other=total - bf16, largest_layer=largest)


def teacher_bytes(params: RoleParameters, dtype: str = "bf16") -> int:
    """Bytes of the frozen teacher's weights (whole model, before sharding)."""
    if dtype == "bf16":
        return 2 * params.block_linear + 4 * params.other
    if dtype == "fp32":
        return 4 * params.total
    raise ValueError(f"teacher dtype {dtype!r}: use bf16 or fp32")


def trainable_bytes(params: RoleParameters) -> int:
    """Bytes of one trainable role's weights, master copy, gradients and AdamW states (before sharding)."""
    return sum(TRAINABLE_BYTES.values()) * params.total


@dataclass
class MemoryRow:
    """Per-GPU GiB of each part at one data-parallel size."""

    gpus: int
    teacher: float
    critic: float
    student: float
    ema: float
    gather: float  # transient: one unsharded layer in bf16, two in flight with prefetch

    @property
    def total(self) -> float:
        return self.teacher + self.critic + self.student + self.ema


def memory_table(
    params: RoleParameters,
    gpus: tuple[int, ...] = (8, 32, 64),
    teacher_dtype: str = "bf16",
    ema_on_gpu: bool = True,
) -> list[MemoryRow]:
    """One row per GPU count: every role fully sharded over all GPUs (ZeRO-3 / FSDP FULL_SHARD)."""
    rows = []
    for n in gpus:
        if n < 1:
            raise ValueError(f"GPU count must be >= 1, got {n}")
        rows.append(
            MemoryRow(
                gpus=n,
                teacher=teacher_bytes(params, teacher_dtype) / n / GIB,
                critic=trainable_bytes(params) / n / GIB,
                student=trainable_bytes(params) / n / GIB,
                ema=(4 * params.total / n / GIB) if ema_on_gpu else 0.0,
                gather=2 * 2 * params.largest_layer / GIB,
            )
        )
    return rows


def format_table(rows: list[MemoryRow], gpu_gib: float = H100_GIB) -> str:
    """A markdown table of per-GPU GiB and what is left of `gpu_gib` for activations."""
    lines = [
        "| GPUs | teacher | critic | student | student EMA | total state | left of "
        f"{gpu_gib:.2f} GiB | + all-gather (transient) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.gpus} | {r.teacher:.2f} | {r.critic:.2f} | {r.student:.2f} | {r.ema:.2f} | {r.total:.2f} "
            f"| {gpu_gib - r.total:.2f} | {r.gather:.2f} |"
        )
    return "\n".join(lines)
