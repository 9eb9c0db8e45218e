"""Pairwise human preference studies: win / tie / loss rates with bootstrap intervals, Bradley-Terry ranking,
and the blind side-by-side pair sheet raters use (the paper's 2,000-comparison study, spec §9).

Judgements are rows `(system_a, system_b, winner)` with winner = one of the two systems or `tie`. The
Bradley-Terry fit is choix's `ilsr_pairwise_dense` (maximum likelihood by iterative Luce spectral ranking) on
a win matrix in which a tie counts half a win for each side, the usual way to fold ties into Bradley-Terry.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magi_train.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, Estimate, bootstrap
from magi_train.utils.fileio import atomic_write

TIE = "tie"


@dataclass(frozen=True)
class Judgement:
    system_a: str
    system_b: str
    winner: str  # system_a, system_b or "tie"


def read_judgements(path: str | Path) -> list[Judgement]:
    """Read a CSV with columns `system_a, system_b, winner` (winner: a system name, `A`, `B` or `tie`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"judgement CSV {str(path)!r} not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"system_a", "system_b", "winner"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks columns {sorted(missing)}; expected a header 'system_a,system_b,winner' "
                "with winner = one of the two systems, A, B or tie"
            )
        out = []
        for line, row in enumerate(reader, start=2):
            a, b, w = row["system_a"].strip(), row["system_b"].strip(), row["winner"].strip()
            w = {"a": a, "b": b, "tie": TIE, "draw": TIE, "=": TIE}.get(w.lower(), w)
            if a == b or w not in (a, b, TIE):
                raise ValueError(
                    f"{str(path)!r} line {line}: winner {row['winner']!r} is not {a!r}, {b!r}, A, B or tie "
                    "(or both sides name the same system)"
                )
            out.append(Judgement(a, b, w))
    if not out:
        raise ValueError(f"judgement CSV {str(path)!r} has no rows")
    return out


def _pair_outcomes(judgements: Sequence[Judgement], first: str, second: str) -> np.ndarray:
    """Outcomes of `first` against `second`: +1 win, 0 tie, -1 loss, whichever side each was shown on."""
    out = []
    for j in judgements:
        if {j.system_a, j.system_b} != {first, second}:
            continue
        out.append(0 if j.winner == TIE else (1 if j.winner == first else -1))
    return np.asarray(out, dtype=np.float64)


def _systems(judgements: Sequence[Judgement]) -> list[str]:
    seen: dict[str, None] = {}
    for j in judgements:
        seen.setdefault(j.system_a)
        seen.setdefault(j.system_b)
    return list(seen)


def pairwise_rates(
    judgements: Sequence[Judgement],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    systems: Sequence[str] | None = None,
) -> list[dict]:
    """Per pair of systems, the first system's win / tie / loss rates against the second.

    Systems are ordered as `systems` lists them (e.g. ours first), else by first appearance. Each rate is an
    Estimate with a percentile-bootstrap interval over the pair's judgements.
    """
    found = _systems(judgements)
    if systems is not None:
        missing = set(found) - set(systems)
        if missing:
            raise ValueError(f"systems {sorted(missing)} appear in the judgements but not in {list(systems)}")
    systems = list(systems) if systems is not None else found
    rows = []
    for i, first in enumerate(systems):
        for second in systems[i + 1 :]:
            outcomes = _pair_outcomes(judgements, first, second)
            if outcomes.size == 0:
                continue
            row: dict = {"system": first, "opponent": second, "n": int(outcomes.size)}
            for name, value in (("win", 1.0), ("tie", 0.0), ("loss", -1.0)):
                est = bootstrap(
                    lambda x, axis=-1, v=value: np.mean(x == v, axis=axis), [outcomes],
                    n_resamples=n_resamples, confidence=confidence, seed=seed,
                )  # fmt: skip
                row[name] = est.as_dict()
            rows.append(row)
    return rows


def win_matrix(judgements: Sequence[Judgement], systems: Sequence[str]) -> np.ndarray:
    """`m[i, j]` = wins of system i over system j, a tie counting 1/2 for each."""
    index = {s: k for k, s in enumerate(systems)}
    m = np.zeros((len(systems), len(systems)))
    for j in judgements:
        a, b = index[j.system_a], index[j.system_b]
        if j.winner == TIE:
            m[a, b] += 0.5
            m[b, a] += 0.5
        elif j.winner == j.system_a:
            m[a, b] += 1
        else:
            m[b, a] += 1
    return m


