"""TurboVAED (the release's light video decoder): the released architecture's keys and shapes, frame counts and
sizes of the sliding-window decode, the channel orders, and strict loading of released-layout checkpoints."""

import json
from fractions import Fraction

import pytest
import torch

from magi_train.codecs.tiny import TINY_TURBO, write_tiny_turbo_vae
from magi_train.codecs.turbo_vae import (
    TurboVAE,
    TurboVAEConfig,
    TurboVAED,
    WanResample,
    load_turbo_vaed,
    unpatchify,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models

# TurboV3-Wan22-TinyShallow_7_7.json as third-party ports print it (spec §6.2 [3p]), with keys of the training code
RELEASED_JSON = {
    "_class_name": "TurboVAED", "in_channels": 3, "out_channels": 3, "latent_channels": 48,
    "decoder_block_out_channels": [64, 128, 256, 512], "decoder_layers_per_block": [2, 2, 2, 3, 3],
    "decoder_spatio_temporal_scaling": [False, True, True, True], "decoder_spatio_only": [False, True, False, False],
    "decoder_is_dw_conv": [False] * 5, "decoder_dw_kernel_size": 5, "decoder_causal": False, "patch_size": 2,
    "patch_size_t": 1, "resnet_norm_eps": 1e-6, "scaling_factor": 1.0, "use_unpatchify": True,
    "first_chunk_size": 7, "step_size": 7, "spatial_compression_ratio": 16, "temporal_compression_ratio": 4,
    "aligned_feature_projection_mode": "conv-2layer", "aligned_blks_indices": [0, 1],
}  # fmt: skip


def _tiny(**kw) -> TurboVAED:
    torch.manual_seed(0)
    return TurboVAED(TurboVAEConfig(**{**TINY_TURBO, **kw})).eval()


def test_released_config_builds_the_released_module_tree():
    cfg = TurboVAEConfig.from_dict(RELEASED_JSON)
    assert cfg == TurboVAEConfig()  # the defaults are the released config
    with torch.device("meta"):
        sd = TurboVAED(cfg).state_dict()
    # decoder: mid 3 resnets @512; up0 512 (3D up, 3); up1 512->256 (3D up, 2); up2 256->128 (2D up, 2);
    # up3 128->64 (no up, 2); conv_out 64 -> 12 then unpatchify (spec §6.2)
    shapes = {
        "decoder.conv_in.conv.weight": [512, 48, 3, 3, 3],
        "decoder.mid_block.resnets.2.conv2.conv.weight": [512, 512, 3, 3, 3],
        "decoder.up_blocks.0.upsamplers.0.time_conv.conv.weight": [1024, 512, 3, 1, 1],
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight": [512, 512, 3, 3],
        "decoder.up_blocks.0.resnets.2.conv1.conv.bias": [512],
        "decoder.up_blocks.1.conv_in.conv1.conv.weight": [256, 512, 3, 3, 3],
        "decoder.up_blocks.1.conv_in.conv_shortcut.conv.weight": [256, 512, 1, 1, 1],
        "decoder.up_blocks.1.upsamplers.0.time_conv.conv.weight": [512, 256, 3, 1, 1],
        "decoder.up_blocks.2.upsamplers.0.resample.1.weight": [128, 128, 3, 3],
        "decoder.up_blocks.3.conv_in.conv2.conv.weight": [64, 64, 3, 3, 3],
        "decoder.conv_out.conv.weight": [12, 64, 3, 3, 3],
    }
    for key, shape in shapes.items():
        assert list(sd[key].shape) == shape, key
    assert not any(k.startswith("decoder.up_blocks.2.upsamplers.0.time_conv") for k in sd)  # 2D upsampler
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in sd)
    assert not any(
        "resnets.2" in k for k in sd if k.startswith(("decoder.up_blocks.1", "decoder.up_blocks.3"))
    )
    assert all(k.startswith("decoder.") for k in sd) and not any("norm" in k for k in sd)  # weight-free norms


