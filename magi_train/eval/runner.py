"""Recipe `evaluate`: sample a suite's prompts through `magi_train.inference.generate` (or reuse existing clips),
score them (VideoScore2-style dimensions, WER/CER of the speech) and write report.json / report.md / report.png.

Eval has no sampling loop of its own: every clip comes from `generate()` with the `generate.*` settings,
one loaded pipeline per model. `suite=latency` times the stages instead (magi_train/eval/latency.py). The set-up
shared with the training-time callback (magi_train/eval/callback.py) lives here: `generate_config`,
`load_scorers`, `bootstrap_settings` and `prompt_config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magi_train.config import EvalConfig, GenerateConfig
from magi_train.eval.asr import ASRBackend, load_asr
from magi_train.eval.media import read_audio
from magi_train.eval.report import load_compare, summarize_model, write_report
from magi_train.eval.speech import SpeechScore, prompt_reference, score_transcript
from magi_train.eval.suite import SuitePrompt, load_suite
from magi_train.eval.videoscore import DIMENSIONS, VideoScorer, load_scorer

if TYPE_CHECKING:
    from magi_train.eval.sync import SyncScorer

log = logging.getLogger(__name__)

# generate keys that may differ between the models of one run (eval.models.<name>.<key>)
_GENERATE_MODEL_KEYS = ("base_ckpt", "distilled_ckpt", "sr_ckpt", "sr_width", "sr_height", "base_model", "sr_model",
                        "steps", "distilled_steps", "distilled_shift", "sr_steps", "use_ema", "cfg", "guidance")  # fmt: skip


@dataclass
class ModelSpec:
    """One evaluated system: sampled with `generate` overrides, or existing clips in `clips_dir`."""

    name: str
    clips_dir: str | None = None
    generate: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Set-up shared with the training-time callback
# ---------------------------------------------------------------------------------------------------------


def replace_config(obj: Any, values: dict[str, Any], where: str) -> Any:
    """`dataclasses.replace` that names unknown keys and merges a dict into a nested dataclass (e.g. guidance)."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    changes = {}
    for key, value in values.items():
        current = getattr(obj, key)
        nested = dataclasses.is_dataclass(current) and isinstance(value, dict)
        changes[key] = replace_config(current, value, f"{where}.{key}") if nested else value
    return dataclasses.replace(obj, **changes)


def generate_config(eval_cfg: EvalConfig, gen_cfg: GenerateConfig) -> GenerateConfig:
    """The generate settings of eval's clips: `generate.*` with `eval.generate_overrides` applied."""
    return replace_config(gen_cfg, dict(eval_cfg.generate_overrides), "eval.generate_overrides")


def load_scorers(eval_cfg: EvalConfig) -> tuple[VideoScorer | None, ASRBackend | None]:
    """The video scorer and the ASR backend of `eval.scorer` / `eval.asr` (None for backend `none`)."""
    sc = eval_cfg.scorer
    scorer = load_scorer(
        sc.backend, sc.path, device=sc.device, dtype=sc.dtype, fps=sc.fps, max_new_tokens=sc.max_new_tokens,
        max_frames=sc.max_frames, min_pixels=sc.min_pixels, max_pixels=sc.max_pixels,
    )  # fmt: skip
    asr = load_asr(eval_cfg.asr.backend, eval_cfg.asr.path, eval_cfg.asr.device, eval_cfg.asr.dtype)
    return scorer, asr


def bootstrap_settings(eval_cfg: EvalConfig) -> dict[str, Any]:
    """Keyword arguments of the bootstrap intervals (eval/stats.py) of every reported mean."""
    return {
        "n_resamples": eval_cfg.bootstrap_resamples,
        "confidence": eval_cfg.confidence,
        "seed": eval_cfg.seed,
    }


