"""recipe=dmd2_distill validation videos (issue 12 item 7): with codecs in generate.*, the first validation clips of
the student's and the guided teacher's samples are decoded into one mp4 each, [student | teacher] side by side with
the student's sound left and the teacher's right, and logged to W&B (magi_train/tasks/sample_videos.py)."""

import importlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import load_file

import magi_train.codecs as codecs_module
from magi_train.__main__ import run
from magi_train.codecs import AudioVAE, TurboVAE, VideoVAE, pixel_frames, read_mp4_info
from magi_train.config import DistillConfig, GenerateConfig
from magi_train.inference.generate import decode_clip
from magi_train.tasks.dmd2 import validate_distill
from magi_train.tasks.sample_videos import CAPTION, side_by_side, validation_videos
from tests.recipes.test_dmd2_recipe import _dmd2, teacher_ckpt  # noqa: F401  (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
generate = importlib.import_module(
    "magi_train.inference.generate"
)  # the package exports a function of that name

# one validation (at iteration 2) of one batch; text-to-video only, so student and teacher differ in both
# modalities (an i2v clip pins the first frame of both, an a2v clip gives both the same driving audio)
VAL = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "distill.generator_every=1",
    "flow.mode_probs.i2v=0.0",  # distill.mode_probs follows flow.mode_probs
    "flow.mode_probs.a2v=0.0",
]


@pytest.fixture(scope="module")
def codecs(tmp_path_factory) -> Path:
    from magi_train.codecs.tiny import write_tiny_codecs

    root = tmp_path_factory.mktemp("codecs")
    write_tiny_codecs(root)
    return root


def _mp4_audio(path: Path) -> np.ndarray:
    """The decoded audio track of an mp4 as float [channels, samples]."""
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)


