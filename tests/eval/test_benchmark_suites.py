"""Benchmark suites (magi_train/eval/benchmarks.py): tiny Verse-Bench and TalkVid-Bench folders in the documented
layouts (docs/eval.md "Benchmark suites") become prompts with their media and dialogue; every bad input is a short
error naming the file and field; `eval.suite.format` is validated; recipe=evaluate runs a benchmark suite."""

import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from magi_train.config import EvalSuiteConfig
from magi_train.eval.benchmarks import load_talkvid_bench, load_versebench, safe_id, speech_language
from magi_train.eval.speech import prompt_reference
from magi_train.eval.suite import SuitePrompt, suite_prompts
from magi_train.eval.text import DialogueLine, extract_dialogue

RED, BLUE = (220, 30, 30), (30, 30, 220)


def _png(path: Path, colour=RED, size=32) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    return path


def _mp4(path: Path, with_audio: bool = False, frames: int = 6) -> Path:
    """A 32x32 clip whose first frame is red and the others blue (to check which frame is the reference)."""
    from magi_train.codecs import write_audio_video_mp4

    video = np.empty((frames, 32, 32, 3), np.uint8)
    video[0], video[1:] = RED, BLUE
    audio = None
    if with_audio:
        t = np.arange(int(frames / 25 * 44100)) / 44100
        audio = np.stack([0.3 * np.sin(2 * np.pi * 220 * t)] * 2).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio_video_mp4(path, video, audio)


def _json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Verse-Bench: <root>/<set>/<name>.json + <name>.jpg
# ---------------------------------------------------------------------------------------------------------

MAN = {
    "video_prompt": "A man in a dark suit sits on a yellow couch and talks.\n",
    "audio_prompt": [""],
    "speech_prompt": {"speaker": "Man", "text": "They say they\nspeak English."},
}
GUITAR = {
    "video_prompt": "A boy plays an acoustic guitar.",
    "audio_prompt": ["Guitar music", "singing"],
    "speech_prompt": {"speaker": "", "text": ""},
}
MANDARIN = {
    "video_prompt": "A woman reads the news.",
    "audio_prompt": ["None"],
    "speech_prompt": {"speaker": "News <anchor>", "text": "今天天气很好。"},
}


def _versebench(root: Path) -> Path:
    _json(root / "set1/00000.json", MAN)
    _png(root / "set1/00000.jpg")
    _json(root / "set2/419.json", GUITAR)
    _png(root / "set2/419.jpg")
    _wav(root / "set2/419.wav")  # Verse-Bench's ground-truth audio (FD / KL): not a conditioning input
    _json(root / "set2/00000.json", GUITAR)  # the same name as in set1
    _png(root / "set2/00000.jpeg")
    _json(root / "set3/a b#1.json", MANDARIN)
    _png(root / "set3/a b#1.png")
    return root


def test_versebench_prompts_ids_media_and_dialogue(tmp_path):
    root = _versebench(tmp_path / "Verse-Bench")
    prompts = load_versebench(root, [])
    # sets in order, files by name; a name two sets share gets its set as prefix; unsafe characters -> _
    assert [p.id for p in prompts] == ["00000", "set2-00000", "419", "a_b_1"]
    assert prompts[0] == SuitePrompt(
        "00000",
        "A man in a dark suit sits on a yellow couch and talks.\n\nDialogue:\n"
        '<Man, English>: "They say they speak English."\n\nBackground Sound:\n<No background sound>',
        image=str((root / "set1/00000.jpg").resolve()),
    )
    assert prompts[1].image == str((root / "set2/00000.jpeg").resolve())
    assert all(p.audio is None and p.seconds is None and p.seed is None for p in prompts)
    # the transcript is the speech reference of WER; no speech -> no reference
    assert extract_dialogue(prompts[0].prompt) == [DialogueLine("Man", "en", "They say they speak English.")]
    assert prompt_reference(prompts[2].prompt) == ("", None)
    assert prompts[2].prompt.endswith(
        "Dialogue:\n<No dialogue>\n\nBackground Sound:\n<Guitar music, singing>"
    )
    assert extract_dialogue(prompts[3].prompt) == [DialogueLine("News anchor", "zh", "今天天气很好。")]
    assert prompts[3].prompt.endswith("<No background sound>")  # "None" is no ambient sound (UniVerse-1)
    assert [p.id for p in load_versebench(root, ["set3", "set1"])] == ["a_b_1", "00000"]
    assert [p.id for p in load_versebench(root, [], limit=2)] == ["00000", "set2-00000"]


