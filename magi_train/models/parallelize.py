"""Parallelism applied to an unchanged DiT from outside, in torchtitan's order: activation checkpointing, torch.compile
per layer, Ulysses context parallelism over the mesh's `cp` dimension, then FSDP2 `fully_shard` per TransformerLayer
and the root over the data-parallel dimensions.

The mesh has the dimensions (dp_replicate, dp_shard, cp) (`build_mesh`): parameters are sharded over dp_shard x cp
(the context-parallel ranks of one data-parallel group hold different tokens of the same clips, so their gradients
are summed like those of different samples) and replicated over dp_replicate (HSDP). Wrappers keep the released
state-dict key names (checkpoint_wrapper strips its own prefix; FSDP2 and compile change no names).

Mixed precision keeps the released model's fp32 islands: FSDP2 needs one dtype per `fully_shard` group, so the
RMSNorm weights of each layer form their own fp32 group, the layer's linears another (bf16 compute when
`param_dtype="bf16"`, fp32 gradient reduction), and the root group (adapter, heads, final norms) stays fp32. The
residual stream stays fp32 (no cast of forward inputs); the linears run under the trainer's bf16 autocast.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from magi_train.models.attention import local_varlen_attention, varlen_attention
from magi_train.models.dit import (
    TEXT,
    DiT,
    ModalityRMSNorm,
    PackedSeq,
    TransformerLayer,
    pack,
    unpatchify,
)
from magi_train.models.lora import recompute_contexts
from magi_train.models.tread import TreadConfig, enable_tread

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")
PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: each parameter computes in its own dtype
# none; full: whole layers (every `ac_every`-th, 1 = all); every_k: the same with ac_every >= 2; selective: every
# layer, op-level: matmul and attention outputs saved, everything elementwise (norms, q/k norm + RoPE, gates, MLP
# activations, casts) recomputed in backward (torchtitan's op-level SAC idea; the release's
# checkpoint_qk_layernorm_rope is the q/k-norm + RoPE part of it).
AC_MODES = ("none", "full", "selective", "every_k")


def ac_mode(value) -> str:
    """The activation-checkpointing mode of a config value (true = full, false = none, for old configs)."""
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "full"
    if value is False or value is None or (isinstance(value, str) and value.lower() == "false"):
        return "none"
    if value not in AC_MODES:
        raise ValueError(
            f"activation_checkpointing={value!r}: use one of {', '.join(AC_MODES)} (or true / false)"
        )
    return value


def selective_saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels."""
    aten = torch.ops.aten
    names = [
        "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ]  # fmt: skip
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flash = getattr(getattr(torch.ops, "flash_attn", None), "_flash_attn_varlen_forward", None)
    if flash is not None:  # flash-attn registers its kernels as torch ops
        save.add(flash.default)
    return save


def _save_matmuls_policy():
    """The selective policy: save the outputs of matmuls and attention kernels, recompute every other op."""
    save = selective_saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls_policy())


@contextlib.contextmanager
def _entered(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _checkpoint_contexts(selective: bool):
    """`context_fn` of activation checkpointing: the recompute runs with the LoRA adapter its forward used
    (models/lora.py), and under `selective` the op-level policy decides what the forward saves."""
    lora_forward, lora_recompute = recompute_contexts()
    if not selective:
        return lora_forward, lora_recompute
    forward, recompute = _selective_context()
    return _entered(lora_forward, forward), _entered(lora_recompute, recompute)


@dataclass
class ParallelConfig:
    """How one DiT is parallelised (the trainer's strategy and the model config together decide it)."""

    activation_checkpointing: str = "none"  # AC_MODES (true / false accepted: full / none)
    ac_every: int = 1  # full / every_k: checkpoint every k-th layer (1 = every layer)
    compile: bool = False
    tread: TreadConfig | None = None  # TREAD routing in training forwards (models/tread.py)
    param_dtype: str = "fp32"  # compute dtype of the block linears under FSDP2: fp32 | bf16 (bf16-mixed)
    reshard_after_forward: bool = True  # free gathered parameters after each layer's forward (ZeRO-3 style)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: shards, gradients and the optimizer step on the host

    def __post_init__(self) -> None:
        self.activation_checkpointing = ac_mode(self.activation_checkpointing)
        if self.ac_every < 1:
            raise ValueError(f"activation checkpointing every {self.ac_every} layers: use 1 or more")
        if self.activation_checkpointing == "every_k" and self.ac_every < 2:
            raise ValueError("activation_checkpointing=every_k needs model.ac_every >= 2 (1 is `full`)")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r}: use one of {sorted(PARAM_DTYPES)}")

    def replace(self, **changes) -> ParallelConfig:
        return ParallelConfig(**{f.name: getattr(self, f.name) for f in fields(self)} | changes)


