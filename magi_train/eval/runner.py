"""Recipe `evaluate`: sample a suite's prompts through `magi_train.inference.generate` (or reuse existing clips),
score them (VideoScore2-style dimensions, WER/CER of the speech) and write report.json / report.md / report.png.

Eval has no sampling loop of its own: every clip comes from `generate()` with the `generate.*` settings,
one loaded pipeline per model. `suite=latency` times the stages instead (magi_train/eval/latency.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magi_train.eval.asr import ASRBackend, load_asr
from magi_train.eval.media import read_audio
from magi_train.eval.report import load_compare, summarize_model, write_report
from magi_train.eval.speech import SpeechScore, prompt_reference, score_transcript
from magi_train.eval.suite import SuitePrompt, load_suite
from magi_train.eval.videoscore import DIMENSIONS, VideoScorer, load_scorer

log = logging.getLogger(__name__)

_GENERATE_MODEL_KEYS = ("base_ckpt", "distilled_ckpt", "sr_ckpt", "sr_width", "sr_height", "base_model", "sr_model",
                        "steps", "distilled_steps", "sr_steps", "use_ema", "cfg")  # fmt: skip


@dataclass
class ModelSpec:
    """One evaluated system: sampled with `generate` overrides, or existing clips in `clips_dir`."""

    name: str
    clips_dir: str | None = None
    generate: dict[str, Any] = field(default_factory=dict)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _name_from_path(path: str) -> str:
    p = Path(path)
    if p.suffix == ".ckpt" and p.parent.name == "checkpoints":
        return p.parent.parent.name or p.stem  # outputs/smoke/checkpoints/last.ckpt -> smoke
    return p.stem if p.suffix else p.name


def resolve_models(ecfg: Any, gcfg: Any) -> list[ModelSpec]:
    """The systems an evaluate run compares (see EvalConfig)."""
    if ecfg.models:
        specs = []
        for name, spec in ecfg.models.items():
            spec = dict(spec)
            clips_dir = spec.pop("clips_dir", None)
            unknown = set(spec) - set(_GENERATE_MODEL_KEYS)
            if unknown:
                raise ValueError(
                    f"eval.models.{name}: unknown keys {sorted(unknown)}; use clips_dir or generate keys "
                    f"{list(_GENERATE_MODEL_KEYS)}"
                )
            if clips_dir is None and not (spec.get("base_ckpt") or spec.get("distilled_ckpt")):
                raise ValueError(f"eval.models.{name}: give clips_dir, base_ckpt or distilled_ckpt")
            specs.append(ModelSpec(str(name), clips_dir, spec))
        return specs
    if ecfg.checkpoint:
        return [
            ModelSpec(
                _name_from_path(ecfg.checkpoint),
                generate={"base_ckpt": ecfg.checkpoint, "distilled_ckpt": None},
            )
        ]
    if ecfg.clips_dir:
        return [ModelSpec(Path(ecfg.clips_dir).name or "clips", clips_dir=ecfg.clips_dir)]
    if gcfg.base_ckpt or gcfg.distilled_ckpt:
        return [ModelSpec(_name_from_path(gcfg.distilled_ckpt or gcfg.base_ckpt))]
    raise ValueError(
        "nothing to evaluate: set eval.checkpoint=<.ckpt or released dir>, eval.clips_dir=<folder of "
        "<prompt id>.mp4>, eval.models={name: {...}} or generate.base_ckpt / generate.distilled_ckpt"
    )


def _check_clips_dir(spec: ModelSpec) -> None:
    if not Path(spec.clips_dir).is_dir():
        raise ValueError(f"eval model {spec.name!r}: clips_dir {spec.clips_dir!r} not found; it should hold "
                         "<prompt id>.mp4 for the suite's prompts")  # fmt: skip


def produce_clips(
    spec: ModelSpec, prompts: list[SuitePrompt], gcfg: Any, out_dir: Path, seconds: float | None, reuse: bool
) -> dict[str, dict[str, Any]]:
    """Clip path (or None) and generation info per prompt id for one system."""
    clips: dict[str, dict[str, Any]] = {}
    if spec.clips_dir is not None:
        _check_clips_dir(spec)
        for p in prompts:
            path = Path(spec.clips_dir) / f"{p.id}.mp4"
            clips[p.id] = {"path": str(path) if path.is_file() else None, "generated": False}
        if not any(c["path"] for c in clips.values()):
            raise ValueError(
                f"eval model {spec.name!r}: none of the suite's clips <id>.mp4 are in {spec.clips_dir}"
            )
        return clips

    from magi_train.inference.generate import generate, load_pipeline

    model_cfg = dataclasses.replace(gcfg, **spec.generate)  # gcfg already carries eval.generate_overrides
    clip_dir = out_dir / "clips" / spec.name
    todo = [p for p in prompts if not (reuse and (clip_dir / f"{p.id}.mp4").is_file())]
    pipe = load_pipeline(model_cfg) if todo else None
    for p in prompts:
        path = clip_dir / f"{p.id}.mp4"
        if p in todo:
            cfg = dataclasses.replace(
                model_cfg, prompt=p.prompt, text_features=None, image=p.image, audio=p.audio,
                seconds=p.seconds or seconds or model_cfg.seconds,
                seed=p.seed if p.seed is not None else model_cfg.seed, output=str(path),
            )  # fmt: skip
            result = generate(cfg, pipe)
            clips[p.id] = {"path": str(path), "generated": True, "timings_s": result.info["timings_s"]}
        else:
            info = path.with_suffix(".json")
            timings = json.loads(info.read_text())["timings_s"] if info.is_file() else None
            clips[p.id] = {"path": str(path), "generated": False, "timings_s": timings}
    return clips


def score_clip(
    prompt: SuitePrompt,
    path: str,
    scorer: VideoScorer | None,
    asr: ASRBackend | None,
    normalizer: str,
    sync: Any | None = None,
) -> tuple[dict[str, Any], SpeechScore | None]:
    """Scores, transcript and speech edits (and lip sync with a SyncScorer) of one clip."""
    record: dict[str, Any] = {"id": prompt.id, "path": path}
    if sync is not None:
        result = sync.score(path)
        record["sync"] = {"offset": result.offset, "lse_d": result.lse_d, "lse_c": result.lse_c}
    if scorer is not None:
        scores = scorer.score(path, prompt.prompt)
        record["scores"] = {d: getattr(scores, d) for d in DIMENSIONS}
        record["scorer_output"] = {"hard": scores.hard, "raw": scores.raw, "details": scores.details}
    reference, language = prompt_reference(prompt.prompt)
    record.update(reference=reference, language=language)
    speech = None
    if reference and asr is not None:
        if asr.languages is not None and language not in asr.languages:
            record["speech_skipped"] = f"{asr.name} does not transcribe {language!r}"
        else:
            audio = read_audio(path, asr.sample_rate)
            record["transcript"] = asr.transcribe(audio, language) if audio.size else ""
            speech = score_transcript(prompt.id, reference, record["transcript"], language, normalizer)
            if speech is not None:
                record["speech"] = speech.as_dict()
    return record, speech


def evaluate_models(ecfg: Any, gcfg: Any, out_dir: Path) -> dict[str, Any]:
    """Generate/reuse, score and summarise every model of the run; returns the report dict (not yet written)."""
    suite_cfg = ecfg.suite
    if not suite_cfg.prompts:
        raise ValueError(f"suite {suite_cfg.name!r} names no prompts file (eval.suite.prompts)")
    prompts = load_suite(suite_cfg.prompts, suite_cfg.limit)
    specs = resolve_models(ecfg, gcfg)
    scorer_kwargs = {k: getattr(ecfg.scorer, k) for k in ("device", "dtype", "fps", "max_new_tokens", "max_frames",
                                                          "min_pixels", "max_pixels")}  # fmt: skip
    if ecfg.scorer.backend == "proxy":
        scorer_kwargs = {"fps": ecfg.scorer.fps}
    scorer = load_scorer(ecfg.scorer.backend, ecfg.scorer.path, **scorer_kwargs)
    asr = load_asr(ecfg.asr.backend, ecfg.asr.path, ecfg.asr.device, ecfg.asr.dtype)
    sync = None
    if ecfg.sync_weights:
        from magi_train.eval.sync import SyncScorer

        device = "cuda" if ecfg.scorer.device == "auto" and torch_cuda() else "cpu"
        sync = SyncScorer.from_pretrained(ecfg.sync_weights, device=device, vshift=ecfg.sync_vshift)
    bootstrap = {"n_resamples": ecfg.bootstrap_resamples, "confidence": ecfg.confidence, "seed": ecfg.seed}
    models, clip_paths = [], {}
    for spec in specs:
        start = time.perf_counter()
        clips = produce_clips(spec, prompts, gcfg, out_dir, suite_cfg.seconds, ecfg.reuse)
        records, speech = [], []
        for p in prompts:
            path = clips[p.id]["path"]
            if path is None:
                records.append({"id": p.id, "missing": True})
                continue
            record, s = score_clip(p, path, scorer, asr, ecfg.asr.normalizer, sync)
            record["timings_s"] = clips[p.id].get("timings_s")
            records.append(record)
            if s is not None:
                speech.append(s)
        summary = summarize_model(spec.name, records, speech, bootstrap)
        summary["source"] = {"clips_dir": spec.clips_dir, "generate": spec.generate}
        summary["seconds"] = round(time.perf_counter() - start, 2)
        models.append(summary)
        clip_paths[spec.name] = {r["id"]: r["path"] for r in records if r.get("path")}
        log.info("evaluated %s on %d prompts in %.1f s", spec.name, len(prompts), summary["seconds"])
    report: dict[str, Any] = {
        "suite": {"name": suite_cfg.name, "prompts": str(suite_cfg.prompts), "count": len(prompts)},
        "scorer": scorer.name if scorer else "none",
        "asr": asr.name if asr else "none",
        "normalizer": ecfg.asr.normalizer,
        "confidence": ecfg.confidence,
        "bootstrap_resamples": ecfg.bootstrap_resamples,
        "models": models,
        "compare": load_compare(list(ecfg.compare)),
    }
    report["_clip_paths"] = clip_paths
    report["_prompts"] = {p.id: p.prompt for p in prompts}
    return report


def run_evaluate(cfg: Any) -> dict[str, Any]:
    """Runner of recipe `evaluate` (dry_run: validate the suite and models, load nothing heavy)."""
    from omegaconf import OmegaConf

    ecfg = OmegaConf.to_object(cfg.eval)
    gcfg = OmegaConf.to_object(cfg.generate)
    unknown = set(ecfg.generate_overrides) - {f.name for f in dataclasses.fields(gcfg)}
    if unknown:
        raise ValueError(f"eval.generate_overrides: unknown generate keys {sorted(unknown)}")
    gcfg = dataclasses.replace(gcfg, **ecfg.generate_overrides)
    out_dir = Path(ecfg.output_dir)
    if ecfg.suite.kind == "latency":
        from magi_train.eval.latency import run_latency

        return run_latency(ecfg, gcfg, out_dir, dry_run=cfg.dry_run)
    if ecfg.suite.kind != "quality":
        raise ValueError(f"eval.suite.kind={ecfg.suite.kind!r}: use quality or latency")
    if cfg.dry_run:
        prompts = load_suite(ecfg.suite.prompts, ecfg.suite.limit) if ecfg.suite.prompts else []
        specs = resolve_models(ecfg, gcfg)
        for spec in specs:
            if spec.clips_dir:
                _check_clips_dir(spec)
        plan = {"suite": ecfg.suite.name, "prompts": len(prompts), "models": [s.name for s in specs]}
        print(plan)
        return plan
    report = evaluate_models(ecfg, gcfg, out_dir)
    clip_paths, prompts = report.pop("_clip_paths"), report.pop("_prompts")
    if ecfg.preference:
        from magi_train.eval.preference import preference_markdown, preference_report, read_judgements

        pref = preference_report(
            read_judgements(ecfg.preference), n_resamples=ecfg.bootstrap_resamples, confidence=ecfg.confidence,
            seed=ecfg.seed,
        )  # fmt: skip
        report["preference"] = pref
        report["preference_markdown"] = preference_markdown(pref)
    if ecfg.pair_sheet:
        from magi_train.eval.preference import write_pair_sheet

        if len(clip_paths) < 2:
            raise ValueError("eval.pair_sheet=true needs at least two models (eval.models)")
        report["pair_sheet"] = str(
            write_pair_sheet(clip_paths, out_dir / "pair_sheet", prompts, seed=ecfg.seed)
        )
    paths = write_report(report, out_dir)
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"wrote {paths['json']}, {paths['md']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
    return {"report": str(paths["json"]), "markdown": str(paths["md"]), "plot": str(paths["plot"]) if paths["plot"] else None,
            "models": {m["name"]: m["columns"] for m in report["models"]}}  # fmt: skip
