"""PyAV mp4 muxing, mp4 inspection and audio loading of magi_train.codecs (release §4.7 and §6.5)."""

from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from magi_train.codecs import load_audio, read_mp4_info, write_audio_video_mp4  # noqa: E402

FPS, SR = 25, 44100


def _frames(n=51, h=64, w=96):
    t = np.arange(n)[:, None, None]
    y, x = np.mgrid[0:h, 0:w]
    frames = np.stack([(x * 2 + t * 5) % 256, (y * 3 + t * 2) % 256, np.full((n, h, w), 128)], axis=-1)
    return frames.astype(np.uint8)


def _stereo_sine(seconds, freq=440.0, amp=0.5):
    t = np.arange(round(seconds * SR)) / SR
    mono = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([mono, mono]).astype(np.float32)


def _dominant_hz(wave, rate):
    spectrum = np.abs(np.fft.rfft(wave))
    return np.argmax(spectrum) * rate / len(wave)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp4") / "clip.mp4"
    write_audio_video_mp4(path, _frames(), torch.from_numpy(_stereo_sine(51 / FPS)), fps=FPS)
    return path


def test_mp4_round_trip(clip):
    info = read_mp4_info(clip)
    assert info["frames"] == 51
    assert info["fps"] == pytest.approx(25.0)
    assert (info["width"], info["height"]) == (96, 64)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert (info["audio_rate"], info["audio_channels"]) == (44100, 2)
    assert abs(info["audio_seconds"] - 2.04) <= 1 / FPS
    with av.open(str(clip)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert [p.name for p in clip.parent.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_mp4_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    write_audio_video_mp4(target, _frames(5), None)
    before = target.read_bytes()
    assert read_mp4_info(target)["frames"] == 5 and read_mp4_info(target)["audio_rate"] == 0

    def broken(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_audio_video_mp4(target, _frames(5), _stereo_sine(0.2))
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_mp4_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_audio_video_mp4(tmp_path / "a.mp4", _frames(3).astype(np.float32), None)
    with pytest.raises(ValueError, match="even"):
        write_audio_video_mp4(tmp_path / "a.mp4", _frames(3, h=63), None)
    with pytest.raises(ValueError, match=r"\[2, S\]"):
        write_audio_video_mp4(tmp_path / "a.mp4", _frames(3), np.zeros((1000, 2), np.float32))
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="nothing_here"):
        read_mp4_info(tmp_path / "nothing_here.mp4")


def test_load_audio_from_mp4(clip):
    audio = load_audio(clip, 2.0)
    assert audio.shape == (2, 102_400) and audio.dtype == torch.float32
    assert torch.equal(audio[0], audio[1])
    assert _dominant_hz(audio[0, 25_600:].numpy(), 51_200) == pytest.approx(440, abs=3)
    with pytest.raises(ValueError, match=r"too short") as err:
        load_audio(clip, 3.0)
    assert "0.9" in str(err.value)  # says by how much (about 0.96 s)


def _write_wav(path, wave):
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=SR)
        stream.layout = "stereo"
        pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm.T.reshape(1, -1)), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, Fraction(1, SR)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_load_audio_from_wav_downmixes_like_the_release(tmp_path):
    left = _stereo_sine(1.0, amp=0.6)[0]
    wav = tmp_path / "speech.wav"
    _write_wav(wav, np.stack([left, np.zeros_like(left)]))
    audio = load_audio(wav, 0.5)
    assert audio.shape == (2, 25_600)
    # ffmpeg's `-ac 1` to s16 (whisper.load_audio in the release) gives (L + R) / 2: peak 0.3, not 0.42.
    assert audio.abs().max().item() == pytest.approx(0.3, abs=0.02)
    assert _dominant_hz(audio[0].numpy(), 51_200) == pytest.approx(440, abs=3)
    with pytest.raises(ValueError, match="too short"):
        load_audio(wav, 1.5)
    with pytest.raises(ValueError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav", 1.0)