def bradley_terry(
    judgements: Sequence[Judgement],
    n_resamples: int = 200,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    alpha: float = 0.0,
) -> list[dict]:
    """Bradley-Terry log-strengths (mean zero) per system, best first, each with a bootstrap interval.

    `alpha` > 0 regularises (needed when a system never loses or never wins: its ML strength is infinite).
    Intervals come from refitting on `n_resamples` resamplings of the judgements.
    """
    import choix

    systems = _systems(judgements)
    if len(systems) < 2:
        raise ValueError(f"Bradley-Terry needs at least 2 systems, got {systems}")

    def fit(rows: Sequence[Judgement]) -> np.ndarray:
        m = win_matrix(rows, systems)
        # Every system needs a win and a loss for a finite ML estimate; without alpha, regularise lightly.
        a = alpha if alpha > 0 or (m.sum(1) > 0).all() and (m.sum(0) > 0).all() else 1e-3
        params = choix.ilsr_pairwise_dense(m, alpha=a, max_iter=1000)
        return params - params.mean()

    point = fit(judgements)
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [
            fit([judgements[k] for k in rng.integers(0, len(judgements), len(judgements))])
            for _ in range(n_resamples)
        ]
    )
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    order = np.argsort(-point)
    return [
        {
            "rank": r + 1, "system": systems[k],
            "strength": Estimate(float(point[k]), float(lo[k]), float(hi[k]), len(judgements)).as_dict(),
        }
        for r, k in enumerate(order)
    ]  # fmt: skip


def preference_report(judgements: Sequence[Judgement], **kwargs) -> dict:
    """Pairwise rates and, with more than two systems, the Bradley-Terry ranking."""
    report: dict = {
        "systems": _systems(judgements),
        "n": len(judgements),
        "pairs": pairwise_rates(judgements, **kwargs),
    }
    if len(report["systems"]) > 2:
        report["bradley_terry"] = bradley_terry(judgements, seed=kwargs.get("seed", 0))
    return report


