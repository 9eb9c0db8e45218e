"""Pairwise human preference studies: win / tie / loss rates with intervals that respect raters, Bradley-Terry
ranking, inter-rater agreement, and the blind side-by-side sheets raters use (the paper's 2,000-comparison
study, spec §9).

Judgements are rows `(system_a, system_b, winner, rater, prompt_id)` with winner = one of the two systems or
`tie`. Judgements of one rater are correlated (a rater who likes sharp video prefers it everywhere), and so are
judgements of one prompt, so intervals come from a cluster bootstrap that resamples raters and prompts
(two-way, `stats.cluster_weights`) whenever those ids are known; resampling single judgements treats 2,000
correlated judgements as 2,000 independent ones and gives intervals that are too narrow.

The Bradley-Terry fit is choix's `ilsr_pairwise_dense` on a win matrix in which a tie counts half a win for
each side, with one fixed L2 regularisation `alpha` for the point fit and every resample alike (a strength
that is infinite without it, for a system that never loses, gets the same prior everywhere).
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

from magi_train.eval.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Estimate,
    cluster_weights,
    weighted_mean_ci,
)
from magi_train.utils.fileio import atomic_write

TIE = "tie"
RESAMPLING = ("auto", "raters+prompts", "raters", "prompts", "judgements")
DEFAULT_BT_ALPHA = 0.01  # choix's L2 penalty on log-strengths, fixed for every fit


@dataclass(frozen=True)
class Judgement:
    system_a: str
    system_b: str
    winner: str  # system_a, system_b or "tie"
    rater: str = ""  # "" when unknown
    prompt_id: str = ""  # "" when unknown


def read_judgements(path: str | Path) -> list[Judgement]:
    """Read a CSV with columns `system_a, system_b, winner` (winner: a system name, `A`, `B` or `tie`) and,
    for intervals that respect raters, `rater` and `prompt_id`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"judgement CSV {str(path)!r} not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"system_a", "system_b", "winner"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks columns {sorted(missing)}; expected a header 'system_a,system_b,winner' "
                "(optional: rater, prompt_id) with winner = one of the two systems, A, B or tie"
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
            rater = (row.get("rater") or "").strip()
            prompt = (row.get("prompt_id") or "").strip()
            out.append(Judgement(a, b, w, rater, prompt))
    if not out:
        raise ValueError(f"judgement CSV {str(path)!r} has no rows")
    return out


def _systems(judgements: Sequence[Judgement]) -> list[str]:
    seen: dict[str, None] = {}
    for j in judgements:
        seen.setdefault(j.system_a)
        seen.setdefault(j.system_b)
    return list(seen)


def resampling_units(judgements: Sequence[Judgement], resample: str = "auto") -> str:
    """What the bootstrap resamples: `auto` picks raters+prompts, raters or prompts by which ids every
    judgement carries, else single judgements."""
    if resample not in RESAMPLING:
        raise ValueError(f"unknown resampling {resample!r}; use one of {RESAMPLING}")
    has_rater = all(j.rater for j in judgements)
    has_prompt = all(j.prompt_id for j in judgements)
    if resample == "auto":
        return {(True, True): "raters+prompts", (True, False): "raters", (False, True): "prompts"}.get(
            (has_rater, has_prompt), "judgements"
        )
    need = {"raters+prompts": (True, True), "raters": (True, False), "prompts": (False, True)}.get(resample)
    if need and ((need[0] and not has_rater) or (need[1] and not has_prompt)):
        raise ValueError(
            f"preference resampling {resample!r} needs a rater / prompt_id on every judgement; "
            "add those columns to the CSV or use resample=auto"
        )
    return resample


def _clusters(judgements: Sequence[Judgement], units: str) -> list[list[str]]:
    if units == "judgements":
        return [[str(k) for k in range(len(judgements))]]
    factors = units.split("+")
    out = []
    if "raters" in factors:
        out.append([j.rater for j in judgements])
    if "prompts" in factors:
        out.append([j.prompt_id for j in judgements])
    return out


