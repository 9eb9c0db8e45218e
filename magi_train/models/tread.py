"""TREAD token routing (Krause et al., "TREAD: Token Routing for Efficient Architecture-agnostic Diffusion Training",
arXiv 2501.04765), as the released model was trained (its config keeps `tread_config = {selection_rate: 0.5,
start_layer_idx: 2, end_layer_idx: 25}`, spec §8).

In a training forward a random share `selection_rate` of each clip's video and audio tokens bypasses the layers
`start_layer_idx..end_layer_idx` (both inclusive: our reading of TREAD, tokens leave at the start block and rejoin
after the end block, and the issue's reading of the release, "half the tokens in 24 of 40 layers", is layers 2..25). The
other tokens run those layers as a shorter packed sequence with its own layout (per-clip cu_seqlens, RoPE rows,
modality order), so varlen attention stays per clip; the bypassing tokens rejoin unchanged at their original rows.

Which tokens route: TREAD routes the noisy tokens being denoised and keeps the conditioning. Here the noisy tokens
are video and audio (both are flow-matching targets); text is the condition, and it is the only path by which the
prompt reaches the middle layers (no cross-attention, no adaLN), so text is never routed. Video and audio are
routed separately per clip (stratified), so that the few audio tokens of a clip keep their share.

Routing is off in eval mode and when autograd is off (validation, sampling, inference, the frozen teacher, DMD-2's
no-grad backward simulation): it changes the function the model computes, which only training may trade for speed.
The router is installed on `model.block.router` from outside (`enable_tread`, called by `parallelize`) and holds
no tensors of the model, so weights and state-dict keys are unchanged.

Determinism: the router draws from its own CPU generator, which the task reseeds per micro-batch (`seed_tread`, from
`stream_seed(seed, step, "tread", index)`), so a resumed run routes exactly as the uninterrupted one.

Context parallelism (models/parallelize.py UlyssesSeq): every cp rank draws the same choice over the whole sequence
(same seed, same layout: the choice of one process), keeps its own rows of it, pads its kept rows to the largest rank's count and
attends over the gathered sequence with the padding rows removed (`UlyssesSeq.real_rows`), so attention sees
exactly the one-process routed sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from magi_train.models.dit import AUDIO, NUM_MODALITIES, TEXT, VIDEO, DiT, PackedSeq

ROUTED_MODALITIES = (VIDEO, AUDIO)  # text stays (module docstring)


@dataclass
class TreadConfig:
    """Which layers the routed tokens skip (inclusive range) and the share of video/audio tokens that skip them."""

    selection_rate: float = 0.5
    start_layer_idx: int = 2
    end_layer_idx: int = 25


RELEASED = TreadConfig()  # the release's tread_config (spec §8)
_FIELDS = ("selection_rate", "start_layer_idx", "end_layer_idx")


def tread_config(value: Any, num_layers: int) -> TreadConfig | None:
    """`model.tread`: null (off), "released", or a mapping of selection_rate / start_layer_idx / end_layer_idx
    (missing fields take the released values); checked against the model's layer count."""
    if value is None or value is False:
        return None
    if isinstance(value, TreadConfig):
        cfg = value
    elif isinstance(value, str):
        if value != "released":
            raise ValueError(
                f"model.tread={value!r}: use null (off), released, or "
                "{selection_rate: 0.5, start_layer_idx: 2, end_layer_idx: 25}"
            )
        cfg = RELEASED
    else:
        try:
            items = dict(value)
        except (TypeError, ValueError):
            raise ValueError(f"model.tread={value!r}: use null, released or a mapping of {_FIELDS}") from None
        unknown = sorted(set(items) - set(_FIELDS))
        if unknown:
            raise ValueError(f"model.tread has unknown keys {unknown}: use {', '.join(_FIELDS)}")
        cfg = TreadConfig(**items)
    rate, start, end = cfg.selection_rate, cfg.start_layer_idx, cfg.end_layer_idx
    if not 0 < rate < 1:
        raise ValueError(f"model.tread.selection_rate={rate}: the share of routed tokens must be in (0, 1)")
    if not 0 <= start <= end < num_layers:
        raise ValueError(
            f"model.tread layers {start}..{end} (inclusive): need 0 <= start_layer_idx <= end_layer_idx < "
            f"num_layers = {num_layers}"
        )
    return TreadConfig(float(rate), int(start), int(end))


