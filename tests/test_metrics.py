"""Exactness of the ranking metrics and the fast rank pass, against scikit-learn and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, ndcg_score

from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_embeddings
from hybrid_retrieval.evaluation.index import CandidateIndex
from hybrid_retrieval.evaluation.metrics import average_precision, per_query_metrics
from hybrid_retrieval.evaluation.ranks import relevant_ranks, relevant_ranks_reference, score_chunks


def pessimistic_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Rank of each relevant item = number of items scoring at least as high (ties take the last place)."""
    return np.array([np.count_nonzero(scores >= scores[r]) for r in relevant])


def test_hand_worked_average_precision() -> None:
    assert average_precision([1]) == 1.0
    assert average_precision([2]) == 0.5
    assert average_precision([1, 3]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([3, 1]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([2, 4, 10]) == pytest.approx((1 / 2 + 2 / 4 + 3 / 10) / 3)


def test_hand_worked_ties() -> None:
    # scores: a=.9 (not relevant), b=.9 (relevant), c=.5 (relevant), d=.1
    # tie rule: a and b share the threshold .9 -> b's rank is 2; c's rank is 3.
    scores = np.array([0.9, 0.9, 0.5, 0.1])
    labels = np.array([0, 1, 1, 0])
    ranks = pessimistic_ranks(scores, np.flatnonzero(labels))
    assert list(ranks) == [2, 3]
    expected = (1 / 2 + 2 / 3) / 2
    assert average_precision(ranks) == pytest.approx(expected)
    assert average_precision_score(labels, scores) == pytest.approx(expected)
    # two relevant items tied with each other at the top: both at rank 2, precision 2/2.
    assert average_precision(pessimistic_ranks(np.array([0.7, 0.7, 0.2]), np.array([0, 1]))) == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_average_precision_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    # Coarse scores force many ties.
    scores = rng.integers(0, int(rng.integers(2, 8)), size=n).astype(np.float64)
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    if not labels.any():
        labels[rng.integers(n)] = True
    ranks = pessimistic_ranks(scores, np.flatnonzero(labels))
    assert average_precision(ranks) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_per_query_metrics_match_independent_formulas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_queries, n_items = 12, 40
    scores = rng.standard_normal((n_queries, n_items))  # continuous: no ties, so sklearn's nDCG applies
    labels = rng.random((n_queries, n_items)) < 0.1
    labels[np.arange(n_queries), rng.integers(0, n_items, n_queries)] = True
    labels[3] = False  # a query without relevant items gets NaN
    qi, rk = [], []
    for q in range(n_queries):
        r = pessimistic_ranks(scores[q], np.flatnonzero(labels[q]))
        qi += [q] * len(r)
        rk += list(r)
    got = per_query_metrics(np.array(qi), np.array(rk), n_queries)
    for q in range(n_queries):
        if q == 3:
            assert all(np.isnan(v[q]) for v in got.values())
            continue
        order = np.argsort(-scores[q])
        ranked = labels[q][order]
        rel_ranks = np.flatnonzero(ranked) + 1
        assert got["map"][q] == pytest.approx(average_precision_score(labels[q], scores[q]))
        assert got["recall_at_1"][q] == pytest.approx(ranked[:1].sum() / labels[q].sum())
        assert got["recall_at_10"][q] == pytest.approx(ranked[:10].sum() / labels[q].sum())
        assert got["mrr_at_10"][q] == pytest.approx(1 / rel_ranks[0] if rel_ranks[0] <= 10 else 0.0)
        assert got["ndcg_at_10"][q] == pytest.approx(ndcg_score(labels[q][None].astype(float), scores[q][None], k=10))
        assert got["rank_distance"][q] == rel_ranks[-1] - rel_ranks[0]


def test_hand_worked_ndcg_and_mrr() -> None:
    got = per_query_metrics(np.array([0, 0]), np.array([2, 11]), 1)
    ideal = 1 + 1 / np.log2(3)
    assert got["ndcg_at_10"][0] == pytest.approx((1 / np.log2(3)) / ideal)
    assert got["mrr_at_10"][0] == 0.5
    assert got["recall_at_10"][0] == 0.5
    assert got["rank_distance"][0] == 9


def random_retrieval_problem(seed: int, n_queries: int = 70, n_candidates: int = 90, n_lang: int = 4,
                             quantise: bool = False):
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((n_queries, 16)).astype(np.float32)
    candidates = rng.standard_normal((n_candidates, 16)).astype(np.float32)
    if quantise:  # small integer vectors: many exactly tied scores
        queries = np.round(queries).clip(-1, 1)
        candidates = np.round(candidates).clip(-1, 1)
    cand_lang = rng.integers(0, n_lang, n_candidates)
    query_lang = rng.integers(0, n_lang, n_queries)
    relevant = [np.sort(rng.choice(n_candidates, int(rng.integers(1, 6)), replace=False))
                for _ in range(n_queries)]
    return queries, candidates, query_lang, cand_lang, relevant


@pytest.mark.parametrize("seed,quantise,chunk", [(0, False, 1024), (1, True, 1024), (2, True, 7),
                                                 (3, False, 1), (4, True, 33)])
def test_fast_ranks_identical_to_reference(seed: int, quantise: bool, chunk: int) -> None:
    q, c, _, cl, rel = random_retrieval_problem(seed, quantise=quantise)
    scores = np.concatenate([b.copy() for _, b in score_chunks(q, c, chunk)])
    fast = relevant_ranks(q, c, cl, rel, chunk_size=chunk)
    ref = relevant_ranks_reference(scores, cl, rel)
    for name in ("query_index", "candidate_index", "candidate_language", "rank_in_language", "rank_overall"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(ref, name), err_msg=name)


def straightforward_protocol(q, c, query_lang, cand_lang, relevant, languages):
    """The protocol written out setting by setting with scikit-learn's AP (independent of the fast path)."""
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    labels = np.zeros(scores.shape, dtype=bool)
    for i, r in enumerate(relevant):
        labels[i, r] = True
    per = {"mono": {}, "cross": {}, "multi": {}}
    for x, lx in enumerate(languages):
        rows = np.flatnonzero(query_lang == x)
        per["multi"][lx] = np.mean([average_precision_score(labels[i], scores[i]) for i in rows])
        for y, ly in enumerate(languages):
            cols = cand_lang == y
            aps = [average_precision_score(labels[i, cols], scores[i, cols]) for i in rows if labels[i, cols].any()]
            if aps:
                per["mono" if x == y else "cross"][lx if x == y else f"{lx}-{ly}"] = np.mean(aps)
    return per


@pytest.mark.parametrize("seed", range(5))
def test_protocol_matches_straightforward_sklearn_computation(seed: int) -> None:
    q, c, ql, cl, rel = random_retrieval_problem(seed)
    languages = ["en", "de", "zh", "sw"]
    result = evaluate_embeddings(q, c, ql, cl, rel, languages)
    expected = straightforward_protocol(q, c, ql, cl, rel, languages)
    for setting in ("mono", "cross", "multi"):
        assert set(result.per_language[setting]) == set(expected[setting])
        for key, value in expected[setting].items():
            assert result.per_language[setting][key]["map"] == pytest.approx(value, abs=1e-9)
        macro = np.mean(list(expected[setting].values()))
        assert result.summary[setting]["map"] == pytest.approx(macro, abs=1e-9)
    flat = result.flat()
    assert "multi/rank_distance" in flat and "cross/en-de/map" in flat
    assert not any("@" in k for k in flat)


def test_perfect_embeddings_score_one() -> None:
    # Each parallel group shares one direction: every relevant item ranks above every other candidate.
    n_groups, languages = 5, ["en", "de", "ar"]
    basis = np.eye(n_groups, dtype=np.float32)
    q = np.repeat(basis, len(languages), axis=0)
    c = np.repeat(basis, len(languages), axis=0)
    lang = np.tile(np.arange(len(languages)), n_groups)
    rel = [np.arange(g * 3, g * 3 + 3) for g in range(n_groups) for _ in languages]
    result = evaluate_embeddings(q, c, lang, lang, rel, languages)
    for setting in ("mono", "cross", "multi"):
        assert result.summary[setting]["map"] == 1.0
    assert result.summary["mono"]["recall_at_1"] == 1.0
    # the three relevant items tie at the top: all share rank 3 under the tie rule
    assert result.summary["multi"]["rank_distance"] == 0.0


def test_faiss_top1_agrees_with_rank_pass() -> None:
    q, c, ql, cl, rel = random_retrieval_problem(7, n_queries=200, n_candidates=300)
    ranks = relevant_ranks(q, c, cl, rel)
    _, ids = CandidateIndex(c).search(q, 1)
    top1 = {(int(qi), int(ci)) for qi, ci, r in zip(ranks.query_index, ranks.candidate_index, ranks.rank_overall)
            if r == 1}
    faiss_top1 = {(i, int(ids[i, 0])) for i in range(len(q)) if int(ids[i, 0]) in set(rel[i].tolist())}
    assert top1 == faiss_top1


def test_bad_input_is_named() -> None:
    q, c, ql, cl, rel = random_retrieval_problem(0)
    with pytest.raises(ValueError, match="relevant has"):
        evaluate_embeddings(q, c, ql, cl, rel[:-1], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="query_language"):
        evaluate_embeddings(q, c, ql + 10, cl, rel, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="no relevant"):
        evaluate_embeddings(q, c, ql, cl, [np.array([], dtype=int)] + rel[1:], ["a", "b", "c", "d"])
    outside = list(rel)
    outside[5] = np.array([0, len(c)])
    with pytest.raises(ValueError, match="query 5 has a relevant index outside"):
        evaluate_embeddings(q, c, ql, cl, outside, ["a", "b", "c", "d"])
    broken = c.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="candidate embeddings hold NaN"):
        evaluate_embeddings(q, broken, ql, cl, rel, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="negative language ids"):
        relevant_ranks(q, c, cl - 1, rel)


def test_fast_ranks_when_every_candidate_ties() -> None:
    """All scores equal: every relevant item takes the last position (pool size, language size)."""
    q = np.ones((4, 3), dtype=np.float32)
    c = np.ones((9, 3), dtype=np.float32)
    cl = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    rel = [np.array([0]), np.array([3, 8]), np.array([1, 2, 4, 5, 6]), np.array([7])]
    ranks = relevant_ranks(q, c, cl, rel, num_threads=3)
    np.testing.assert_array_equal(ranks.rank_overall, np.full(9, 9))
    np.testing.assert_array_equal(ranks.rank_in_language, [3, 2, 4, 3, 3, 2, 4, 4, 4])


def test_fast_ranks_hand_worked() -> None:
    """Scores 0.9, 0.5, 0.5, 0.1 (languages 0, 1, 0, 1); relevant: candidates 2 and 3."""
    q = np.array([[1.0]], dtype=np.float32)
    c = np.array([[0.9], [0.5], [0.5], [0.1]], dtype=np.float32)
    ranks = relevant_ranks(q, c, np.array([0, 1, 0, 1]), [np.array([2, 3])])
    # Candidate 2 ties with candidate 1: both take position 3 overall; in language 0 it is second.
    np.testing.assert_array_equal(ranks.rank_overall, [3, 4])
    np.testing.assert_array_equal(ranks.rank_in_language, [2, 2])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_queries=st.integers(1, 12), n_candidates=st.integers(1, 40),
       languages=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
       levels=st.integers(1, 4), threads=st.integers(1, 3), chunk=st.integers(1, 16))
def test_fast_ranks_property(seed: int, n_queries: int, n_candidates: int, languages: list[int], levels: int,
                             threads: int, chunk: int) -> None:
    """Any sizes, language ids with gaps, few distinct score levels (many ties), any chunking and threads."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, levels, (n_queries, 3)).astype(np.float32)
    c = rng.integers(0, levels, (n_candidates, 3)).astype(np.float32)
    cl = rng.choice(languages, n_candidates)
    rel = [rng.choice(n_candidates, int(rng.integers(1, n_candidates + 1)), replace=False)
           for _ in range(n_queries)]
    fast = relevant_ranks(q, c, cl, rel, chunk_size=chunk, num_threads=threads)
    ref = relevant_ranks_reference(q @ c.T, cl, rel)
    for name in ("query_index", "candidate_index", "candidate_language", "rank_in_language", "rank_overall"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(ref, name), err_msg=name)
