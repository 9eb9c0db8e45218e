"""Recipe `evaluate` end to end on a short smoke checkpoint and tiny random codecs: clips through generate(),
report.json / report.md / report.png with every column and its interval, reuse of clip folders, pair sheet,
preference CSV, the latency table and dry runs."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("jiwer", reason="the eval extra is not installed: pip install -e '.[eval]'")

from magi_train.__main__ import run

FAST = [  # short clips, 4 UniPC steps without CFG: the tiny DiT's forward dominates the run time
    "generate.seconds=0.2", "eval.suite.seconds=0.2", "eval.generate_overrides.steps=4",
    "+eval.generate_overrides.cfg=false", "generate.progress=false", "eval.bootstrap_resamples=200",
    "eval.suite.limit=4",  # en_kitchen, zh_greeting (Mandarin: not transcribed), silent_beach, en_station
]  # fmt: skip


def _evaluate(compose, smoke, run_dir, *extra):
    return run(compose(["recipe=evaluate", "experiment=smoke", f"run_dir={run_dir}", *FAST,
                        f"generate.base_ckpt={smoke['base']}", f"generate.codecs_dir={smoke['codecs']}", *extra]))  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(compose, smoke):
    """One smoke evaluation (generate -> score -> report), shared by the tests below."""
    return _evaluate(compose, smoke, smoke["root"] / "run")


def test_smoke_evaluation_writes_every_column(smoke, evaluated):
    out, run_dir = evaluated, smoke["root"] / "run"
    report = json.loads(Path(out["report"]).read_text())
    assert report["suite"]["name"] == "smoke" and report["suite"]["count"] == 4
    assert (report["scorer"], report["asr"]) == ("proxy", "pocketsphinx")
    (model,) = report["models"]
    assert model["name"] == "train"  # <run>/checkpoints/last.ckpt -> the run's name
    for key in ("visual_quality", "text_alignment", "physical_consistency", "wer"):
        est = model["columns"][key]
        assert est["value"] is not None and est["low"] <= est["value"] <= est["high"], (key, est)
    assert model["counts"] == {"clips": 4, "scored": 4, "speech_scored": 2, "speech_skipped": 1}
    assert (
        model["wer"]["by_language"]["en"]["clips"] == 2
        and model["wer"]["by_language"]["en"]["unit"] == "word"
    )
    clips = {c["id"]: c for c in model["clips"]}
    assert "does not transcribe 'zh'" in clips["zh_greeting"]["speech_skipped"]
    assert clips["silent_beach"]["reference"] == "" and "speech" not in clips["silent_beach"]
    assert set(clips["en_kitchen"]["timings_s"]) >= {"text", "base", "decode"}
    md = Path(out["markdown"]).read_text()
    assert "| Model | Visual Quality | Text Alignment | Physical Consistency | WER |" in md
    assert "| train | " in md and "not VideoScore2" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert out["plot"] and Path(out["plot"]).stat().st_size > 1000
    for p in Path(run_dir / "clips/train").glob("*.mp4"):
        assert p.with_suffix(".json").is_file()  # generate()'s settings and timings next to each clip


def test_existing_clips_two_models_pair_sheet_preference_and_compare(compose, smoke, evaluated, tmp_path):
    first = evaluated
    clips = smoke["root"] / "run/clips/train"
    other = tmp_path / "other_clips"
    shutil.copytree(clips, other)
    (other / "zh_greeting.mp4").unlink()  # a missing clip is reported, not fatal
    pytest.importorskip("python_speech_features")
    from magi_train.eval.sync import SyncNet

    torch.manual_seed(0)
    torch.save(SyncNet((4, 4, 4, 4, 4, 8), (4, 4, 4, 4, 4, 8), 16).state_dict(), tmp_path / "syncnet.model")
    prefs = tmp_path / "prefs.csv"
    prefs.write_text("system_a,system_b,winner\nmine,theirs,mine\ntheirs,mine,tie\nmine,theirs,A\n")
    out = _evaluate(
        compose, smoke, tmp_path / "b", f"+eval.models.mine.clips_dir={clips}", f"+eval.models.theirs.clips_dir={other}",
        "eval.pair_sheet=true",
        f"eval.sync_weights={tmp_path / 'syncnet.model'}",
        "eval.sync_vshift=2", f"eval.preference={prefs}", f"eval.compare=[{first['report']}]",
    )  # fmt: skip
    report = json.loads(Path(out["report"]).read_text())
    assert [m["name"] for m in report["models"]] == ["mine", "theirs"]
    first_columns = json.loads(Path(first["report"]).read_text())["models"][0]["columns"]
    assert {k: report["models"][0]["columns"][k] for k in first_columns} == first_columns  # same clips
    missing = [c["id"] for c in report["models"][1]["clips"] if c.get("missing")]
    assert missing == ["zh_greeting"]
    assert report["preference"]["pairs"][0]["win"]["value"] == pytest.approx(2 / 3)
    assert len(report["compare"]) == 1 and report["compare"][0]["name"] == "train (run)"
    sheet = Path(report["pair_sheet"])
    assert sheet.is_file() and "mine" not in sheet.read_text()
    md = Path(out["markdown"]).read_text()
    assert "| mine |" in md and "| theirs |" in md and "| train (run) |" in md and "Pairwise preference" in md
    assert "theirs: no clip for zh_greeting." in md
    assert "| LSE-D | LSE-C |" in md  # lip sync columns with eval.sync_weights (tiny random SyncNet here)
    assert report["models"][0]["columns"]["lse_c"]["value"] is not None
    assert "sync" in report["models"][0]["clips"][0]


def test_latency_table_and_dry_runs(compose, smoke, tmp_path):
    out = _evaluate(
        compose, smoke, tmp_path / "lat", "suite=latency", "eval.suite.repeats=2", "eval.suite.warmup=1"
    )
    rows = {r["name"]: r for r in json.loads(Path(out["latency"]).read_text())["rows"]}
    assert rows["64px-sr"]["skipped"] == "no generate.sr_ckpt"
    m = rows["32px"]["median_s"]
    assert (
        len(rows["32px"]["runs_s"]) == 2
        and m["base"] > 0
        and m["total"] == pytest.approx(m["base"] + m["decode"])
    )
    md = Path(out["markdown"]).read_text()
    assert (
        "| Resolution | Text | Base | Super-Res | Decode | Total |" in md and "| 32px |" in md and "cpu" in md
    )
    plan = _evaluate(compose, smoke, tmp_path / "dry", "dry_run=true")
    assert plan == {"suite": "smoke", "prompts": 4, "models": ["train"]}
    with pytest.raises(ValueError, match="clips_dir .* not found"):
        _evaluate(compose, smoke, tmp_path / "dry2", "dry_run=true", f"eval.clips_dir={tmp_path / 'nope'}",
                  "generate.base_ckpt=null")  # fmt: skip


def test_suite_files_and_errors(tmp_path):
    from magi_train.eval.suite import load_suite
    from magi_train.eval.text import extract_dialogue

    dialogue = load_suite("eval/dialogue_multilingual.jsonl")
    languages = {line.language for p in dialogue for line in extract_dialogue(p.prompt)}
    assert {"en", "zh", "yue", "ja", "ko", "de", "fr"} <= languages
    assert any(not extract_dialogue(p.prompt) for p in dialogue)  # a prompt without speech
    assert len(load_suite("eval/smoke.jsonl", limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    for text, match in [('{"id": "a b", "prompt": "x"}', "file-name-safe"), ('{"id": "a"}', "'prompt'"),
                        ('{"id": "a", "prompt": "x", "colour": 1}', "unknown keys"), ("[1]", "JSON object"),
                        ('{"id": "a", "prompt": "x", "image": "nope.png"}', "image 'nope.png' not found"),
                        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}', "duplicate id")]:  # fmt: skip
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=match):
            load_suite(bad)
    with pytest.raises(ValueError, match="not found"):
        load_suite(tmp_path / "missing.jsonl")


def test_shared_setup_of_runner_and_callback(tmp_path):
    from magi_train.config import EvalConfig, EvalSuiteConfig, GenerateConfig
    from magi_train.eval.runner import generate_config, prompt_config, replace_config
    from magi_train.eval.suite import SuitePrompt

    gen = GenerateConfig(seconds=4.0, seed=42, steps=32)
    ecfg = EvalConfig(generate_overrides={"steps": 8, "guidance": {"video_scale": 3.0}})
    out = generate_config(ecfg, gen)
    assert (out.steps, out.guidance.video_scale, out.guidance.audio_scale) == (8, 3.0, 5.0)
    with pytest.raises(ValueError, match=r"eval.generate_overrides.guidance: unknown keys \['scale'\]"):
        generate_config(EvalConfig(generate_overrides={"guidance": {"scale": 1}}), gen)
    with pytest.raises(ValueError, match=r"eval.models.x: unknown keys \['stepz'\]"):
        replace_config(gen, {"stepz": 1}, "eval.models.x")
    ecfg = EvalConfig(suite=EvalSuiteConfig(seconds=1.0))
    own = prompt_config(
        gen, SuitePrompt("a", "hi", seconds=2.0, seed=7), ecfg.suite.seconds, tmp_path / "a.mp4"
    )
    assert (own.prompt, own.seconds, own.seed, own.output) == ("hi", 2.0, 7, str(tmp_path / "a.mp4"))
    suite = prompt_config(gen, SuitePrompt("b", "yo"), ecfg.suite.seconds, "b.mp4")
    assert (suite.seconds, suite.seed) == (1.0, 42)  # the suite's length, generate's seed
    assert prompt_config(gen, SuitePrompt("c", "x"), None, "c.mp4").seconds == 4.0


def test_training_callback_samples_scores_and_logs(compose, smoke, tmp_path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from magi_train.config import DistillConfig, EvalConfig, GenerateConfig, narrow
    from magi_train.eval.callback import EvalCallback, eval_callbacks
    from magi_train.models.dit import DiT, DiTConfig

    cfg = compose(["recipe=pretrain_base", "experiment=smoke", f"run_dir={tmp_path}", "eval.every_n_steps=2",
                   "eval.callback_prompts=1", f"generate.codecs_dir={tmp_path / 'codecs'}", "generate.tiny_codecs=true", "generate.width=32",
                   "generate.height=32", "generate.seconds=0.2", "generate.steps=2", "generate.cfg=false",
                   "eval.bootstrap_resamples=100"])  # fmt: skip
    eval_cfg, gen_cfg = narrow(cfg.eval, EvalConfig), narrow(cfg.generate, GenerateConfig)
    (callback,) = eval_callbacks(eval_cfg, gen_cfg, tmp_path)
    assert isinstance(callback, EvalCallback) and [p.id for p in callback.prompts] == ["en_kitchen"]
    assert eval_callbacks(EvalConfig(), gen_cfg, tmp_path) == []

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = DiT(narrow(cfg.model, DiTConfig))
            self.draws: list[float] = []

        def training_step(self, batch, _):
            self.draws.append(torch.rand(1).item())  # the training stream of the global RNG
            return sum(p.sum() for p in self.model.parameters()) * 0.0 + batch.sum() * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.0)

    draws = []
    # the callback leaves the training stream of the global RNG as it was (writing its tiny codecs draws from it)
    for callbacks in ([], [callback]):
        torch.manual_seed(0)
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path, name="log") if callbacks else False,
                            callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(module := Toy(), torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1))
        draws.append(module.draws)
    assert len(draws[1]) == 4 and draws[1] == draws[0]
    assert sorted(p.name for p in (tmp_path / "eval_callback").iterdir()) == ["step00000002", "step00000004"]
    assert (tmp_path / "eval_callback/step00000004/en_kitchen.mp4").is_file()
    metrics = (next((tmp_path / "log").rglob("metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    for column in ("eval/visual_quality", "eval/text_alignment", "eval/physical_consistency", "eval/wer"):
        assert column in header, header
    assert "eval/visual_quality_low" not in header  # one clip: no bootstrap interval to log
    assert trainer.lightning_module.model.training  # restored after sampling
    settings = json.loads((tmp_path / "eval_callback/step00000004/en_kitchen.json").read_text())
    assert "unipc" in json.dumps(settings)  # the pretraining model: UniPC

    class Distilled(Toy):  # a dmd2 task samples its student with the distilled sampler, at its own steps
        def __init__(self):
            super().__init__()
            self.student = self.model
            self.cfg = DistillConfig(num_student_steps=2)

    run_dir = tmp_path / "distilled"
    (callback,) = eval_callbacks(eval_cfg, gen_cfg, run_dir)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[callback], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        Distilled(), torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1))  # fmt: skip
    settings = json.loads(next(run_dir.rglob("en_kitchen.json")).read_text())
    assert settings["sampler"] == "distilled-2" and settings["base"]["settings_from"]["steps"] == "checkpoint"
    assert settings["base"]["checkpoint"]["source"] == "training"
