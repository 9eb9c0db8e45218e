"""Recipe `generate` end to end on smoke checkpoints and tiny random codecs: mp4 frames/fps/audio, i2v, a2v,
seeding, checkpoint loading, the sampler a distilled checkpoint carries and the input errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from magi_train.__main__ import run
from magi_train.codecs import AudioVAE, VideoVAE, center_crop_resize, load_audio, read_mp4_info
from magi_train.config import GenerateConfig
from magi_train.inference import generate, load_pipeline, load_text_features, run_generate
from magi_train.inference.generate import read_driving_audio
from magi_train.models.checkpoint import export_released
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(smoke, out, **kw) -> GenerateConfig:
    values = dict(
        base_ckpt=str(smoke["base"]),
        prompt="a cat sleeping on a sofa",
        negative_prompt="blurry",
        seconds=0.2,
        width=32,
        height=32,
        codecs_dir=str(smoke["codecs"]),
        output=str(out),
        progress=False,
        steps=8,
    )
    values.update(kw)
    return GenerateConfig(**values)


def test_recipe_writes_mp4_with_frames_fps_and_matching_audio(compose, smoke, tmp_path):
    """The acceptance command, in-process: t2v with CFG then SR; 1 s -> 26 frames (decoded 25 + 1 repeated)."""
    out = run(
        compose(
            [
                "recipe=generate",
                "experiment=smoke",
                f"run_dir={tmp_path}",
                f"generate.base_ckpt={smoke['base']}",
                f"generate.sr_ckpt={smoke['sr']}",
                "generate.sr_width=64",
                "generate.sr_height=64",
                f"generate.codecs_dir={smoke['codecs']}",
                "generate.negative_prompt=blurry",
                "generate.guidance.video_scale=4.0",
                "generate.progress=false",
            ]
        )
    )
    info = read_mp4_info(out["output"])
    assert info["frames"] == 1 * 25 + 1 and info["fps"] == 25
    assert (info["width"], info["height"]) == (64, 64)  # the SR size
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["audio_rate"] == 44100
    assert abs(info["audio_seconds"] - info["frames"] / 25) <= 1 / 25
    meta = json.loads(open(out["json"]).read())
    assert {"text", "base", "sr", "decode"} <= set(meta["timings_s"])
    assert meta["sampler"] == "unipc-32+cfg" and meta["sr"]["steps"] == 5
    assert (meta["decoded_frames"], meta["repeated_last_frames"], meta["latent_frames"]) == (25, 1, 7)
    assert meta["base"]["checkpoint"]["weights"] == "ema" and meta["settings"]["seed"] == 42
    assert meta["settings"]["guidance"] == {"video_scale": 4.0, "video_scale_late": 2.0, "switch_t": 500.0,
                                            "audio_scale": 5.0}  # fmt: skip
    assert meta["base"]["settings_from"] == {"steps": "generate.steps", "shift": "generate.shift"}


def test_i2v_first_latent_frame_is_the_image_latent(smoke, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # other aspect ratio: centre-cropped
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    res = generate(
        _cfg(
            smoke, tmp_path / "i2v.mp4", image=str(path), sr_ckpt=str(smoke["sr"]), sr_width=64, sr_height=64
        )
    )
    vae = VideoVAE.from_pretrained(smoke["codecs"] / "video_vae")

    def encoded(size: int) -> torch.Tensor:
        pixels = torch.from_numpy(center_crop_resize(image, size, size)).permute(2, 0, 1).float() / 127.5 - 1
        return vae.encode(pixels[None, :, None])[0]

    assert res.info["mode"] == "i2v"
    assert torch.equal(res.base_video_latent[:, :1], encoded(32))  # bit-identical after 8 UniPC steps + CFG
    assert torch.equal(res.video_latent[:, :1], encoded(64))  # and after SR, at the SR size
    assert not torch.equal(res.base_video_latent[:, 1:2], res.base_video_latent[:, :1])


def test_same_seed_same_output_distilled(smoke, tmp_path):
    cfg = _cfg(smoke, tmp_path / "a.mp4", base_ckpt=None, distilled_ckpt=str(smoke["base"]), seed=3)
    pipe = load_pipeline(cfg)
    a = generate(cfg, pipe)
    b = generate(dataclasses.replace(cfg, output=str(tmp_path / "b.mp4")), pipe)
    c = generate(dataclasses.replace(cfg, output=str(tmp_path / "c.mp4"), seed=4), pipe)
    assert a.info["sampler"] == "distilled-8" and a.info["negative_text_tokens"] is None
    # a pretraining checkpoint stores no distillation: the released 8 steps at shift 5
    assert a.info["base"]["settings_from"] == {"steps": "released", "shift": "released"}
    assert torch.equal(a.video_latent, b.video_latent) and torch.equal(a.audio_latent, b.audio_latent)
    assert np.array_equal(a.frames, b.frames) and torch.equal(a.wave, b.wave)
    assert not torch.equal(a.video_latent, c.video_latent)
    assert read_mp4_info(a.video_path)["frames"] == 6  # 0.2 s: 6 frames, latent 2 -> 5 decoded + 1 repeated


def test_a2v_keeps_the_driving_audio_and_rejects_short_files(smoke, tmp_path):
    from magi_train.codecs import write_audio_video_mp4

    t = np.arange(int(0.5 * 44100)) / 44100
    wave = np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * 2).astype(np.float32)
    src = tmp_path / "speech.mp4"
    write_audio_video_mp4(src, np.zeros((13, 32, 32, 3), np.uint8), wave)
    res = generate(_cfg(smoke, tmp_path / "a2v.mp4", audio=str(src), seed=5))
    assert res.info["mode"] == "a2v" and res.audio_latent.shape == (6, 64)
    # the first draw of the seeded generator is the posterior sample of the driving audio
    avae = AudioVAE.from_pretrained(smoke["codecs"] / "audio_vae")
    clean = avae.encode(
        load_audio(src, 6 / 25)[None], sample=True, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(res.audio_latent, clean[0])
    info = read_mp4_info(res.video_path)
    assert info["frames"] == 6 and abs(info["audio_seconds"] - 6 / 25) <= 1 / 25
    with pytest.raises(ValueError, match="too short.*generate.seconds"):
        generate(_cfg(smoke, tmp_path / "x.mp4", audio=str(src), seconds=1))


def test_read_driving_audio_pads_only_the_last_frame(tmp_path):
    from magi_train.codecs import write_audio_video_mp4

    wave = np.zeros((2, int(1.02 * 44100)), np.float32)  # covers 1 s but not 1.04 s
    src = tmp_path / "a.mp4"
    write_audio_video_mp4(src, np.zeros((26, 32, 32, 3), np.uint8), wave)
    assert read_driving_audio(src, 1, 26).shape == (2, 26 * 2048)
    with pytest.raises(ValueError, match="too short"):
        read_driving_audio(src, 2, 51)


def test_released_directory_and_ema_or_raw_weights(smoke, tmp_path):
    ckpt = torch.load(smoke["base"], map_location="cpu", weights_only=True)
    ema = load_pipeline(_cfg(smoke, tmp_path / "o.mp4")).base
    raw = load_pipeline(_cfg(smoke, tmp_path / "o.mp4", use_ema=False)).base
    assert (ema.weights, raw.weights) == ("ema", "raw")
    key = "final_norm_video.weight"
    assert torch.equal(ema.model.state_dict()[key], ckpt["state_dict"]["model." + key])
    assert torch.equal(raw.model.state_dict()[key], ckpt["current_model_state"]["model." + key])
    export_released(ema.model, tmp_path / "released", dtype_policy="fp32")
    pipe = load_pipeline(_cfg(smoke, tmp_path / "o.mp4", sr_ckpt=str(tmp_path / "released"), sr_model="tiny"))
    assert pipe.sr.model.cfg.text_coords == "v1"  # the SR role uses the SR text coordinates
    for k, v in ema.model.state_dict().items():
        assert torch.equal(pipe.sr.model.state_dict()[k], v), k


def test_clear_errors(smoke, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="generate.base_ckpt.*nowhere.*model.safetensors"):
        load_pipeline(_cfg(smoke, tmp_path / "o.mp4", base_ckpt=str(tmp_path / "nowhere")))
    export_released(DiT(MODEL_CONFIGS["tiny"]), tmp_path / "rel")
    with pytest.raises(ValueError, match="unknown model config 'huge'.*generate.base_model"):
        load_pipeline(_cfg(smoke, tmp_path / "o.mp4", base_ckpt=str(tmp_path / "rel"), base_model="huge"))
    other = DiTConfig(
        num_layers=2, hidden_size=64, head_dim=32, num_heads_kv=1, mm_layers=[0], gelu7_layers=[0]
    )
    monkeypatch.setitem(MODEL_CONFIGS, "tiny_other", other)
    with pytest.raises(ValueError, match="(?s)does not match the model.*set generate.sr_model"):
        load_pipeline(_cfg(smoke, tmp_path / "o.mp4", sr_ckpt=str(tmp_path / "rel"), sr_model="tiny_other"))
    with pytest.raises(ValueError, match="exactly one of generate.base_ckpt"):
        load_pipeline(_cfg(smoke, tmp_path / "o.mp4", distilled_ckpt=str(smoke["base"])))
    with pytest.raises(ValueError, match="video_vae"):
        load_pipeline(_cfg(smoke, tmp_path / "o.mp4", codecs_dir=str(tmp_path / "missing")))
    pipe = load_pipeline(_cfg(smoke, tmp_path / "o.mp4"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not be read as an image"):
        generate(_cfg(smoke, tmp_path / "o.mp4", image=str(bad)), pipe)
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "sq.png")
    with pytest.raises(ValueError, match="40x40 px but generate.image_resize=none needs exactly .* 32x32"):
        generate(_cfg(smoke, tmp_path / "o.mp4", image=str(tmp_path / "sq.png"), image_resize="none"), pipe)
    with pytest.raises(ValueError, match="generate.seconds=0.1"):  # 2.5 frames
        generate(_cfg(smoke, tmp_path / "o.mp4", seconds=0.1), pipe)
    with pytest.raises(ValueError, match="generate.prompt"):
        generate(_cfg(smoke, tmp_path / "o.mp4", prompt=None), pipe)
    with pytest.raises(ValueError, match="sr_ckpt"):
        generate(_cfg(smoke, tmp_path / "o.mp4", sr_width=64, sr_height=64), pipe)
    assert not (tmp_path / "o.mp4").exists()


def test_text_feature_files(tmp_path):
    feats = np.zeros((640, 16), np.float32)
    feats[:5] = np.arange(80, dtype=np.float32).reshape(5, 16) + 1
    np.save(tmp_path / "t.npy", feats)
    assert torch.equal(load_text_features(tmp_path / "t.npy"), torch.from_numpy(feats[:5]))  # padding dropped
    from safetensors.torch import save_file

    save_file({"text": torch.ones(1, 3, 16)}, tmp_path / "t.safetensors")
    assert load_text_features(tmp_path / "t.safetensors").shape == (3, 16)
    np.save(tmp_path / "bad.npy", np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"expected \[L, D\]"):
        load_text_features(tmp_path / "bad.npy")


# ---------------------------------------------------------------------------------------------------------
# The distilled sampler's steps and shift come from the checkpoint (no training: a hand-written dmd2 .ckpt)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_codecs(tmp_path_factory):
    """A codecs_dir of tiny random codecs (as the smoke fixture's, without its training runs)."""
    from magi_train.codecs.tiny import write_tiny_codecs

    root = tmp_path_factory.mktemp("codecs")
    write_tiny_codecs(root)
    return root


def _distilled_ckpt(path, num_student_steps: int, shift: float):
    """What a dmd2 run saves, reduced to what sampling reads: the student and the resolved config."""
    torch.manual_seed(0)
    student = DiT(MODEL_CONFIGS["tiny"])
    config = {"task": "dmd2", "model": dataclasses.asdict(MODEL_CONFIGS["tiny"]),
              "distill": {"num_student_steps": num_student_steps, "shift": shift}}  # fmt: skip
    torch.save(
        {"state_dict": {"student." + k: v for k, v in student.state_dict().items()}, "magi_config": config},
        path,
    )
    return student


def _count_calls(pipe) -> list[int]:
    calls = [0]
    pipe.base.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_distilled_checkpoint_carries_its_steps_and_shift(tiny_codecs, tmp_path):
    student = _distilled_ckpt(tmp_path / "dmd.ckpt", num_student_steps=4, shift=3.0)
    cfg = GenerateConfig(distilled_ckpt=str(tmp_path / "dmd.ckpt"), prompt="a cat", seconds=0.2, width=32,
                         height=32, codecs_dir=str(tiny_codecs), output=str(tmp_path / "a.mp4"), progress=False,
                         device="cpu")  # fmt: skip
    pipe = load_pipeline(cfg)
    calls = _count_calls(pipe)
    res = generate(cfg, pipe)
    assert calls[0] == 4 and res.info["sampler"] == "distilled-4"  # one student call per step, no CFG
    assert (res.info["base"]["steps"], res.info["base"]["shift"]) == (4, 3.0)
    assert res.info["base"]["settings_from"] == {"steps": "checkpoint", "shift": "checkpoint"}
    assert json.loads(res.json_path.read_text())["base"]["settings_from"]["steps"] == "checkpoint"

    calls[0] = 0  # an explicit setting wins over the checkpoint
    res = generate(dataclasses.replace(cfg, distilled_steps=2, output=str(tmp_path / "b.mp4")), pipe)
    assert calls[0] == 2 and res.info["sampler"] == "distilled-2"
    assert res.info["base"]["settings_from"] == {"steps": "generate.distilled_steps", "shift": "checkpoint"}
    plan = run_generate(dataclasses.replace(cfg, distilled_shift=7.0), dry_run=True)
    assert (plan["sampler"]["steps"], plan["sampler"]["shift"]) == (4, 7.0)

    # released-format directories carry no config: the released 8 steps at shift 5
    export_released(student, tmp_path / "released", dtype_policy="fp32")
    released = dataclasses.replace(cfg, distilled_ckpt=str(tmp_path / "released"), base_model="tiny",
                                   output=str(tmp_path / "c.mp4"))  # fmt: skip
    pipe = load_pipeline(released)
    calls = _count_calls(pipe)
    res = generate(released, pipe)
    assert calls[0] == 8 and (res.info["base"]["steps"], res.info["base"]["shift"]) == (8, 5.0)
    assert res.info["base"]["settings_from"] == {"steps": "released", "shift": "released"}


# ---------------------------------------------------------------------------------------------------------
# The TurboVAED decoder (generate.turbo_vae), as the release decodes by default
# ---------------------------------------------------------------------------------------------------------


def test_turbo_vae_decodes_the_mp4(tiny_codecs, tmp_path):
    from magi_train.codecs import TurboVAE
    from magi_train.inference.generate import _to_uint8

    _distilled_ckpt(tmp_path / "dmd.ckpt", num_student_steps=2, shift=5.0)
    turbo_dir = tiny_codecs / "turbo_vae"  # written by write_tiny_codecs, windows of 3 then 2 latent frames
    cfg = GenerateConfig(distilled_ckpt=str(tmp_path / "dmd.ckpt"), prompt="a cat", seconds=0.64, width=32,
                         height=64, codecs_dir=str(tiny_codecs), output=str(tmp_path / "t.mp4"), progress=False,
                         device="cpu", turbo_vae=str(turbo_dir))  # fmt: skip
    res = generate(cfg)
    info = read_mp4_info(res.video_path)
    assert info["frames"] == 17 and info["fps"] == 25 and (info["width"], info["height"]) == (32, 64)
    assert res.info["latent_frames"] == 5 and res.info["decoded_frames"] == 17  # 1 + 4 * 4, three windows
    assert info["audio_rate"] == 44100 and abs(info["audio_seconds"] - 17 / 25) < 0.03
    assert res.info["decoder"] == {"kind": "turbo", "path": str(turbo_dir)}
    # the frames are the TurboVAED's decode of the sampled latent, not the Wan2.2 VAE's
    turbo = TurboVAE.from_pretrained(turbo_dir)
    assert np.array_equal(res.frames, _to_uint8(turbo.decode(res.video_latent[None])[0]))
    wan = VideoVAE.from_pretrained(tiny_codecs / "video_vae")
    assert not np.array_equal(res.frames, _to_uint8(wan.decode(res.video_latent[None])[0]))
    # without generate.turbo_vae the Wan2.2 VAE decodes (the fallback)
    res = generate(dataclasses.replace(cfg, turbo_vae=None, output=str(tmp_path / "w.mp4")))
    assert res.info["decoder"]["kind"] == "wan2.2"
    assert np.array_equal(res.frames, _to_uint8(wan.decode(res.video_latent[None])[0]))


def test_turbo_vae_errors_name_the_setting(tiny_codecs, tmp_path):
    _distilled_ckpt(tmp_path / "dmd.ckpt", num_student_steps=2, shift=5.0)
    cfg = GenerateConfig(distilled_ckpt=str(tmp_path / "dmd.ckpt"), prompt="a cat", seconds=0.2, width=32,
                         height=32, codecs_dir=str(tiny_codecs), output=str(tmp_path / "t.mp4"), progress=False,
                         device="cpu", turbo_vae=str(tmp_path / "missing"))  # fmt: skip
    with pytest.raises(ValueError, match="generate.turbo_vae=.*is not a directory"):
        load_pipeline(cfg)


def test_sr_cfg_guides_the_sr_stage_only(smoke, tmp_path):
    """generate.sr_cfg (the release's sr_cfg_number=2): the SR stage runs CFG with the negative prompt and the
    per-frame scales, even behind a distilled (CFG-free) base; the base stage is untouched."""
    common = dict(base_ckpt=None, distilled_ckpt=str(smoke["base"]), sr_ckpt=str(smoke["sr"]), sr_width=64,
                  sr_height=64)  # fmt: skip
    pipe = load_pipeline(_cfg(smoke, tmp_path / "a.mp4", sr_cfg=True, **common))
    guided = generate(_cfg(smoke, tmp_path / "a.mp4", sr_cfg=True, **common), pipe)
    plain = generate(_cfg(smoke, tmp_path / "b.mp4", **common), pipe)
    assert torch.equal(guided.base_video_latent, plain.base_video_latent)
    assert (guided.video_latent - plain.video_latent).abs().max() > 1e-4
    assert guided.info["sr"]["cfg"] == {"video_scale": 3.5, "audio_scale": 5.0, "trick_frames": 13,
                                        "trick_value": 2.0}  # fmt: skip
    assert plain.info["sr"]["cfg"] is None