# ---------------------------------------------------------------------------------------------------------
# the device mesh
# ---------------------------------------------------------------------------------------------------------


def build_mesh(device_type: str, world_size: int, dp_replicate: int = 1, cp: int = 1):
    """The (dp_replicate, dp_shard, cp) mesh, dp_shard = world / (dp_replicate * cp), plus the flattened dimensions
    `dp` (replicate x shard: who reads different samples) and `dp_shard_cp` (what FSDP2 shards over)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp_replicate < 1 or cp < 1 or world_size % (dp_replicate * cp):
        raise ValueError(
            f"{world_size} processes cannot be split into dp_replicate={dp_replicate} x cp={cp} x dp_shard: "
            "choose strategy.dp_replicate and strategy.cp whose product divides the number of processes"
        )
    shape = (dp_replicate, world_size // (dp_replicate * cp), cp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
    return mesh


def data_parallel_rank(mesh) -> tuple[int, int]:
    """(rank, size) of this process among the readers of different samples (cp ranks of a group share one)."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()


# ---------------------------------------------------------------------------------------------------------
# Ulysses context parallelism
# ---------------------------------------------------------------------------------------------------------


def _all_to_all(x: Tensor, group) -> Tensor:
    """Differentiable all-to-all of x [world, ...]: chunk j goes to rank j, chunk i of the result came from rank i."""
    from torch.distributed.nn.functional import all_to_all_single

    x = x.contiguous()
    return all_to_all_single(torch.empty_like(x), x, group=group)