def prompt_config(
    gen_cfg: GenerateConfig, prompt: SuitePrompt, suite_seconds: float | None, output: str | Path
) -> GenerateConfig:
    """The generate settings of one suite prompt: its text, image and audio; its length (else the suite's, else
    `generate.seconds`) and seed (else `generate.seed`); the clip written to `output`."""
    return dataclasses.replace(
        gen_cfg, prompt=prompt.prompt, text_features=None, image=prompt.image, audio=prompt.audio,
        seconds=prompt.seconds or suite_seconds or gen_cfg.seconds,
        seed=prompt.seed if prompt.seed is not None else gen_cfg.seed, output=str(output),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Models, clips and scores
# ---------------------------------------------------------------------------------------------------------


def _name_from_path(path: str) -> str:
    p = Path(path)
    if p.suffix == ".ckpt" and p.parent.name == "checkpoints":
        return p.parent.parent.name or p.stem  # outputs/smoke/checkpoints/last.ckpt -> smoke
    return p.stem if p.suffix else p.name


def resolve_models(eval_cfg: EvalConfig, gen_cfg: GenerateConfig) -> list[ModelSpec]:
    """The systems an evaluate run compares (see EvalConfig)."""
    if eval_cfg.models:
        specs = []
        for name, spec in eval_cfg.models.items():
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
    if eval_cfg.checkpoint:
        return [
            ModelSpec(
                _name_from_path(eval_cfg.checkpoint),
                generate={"base_ckpt": eval_cfg.checkpoint, "distilled_ckpt": None},
            )
        ]
    if eval_cfg.clips_dir:
        return [ModelSpec(Path(eval_cfg.clips_dir).name or "clips", clips_dir=eval_cfg.clips_dir)]
    if gen_cfg.base_ckpt or gen_cfg.distilled_ckpt:
        return [ModelSpec(_name_from_path(gen_cfg.distilled_ckpt or gen_cfg.base_ckpt))]
    raise ValueError(
        "nothing to evaluate: set eval.checkpoint=<.ckpt or released dir>, eval.clips_dir=<folder of "
        "<prompt id>.mp4>, eval.models={name: {...}} or generate.base_ckpt / generate.distilled_ckpt"
    )


def _check_clips_dir(spec: ModelSpec) -> None:
    if not Path(spec.clips_dir).is_dir():
        raise ValueError(f"eval model {spec.name!r}: clips_dir {spec.clips_dir!r} not found; it should hold "
                         "<prompt id>.mp4 for the suite's prompts")  # fmt: skip


def produce_clips(
    spec: ModelSpec,
    prompts: list[SuitePrompt],
    gen_cfg: GenerateConfig,
    out_dir: Path,
    suite_seconds: float | None,
    reuse: bool,
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

    model_cfg = replace_config(gen_cfg, spec.generate, f"eval.models.{spec.name}")
    clip_dir = out_dir / "clips" / spec.name
    todo = [p for p in prompts if not (reuse and (clip_dir / f"{p.id}.mp4").is_file())]
    pipe = load_pipeline(model_cfg) if todo else None
    for p in prompts:
        path = clip_dir / f"{p.id}.mp4"
        if p in todo:
            result = generate(prompt_config(model_cfg, p, suite_seconds, path), pipe)
            info = {"sampler": result.info["sampler"], "timings_s": result.info["timings_s"]}
            clips[p.id] = {"path": str(path), "generated": True, **info}
        else:
            meta = path.with_suffix(".json")
            info = json.loads(meta.read_text()) if meta.is_file() else {}
            clips[p.id] = {"path": str(path), "generated": False, "sampler": info.get("sampler"),
                           "timings_s": info.get("timings_s")}  # fmt: skip
    return clips


def score_clip(
    prompt: SuitePrompt,
    path: str,
    scorer: VideoScorer | None,
    asr: ASRBackend | None,
    normalizer: str,
    sync: SyncScorer | None = None,
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


def _sync_scorer(eval_cfg: EvalConfig) -> SyncScorer | None:
    """SyncNet lip sync (LSE-D / LSE-C) when `eval.sync_weights` is set."""
    if not eval_cfg.sync_weights:
        return None
    import torch

    from magi_train.eval.sync import SyncScorer

    device = "cuda" if eval_cfg.scorer.device == "auto" and torch.cuda.is_available() else "cpu"
    return SyncScorer.from_pretrained(eval_cfg.sync_weights, device=device, vshift=eval_cfg.sync_vshift)


def evaluate_models(eval_cfg: EvalConfig, gen_cfg: GenerateConfig, out_dir: Path) -> dict[str, Any]:
    """Generate/reuse, score and summarise every model of the run; returns the report dict (not yet written)."""
    suite_cfg = eval_cfg.suite
    if not suite_cfg.prompts:
        raise ValueError(f"suite {suite_cfg.name!r} names no prompts file (eval.suite.prompts)")
    prompts = load_suite(suite_cfg.prompts, suite_cfg.limit)
    specs = resolve_models(eval_cfg, gen_cfg)
    scorer, asr = load_scorers(eval_cfg)
    sync = _sync_scorer(eval_cfg)
    bootstrap = bootstrap_settings(eval_cfg)
    models, clip_paths = [], {}
    for spec in specs:
        start = time.perf_counter()
        clips = produce_clips(spec, prompts, gen_cfg, out_dir, suite_cfg.seconds, eval_cfg.reuse)
        records, speech = [], []
        for p in prompts:
            path = clips[p.id]["path"]
            if path is None:
                records.append({"id": p.id, "missing": True})
                continue
            record, s = score_clip(p, path, scorer, asr, eval_cfg.asr.normalizer, sync)
            record["sampler"] = clips[p.id].get("sampler")
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
        "normalizer": eval_cfg.asr.normalizer,
        "confidence": eval_cfg.confidence,
        "bootstrap_resamples": eval_cfg.bootstrap_resamples,
        "models": models,
        "compare": load_compare(list(eval_cfg.compare)),
    }
    report["_clip_paths"] = clip_paths
    report["_prompts"] = {p.id: p.prompt for p in prompts}
    return report


def run_evaluate(
    eval_cfg: EvalConfig, gen_cfg: GenerateConfig, run_dir: str | Path, dry_run: bool = False
) -> dict[str, Any]:
    """Runner of recipe `evaluate`: clips, report and plot in `run_dir` (dry_run: check the suite and models,
    load nothing heavy)."""
    gen_cfg = generate_config(eval_cfg, gen_cfg)
    out_dir = Path(run_dir)
    if eval_cfg.suite.kind == "latency":
        from magi_train.eval.latency import run_latency

        return run_latency(eval_cfg, gen_cfg, out_dir, dry_run=dry_run)
    if eval_cfg.suite.kind != "quality":
        raise ValueError(f"eval.suite.kind={eval_cfg.suite.kind!r}: use quality or latency")
    if dry_run:
        prompts = load_suite(eval_cfg.suite.prompts, eval_cfg.suite.limit) if eval_cfg.suite.prompts else []
        specs = resolve_models(eval_cfg, gen_cfg)
        for spec in specs:
            if spec.clips_dir:
                _check_clips_dir(spec)
        plan = {"suite": eval_cfg.suite.name, "prompts": len(prompts), "models": [s.name for s in specs]}
        print(plan)
        return plan
    report = evaluate_models(eval_cfg, gen_cfg, out_dir)
    clip_paths, prompts = report.pop("_clip_paths"), report.pop("_prompts")
    if eval_cfg.preference:
        from magi_train.eval.preference import preference_markdown, preference_report, read_judgements

        pref = preference_report(read_judgements(eval_cfg.preference), **bootstrap_settings(eval_cfg))
        report["preference"] = pref
        report["preference_markdown"] = preference_markdown(pref)
    if eval_cfg.pair_sheet:
        from magi_train.eval.preference import write_pair_sheet

        if len(clip_paths) < 2:
            raise ValueError("eval.pair_sheet=true needs at least two models (eval.models)")
        report["pair_sheet"] = str(
            write_pair_sheet(clip_paths, out_dir / "pair_sheet", prompts, seed=eval_cfg.seed)
        )
    paths = write_report(report, out_dir)
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"wrote {paths['json']}, {paths['md']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
    return {"report": str(paths["json"]), "markdown": str(paths["md"]), "plot": str(paths["plot"]) if paths["plot"] else None,
            "models": {m["name"]: m["columns"] for m in report["models"]}}  # fmt: skip
