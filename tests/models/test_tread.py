"""TREAD token routing (models/tread.py): off is the plain forward bit for bit, the bypassing tokens are the chosen ones,
routed attention stays per clip, packing invariance, determinism, eval mode, activation checkpointing, config errors."""

import copy

import pytest
import torch

import magi_train.models.dit as dit_module
from magi_train.models.dit import AUDIO, MODEL_CONFIGS, TEXT, VIDEO, DiT
from magi_train.models.parallelize import ParallelConfig, parallelize
from magi_train.models.tread import TokenRouter, TreadConfig, enable_tread, seed_tread, tread_config

RATE, START, END = 0.5, 1, 2  # tiny has 4 layers: route layers 1 and 2 (inclusive)
CFG = TreadConfig(RATE, START, END)
AC = ("full", "selective")


def _model(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(copy.deepcopy(MODEL_CONFIGS["tiny"]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.ndim == 2 else 0.1)  # non-zero heads and norms
    return model


def _clips(seed: int = 1, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    grids, audio_lens, text_lens = [(3, 4, 6), (2, 2, 4), (2, 4, 4)], [9, 5, 5], [7, 2, 3]
    video = [torch.randn(48, *grids[i], generator=g) for i in range(n)]
    audio = [torch.randn(audio_lens[i], 64, generator=g) for i in range(n)]
    text = [torch.randn(text_lens[i], 3584, generator=g) for i in range(n)]
    return video, audio, text


def _modality(clips):
    """[L] modality ids of the packed clips [v a t | v a t ...] and the clip boundaries."""
    parts, starts = [], [0]
    for v, a, t in zip(*clips, strict=True):
        counts = (v[0].numel() // 4, a.shape[0], t.shape[0])  # video tokens: T x H/2 x W/2
        parts += [torch.full((n,), m) for m, n in zip((VIDEO, AUDIO, TEXT), counts, strict=True)]
        starts.append(starts[-1] + sum(counts))
    return torch.cat(parts), starts


def _flat(out):
    return torch.cat([t.flatten() for t in out[0] + out[1]])


def test_routing_off_is_bit_identical_and_off_in_eval_and_without_grad():
    plain, routed = _model(), enable_tread(_model(), CFG)
    clips = _clips()
    ref = _flat(plain(*clips))  # training mode, no router: today's forward
    routed.eval()
    assert torch.equal(_flat(routed(*clips)), ref)  # eval mode: no routing
    routed.train()
    with torch.no_grad():  # sampling / simulation in training mode: no routing
        assert torch.equal(_flat(routed(*clips)), ref)
    assert routed.block.router.last_bypass is None  # it never routed
    enable_tread(routed, None)
    assert torch.equal(_flat(routed(*clips)), ref)  # removed again
    # control: a training forward with the router does route, and changes the output
    enable_tread(routed, CFG)
    assert not torch.allclose(_flat(routed(*clips)), ref, atol=1e-4)
    assert routed.block.router.last_bypass.any()


def test_the_tokens_that_bypass_are_exactly_the_chosen_ones():
    model = enable_tread(_model(), CFG)
    clips = _clips()
    seen = {}
    layers = model.block.layers
    layers[START - 1].register_forward_hook(lambda m, a, o: seen.__setitem__("before", o.detach()))
    layers[START].register_forward_pre_hook(lambda m, a: seen.__setitem__("routed_in", (a[0].detach(), a[1])))
    layers[END].register_forward_hook(lambda m, a, o: seen.__setitem__("routed_out", o.detach()))
    layers[END + 1].register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0].detach()))
    model(*clips)
    bypass = model.block.router.last_bypass
    keep = ~bypass
    # exactly floor(rate * n) video and audio tokens of each clip bypass, never text
    modality, starts = _modality(clips)
    for c in range(2):
        for m in (VIDEO, AUDIO, TEXT):
            seg = modality[starts[c] : starts[c + 1]] == m
            n, chosen = int(seg.sum()), int(bypass[starts[c] : starts[c + 1]][seg].sum())
            assert chosen == (0 if m == TEXT else int(n * RATE)), (c, m)
    routed_in, routed_seq = seen["routed_in"]
    assert torch.equal(
        routed_in, seen["before"][keep]
    )  # the routed layers run exactly the kept rows, in order
    positions = [
        dit_module.token_positions(v.shape[1:], a.shape[0], t.shape[0])
        for v, a, t in zip(*clips, strict=True)
    ]
    rope = dit_module.rope_table(torch.cat(positions), model.adapter.rope.bands)
    assert torch.equal(routed_seq.rope, rope[keep])  # the kept tokens' own RoPE rows
    assert torch.equal(routed_seq.modality, modality[keep])
    assert torch.equal(seen["after"][bypass], seen["before"][bypass])  # bypassing rows rejoin unchanged
    assert torch.equal(seen["after"][keep], seen["routed_out"])  # kept rows carry the routed layers' output
    assert not torch.equal(seen["after"][keep], seen["before"][keep])  # control: those did change


def test_routed_attention_is_per_clip_and_packing_invariant(monkeypatch):
    calls = []
    original = dit_module.varlen_attention

    def spy(q, k, v, cu, max_seqlen, backend="auto"):
        calls.append((q.shape[0], cu.tolist(), max_seqlen))
        return original(q, k, v, cu, max_seqlen, backend)

    monkeypatch.setattr(dit_module, "varlen_attention", spy)
    model = enable_tread(_model(), CFG)
    clips = _clips(n=3)
    out_pack = model(*clips)
    bypass = model.block.router.last_bypass
    bounds = _modality(clips)[1]
    kept = [int((~bypass[s:e]).sum()) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    routed_cu = torch.tensor([0, *kept]).cumsum(0).tolist()
    assert [c[1] for c in calls] == [bounds] * START + [routed_cu] * (END - START + 1) + [bounds] * (3 - END)
    assert calls[START][2] == max(kept) and calls[START][0] == sum(kept)

    # the middle clip alone, routed the same way, gives the same outputs: no attention across clips
    class Fixed(TokenRouter):
        def choose(self, modality, cu_seqlens):
            return bypass[bounds[1] : bounds[2]]

    model.block.router = Fixed(CFG)
    alone = model(*[[x[1]] for x in clips])
    for got, want in zip(alone[0] + alone[1], [out_pack[0][1], out_pack[1][1]], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_routing_is_deterministic_given_the_seed():
    model = enable_tread(_model(), CFG)
    clips = _clips()
    runs = []
    for seed in (7, 7, 8):
        seed_tread(seed, model)
        out = _flat(model(*clips))
        runs.append((model.block.router.last_bypass.clone(), out))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])  # control: another seed routes other tokens


def test_routing_under_activation_checkpointing_same_outputs_and_grads():
    clips = _clips()
    outs, grads = [], []
    for plan in (
        ParallelConfig(tread=CFG),
        *(ParallelConfig(activation_checkpointing=m, tread=CFG) for m in AC),
    ):
        model = parallelize(_model(), None, plan)
        seed_tread(3, model)
        out = _flat(model(*clips))
        out.square().mean().backward()
        outs.append(out)
        grads.append(
            {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
        )
    for out, grad in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-5)
        for name, g in grads[0].items():
            torch.testing.assert_close(grad[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_config_values_and_errors():
    assert tread_config(None, 40) is None
    assert tread_config("released", 40) == TreadConfig(0.5, 2, 25)
    assert tread_config({"selection_rate": 0.25, "start_layer_idx": 1, "end_layer_idx": 1}, 4) == TreadConfig(
        0.25, 1, 1
    )
    for value, match in [
        ({"selection_rate": 1.0}, r"selection_rate=1.0.*\(0, 1\)"),
        ({"selection_rate": 0}, r"\(0, 1\)"),
        ({"start_layer_idx": 3, "end_layer_idx": 2}, "start_layer_idx <= end_layer_idx"),
        ("released", "num_layers = 4"),  # 2..25 does not fit tiny
        ("fast", "use null"),
        ({"rate": 0.5}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            tread_config(value, 4)
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    cfg.tread = "released"
    with pytest.raises(ValueError, match="model.tread layers 2..25"):
        DiT(cfg)
