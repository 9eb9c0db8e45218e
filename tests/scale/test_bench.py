"""The throughput benchmark: clip sizes, the FLOPs formula against torch's FLOP counter, packed == padded
outputs, and the CLI table (no timing assertions)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from magi_train.models.dit import MODEL_CONFIGS, DiT, ModalityLinear
from magi_train.models.tread import TreadConfig, enable_tread
from magi_train.tools import bench


def test_clip_shape_matches_the_release_timing():
    c = bench.clip_shape(4, 448, 256, 640)  # the example: small at 4 s 448x256
    assert (c.t, c.h, c.w) == (26, 16, 28)
    assert (c.video_tokens, c.audio, c.text) == (2912, 101, 640)


def test_block_matmul_params_count_one_expert_per_token():
    for name in ("tiny", "small", "magihuman_15b"):
        cfg = MODEL_CONFIGS[name]
        with torch.device("meta"):
            model = DiT(cfg)
        per_token = sum(
            m.weight.numel() // m.num_modality for m in model.block.modules() if isinstance(m, ModalityLinear)
        )
        assert bench.block_matmul_params(cfg) == per_token, name


@pytest.mark.parametrize("tread", [None, TreadConfig(0.5, 1, 2)])
def test_flops_formula_matches_torch_flop_counter(tread):
    torch.manual_seed(0)
    cfg = MODEL_CONFIGS["tiny"]
    model = enable_tread(DiT(cfg), tread)  # a training forward: routed when tread is set
    clips = [bench.ClipShape(2, 4, 6, 5, 7), bench.ClipShape(3, 6, 4, 9, 3)]
    video, audio, text = bench.random_inputs(cfg, clips, torch.device("cpu"))
    # the math SDPA kernel is made of matmuls the counter sees (it has no formula for the CPU flash kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(video, audio, text)
    # forward FLOPs = a third of the formula's forward + backward
    assert (
        abs(counter.get_total_flops() - bench.model_flops(cfg, clips, tread) / 3)
        <= 1e-9 * counter.get_total_flops()
    )
    if tread is not None:  # control: routing does remove work
        assert bench.model_flops(cfg, clips, tread) < 0.9 * bench.model_flops(cfg, clips)


def test_padded_batch_gives_the_packed_outputs():
    torch.manual_seed(0)
    cfg = MODEL_CONFIGS["tiny"]
    model = DiT(cfg)
    for p in model.parameters():  # non-zero heads, so that the outputs carry the whole network
        if p.ndim >= 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    clips = bench.mixed_clips(bench.ClipShape(5, 4, 6, 17, 8), 3)
    assert len({c.tokens for c in clips}) == 3  # really mixed lengths
    video, audio, text = bench.random_inputs(cfg, clips, torch.device("cpu"))
    packed = bench.outputs(model, video, audio, text)
    padded_text, valid, length = bench.pad_text(text, clips)
    assert valid == [c.tokens for c in clips] and length == max(valid)
    assert all(
        c.video_tokens + c.audio + t.shape[0] == length for t, c in zip(padded_text, clips, strict=True)
    )
    with bench.padded_attention(valid, length):
        padded = bench.outputs(model, video, audio, padded_text)
    for x, y in zip(padded[0] + padded[1], packed[0] + packed[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # without the key mask the padding would leak into the real tokens: the comparison can fail
    with bench.padded_attention([length] * len(clips), length):
        leaky = bench.outputs(model, video, audio, padded_text)
    assert max((x - y).abs().max() for x, y in zip(leaky[0], packed[0], strict=True)) > 1e-3


def test_cli_prints_the_table(capsys):
    rows = bench.main(
        [
            "--model",
            "tiny",
            "--num-layers",
            "2",
            "--seconds",
            "0.4",
            "--width",
            "64",
            "--height",
            "64",
            "--text-len",
            "8",
            "--batch",
            "3",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--compare-padded",
            "--peak-tflops",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "| packed | tiny (2 layers)" in out and "| padded |" in out and "padded / packed step time" in out
    packed, padded = rows
    assert packed["tokens"] == padded["tokens"] < padded["computed"]  # padding costs compute
    assert padded["max_rel_diff"] < 1e-5 and packed["mfu"] is not None and packed["step_s"] > 0


def test_cli_times_tread(capsys):
    args = (
        "--model tiny --num-layers 3 --seconds 0.4 --width 64 --height 64 --text-len 8 --steps 1 --warmup 0"
    )
    plain, routed = bench.main([*args.split(), "--tread", "--tread-start", "1", "--tread-end", "1"])
    assert "without / with TREAD: step time" in capsys.readouterr().out
    assert routed["computed"] < plain["computed"] and routed["flop_ratio"] > 1 and routed["step_ratio"] > 0
    with pytest.raises(SystemExit, match="num_layers = 3"):  # the released range needs 26 layers
        bench.main([*args.split(), "--tread"])
