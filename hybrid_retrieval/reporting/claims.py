"""The paper's claims, checked on a report's mono / cross / hybrid rows, in standard errors.

The paper's claim (hybrid batches): X-X-mono batches win monolingual and lose multilingual quality, X-Y batches the
reverse, and hybrid batches are at or near the best in all three settings at once, with less language bias than
X-X-mono. Each claim here is the difference of two rows' means on the main evaluation set. Its standard error is
Welch's, ``sqrt(s_a²/n_a + s_b²/n_b)`` with the sample standard deviations over seeds, and ``z = difference / SE``.

Verdicts (a written rule, so a reader can recompute them from ``report.csv``):

- a *direction* claim ("a above b") holds when z ≥ 2, is reversed when z ≤ −2, and is "not separated" otherwise;
- a *nearness* claim ("hybrid at or near the best") holds when hybrid is not below the other row (difference ≥ 0)
  or is within 2 SE of it (z > −2), and does not hold when z ≤ −2;
- with fewer than two seeds in either row there is no SE: the verdict says so and only the difference is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid_retrieval.reporting.report import COLUMNS, PREFIX, Report, Row

SAMPLERS = ("mono", "cross", "hybrid")
Z = 2.0  # two standard errors: the line between "separated" and "within the seed noise"
LABELS = {name: label for label, name in COLUMNS["lareqa"]}  # metric -> the report's column label


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str            # metric name under val/<set>/ (e.g. "mono/map")
    a: str                 # sampler whose mean comes first in the difference
    b: str
    kind: str              # "direction" (a better than b) or "near" (a at or near b)
    lower_is_better: bool = False


CLAIMS = (
    Claim("X-X-mono wins monolingual quality over X-Y", "mono/map", "mono", "cross", "direction"),
    Claim("X-Y wins multilingual quality over X-X-mono", "multi/map", "cross", "mono", "direction"),
    Claim("hybrid at or near X-X-mono's monolingual quality", "mono/map", "hybrid", "mono", "near"),
    Claim("hybrid at or near X-Y's cross-lingual quality", "cross/map", "hybrid", "cross", "near"),
    Claim("hybrid at or near X-Y's multilingual quality", "multi/map", "hybrid", "cross", "near"),
    Claim("hybrid has less language bias than X-X-mono", "multi/rank_distance", "hybrid", "mono",
          "direction", lower_is_better=True),
    Claim("X-Y has less language bias than X-X-mono", "multi/rank_distance", "cross", "mono",
          "direction", lower_is_better=True),
)


@dataclass(frozen=True)
class Checked:
    claim: Claim
    difference: float      # mean(a) - mean(b), signed so that positive = a better (rank distance: b - a)
    se: float              # nan when a row has fewer than two seeds
    n: tuple[int, int]
    verdict: str

    @property
    def z(self) -> float:
        return z_value(self.difference, self.se)


def z_value(difference: float, se: float) -> float:
    """difference / SE; ±inf for a non-zero difference between rows whose seeds do not vary at all."""
    if se > 0:
        return difference / se
    return math.copysign(math.inf, difference) if difference else 0.0


def welch_se(a: Row, b: Row, key: str) -> float:
    """Standard error of the difference of the two rows' means (nan when either has fewer than two values)."""
    sa, sb = a.std(key), b.std(key)
    na, nb = (sum(math.isfinite(v) for v in row.values.get(key, [])) for row in (a, b))
    if not (math.isfinite(sa) and math.isfinite(sb)):
        return math.nan
    return math.sqrt(sa * sa / na + sb * sb / nb)


def verdict(kind: str, difference: float, se: float) -> str:
    if not math.isfinite(difference):
        return "no value"
    if not math.isfinite(se):
        return "fewer than 2 seeds: no SE"
    z = z_value(difference, se)
    if kind == "direction":
        return "holds" if z >= Z else "reversed" if z <= -Z else "not separated (|z| < 2)"
    if difference >= 0:
        return "holds (not below)"
    return "holds (within 2 SE)" if z > -Z else "does not hold"


def sampler_rows(report: Report) -> dict[str, Row] | None:
    """The trained rows labelled ``sampler=mono`` / ``cross`` / ``hybrid``, or None unless all three are there."""
    rows = {row.label.removeprefix("sampler="): row for row in report.rows
            if row.stage == "trained" and row.label in {f"sampler={s}" for s in SAMPLERS}}
    return rows if set(rows) == set(SAMPLERS) else None


def check_claims(report: Report) -> list[Checked] | None:
    """Every claim on the report's main evaluation set; None when the report lacks a mono, cross or hybrid row."""
    rows = sampler_rows(report)
    if rows is None or not report.sets:
        return None
    set_key = report.sets[0][0]
    checked = []
    for claim in CLAIMS:
        key = f"{PREFIX}/{set_key}/{claim.metric}"
        a, b = rows[claim.a], rows[claim.b]
        difference = a.mean(key) - b.mean(key)
        if claim.lower_is_better:
            difference = -difference
        se = welch_se(a, b, key)
        checked.append(Checked(claim, difference, se, (a.n, b.n), verdict(claim.kind, difference, se)))
    return checked


def claims_markdown(report: Report) -> str | None:
    """The claims table as Markdown (None when the report has no mono / cross / hybrid rows)."""
    checked = check_claims(report)
    if checked is None:
        return None
    lines = [f"**The paper's claims on {report.sets[0][0]}** (difference of means, positive = the first sampler "
             "better; SE = Welch's over seeds; verdict rule: hybrid_retrieval/reporting/claims.py)", "",
             "| claim | metric | difference | SE | z | seeds | verdict |", "|---|---|---|---|---|---|---|"]
    for c in checked:
        digits = 1 if c.claim.lower_is_better else 3
        se = f"{c.se:.{digits + 1}f}" if math.isfinite(c.se) else "—"
        z = f"{c.z:+.1f}" if c.se > 0 else "—"
        lines.append(f"| {c.claim.text} | {LABELS[c.claim.metric]} | {c.difference:+.{digits}f} | {se} | {z} | "
                     f"{c.n[0]} / {c.n[1]} | {c.verdict} |")
    return "\n".join(lines) + "\n"
