"""Confidence intervals for per-prompt scores: percentile bootstrap over prompts, deterministic by seed.

Retrieval accuracy is a mean of per-prompt 0/1 verdicts, so its uncertainty comes from which
prompts were drawn. The percentile bootstrap resamples the prompts with replacement
``n_boot`` times and reads the interval off the quantiles of the resampled means (Efron &
Tibshirani 1993, ch. 13). Two allocations scored on the *same* prompts are compared by
resampling the prompt indices once for both (a paired bootstrap): the shared difficulty of a
prompt cancels, which makes the difference far tighter than two independent intervals suggest.

Pure functions of numpy arrays; the resampling uses ``numpy.random.default_rng(seed)``, so the
same scores and seed give the same interval on every machine.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

#: Resamples per interval: the Monte Carlo error of a 2.5% quantile at 10,000 resamples is
#: about 0.1 standard errors, small against the interval itself.
N_BOOT = 10_000


class Interval(BaseModel):
    """A mean with its percentile-bootstrap interval (``level``: 0.95 for a 95% interval)."""

    model_config = ConfigDict(frozen=True)

    mean: float
    low: float
    high: float
    level: float
    n: int
    se: float  # the bootstrap standard error (standard deviation of the resampled means)


class PairedDifference(Interval):
    """``mean(a) - mean(b)`` over the same prompts, with its interval and a two-sided bootstrap p-value."""

    p_value: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (at its level)."""
        return self.low > 0 or self.high < 0


def _scores(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of per-prompt scores, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: scores must be finite numbers")
    return a


def _check(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a percentile interval, got {n_boot}")


def resampled_means(scores: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of ``scores`` resampled with replacement.

    Drawn as multinomial counts over the distinct values (the same distribution as drawing ``n``
    indices, since a resample's mean depends only on how often each value is drawn): 0/1 verdicts
    and paired differences in {-1, 0, 1} cost O(n_boot) instead of O(n_boot x n).
    """
    values, counts = np.unique(scores, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(scores.size, counts / scores.size, size=n_boot)
    return draws @ values / scores.size


def bootstrap_ci(scores: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean of per-prompt ``scores`` (e.g. 0/1 retrieval verdicts)."""
    a = _scores(scores, "scores")
    _check(level, n_boot)
    means = resampled_means(a, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean=float(a.mean()), low=float(lo), high=float(hi), level=level, n=int(a.size),
                    se=float(means.std(ddof=1)))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
                     seed: int = 0) -> PairedDifference:
    """Interval and two-sided p-value of ``mean(a) - mean(b)``, ``a[i]`` and ``b[i]`` scored on prompt ``i``.

    p-value: twice the smaller share of resampled differences on either side of 0 (at least
    ``1 / n_boot``: a bootstrap cannot resolve smaller ones); the usual percentile-interval
    duality, so ``p < 1 - level`` exactly when the interval excludes 0 (up to ties at 0).
    """
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired scores need the same prompts: a has {x.size}, b has {y.size}")
    _check(level, n_boot)
    d = x - y
    means = resampled_means(d, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p = 2 * min(float((means <= 0).mean()), float((means >= 0).mean()))
    return PairedDifference(mean=float(d.mean()), low=float(lo), high=float(hi), level=level, n=int(d.size),
                            se=float(means.std(ddof=1)), p_value=min(1.0, max(p, 1.0 / n_boot)))


def paired_bootstrap_max(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
                         seed: int = 0) -> PairedDifference:
    """Interval and two-sided p-value of ``max(a) - max(b)``, ``a[i]`` and ``b[i]`` the worst scores
    (e.g. the largest per-token error) on prompt ``i``.

    The largest of a thousand token errors is one extreme draw, so two models' maxima differ
    even when their error distributions do not; resampling the prompts (the same indices for
    both) says how much. ``mean`` is the observed difference of the maxima; ``se``, ``low`` and
    ``high`` come from the resampled differences, and the p-value as in :func:`paired_bootstrap`.
    """
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired scores need the same prompts: a has {x.size}, b has {y.size}")
    _check(level, n_boot)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    diffs = x[idx].max(axis=1) - y[idx].max(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    p = 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean()))
    return PairedDifference(mean=float(x.max() - y.max()), low=float(lo), high=float(hi), level=level,
                            n=int(x.size), se=float(diffs.std(ddof=1)), p_value=min(1.0, max(p, 1.0 / n_boot)))


def prompts_for_difference(diff: float, accuracy: float, k_se: float = 3.0) -> int:
    """Prompts per allocation so that ``diff`` is ``k_se`` standard errors of a difference of two accuracies.

    Worst case, the two allocations' verdicts independent (an unpaired comparison):
    ``se = sqrt(2 p (1 - p) / n)``, so ``n = 2 p (1 - p) (k_se / diff)^2``. A paired comparison
    on the same prompts needs fewer (only the prompts where the two disagree add variance).
    """
    if not 0 < diff <= 1 or not 0 < accuracy < 1 or k_se <= 0:
        raise ValueError(f"need 0 < diff <= 1, 0 < accuracy < 1, k_se > 0; got {diff}, {accuracy}, {k_se}")
    return math.ceil(2 * accuracy * (1 - accuracy) * (k_se / diff) ** 2 - 1e-9)