def _mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _low(frames: np.ndarray) -> np.ndarray:
    """Grey 8x8 block means of uint8 frames [F, H, W, 3]: what H.264 keeps of the tiny VAE's noise-like pixels
    (its per-pixel error is about as large as the difference between two samples; yuv420p halves the colour)."""
    grey = frames.astype(np.float32).mean(-1)
    f, h, w = grey.shape
    return grey.reshape(f, h // 8, 8, w // 8, 8).mean((2, 4))


def test_validation_writes_side_by_side_mp4_with_stereo_and_logs_it(
    compose,
    tmp_path,
    teacher_ckpt,  # noqa: F811
    codecs,
    monkeypatch,
):
    logged = []
    log_video = WandbLogger.log_video

    def spy(self, key, videos, step=None, **kwargs):
        logged.append((key, list(videos), step, kwargs))
        return log_video(self, key, videos, step=step, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_video", spy)
    muxed = []  # what goes into the mp4 (AAC is too lossy on the tiny VAE's noise-like sound to compare the file)
    write_mp4 = codecs_module.write_audio_video_mp4

    def spy_mp4(path, frames, wave, **kwargs):
        muxed.append((frames, wave))
        return write_mp4(path, frames, wave, **kwargs)

    monkeypatch.setattr(codecs_module, "write_audio_video_mp4", spy_mp4)
    run_dir = tmp_path / "videos"
    extra = [*VAL, "logger=wandb", f"generate.codecs_dir={codecs}", "distill.sample_videos=1"]
    run(compose(_dmd2(run_dir, teacher_ckpt, *extra)))

    step_dir = run_dir / "samples" / "step00000002"
    assert sorted(p.name for p in step_dir.glob("*.mp4")) == [
        "clip0.mp4"
    ]  # sample_videos=1 of sample_clips=2
    assert (step_dir / "clip1.png").is_file()  # the latent panels are still written
    mp4 = step_dir / "clip0.mp4"
    latents = load_file(step_dir / "clip0.safetensors")
    video_s, audio_s = latents["student_video"], latents["student_audio"]
    _, t, h, w = video_s.shape
    info = read_mp4_info(mp4)
    assert info["frames"] == pixel_frames(t) == audio_s.shape[0]  # 4(T-1)+1 frames, one per audio latent
    assert (info["width"], info["height"]) == (2 * 16 * w, 16 * h)  # [student | teacher], no gap
    assert info["audio_channels"] == 2 and info["audio_seconds"] == pytest.approx(
        info["frames"] / 25, abs=0.05
    )

    # each half and each channel is its own model's sample: decode the student's latents here and compare
    decoder = VideoVAE.from_pretrained(
        codecs / "video_vae"
    )  # no generate.turbo_vae: the Wan2.2 VAE, as generate
    audio_vae = AudioVAE.from_pretrained(codecs / "audio_vae")
    rgb, wave = decode_clip(decoder, audio_vae, video_s, audio_s, frames=audio_s.shape[0])
    frames = _mp4_frames(mp4)
    left, right = _low(frames[:, :, : 16 * w]), _low(frames[:, :, 16 * w :])
    err_left, err_right = np.abs(left - _low(rgb)).mean(), np.abs(right - _low(rgb)).mean()
    assert err_left < 0.3 * err_right, (err_left, err_right)  # the student's half; the teacher's differs
    ((muxed_frames, muxed_wave),) = muxed
    assert np.array_equal(muxed_frames[:, :, : 16 * w], rgb)  # left half: the student's clip
    assert not np.array_equal(muxed_frames[:, :, 16 * w :], rgb)
    torch.testing.assert_close(muxed_wave[0], wave.mean(0))  # left channel: the student's sound (mono)
    assert not torch.allclose(muxed_wave[1], muxed_wave[0])  # right: the teacher's, another sample
    sound = _mp4_audio(mp4)
    assert sound.shape[0] == 2 and not np.allclose(sound[0], sound[1], atol=1e-3)

    assert [(k, v, s) for k, v, s, _ in logged] == [("samples/video0", [str(mp4)], 2)]
    assert logged[0][3] == {"caption": [CAPTION], "format": ["mp4"]}
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    roots = {k.split(".")[0] for key in ("state_dict", "current_model_state") for k in ckpt.get(key, {})}
    assert roots == {"teacher", "critic", "student"}, roots  # the decoders are in no checkpoint
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert len(media) == 1 and media[0].read_bytes() == mp4.read_bytes()  # wandb.Video from the file


def test_without_codecs_nothing_is_decoded(compose, tmp_path, teacher_ckpt, monkeypatch):  # noqa: F811
    def fail(*args, **kwargs):
        raise AssertionError("a decoder was loaded without codecs")

    monkeypatch.setattr(generate, "load_decoders", fail)
    monkeypatch.setattr(generate, "decode_clip", fail)
    run_dir = tmp_path / "none"
    run(compose(_dmd2(run_dir, teacher_ckpt, *VAL)))  # generate.* names no codecs (the default)
    step_dir = run_dir / "samples" / "step00000002"
    assert (step_dir / "clip0.png").is_file() and (step_dir / "clip0.safetensors").is_file()
    assert not list(run_dir.rglob("*.mp4"))


@pytest.mark.parametrize("turbo", [False, True])
def test_decoder_is_the_one_generate_uses(codecs, turbo):
    cfg = GenerateConfig(codecs_dir=str(codecs), turbo_vae=str(codecs / "turbo_vae") if turbo else None)
    videos = validation_videos(cfg, 2)
    decoder, audio_vae = videos.decoders(torch.device("cpu"))
    assert isinstance(decoder, TurboVAE if turbo else VideoVAE) and isinstance(audio_vae, AudioVAE)
    assert not decoder.model.training and not any(p.requires_grad for p in decoder.model.parameters())
    assert videos.decoders(torch.device("cpu"))[0] is decoder  # loaded once


def test_codec_settings_and_count(tmp_path):
    assert validation_videos(None, 2) is None
    assert validation_videos(GenerateConfig(), 2) is None  # no codecs named
    assert validation_videos(GenerateConfig(video_vae=str(tmp_path)), 2) is None  # no audio VAE
    assert validation_videos(GenerateConfig(codecs_dir=str(tmp_path)), 0) is None  # turned off
    with pytest.raises(ValueError, match="generate.video_vae .* is not a directory"):
        validation_videos(GenerateConfig(codecs_dir=str(tmp_path / "missing")), 2)
    with pytest.raises(ValueError, match="distill.sample_videos=-1"):
        validate_distill(DistillConfig(sample_videos=-1))


def test_side_by_side_layout():
    a = (np.zeros((3, 16, 32, 3), np.uint8), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    b = (np.full((3, 16, 32, 3), 255, np.uint8), torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]))
    frames, wave = side_by_side(a, b)
    assert frames.shape == (3, 16, 64, 3)
    assert (frames[:, :, :32] == 0).all() and (frames[:, :, 32:] == 255).all()
    assert torch.equal(wave, torch.tensor([[2.0, 2.0], [-1.0, -1.0]]))  # left: student mean, right: teacher
