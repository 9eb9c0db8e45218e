"""SyncNet-style LSE-D / LSE-C: weight loading and windowing on a tiny random SyncNet, and the offset search on a
synthetic talking mouth whose audio the test shifts by a known number of frames."""

import numpy as np
import pytest
import torch

psf = pytest.importorskip(
    "python_speech_features", reason="the eval extra is not installed: pip install -e '.[eval]'"
)

from magi_train.eval.sync import (  # noqa: E402
    AUDIO_RATE,
    SyncNet,
    SyncScorer,
    face_windows,
    mfcc_windows,
    offset_search,
)

TINY = dict(audio_channels=(4, 4, 4, 4, 4, 8), lip_channels=(4, 4, 4, 4, 4, 8), embed_dim=16)


def test_tiny_syncnet_loads_from_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = SyncNet(**TINY).eval()
    assert (
        "netcnnaud.18.weight" in net.state_dict() and "netcnnlip.18.weight" in net.state_dict()
    )  # reference keys
    torch.save(net.state_dict(), tmp_path / "syncnet_tiny.model")
    save_file(net.state_dict(), tmp_path / "syncnet_tiny.safetensors")
    lips, mfcc = torch.rand(2, 3, 5, 224, 224) * 255, torch.randn(2, 1, 13, 20)
    for name in ("syncnet_tiny.model", "syncnet_tiny.safetensors"):
        loaded = SyncNet.from_pretrained(tmp_path / name, **TINY)
        assert torch.equal(loaded.forward_lip(lips), net.forward_lip(lips))
        assert loaded.forward_aud(mfcc).shape == (2, 16)
    assert torch.equal(
        SyncNet.from_pretrained(tmp_path / "syncnet_tiny.model").forward_lip(lips), net.forward_lip(lips)
    )
    with pytest.raises(ValueError, match="not a SyncNet 'S' state dict of this size"):
        SyncNet.from_pretrained(tmp_path / "syncnet_tiny.model", embed_dim=1024)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SyncNet 'S' state dict"):
        SyncNet.from_pretrained(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not found"):
        SyncNet.from_pretrained(tmp_path / "syncnet_v2.model")


def test_windows_follow_the_reference_layout():
    frames = np.random.default_rng(0).integers(0, 255, (9, 224, 224, 3), dtype=np.uint8)
    lips = face_windows(frames, crop="none")
    assert lips.shape == (5, 3, 5, 224, 224)
    assert torch.equal(
        lips[2, :, 0], torch.from_numpy(frames[2][..., ::-1].copy()).float().permute(2, 0, 1)
    )  # BGR
    audio = np.random.default_rng(1).normal(0, 0.1, AUDIO_RATE).astype(np.float32)
    windows = mfcc_windows(audio, 5)
    reference = psf.mfcc(audio * 32767, AUDIO_RATE).T
    assert windows.shape == (5, 1, 13, 20)
    assert np.allclose(windows[3, 0].numpy(), reference[:, 12:32], atol=1e-4)  # window i = MFCC 4i .. 4i + 19
    wide = np.zeros((6, 100, 300, 3), np.uint8)
    assert face_windows(wide).shape == (2, 3, 5, 224, 224)  # centre square, resized
    with pytest.raises(ValueError, match="at least 5 frames"):
        face_windows(wide[:4])


class MouthEncoder(torch.nn.Module):
    """An analytic stand-in for SyncNet's two encoders, z-scored over the clip: mouth openness (dark pixels in the
    mouth box) per frame, and log energy (MFCC c0) per video frame of audio."""

    def forward_lip(self, x):
        openness = (x[:, :, :, 150:200, 80:144].mean(1) < 60).float().mean((-1, -2))  # [N, 5]
        return (openness - openness.mean()) / openness.std()

    def forward_aud(self, x):
        energy = x[:, 0, 0].reshape(len(x), 5, 4).mean(-1)  # c0 per 4 MFCC columns = one video frame
        return (energy - energy.mean()) / energy.std()


def _talking_mouth(frames: int, shift: int, seed: int = 0):
    """Frames with a mouth opening as m(t); audio whose loudness follows m(t - shift) (shift > 0: audio lags)."""
    rng = np.random.default_rng(seed)
    m = np.convolve(rng.random(frames + 40), np.ones(3) / 3, mode="same")[20 : 20 + frames]
    video = np.full((frames, 224, 224, 3), 200, np.uint8)
    for t, opening in enumerate(m):
        half = int(2 + 22 * opening)
        video[t, 175 - half : 175 + half, 84:140] = 20
    samples = AUDIO_RATE // 25
    env = np.repeat(np.exp(3 * np.roll(m, shift)), samples)
    audio = (rng.normal(0, 1, frames * samples) * env / env.max() * 0.5).astype(np.float32)
    return video, audio


@pytest.mark.parametrize("shift", [0, 3, -4])
def test_offset_search_recovers_a_known_shift(shift):
    video, audio = _talking_mouth(60, shift)
    scorer = SyncScorer(MouthEncoder(), vshift=8, crop="none", batch=1000)
    result = offset_search(*scorer.features(video, audio), vshift=8)
    # syncnet_python's sign (SyncNetInstance.evaluate: offset = vshift - argmin): audio `shift` frames late -> -shift
    assert result.offset == -shift
    assert result.lse_c > 0.5 and result.lse_d == min(result.mean_distances)
    # unrelated audio: no confident offset
    _, other = _talking_mouth(60, 0, seed=5)
    assert offset_search(*scorer.features(video, other), vshift=8).lse_c < result.lse_c / 2


def test_offset_search_through_an_mp4(tmp_path):
    from scipy.signal import resample_poly

    from magi_train.codecs import write_audio_video_mp4

    video, audio = _talking_mouth(60, 3)
    out = resample_poly(audio, 441, 160).astype(np.float32)
    clip = write_audio_video_mp4(tmp_path / "talk.mp4", video, np.stack([out, out]))
    result = SyncScorer(MouthEncoder(), vshift=8, batch=1000).score(clip)
    assert (
        abs(result.offset + 3) <= 1
    )  # audio 3 frames late; AAC and resampling may move it a fraction of a frame
    tiny = SyncScorer(SyncNet(**TINY), vshift=2)  # the real network runs on the same windows
    assert len(tiny.score(clip).mean_distances) == 5


def test_offset_sign_follows_syncnet_python_on_hand_made_features():
    """Features built by hand: audio window t + 2 matches video window t (the sound is 2 frames late). The
    reference computes dists[t][j] = |v_t - a_{t + j - vshift}| and offset = vshift - argmin_j mean_t -> -2."""
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.normal(size=(40, 8))).float()
    video, audio = base[2:32], base[:30]  # video window t = base[t + 2] = audio window t + 2
    result = offset_search(video, audio, vshift=5)
    assert result.offset == -2 and result.mean_distances.index(min(result.mean_distances)) == 5 + 2


