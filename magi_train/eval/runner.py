"""Recipe `evaluate`: sample a suite's prompts through `magi_train.inference.generate` (or reuse existing clips),
score them (VideoScore2-style dimensions, WER/CER of the speech) and write report.json / report.md / report.png.

Eval has no sampling loop of its own: every clip comes from `generate()` with the `generate.*` settings,
one loaded pipeline per model. A run has two phases so that the generator and the scorers never share a GPU:
first every model's clips are generated (each pipeline released before the next loads), then the scorer and
the ASR load and score. Every clip's scores are cached in `<run_dir>/scores/<model>/<prompt id>.json` (written
atomically, keyed by the clip's size and time and by every scoring setting), so a killed run resumes where it
stopped, and `eval.num_shards` / `eval.shard_index` split the prompts across ranks or Slurm array tasks whose
caches `eval.merge_only=true` turns into one report. `suite=latency` times the stages instead
(magi_train/eval/latency.py). The set-up shared with the training-time callback (magi_train/eval/callback.py)
lives here: `generate_config`, `load_scorers`, `bootstrap_settings` and `prompt_config`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magi_train.config import EvalConfig, GenerateConfig
from magi_train.eval.asr import ASRBackend, load_asr
from magi_train.eval.media import read_audio
from magi_train.eval.provenance import provenance
from magi_train.eval.report import (
    load_compare,
    load_reference,
    paired_differences,
    summarize_model,
    write_report,
)
from magi_train.eval.speech import SpeechScore, prompt_reference, score_transcript
from magi_train.eval.suite import SuitePrompt, suite_prompts
from magi_train.eval.videoscore import DIMENSIONS, VideoScorer, load_scorer
from magi_train.utils.fileio import atomic_write, remove_temps

if TYPE_CHECKING:
    from magi_train.eval.sync import SyncScorer

log = logging.getLogger(__name__)

# <run_dir>/suite_media/: media a benchmark lacks as files (TalkVid-Bench's reference frames)
SUITE_MEDIA = "suite_media"

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
        prompt_template=sc.prompt_template, decoding=sc.decoding, temperature=sc.temperature,
        soft_score=sc.soft_score, seed=sc.seed,
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


def release_generator() -> None:
    """Collect a dropped generation pipeline and give its GPU memory back before the scorers load (they may not
    fit beside a 15B DiT); the caller drops its last reference first."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _complete(path: Path) -> bool:
    """A clip of ours is complete once generate() wrote its JSON (written after the mp4, both atomically)."""
    return path.is_file() and path.with_suffix(".json").is_file()


def produce_clips(
    spec: ModelSpec,
    prompts: list[SuitePrompt],
    gen_cfg: GenerateConfig,
    out_dir: Path,
    suite_seconds: float | None,
    reuse: bool,
    generate_missing: bool = True,
) -> dict[str, dict[str, Any]]:
    """Clip path (or None) and generation info per prompt id for one system; the pipeline is released after."""
    clips: dict[str, dict[str, Any]] = {}
    if spec.clips_dir is not None:
        _check_clips_dir(spec)
        for p in prompts:
            path = Path(spec.clips_dir) / f"{p.id}.mp4"
            clips[p.id] = {"path": str(path) if path.is_file() else None, "generated": False}
        if prompts and not any(c["path"] for c in clips.values()):
            raise ValueError(
                f"eval model {spec.name!r}: none of the suite's clips <id>.mp4 are in {spec.clips_dir}"
            )
        return clips

    model_cfg = replace_config(gen_cfg, spec.generate, f"eval.models.{spec.name}")
    clip_dir = out_dir / "clips" / spec.name
    todo = [p for p in prompts if not (reuse and _complete(clip_dir / f"{p.id}.mp4"))]
    if todo and not generate_missing:
        raise ValueError(
            f"eval.merge_only=true but model {spec.name!r} has no clip for {[p.id for p in todo][:5]} in {clip_dir}: "
            "run the shards (eval.num_shards / eval.shard_index) to completion first"
        )
    pipe = result = None
    try:
        if todo:
            from magi_train.inference.generate import generate, load_pipeline

            pipe = load_pipeline(model_cfg)
        for p in prompts:
            path = clip_dir / f"{p.id}.mp4"
            if p in todo:
                result = generate(prompt_config(model_cfg, p, suite_seconds, path), pipe)
                info = {"sampler": result.info["sampler"], "timings_s": result.info["timings_s"]}
                clips[p.id] = {"path": str(path), "generated": True, **info}
            else:
                info = json.loads(path.with_suffix(".json").read_text())
                clips[p.id] = {"path": str(path), "generated": False, "sampler": info.get("sampler"),
                               "timings_s": info.get("timings_s")}  # fmt: skip
    finally:
        pipe = result = None  # the last references: the pipeline's modules can be collected now
        release_generator()
    return clips


