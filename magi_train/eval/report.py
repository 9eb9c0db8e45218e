"""Evaluation reports a researcher can paste into a paper: `report.json` (every number, per clip and aggregated),
`report.md` and `report.png`.

report.md holds one row per model in the paper's columns (Visual Quality, Text Alignment, Physical Consistency,
WER), each `mean [95% CI]` with its n, the paper's published row(s) for reference (magi_train/eval/reference/),
the units of every error rate, VideoScore2 parse failures per dimension, paired differences between models on
the same prompts (what margins of 0.04-0.11 need), WER/CER per language and per unit, notes and provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from magi_train.eval.speech import RATE_NAMES, SpeechScore, aggregate
from magi_train.eval.stats import Estimate, mean_ci, paired_difference
from magi_train.eval.videoscore import DIMENSIONS, PAPER_COLUMNS
from magi_train.utils.fileio import atomic_file, atomic_write

COLUMNS = {**PAPER_COLUMNS, "wer": "WER"}
SYNC_COLUMNS = {"lse_d": "LSE-D", "lse_c": "LSE-C"}  # only when eval.sync_weights is set
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def _columns(models: list[dict[str, Any]]) -> dict[str, str]:
    extra = {k: v for k, v in SYNC_COLUMNS.items() if any(k in m["columns"] for m in models)}
    return {**COLUMNS, **extra}


def summarize_model(
    name: str, clips: list[dict[str, Any]], speech: list[SpeechScore], bootstrap: dict[str, Any]
) -> dict[str, Any]:
    """Means (bootstrap over clips) of the three dimensions and the corpus-level WER/CER of one model, with
    the number of clips behind each and the scorer's parse failures per dimension."""
    columns: dict[str, Any] = {}
    scored = [c for c in clips if c.get("scores")]
    for dim in DIMENSIONS:
        columns[dim] = mean_ci([c["scores"].get(dim) for c in scored], **bootstrap).as_dict()
    wer = aggregate(speech, **bootstrap)
    columns["wer"] = {
        **wer["overall"]["rate"],
        "unit": wer["overall"]["unit"],
        "unit_label": wer["overall"]["unit_label"],
    }
    if any(c.get("sync") for c in clips):  # SyncNet lip sync (eval.sync_weights)
        for key in ("lse_d", "lse_c"):
            columns[key] = mean_ci([c["sync"][key] for c in clips if c.get("sync")], **bootstrap).as_dict()
    unparsed = {
        d: sum(1 for c in scored if d in c["scorer_output"]["details"].get("unparsed", []))
        for d in DIMENSIONS
    }
    unaligned = {
        d: sum(1 for c in scored if d in c["scorer_output"]["details"].get("unaligned", []))
        for d in DIMENSIONS
    }
    return {
        "name": name,
        "columns": columns,
        "wer": wer,
        "clips": clips,
        "counts": {
            "clips": len(clips),
            "scored": len(scored),
            "unparsed": unparsed,  # the scorer answered but the dimension's score could not be read (not in means)
            "unaligned": unaligned,  # read, but the digit's token was not found: the hard score is used
            "speech_scored": len(speech),
            "speech_skipped": sum(1 for c in clips if c.get("speech_skipped")),
        },
    }


