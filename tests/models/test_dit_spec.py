"""The DiT against independently derived facts of the daVinci-MagiHuman release (GAIR-NLP @ 209209b).

Reference values are the spec's numbers (shared/spec/released-model.md §2-§3, §10) and hand-computed
cases, never the model compared with itself (STYLE.md 11).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import time

import pytest
import torch

from magi_train.models.checkpoint import released_key_shapes
from magi_train.models.dit import (
    MODEL_CONFIGS,
    DiT,
    DiTConfig,
    apply_rope,
    gelu7,
    pack,
    patchify,
    rope_bands,
    rope_table,
    swiglu7,
    token_positions,
    unpatchify,
)

# ---------------------------------------------------------------------------------------------------------
# The released 15B: key table and parameter counts
# ---------------------------------------------------------------------------------------------------------

# released-model.md §3, row by row (the "/" rows split in two).
SPEC_KEY_TABLE = {
    "adapter.video_embedder.weight": (5120, 192),
    "adapter.video_embedder.bias": (5120,),
    "adapter.text_embedder.weight": (5120, 3584),
    "adapter.text_embedder.bias": (5120,),
    "adapter.audio_embedder.weight": (5120, 64),
    "adapter.audio_embedder.bias": (5120,),
    "adapter.rope.bands": (16,),
    "block.layers.0.attention.pre_norm.weight": (15360,),
    "block.layers.0.attention.linear_qkv.weight": (21624, 5120),
    "block.layers.0.attention.linear_proj.weight": (15360, 5120),
    "block.layers.0.attention.q_norm.weight": (384,),
    "block.layers.0.attention.k_norm.weight": (384,),
    "block.layers.0.mlp.pre_norm.weight": (15360,),
    "block.layers.0.mlp.up_gate_proj.weight": (61440, 5120),
    "block.layers.0.mlp.down_proj.weight": (15360, 20480),
    "block.layers.20.attention.pre_norm.weight": (5120,),
    "block.layers.20.attention.linear_qkv.weight": (7208, 5120),
    "block.layers.20.attention.linear_proj.weight": (5120, 5120),
    "block.layers.20.attention.q_norm.weight": (128,),
    "block.layers.20.attention.k_norm.weight": (128,),
    "block.layers.20.mlp.pre_norm.weight": (5120,),
    "block.layers.20.mlp.up_gate_proj.weight": (27304, 5120),
    "block.layers.20.mlp.down_proj.weight": (5120, 13652),
    "block.layers.39.attention.linear_qkv.weight": (21624, 5120),
    "block.layers.39.attention.linear_proj.weight": (15360, 5120),
    "block.layers.39.attention.q_norm.weight": (384,),
    "block.layers.39.mlp.up_gate_proj.weight": (81912, 5120),
    "block.layers.39.mlp.down_proj.weight": (15360, 13652),
    "final_norm_video.weight": (5120,),
    "final_norm_audio.weight": (5120,),
    "final_linear_video.weight": (192, 5120),
    "final_linear_audio.weight": (64, 5120),
}
BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.(linear_qkv|linear_proj)|mlp\.(up_gate_proj|down_proj))\.weight"
)


@pytest.fixture(scope="module")
def meta_15b() -> DiT:
    with torch.device("meta"):
        return DiT(copy.deepcopy(MODEL_CONFIGS["magihuman_15b"]))


def _numel(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))


def test_15b_parameter_count(meta_15b):
    assert meta_15b.num_parameters() == 15_299_419_136
    assert sum(p.numel() for p in meta_15b.parameters()) == 15_299_419_136
    shapes = released_key_shapes(meta_15b.cfg)
    assert sum(math.prod(s) for s in shapes.values()) == 15_299_419_136 + 16  # + the bands buffer


def test_15b_state_dict_is_the_released_key_table(meta_15b):
    state = {k: tuple(v.shape) for k, v in meta_15b.state_dict().items()}
    expected = released_key_shapes(meta_15b.cfg)
    assert len(state) == len(expected) == 331
    assert state == expected
    for key, shape in SPEC_KEY_TABLE.items():
        assert state[key] == shape, key
        assert expected[key] == shape, key
    # 8 tensors per layer = 320 block tensors, of which 160 are linear weights (the spec's "320 block
    # linears" counts all block tensors; the bf16 parameter count below confirms 160 linears)
    assert sum(1 for k in expected if k.startswith("block.")) == 320
    assert sum(1 for k in expected if BLOCK_LINEAR.fullmatch(k)) == 160
    assert not any(k.endswith(".bias") for k in expected if k.startswith("block."))  # no bias in the block


def test_15b_per_part_parameter_counts(meta_15b):
    """released-model.md §2.11, from both the model and the key table."""
    shapes = released_key_shapes(meta_15b.cfg)
    model = {k: tuple(v.shape) for k, v in meta_15b.state_dict().items()}
    for table in (shapes, model):
        for i in range(40):
            n = _numel(table, f"block.layers.{i}.")
            if i < 4:
                assert n == 818_535_168, i  # mm gelu7
            elif i < 36:
                assert n == 272_824_576, i  # shared swiglu7
            else:
                assert n == 818_473_728, i  # mm swiglu7
        assert _numel(table, "adapter.") - 16 == 19_676_160
        assert _numel(table, "final_") == 1_320_960
        assert _numel(table, "block.") == 15_278_422_016
        p = "block.layers.20."
        assert math.prod(table[p + "attention.linear_qkv.weight"]) == 36_904_960
        assert math.prod(table[p + "attention.linear_proj.weight"]) == 26_214_400
        assert math.prod(table[p + "mlp.up_gate_proj.weight"]) == 139_796_480
        assert math.prod(table[p + "mlp.down_proj.weight"]) == 69_898_240
        assert _numel(table, p) - 36_904_960 - 26_214_400 - 139_796_480 - 69_898_240 == 10_496
        # dtype split of the base checkpoint (§2.11): 30.64 GB
        bf16 = sum(math.prod(s) for k, s in table.items() if BLOCK_LINEAR.fullmatch(k))
        assert bf16 == 15_277_834_240
        assert sum(math.prod(s) for k, s in table.items() if not BLOCK_LINEAR.fullmatch(k)) - 16 == 21_584_896


def test_no_timestep_anywhere(meta_15b):
    assert list(inspect.signature(DiT.forward).parameters) == ["self", "video", "audio", "text"]
    # "t_embed" as a name part (t_embedder), not inside "text_embedder"
    banned = re.compile(r"time|timestep|(^|[._])t_embed|adaln|modulation")
    for model in (meta_15b, DiT(copy.deepcopy(MODEL_CONFIGS["tiny"]))):
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        assert names
        for name in names:
            assert not banned.search(name.lower()), name
    assert banned.search("adapter.t_embedder.weight") and not banned.search("adapter.text_embedder.weight")


# ---------------------------------------------------------------------------------------------------------
# Patchify (input) and unpatchify (output) channel orders (§2.6, §2.9, §10.1)
# ---------------------------------------------------------------------------------------------------------

GRID = (2, 4, 6)  # latent T, H, W -> Hp, Wp = 2, 3


def test_patchify_channel_order_is_c_kh_kw():
    t_, h_, w_ = GRID
    video = torch.arange(48 * t_ * h_ * w_, dtype=torch.float64).reshape(48, t_, h_, w_)
    tokens = patchify(video)
    hp, wp = h_ // 2, w_ // 2
    assert tokens.shape == (t_ * hp * wp, 192)
    for t in range(t_):
        for h in range(hp):
            for w in range(wp):
                row = (t * hp + h) * wp + w
                for c in range(48):
                    for kh in range(2):
                        for kw in range(2):
                            assert tokens[row, c * 4 + kh * 2 + kw] == video[c, t, 2 * h + kh, 2 * w + kw]


def test_unpatchify_channel_order_is_kh_kw_c():
    t_, h_, w_ = GRID
    hp, wp = h_ // 2, w_ // 2
    tokens = torch.arange(t_ * hp * wp * 192, dtype=torch.float64).reshape(-1, 192)
    video = unpatchify(tokens, GRID)
    assert video.shape == (48, t_, h_, w_)
    for t in range(t_):
        for h in range(hp):
            for w in range(wp):
                row = (t * hp + h) * wp + w
                for c in range(48):
                    for kh in range(2):
                        for kw in range(2):
                            assert video[c, t, 2 * h + kh, 2 * w + kw] == tokens[row, (kh * 2 + kw) * 48 + c]


def test_patchify_and_unpatchify_are_not_inverse_orders():
    video = torch.randn(48, *GRID, dtype=torch.float64)
    assert not torch.equal(unpatchify(patchify(video), GRID), video)  # §10.1: it "still runs"
    # head channel (kh*2+kw)*48 + c holds what input channel c*4 + kh*2 + kw held
    to_head = torch.tensor([c * 4 + k for k in range(4) for c in range(48)])
    assert torch.equal(unpatchify(patchify(video)[:, to_head], GRID), video)
    tokens = torch.randn(2 * 2 * 3, 192, dtype=torch.float64)
    assert torch.equal(patchify(unpatchify(tokens, GRID))[:, to_head], tokens)


# ---------------------------------------------------------------------------------------------------------
# RoPE (§2.5, §10.4)
# ---------------------------------------------------------------------------------------------------------


def _video_positions_2x4x6() -> list[tuple[float, float, float]]:
    # T=2, Hp=2, Wp=3: t as is, h - (Hp-1)/2, w - (Wp-1)/2; row-major (t outer, w inner)
    return [(t, h, w) for t in (0.0, 1.0) for h in (-0.5, 0.5) for w in (-1.0, 0.0, 1.0)]


AUDIO_5 = [(i / 4, 0.0, 0.0) for i in range(5)]  # ref_T = (5-1)//4+1 = 2 -> scale 1/4


@pytest.mark.parametrize(
    "text_len, text_coords, text_expected",
    [
        (3, "v2", [(0.0, 0.0, 0.0)] * 3),  # base/distill: scale 0, no rotation
        (1, "v2", [(-1.0, 0.0, 0.0)]),  # size == ref == 1: scale forced to 1, position = offset -1
        (3, "v1", [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (1.0, 0.0, 0.0)]),  # SR: i/(L-1)
    ],
)
def test_token_positions_by_hand(text_len, text_coords, text_expected):
    pos = token_positions(GRID, 5, text_len, text_coords)
    expected = torch.tensor(_video_positions_2x4x6() + AUDIO_5 + text_expected, dtype=torch.float64)
    assert pos.shape == expected.shape
    assert torch.equal(pos.double(), expected)


def test_audio_positions_sit_on_the_video_time_axis():
    # 4 s clip: A = 101 audio latents, T = 26 video latents: audio i at time i/4, last one at T-1
    pos = token_positions((26, 2, 2), 101, 1)
    audio_t = pos[26 : 26 + 101, 0]
    assert torch.allclose(audio_t, torch.arange(101, dtype=torch.float64) / 4)
    assert audio_t[-1] == 25


def test_rope_bands():
    bands = rope_bands(128)
    assert bands.shape == (16,)
    for k, value in enumerate([1.0, 0.5623413251903491, 0.31622776601683794, 0.1778279410038923, 0.1]):
        assert bands[k].item() == pytest.approx(value, rel=1e-12)
    for k in range(16):
        assert bands[k].item() == pytest.approx(10000 ** (-k / 16), rel=1e-12)
    tiny = DiT(copy.deepcopy(MODEL_CONFIGS["tiny"]))  # head_dim 32 -> 4 bands
    assert torch.allclose(tiny.adapter.rope.bands, torch.tensor([1.0, 0.1, 0.01, 0.001]))


def test_rope_table_layout():
    """[sin_t(n) sin_h(n) sin_w(n) | cos_t cos_h cos_w], angle = position * band."""
    pos = token_positions(GRID, 5, 2, "v1")
    bands = rope_bands(32)
    n = 4
    table = rope_table(pos, bands)
    assert table.shape == (pos.shape[0], 6 * n) and table.dtype == torch.float32
    for l_ in range(pos.shape[0]):
        for axis in range(3):
            for k in range(n):
                angle = pos[l_, axis].item() * bands[k].item()
                assert table[l_, axis * n + k].item() == pytest.approx(math.sin(angle), abs=1e-6)
                assert table[l_, 3 * n + axis * n + k].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("head_dim", [32, 128])
def test_apply_rope_rotates_pairs_j_and_j_plus_half(head_dim):
    g = torch.Generator().manual_seed(0)
    n, r = head_dim // 8, 3 * head_dim // 4  # n bands per axis; the first r dims are rotated
    half = r // 2
    pos = torch.randn(7, 3, generator=g, dtype=torch.float64) * 5
    bands = rope_bands(head_dim)
    x = torch.randn(7, 3, head_dim, generator=g)
    out = apply_rope(x, rope_table(pos, bands))
    expected = x.clone().double()
    for l_ in range(7):
        for j in range(half):
            axis, k = divmod(j, n)  # j < n: time, n <= j < 2n: height, 2n <= j < 3n: width
            angle = pos[l_, axis].item() * bands[k].item()
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[l_, :, j].double(), x[l_, :, j + half].double()
            expected[l_, :, j] = a * c - b * s
            expected[l_, :, j + half] = b * c + a * s
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[..., r:], x[..., r:])  # the last head_dim/4 dims are untouched


def test_rope_is_identity_for_v2_text():
    pos = token_positions(GRID, 5, 9, "v2")
    table = rope_table(pos, rope_bands(128))
    x = torch.randn(pos.shape[0], 2, 128)
    out = apply_rope(x, table)
    text = slice(12 + 5, None)
    assert torch.equal(out[text], x[text])
    assert not torch.allclose(out[:12], x[:12])  # video tokens do rotate


def test_packed_rope_is_the_per_clip_table():
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    bands = rope_bands(cfg.head_dim).float()
    clips = [((48, 2, 4, 6), 5, 3), ((48, 1, 2, 2), 1, 1)]
    video = [torch.zeros(s) for s, _, _ in clips]
    audio = [torch.zeros(a, 64) for _, a, _ in clips]
    text = [torch.zeros(t, 3584) for _, _, t in clips]
    _, seq = pack(video, audio, text, cfg, bands)
    per_clip = [rope_table(token_positions(s[1:], a, t, "v2"), bands) for s, a, t in clips]
    assert torch.equal(seq.rope, torch.cat(per_clip))


# ---------------------------------------------------------------------------------------------------------
# Activations (§2.4, §10.2)
# ---------------------------------------------------------------------------------------------------------


def test_swiglu7_interleaved_and_clamped():
    g = torch.tensor([-9.0, -1.0, 0.0, 0.5, 3.0, 6.9, 7.0, 12.0], dtype=torch.float64)
    lin = torch.tensor([10.0, -8.0, 2.0, -0.5, 6.5, -7.0, 0.0, 7.5], dtype=torch.float64)
    x = torch.stack([g, lin], dim=-1).flatten()  # even entries gate, odd entries linear
    out = swiglu7(x)
    assert out.shape == (8,)
    for j in range(8):
        gc, lc = min(g[j].item(), 7.0), min(max(lin[j].item(), -7.0), 7.0)
        expected = gc / (1 + math.exp(-1.702 * gc)) * (lc + 1)
        assert out[j].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_gelu7_is_ungated_and_clamped():
    x = torch.tensor([-3.0, 0.0, 1.0, 7.0, 50.0], dtype=torch.float64)
    for xi, yi in zip(x.tolist(), gelu7(x).tolist(), strict=True):
        xc = min(xi, 7.0)
        assert yi == pytest.approx(xc / (1 + math.exp(-1.702 * xc)), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Per-head sigmoid gate from the last num_heads_q rows of each qkv expert (§2.3, §10.5)
# ---------------------------------------------------------------------------------------------------------


def _random_tiny(seed: int = 0, **changes) -> DiT:
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.ndim == 2 else 0.1)  # non-zero heads and norms
    return model


def _clip(seed: int, grid=(2, 4, 6), audio_len=5, text_len=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(48, *grid, generator=g),
        torch.randn(audio_len, 64, generator=g),
        torch.randn(text_len, 3584, generator=g),
    )


def _proj_input_of_layer0(model: DiT, clip) -> torch.Tensor:
    captured = []
    hook = model.block.layers[0].attention.linear_proj.register_forward_hook(
        lambda mod, args, out: captured.append(args[0].detach().clone())
    )
    with torch.no_grad():
        model([clip[0]], [clip[1]], [clip[2]])
    hook.remove()
    return captured[0]  # [L, heads * head_dim], packed order [video | audio | text]


def _close_gate(model: DiT, expert: int, head: int) -> None:
    """Make the gate logit of `head` -inf-like for tokens of modality `expert` in layer 0 (an mm layer).

    Feature 0 of the residual stream entering layer 0 is made exactly 1 for every token (embedder row 0 =
    0, bias 1) and its pre-norm weight (w+1) = 1, so a weight of -1e30 on feature 0 in the gate row gives
    a logit of about -1e30 whatever the token: sigmoid = 0.
    """
    cfg = model.cfg
    hq, d, hkv, h = cfg.num_heads_q, cfg.head_dim, cfg.num_heads_kv, cfg.hidden_size
    attn = model.block.layers[0].attention
    rows_per_expert = attn.linear_qkv.weight.shape[0] // 3
    with torch.no_grad():
        for emb in (model.adapter.video_embedder, model.adapter.audio_embedder, model.adapter.text_embedder):
            emb.weight[0].zero_()
            emb.bias[0] = 1.0
        for m in range(3):
            attn.pre_norm.weight[m * h] = 0.0
        if rows_per_expert == hq * d + 2 * hkv * d + hq:  # gate rows present: the last hq of each expert
            attn.linear_qkv.weight[expert * rows_per_expert + hq * d + 2 * hkv * d + head, 0] = -1e30


@pytest.mark.parametrize("expert", [0, 1, 2], ids=["video", "audio", "text"])
def test_gate_rows_gate_their_head_for_their_modality(expert):
    model = _random_tiny()
    assert 0 in model.cfg.mm_layers
    _close_gate(model, expert, head=1)
    clip = _clip(0)
    x = _proj_input_of_layer0(model, clip)
    d = model.cfg.head_dim
    counts = [12, 5, 3]  # video (2*2*3), audio, text tokens
    modality = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    per_head = x.reshape(x.shape[0], model.cfg.num_heads_q, d).abs().amax(-1)  # [L, heads]
    assert torch.all(per_head[modality == expert, 1] == 0)  # closed gate: exactly zero
    assert torch.all(per_head[modality != expert, 1] > 0)  # other modalities' expert untouched
    others = [0, 2, 3]
    assert torch.all(per_head[:, others] > 0)


def test_gate_rows_do_not_matter_without_gating():
    clip = _clip(0)
    closed_all = _random_tiny(enable_attn_gating=False)
    closed_one = copy.deepcopy(closed_all)
    for m in range(3):
        _close_gate(closed_all, m, head=1)
    _close_gate(closed_one, 0, head=1)  # same adapter/norm edits, fewer gate rows changed
    with torch.no_grad():
        out_a = closed_all([clip[0]], [clip[1]], [clip[2]])
        out_b = closed_one([clip[0]], [clip[1]], [clip[2]])
    x = _proj_input_of_layer0(closed_all, clip)
    assert torch.all(x.reshape(x.shape[0], -1, closed_all.cfg.head_dim).abs().amax(-1) > 0)
    for a, b in zip(out_a[0] + out_a[1], out_b[0] + out_b[1], strict=True):
        assert torch.equal(a, b)


def test_ungated_model_has_no_gate_rows():
    """Release: gating_size = num_heads_q if enable_attn_gating else 0, so no gate rows without gating."""
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    cfg.enable_attn_gating = False
    model = DiT(cfg)
    shapes = released_key_shapes(cfg)
    assert shapes["block.layers.1.attention.linear_qkv.weight"] == (4 * 32 + 2 * 2 * 32, 128)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


# ---------------------------------------------------------------------------------------------------------
# Packing: a clip's outputs do not depend on what it is packed with
# ---------------------------------------------------------------------------------------------------------


def test_packing_invariance():
    model = _random_tiny(seed=2)
    a = _clip(10, (2, 4, 6), 5, 3)
    b = _clip(11, (3, 2, 4), 9, 7)
    c = _clip(12, (1, 6, 2), 1, 1)
    with torch.no_grad():
        (va,), (aa,) = model([a[0]], [a[1]], [a[2]])
        videos, audios = model(*[list(x) for x in zip(b, a, c, strict=True)])
    assert va.abs().max() > 0 and aa.abs().max() > 0  # non-zero heads
    assert [v.shape for v in videos] == [b[0].shape, a[0].shape, c[0].shape]
    assert [x.shape for x in audios] == [b[1].shape, a[1].shape, c[1].shape]
    torch.testing.assert_close(videos[1], va, atol=1e-5, rtol=1e-5)  # GEMM blocking: not bitwise
    torch.testing.assert_close(audios[1], aa, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Sanity bound on the tiny model's cost
# ---------------------------------------------------------------------------------------------------------


def test_tiny_forward_backward_is_fast():
    model = _random_tiny(seed=3)
    clip = _clip(0)
    model([clip[0]], [clip[1]], [clip[2]])  # warm-up (first-call overheads)
    start = time.perf_counter()
    videos, audios = model([clip[0]], [clip[1]], [clip[2]])
    (videos[0].square().mean() + audios[0].square().mean()).backward()
    assert time.perf_counter() - start < 5.0
    assert all(p.grad is not None for p in model.parameters())


def test_config_class_defaults_are_the_release():
    cfg = DiTConfig()
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.num_heads_kv, cfg.num_heads_q) == (
        40,
        5120,
        128,
        8,
        40,
    )
    assert cfg.mm_layers == [0, 1, 2, 3, 36, 37, 38, 39] and cfg.gelu7_layers == [0, 1, 2, 3]
    assert cfg.swiglu7_intermediate == 13652 and cfg.gelu7_intermediate == 20480
