"""Stable Audio Open VAE on a micro random AutoencoderOobleck; 51.2 -> 44.1 kHz arithmetic (spec §6.3)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from magi_train.codecs import (  # noqa: E402
    AUDIO_LATENT_CHANNELS,
    EFFECTIVE_SAMPLE_RATE,
    HOP,
    LATENTS_PER_SECOND,
    OUTPUT_SAMPLE_RATE,
    AudioVAE,
    audio_latents_for_seconds,
    audio_latents_for_video_latents,
    output_num_samples,
    to_output_rate,
    video_latents_for_audio_latents,
)

MICRO = dict(
    encoder_hidden_size=16, downsampling_ratios=[2, 4], channel_multiples=[1, 2], decoder_channels=8,
    decoder_input_channels=8, audio_channels=2, sampling_rate=EFFECTIVE_SAMPLE_RATE,
)  # fmt: skip


@pytest.fixture(scope="module")
def oobleck_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("oobleck")
    diffusers.AutoencoderOobleck(**MICRO).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(oobleck_dir):
    return AudioVAE.from_pretrained(oobleck_dir)


@pytest.fixture(scope="module")
def raw(oobleck_dir):
    return diffusers.AutoencoderOobleck.from_pretrained(oobleck_dir).eval()


def test_real_model_constants():
    assert HOP == 2 * 4 * 4 * 8 * 8 == 2048
    assert EFFECTIVE_SAMPLE_RATE == HOP * LATENTS_PER_SECOND == 51200
    assert (OUTPUT_SAMPLE_RATE, AUDIO_LATENT_CHANNELS) == (44100, 64)


def test_hop_and_channels_are_read_from_the_config(vae):
    assert (vae.hop, vae.latent_channels, vae.audio_channels) == (8, 8, 2)


def test_encode_decode_lengths(vae):
    wave = torch.randn(2, 2, 80) * 0.1
    latents = vae.encode(wave)
    assert latents.shape == (2, 10, 8) and latents.dtype == torch.float32
    assert vae.decode(latents).shape == (2, 2, 80)
    # A length that is not a whole number of hops is zero-padded up to one.
    assert vae.encode(wave[..., :75]).shape == (2, 10, 8) and vae.num_latents(75) == 10


def test_encode_matches_the_raw_posterior(vae, raw):
    wave = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    with torch.no_grad():
        dist = raw.encode(wave).latent_dist
        expected_sample = dist.sample(generator=torch.Generator().manual_seed(7))
    mean = vae.encode(wave, sample=False)
    torch.testing.assert_close(mean, dist.mean.transpose(1, 2))
    sampled = vae.encode(wave, generator=torch.Generator().manual_seed(7))  # default: sample, as the release
    torch.testing.assert_close(sampled, expected_sample.transpose(1, 2))
    assert not torch.allclose(sampled, mean)


def test_decode_matches_the_raw_decoder(vae, raw):
    latents = torch.randn(1, 6, 8)
    with torch.no_grad():
        expected = raw.decode(latents.transpose(1, 2)).sample
    torch.testing.assert_close(vae.decode(latents), expected)


def test_bad_shapes_are_rejected(vae):
    with pytest.raises(ValueError, match=r"\[B, 2, S>0\]"):
        vae.encode(torch.zeros(1, 1, 80))
    with pytest.raises(ValueError, match=r"\[B, 2, S>0\]"):
        vae.encode(torch.zeros(2, 80))
    with pytest.raises(ValueError, match=r"\[B, A, 8\]"):
        vae.decode(torch.zeros(1, 10, 64))


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="missing_audio_vae"):
        AudioVAE.from_pretrained(tmp_path / "missing_audio_vae")


def test_latent_count_arithmetic():
    assert audio_latents_for_seconds(4) == 101 and audio_latents_for_seconds(5) == 126
    assert audio_latents_for_video_latents(26) == 101 and audio_latents_for_video_latents(32) == 125
    assert video_latents_for_audio_latents(101) == 26 and video_latents_for_audio_latents(100) == 25


def test_output_rate_arithmetic():
    # 101 latents (4 s + 1 frame) -> 206,848 samples at 51.2 kHz -> int(206,848 * 441 / 512) at 44.1 kHz,
    # i.e. 4.04 s. (The spec text writes 178,176, but 206,848 * 441 / 512 = 178,164.75 and 4.04 s * 44,100
    # = 178,164.)
    assert 101 * HOP == 206_848
    assert output_num_samples(206_848) == 178_164 == round(4.04 * OUTPUT_SAMPLE_RATE)
    assert output_num_samples(EFFECTIVE_SAMPLE_RATE) == OUTPUT_SAMPLE_RATE
    assert to_output_rate(torch.zeros(2, 206_848)).shape == (2, 178_164)
    assert to_output_rate(torch.zeros(1, 2, 2048)).shape == (1, 2, 1764)


def test_output_rate_keeps_pitch_and_duration():
    # One second at the effective rate becomes one second at 44.1 kHz with the same frequency.
    n = np.arange(EFFECTIVE_SAMPLE_RATE)
    wave = torch.from_numpy(np.sin(2 * np.pi * 440 * n / EFFECTIVE_SAMPLE_RATE)).float()[None]
    out = to_output_rate(wave)
    m = np.arange(OUTPUT_SAMPLE_RATE)
    expected = np.sin(2 * np.pi * 440 * m / OUTPUT_SAMPLE_RATE)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-3)