def test_ids_and_languages():
    assert safe_id("videovideoTr6MMsoWAog-scene1-scene1") == "videovideoTr6MMsoWAog-scene1-scene1"
    assert safe_id(" ../clip (1).v2 ") == "clip_1_.v2"
    assert [speech_language(t) for t in ("Hello there", "你好", "こんにちは", "안녕하세요", "")] == [
        "English", "Mandarin", "Japanese", "Korean", "English",
    ]  # fmt: skip


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda r: (r / "set2/419.jpg").unlink(), r"set2/419.json: reference image 419.jpg \(or .jpeg / .png\) not found"),
        (lambda r: _write(r / "set1/00000.json", '{"video_prompt": "x",\n "audio_prompt": [}'),
         r"set1/00000.json:2:19: not valid JSON"),
        (lambda r: _json(r / "set1/00000.json", ["a list"]), "00000.json: a Verse-Bench item must be a JSON object"),
        (lambda r: _json(r / "set1/00000.json", {**MAN, "video_prompt": " "}),
         "00000.json: 'video_prompt' must be a non-empty string"),
        (lambda r: _json(r / "set1/00000.json", {**MAN, "audio_prompt": [1]}),
         "00000.json: 'audio_prompt' must be a list of strings"),
        (lambda r: _json(r / "set1/00000.json", {**MAN, "speech_prompt": "hello"}),
         r"00000.json: 'speech_prompt' must be an object \{speaker, text\}"),
        (lambda r: _json(r / "set1/00000.json", {**MAN, "speech_prompt": {"text": 3}}),
         "00000.json: 'speech_prompt.text' must be a string, got 3"),
        (lambda r: [p.unlink() for p in (r / "set3").iterdir()], r"set3 holds no <name>.json items"),
        (lambda r: (_json(r / "set3/___.json", MAN), _png(r / "set3/___.png")), "'___' has no letters or digits"),
    ],
)  # fmt: skip
def test_versebench_errors(tmp_path, break_it, match):
    root = _versebench(tmp_path / "vb")
    assert len(load_versebench(root, [])) == 4  # valid before it is broken
    break_it(root)
    with pytest.raises(ValueError, match=match):
        load_versebench(root, [])


def test_versebench_folder_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"eval.suite.root='.*nope': no such folder; format versebench reads"
    ):
        load_versebench(tmp_path / "nope", [])
    root = _versebench(tmp_path / "vb")
    with pytest.raises(ValueError, match=r"set4 not found; the subsets are \['set1', 'set2', 'set3'\]"):
        load_versebench(root, ["set4"])
    with pytest.raises(ValueError, match=r"subsets=\['set1', 'set1'\]: a subset is named twice"):
        load_versebench(root, ["set1", "set1"])
    for path in (root / "set2").iterdir():
        path.unlink()
    (root / "set2").rmdir()  # a copy without set2: the default sets name eval.suite.subsets as the way out
    with pytest.raises(ValueError, match=r"set2 not found.*eval.suite.subsets=\[\.\.\.\]"):
        load_versebench(root, [])
    assert [p.id for p in load_versebench(root, ["set1", "set3"])] == ["00000", "a_b_1"]


# ---------------------------------------------------------------------------------------------------------
# TalkVid-Bench: <root>/<subset>/test_<subset>.json + videos/ audios/ (videos_w_audios/<group>/)
# ---------------------------------------------------------------------------------------------------------

SUBSETS = ["age", "language"]  # of the four, the tiny copy holds two


def _record(rid: str, video: str, description: str = "A woman talks to the camera.", **extra) -> dict:
    return {"id": rid, "video-path": f"/data/TalkVid/bench/{video}", "description": description,
            "info": {"Language": "English", "Gender": "Female", "Person ID": ""}, "durations": "5.042s", **extra}  # fmt: skip