@pytest.mark.parametrize(
    "chunks, frames",
    [((3, 2), 1), ((3, 2), 2), ((3, 2), 3), ((3, 2), 6), ((7, 7), 5), ((7, 7), 9), ((1, 1), 4)],
)
def test_decode_frames_and_size(chunks, frames):
    vae = TurboVAE(_tiny(first_chunk_size=chunks[0], step_size=chunks[1]))
    out = vae.decode(torch.randn(1, 48, frames, 2, 3))
    assert out.shape == (1, 3, 4 * (frames - 1) + 1, 32, 48)  # 1 + 4k frames, 16x the latent size
    assert out.dtype == torch.float32 and out.abs().max() <= 1.0


def test_released_windows_of_a_4_second_clip():
    with torch.device("meta"):
        model = TurboVAED(TurboVAEConfig())
    pad, spans = model.windows(26)  # 101 frames: padded to 7 + 3 * 7 latent frames
    assert pad == 2
    assert spans == [(0, 8, True, 0, 4), (6, 15, False, 4, 4), (13, 22, False, 4, 4), (20, 28, False, 4, 0)]
    pixels = [4 * (stop - start - first) + first - left - right for start, stop, first, left, right in spans]
    assert pixels == [25, 28, 28, 28] and sum(pixels) - 4 * pad == 101


def test_one_window_is_one_decoder_call():
    model = _tiny(first_chunk_size=4)
    z = torch.randn(1, 48, 4, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(z), model.decoder(model.denormalize(z), is_first_chunk=True))


def test_denormalize_uses_the_wan22_statistics():
    from magi_train.codecs.video_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD

    model = _tiny()
    z = torch.ones(1, 48, 1, 1, 1)
    want = torch.tensor(WAN22_LATENT_STD) + torch.tensor(WAN22_LATENT_MEAN)
    torch.testing.assert_close(model.denormalize(z).flatten(), want)


def test_unpatchify_channel_order():
    # channel c*4 + i*2 + j lands at row offset j, column offset i (the release's / Wan's order)
    x = torch.arange(12.0).view(1, 12, 1, 1, 1)
    out = unpatchify(x, 2)[0, :, 0]  # [3, 2, 2]
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert out[c, j, i] == c * 4 + i * 2 + j


def test_time_upsampler_interleaves_channel_blocks_and_drops_the_first_frame():
    up = WanResample(2, "upsample3d", 2)
    with torch.no_grad():
        w = torch.zeros(4, 2, 3, 1, 1)
        for c in range(2):
            w[c, c, 1] = 1.0  # block 0: the frame itself
            w[2 + c, c, 1] = -1.0  # block 1: its negative
        up.time_conv.conv.weight.copy_(w)
        up.time_conv.conv.bias.zero_()
        ident = torch.zeros(2, 2, 3, 3)
        ident[0, 0, 1, 1] = ident[1, 1, 1, 1] = 1.0
        up.resample[1].weight.copy_(ident)
        up.resample[1].bias.zero_()
    x = torch.randn(1, 2, 3, 2, 2)
    full = up(x, is_first_chunk=False)
    first = up(x, is_first_chunk=True)
    big = x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest 2x
    want = torch.stack(
        [big[:, :, 0], -big[:, :, 0], big[:, :, 1], -big[:, :, 1], big[:, :, 2], -big[:, :, 2]], 2
    )
    torch.testing.assert_close(full, want)
    torch.testing.assert_close(first, want[:, :, 1:])  # 2T - 1 frames


# ---------------------------------------------------------------------------------------------------------
# Loading: the released layout, strictly
# ---------------------------------------------------------------------------------------------------------