def paired_differences(models: list[dict[str, Any]], bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    """For every pair of models (the first listed minus each later one): per VideoScore2 dimension the mean
    difference on the prompts both scored, and the corpus WER difference on the prompts both transcribed, each
    with a paired bootstrap interval (prompts resampled jointly)."""
    rows = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            clips_a = {c["id"]: c for c in a["clips"] if not c.get("missing")}
            clips_b = {c["id"]: c for c in b["clips"] if not c.get("missing")}
            common = [k for k in clips_a if k in clips_b]
            row: dict[str, Any] = {"model": a["name"], "baseline": b["name"], "columns": {}}
            for dim in DIMENSIONS:
                ids = [
                    k for k in common
                    if (clips_a[k].get("scores") or {}).get(dim) is not None
                    and (clips_b[k].get("scores") or {}).get(dim) is not None
                ]  # fmt: skip
                row["columns"][dim] = paired_difference(
                    [clips_a[k]["scores"][dim] for k in ids],
                    [clips_b[k]["scores"][dim] for k in ids],
                    **bootstrap,
                ).as_dict()
            ids = [k for k in common if clips_a[k].get("speech") and clips_b[k].get("speech")]
            sa, sb = [clips_a[k]["speech"] for k in ids], [clips_b[k]["speech"] for k in ids]
            row["columns"]["wer"] = paired_difference(
                [s["errors"] for s in sa], [s["errors"] for s in sb], **bootstrap,
                denominators=([s["reference_units"] for s in sa], [s["reference_units"] for s in sb]),
            ).as_dict()  # fmt: skip
            rows.append(row)
    return rows


def load_reference(name: str | None) -> dict[str, Any] | None:
    """The published numbers to show beside ours: `magi_train/eval/reference/<name>.json` or a path to such a file."""
    if not name:
        return None
    path = Path(name)
    if not path.is_file():
        path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise ValueError(
            f"eval.reference={name!r}: no such file; use one of {known}, a path to a JSON file, or null"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if "rows" not in data or "source" not in data:
        raise ValueError(
            f"reference file {str(path)!r} needs 'rows' and 'source' (where the numbers come from)"
        )
    return data


def _fmt(est: dict[str, Any] | None, key: str, with_n: bool = True) -> str:
    if est is None:
        return "n/a"
    e = Estimate(est["value"], est["low"], est["high"], est["n"])
    text = e.format(100, 2, "%") if key == "wer" else e.format(1, 2)
    return f"{text} (n={e.n})" if with_n and e.value is not None else text


def _row(model: dict[str, Any], columns: dict[str, str]) -> list[str]:
    return [model["name"]] + [_fmt(model["columns"].get(key), key) for key in columns]


def _scorer_line(report: dict[str, Any]) -> str:
    if report["scorer"] == "proxy":
        return ("**Video scores: PROXY, not VideoScore2** (sharpness, flicker and speech-presence statistics on the "
                "1-5 scale); use `eval.scorer.backend=videoscore2` for numbers comparable to the paper.")  # fmt: skip
    if report["scorer"] == "videoscore2":
        s = report.get("scorer_settings", {})
        return (
            f"Video scores: VideoScore2 (`{s.get('path')}`), prompt template `{s.get('prompt_template')}`, "
            f"decoding `{s.get('decoding')}` (T={s.get('temperature')}), soft score `{s.get('soft_score')}`, "
            f"{s.get('fps')} fps, at most {s.get('max_frames')} frames of at most {s.get('max_pixels')} pixels."
        )
    return f"Video scores: `{report['scorer']}`."


def report_markdown(report: dict[str, Any]) -> str:
    """The paper's table and everything needed to read it (see the module docstring)."""
    conf = round(report["confidence"] * 100)
    models = report["models"] + report.get("compare", [])
    columns = _columns(models)
    units = sorted({m["columns"]["wer"].get("unit_label") or "none" for m in report["models"]})
    lines = [
        f"# Evaluation: suite `{report['suite']['name']}` ({report['suite']['count']} prompts)",
        "",
        _scorer_line(report),
        "",
        f"Speech: ASR `{report['asr']}`, normaliser `{report['normalizer']}`"
        + (", traditional Chinese folded to simplified" if report.get("fold_chinese") else "")
        + ". WER is corpus-level (total edits / total reference units) over every transcribed clip; its units: "
        + "; ".join(units)
        + " (words for space-delimited languages, characters for zh / yue / ja / ko; per-unit rows below).",
        "",
        f"Every value is the mean over clips with its {conf}% percentile-bootstrap interval "
        f"({report['bootstrap_resamples']} resamples) and n, the number of clips behind it.",
        "",
        "| Model | " + " | ".join(columns.values()) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model in models:
        lines.append("| " + " | ".join(_row(model, columns)) + " |")
    reference = report.get("reference")
    if reference:
        for ref in reference["rows"]:
            cells = [f"{ref[k] * 100:.2f}%" if k == "wer" else f"{ref[k]:.2f}" if ref.get(k) is not None else "—"
                     for k in columns]  # fmt: skip
            lines.append(f"| {ref['model']} (paper) | " + " | ".join(cells) + " |")
        lines += ["", f"Paper rows: {reference['source']}."] + [f"- {n}" for n in reference.get("notes", [])]
    if report.get("paired"):
        lines += [
            "",
            f"## Paired differences (same prompts, {conf}% paired bootstrap)",
            "",
            "| Model − baseline | " + " | ".join(COLUMNS[k] for k in (*DIMENSIONS, "wer")) + " |",
            "|---" * 5 + "|",
        ]
        for row in report["paired"]:
            cells = []
            for key in (*DIMENSIONS, "wer"):
                est = row["columns"][key]
                e = Estimate(est["value"], est["low"], est["high"], est["n"])
                text = e.format(100, 2, " pp") if key == "wer" else e.format(1, 3)
                cells.append(f"{text} (n={e.n})" if e.value is not None else "n/a")
            lines.append(f"| {row['model']} − {row['baseline']} | " + " | ".join(cells) + " |")
        lines += ["", "An interval that excludes 0 separates the two models on these prompts."]
    lines += [
        "",
        "## Error rates per unit and per language",
        "",
        "| Model | Group | Rate | Unit | Clips | Reference units | Value |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in report["models"] + report.get("compare", []):
        groups = [(u, e) for u, e in model["wer"].get("by_unit", {}).items()]
        groups += [(lang, e) for lang, e in model["wer"]["by_language"].items()]
        for group, entry in groups:
            unit = entry["unit"]
            rate_name = RATE_NAMES.get(unit, "error rate")
            value = Estimate(**entry["rate"]).format(100, 2, "%")
            lines.append(f"| {model['name']} | {group} | {rate_name} | {entry.get('unit_label', unit)} | "
                         f"{entry['clips']} | {entry['units']} | {value} |")  # fmt: skip
    if report["scorer"] == "videoscore2":
        lines += ["", "## VideoScore2 outputs", "", "| Model | Clips scored | Unparsed (per dimension) | Hard score used |",
                  "|---|---|---|---|"]  # fmt: skip
        for model in report["models"]:
            c = model["counts"]
            unparsed = ", ".join(f"{d} {c['unparsed'][d]}" for d in DIMENSIONS)
            unaligned = ", ".join(f"{d} {c['unaligned'][d]}" for d in DIMENSIONS)
            lines.append(f"| {model['name']} | {c['scored']} | {unparsed} | {unaligned} |")
        lines += [
            "",
            "Unparsed dimensions are left out of that dimension's mean (its n says how many remain).",
        ]
    notes = []
    for model in report["models"]:
        c = model["counts"]
        if c["speech_skipped"]:
            notes.append(f"{model['name']}: {c['speech_skipped']} clip(s) with dialogue were not scored for speech "
                         f"(see `speech_skipped` in report.json).")  # fmt: skip
        missing = [clip["id"] for clip in model["clips"] if clip.get("missing")]
        if missing:
            notes.append(f"{model['name']}: no clip for {', '.join(missing)}.")
        if model["wer"].get("unknown_languages"):
            notes.append(f"{model['name']}: language names not in the table, scored by their script: "
                         f"{', '.join(model['wer']['unknown_languages'])}.")  # fmt: skip
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if report.get("preference_markdown"):
        lines += ["", "## Pairwise preference", "", report["preference_markdown"]]
    prov = report.get("provenance")
    if prov:
        code = prov["code"]
        lines += [
            "",
            "## Provenance",
            "",
            f"- code: commit `{code.get('commit')}`"
            + (" (work tree with changes)" if code.get("dirty") else ""),
            f"- python {prov['python']} on {prov['platform']}; "
            + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v),
            f"- checksums ({prov['checksum_kind']}):",
        ]
        for label, entry in _checksum_lines(prov):
            lines.append(f"  - {label}: {entry}")
    return "\n".join(lines) + "\n"


def _checksum_lines(prov: dict[str, Any]) -> list[tuple[str, str]]:
    def short(c: dict[str, Any] | None) -> str:
        if c is None:
            return "—"
        if c.get("missing"):
            return f"`{c['path']}` (missing)"
        digest = c.get("sha256") or c.get("sha256_head_tail") or c.get("digest")
        return f"`{c['path']}` {digest[:16]}"

    out = []
    for model, entries in prov["models"].items():
        for key, c in entries.items():
            out.append((f"{model} {key}", short(c) if isinstance(c, dict) else f"`{c}`"))
    for key in ("codecs", "scorer", "asr", "sync"):
        if prov.get(key):
            out.append((key, short(prov[key])))
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> Path | None:
    """Bars per model for each column with the bootstrap intervals as error bars, the paper's rows as grey bars
    (None without matplotlib). A proxy-scored plot says so in its title and axis labels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = report["models"] + report.get("compare", [])
    refs = (report.get("reference") or {}).get("rows", [])
    columns = _columns(models)
    proxy = report["scorer"] == "proxy"
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.8))
    for ax, (key, title) in zip(axes, columns.items(), strict=True):
        names, values, low, high, colours = [], [], [], [], []
        scale = 100.0 if key == "wer" else 1.0
        for m in models:
            est = Estimate(**{k: m["columns"].get(key, {}).get(k) for k in ("value", "low", "high")}, n=0)
            names.append(m["name"])
            v = (est.value or 0.0) * scale
            values.append(v)
            low.append(v - (est.low * scale if est.low is not None else v))
            high.append((est.high * scale if est.high is not None else v) - v)
            colours.append("tab:orange" if proxy and key in PAPER_COLUMNS else "tab:blue")
        for r in refs:
            if r.get(key) is not None:
                names.append(f"{r['model']} (paper)")
                values.append(r[key] * scale)
                low.append(0.0)
                high.append(0.0)
                colours.append("lightgrey")
        ax.bar(range(len(names)), values, yerr=[low, high], capsize=4, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        label = title + (" (%)" if key == "wer" else "")
        if proxy and key in PAPER_COLUMNS:
            label += "\nPROXY, not VideoScore2"
        ax.set_title(label, fontsize=9)
        if key in PAPER_COLUMNS:
            ax.set_ylim(1, 5)
    scorer = "PROXY scores (not VideoScore2)" if proxy else f"scorer {report['scorer']}"
    fig.suptitle(
        f"suite {report['suite']['name']}, {scorer}: mean and {round(report['confidence'] * 100)}% bootstrap interval"
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
        "json": atomic_write(
            out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str)
        ),
        "md": atomic_write(out_dir / "report.md", report_markdown(report)),
    }
    paths["plot"] = plot_report(report, out_dir / "report.png")
    return paths
