"""Wan2.2 video VAE codec on a tiny random AutoencoderKLWan in the Wan2.2 layout (spec §4.2, 4.6, 6.1)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from magi_train.codecs import (  # noqa: E402
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    VideoVAE,
    center_crop_resize,
    frames_for_seconds,
    latent_frames,
    latent_size,
    pixel_frames,
)

MEAN = [0.05 * (i - 24) for i in range(48)]
STD = [0.5 + i / 48 for i in range(48)]
TINY = dict(
    base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
    temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, scale_factor_temporal=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**TINY, latents_mean=MEAN, latents_std=STD)
    path = tmp_path_factory.mktemp("wan22_vae")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(wan_dir):
    return VideoVAE.from_pretrained(wan_dir)


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(1, 3, 9, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_strides_and_stats_come_from_the_config(vae):
    assert (vae.latent_channels, vae.spatial_stride, vae.temporal_stride) == (48, 16, 4)
    assert torch.allclose(vae.mean.flatten(), torch.tensor(MEAN))
    assert torch.allclose(vae.std.flatten(), torch.tensor(STD))


def test_encode_decode_shapes(vae, pixels):
    latent = vae.encode(pixels)
    assert latent.shape == (1, 48, 3, 4, 6) and latent.dtype == torch.float32
    out = vae.decode(latent)
    assert out.shape == (1, 3, 9, 64, 96) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_normalisation_against_the_raw_vae(vae, wan_dir, pixels):
    raw = diffusers.AutoencoderKLWan.from_pretrained(wan_dir).eval()
    mean, std = torch.tensor(MEAN).view(1, 48, 1, 1, 1), torch.tensor(STD).view(1, 48, 1, 1, 1)
    with torch.no_grad():
        mu = raw.encode(pixels).latent_dist.mean
        latent = vae.encode(pixels)
        torch.testing.assert_close(latent, (mu - mean) / std, rtol=1e-5, atol=1e-5)
        expected = raw.decode(latent * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latent), expected, rtol=1e-5, atol=1e-5)


def test_sampled_posterior_differs_from_mean(vae, pixels):
    gen = torch.Generator().manual_seed(0)
    sampled = vae.encode(pixels, sample=True, generator=gen)
    assert sampled.shape == (1, 48, 3, 4, 6)
    assert not torch.allclose(sampled, vae.encode(pixels))


@pytest.mark.parametrize(
    "shape, rule",
    [((1, 3, 8, 64, 96), r"1 \+ 4k"), ((1, 3, 9, 40, 96), "multiples of 16"),
     ((1, 3, 9, 64, 72), "multiples of 16"), ((1, 4, 9, 64, 96), r"\[B, 3, F, H, W\]"),
     ((3, 9, 64, 96), r"\[B, 3, F, H, W\]")],
)  # fmt: skip
def test_bad_pixel_shapes_are_rejected(vae, shape, rule):
    with pytest.raises(ValueError, match=rule):
        vae.encode(torch.zeros(shape))


def test_bad_latent_shape_is_rejected(vae):
    with pytest.raises(ValueError, match="48"):
        vae.decode(torch.zeros(1, 16, 3, 4, 6))


def test_missing_or_wrong_directory(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(ValueError, match="no_such_vae"):
        VideoVAE.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        VideoVAE.from_pretrained(tmp_path / "empty")


def test_falls_back_to_the_wan22_table_when_config_lacks_48_stats(tmp_path):
    model = diffusers.AutoencoderKLWan(**TINY)  # diffusers default stats: the 16 Wan2.1 values
    assert len(model.config.latents_mean) == 16
    vae = VideoVAE(model)
    assert torch.allclose(vae.mean.flatten(), torch.tensor(WAN22_LATENT_MEAN))
    assert torch.allclose(vae.std.flatten(), torch.tensor(WAN22_LATENT_STD))


def test_wan22_table_shape():
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    assert min(WAN22_LATENT_STD) > 0
    assert (WAN22_LATENT_MEAN[0], WAN22_LATENT_STD[0], WAN22_LATENT_MEAN[-1], WAN22_LATENT_STD[-1]) == (
        -0.2289, 0.4765, -0.0667, 0.7744)  # fmt: skip


def test_frame_and_size_arithmetic():
    assert [latent_frames(n) for n in (1, 5, 9, 101, 126)] == [1, 2, 3, 26, 32]
    assert pixel_frames(26) == 101 and pixel_frames(32) == 125  # 126 is not 1 + 4k: the release rounds down
    assert frames_for_seconds(4) == 101 and frames_for_seconds(5) == 126
    with pytest.raises(ValueError, match=">= 1"):
        latent_frames(0)
    # The release's sizes (spec §4.2): lat = px // 16 // 2 * 2, pixel size reset to lat * 16.
    cases = {(480, 272): (16, 30), (448, 256): (16, 28), (896, 512): (32, 56), (1920, 1088): (68, 120)}
    for (w, h), (lat_h, lat_w) in cases.items():
        size = latent_size(w, h)
        assert (size.height, size.width) == (lat_h, lat_w)
        assert (size.pixel_width, size.pixel_height) == (lat_w * 16, lat_h * 16)
    assert latent_size(480, 272).pixel_height == 256
    with pytest.raises(ValueError, match="too small"):
        latent_size(16, 256)


def _two_colour_image(h, w, band, axis):
    """Blue image whose first/last `band` columns (axis=1) or rows (axis=0) are red."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = 255
    edge = [slice(None)] * 2
    for sl in (slice(0, band), slice(-band, None)):
        edge[axis] = sl
        img[tuple(edge)] = (255, 0, 0)
    return img


def test_center_crop_keeps_the_middle():
    from PIL import Image

    wide = _two_colour_image(100, 300, band=70, axis=1)  # 3:1 -> 3:2 keeps columns 75..225 (all blue)
    out = center_crop_resize(wide, 96, 64)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert out[..., 0].max() < 10 and out[..., 2].min() > 245
    tall = _two_colour_image(400, 150, band=120, axis=0)  # 3:8 -> 3:2 keeps rows 150..250 (all blue)
    out = center_crop_resize(Image.fromarray(tall), 96, 64)
    assert out[..., 0].max() < 10 and out[..., 2].min() > 245


def test_encode_image_scales_to_unit_range(vae):
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    latent = vae.encode_image(img, width=96, height=64)
    assert latent.shape == (1, 48, 1, 4, 6)
    pixels = torch.from_numpy(img).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1
    torch.testing.assert_close(latent, vae.encode(pixels))
    assert vae.encode_image(np.zeros((300, 500, 3), np.uint8), width=96, height=64).shape == (1, 48, 1, 4, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode_image(img, width=90, height=64)
