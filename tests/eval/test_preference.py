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
    rater_agreement,
    read_judgements,
    win_matrix,
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


def _clips(tmp_path, systems, n):
    clips = {}
    for system in systems:
        d = tmp_path / "runs" / system / "clips"  # source paths name the system, as run folders do
        d.mkdir(parents=True)
        clips[system] = {}
        for k in range(n):
            (d / f"p{k}.mp4").write_bytes(f"{system} {k}".encode())
            clips[system][f"p{k}"] = d / f"p{k}.mp4"
    return clips


def test_blind_pair_sheets_per_rater_randomise_record_and_hide_the_systems(tmp_path):
    systems = ("oursecretmodel", "baselinemodel")
    clips = _clips(tmp_path, systems, 40)
    out = write_pair_sheet(
        clips, tmp_path / "sheet", {"p0": "a <b>bold</b> prompt"}, seed=7, raters=["r01", "r02"]
    )
    keys = {}
    for rater in ("r01", "r02"):
        folder = out / "raters" / rater
        page = (folder / "index.html").read_text()
        assert page.count("<video") == 80 and "a &lt;b&gt;bold&lt;/b&gt; prompt" in page
        # nothing in the folder given to the rater names a system: not the page, answers, file names
        for f in folder.rglob("*"):
            assert not any(name in str(f.relative_to(folder)) for name in systems), f
            if f.suffix in (".html", ".csv", ".json"):
                assert not any(name in f.read_text() for name in systems), f
        with open(out / "key" / f"{rater}.csv") as f:
            keys[rater] = rows = list(csv.DictReader(f))
        assert 10 <= sum(r["system_A"] == systems[0] for r in rows) <= 30  # randomised sides
        assert [r["prompt_id"] for r in rows] != [f"p{k}" for k in range(40)]  # shuffled order
        for r in rows:  # the key matches what the rater sees
            for side in "AB":
                shown = (folder / r[f"video_{side}"]).read_bytes()
                assert shown == f"{r[f'system_{side}']} {r['prompt_id'][1:]}".encode()
                assert r[f"video_{side}"] == f"media/{r['item']}_{side}.mp4" and r[f"video_{side}"] in page
    assert not (out / "raters" / "r01" / "pairs.csv").exists() and (out / "key" / "study.json").is_file()
    # every rater has their own order and placement, recorded in their key
    assert [(r["prompt_id"], r["system_A"]) for r in keys["r01"]] != [
        (r["prompt_id"], r["system_A"]) for r in keys["r02"]
    ]
    again = write_pair_sheet(clips, tmp_path / "sheet2", seed=7, raters=["r01", "r02"])
    assert (again / "key/r02.csv").read_text() == (
        out / "key/r02.csv"
    ).read_text()  # reproducible from the seed
    # a rater always picks the clip of the first system: un-blinding gives a 100% win rate whatever the side
    with open(tmp_path / "answers.csv", "w") as f:
        f.write("item,choice\n" + "".join(f"{r['item']},{'A' if r['system_A'] == systems[0] else 'B'}\n"
                                          for r in keys["r02"]))  # fmt: skip
    js = judgements_from_sheet(out / "key" / "r02.csv", tmp_path / "answers.csv")
    assert len(js) == 40 and all(j.winner == systems[0] and j.rater == "r02" for j in js)
    assert sorted(j.prompt_id for j in js) == sorted(f"p{k}" for k in range(40))
    with pytest.raises(ValueError, match="rater ids"):
        write_pair_sheet(clips, tmp_path / "bad", raters=["r01", "r01"])


def _rater_study(rng, raters=40, prompts=50, mean=0.6, concentration=6.0):
    """Each rater has their own win probability p_r ~ Beta with the given mean (a rater effect): judgements of
    one rater are correlated. The population win rate is `mean`."""
    out = []
    for r in range(raters):
        p = rng.beta(mean * concentration, (1 - mean) * concentration)
        for k in range(prompts):
            winner = "ours" if rng.random() < p else "base"
            out.append(Judgement("ours", "base", winner, f"r{r}", f"p{k}"))
    return out


def test_rater_bootstrap_covers_a_rater_correlated_win_rate_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = {"auto": 0, "judgements": 0}
    widths = {"auto": [], "judgements": []}
    for k in range(100):
        study = _rater_study(rng)
        for mode in covered:
            row = pairwise_rates(study, n_resamples=300, seed=k, resample=mode)[0]
            est = row["win"]
            covered[mode] += est["low"] <= 0.6 <= est["high"]
            widths[mode].append(est["high"] - est["low"])
        assert row["raters"] == 40 and row["prompts"] == 50
    assert pairwise_rates(study, n_resamples=10)[0]["resampled"] == "raters+prompts"  # the default
    assert covered["auto"] >= 90, covered  # 95% nominal
    # the control: resampling single judgements is far too narrow for correlated judgements
    assert covered["judgements"] <= 75, covered
    assert np.mean(widths["auto"]) > 2 * np.mean(widths["judgements"])


def test_rater_agreement_krippendorff_alpha():
    # three items, two raters each: (a, a), (a, b), (b, b) -> alpha = 1 - (n - 1) * D_o / D_e = 1 - 5 * 2 / 18
    js = [Judgement("x", "y", "x", "r1", "p1"), Judgement("y", "x", "x", "r2", "p1"),  # sides folded
          Judgement("x", "y", "x", "r1", "p2"), Judgement("x", "y", "y", "r2", "p2"),
          Judgement("x", "y", "y", "r1", "p3"), Judgement("x", "y", "y", "r2", "p3")]  # fmt: skip
    agreement = rater_agreement(js)
    assert agreement["items"] == 3 and agreement["krippendorff_alpha"] == pytest.approx(4 / 9)
    assert agreement["percent_agreement"] == pytest.approx(2 / 3)
    same = [
        Judgement("x", "y", w, r, p)
        for p, w in (("p1", "x"), ("p2", "tie"), ("p3", "y"))
        for r in ("r1", "r2", "r3")
    ]
    assert rater_agreement(same)["krippendorff_alpha"] == pytest.approx(1.0)
    assert rater_agreement(js[:1])["krippendorff_alpha"] is None  # no item with two raters
    report = preference_report(js, n_resamples=50)
    assert "Krippendorff's alpha 0.444" in preference_markdown(report)


def test_bradley_terry_uses_one_fixed_regularisation():
    import choix

    # "A" never loses: its ML strength is infinite; one fixed alpha keeps every fit finite and comparable
    js = [Judgement("A", "B", "A", f"r{k % 4}", f"p{k}") for k in range(12)]
    js += [Judgement("B", "C", w, f"r{k % 4}", f"p{k}") for k, w in enumerate(["B", "C", "B", "tie"] * 3)]
    ranking = bradley_terry(js, n_resamples=30, alpha=0.05)
    systems = ["A", "B", "C"]
    point = choix.ilsr_pairwise_dense(win_matrix(js, systems), alpha=0.05, max_iter=1000)
    fitted = {r["system"]: r["strength"]["value"] for r in ranking}
    assert [fitted[s] for s in systems] == pytest.approx(list(point - point.mean()), abs=1e-6)
    assert all(r["alpha"] == 0.05 and r["resampled"] == "raters+prompts" for r in ranking)
    assert all(np.isfinite([r["strength"]["low"], r["strength"]["high"]]).all() for r in ranking)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        bradley_terry(js, alpha=0.0)
