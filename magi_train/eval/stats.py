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