def _talkvid(clone: Path) -> Path:
    """A clone of the dataset repository: <clone>/TalkVid-bench/{age,language}/..."""
    age, lang = clone / "TalkVid-bench/age", clone / "TalkVid-bench/language"
    _json(age / "test_age.json", [
        _record("clip-a", "clip-a.mp4", "An older man\nexplains a recipe."),
        _record("clip b", "clip b.mp4"),  # a space in id and name; only the muxed video, no audios/ file
    ])  # fmt: skip
    _mp4(age / "videos/clip-a.mp4")
    _wav(age / "audios/clip-a.wav")
    _mp4(age / "videos_w_audios/60+/clip b.mp4", with_audio=True)
    _json(lang / "test_language.json", [
        _record("clip-a", "clip-a.mp4"),  # also in the age subset (with its own copy): evaluated once
        _record("clip-c", "c.mp4", "A man speaks German.", **{"audio-path": "/x/c_audio.mp3"}),
    ])  # fmt: skip
    _mp4(lang / "videos/clip-a.mp4")
    _wav(lang / "audios/clip-a.wav")
    _mp4(lang / "videos/c.mp4")
    _wav(lang / "audios/c_audio.mp3")  # the name audio-path gives (wav content: PyAV reads it either way)
    return clone


def _colour(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0)


def test_talkvid_bench_prompts_media_and_reference_frames(tmp_path):
    clone = _talkvid(tmp_path / "TalkVid")
    bench, media = (clone / "TalkVid-bench").resolve(), tmp_path / "media"
    prompts = load_talkvid_bench(clone, SUBSETS, media)  # the clone's root: its TalkVid-bench folder is read
    assert [p.id for p in prompts] == ["clip-a", "clip_b", "clip-c"]
    assert prompts[0] == SuitePrompt(
        "clip-a", "An older man explains a recipe.", image=str(media / "clip-a.png"),
        audio=str(bench / "age/audios/clip-a.wav"),
    )  # fmt: skip
    assert prompts[1].audio == str(bench / "age/videos_w_audios/60+/clip b.mp4")  # the clip's own audio track
    assert prompts[2].audio == str(bench / "language/audios/c_audio.mp3")
    assert extract_dialogue(prompts[0].prompt) == []  # no transcript in the records: no WER reference
    for p in prompts:  # the reference image is the clip's first (red) frame, not a later (blue) one
        red = _colour(p.image)
        assert np.abs(red - RED).max() < 25, (p.id, red)
    # written once: a second load keeps the frames, a newer clip replaces its frame
    stamp = (media / "clip-a.png").stat().st_mtime_ns
    load_talkvid_bench(bench, SUBSETS, media)
    assert (media / "clip-a.png").stat().st_mtime_ns == stamp
    os.utime(bench / "age/videos/clip-a.mp4", ns=(stamp + 10**9, stamp + 10**9))
    load_talkvid_bench(bench, SUBSETS, media)
    assert (media / "clip-a.png").stat().st_mtime_ns > stamp
    # the limit applies before frames are written
    other = tmp_path / "media2"
    assert [p.id for p in load_talkvid_bench(bench, ["language"], other, limit=1)] == ["clip-a"]
    assert sorted(p.name for p in other.iterdir()) == ["clip-a.png"]


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda b: (b / "age/test_age.json").unlink(), r"subset .*age: its record list test_age.json is missing"),
        (lambda b: _json(b / "age/test_age.json", {"id": "x"}), "test_age.json: must be a JSON list of TalkVid records"),
        (lambda b: _json(b / "age/test_age.json", ["clip-a"]), "test_age.json: record 0: must be a JSON object"),
        (lambda b: _json(b / "age/test_age.json", [{"description": "x"}]),
         "test_age.json: record 0: 'id' must be a non-empty string, got None"),
        (lambda b: _json(b / "age/test_age.json", [_record("clip-a", "clip-a.mp4", description="")]),
         r"test_age.json: record 0 \(id 'clip-a'\): 'description' must be a non-empty string"),
        (lambda b: (b / "age/videos/clip-a.mp4").unlink(),
         r"record 0 \(id 'clip-a'\): clip 'clip-a.mp4' not found in .*age/videos or .*age/videos_w_audios/<group>/"),
        (lambda b: (b / "age/audios/clip-a.wav").unlink(),
         r"record 0 \(id 'clip-a'\): no audio for clip 'clip-a': expected .*age/audios/clip-a.wav"),
        (lambda b: _write(b / "language/test_language.json", "[\n  {\"id\": 1,}\n]"),
         r"test_language.json:2:12: not valid JSON"),
        (lambda b: (_json(b / "age/test_age.json", []), _json(b / "language/test_language.json", [])),
         r"the record lists of \['age', 'language'\] are empty"),
    ],
)  # fmt: skip
def test_talkvid_bench_errors(tmp_path, break_it, match):
    bench = _talkvid(tmp_path / "TalkVid") / "TalkVid-bench"
    assert len(load_talkvid_bench(bench, SUBSETS, tmp_path / "m")) == 3  # valid before it is broken
    break_it(bench)
    with pytest.raises(ValueError, match=match):
        load_talkvid_bench(bench, SUBSETS, tmp_path / "m")


