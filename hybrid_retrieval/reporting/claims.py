"""The paper's claims, checked on a report's mono / cross / hybrid rows with paired tests over the test queries and
Welch's test over seeds (:mod:`hybrid_retrieval.reporting.significance`).

The paper's claim (hybrid batches): X-X-mono batches win monolingual and lose multilingual quality, X-Y batches the
reverse, and hybrid batches are at or near the best in all three settings at once, with less language bias than
X-X-mono. Each claim compares two rows on the main evaluation set in two ways: the **paired** test over the test
queries (each model's per-query values averaged over its seeds; sign-flip randomization p, bootstrap 95 % interval
of the macro-averaged difference) and **Welch's** t-test over the per-seed values (Welch-Satterthwaite degrees of
freedom). Differences are signed so that positive means the first row is better (rank distance: lower is better).

Verdicts (a written rule; :data:`ALPHA` = 0.05, :data:`MARGIN` = 0.01):

- a *direction* claim ("a above b") **holds** when both tests reject "no difference" at two-sided 5 % with a
  positive difference, is **reversed** when both reject with a negative one, and is **not separated** otherwise.
  Error rate: with no true difference, "holds" (or "reversed") comes out with probability at most 2.5 % (one tail
  of each test; both must agree).
- a *near* claim ("a at or near b": non-inferiority) **holds** when the lower end of both 95 % intervals (the
  paired bootstrap and Welch's) lies above ``-MARGIN``, and **does not hold** otherwise; the row then reads how far
  below b the interval reaches. Error rate: when a is truly worse than b by ``MARGIN`` or more, "holds" comes out
  with probability at most 2.5 % per test.
- without per-query files (``per_query.npz`` in every run folder) the paired test is missing and the verdict rests
  on Welch's test alone (said in the row); with fewer than two seeds a side, on the paired test alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.reporting.comparison import COLUMNS, PREFIX, Report, Row
from hybrid_retrieval.reporting.significance import Paired, Welch, paired_test, welch_test

SAMPLERS = ("mono", "cross", "hybrid")
ALPHA = 0.05
MARGIN = 0.01             # non-inferiority margin of a near claim (mAP / nDCG@10 points)
PER_QUERY = "per_query.npz"
LABELS = {name: label for label, name in COLUMNS["lareqa"]}  # metric -> the report's column label
BETTER = "better of mono and cross"


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str            # "<setting>/<metric>" under val/<set>/ (e.g. "mono/map")
    a: str                 # sampler whose value comes first in the difference
    b: str                 # a sampler, or BETTER: whichever of mono and cross has the higher mean
    kind: str              # "direction" (a better than b) or "near" (a not worse than b by MARGIN)
    lower_is_better: bool = False


CLAIMS = (
    Claim("X-X-mono wins monolingual quality over X-Y", "mono/map", "mono", "cross", "direction"),
    Claim("X-Y wins multilingual quality over X-X-mono", "multi/map", "cross", "mono", "direction"),
    Claim("hybrid has less language bias than X-X-mono", "multi/rank_distance", "hybrid", "mono",
          "direction", lower_is_better=True),
    Claim("X-Y has less language bias than X-X-mono", "multi/rank_distance", "cross", "mono",
          "direction", lower_is_better=True),
    Claim("hybrid at or near X-X-mono's monolingual quality", "mono/map", "hybrid", "mono", "near"),
    Claim("hybrid at or near X-Y's cross-lingual quality", "cross/map", "hybrid", "cross", "near"),
    Claim("hybrid at or near X-Y's multilingual quality", "multi/map", "hybrid", "cross", "near"),
    Claim("hybrid at or near the better sampler: Mo mAP", "mono/map", "hybrid", BETTER, "near"),
    Claim("hybrid at or near the better sampler: Cr mAP", "cross/map", "hybrid", BETTER, "near"),
    Claim("hybrid at or near the better sampler: Mul mAP", "multi/map", "hybrid", BETTER, "near"),
    Claim("hybrid at or near the better sampler: Mul nDCG@10", "multi/ndcg_at_10", "hybrid", BETTER, "near"),
)


@dataclass(frozen=True)
class Checked:
    claim: Claim
    b: str                 # the sampler b resolved to
    difference: float      # mean(a) - mean(b), signed so that positive = a better
    welch: Welch           # over seeds, signed as `difference`
    paired: Paired | None  # over queries, signed as `difference`; None without per-query files
    n: tuple[int, int]
    verdict: str


def per_query_values(row: Row, set_prefix: str, setting: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(values averaged over the row's runs query by query, group of each row), or None when a run folder lacks
    its per-query file. Rows are paired by position: every run must list the same (query, group) rows."""
    if not row.folders or not all(row.folders):
        return None
    paths = [Path(folder) / f"{set_prefix}{PER_QUERY}" for folder in row.folders]
    if not all(path.is_file() for path in paths):
        return None
    values, reference = [], None
    for path in paths:
        with np.load(path) as data:
            keys = (data[f"{setting}/query"], data[f"{setting}/group"])
            if reference is None:
                reference = keys
            elif not (np.array_equal(keys[0], reference[0]) and np.array_equal(keys[1], reference[1])):
                raise BadValue(f"{path}: its {setting} queries differ from {paths[0]}'s (another evaluation set?)")
            values.append(data[f"{setting}/{metric}"].astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query NaN in every run stays NaN
        return np.nanmean(np.stack(values), axis=0), reference[1]


def sampler_rows(report: Report) -> dict[str, Row] | None:
    """The trained rows labelled ``sampler=mono`` / ``cross`` / ``hybrid``, or None unless all three are there."""
    rows = {row.label.removeprefix("sampler="): row for row in report.rows
            if row.stage == "trained" and row.label in {f"sampler={s}" for s in SAMPLERS}}
    return rows if set(rows) == set(SAMPLERS) else None


def verdict(kind: str, welch: Welch, paired: Paired | None) -> str:
    tests = [t for t in ((paired.p, paired.ci) if paired else None,
                         (welch.p, welch.ci) if math.isfinite(welch.p) else None) if t is not None]
    if not tests:
        return "no test (fewer than 2 seeds and no per-query files)"
    only = "" if len(tests) == 2 else (" (paired test only)" if paired else " (Welch only)")
    difference = paired.difference if paired else welch.difference
    if kind == "direction":
        if all(p < ALPHA for p, _ in tests):
            return ("holds" if difference > 0 else "reversed") + only
        return "not separated" + only
    lowest = min(ci[0] for _, ci in tests)
    return ("holds" if lowest > -MARGIN else f"does not hold (down to {lowest:+.3f})") + only


def check_claims(report: Report, resamples: int = 10_000) -> list[Checked] | None:
    """Every claim on the report's main evaluation set; None when the report lacks a mono, cross or hybrid row."""
    rows = sampler_rows(report)
    if rows is None or not report.sets:
        return None
    set_key = report.sets[0][0]
    checked = []
    for claim in CLAIMS:
        key = f"{PREFIX}/{set_key}/{claim.metric}"
        b_name = claim.b
        if b_name == BETTER:
            b_name = max(("mono", "cross"), key=lambda s: rows[s].mean(key) * (-1 if claim.lower_is_better else 1))
        a, b = rows[claim.a], rows[b_name]
        sign = -1.0 if claim.lower_is_better else 1.0
        welch = welch_test(sign * np.asarray(a.values.get(key, []), dtype=float),
                           sign * np.asarray(b.values.get(key, []), dtype=float))
        setting, metric = claim.metric.split("/")
        paired = None
        qa, qb = (per_query_values(row, "", setting, metric) for row in (a, b))
        if qa is not None and qb is not None:
            if not np.array_equal(qa[1], qb[1]):
                raise BadValue(f"{claim.a} and {b_name} runs were evaluated on different queries")
            paired = paired_test(sign * qa[0], sign * qb[0], qa[1], resamples=resamples)
        checked.append(Checked(claim, b_name, welch.difference, welch, paired, (a.n, b.n),
                               verdict(claim.kind, welch, paired)))
    return checked


def _interval(ci: tuple[float, float], digits: int) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if math.isfinite(ci[0]) else "—"


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def claims_markdown(report: Report, resamples: int = 10_000) -> str | None:
    """The claims table as Markdown (None when the report has no mono / cross / hybrid rows)."""
    checked = check_claims(report, resamples)
    if checked is None:
        return None
    lines = [f"**The paper's claims on {report.sets[0][0]}** (difference = first sampler minus second, positive = "
             f"first better; paired = over the test queries, seed-averaged per query: sign-flip randomization p and "
             f"bootstrap 95 % interval; Welch = over seeds: t-test p with Welch-Satterthwaite dof and 95 % interval; "
             f"verdict rule and its error rate: hybrid_retrieval/reporting/claims.py, margin {MARGIN})", "",
             "| claim | metric | vs | difference | paired 95 % CI | paired p | queries | Welch 95 % CI | Welch p "
             "(dof) | seeds | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checked:
        digits = 1 if c.claim.lower_is_better else 4
        w = c.welch
        paired = c.paired
        dof = f" ({w.dof:.1f})" if math.isfinite(w.dof) else ""
        lines.append(
            f"| {c.claim.text} | {LABELS[c.claim.metric]} | {c.b} | {c.difference:+.{digits}f} | "
            f"{_interval(paired.ci, digits) if paired else '—'} | {_p(paired.p) if paired else '—'} | "
            f"{paired.queries if paired else '—'} | {_interval(w.ci, digits)} | {_p(w.p)}{dof} | "
            f"{c.n[0]} / {c.n[1]} | {c.verdict} |")
    return "\n".join(lines) + "\n"
