"""The evaluate runner without a real generator: the generator is released before the scorers load, prompts split
across shards are merged into the report an unsplit run writes, and merge_only refuses unfinished shards."""

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jiwer", reason="the eval extra is not installed: pip install -e '.[eval]'")

import magi_train.eval.runner as runner  # noqa: E402
from magi_train.config import EvalASRConfig, EvalConfig, EvalSuiteConfig, GenerateConfig  # noqa: E402


class FakePipeline:
    """Stands in for a loaded generation pipeline (15B of GPU memory in real runs)."""


@pytest.fixture
def fake_generator(monkeypatch):
    """load_pipeline / generate replaced: clips are small noise mp4s (seeded per model and prompt) + their JSON;
    `events` records the order of loads, generations and scorer loading."""
    import importlib

    gen = importlib.import_module(
        "magi_train.inference.generate"
    )  # the module (the package exports a function)
    from magi_train.codecs import write_audio_video_mp4
    from magi_train.utils.fileio import atomic_write

    events, alive = [], []

    def load_pipeline(cfg):
        pipe = FakePipeline()
        alive.append(weakref.ref(pipe))
        events.append(("load", cfg.base_ckpt))
        return pipe

    class Result:
        info = {"sampler": "fake", "timings_s": {"base": 0.0}}

    def generate(cfg, pipe):
        assert isinstance(pipe, FakePipeline)
        seed = abs(hash((cfg.base_ckpt, Path(cfg.output).stem))) % 2**32
        frames = (np.random.default_rng(seed).random((6, 32, 32, 3)) * 255).astype(np.uint8)
        write_audio_video_mp4(Path(cfg.output), frames, None)
        atomic_write(Path(cfg.output).with_suffix(".json"), json.dumps(Result.info))
        events.append(("generate", cfg.base_ckpt, Path(cfg.output).stem))
        return Result()

    real_load_scorers = runner.load_scorers

    def load_scorers(eval_cfg):
        gc.collect()
        events.append(("scorers", [ref() is not None for ref in alive]))
        return real_load_scorers(eval_cfg)

    monkeypatch.setattr(gen, "load_pipeline", load_pipeline)
    monkeypatch.setattr(gen, "generate", generate)
    monkeypatch.setattr(runner, "load_scorers", load_scorers)
    return events


def _cfg(**kw):
    return EvalConfig(
        suite=EvalSuiteConfig(name="smoke", prompts="eval/smoke.jsonl", limit=5),
        models={"a": {"base_ckpt": "ckpt_a"}, "b": {"base_ckpt": "ckpt_b"}},
        asr=EvalASRConfig(backend="none"), bootstrap_resamples=100, **kw,
    )  # fmt: skip


def test_generators_are_released_before_the_scorers_load(fake_generator, tmp_path):
    out = runner.run_evaluate(_cfg(), GenerateConfig(), tmp_path)
    kinds = [e[0] for e in fake_generator]
    # every clip of both models first, then the scorers, loaded once, with no pipeline left alive
    assert kinds == ["load"] + ["generate"] * 5 + ["load"] + ["generate"] * 5 + ["scorers"]
    assert fake_generator[-1] == ("scorers", [False, False])
    assert set(out["models"]) == {"a", "b"}


def test_shards_merge_into_the_report_of_an_unsplit_run(fake_generator, tmp_path):
    whole = json.loads(
        Path(runner.run_evaluate(_cfg(), GenerateConfig(), tmp_path / "whole")["report"]).read_text()
    )
    split = tmp_path / "split"
    with pytest.raises(ValueError, match="merge_only=true but model 'a' has no clip"):
        runner.run_evaluate(_cfg(merge_only=True), GenerateConfig(), split)
    done = []
    for index in (1, 0):  # any order, e.g. Slurm array tasks
        part = runner.run_evaluate(_cfg(num_shards=2, shard_index=index), GenerateConfig(), split)
        done += part["prompts"]
        assert Path(part["shard"]).is_file() and not (split / "report.json").exists()
    assert sorted(done) == sorted(
        json.loads(line)["id"] for line in Path("eval/smoke.jsonl").read_text().splitlines()
    )
    fake_generator.clear()
    merged = json.loads(
        Path(runner.run_evaluate(_cfg(merge_only=True), GenerateConfig(), split)["report"]).read_text()
    )
    assert [
        e for e in fake_generator if e[0] != "scorers"
    ] == [] and not fake_generator  # nothing sampled or loaded
    assert merged["cache"]["scores_reused"] == 10 and merged["cache"]["scores_computed"] == 0
    for m_whole, m_merged in zip(whole["models"], merged["models"], strict=True):
        # the same clips and counts; scores to float32 rounding (the scorer batches clips differently per shard)
        assert m_merged["columns"].keys() == m_whole["columns"].keys()
        for name, col in m_whole["columns"].items():
            other = m_merged["columns"][name]
            assert other.keys() == col.keys() and other.get("n") == col.get("n"), name
            for key, value in col.items():
                if isinstance(value, float):
                    assert other[key] == pytest.approx(value, rel=1e-4), (name, key)
                else:
                    assert other[key] == value, (name, key)
    with pytest.raises(ValueError, match="shard_index must be in"):
        runner.run_evaluate(_cfg(num_shards=2, shard_index=2), GenerateConfig(), split)