def test_talkvid_bench_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no such folder; format talkvid_bench reads a local copy"):
        load_talkvid_bench(tmp_path / "nope", [], tmp_path / "m")
    bench = _talkvid(tmp_path / "TalkVid") / "TalkVid-bench"
    with pytest.raises(
        ValueError, match=r"ethnicity not found; the subsets are \['age', 'ethnicity', 'gender'"
    ):
        load_talkvid_bench(bench, [], tmp_path / "m")  # all four by default


# ---------------------------------------------------------------------------------------------------------
# eval.suite.format / root through the config, the runner and recipe=evaluate
# ---------------------------------------------------------------------------------------------------------


def test_suite_format_validation(tmp_path):
    root = str(_versebench(tmp_path / "vb"))
    media = tmp_path / "media"
    jsonl = suite_prompts(EvalSuiteConfig(prompts="eval/smoke.jsonl"), 2, media)
    assert [p.id for p in jsonl] == ["en_kitchen", "zh_greeting"]
    bench = suite_prompts(EvalSuiteConfig(format="versebench", root=root, subsets=["set3"]), None, media)
    assert [p.id for p in bench] == ["a_b_1"]
    for cfg, match in [
        (EvalSuiteConfig(format="vbench", root=root), r"eval.suite.format='vbench': use one of \['jsonl', 'versebench', 'talkvid_bench'\]"),
        (EvalSuiteConfig(name="mine"), r"suite 'mine' names no prompts file: set eval.suite.prompts=<file.jsonl>"),
        (EvalSuiteConfig(prompts="eval/smoke.jsonl", root=root), "eval.suite.root and eval.suite.subsets are for benchmark"),
        (EvalSuiteConfig(prompts="eval/smoke.jsonl", subsets=["set1"]), "are for benchmark folders"),
        (EvalSuiteConfig(format="versebench"), r"format=versebench reads a local benchmark folder: set eval.suite.root="),
        (EvalSuiteConfig(format="talkvid_bench", root=root, prompts="eval/smoke.jsonl"),
         r"eval.suite.prompts='eval/smoke.jsonl' is for jsonl suites"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            suite_prompts(cfg, None, media)


def test_benchmark_suite_configs_compose(compose):
    from magi_train.config import EvalConfig, narrow

    for name in ("versebench", "talkvid_bench"):
        suite = narrow(compose(["recipe=evaluate", f"suite={name}"]).eval, EvalConfig).suite
        assert (suite.name, suite.kind, suite.format, suite.prompts) == (name, "quality", name, None)
        assert suite.root == f"data/{name}" and suite.subsets == [] and suite.seconds == 5
    suite = narrow(compose(["recipe=evaluate", "suite=talkvid_bench", "eval.suite.root=/b",
                            "eval.suite.subsets=[age]"]).eval, EvalConfig).suite  # fmt: skip
    assert (suite.root, suite.subsets) == ("/b", ["age"])


@pytest.fixture
def fake_generate(monkeypatch):
    """generate() replaced by a recorder writing a 6-frame silent 32x32 mp4 (+ its JSON): the runner's requests."""
    import importlib

    from magi_train.utils.fileio import atomic_write

    gen = importlib.import_module(
        "magi_train.inference.generate"
    )  # the module (the package exports a function)
    requests = []

    class Result:
        info = {"sampler": "fake", "timings_s": {"base": 0.0}}

    def generate(cfg, pipe):
        requests.append(cfg)
        _mp4(Path(cfg.output))
        atomic_write(Path(cfg.output).with_suffix(".json"), json.dumps(Result.info))
        return Result()

    monkeypatch.setattr(gen, "load_pipeline", lambda cfg: object())
    monkeypatch.setattr(gen, "generate", generate)
    return requests


def test_evaluate_recipe_runs_benchmark_suites(compose, fake_generate, tmp_path):
    """recipe=evaluate suite=versebench / talkvid_bench: the benchmark's prompts, images and audio reach
    generate(), and the report scores them (WER against the Verse-Bench transcript)."""
    pytest.importorskip("jiwer", reason="the eval extra is not installed: pip install -e '.[eval]'")
    from magi_train.__main__ import run

    ckpt = tmp_path / "base.ckpt"
    ckpt.write_bytes(b"not loaded: generate is replaced")
    common = ["recipe=evaluate", f"generate.base_ckpt={ckpt}", "eval.bootstrap_resamples=100"]
    vb = _versebench(tmp_path / "vb")
    out = run(
        compose([*common, "suite=versebench", f"eval.suite.root={vb}", f"run_dir={tmp_path / 'run_vb'}"])
    )
    report = json.loads(Path(out["report"]).read_text())
    assert report["suite"] == {"name": "versebench", "format": "versebench", "prompts": None, "root": str(vb),
                               "subsets": [], "count": 4}  # fmt: skip
    assert [(Path(r.output).name, r.image, r.audio, r.seconds) for r in fake_generate] == [
        ("00000.mp4", str((vb / "set1/00000.jpg").resolve()), None, 5.0),
        ("set2-00000.mp4", str((vb / "set2/00000.jpeg").resolve()), None, 5.0),
        ("419.mp4", str((vb / "set2/419.jpg").resolve()), None, 5.0),
        ("a_b_1.mp4", str((vb / "set3/a b#1.png").resolve()), None, 5.0),
    ]
    assert fake_generate[0].prompt == load_versebench(vb, [])[0].prompt
    (model,) = report["models"]
    clips = {c["id"]: c for c in model["clips"]}
    assert (
        clips["00000"]["reference"] == "They say they speak English." and clips["00000"]["language"] == "en"
    )
    assert clips["00000"]["transcript"] == ""  # a silent clip: every reference word is an error
    assert model["columns"]["wer"]["value"] == 1.0
    assert "does not transcribe 'zh'" in clips["a_b_1"]["speech_skipped"]  # pocketsphinx: English only

    fake_generate.clear()
    tv = _talkvid(tmp_path / "tv") / "TalkVid-bench"
    run_dir = tmp_path / "run_tv"
    overrides = [*common, "suite=talkvid_bench", f"eval.suite.root={tv}", "eval.suite.subsets=[age,language]",
                 "eval.suite.limit=2", f"run_dir={run_dir}"]  # fmt: skip
    plan = run(compose([*overrides, "dry_run=true"]))
    assert plan == {"suite": "talkvid_bench", "prompts": 2, "models": ["base"]}
    report = json.loads(Path(run(compose(overrides))["report"]).read_text())
    assert report["suite"]["count"] == 2 and [c["id"] for c in report["models"][0]["clips"]] == [
        "clip-a",
        "clip_b",
    ]
    assert [(r.image, r.audio) for r in fake_generate] == [
        (str(run_dir / "suite_media/clip-a.png"), str(tv.resolve() / "age/audios/clip-a.wav")),
        (str(run_dir / "suite_media/clip_b.png"), str(tv.resolve() / "age/videos_w_audios/60+/clip b.mp4")),
    ]


def test_talkvid_bench_clip_through_generate(compose, smoke, tmp_path):
    """A TalkVid-Bench item sampled for real (smoke checkpoint, tiny codecs): its first frame (i2v) and audio (a2v)
    are inputs generate() accepts, and the clip's JSON records both."""
    pytest.importorskip("jiwer", reason="the eval extra is not installed: pip install -e '.[eval]'")
    from magi_train.__main__ import run

    bench = _talkvid(tmp_path / "tv") / "TalkVid-bench"
    run_dir = tmp_path / "run"
    out = run(compose([
        "recipe=evaluate", "experiment=smoke", "suite=talkvid_bench", f"eval.suite.root={bench}",
        "eval.suite.subsets=[age]", "eval.suite.limit=1", f"run_dir={run_dir}", "generate.seconds=0.2",
        "eval.suite.seconds=0.2", "eval.generate_overrides.steps=2", "+eval.generate_overrides.cfg=false",
        "generate.progress=false", f"generate.base_ckpt={smoke['base']}", f"generate.codecs_dir={smoke['codecs']}",
    ]))  # fmt: skip
    report = json.loads(Path(out["report"]).read_text())
    assert [c["id"] for c in report["models"][0]["clips"]] == ["clip-a"]
    info = json.loads((run_dir / "clips/train/clip-a.json").read_text())
    assert info["mode"] == "i2v+a2v"
    text = json.dumps(info)
    assert (
        str(run_dir / "suite_media/clip-a.png") in text
        and str(bench.resolve() / "age/audios/clip-a.wav") in text
    )
