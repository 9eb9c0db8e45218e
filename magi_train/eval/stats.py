"""Bootstrap confidence intervals (scipy.stats.bootstrap) for the means and corpus-level rates eval reports.

The paper's margins between models are small (0.04-0.11 per VideoScore2 dimension), so every mean eval
reports carries a 95% percentile-bootstrap interval over clips (or over judgements for preference rates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval; `low`/`high` are None with fewer than 2 samples."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
        """`4.80 [4.71, 4.88]` (or `n/a`) for tables."""
        if self.value is None:
            return "n/a"
        text = f"{self.value * scale:.{digits}f}{suffix}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"
        return text


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def bootstrap(
    statistic: Callable[..., np.ndarray],
    samples: Sequence[np.ndarray],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of a vectorised `statistic(*samples, axis=-1)` over paired samples (resampled rows)."""
    from scipy.stats import bootstrap as scipy_bootstrap

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"paired samples must have equal lengths, got {[len(a) for a in arrays]}")
    if n == 0:
        return Estimate(None, None, None, 0)
    value = _finite(float(statistic(*arrays, axis=-1)))
    if n < 2:
        return Estimate(value, None, None, n)
    res = scipy_bootstrap(
        tuple(arrays), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return Estimate(value, _finite(res.confidence_interval.low), _finite(res.confidence_interval.high), n)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _ratio(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    total = np.sum(den, axis=axis)
    return np.sum(num, axis=axis) / np.where(total > 0, total, np.nan)


def mean_ci(values: Sequence[float], **kwargs) -> Estimate:
    """Mean of per-clip values with its bootstrap interval (NaN / None values are dropped)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return bootstrap(_mean, [arr], **kwargs)


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], **kwargs) -> Estimate:
    """Corpus-level rate sum(num) / sum(den) (e.g. total edits / total reference words), resampling clips."""
    return bootstrap(_ratio, [np.asarray(numerators), np.asarray(denominators)], **kwargs)


def cluster_weights(
    clusters: Sequence[Sequence[object]], n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap weights `[n_resamples, N]` of N observations when whole clusters are resampled.

    `clusters` holds one label sequence per clustering factor (e.g. the rater and the prompt of each judgement).
    One factor: each resample draws that factor's clusters with replacement and an observation's weight is how
    often its cluster was drawn. Several factors (two-way, e.g. raters x prompts): the factors are drawn
    independently and the weight is the product of the counts, the standard two-way bootstrap for crossed
    random effects (Owen 2007; Field & Welsh 2007).
    """
    weights: np.ndarray | None = None
    for labels in clusters:
        _, index = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
        k = int(index.max()) + 1 if len(index) else 0
        draws = rng.integers(0, k, size=(n_resamples, k)) + k * np.arange(n_resamples)[:, None]
        counts = (
            np.bincount(draws.ravel(), minlength=n_resamples * k).reshape(n_resamples, k).astype(np.float64)
        )
        w = counts[:, index]
        weights = w if weights is None else weights * w
    assert weights is not None, "cluster_weights needs at least one clustering factor"
    return weights


def weighted_bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    weights: np.ndarray,
    point: float | None,
    n: int,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Percentile interval of `statistic(weights) -> [n_resamples]` (NaN resamples, e.g. an empty draw, dropped)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    draws = np.asarray(statistic(weights), dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size < 2 or n < 2:
        return Estimate(point, None, None, n)
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(point, float(lo), float(hi), n)


def clustered_mean_ci(
    values: Sequence[float],
    clusters: Sequence[Sequence[object]],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean of `values` with a cluster (or two-way cluster) bootstrap interval; see `cluster_weights`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    weights = cluster_weights(clusters, n_resamples, np.random.default_rng(seed))
    return weighted_mean_ci(x, weights, confidence)


def weighted_mean_ci(x: np.ndarray, weights: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Mean of `x` with the percentile interval of its means under bootstrap `weights` `[n_resamples, N]`."""

    def stat(w: np.ndarray) -> np.ndarray:
        total = w.sum(axis=1)
        return (w @ x) / np.where(total > 0, total, np.nan)

    return weighted_bootstrap(stat, weights, float(x.mean()), int(x.size), confidence)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    denominators: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Estimate:
    """Paired bootstrap of a difference between two systems on the same items (prompts): mean(a) - mean(b), or
    with `denominators` the corpus-rate difference sum(a)/sum(da) - sum(b)/sum(db) (e.g. WER edits / words).
    Items are resampled jointly, so what the two systems share (prompt difficulty) cancels out."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples must have equal lengths, got {len(xa)} / {len(xb)}")
    if denominators is None:
        return bootstrap(
            lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis), [xa, xb],
            n_resamples=n_resamples, confidence=confidence, seed=seed,
        )  # fmt: skip
    da, db = (np.asarray(d, dtype=np.float64) for d in denominators)
    return bootstrap(
        lambda x, y, u, v, axis=-1: _ratio(x, u, axis) - _ratio(y, v, axis), [xa, xb, da, db],
        n_resamples=n_resamples, confidence=confidence, seed=seed,
    )  # fmt: skip
