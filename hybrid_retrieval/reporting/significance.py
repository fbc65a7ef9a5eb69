"""Significance of a difference between two models: paired tests over the test queries, Welch's test over seeds.

Two sources of variation, tested separately:

- **the test queries** (would the difference hold on another sample of queries?): both models' per-query values
  (``per_query.npz`` of each run, averaged over a model's seeds query by query), paired by query. The statistic is
  the protocol's own macro average of the per-query differences, ``T = sum_g (1/G) mean_{i in g} d_i`` over the G
  groups (languages, or language pairs). :func:`paired_randomization_test` flips the sign of each ``d_i`` (a sign
  flip is a swap of the two models' values for that query; under "no difference" each swap is as likely) and
  counts ``|T*| >= |T|``: two-sided ``p = (1 + count) / (1 + resamples)``, or the exact share over all ``2^n`` sign
  vectors when there are at most :data:`EXACT_UP_TO` queries. :func:`paired_bootstrap_ci` resamples queries with
  replacement within each group (the groups' sizes kept) and gives the percentile interval of ``T``.
- **the training seeds** (would the difference hold for another training run?): :func:`welch_test` over the
  per-seed values, with the Welch-Satterthwaite degrees of freedom and Student's t distribution (not a normal
  approximation: with 3-5 seeds the 5 % critical value is 2.3-4.3, not 2).

Queries with no value in either model (NaN, such as a query without an own-language item for the own-language
rate) are left out of the pairing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from hybrid_retrieval.config_error import BadValue

EXACT_UP_TO = 16          # queries: enumerate every sign vector up to here (65,536 vectors)
RESAMPLES = 10_000
_CHUNK = 128              # sign vectors / bootstrap samples drawn at once (bounds memory: chunk x queries)


@dataclass(frozen=True)
class Welch:
    difference: float     # mean(a) - mean(b)
    se: float
    dof: float
    t: float
    p: float              # two-sided
    ci: tuple[float, float]


def welch_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b); NaN p and interval with fewer than 2 values a side.

    When neither side varies, the difference is certain at the seed level: p is 0 for a non-zero difference and 1
    for none.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    difference = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return Welch(difference, math.nan, math.nan, math.nan, math.nan, (math.nan, math.nan))
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # (a var of equal floats can come out 1e-32, not 0)
        p = 0.0 if difference else 1.0
        return Welch(difference, 0.0, math.inf, math.copysign(math.inf, difference) if difference else 0.0, p,
                     (difference, difference))
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    t = difference / se
    p = float(2 * stats.t.sf(abs(t), dof))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return Welch(difference, se, float(dof), t, p, (difference - half, difference + half))


def macro_weights(group: np.ndarray) -> np.ndarray:
    """Each query's weight in the macro average: ``1 / (number of groups x its group's size)``."""
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inverse])


def macro_difference(difference: np.ndarray, group: np.ndarray) -> float:
    """The macro average over groups of the mean per-query difference (the protocol's average)."""
    return float(np.sum(macro_weights(group) * difference))


def paired_randomization_test(difference: np.ndarray, group: np.ndarray, resamples: int = RESAMPLES,
                              seed: int = 0) -> float:
    """Two-sided p of the macro-averaged paired difference under random sign flips (module docstring)."""
    difference = np.asarray(difference, dtype=np.float64)
    weighted = macro_weights(np.asarray(group)) * difference
    observed = abs(weighted.sum())
    tolerance = 1e-12 * max(1.0, float(np.abs(weighted).sum()))  # equal sums that differ only by rounding
    n = len(weighted)
    if n == 0:
        return math.nan
    if n <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ weighted) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    count, done = 0, 0
    while done < resamples:
        size = min(_CHUNK, resamples - done)
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        count += int(np.sum(np.abs(signs @ weighted) >= observed - tolerance))
        done += size
    return (1 + count) / (1 + resamples)


def paired_bootstrap_ci(difference: np.ndarray, group: np.ndarray, level: float = 0.95, resamples: int = RESAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the macro-averaged difference, queries resampled with replacement in each group."""
    difference = np.asarray(difference, dtype=np.float64)
    group = np.asarray(group)
    labels = np.unique(group)
    members = [difference[group == g] for g in labels]
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for values in members:
        for start in range(0, resamples, _CHUNK):
            size = min(_CHUNK, resamples - start)
            picks = rng.integers(0, len(values), size=(size, len(values)))
            totals[start:start + size] += values[picks].mean(axis=1) / len(labels)
    low, high = np.quantile(totals, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    difference: float     # macro average of a - b over the paired queries
    ci: tuple[float, float]
    p: float              # two-sided, sign-flip randomization
    queries: int          # paired rows


def paired_test(a: np.ndarray, b: np.ndarray, group: np.ndarray, level: float = 0.95, resamples: int = RESAMPLES,
                seed: int = 0) -> Paired:
    """Randomization p and bootstrap interval of macro(a - b) over queries that have a value in both."""
    a, b, group = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(group)
    if not (a.shape == b.shape == group.shape):
        raise BadValue(f"paired values differ in shape: {a.shape}, {b.shape}, groups {group.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d, g = a[keep] - b[keep], group[keep]
    if d.size == 0:
        return Paired(math.nan, (math.nan, math.nan), math.nan, 0)
    return Paired(macro_difference(d, g), paired_bootstrap_ci(d, g, level, resamples, seed),
                  paired_randomization_test(d, g, resamples, seed), int(d.size))
