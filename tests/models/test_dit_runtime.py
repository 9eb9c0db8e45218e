"""DiT runtime behaviour: varlen attention vs a naive reference, activation checkpointing, bf16 autocast."""

import copy
import math

import torch

from magi_train.models.attention import varlen_attention
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.parallelize import ParallelConfig, parallelize


def _random_tiny(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(copy.deepcopy(MODEL_CONFIGS["tiny"]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02 if p.ndim == 2 else 0.1)  # non-zero heads and norms
    return model


def _clips(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    video = [torch.randn(48, 3, 4, 6, generator=g), torch.randn(48, 2, 2, 4, generator=g)]
    audio = [torch.randn(9, 64, generator=g), torch.randn(5, 64, generator=g)]
    text = [torch.randn(7, 3584, generator=g), torch.randn(2, 3584, generator=g)]
    return video, audio, text


def test_varlen_attention_matches_naive_block_diagonal_reference():
    g = torch.Generator().manual_seed(0)
    lens = [5, 9, 3]
    n, hq, hkv, d = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lens), backend="sdpa")
    # reference: dense softmax with -inf across clips, KV head of query head h is h // (hq // hkv)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]
    ref = torch.empty_like(out)
    for h in range(hq):
        kh = h // (hq // hkv)
        scores = (q[:, h] @ k[:, kh].T) / math.sqrt(d)
        ref[:, h] = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v[:, kh]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_same_outputs_and_grads():
    plain = _random_tiny()
    ckpt = parallelize(copy.deepcopy(plain), None, ParallelConfig(activation_checkpointing=True))
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # released key names survive wrapping
    clips = _clips()
    grads = []
    for m in (plain, ckpt):
        ov, oa = m(*clips)
        loss = sum(o.square().mean() for o in ov + oa)
        loss.backward()
        grads.append(
            {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in m.named_parameters()}
        )
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_keeps_fp32_residual_and_outputs():
    model = _random_tiny()
    clips = _clips()
    ref_v, ref_a = model(*clips)
    seen = []
    hook = model.block.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_v, out_a = model(*clips)
    hook.remove()
    assert seen == [torch.float32]  # residual stream stays fp32 under autocast
    assert all(o.dtype == torch.float32 for o in out_v + out_a)
    for o, r in zip(out_v + out_a, ref_v + ref_a, strict=True):
        assert torch.isfinite(o).all()
        assert (o - r).abs().max() < 0.05 * r.abs().max() + 1e-3  # bf16 GEMMs, fp32 norms/RoPE/heads


def test_zero_init_heads_predict_zero_velocity():
    model = DiT(copy.deepcopy(MODEL_CONFIGS["tiny"]))
    ov, oa = model(*_clips())
    assert all(torch.count_nonzero(o) == 0 for o in ov + oa)
