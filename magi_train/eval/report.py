"""Eval reports: per-model summaries with 95% bootstrap intervals, `report.json`, `report.md` (one row per model,
the paper's columns: Visual Quality, Text Alignment, Physical Consistency, WER) and a comparison plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from magi_train.eval.speech import SpeechScore, aggregate
from magi_train.eval.stats import Estimate, mean_ci
from magi_train.eval.videoscore import DIMENSIONS, PAPER_COLUMNS
from magi_train.utils.fileio import atomic_file, atomic_write

COLUMNS = {**PAPER_COLUMNS, "wer": "WER"}
SYNC_COLUMNS = {"lse_d": "LSE-D", "lse_c": "LSE-C"}  # only when eval.sync_weights is set


def _columns(models: list[dict[str, Any]]) -> dict[str, str]:
    extra = {k: v for k, v in SYNC_COLUMNS.items() if any(k in m["columns"] for m in models)}
    return {**COLUMNS, **extra}


def summarize_model(
    name: str, clips: list[dict[str, Any]], speech: list[SpeechScore], bootstrap: dict[str, Any]
) -> dict[str, Any]:
    """Means (bootstrap over clips) of the three dimensions and the corpus-level WER/CER of one model."""
    columns: dict[str, Any] = {}
    for dim in DIMENSIONS:
        columns[dim] = mean_ci(
            [c["scores"].get(dim) for c in clips if c.get("scores")], **bootstrap
        ).as_dict()
    wer = aggregate(speech, **bootstrap)
    columns["wer"] = wer["overall"]["rate"]
    if any(c.get("sync") for c in clips):  # SyncNet lip sync (eval.sync_weights)
        for key in ("lse_d", "lse_c"):
            columns[key] = mean_ci([c["sync"][key] for c in clips if c.get("sync")], **bootstrap).as_dict()
    return {
        "name": name,
        "columns": columns,
        "wer": wer,
        "clips": clips,
        "counts": {
            "clips": len(clips),
            "scored": sum(1 for c in clips if c.get("scores")),
            "speech_scored": len(speech),
            "speech_skipped": sum(1 for c in clips if c.get("speech_skipped")),
        },
    }


def _row(model: dict[str, Any], columns: dict[str, str]) -> list[str]:
    cells = [model["name"]]
    for key in columns:
        if key not in model["columns"]:
            cells.append("n/a")
            continue
        est = Estimate(**model["columns"][key])
        cells.append(est.format(100, 2, "%") if key == "wer" else est.format(1, 2))
    return cells


def report_markdown(report: dict[str, Any]) -> str:
    """The paper's table (mean [95% CI]), one row per model incl. compared runs, then WER per language."""
    conf = round(report["confidence"] * 100)
    columns = _columns(report["models"] + report.get("compare", []))
    lines = [
        f"# Evaluation: suite `{report['suite']['name']}`",
        "",
        f"Scorer: `{report['scorer']}`; ASR: `{report['asr']}` (normaliser `{report['normalizer']}`); "
        f"every value is the mean over clips with its {conf}% percentile-bootstrap interval "
        f"({report['bootstrap_resamples']} resamples). WER is corpus-level (total edits / total reference "
        "units): words for space-delimited languages, characters for zh, yue, ja and ko.",
        "",
        "| Model | " + " | ".join(columns.values()) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model in report["models"] + report.get("compare", []):
        lines.append("| " + " | ".join(_row(model, columns)) + " |")
    lines += [
        "",
        "## WER / CER per language",
        "",
        "| Model | Language | Unit | Clips | Rate |",
        "|---|---|---|---|---|",
    ]
    for model in report["models"] + report.get("compare", []):
        for lang, entry in model["wer"]["by_language"].items():
            rate = Estimate(**entry["rate"]).format(100, 2, "%")
            lines.append(f"| {model['name']} | {lang} | {entry['unit']} | {entry['clips']} | {rate} |")
    notes = []
    if report["scorer"] == "proxy":
        notes.append(
            "The video scores come from the `proxy` scorer (sharpness, flicker and speech-presence statistics "
            "on the 1-5 scale), not VideoScore2: use `eval.scorer.backend=videoscore2` for the paper's numbers."
        )
    for model in report["models"]:
        c = model["counts"]
        if c["speech_skipped"]:
            notes.append(
                f"{model['name']}: {c['speech_skipped']} clip(s) with dialogue were not transcribed "
                f"(language not supported by the `{report['asr']}` ASR backend)."
            )
        missing = [clip["id"] for clip in model["clips"] if clip.get("missing")]
        if missing:
            notes.append(f"{model['name']}: no clip for {', '.join(missing)}.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if report.get("preference_markdown"):
        lines += ["", "## Pairwise preference", "", report["preference_markdown"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> Path | None:
    """Bars per model for each column with the bootstrap intervals as error bars (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = report["models"] + report.get("compare", [])
    columns = _columns(models)
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.6))
    for ax, (key, title) in zip(axes, columns.items(), strict=True):
        names, values, low, high = [], [], [], []
        scale = 100.0 if key == "wer" else 1.0
        for m in models:
            est = Estimate(**m["columns"].get(key, {"value": None, "low": None, "high": None, "n": 0}))
            names.append(m["name"])
            v = (est.value or 0.0) * scale
            values.append(v)
            low.append(v - (est.low * scale if est.low is not None else v))
            high.append((est.high * scale if est.high is not None else v) - v)
        ax.bar(range(len(names)), values, yerr=[low, high], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title + (" (%)" if key == "wer" else ""))
        if key in PAPER_COLUMNS:
            ax.set_ylim(1, 5)
    fig.suptitle(
        f"suite {report['suite']['name']}: mean and {round(report['confidence'] * 100)}% bootstrap interval"
    )
    fig.tight_layout()
    try:
        fmt = Path(path).suffix.lstrip(".") or "png"  # the temporary file's suffix is not the image format
        return atomic_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    finally:
        plt.close(fig)


def load_compare(paths: list[str]) -> list[dict[str, Any]]:
    """Model rows of other runs' report.json files (for the comparison table and plot)."""
    rows = []
    for p in paths:
        file = Path(p)
        if file.is_dir():
            file = file / "report.json"
        if not file.is_file():
            raise ValueError(f"eval.compare entry {p!r}: no report.json there")
        other = json.loads(file.read_text(encoding="utf-8"))
        for model in other.get("models", []):
            rows.append({**model, "name": f"{model['name']} ({file.parent.name})", "clips": []})
    return rows


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path | None]:
    """report.json, report.md and report.png (plot) in `out_dir`."""
    out_dir = Path(out_dir)
    paths: dict[str, Path | None] = {
        "json": atomic_write(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False)),
        "md": atomic_write(out_dir / "report.md", report_markdown(report)),
    }
    paths["plot"] = plot_report(report, out_dir / "report.png")
    return paths