def preference_markdown(report: dict) -> str:
    """The paper's win / tie / loss table (percent, 95% interval)."""
    lines = ["| System | vs | n | Win % | Tie % | Loss % |", "|---|---|---|---|---|---|"]
    for row in report["pairs"]:
        cells = [Estimate(**row[k]).format(100, 1) for k in ("win", "tie", "loss")]
        lines.append(f"| {row['system']} | {row['opponent']} | {row['n']} | " + " | ".join(cells) + " |")
    if "bradley_terry" in report:
        lines += ["", "| Rank | System | Bradley-Terry log-strength |", "|---|---|---|"]
        for row in report["bradley_terry"]:
            lines.append(f"| {row['rank']} | {row['system']} | {Estimate(**row['strength']).format(1, 3)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Blind pair sheet


def write_pair_sheet(
    clips: dict[str, dict[str, str | Path]],
    out_dir: str | Path,
    prompts: dict[str, str] | None = None,
    seed: int = 0,
    pairs: Iterable[tuple[str, str]] | None = None,
) -> Path:
    """Write `index.html` (two videos side by side per item, systems hidden), `pairs.csv` (the recorded order)
    and an empty `answers.csv` for raters (item, choice = A, B or tie). The clips are linked (or copied) into
    `media/` as `<item>_A.mp4` / `<item>_B.mp4`, so no file name on the page reveals a system.

    `clips[system][prompt_id]` = path of that system's clip for a prompt; items are every prompt all
    compared systems share, for each pair of systems (all pairs unless `pairs` is given). Item order and
    the left/right (A/B) placement are drawn from `seed` and recorded in `pairs.csv`.
    """
    out_dir = Path(out_dir)
    systems = list(clips)
    if len(systems) < 2:
        raise ValueError(f"a pair sheet needs clips of at least 2 systems, got {systems}")
    pair_list = (
        list(pairs)
        if pairs is not None
        else [(a, b) for i, a in enumerate(systems) for b in systems[i + 1 :]]
    )
    rng = random.Random(seed)
    items = []
    for a, b in pair_list:
        for s in (a, b):
            if s not in clips:
                raise ValueError(f"pair ({a!r}, {b!r}) names system {s!r} with no clips; known: {systems}")
        for prompt_id in sorted(set(clips[a]) & set(clips[b])):
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            items.append({"prompt_id": prompt_id, "left": left, "right": right})
    if not items:
        raise ValueError("the compared systems share no prompt ids: nothing to put on the sheet")
    rng.shuffle(items)
    out_dir.mkdir(parents=True, exist_ok=True)

    media = out_dir / "media"
    media.mkdir(exist_ok=True)

    def anonymous(src: str | Path, name: str) -> str:
        """Place a clip in media/ under a name that does not reveal its system (hard link, else copy)."""
        dst = media / name
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return f"media/{name}"

    rows, cards = [], []
    for k, it in enumerate(items, start=1):
        item_id = f"{k:04d}"
        left, right = clips[it["left"]][it["prompt_id"]], clips[it["right"]][it["prompt_id"]]
        shown_a, shown_b = anonymous(left, f"{item_id}_A.mp4"), anonymous(right, f"{item_id}_B.mp4")
        rows.append(
            {"item": item_id, "prompt_id": it["prompt_id"], "system_A": it["left"], "system_B": it["right"],
             "video_A": shown_a, "video_B": shown_b, "source_A": str(left), "source_B": str(right)}
        )  # fmt: skip
        prompt = html.escape((prompts or {}).get(it["prompt_id"], ""))
        cards.append(
            f'<section id="item-{item_id}"><h2>Item {item_id}</h2><p class="prompt">{prompt}</p>'
            f'<div class="pair"><figure><figcaption>A</figcaption><video controls preload="metadata" '
            f'src="{shown_a}"></video></figure><figure><figcaption>B</figcaption>'
            f'<video controls preload="metadata" src="{shown_b}"></video></figure></div>'
            f"<p>Which clip is better overall (picture, sound, lip sync, prompt)? "
            + "".join(
                f'<label><input type="radio" name="{item_id}" value="{v}"> {v}</label> '
                for v in ("A", "B", "tie")
            )
            + "</p></section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Blind side-by-side study</title><style>"
        "body{font-family:sans-serif;max-width:1400px;margin:auto}.pair{display:flex;gap:1em}"
        "figure{flex:1;margin:0}video{width:100%}.prompt{white-space:pre-wrap;color:#444;font-size:.9em}"
        "section{border-bottom:1px solid #ccc;padding:1em 0}</style></head><body>"
        "<h1>Blind side-by-side study</h1><p>Watch both clips with sound, then choose A, B or tie. "
        "Press the button at the end to download your answers (answers.csv).</p>"
        + "".join(cards)
        + "<button id='save'>Download answers.csv</button><script>"
        "document.getElementById('save').onclick=function(){var rows=['item,choice'];"
        "document.querySelectorAll('section').forEach(function(s){var id=s.id.slice(5);"
        "var c=s.querySelector('input:checked');rows.push(id+','+(c?c.value:''));});"
        "var a=document.createElement('a');a.href=URL.createObjectURL(new Blob([rows.join('\\n')+'\\n'],"
        "{type:'text/csv'}));a.download='answers.csv';a.click();};</script></body></html>"
    )
    atomic_write(out_dir / "index.html", page)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "pairs.csv", table.getvalue())
    atomic_write(out_dir / "answers.csv", "item,choice\n" + "".join(f"{r['item']},\n" for r in rows))
    atomic_write(out_dir / "sheet.json", json.dumps({"seed": seed, "items": len(rows)}, indent=2))
    return out_dir / "index.html"


def judgements_from_sheet(pairs_csv: str | Path, answers_csv: str | Path) -> list[Judgement]:
    """Un-blind a rater's answers (item, choice = A / B / tie) with the recorded order of `pairs.csv`."""
    with Path(pairs_csv).open(newline="", encoding="utf-8") as f:
        order = {row["item"]: row for row in csv.DictReader(f)}
    out = []
    with Path(answers_csv).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            choice = (row.get("choice") or "").strip()
            if not choice:
                continue  # unanswered
            if row["item"] not in order:
                raise ValueError(
                    f"answer for unknown item {row['item']!r}; is {str(pairs_csv)!r} the right sheet?"
                )
            item = order[row["item"]]
            key = choice.upper() if choice.upper() in ("A", "B") else choice.lower()
            if key not in ("A", "B", TIE):
                raise ValueError(f"item {row['item']}: choice {choice!r} must be A, B or tie")
            a, b = item["system_A"], item["system_B"]
            out.append(Judgement(a, b, {"A": a, "B": b, TIE: TIE}[key]))
    return out
