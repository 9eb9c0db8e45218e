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

import numpy as np

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
    zero = dict.fromkeys(("visual_quality", "text_alignment", "physical_consistency"), 0)
    assert model["counts"] == {"clips": 4, "scored": 4, "speech_scored": 2, "speech_skipped": 1,
                               "unparsed": zero, "unaligned": zero}  # fmt: skip
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
    assert "| train | " in md and "PROXY, not VideoScore2" in md
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
    sheet = Path(report["pair_sheet"]) / "raters" / "r01" / "index.html"
    assert sheet.is_file() and "mine" not in sheet.read_text()
    assert "mine" in (Path(report["pair_sheet"]) / "key" / "r01.csv").read_text()  # the key, outside
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


def test_smoke_report_has_reference_n_units_paired_differences_provenance_and_resumes(
    compose, smoke, evaluated, tmp_path
):
    """recipe=evaluate experiment=smoke with two systems; then the same run in a subprocess killed (SIGKILL) after
    its first clip was scored, and re-run: it resumes from the cached scores and reports the same numbers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    train = smoke["root"] / "run/clips/train"
    # system 1: the module's clips (generated by `evaluated`); system 2: sampled here with 2 UniPC steps
    two = [f"+eval.models.train.clips_dir={train}", "+eval.models.train_2steps.base_ckpt=" + str(smoke["base"]),
           "+eval.models.train_2steps.steps=2"]  # fmt: skip
    out = _evaluate(compose, smoke, tmp_path / "full", *two)
    report = json.loads(Path(out["report"]).read_text())
    md = Path(out["markdown"]).read_text()
    assert [m["name"] for m in report["models"]] == ["train", "train_2steps"]
    # the paper's row, from a data file with its source
    assert (
        "| daVinci-MagiHuman (paper) | 4.80 | 4.18 | 4.52 | 14.60% |" in md
        and "Paper rows: daVinci-MagiHuman" in md
    )
    # n per column and the units of the error rate
    vq = report["models"][0]["columns"]["visual_quality"]
    assert vq["n"] == 4 and f"(n={vq['n']})" in md
    assert report["models"][0]["columns"]["wer"]["unit_label"] == "words" and "units: words" in md
    assert "| train | en | WER | words |" in md and "| train | word | WER | words |" in md
    # paired differences on the same prompts
    (pair,) = report["paired"]
    assert (pair["model"], pair["baseline"]) == ("train", "train_2steps")
    a, b = ({c["id"]: c for c in m["clips"]} for m in report["models"])
    diff = np.mean([a[k]["scores"]["visual_quality"] - b[k]["scores"]["visual_quality"] for k in a])
    assert (
        pair["columns"]["visual_quality"]["value"] == pytest.approx(diff)
        and pair["columns"]["visual_quality"]["n"] == 4
    )
    assert pair["columns"]["wer"]["n"] == 2 and "| train − train_2steps |" in md
    # provenance: commit, packages, checksums of the checkpoints
    prov = report["provenance"]
    assert prov["packages"]["torch"] and "commit" in prov["code"] and "## Provenance" in md
    ckpt = prov["models"]["train_2steps"]["base_ckpt"]
    assert ckpt["path"] == str(smoke["base"]) and len(ckpt.get("sha256") or ckpt["sha256_head_tail"]) == 64
    assert prov["models"]["train"] == {"clips_dir": str(train)}
    assert report["cache"] == {"scores_reused": 0, "scores_computed": 8, "key": report["cache"]["key"]}

    # kill -9 after the first clip's scores are cached, then resume
    both = [
        f"+eval.models.train.clips_dir={train}",
        f"+eval.models.train_2steps.clips_dir={tmp_path / 'full/clips/train_2steps'}",
    ]
    run_dir = tmp_path / "killed"
    overrides = [
        "recipe=evaluate",
        "experiment=smoke",
        f"run_dir={run_dir}",
        *FAST,
        f"generate.codecs_dir={smoke['codecs']}",
        *both,
    ]
    child = (
        "import sys, time\nimport magi_train.eval.runner as r\nreal, calls = r.score_clip, []\n"
        "def slow(*a, **k):\n    calls.append(1)\n    if len(calls) == 2:\n        time.sleep(300)  # killed here\n"
        "    return real(*a, **k)\nr.score_clip = slow\nfrom magi_train.__main__ import compose, run\n"
        "run(compose(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, *overrides], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    first = run_dir / "scores/train/en_kitchen.json"
    deadline = time.time() + 240
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    cached = sorted(p.name for p in (run_dir / "scores").rglob("*") if p.is_file())
    assert cached == ["en_kitchen.json"] and not (run_dir / "report.json").exists()  # nothing half-written
    resumed = run(compose(overrides))
    again = json.loads(Path(resumed["report"]).read_text())
    assert again["cache"]["scores_reused"] == 1 and again["cache"]["scores_computed"] == 7
    for m_full, m_resumed in zip(report["models"], again["models"], strict=True):
        assert m_resumed["columns"] == m_full["columns"]  # same clips, same numbers as the uninterrupted run
    rerun = json.loads(Path(run(compose(overrides))["report"]).read_text())
    assert rerun["cache"]["scores_reused"] == 8 and rerun["cache"]["scores_computed"] == 0
