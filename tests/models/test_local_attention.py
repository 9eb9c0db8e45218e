"""Frame-local attention of the released 1080p SR DiT (spec §2.8): which keys each query sees, exactness of the
SDPA blocks and of the flex-attention mask, equality with full attention when the window covers the clip, and
packing invariance of a DiT with local layers."""

import copy

import pytest
import torch
import torch.nn.functional as F

from magi_train.models.attention import (
    flex_local,
    frame_ids,
    local_attention_mask,
    local_blocks,
    local_varlen_attention,
    varlen_attention,
)
from magi_train.models.dit import MODEL_CONFIGS, DiT

# two clips: (latent T, H, W), audio latents, text tokens; 4 tokens per latent frame in the first
CLIPS = [((7, 4, 4), 3, 2), ((2, 2, 2), 4, 1)]


def _layout():
    frame = torch.cat([frame_ids(grid, a, t) for grid, a, t in CLIPS])
    lens = [grid[0] * (grid[1] // 2) * (grid[2] // 2) + a + t for grid, a, t in CLIPS]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return frame, cu, max(lens)


def _qkv(n: int, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, 8, generator=g) for h in (4, 2, 2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _dense(q, k, v, mask):
    """Reference: one SDPA over the whole sequence with a boolean mask (GQA)."""
    qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def test_each_query_sees_the_released_key_ranges():
    """The released calc_local_qk_range, written out by hand for clip 0 (T = 7, 4 tokens a frame, R = 2): video
    queries of frame i see video tokens [max(0, i-R)*4, min(T, i+R+1)*4) plus the audio and text rows; audio
    and text queries see the whole clip; nothing crosses into clip 1."""
    frame, cu, _ = _layout()
    window, tpf, t, lv = 2, 4, 7, 28
    mask = local_attention_mask(cu, frame, window)
    n0 = lv + 3 + 2
    expected = torch.zeros(n0, n0, dtype=torch.bool)
    for i in range(t):
        lo, hi = max(0, i - window) * tpf, min(t, i + window + 1) * tpf
        expected[i * tpf : (i + 1) * tpf, lo:hi] = True
        expected[i * tpf : (i + 1) * tpf, lv:] = True
    expected[lv:, :] = True
    assert torch.equal(mask[:n0, :n0], expected)
    assert mask[:tpf, : 3 * tpf].all() and not mask[:tpf, 3 * tpf : lv].any()  # frame 0: clipped at the start
    assert not mask[:n0, n0:].any() and not mask[n0:, :n0].any()
    assert mask[n0:, n0:].all()  # clip 1 spans 2 frames: inside the window everywhere


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sdpa_blocks_and_flex_mask_equal_dense_masked_attention():
    frame, cu, longest = _layout()
    q, k, v = _qkv(frame.numel(), grad=True)
    mask = local_attention_mask(cu, frame, 2)
    ref = _dense(q, k, v, mask)
    out = local_varlen_attention(q, k, v, cu, longest, frame, 2, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    full = varlen_attention(q, k, v, cu, longest, backend="sdpa")
    assert (full - ref).abs().max() > 1e-2  # control: the window really cuts keys here
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the CUDA path's block mask, run eagerly (flex attention has a CPU forward only)
    flex = flex_local(*(t.detach() for t in (q, k, v)), cu, frame, 2, compiled=False)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


def test_a_window_covering_every_frame_is_full_attention():
    frame, cu, longest = _layout()
    q, k, v = _qkv(frame.numel(), seed=3)
    n0 = int(cu[1])
    full = varlen_attention(q, k, v, cu, longest, backend="sdpa")
    # the per-frame blocks themselves (no shortcut), with R = T - 1
    blocks = local_blocks(q[:n0], k[:n0], v[:n0], frame[:n0], window=6)
    torch.testing.assert_close(blocks, full[:n0], atol=1e-6, rtol=0)
    local = local_varlen_attention(q, k, v, cu, longest, frame, 6, backend="sdpa")
    torch.testing.assert_close(local, full, atol=1e-6, rtol=0)


def _random_model(local: list[int], window: int) -> DiT:
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    cfg.local_attn_layers, cfg.frame_receptive_field = local, window
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02 if p.ndim == 2 else 0.1)  # non-zero heads and norms
    return model


def _clips(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    video = [torch.randn(48, 6, 4, 4, generator=g), torch.randn(48, 3, 2, 4, generator=g)]
    audio = [torch.randn(21, 64, generator=g), torch.randn(9, 64, generator=g)]
    text = [torch.randn(5, 3584, generator=g), torch.randn(2, 3584, generator=g)]
    return video, audio, text


def test_dit_with_local_layers_is_pack_invariant_and_local():
    model = _random_model([1, 2], window=1)
    video, audio, text = _clips()
    packed_v, packed_a = model(video, audio, text)
    for i in range(2):  # each clip alone gives the same output: no key leaks across clips of a pack
        alone_v, alone_a = model(video[i : i + 1], audio[i : i + 1], text[i : i + 1])
        torch.testing.assert_close(packed_v[i], alone_v[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_a[i], alone_a[0], atol=1e-5, rtol=1e-5)
    full = copy.deepcopy(model)
    full.cfg.local_attn_layers = []
    for layer in full.block.layers:
        layer.attention.window = None
    full_v, _ = full(video, audio, text)
    assert (full_v[0] - packed_v[0]).abs().max() > 1e-3  # control: the local layers change the 6-frame clip
    wide = _random_model([1, 2], window=5)  # covers every frame of both clips: full attention
    torch.testing.assert_close(wide(video, audio, text)[0][0], full_v[0], atol=1e-6, rtol=0)


def test_local_layer_config_is_checked_and_the_released_variant_is_pinned():
    sr = MODEL_CONFIGS["magihuman_15b_sr1080"]
    full_layers = sorted(set(range(40)) - set(sr.local_attn_layers))
    assert full_layers == [3, 7, 11, 15, 19, 23, 27, 31] and len(sr.local_attn_layers) == 32  # spec §2.8
    assert sr.frame_receptive_field == 11 and sr.text_coords == "v1"
    assert MODEL_CONFIGS["magihuman_15b"].local_attn_layers == []
    for bad, match in (
        ({"local_attn_layers": [4]}, r"local_attn_layers has layer indices \[4\]"),
        ({"frame_receptive_field": -1}, "frame_receptive_field must be >= 0"),
    ):
        cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
        for key, value in bad.items():
            setattr(cfg, key, value)
        with pytest.raises(ValueError, match=match):
            DiT(cfg)


def test_full_attention_weights_load_into_a_frame_local_model():
    """The attention pattern is not in the weights (the release samples its SR weights with either): a checkpoint
    trained with full attention initialises a local-attention run, while a real architecture change is refused."""
    from magi_train.models.weights import check_same_architecture

    saved = copy.deepcopy(MODEL_CONFIGS["tiny"])
    local = copy.deepcopy(saved)
    local.local_attn_layers, local.frame_receptive_field = [1, 2], 0
    check_same_architecture(saved, local, "init_from=x.ckpt")
    local.hidden_size = 64
    with pytest.raises(ValueError, match="model.hidden_size"):
        check_same_architecture(saved, local, "init_from=x.ckpt")
