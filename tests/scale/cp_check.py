"""Context-parallel check on 2 gloo processes (torchrun): a cp=2 forward and backward of a packed batch of 3 clips of
different lengths (an odd token total, so the last rank holds padding) equals the one-process model, outputs and
gradients to 1e-5, with and without FSDP2, with fewer KV heads than cp ranks (KV heads replicated), and with TREAD
routing under FSDP2 (each rank routes its share of the one-process choice); two of the layers attend frame-locally.

    torchrun --nproc_per_node 2 tests/scale/cp_check.py OUT.json
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.parallelize import ParallelConfig, build_mesh, enable_context_parallel, parallelize
from magi_train.models.tread import TreadConfig, enable_tread

TREAD = TreadConfig(0.5, 1, 2)  # tiny's layers 1..2

SHAPES = [((2, 4, 6), 9, 5), ((1, 2, 2), 5, 3), ((3, 4, 4), 13, 1)]  # (video T H W, audio, text) per clip


def loss_of(video, audio):
    return sum((v * v).sum() for v in video) + sum((a**3).sum() for a in audio)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check(num_heads_kv: int, mesh) -> dict:
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    cfg.num_heads_kv = num_heads_kv
    # frame-local attention in the routed layers: clips of 2 and 3 latent frames are cut by a window of 0 frames
    cfg.local_attn_layers, cfg.frame_receptive_field = [1, 2], 0
    torch.manual_seed(0)
    ref = DiT(cfg)
    for p in ref.parameters():  # non-zero heads and norms: every path carries gradient
        p.data.normal_(0, 0.1) if not p.abs().sum() else None
    g = torch.Generator().manual_seed(1)
    video = [torch.randn(48, *s, generator=g) for s, _, _ in SHAPES]
    audio = [torch.randn(n, 64, generator=g) for _, n, _ in SHAPES]
    text = [torch.randn(m, cfg.text_in_channels, generator=g) for _, _, m in SHAPES]
    routed = enable_tread(copy.deepcopy(ref), TREAD, seed=5)
    out_routed = routed(video, audio, text)
    loss_of(*out_routed).backward()
    out_ref = ref(video, audio, text)
    loss_of(*out_ref).backward()
    result = {}
    for name in ("cp", "cp+fsdp2", "cp+fsdp2+tread"):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        if name == "cp":
            enable_context_parallel(model, mesh["cp"].get_group(), mesh["cp"].size())
        else:
            parallelize(model, mesh, ParallelConfig(tread=TREAD if name.endswith("tread") else None))
            if name.endswith("tread"):
                model.block.router.reseed(5)
        out = model(video, audio, text)
        if name.endswith("tread"):  # compared with the routed one-process model
            out_ref, ref = out_routed, routed
            assert model.block.router.last_bypass.any()
        loss_of(*out).backward()
        errs = [rel(a, b) for a, b in zip(out[0] + out[1], out_ref[0] + out_ref[1], strict=True)]
        grads = []
        for (_, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
            if (
                name == "cp"
            ):  # plain gradients: cp x this rank's share; their mean over the group is the gradient
                gq = q.grad.clone()
                dist.all_reduce(gq)
                gq /= mesh["cp"].size()
            else:  # FSDP2 reduced them already
                gq = q.grad.full_tensor()
            grads.append(rel(gq, p.grad))
        result[name] = {"output": max(errs), "grad": max(grads)}
    return result


def main() -> None:
    dist.init_process_group("gloo")
    mesh = build_mesh("cpu", dist.get_world_size(), dp_replicate=1, cp=dist.get_world_size())
    results = {f"kv{h}": check(h, mesh) for h in (2, 1)}  # tiny: 4 query heads; 1 KV head < 2 ranks
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