# ---------------------------------------------------------------------------------------------------------
# the choice and the routed layout
# ---------------------------------------------------------------------------------------------------------


def clip_of_token(cu_seqlens: Tensor, length: int) -> Tensor:
    """[L] clip index of every token of a packed sequence (CPU)."""
    return torch.bucketize(torch.arange(length), cu_seqlens.cpu().long()[1:], right=True)


def choose_bypass(modality: Tensor, cu_seqlens: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """[L] bool (CPU): True for the tokens that bypass. In each (clip, routed modality) segment of n tokens exactly
    floor(rate * n) tokens, uniformly at random, bypass; text never does."""
    modality = modality.cpu()
    n = modality.numel()
    segment = clip_of_token(cu_seqlens, n) * NUM_MODALITIES + modality
    score = torch.rand(n, generator=generator, dtype=torch.float64)
    by_score = torch.argsort(score)
    order = by_score[torch.argsort(segment[by_score], stable=True)]  # by segment, random within it
    counts = torch.bincount(segment, minlength=int(segment.max()) + 1)
    starts = counts.cumsum(0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[segment[order]]
    routed = torch.zeros(n, dtype=torch.bool)
    for m in ROUTED_MODALITIES:
        routed |= modality == m
    return routed & (rank < (counts[segment].double() * rate).floor().long())


def _sorted_by_modality(modality: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    perm = torch.argsort(modality, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inv, [int((modality == m).sum()) for m in range(NUM_MODALITIES)]


def _routed_cu(keep: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, int]:
    """cu_seqlens and max_seqlen of the kept tokens of each clip (keep: [L] bool over the whole sequence, CPU)."""
    clips = cu_seqlens.numel() - 1
    counts = torch.bincount(clip_of_token(cu_seqlens, keep.numel())[keep], minlength=clips)
    cu = torch.zeros(clips + 1, dtype=torch.int32)
    cu[1:] = counts.cumsum(0)
    return cu.to(cu_seqlens.device), int(counts.max())


def routed_layout(seq: PackedSeq, keep: Tensor) -> tuple[PackedSeq, Tensor]:
    """The layout of the kept tokens (keep: [L] bool, CPU) of a one-process packed sequence, and their rows."""
    rows = keep.nonzero()[:, 0].to(seq.modality.device)
    modality = seq.modality[rows]
    perm, inv, sizes = _sorted_by_modality(modality)
    cu, max_len = _routed_cu(keep, seq.cu_seqlens)
    layout = PackedSeq(
        cu_seqlens=cu,
        max_seqlen=max_len,
        modality=modality,
        perm=perm,
        inv_perm=inv,
        sizes=sizes,
        rope=seq.rope[rows],
        video_grids=seq.video_grids,  # the clips' full inputs; not used inside the layers
        audio_lens=seq.audio_lens,
        frame=seq.frame[rows],
    )
    return layout, rows


def routed_cp_layout(seq, keep: Tensor) -> tuple[Any, Tensor, int]:
    """The same for one cp rank's share (a UlyssesSeq); keep: [L_padded] bool over the whole padded sequence.

    Returns the routed local layout (this rank's kept rows, then padding rows up to the largest rank's count), the
    local rows kept and the padding count."""
    cp, rank, chunk = seq.cp, seq.rank, seq.modality.numel()
    dev = seq.modality.device
    kept_per_rank = keep.view(cp, chunk).sum(1)
    width = int(kept_per_rank.max())
    local_keep = keep[rank * chunk : (rank + 1) * chunk]
    rows = local_keep.nonzero()[:, 0].to(dev)
    pad = width - rows.numel()
    half = seq.rope.shape[1] // 2
    still = torch.cat([seq.rope.new_zeros(pad, half), seq.rope.new_ones(pad, half)], dim=1)  # no rotation
    modality = torch.cat([seq.modality[rows], torch.full((pad,), TEXT, dtype=torch.long, device=dev)])
    perm, inv, sizes = _sorted_by_modality(modality)
    cu, max_len = _routed_cu(keep, seq.cu_seqlens)
    real = torch.cat([r * width + torch.arange(int(n)) for r, n in enumerate(kept_per_rank)]).to(dev)
    layout = type(seq)(
        cu_seqlens=cu,
        max_seqlen=max_len,
        modality=modality,
        perm=perm,
        inv_perm=inv,
        sizes=sizes,
        rope=torch.cat([seq.rope[rows], still]),
        video_grids=seq.video_grids,
        audio_lens=seq.audio_lens,
        group=seq.group,
        cp=cp,
        full=None,
        rank=rank,
        real_rows=real,
        frame=torch.cat([seq.frame[rows], torch.full((pad,), -1, dtype=torch.long, device=dev)]),
        gathered_frame=seq.gathered_frame[keep.to(dev)],
    )
    return layout, rows, pad


# ---------------------------------------------------------------------------------------------------------
# the router
# ---------------------------------------------------------------------------------------------------------


class TokenRouter:
    """Runs a TransformerBlock's layers with TREAD routing (installed as `block.router`; not an nn.Module)."""

    def __init__(self, cfg: TreadConfig, seed: int = 0):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.last_bypass: Tensor | None = None  # [L] bool of the latest routed forward (for tests and logs)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def choose(self, modality: Tensor, cu_seqlens: Tensor) -> Tensor:
        """[L] bool, True = bypasses (a test may override it to impose a choice)."""
        return choose_bypass(modality, cu_seqlens, self.cfg.selection_rate, self.generator)

    def __call__(self, layers: nn.ModuleList, h: Tensor, seq: PackedSeq) -> Tensor:
        start, end = self.cfg.start_layer_idx, self.cfg.end_layer_idx
        for layer in layers[:start]:
            h = layer(h, seq)
        whole = getattr(
            seq, "full", None
        )  # a cp rank's share: choose over the whole sequence, as one process
        bypass = self.choose((whole or seq).modality, (whole or seq).cu_seqlens)
        self.last_bypass = bypass
        if whole is not None:
            padded = bypass.new_zeros(seq.cp * seq.modality.numel())  # Ulysses' padding tokens never bypass
            padded[: bypass.numel()] = bypass
            routed_seq, rows, pad = routed_cp_layout(seq, ~padded)
            x = torch.cat([h[rows], h.new_zeros(pad, h.shape[1])])
        else:
            routed_seq, rows = routed_layout(seq, ~bypass)
            x = h[rows]
        for layer in layers[start : end + 1]:
            x = layer(x, routed_seq)
        h = h.index_copy(0, rows, x[: rows.numel()])  # the kept tokens rejoin at their rows
        for layer in layers[end + 1 :]:
            h = layer(h, seq)
        return h


def enable_tread(model: DiT, cfg: TreadConfig | None, seed: int = 0) -> DiT:
    """Install (cfg) or remove (None) TREAD routing on `model` (in place; returned)."""
    if cfg is not None:
        tread_config(cfg, model.cfg.num_layers)  # checks the range against this model
    model.block.router = TokenRouter(cfg, seed) if cfg is not None else None
    return model


def seed_tread(seed: int, *models: nn.Module) -> None:
    """Reseed the routers of `models` (roles of one task) for the next micro-batch; models without one are skipped.
    Each role gets its own stream, so two roles never route the same tokens by construction."""
    for i, model in enumerate(models):
        router = getattr(getattr(model, "block", None), "router", None)
        if router is not None:
            router.reseed((seed + 1_000_003 * i) % 2**63)


def routed_fraction(cfg: TreadConfig | None, num_layers: int) -> float:
    """Share of the block's layers that the routed tokens skip (for FLOP counts)."""
    if cfg is None:
        return 0.0
    return (cfg.end_layer_idx - cfg.start_layer_idx + 1) / num_layers


def kept_tokens(n: int, rate: float) -> int:
    """Tokens of a routed segment of n that run the routed layers (choose_bypass: floor(rate * n) bypass)."""
    return n - math.floor(n * rate)


__all__ = [
    "RELEASED",
    "ROUTED_MODALITIES",
    "TokenRouter",
    "TreadConfig",
    "choose_bypass",
    "enable_tread",
    "kept_tokens",
    "routed_cp_layout",
    "routed_fraction",
    "routed_layout",
    "seed_tread",
    "tread_config",
]