def score_clip(
    prompt: SuitePrompt,
    path: str,
    scorer: VideoScorer | None,
    asr: ASRBackend | None,
    normalizer: str,
    sync: SyncScorer | None = None,
    fold_chinese: bool = False,
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
            speech = score_transcript(
                prompt.id, reference, record["transcript"], language, normalizer, fold_chinese
            )
            if speech is not None:
                record["speech"] = speech.as_dict()
            else:
                record["speech_skipped"] = "the reference is empty after normalisation"
    return record, speech


def _sync_scorer(eval_cfg: EvalConfig) -> SyncScorer | None:
    """SyncNet lip sync (LSE-D / LSE-C) when `eval.sync_weights` is set."""
    if not eval_cfg.sync_weights:
        return None
    import torch

    from magi_train.eval.sync import SyncScorer

    device = "cuda" if eval_cfg.scorer.device == "auto" and torch.cuda.is_available() else "cpu"
    return SyncScorer.from_pretrained(eval_cfg.sync_weights, device=device, vshift=eval_cfg.sync_vshift)


# ---------------------------------------------------------------------------------------------------------
# Per-clip score cache
# ---------------------------------------------------------------------------------------------------------

CACHE_VERSION = 2  # bump when a score's meaning changes


def scoring_key(eval_cfg: EvalConfig) -> str:
    """Everything a cached score depends on besides the clip and its prompt: scorer, ASR, normaliser, lip sync."""
    settings = {
        "version": CACHE_VERSION,
        "scorer": dataclasses.asdict(eval_cfg.scorer),
        "asr": dataclasses.asdict(eval_cfg.asr),
        "sync": [eval_cfg.sync_weights, eval_cfg.sync_vshift],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clip_stamp(path: str, prompt: SuitePrompt) -> dict[str, Any]:
    st = Path(path).stat()
    return {
        "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "prompt": hashlib.sha256(prompt.prompt.encode()).hexdigest()[:16],
    }  # fmt: skip


class ScoreCache:
    """`<run_dir>/scores/<model>/<prompt id>.json`: one clip's record, valid while key and clip stamp match."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key

    def path(self, model: str, prompt_id: str) -> Path:
        return self.root / model / f"{prompt_id}.json"

    def load(self, model: str, prompt: SuitePrompt, clip: str) -> dict[str, Any] | None:
        file = self.path(model, prompt.id)
        if not file.is_file():
            return None
        try:
            entry = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # never half-written (atomic), but a hand-edited file is simply recomputed
        if entry.get("key") != self.key or entry.get("clip") != _clip_stamp(clip, prompt):
            return None
        return entry["record"]

    def store(self, model: str, prompt: SuitePrompt, clip: str, record: dict[str, Any]) -> None:
        entry = {"key": self.key, "clip": _clip_stamp(clip, prompt), "record": record}
        remove_temps(
            self.path(model, prompt.id)
        )  # a killed earlier writer's leftover (one shard owns a clip)
        atomic_write(
            self.path(model, prompt.id), json.dumps(entry, indent=1, ensure_ascii=False, default=str)
        )


class LazyScorers:
    """The scorer, ASR and SyncNet, loaded on first use (after every generator is released); a run whose clips
    are all cached loads none of them."""

    def __init__(self, eval_cfg: EvalConfig):
        self.eval_cfg, self.loaded = eval_cfg, False
        self.scorer: VideoScorer | None = None
        self.asr: ASRBackend | None = None
        self.sync: SyncScorer | None = None

    def get(self) -> LazyScorers:
        if not self.loaded:
            self.scorer, self.asr = load_scorers(self.eval_cfg)
            self.sync = _sync_scorer(self.eval_cfg)
            self.loaded = True
        return self


def shard_prompts(prompts: list[SuitePrompt], num_shards: int, shard_index: int) -> list[SuitePrompt]:
    """This task's prompts: every `num_shards`-th one starting at `shard_index` (the same split for every model)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"eval.shard_index must be in [0, eval.num_shards) and num_shards >= 1, got {shard_index} / "
            f"{num_shards} (for a Slurm array: eval.shard_index='${{oc.env:SLURM_ARRAY_TASK_ID}}')"
        )
    return prompts[shard_index::num_shards]


def evaluate_models(eval_cfg: EvalConfig, gen_cfg: GenerateConfig, out_dir: Path) -> dict[str, Any]:
    """Generate/reuse, score and summarise every model of the run; returns the report dict (not yet written).

    With `eval.num_shards > 1` (and not `merge_only`) only this shard's prompts are generated and scored and the
    dict holds no summaries (`shard` says which part was done).
    """
    suite_cfg = eval_cfg.suite
    prompts = suite_prompts(suite_cfg, suite_cfg.limit, out_dir / SUITE_MEDIA)
    specs = resolve_models(eval_cfg, gen_cfg)
    sharded = eval_cfg.num_shards > 1 and not eval_cfg.merge_only
    mine = shard_prompts(prompts, eval_cfg.num_shards, eval_cfg.shard_index) if sharded else prompts
    bootstrap = bootstrap_settings(eval_cfg)
    # phase 1: clips, one generator at a time, each released before the next (and before any scorer) loads
    clips_by_model: dict[str, dict[str, dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for spec in specs:
        start = time.perf_counter()
        clips_by_model[spec.name] = produce_clips(
            spec,
            mine,
            gen_cfg,
            out_dir,
            suite_cfg.seconds,
            eval_cfg.reuse,
            generate_missing=not eval_cfg.merge_only,
        )
        seconds[spec.name] = time.perf_counter() - start
    # phase 2: scores, from the cache where valid
    cache = ScoreCache(out_dir / "scores", scoring_key(eval_cfg))
    scorers = LazyScorers(eval_cfg)
    all_records: dict[str, list[dict[str, Any]]] = {}
    resumed = computed = 0
    for spec in specs:
        start = time.perf_counter()
        records = []
        for p in mine:
            clip = clips_by_model[spec.name][p.id]
            if clip["path"] is None:
                records.append({"id": p.id, "missing": True})
                continue
            record = cache.load(spec.name, p, clip["path"])
            if record is None:
                if eval_cfg.merge_only:
                    raise ValueError(
                        f"eval.merge_only=true but {spec.name}/{p.id} has no valid cached score in "
                        f"{cache.path(spec.name, p.id)}: run its shard (with the same scoring settings) first"
                    )
                s = scorers.get()
                record, _ = score_clip(
                    p,
                    clip["path"],
                    s.scorer,
                    s.asr,
                    eval_cfg.asr.normalizer,
                    s.sync,
                    eval_cfg.asr.fold_chinese,
                )
                record["sampler"] = clip.get("sampler")
                record["timings_s"] = clip.get("timings_s")
                cache.store(spec.name, p, clip["path"], record)
                computed += 1
            else:
                resumed += 1
            records.append(record)
        all_records[spec.name] = records
        seconds[spec.name] += time.perf_counter() - start
        log.info("scored %s: %d prompts in %.1f s", spec.name, len(mine), seconds[spec.name])
    report: dict[str, Any] = {
        "suite": {
            "name": suite_cfg.name,
            "format": suite_cfg.format,
            "prompts": suite_cfg.prompts,
            "root": suite_cfg.root,
            "subsets": list(suite_cfg.subsets),
            "count": len(prompts),
        },
        "scorer": eval_cfg.scorer.backend,
        "scorer_settings": dataclasses.asdict(eval_cfg.scorer),
        "asr": eval_cfg.asr.backend,
        "normalizer": eval_cfg.asr.normalizer,
        "fold_chinese": eval_cfg.asr.fold_chinese,
        "confidence": eval_cfg.confidence,
        "bootstrap_resamples": eval_cfg.bootstrap_resamples,
        "cache": {"scores_reused": resumed, "scores_computed": computed, "key": cache.key},
    }
    if sharded:
        report["shard"] = {
            "index": eval_cfg.shard_index,
            "count": eval_cfg.num_shards,
            "prompts": [p.id for p in mine],
        }
        return report
    models = []
    for spec in specs:
        records = all_records[spec.name]
        speech = [SpeechScore.from_dict(r["speech"]) for r in records if r.get("speech")]
        summary = summarize_model(spec.name, records, speech, bootstrap)
        summary["source"] = {"clips_dir": spec.clips_dir, "generate": spec.generate}
        summary["seconds"] = round(seconds[spec.name], 2)
        models.append(summary)
    report.update(
        models=models,
        paired=paired_differences(models, bootstrap),
        reference=load_reference(eval_cfg.reference),
        compare=load_compare(list(eval_cfg.compare)),
        provenance=provenance(eval_cfg, gen_cfg, specs),
    )
    report["_clip_paths"] = {
        m["name"]: {r["id"]: r["path"] for r in m["clips"] if r.get("path")} for m in models
    }
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
        prompts = suite_prompts(eval_cfg.suite, eval_cfg.suite.limit, out_dir / SUITE_MEDIA)
        specs = resolve_models(eval_cfg, gen_cfg)
        for spec in specs:
            if spec.clips_dir:
                _check_clips_dir(spec)
        plan = {"suite": eval_cfg.suite.name, "prompts": len(prompts), "models": [s.name for s in specs]}
        if eval_cfg.num_shards > 1 and not eval_cfg.merge_only:
            plan["shard_prompts"] = len(shard_prompts(prompts, eval_cfg.num_shards, eval_cfg.shard_index))
        print(plan)
        return plan
    report = evaluate_models(eval_cfg, gen_cfg, out_dir)
    if "shard" in report:
        shard = report["shard"]
        marker = out_dir / "shards" / f"{shard['index']:04d}-of-{shard['count']:04d}.json"
        atomic_write(marker, json.dumps(report, indent=2, default=str))
        print(f"shard {shard['index']} of {shard['count']}: {len(shard['prompts'])} prompts done ({marker}); "
              "run with eval.merge_only=true once every shard is done")  # fmt: skip
        return {"shard": str(marker), **shard}
    clip_paths, prompts = report.pop("_clip_paths"), report.pop("_prompts")
    if eval_cfg.preference:
        from magi_train.eval.preference import preference_markdown, preference_report, read_judgements

        pref = preference_report(
            read_judgements(eval_cfg.preference), bt_alpha=eval_cfg.bt_alpha,
            resample=eval_cfg.preference_resample, **bootstrap_settings(eval_cfg),
        )  # fmt: skip
        report["preference"] = pref
        report["preference_markdown"] = preference_markdown(pref)
    if eval_cfg.pair_sheet:
        from magi_train.eval.preference import rater_names, write_pair_sheet

        if len(clip_paths) < 2:
            raise ValueError("eval.pair_sheet=true needs at least two models (eval.models)")
        report["pair_sheet"] = str(
            write_pair_sheet(
                clip_paths, out_dir / "pair_sheet", prompts, seed=eval_cfg.seed,
                raters=rater_names(eval_cfg.pair_sheet_raters),
            )
        )  # fmt: skip
    paths = write_report(report, out_dir)
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"wrote {paths['json']}, {paths['md']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
    return {"report": str(paths["json"]), "markdown": str(paths["md"]), "plot": str(paths["plot"]) if paths["plot"] else None,
            "models": {m["name"]: m["columns"] for m in report["models"]}}  # fmt: skip
