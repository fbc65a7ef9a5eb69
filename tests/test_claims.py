"""Paired tests over queries and Welch's test over seeds (reporting/significance.py) against scipy and hand-worked
cases, and the claims' verdict rule (reporting/claims.py) on run folders with per-query files."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_embeddings
from hybrid_retrieval.reporting.claims import MARGIN, check_claims, claims_markdown, verdict
from hybrid_retrieval.reporting.comparison import Report, Row
from hybrid_retrieval.reporting.significance import (Paired, Welch, macro_difference, paired_bootstrap_ci,
                                                     paired_randomization_test, paired_test, welch_test)

KEY = "val/xquad_r"


def test_welch_matches_scipy_with_satterthwaite_dof() -> None:
    a, b = [0.813, 0.809, 0.817, 0.811, 0.806], [0.801, 0.812, 0.795]
    w = welch_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.t == pytest.approx(ref.statistic, rel=1e-12)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-10)
    low, high = ref.confidence_interval(0.95)
    assert w.ci == pytest.approx((low, high), rel=1e-10)
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 3
    assert w.dof == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 2), rel=1e-12)
    # the old rule (z >= 2 with n = 3) would call t = 2.5 at 2-4 dof significant; the t distribution does not
    assert 2 * stats.t.sf(2.5, 3) > 0.05


def test_welch_edge_cases() -> None:
    assert math.isnan(welch_test([0.8], [0.7, 0.71]).p)
    constant = welch_test([0.8, 0.8, 0.8], [0.7, 0.7, 0.7])
    assert constant.p == 0.0 and constant.difference == pytest.approx(0.1)
    assert welch_test([0.8, 0.8], [0.8, 0.8]).p == 1.0


def test_randomization_hand_worked() -> None:
    # one group, d = 1, 2, 3: the 8 sign sums are +-6, +-4, +-2, 0, 0; |T*| >= 6 in 2 of 8
    assert paired_randomization_test(np.array([1.0, 2.0, 3.0]), np.zeros(3)) == pytest.approx(0.25)
    # two groups, macro weights 1/2 and 1/4: T = 0.5 * 1 + 0.5 * 2 = 1.5; |T*| >= 1.5 only when all signs agree
    d, g = np.array([1.0, 2.0, 2.0]), np.array([0, 1, 1])
    assert macro_difference(d, g) == pytest.approx(1.5)
    assert paired_randomization_test(d, g) == pytest.approx(2 / 8)
    # ties at |T| count (d = 1, 1: sums 2, 0, 0, -2): p = 2 / 4
    assert paired_randomization_test(np.array([1.0, 1.0]), np.zeros(2)) == pytest.approx(0.5)


def test_randomization_exact_matches_scipy_permutation_test() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(0.5, 0.2, 12), rng.normal(0.4, 0.2, 12)
    ref = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=np.inf, alternative="two-sided")
    assert paired_randomization_test(x - y, np.zeros(12)) == pytest.approx(ref.pvalue, rel=1e-9)


def test_randomization_sampled_agrees_with_scipy() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.5, 0.3, 60), rng.normal(0.45, 0.3, 60)
    ref = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=20_000, alternative="two-sided",
                                 random_state=0)
    ours = paired_randomization_test(x - y, np.zeros(60), resamples=20_000)
    assert ours == pytest.approx(ref.pvalue, abs=0.01)
    assert 0.01 < ours < 0.99


def test_randomization_of_a_clear_difference_is_small_and_p_never_zero() -> None:
    d = np.full(500, 0.05) + np.random.default_rng(0).normal(0, 0.01, 500)
    p = paired_randomization_test(d, np.arange(500) % 5, resamples=2000)
    assert p == pytest.approx(1 / 2001)


def test_bootstrap_interval_matches_scipy_percentile_on_one_group() -> None:
    d = np.random.default_rng(5).normal(0.02, 0.1, 200)
    ours = paired_bootstrap_ci(d, np.zeros(200), resamples=20_000)
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000, random_state=0).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.002) and ours[1] == pytest.approx(ref.high, abs=0.002)


def test_bootstrap_keeps_group_sizes() -> None:
    # each group constant: every resample has the same macro value, whatever the groups' sizes
    d = np.array([0.1, 0.1, 0.1, -0.2])
    assert paired_bootstrap_ci(d, np.array([0, 0, 0, 1]), resamples=500) == pytest.approx((-0.05, -0.05))


def test_paired_test_drops_queries_missing_in_either_model() -> None:
    a = np.array([0.5, np.nan, 0.7, 0.9])
    b = np.array([0.4, 0.3, np.nan, 0.6])
    result = paired_test(a, b, np.zeros(4), resamples=100)
    assert result.queries == 2 and result.difference == pytest.approx((0.1 + 0.3) / 2)
    with pytest.raises(ValueError, match="shape"):
        paired_test(a, b[:3], np.zeros(4))


def test_verdict_rule() -> None:
    welch_yes = Welch(0.02, 0.005, 6.0, 4.0, 0.007, (0.008, 0.032))
    welch_no = Welch(0.02, 0.01, 3.0, 2.0, 0.14, (-0.012, 0.052))
    paired_yes = Paired(0.02, (0.012, 0.028), 0.0001, 1000)
    assert verdict("direction", welch_yes, paired_yes) == "holds"
    assert verdict("direction", welch_no, paired_yes) == "not separated"   # the seeds do not separate them
    flipped = Welch(-0.02, 0.005, 6.0, -4.0, 0.007, (-0.032, -0.008))
    assert verdict("direction", flipped, Paired(-0.02, (-0.03, -0.01), 0.0001, 1000)) == "reversed"
    assert verdict("near", welch_yes, paired_yes) == "holds"
    assert verdict("near", welch_no, paired_yes) == "does not hold (down to -0.012)"
    assert verdict("direction", welch_yes, None) == "holds (Welch only)"
    nan = Welch(0.02, math.nan, math.nan, math.nan, math.nan, (math.nan, math.nan))
    assert verdict("near", nan, paired_yes) == "holds (paired test only)"


def _write_run(folder: Path, quality: float, bias: float, seed: int) -> Row:
    """A run folder with a real evaluation's per_query.npz: candidates are the queries' vectors plus noise whose
    size sets quality, and a language offset whose size sets the language bias."""
    rng = np.random.default_rng(seed)
    languages, per_language, dim = ["a", "b", "c"], 40, 16
    base = rng.normal(size=(per_language, dim))
    offsets = rng.normal(size=(3, dim)) * bias
    query = np.concatenate([base + offsets[i] + rng.normal(size=base.shape) * quality for i in range(3)])
    candidate = np.concatenate([base + offsets[i] + rng.normal(size=base.shape) * quality for i in range(3)])
    language = np.repeat(np.arange(3), per_language)
    relevant = [np.array([i % per_language + per_language * k for k in range(3)]) for i in range(3 * per_language)]
    result = evaluate_embeddings(query, candidate, language, language, relevant, languages)
    folder.mkdir(parents=True)
    result.save_per_query(folder / "per_query.npz")
    return result


def _row(tmp_path: Path, sampler: str, quality: float, bias: float) -> Row:
    folders, values = [], {}
    for seed in range(3):
        folder = tmp_path / f"{sampler}_{seed}"
        result = _write_run(folder, quality, bias, seed)
        folders.append(str(folder))
        for setting, metrics in result.summary.items():
            for metric, value in metrics.items():
                values.setdefault(f"{KEY}/{setting}/{metric}", []).append(value)
    return Row(f"sampler={sampler}", [f"{sampler}{s}" for s in range(3)], ["42", "43", "44"], "trained",
               values, folders)


def test_claims_from_run_folders(tmp_path: Path) -> None:
    # the same queries for every model (seeded by seed); mono: strong language offsets, cross: none, hybrid: small
    mono = _row(tmp_path, "mono", 0.3, 1.5)
    cross = _row(tmp_path, "cross", 0.3, 0.0)
    hybrid = _row(tmp_path, "hybrid", 0.3, 0.3)
    report = Report([mono, cross, hybrid], [("xquad_r", "lareqa")], ["sampler.name"], "last")
    checked = {c.claim.text: c for c in check_claims(report, resamples=2000)}
    bias = checked["X-Y has less language bias than X-X-mono"]
    assert bias.paired is not None and bias.paired.queries == 120
    assert bias.verdict == "holds" and bias.difference > 0
    # the paired difference is the difference of the rows' seed means (the macro average is linear)
    mul = checked["X-Y wins multilingual quality over X-X-mono"]
    assert mul.paired.difference == pytest.approx(mul.difference, abs=1e-12)
    assert mul.welch.p == pytest.approx(stats.ttest_ind(cross.values[f"{KEY}/multi/map"],
                                                        mono.values[f"{KEY}/multi/map"], equal_var=False).pvalue)
    better = checked["hybrid at or near the better sampler: Mul mAP"]
    assert better.b == "cross"
    table = claims_markdown(report, resamples=500)
    assert table.count("\n| ") == 1 + 11 and f"margin {MARGIN}" in table


def test_claims_without_per_query_files_use_welch_only(tmp_path: Path) -> None:
    def row(sampler: str, mo: list[float]) -> Row:
        return Row(f"sampler={sampler}", [sampler] * 3, ["42", "43", "44"], "trained",
                   {f"{KEY}/{s}/{m}": mo for s, m in itertools.product(("mono", "cross", "multi"),
                                                                       ("map", "ndcg_at_10", "rank_distance"))})
    report = Report([row("mono", [0.82, 0.83, 0.81]), row("cross", [0.70, 0.71, 0.69]),
                     row("hybrid", [0.81, 0.81, 0.80])], [("xquad_r", "lareqa")], ["sampler.name"], "last")
    checked = check_claims(report)
    assert all(c.paired is None and "(Welch only)" in c.verdict for c in checked)
    assert claims_markdown(Report(report.rows[:2], report.sets, report.swept, "last")) is None