def _released_dir(tmp_path, model: TurboVAED, state_fn=lambda sd: sd, name="turbo"):
    """A directory as the release ships it: TurboV3-Wan22-TinyShallow_7_7.json + checkpoint-340000.ckpt."""
    root = tmp_path / name
    root.mkdir()
    config = {**RELEASED_JSON, **{k: v for k, v in model.cfg.to_dict().items() if not k.startswith("_")}}
    (root / "TurboV3-Wan22-TinyShallow_7_7.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"ema_state_dict": state_fn(state), "step": 340000}, root / "checkpoint-340000.ckpt")
    return root


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: sd,  # decoder.* keys
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from a DDP-wrapped student
        lambda sd: {k.removeprefix("decoder."): v for k, v in sd.items()},  # decoder-only keys
        lambda sd: {**sd, "encoder.conv_in.weight": torch.zeros(1)},  # the student's encoder is not loaded
    ],
    ids=["decoder", "module", "decoder_only", "with_encoder"],
)
def test_strict_load_of_released_layouts(tmp_path, layout):
    src = _tiny()
    loaded = load_turbo_vaed(_released_dir(tmp_path, src, layout))
    z = torch.randn(1, 48, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), src(z), atol=0, rtol=0)


def test_save_then_load_roundtrip_and_tiny_codec(tmp_path):
    path = write_tiny_turbo_vae(tmp_path / "tv", seed=3)
    vae = TurboVAE.from_pretrained(path)
    assert vae.latent_channels == 48 and (vae.spatial_stride, vae.temporal_stride) == (16, 4)
    ckpt = torch.load(path / "checkpoint.ckpt", weights_only=True)
    assert set(ckpt) == {"ema_state_dict"} and all(k.startswith("decoder.") for k in ckpt["ema_state_dict"])
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.ckpt", "turbo_vae.json"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: {k: v for k, v in sd.items() if "conv_out" not in k}, "missing keys: decoder.conv_out"),
        (lambda sd: {**sd, "decoder.extra.weight": torch.zeros(2)}, "unexpected keys: decoder.extra.weight"),
        (lambda sd: {**sd, "decoder.conv_in.conv.bias": torch.zeros(3)}, "shape mismatches: decoder.conv_in"),
        (lambda sd: {"encoder.x": torch.zeros(1)}, "holds no decoder tensors"),
    ],
    ids=["missing", "unexpected", "shape", "no_decoder"],
)
def test_bad_keys_are_refused_with_a_list(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_turbo_vaed(_released_dir(tmp_path, _tiny(), edit))


def test_bad_directories_and_files(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_turbo_vaed(tmp_path / "nope")
    root = _released_dir(tmp_path, _tiny())
    (root / "other.json").write_text("{}")
    with pytest.raises(ValueError, match=r"exactly one config \.json file, found \['TurboV3"):
        load_turbo_vaed(root)
    (root / "other.json").unlink()
    torch.save({"state_dict": {}}, root / "checkpoint-340000.ckpt")
    with pytest.raises(ValueError, match="no 'ema_state_dict'"):
        load_turbo_vaed(root)

    # a pickled object of a class outside torch's allow-list: weights_only=True refuses to build it
    torch.save({"ema_state_dict": Fraction(1, 3)}, root / "checkpoint-340000.ckpt")
    with pytest.raises(ValueError, match="could not read"):
        load_turbo_vaed(root)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decoder_layers_per_block": [1, 1, 1, 1]}, "needs 5 entries"),
        ({"temporal_compression_ratio": 8}, "upsample 16x in space and 4x in time"),
        ({"patch_size": 4}, "patch_size must be 2"),
        ({"decoder_causal": True}, "decoder_causal must be false"),
        ({"decoder_block_out_channels": 64}, "must be a list"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        TurboVAEConfig.from_dict({**RELEASED_JSON, **change})


def test_unknown_config_keys_are_named_and_ignored(caplog):
    cfg = TurboVAEConfig.from_dict({**RELEASED_JSON, "mystery": 1})
    assert cfg == TurboVAEConfig() and "mystery" in caplog.text
