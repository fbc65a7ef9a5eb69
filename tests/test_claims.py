"""The paper's claims in standard errors (reporting/claims.py): Welch's SE against scipy, the verdict rule."""

import math

import pytest
from scipy import stats

from hybrid_retrieval.reporting.claims import check_claims, claims_markdown, verdict, welch_se
from hybrid_retrieval.reporting.report import Report, Row

KEY = "val/xquad_r"


def _row(sampler: str, mo: list[float], cr: list[float], mul: list[float], rd: list[float]) -> Row:
    return Row(label=f"sampler={sampler}", run_ids=[f"{sampler}{i}" for i in range(len(mo))],
               seeds=[str(42 + i) for i in range(len(mo))], stage="trained",
               values={f"{KEY}/mono/map": mo, f"{KEY}/cross/map": cr, f"{KEY}/multi/map": mul,
                       f"{KEY}/multi/rank_distance": rd})


def _report(rows: list[Row]) -> Report:
    return Report(rows=rows, sets=[("xquad_r", "lareqa")], swept=["sampler.name"], at="last")


MONO = _row("mono", [0.82, 0.83, 0.81], [0.69, 0.70, 0.68], [0.48, 0.49, 0.47], [510.0, 520.0, 500.0])
CROSS = _row("cross", [0.80, 0.81, 0.80], [0.71, 0.70, 0.71], [0.60, 0.59, 0.61], [330.0, 340.0, 320.0])
HYBRID = _row("hybrid", [0.81, 0.81, 0.81], [0.70, 0.71, 0.71], [0.58, 0.60, 0.59], [340.0, 345.0, 335.0])


def test_welch_se_is_the_denominator_of_scipys_welch_t() -> None:
    key = f"{KEY}/multi/map"
    se = welch_se(HYBRID, MONO, key)
    t = stats.ttest_ind(HYBRID.values[key], MONO.values[key], equal_var=False).statistic
    assert (HYBRID.mean(key) - MONO.mean(key)) / se == pytest.approx(t, rel=1e-12)
    # by hand: both rows have sample std 0.01 over 3 seeds -> sqrt(2 * 0.0001 / 3)
    assert se == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3), rel=1e-9)


def test_claims_on_a_hand_built_comparison() -> None:
    checked = {c.claim.text: c for c in check_claims(_report([MONO, CROSS, HYBRID]))}
    mono_wins = checked["X-X-mono wins monolingual quality over X-Y"]
    assert mono_wins.difference == pytest.approx(0.82 - 0.80333333, abs=1e-6)
    assert mono_wins.verdict == "holds"  # stds 0.01 and 0.00577: SE 0.00667, z = 2.5
    assert mono_wins.z == pytest.approx(0.0166667 / math.sqrt(0.01 ** 2 / 3 + 0.0057735 ** 2 / 3), rel=1e-4)
    bias = checked["hybrid has less language bias than X-X-mono"]
    assert bias.difference == pytest.approx(510.0 - 340.0)  # positive = hybrid better (lower rank distance)
    assert bias.verdict == "holds"
    near_mo = checked["hybrid at or near X-X-mono's monolingual quality"]
    assert near_mo.difference == pytest.approx(-0.01)
    # hybrid's seeds do not vary: SE = mono's std / sqrt(3) = 0.01 / 1.732; z = -1.73 -> within 2 SE
    assert near_mo.z == pytest.approx(-0.01 / (0.01 / math.sqrt(3)), rel=1e-6)
    assert near_mo.verdict == "holds (within 2 SE)"
    assert checked["hybrid at or near X-Y's cross-lingual quality"].verdict == "holds (not below)"


def test_verdict_rule_boundaries() -> None:
    assert verdict("direction", 0.02, 0.01) == "holds"
    assert verdict("direction", -0.02, 0.01) == "reversed"
    assert verdict("direction", 0.019, 0.01) == "not separated (|z| < 2)"
    assert verdict("near", 0.0, 0.01) == "holds (not below)"
    assert verdict("near", -0.019, 0.01) == "holds (within 2 SE)"
    assert verdict("near", -0.02, 0.01) == "does not hold"
    assert verdict("near", -0.01, math.nan) == "fewer than 2 seeds: no SE"


def test_one_seed_rows_get_no_se_and_missing_samplers_no_table() -> None:
    single = _row("mono", [0.82], [0.69], [0.48], [510.0])
    checked = check_claims(_report([single, CROSS, HYBRID]))
    assert all(math.isnan(c.se) for c in checked if "mono" in (c.claim.a, c.claim.b))
    assert claims_markdown(_report([MONO, HYBRID])) is None
    table = claims_markdown(_report([MONO, CROSS, HYBRID]))
    assert table.count("\n| ") == 1 + 7 and "X-Y has less language bias" in table