def test_released_layout_without_num_batches_tracked_loads(tmp_path):
    """syncnet_v2.model was saved before BatchNorm had `num_batches_tracked`: a state dict of the released
    layout without those buffers loads; any other missing or extra key is still refused."""
    torch.manual_seed(0)
    net = SyncNet(**TINY).eval()
    legacy = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(legacy) < len(net.state_dict())  # the buffers really are left out
    torch.save(legacy, tmp_path / "syncnet_v2.model")
    loaded = SyncNet.from_pretrained(tmp_path / "syncnet_v2.model")
    lips = torch.rand(2, 3, 5, 224, 224) * 255
    assert torch.equal(loaded.forward_lip(lips), net.forward_lip(lips))
    no_mean = {k: v for k, v in legacy.items() if k != "netcnnaud.1.running_mean"}
    torch.save(no_mean, tmp_path / "broken.model")
    with pytest.raises(ValueError, match=r"missing \['netcnnaud.1.running_mean'\]"):
        SyncNet.from_pretrained(tmp_path / "broken.model")
    torch.save({**legacy, "extra.weight": torch.zeros(1)}, tmp_path / "extra.model")
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        SyncNet.from_pretrained(tmp_path / "extra.model")
    import argparse

    torch.save({**legacy, "opts": argparse.Namespace(x=1)}, tmp_path / "pickled.model")
    with pytest.raises(ValueError, match="never unpickled"):  # weights_only=True: no arbitrary objects
        SyncNet.from_pretrained(tmp_path / "pickled.model")
