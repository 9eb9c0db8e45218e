"""Preference studies and bootstrap intervals: coverage of a known win rate, Bradley-Terry ordering, the blind
pair sheet (randomised, recorded A/B order) and its round trip back to judgements."""

import csv

import numpy as np
import pytest

pytest.importorskip("choix", reason="the eval extra is not installed: pip install -e '.[eval]'")

from magi_train.eval.preference import (
    Judgement,
    bradley_terry,
    judgements_from_sheet,
    pairwise_rates,
    preference_markdown,
    preference_report,
    read_judgements,
    write_pair_sheet,
)
from magi_train.eval.stats import Estimate, mean_ci, ratio_ci


def _synthetic(n, p_win, p_tie, rng, a="ours", b="baseline"):
    """n judgements of a vs b with known win/tie probabilities, shown on random sides."""
    out = []
    for u in rng.random(n):
        winner = a if u < p_win else ("tie" if u < p_win + p_tie else b)
        out.append(Judgement(a, b, winner) if rng.random() < 0.5 else Judgement(b, a, winner))
    return out


def test_bootstrap_interval_covers_a_known_win_rate():
    rng = np.random.default_rng(1)
    # the paper's study size and rates (vs Ovi 1.1: 80.0 / 8.2 / 11.8 %)
    rows = pairwise_rates(
        _synthetic(2000, 0.80, 0.082, rng), n_resamples=1000, seed=0, systems=["ours", "baseline"]
    )
    assert len(rows) == 1 and rows[0]["system"] == "ours" and rows[0]["n"] == 2000
    for key, truth in (("win", 0.80), ("tie", 0.082), ("loss", 0.118)):
        est = rows[0][key]
        assert est["low"] <= truth <= est["high"], (key, est)
        assert est["high"] - est["low"] < 0.05  # +- ~1.8 points at n = 2000
    # calibration: over many synthetic studies the 95% interval covers the true rate about 95% of the time
    covered = 0
    for k in range(150):
        est = pairwise_rates(
            _synthetic(300, 0.6, 0.15, rng), n_resamples=400, seed=k, systems=["ours", "baseline"]
        )[0]["win"]
        covered += est["low"] <= 0.6 <= est["high"]
    assert 0.88 <= covered / 150 <= 0.99, covered


def test_mean_and_ratio_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(4.5, 0.3, size=400)
    est = Estimate(**mean_ci(x, n_resamples=1000).as_dict())
    assert est.value == pytest.approx(x.mean()) and est.low < est.value < est.high
    assert est.high - est.low == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)  # normal-theory width
    assert mean_ci([3.0]).low is None and mean_ci([]).value is None  # too few samples: no interval
    r = ratio_ci([1, 2, 0, 3], [10, 10, 5, 15])
    assert r.value == pytest.approx(6 / 40)
    assert est.format(1, 2).startswith(f"{x.mean():.2f} [")


def test_bradley_terry_recovers_a_known_ordering():
    rng = np.random.default_rng(3)
    strengths = {"A": 1.2, "B": 0.5, "C": 0.0, "D": -0.8}
    judgements = []
    names = list(strengths)
    for _ in range(1500):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + np.exp(strengths[b] - strengths[a]))
        u = rng.random()
        judgements.append(Judgement(a, b, "tie" if u < 0.1 else (a if u < 0.1 + 0.9 * p else b)))
    ranking = bradley_terry(judgements, n_resamples=50)
    assert [r["system"] for r in ranking] == ["A", "B", "C", "D"]
    fitted = {r["system"]: r["strength"]["value"] for r in ranking}
    truth = np.array([strengths[s] for s in names]) - np.mean(list(strengths.values()))
    assert np.corrcoef(truth, [fitted[s] for s in names])[0, 1] > 0.98
    assert all(r["strength"]["low"] <= r["strength"]["value"] <= r["strength"]["high"] for r in ranking)
    report = preference_report(judgements, n_resamples=100)
    assert "bradley_terry" in report and len(report["pairs"]) == 6
    assert "| A |" in preference_markdown(report)


def test_csv_reading_and_errors(tmp_path):
    good = tmp_path / "j.csv"
    good.write_text("system_a,system_b,winner\nours,ovi,ours\novi,ours,A\nours,ovi,tie\nours,ovi,B\n")
    js = read_judgements(good)
    assert [j.winner for j in js] == ["ours", "ovi", "tie", "ovi"]
    rates = pairwise_rates(js, n_resamples=100)[0]
    assert (rates["win"]["value"], rates["tie"]["value"], rates["loss"]["value"]) == (0.25, 0.25, 0.5)
    bad = tmp_path / "bad.csv"
    bad.write_text("system_a,system_b,winner\nours,ovi,ltx\n")
    with pytest.raises(ValueError, match="line 2: winner 'ltx'"):
        read_judgements(bad)
    (tmp_path / "cols.csv").write_text("left,right,choice\na,b,a\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_judgements(tmp_path / "cols.csv")


def test_blind_pair_sheet_randomises_and_records_the_order(tmp_path):
    clips = {}
    for system in ("ours", "baseline"):
        d = tmp_path / system
        d.mkdir()
        clips[system] = {}
        for k in range(40):
            (d / f"p{k}.mp4").write_bytes(f"{system} {k}".encode())
            clips[system][f"p{k}"] = d / f"p{k}.mp4"
    sheet = write_pair_sheet(clips, tmp_path / "sheet", {"p0": "a <b>bold</b> prompt"}, seed=7)
    page = sheet.read_text()
    assert page.count("<video") == 80 and "ours" not in page and "baseline" not in page  # blind
    assert "a &lt;b&gt;bold&lt;/b&gt; prompt" in page
    with open(tmp_path / "sheet" / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    left_is_ours = sum(r["system_A"] == "ours" for r in rows)
    assert 10 <= left_is_ours <= 30  # randomised sides
    assert [r["prompt_id"] for r in rows] != [f"p{k}" for k in range(40)]  # shuffled order
    for r in rows:  # the recorded order matches the page
        for side in "AB":
            shown = (tmp_path / "sheet" / r[f"video_{side}"]).read_bytes()
            assert shown == f"{r[f'system_{side}']} {r['prompt_id'][1:]}".encode()
            assert r[f"video_{side}"] == f"media/{r['item']}_{side}.mp4" and r[f"video_{side}"] in page
    again = write_pair_sheet(clips, tmp_path / "sheet2", seed=7)
    assert (tmp_path / "sheet2" / "pairs.csv").read_text() == (tmp_path / "sheet" / "pairs.csv").read_text()
    # a rater always picks the clip of "ours": un-blinding gives a 100% win rate whatever the side
    with open(tmp_path / "answers.csv", "w") as f:
        f.write(
            "item,choice\n"
            + "".join(f"{r['item']},{'A' if r['system_A'] == 'ours' else 'B'}\n" for r in rows)
        )
    js = judgements_from_sheet(tmp_path / "sheet" / "pairs.csv", tmp_path / "answers.csv")
    assert len(js) == 40 and all(j.winner == "ours" for j in js)
    assert again.name == "index.html"
