"""Long driving audio encoded in 29 s windows with 50 % overlap and a linear cross-fade (release, spec §4.7).

The window is counted in latents (29 s = 725 latents at 25 per second), so a micro Oobleck with a hop of 8
samples runs the released window arithmetic on 6 KB of audio.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from magi_train.codecs.audio_vae import WINDOW_SECONDS, AudioVAE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MICRO = dict(
    encoder_hidden_size=16, downsampling_ratios=[2, 4], channel_multiples=[1, 2], decoder_channels=8,
    decoder_input_channels=8, audio_channels=2, sampling_rate=200,
)  # fmt: skip
W, OV = 725, 362  # released: 29 s * 25 latents per window, int(725 * 0.5) overlapping latents
STEP = W - OV  # 363
EDGE = (
    24  # latents near a window edge that see its zero padding (the micro model's receptive field is smaller)
)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AudioVAE(diffusers.AutoencoderOobleck(**MICRO))


def _wave(latents: int, hop: int, extra: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, latents * hop + extra, generator=g) * 0.3


def test_released_window_sizes():
    assert round(WINDOW_SECONDS * 25) == W and int(W * 0.5) == OV


def test_long_audio_length_seams_and_alignment(vae):
    hop = vae.hop
    wave = _wave(1100, hop, extra=5)  # 1101 latents after padding: three windows (0, 363, 726)
    whole = vae.encode(wave, sample=False)
    out = vae.encode_windowed(wave, sample=False)
    assert out.shape == whole.shape == (1, 1101, 8)  # same length as one-piece encoding: ceil(S / hop)

    def window(k: int) -> torch.Tensor:  # window k encoded on its own (zero-padded at the end)
        chunk = wave[:, :, k * STEP * hop : (k * STEP + W) * hop]
        return vae.encode(torch.nn.functional.pad(chunk, (0, W * hop - chunk.shape[2])), sample=False)[0]

    z = [window(k) for k in range(3)]
    # outside the seams each latent is its window's; inside, ((OV - j) * previous + j * current) / OV
    torch.testing.assert_close(out[0, :STEP], z[0][:STEP])
    for k in (1, 2):
        base = k * STEP
        j = torch.arange(OV, dtype=torch.float32)[:, None]
        want = ((OV - j) * z[k - 1][STEP : STEP + OV] + j * z[k][:OV]) / OV
        torch.testing.assert_close(out[0, base : base + OV], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0, 2 * STEP + OV :], z[2][OV : 1101 - 2 * STEP])
    # continuity: away from the window edges every window is the one-piece encoding, so the cross-faded seams
    # are seamless (windows placed where their audio is; the release's 362.5-latent audio step is not)
    edges = torch.tensor([0, W, STEP, STEP + W, 2 * STEP, 1101])
    far = [i for i in range(1101) if int((edges - i).abs().min()) >= EDGE]
    assert len(far) > 900
    torch.testing.assert_close(out[0, far], whole[0, far], atol=1e-5, rtol=0)
    # control: half a latent off (the release's audio step) does not line up with the one-piece encoding
    shifted = wave[:, :, STEP * hop - hop // 2 : (STEP + W) * hop - hop // 2]
    misplaced = vae.encode(shifted, sample=False)[0]
    interior = slice(EDGE, W - EDGE)
    assert (misplaced[interior] - whole[0, STEP + EDGE : STEP + W - EDGE]).abs().max() > 1e-3


def test_audio_within_one_window_is_encoded_in_one_piece(vae):
    wave = _wave(W, vae.hop)
    a = vae.encode_windowed(wave, sample=True, generator=torch.Generator().manual_seed(3))
    b = vae.encode(wave, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_posterior_samples_are_seeded_window_by_window(vae):
    wave = _wave(800, vae.hop)
    a, b = (vae.encode_windowed(wave, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (1, 800, 8)


def test_bad_windows_are_refused(vae):
    with pytest.raises(ValueError, match="no overlap or no step"):
        vae.encode_windowed(_wave(10, vae.hop), window_seconds=0.04)
    with pytest.raises(ValueError, match="no overlap or no step"):
        vae.encode_windowed(_wave(10, vae.hop), window_seconds=1.0, overlap=1.0)
