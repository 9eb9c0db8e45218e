"""Real-data preparation (magi_train.data.prepare) on clips generated here with PyAV and tiny random codecs."""

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import webdataset as wds

av = pytest.importorskip("av")

from magi_train.codecs import (  # noqa: E402
    audio_latents_for_seconds,
    frames_for_seconds,
    latent_frames,
    write_audio_video_mp4,
)
from magi_train.codecs.tiny import write_tiny_codecs  # noqa: E402
from magi_train.data import ShardDataset, make_loader, validate_sample  # noqa: E402
from magi_train.data.prepare import (  # noqa: E402
    Settings,
    Source,
    _slurm_task,
    build_prompt,
    clip_frames,
    frames_at_fps,
    list_sources,
    main,
    nearest_bucket,
    num_units,
    parse_buckets,
    run_prepare,
    task_units,
)

SECONDS = 0.64  # 16 frame intervals: 17 frames -> T = 5 latent frames, A = 17 audio latents
BUCKETS = "96x64,64x96,64x64"  # (width, height)
TEXT_DIM = 3584
SR = 44100


def _frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None, None]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 3 + t * 7) % 256, (y * 5 + t * 3) % 256, np.full((n, h, w), 100)], axis=-1)
    return (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def _sine(seconds: float, freq: float) -> torch.Tensor:
    t = np.arange(round(seconds * SR)) / SR
    mono = 0.4 * np.sin(2 * np.pi * freq * t)
    return torch.from_numpy(np.stack([mono, mono]).astype(np.float32))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Seven inputs in four units of two; task 0 in-process, task 1 through the CLI (Slurm env, 2 workers)."""
    root = tmp_path_factory.mktemp("prepare")
    codecs = write_tiny_codecs(root / "codecs")
    vids = root / "videos"
    vids.mkdir()
    # landscape 96x64 at 25 fps, 2.04 s with sound: 2 clips (capped by --max-clips-per-video 2)
    write_audio_video_mp4(vids / "land.mp4", _frames(51, 64, 96, 0), _sine(2.04, 440), fps=25)
    # video only: planted "no audio stream"
    write_audio_video_mp4(vids / "silent.mp4", _frames(30, 64, 96, 1), None, fps=25)
    # portrait 72x112 at 30 fps for 1.5 s (2 clips of video) but only 1.0 s of sound (1 clip)
    write_audio_video_mp4(vids / "port.mp4", _frames(45, 112, 72, 2), _sine(1.0, 330), fps=30)
    (vids / "broken.mp4").write_bytes(np.random.default_rng(3).bytes(4096))  # planted unreadable file
    write_audio_video_mp4(vids / "short.mp4", _frames(10, 64, 64, 4), _sine(0.4, 220), fps=25)  # 0.4 s
    rows = [
        {"path": "videos/land.mp4", "caption": "a striped pattern drifts right", "transcript": "hello there",
         "language": "English"},
        {"path": "videos/silent.mp4", "caption": "a silent pattern"},
        {"path": "videos/port.mp4", "caption": "a tall pattern", "split": "val"},
        {"path": "videos/broken.mp4", "caption": "garbage bytes"},
        {"path": "videos/short.mp4", "caption": "too short to cut"},
        {"path": "videos/gone.mp4", "caption": "a file that is not there"},
        {"path": "videos/land.mp4", "caption": ""},
    ]  # fmt: skip
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "shards"
    settings = Settings(
        input=str(manifest),
        out=str(out),
        video_vae=str(codecs["video_vae"]),
        audio_vae=str(codecs["audio_vae"]),
        text_encoder=str(codecs["text_encoder"]),
        seconds=SECONDS,
        buckets=parse_buckets(BUCKETS),
        max_clips_per_video=2,
        videos_per_shard=2,
        task_index=0,
        num_tasks=2,
        audio_posterior="sample",
        threads=1,
    )
    report0 = run_prepare(settings, progress=False)
    argv = [
        "--input", str(manifest), "--out", str(out), "--video-vae", str(codecs["video_vae"]),
        "--audio-vae", str(codecs["audio_vae"]), "--text-encoder", str(codecs["text_encoder"]),
        "--seconds", str(SECONDS), "--buckets", BUCKETS, "--max-clips-per-video", "2",
        "--videos-per-shard", "2", "--workers", "2", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    with mock.patch.dict(os.environ, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}):
        report1 = main(argv)
    return {"settings": settings, "out": out, "reports": [report0, report1], "root": root}


def test_report_counts_planted_files_as_skipped(prepared):
    r0, r1 = prepared["reports"]
    assert (r0["task_index"], r0["num_tasks"], r1["task_index"], r1["num_tasks"]) == (0, 2, 1, 2)
    skipped = {**r0["skipped"], **r1["skipped"]}
    assert skipped == {
        "no audio stream": 1,
        "unreadable": 1,
        "too short": 1,
        "not found": 1,
        "no caption": 1,
    }
    assert r0["clips_written"] + r1["clips_written"] == 3  # land: 2, port: 1 (its sound covers one clip)
    assert r1["dropped_clips"] == {"audio shorter than video": 1}
    assert r0["videos"] + r1["videos"] == 7 and r0["videos_used"] + r1["videos_used"] == 2
    by_path = {Path(i["path"]).name: i["reason"] for r in (r0, r1) for i in r["skipped_files"]}
    assert by_path["broken.mp4"] == "unreadable" and by_path["silent.mp4"] == "no audio stream"
    for r in (r0, r1):  # the json on disk is the report that was returned
        path = prepared["out"] / f"clips.report-task{r['task_index']:04d}-of-0002.json"
        assert json.loads(path.read_text())["skipped"] == r["skipped"]


def test_shards_validate_and_load_with_expected_shapes(prepared):
    out = prepared["out"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["clips-000000.tar", "clips-000001.tar"]
    assert not (out / ".staging").exists()
    raw = list(wds.tarfile_to_samples()(iter([{"url": str(p)} for p in sorted(out.glob("*.tar"))])))
    clips = {c.key: c for c in (validate_sample(s, TEXT_DIM) for s in raw)}  # raises on any bad sample
    assert len(clips) == 3
    T = latent_frames(frames_for_seconds(SECONDS))
    A = audio_latents_for_seconds(SECONDS)
    assert (T, A, clip_frames(SECONDS)) == (5, 17, 17)
    land = [c for k, c in clips.items() if "-land-" in k]
    port = [c for k, c in clips.items() if "-port-" in k]
    assert len(land) == 2 and len(port) == 1
    for c in land:  # 96x64 source -> bucket 96x64 -> latent 4 x 6
        assert tuple(c.video.shape) == (48, T, 64 // 16, 96 // 16)
        assert c.meta["pixel_size"] == [64, 96] and c.meta["bucket"] == "96x64"
        assert c.meta["language"] == "English" and c.meta["split"] == "train"
        assert 'Dialogue:\n<Speaker, English>: "hello there"' in c.caption
    (p,) = port  # 72x112 (aspect 0.64) -> nearest bucket 64x96 (0.67)
    assert tuple(p.video.shape) == (48, T, 96 // 16, 64 // 16) and p.meta["split"] == "val"
    assert p.meta["source_fps"] == pytest.approx(30.0)
    for c in clips.values():
        assert tuple(c.audio.shape) == (A, 64)
        assert c.text.ndim == 2 and c.text.shape[1] == TEXT_DIM and 1 <= c.text.shape[0] <= 640
        assert c.meta["fps"] == 25 and c.meta["seconds"] == pytest.approx(0.64)
        assert float(c.video.std()) > 0 and float(c.audio.std()) > 0
    assert sorted(c.meta["start"] for c in land) == pytest.approx([0.0, 0.68])
    assert not torch.equal(land[0].video, land[1].video)  # different time windows, different latents

    ds = ShardDataset(out, text_dim=TEXT_DIM, max_tokens=10_000, bucket_buffer=8)
    batches = list(make_loader(ds, num_workers=0, pin_memory=False))
    assert sorted(k for b in batches for k in b.keys) == sorted(clips)
    assert ds.stats["skipped"] == 0 and ds.stats["valid"] == 3
    assert all(len({tuple(v.shape) for v in b.video}) == 1 for b in batches)  # one bucket per batch


def test_pretraining_runs_on_prepared_shards(prepared, compose, tmp_path):
    from magi_train.__main__ import run

    run_dir = tmp_path / "run"
    cfg = compose([
        "recipe=pretrain_base", "experiment=smoke", "data=shards", f"data.train_shards={prepared['out']}",
        "data.num_workers=0", "data.max_tokens=400", "data.bucket_buffer=8", "trainer.max_steps=2",
        f"run_dir={run_dir}", "trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert run(cfg)["global_step"] == 2


def test_rerun_skips_finished_shards_and_redoes_a_lost_unit(prepared):
    s, out = prepared["settings"], prepared["out"]
    shard = out / "clips-000000.tar"
    mtime = shard.stat().st_mtime_ns
    again = run_prepare(s, progress=False)
    assert (again["units_done_now"], again["units_already_done"]) == (0, 2)
    assert again["skipped"] == prepared["reports"][0]["skipped"]
    assert again["clips_written"] == prepared["reports"][0]["clips_written"]
    assert shard.stat().st_mtime_ns == mtime

    marker = out / "clips-000002.done.json"  # unit 2 (short.mp4, gone.mp4): as if the job died before it
    first = json.loads(marker.read_text())
    marker.unlink()
    redo = run_prepare(s, progress=False)
    assert (redo["units_done_now"], redo["units_already_done"]) == (1, 1)
    assert json.loads(marker.read_text())["skipped"] == first["skipped"]
    assert redo["skipped"] == again["skipped"] and shard.stat().st_mtime_ns == mtime


def test_rerun_with_other_settings_is_refused(prepared):
    s = prepared["settings"]
    changed = Settings(**{**s.__dict__, "seconds": 1.28})
    with pytest.raises(ValueError, match="other settings.*seconds"):
        run_prepare(changed, progress=False)


def test_task_split_partitions_units(prepared):
    r0, r1 = prepared["reports"]
    assert set(r0["shards"]).isdisjoint(r1["shards"])
    assert sorted(r0["shards"] + r1["shards"]) == sorted(p.name for p in prepared["out"].glob("*.tar"))
    assert r0["units"] + r1["units"] == num_units(7, 2) == 4
    for units in (0, 1, 7, 30):
        for n in (1, 2, 3, 8):
            parts = [task_units(units, i, n) for i in range(n)]
            flat = sorted(u for p in parts for u in p)
            assert flat == list(range(units))  # every unit exactly once
    with pytest.raises(ValueError, match="task_index"):
        task_units(4, 2, 2)


def test_slurm_array_defaults(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert _slurm_task() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-8
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert _slurm_task() == (4, 8)


def test_frames_at_fps_resamples_by_time():
    # 30 fps -> 25 fps: output frame g shows the latest source frame starting at or before g/25
    src = [(i / 30, i) for i in range(30)]
    out = list(frames_at_fps(src, 25, 1 / 30))
    assert len(out) == 25
    assert out == [int(np.floor(g / 25 * 30 + 1e-9)) for g in range(25)]
    # 10 fps -> 25 fps repeats frames; a stream starting at 3.0 s is measured from its first frame
    src = [(3.0 + i / 10, i) for i in range(5)]
    assert list(frames_at_fps(src, 25, 0.1)) == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4]
    assert list(frames_at_fps([], 25, 0.04)) == []


def test_buckets_and_prompt():
    buckets = parse_buckets("448x256,256x448,352x352")
    assert nearest_bucket(1920, 1080, buckets) == (448, 256)
    assert nearest_bucket(720, 1280, buckets) == (256, 448)
    assert nearest_bucket(640, 600, buckets) == (352, 352)
    with pytest.raises(ValueError, match="multiples of 32"):
        parse_buckets("480x272")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_buckets("448-256")
    assert build_prompt(Source("a.mp4", "A cat.")) == "A cat."
    assert build_prompt(Source("a.mp4", "A cat.", "meow", "French")).endswith('<Speaker, French>: "meow"')
    assert build_prompt(Source("a.mp4", "A cat.\nDialogue: x", "meow")) == "A cat.\nDialogue: x"
    assert clip_frames(4) == 101 and clip_frames(5) == 125  # 5 s: rounded down to 1 + 4k like the release


def test_manifest_and_folder_inputs(tmp_path):
    (tmp_path / "v").mkdir()
    for name in ("b.mp4", "a.mov", "notes.md"):
        (tmp_path / "v" / name).write_bytes(b"x")
    (tmp_path / "v" / "a.txt").write_text("caption of a\n")
    (tmp_path / "v" / "b.json").write_text(json.dumps({"caption": "cap b", "language": "German"}))
    srcs = list_sources(tmp_path / "v")
    assert [Path(s.path).name for s in srcs] == ["a.mov", "b.mp4"]
    assert (srcs[0].caption, srcs[1].caption, srcs[1].language) == ("caption of a", "cap b", "German")

    csv_path = tmp_path / "m.csv"
    csv_path.write_text('path,caption,dialogue\nv/a.mov,"a, with comma",hi\n/abs/x.mp4,,\n')
    a, x = list_sources(csv_path)
    assert a.path == str(tmp_path / "v" / "a.mov") and a.caption == "a, with comma" and a.transcript == "hi"
    assert x.path == "/abs/x.mp4" and x.caption is None

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list_sources(bad)
    (tmp_path / "nopath.csv").write_text("file,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_sources(tmp_path / "nopath.csv")
    with pytest.raises(ValueError, match="no such folder or manifest"):
        list_sources(tmp_path / "missing")


def test_bad_settings_name_the_flag(tmp_path):
    base = dict(input=str(tmp_path), out=str(tmp_path / "o"), video_vae=str(tmp_path), audio_vae=str(tmp_path),
                text_encoder=str(tmp_path))  # fmt: skip
    for change, message in [
        ({"seconds": 0.5}, r"--seconds 0.5: seconds \* fps must be a positive whole number"),
        ({"seconds": 0.08}, "--seconds 0.08: a clip needs at least 0.16 s"),
        ({"task_index": 2, "num_tasks": 2}, r"--task-index 2 must be in \[0, --num-tasks=2\)"),
        ({"videos_per_shard": 0}, "--videos-per-shard must be >= 1"),
        ({"prefix": "a.b"}, "--prefix"),
        ({"buckets": [(100, 64)]}, "multiples of 32"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings(**{**base, **change}).check()


def test_missing_codec_folder_is_a_clear_error(tmp_path):
    s = Settings(input=str(tmp_path), out=str(tmp_path / "o"), video_vae=str(tmp_path / "nope"),
                 audio_vae=str(tmp_path), text_encoder=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="--video-vae .*never downloaded"):
        run_prepare(s, progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cli_module_runs():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "magi_train.data.prepare", "--input", "/nonexistent", "--out", "/tmp/x",
         "--video-vae", "/nonexistent", "--audio-vae", "/n", "--text-encoder", "/n"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and "error: --video-vae" in res.stderr