def _seq_to_heads(x: Tensor, group, cp: int) -> Tensor:
    """[L/cp, H, d] tokens of this rank, all heads -> [L, H/cp, d] all tokens, this rank's heads."""
    n, h, d = x.shape
    x = x.reshape(n, cp, h // cp, d).transpose(0, 1)  # [cp, n, H/cp, d]: chunk j = heads of rank j
    return _all_to_all(x, group).reshape(cp * n, h // cp, d)


def _heads_to_seq(x: Tensor, group, cp: int) -> Tensor:
    """Inverse of _seq_to_heads: [L, H/cp, d] -> [L/cp, H, d]."""
    total, h, d = x.shape
    x = _all_to_all(x.reshape(cp, total // cp, h, d), group)  # chunk i = this rank's tokens, heads of rank i
    return x.transpose(0, 1).reshape(total // cp, cp * h, d)


class _GatherTokens(torch.autograd.Function):
    """All-gather of each rank's token rows. Everything after it is computed identically on every cp rank, so the
    gradient of a rank's rows is its slice of the (identical) incoming gradient, scaled by cp: gradients are then
    cp x this rank's share, and the mean over the group that FSDP2 / DDP reduce to is the full gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group, cp: int, rank: int) -> Tensor:
        ctx.group, ctx.cp, ctx.rank, ctx.n = group, cp, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        part = grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]
        return part * ctx.cp, None, None, None


@dataclass
class UlyssesSeq(PackedSeq):
    """The layout of one cp rank's contiguous share of a packed sequence. Per-token work (norms, experts, MLP) runs
    on these tokens; attention exchanges tokens for heads (all-to-all), runs whole-clip varlen attention on its
    heads over every token, and exchanges back. cu_seqlens / max_seqlen describe the whole (padded) sequence."""

    group: object = None
    cp: int = 1
    full: PackedSeq | None = (
        None  # the whole (unpadded) sequence's layout, for TREAD's choice (models/tread.py)
    )
    rank: int = 0
    # TREAD-routed layout (models/tread.py): the gathered rows that are tokens, not per-rank padding; None = all
    real_rows: Tensor | None = None
    # latent frame ids of the rows attention runs over (the gathered sequence, real rows only): for local layers
    gathered_frame: Tensor | None = None

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, backend: str, window: int | None) -> Tensor:
        if window is None:
            return varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, backend)
        cu, longest, frame = self.cu_seqlens, self.max_seqlen, self.gathered_frame
        return local_varlen_attention(q, k, v, cu, longest, frame, window, backend)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, backend: str, window: int | None = None) -> Tensor:
        cp, hkv = self.cp, k.shape[1]
        if (
            hkv % cp
        ):  # fewer KV heads than ranks: replicate each so that every rank gets the ones its queries use
            k, v = (t.repeat_interleave(cp // hkv, dim=1) for t in (k, v))
        q, k, v = (_seq_to_heads(t, self.group, cp) for t in (q, k, v))
        if self.real_rows is None:
            out = self._attention(q, k, v, backend, window)
        else:
            rows = self.real_rows
            out = self._attention(q[rows], k[rows], v[rows], backend, window)
            out = q.new_zeros(q.shape[0], *out.shape[1:]).index_copy(0, rows, out)
        return _heads_to_seq(out, self.group, cp)


def check_context_parallel(cfg, cp: int) -> None:
    """Head counts that Ulysses can split over `cp` ranks."""
    hq, hkv = cfg.num_heads_q, cfg.num_heads_kv
    if hq % cp or (hkv % cp and cp % hkv):
        raise ValueError(
            f"strategy.cp={cp}: context parallelism splits attention heads, so {hq} query heads must be a "
            f"multiple of cp and {hkv} KV heads a multiple or a divisor of it; choose cp among "
            f"{[c for c in range(1, hq + 1) if hq % c == 0 and (hkv % c == 0 or c % hkv == 0)]}"
        )


def _local_layout(seq: PackedSeq, group, cp: int, rank: int) -> tuple[UlyssesSeq, slice, int]:
    """This rank's layout, the slice of the (padded) sequence it holds, and the padding added at the end."""
    total = seq.modality.numel()
    chunk = math.ceil(total / cp)
    pad = chunk * cp - total
    dev = seq.modality.device
    modality = torch.cat([seq.modality, torch.full((pad,), TEXT, dtype=torch.long, device=dev)])
    rope = seq.rope
    if pad:  # padding tokens: a clip of their own, no rotation (sin 0, cos 1), no head output
        half = rope.shape[1] // 2
        still = torch.cat([rope.new_zeros(pad, half), rope.new_ones(pad, half)], dim=1)
        rope = torch.cat([rope, still])
    cu = seq.cu_seqlens
    if pad:
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
    frame = torch.cat([seq.frame, torch.full((pad,), -1, dtype=torch.long, device=dev)])
    rows = slice(rank * chunk, (rank + 1) * chunk)
    local = modality[rows]
    perm = torch.argsort(local, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    layout = UlyssesSeq(
        cu_seqlens=cu,
        max_seqlen=max(seq.max_seqlen, pad),
        modality=local,
        perm=perm,
        inv_perm=inv,
        sizes=[int((local == m).sum()) for m in range(3)],
        rope=rope[rows],
        video_grids=seq.video_grids,
        audio_lens=seq.audio_lens,
        group=group,
        cp=cp,
        full=seq,
        rank=rank,
        frame=frame[rows],
        gathered_frame=frame,
    )
    return layout, rows, pad


def context_parallel_forward(
    model: DiT, video: list[Tensor], audio: list[Tensor], text: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """DiT.forward with the packed sequence split over the cp group (same inputs and outputs on every cp rank)."""
    group, cp = model._cp_group, model._cp_size
    rank = dist.get_rank(group)
    inputs, seq = pack(video, audio, text, model.cfg, model.adapter.rope.bands)
    local, rows, pad = _local_layout(seq, group, cp, rank)
    h = model.adapter(inputs, seq)  # [L, hidden]: cheap next to one layer; only this rank's rows go on
    h = torch.cat([h, h.new_zeros(pad, h.shape[1])])[rows]
    h = model.block(h, local)
    hv, ha, _ = local.by_modality(h)
    with torch.autocast(h.device.type, enabled=False):  # heads are fp32 in the release
        v_tok = model.final_linear_video(model.final_norm_video(hv.float()))
        a_tok = model.final_linear_audio(model.final_norm_audio(ha.float()))
    # this rank's head outputs at their rows ([video channels | audio channels]), then every rank's rows
    n, cv, ca = h.shape[0], v_tok.shape[1], a_tok.shape[1]
    video_rows, audio_rows = local.perm[: local.sizes[0]], local.perm[local.sizes[0] : sum(local.sizes[:2])]
    out = torch.cat(
        [
            v_tok.new_zeros(n, cv).index_copy(0, video_rows, v_tok),
            a_tok.new_zeros(n, ca).index_copy(0, audio_rows, a_tok),
        ],
        dim=1,
    )
    full = _GatherTokens.apply(out, group, cp, rank)[: seq.modality.numel()]
    nv, na = seq.sizes[0], seq.sizes[1]
    v_tokens = full[seq.perm[:nv], :cv]  # modality-sorted order, as DiT.forward's by_modality
    a_tokens = full[seq.perm[nv : nv + na], cv:]
    v_per_clip = v_tokens.split([math.prod((g[0], g[1] // 2, g[2] // 2)) for g in seq.video_grids])
    out_video = [unpatchify(t, g) for t, g in zip(v_per_clip, seq.video_grids, strict=True)]
    return out_video, list(a_tokens.split(seq.audio_lens))


def enable_context_parallel(model: DiT, group, cp: int) -> DiT:
    """Make `model(video, audio, text)` run context-parallel over `group` (cp ranks that see the same clips)."""
    check_context_parallel(model.cfg, cp)
    if cp == 1:
        return model
    model._cp_group, model._cp_size = group, cp
    model.forward = types.MethodType(context_parallel_forward, model)
    return model


# ---------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------


def _fsdp_mesh(mesh):
    if mesh["dp_replicate"].size() > 1:
        return mesh[("dp_replicate", "dp_shard_cp")]  # HSDP: shard within, replicate across
    return mesh["dp_shard_cp"]


def apply_fsdp(model: DiT, mesh, cfg: ParallelConfig) -> DiT:
    """fully_shard per TransformerLayer (its RMSNorms as their own fp32 group), then the root (fp32 islands). LoRA
    adapters (models/lora.py) stay in their layer's group: gathered, resharded and reduced with it (a group of their
    own, interleaved between the DMD-2 roles' forwards, lost their gathered storage before backward)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    fsdp_mesh = _fsdp_mesh(mesh)
    fp32 = torch.float32
    own = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=fp32, cast_forward_inputs=False)
    block = MixedPrecisionPolicy(
        param_dtype=PARAM_DTYPES[cfg.param_dtype], reduce_dtype=fp32, cast_forward_inputs=False
    )
    common = dict(mesh=fsdp_mesh, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.offload:
        common["offload_policy"] = CPUOffloadPolicy()
    for layer in _layers(model):
        norms = [m for m in layer.modules() if isinstance(m, ModalityRMSNorm)]
        fully_shard(norms, mp_policy=own, **common)
        stored = {
            p.dtype
            for m in layer.modules()
            if not isinstance(m, ModalityRMSNorm)
            for p in m.parameters(False)
        }
        if len(stored) > 1 and cfg.param_dtype == "fp32":  # FSDP2 gathers one dtype per group
            raise ValueError(
                f"a layer holds {sorted(map(str, stored))} weights (LoRA adapters on a bf16-stored base): under "
                "strategy=fsdp2 use trainer.precision=bf16-mixed, or distill.teacher.dtype=fp32"
            )
        fully_shard(layer, mp_policy=block, **common)
    # the root's parameters are used again by the heads after the last layer: keep them gathered
    fully_shard(model, mp_policy=own, **{**common, "reshard_after_forward": False})
    return model


def apply_fsdp_module(module: nn.Module, mesh) -> nn.Module:
    """One fp32 FSDP2 group for a small trained module beside a DiT (e.g. the DMD-2 GAN head): its gradients are
    then reduced over the same ranks as the DiT's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(module, mesh=_fsdp_mesh(mesh), mp_policy=policy)
    return module


def _layers(model: DiT) -> list[nn.Module]:
    """The TransformerLayers (inside their checkpoint wrappers, if any)."""
    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


# ---------------------------------------------------------------------------------------------------------
# everything, in order
# ---------------------------------------------------------------------------------------------------------


def parallelize(model: DiT, mesh=None, cfg: ParallelConfig | None = None) -> DiT:
    """Apply activation checkpointing, compile, context parallelism and FSDP2 to `model` (in place; returned).

    mesh: the (dp_replicate, dp_shard, cp) DeviceMesh of `build_mesh`, or None for one process (or DDP /
    DeepSpeed, which wrap the model themselves): then only checkpointing and compile apply.
    """
    cfg = cfg or ParallelConfig()
    enable_tread(
        model, cfg.tread
    )  # a router around the layers; the layers stay the FSDP / AC / compile units
    mode = cfg.activation_checkpointing
    if mode != "none":
        every = 1 if mode == "selective" else cfg.ac_every
        chosen = {id(layer) for i, layer in enumerate(model.block.layers) if i % every == 0}
        contexts = functools.partial(_checkpoint_contexts, mode == "selective")
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(
                checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, context_fn=contexts
            ),
            check_fn=lambda m: isinstance(m, TransformerLayer) and id(m) in chosen,
        )
    if cfg.compile:
        for layer in model.block.layers:
            layer.compile(dynamic=True)  # in place: state-dict keys unchanged (no `_orig_mod.`)
    if mesh is None:
        return model
    cp = mesh["cp"]
    enable_context_parallel(model, cp.get_group(), cp.size())
    return apply_fsdp(model, mesh, cfg)


__all__ = [
    "AC_MODES",
    "MESH_DIMS",
    "ParallelConfig",
    "UlyssesSeq",
    "ac_mode",
    "selective_saved_ops",
    "apply_fsdp",
    "apply_fsdp_module",
    "build_mesh",
    "check_context_parallel",
    "context_parallel_forward",
    "data_parallel_rank",
    "enable_context_parallel",
    "parallelize",
]