def pairwise_rates(
    judgements: Sequence[Judgement],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    systems: Sequence[str] | None = None,
    resample: str = "auto",
) -> list[dict]:
    """Per pair of systems, the first system's win / tie / loss rates against the second.

    Systems are ordered as `systems` lists them (e.g. ours first), else by first appearance. Each rate is an
    Estimate whose percentile interval resamples raters and prompts (see `resampling_units`).
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
            pair = [j for j in judgements if {j.system_a, j.system_b} == {first, second}]
            if not pair:
                continue
            units = resampling_units(pair, resample)
            outcome = np.asarray([0 if j.winner == TIE else (1 if j.winner == first else -1) for j in pair])
            row: dict = {"system": first, "opponent": second, "n": len(pair), "resampled": units,
                         "raters": len({j.rater for j in pair if j.rater}),
                         "prompts": len({j.prompt_id for j in pair if j.prompt_id})}  # fmt: skip
            weights = cluster_weights(_clusters(pair, units), n_resamples, np.random.default_rng(seed))
            for name, value in (("win", 1), ("tie", 0), ("loss", -1)):  # one set of resamples for all three
                row[name] = weighted_mean_ci((outcome == value).astype(float), weights, confidence).as_dict()
            rows.append(row)
    return rows


def win_matrix(
    judgements: Sequence[Judgement], systems: Sequence[str], weights: np.ndarray | None = None
) -> np.ndarray:
    """`m[i, j]` = (weighted) wins of system i over system j, a tie counting 1/2 for each."""
    index = {s: k for k, s in enumerate(systems)}
    m = np.zeros((len(systems), len(systems)))
    for k, j in enumerate(judgements):
        w = 1.0 if weights is None else float(weights[k])
        a, b = index[j.system_a], index[j.system_b]
        if j.winner == TIE:
            m[a, b] += 0.5 * w
            m[b, a] += 0.5 * w
        elif j.winner == j.system_a:
            m[a, b] += w
        else:
            m[b, a] += w
    return m


def bradley_terry(
    judgements: Sequence[Judgement],
    n_resamples: int = 200,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    alpha: float = DEFAULT_BT_ALPHA,
    resample: str = "auto",
) -> list[dict]:
    """Bradley-Terry log-strengths (mean zero) per system, best first, each with a bootstrap interval.

    `alpha` is one fixed L2 regularisation for every fit (point and resamples). Intervals refit on
    `n_resamples` cluster resamples (raters and prompts, as `pairwise_rates`).
    """
    import choix

    systems = _systems(judgements)
    if len(systems) < 2:
        raise ValueError(f"Bradley-Terry needs at least 2 systems, got {systems}")
    if alpha <= 0:
        raise ValueError(f"Bradley-Terry alpha must be > 0 (a fixed regularisation), got {alpha}")

    def fit(weights: np.ndarray | None) -> np.ndarray:
        params = choix.ilsr_pairwise_dense(
            win_matrix(judgements, systems, weights), alpha=alpha, max_iter=1000
        )
        return params - params.mean()

    point = fit(None)
    units = resampling_units(judgements, resample)
    weights = cluster_weights(_clusters(judgements, units), n_resamples, np.random.default_rng(seed))
    draws = np.stack([fit(w) for w in weights])
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    order = np.argsort(-point)
    return [
        {
            "rank": r + 1, "system": systems[k], "resampled": units, "alpha": alpha,
            "strength": Estimate(float(point[k]), float(lo[k]), float(hi[k]), len(judgements)).as_dict(),
        }
        for r, k in enumerate(order)
    ]  # fmt: skip


def rater_agreement(judgements: Sequence[Judgement]) -> dict:
    """Inter-rater agreement on items (a system pair and a prompt) judged by at least two raters.

    `krippendorff_alpha`: Krippendorff's alpha for nominal data (first system wins / tie / second wins, sides
    folded), which allows any number of raters per item; `percent_agreement`: the share of agreeing rater pairs.
    None without two raters on any item.
    """
    items: dict[tuple, list[str]] = {}
    for j in judgements:
        if not (j.rater and j.prompt_id):
            continue
        first, second = sorted((j.system_a, j.system_b))
        label = TIE if j.winner == TIE else ("first" if j.winner == first else "second")
        items.setdefault((first, second, j.prompt_id), []).append(label)
    rated = [labels for labels in items.values() if len(labels) >= 2]
    result: dict = {"items": len(rated), "krippendorff_alpha": None, "percent_agreement": None}
    if not rated:
        return result
    categories = sorted({c for labels in rated for c in labels})
    index = {c: k for k, c in enumerate(categories)}
    coincidence = np.zeros((len(categories), len(categories)))
    agree = pairs = 0
    for labels in rated:
        m = len(labels)
        counts = np.zeros(len(categories))
        for c in labels:
            counts[index[c]] += 1
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
        agree += float((counts * (counts - 1)).sum()) / 2
        pairs += m * (m - 1) / 2
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    observed = coincidence.sum() - np.trace(coincidence)
    expected = (n_c.sum() ** 2 - (n_c**2).sum()) / (n - 1)
    result["krippendorff_alpha"] = float(1 - observed / expected) if expected > 0 else 1.0
    result["percent_agreement"] = agree / pairs
    return result


def preference_report(
    judgements: Sequence[Judgement], bt_alpha: float = DEFAULT_BT_ALPHA, resample: str = "auto", **kwargs
) -> dict:
    """Pairwise rates, inter-rater agreement and, with more than two systems, the Bradley-Terry ranking."""
    report: dict = {
        "systems": _systems(judgements),
        "n": len(judgements),
        "raters": len({j.rater for j in judgements if j.rater}),
        "prompts": len({j.prompt_id for j in judgements if j.prompt_id}),
        "pairs": pairwise_rates(judgements, resample=resample, **kwargs),
        "agreement": rater_agreement(judgements),
    }
    if len(report["systems"]) > 2:
        report["bradley_terry"] = bradley_terry(
            judgements, seed=kwargs.get("seed", 0), alpha=bt_alpha, resample=resample,
            confidence=kwargs.get("confidence", DEFAULT_CONFIDENCE),
        )  # fmt: skip
    return report


def preference_markdown(report: dict) -> str:
    """The paper's win / tie / loss table (percent, interval), what was resampled, and the raters' agreement."""
    lines = [
        "| System | vs | n | raters | prompts | resampled | Win % | Tie % | Loss % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["pairs"]:
        cells = [Estimate(**row[k]).format(100, 1) for k in ("win", "tie", "loss")]
        lines.append(
            f"| {row['system']} | {row['opponent']} | {row['n']} | {row.get('raters', 0)} | "
            f"{row.get('prompts', 0)} | {row.get('resampled', 'judgements')} | " + " | ".join(cells) + " |"
        )
    agreement = report.get("agreement") or {}
    if agreement.get("krippendorff_alpha") is not None:
        lines += [
            "",
            f"Inter-rater agreement on {agreement['items']} items rated by two or more raters: Krippendorff's "
            f"alpha {agreement['krippendorff_alpha']:.3f} (nominal), {100 * agreement['percent_agreement']:.1f}% "
            "of rater pairs agree.",
        ]
    if "bradley_terry" in report:
        alpha = report["bradley_terry"][0].get("alpha")
        lines += ["", f"| Rank | System | Bradley-Terry log-strength (alpha {alpha}) |", "|---|---|---|"]
        for row in report["bradley_terry"]:
            lines.append(f"| {row['rank']} | {row['system']} | {Estimate(**row['strength']).format(1, 3)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Blind pair sheets, one per rater

KEY_COLUMNS = ("item", "prompt_id", "system_A", "system_B", "video_A", "video_B", "source_A", "source_B")


def rater_names(count: int) -> list[str]:
    """`r01`, `r02`, ...: rater ids that say nothing about anyone."""
    if count < 1:
        raise ValueError(f"a pair sheet needs at least one rater, got {count}")
    return [f"r{k:02d}" for k in range(1, count + 1)]


def write_pair_sheet(
    clips: dict[str, dict[str, str | Path]],
    out_dir: str | Path,
    prompts: dict[str, str] | None = None,
    seed: int = 0,
    pairs: Iterable[tuple[str, str]] | None = None,
    raters: Sequence[str] = ("r01",),
) -> Path:
    """Write one blind side-by-side study per rater; returns `out_dir`.

    Layout (give each rater only their folder; the key stays with the study's owner):

        out_dir/raters/<rater>/index.html   two videos per item, no system names anywhere
        out_dir/raters/<rater>/answers.csv  item, choice (A, B or tie): the page downloads it filled in
        out_dir/raters/<rater>/media/       the clips, linked (or copied) as <item>_A.mp4 / <item>_B.mp4
        out_dir/key/<rater>.csv             the un-blinding key: item -> prompt, systems on sides A and B
        out_dir/key/study.json              seed, raters, items

    `clips[system][prompt_id]` = path of that system's clip for a prompt; items are every prompt all compared
    systems share, for each pair of systems (all pairs unless `pairs` is given). Every rater gets their own
    item order and A/B placement, drawn from (`seed`, rater) and recorded in their key.
    """
    out_dir = Path(out_dir)
    systems = list(clips)
    if len(systems) < 2:
        raise ValueError(f"a pair sheet needs clips of at least 2 systems, got {systems}")
    if len(set(raters)) != len(raters) or any(not r or "/" in r for r in raters):
        raise ValueError(f"rater ids must be distinct, non-empty folder names, got {list(raters)}")
    pair_list = (
        list(pairs)
        if pairs is not None
        else [(a, b) for i, a in enumerate(systems) for b in systems[i + 1 :]]
    )
    base_items = []
    for a, b in pair_list:
        for s in (a, b):
            if s not in clips:
                raise ValueError(f"pair ({a!r}, {b!r}) names system {s!r} with no clips; known: {systems}")
        base_items += [(prompt_id, a, b) for prompt_id in sorted(set(clips[a]) & set(clips[b]))]
    if not base_items:
        raise ValueError("the compared systems share no prompt ids: nothing to put on the sheet")
    key_dir = out_dir / "key"
    key_dir.mkdir(parents=True, exist_ok=True)
    for rater in raters:
        rng = random.Random(f"{seed}/{rater}")
        items = [
            {"prompt_id": p, "left": a, "right": b}
            if rng.random() < 0.5
            else {"prompt_id": p, "left": b, "right": a}
            for p, a, b in base_items
        ]
        rng.shuffle(items)
        rows = _write_rater_sheet(out_dir / "raters" / rater, items, clips, prompts or {})
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(KEY_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(key_dir / f"{rater}.csv", table.getvalue())
    study = {"seed": seed, "raters": list(raters), "items_per_rater": len(base_items), "systems": systems}
    atomic_write(key_dir / "study.json", json.dumps(study, indent=2))
    return out_dir


def _write_rater_sheet(folder: Path, items: list[dict], clips: dict, prompts: dict[str, str]) -> list[dict]:
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)

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
        prompt = html.escape(prompts.get(it["prompt_id"], ""))
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
    atomic_write(folder / "index.html", page)
    atomic_write(folder / "answers.csv", "item,choice\n" + "".join(f"{r['item']},\n" for r in rows))
    return rows


def judgements_from_sheet(
    key_csv: str | Path, answers_csv: str | Path, rater: str | None = None
) -> list[Judgement]:
    """Un-blind a rater's answers (item, choice = A / B / tie) with their key (`key/<rater>.csv`); the rater id
    defaults to the key file's name."""
    key_csv = Path(key_csv)
    rater = rater or key_csv.stem
    with key_csv.open(newline="", encoding="utf-8") as f:
        order = {row["item"]: row for row in csv.DictReader(f)}
    out = []
    with Path(answers_csv).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            choice = (row.get("choice") or "").strip()
            if not choice:
                continue  # unanswered
            if row["item"] not in order:
                raise ValueError(
                    f"answer for unknown item {row['item']!r}; is {str(key_csv)!r} this rater's key?"
                )
            item = order[row["item"]]
            key = choice.upper() if choice.upper() in ("A", "B") else choice.lower()
            if key not in ("A", "B", TIE):
                raise ValueError(f"item {row['item']}: choice {choice!r} must be A, B or tie")
            a, b = item["system_A"], item["system_B"]
            out.append(Judgement(a, b, {"A": a, "B": b, TIE: TIE}[key], rater, item["prompt_id"]))
    return out
