"""Ranking metrics as pure functions of the ranks of the relevant candidates.

A query's relevant candidates and their 1-based ranks (tie rule of :mod:`hybrid_retrieval.evaluation.ranks`:
tied candidates take the last position of their group) determine every metric here:

- AP: mean over the relevant items of precision at that item's rank, over the full ranking (no cut-off);
  ``hits / rank`` where ``hits`` counts the relevant items ranked at or above it. Equals scikit-learn's
  ``average_precision_score``, ties included.
- R@k: fraction of the relevant items ranked within the top k (so with 11 relevant items R@10 <= 10/11).
- MRR@10: 1 / rank of the best relevant item, 0 beyond rank 10.
- nDCG@10: binary gains, ``sum 1/log2(1 + rank)`` over relevant items in the top 10, divided by the ideal
  ``sum_{i <= min(R, 10)} 1/log2(1 + i)``.
- rank distance: max rank minus min rank of the query's relevant items (language bias, multilingual setting).
- Max@R (``max_at_r``): the worst rank among the query's relevant items, i.e. how deep one must read the
  pooled ranking to have retrieved every one of its parallel relevant items (arXiv 2604.05684; multilingual
  setting; lower is better).
- own-language-first rate (``own_language_first``, :func:`own_language_first`): 1 when the query's best-ranked
  relevant item is in the query's own language, else 0; a tie for the best rank counts for the own language.
  Averaged, the share of queries that prefer their own language (arXiv 2605.07249's language preference;
  multilingual setting; an unbiased model sits near 1 / the number of languages a query's relevant items span).
"""

from __future__ import annotations

import numpy as np

from hybrid_retrieval.config_error import BadValue

RANKING_METRICS = ("map", "recall_at_1", "recall_at_10", "mrr_at_10", "ndcg_at_10")
BIAS_METRICS = ("rank_distance", "max_at_r", "own_language_first")  # multilingual setting only
METRICS = (*RANKING_METRICS, *BIAS_METRICS[:2])  # per_query_metrics' outputs


def average_precision(ranks: np.ndarray) -> float:
    """AP of one query from the ranks of its relevant items (any order)."""
    ranks = np.sort(np.asarray(ranks, dtype=np.int64))
    if ranks.size == 0:
        raise BadValue("average precision needs at least one relevant item")
    hits = np.searchsorted(ranks, ranks, side="right")
    return float(np.mean(hits / ranks))


def per_query_metrics(query_index: np.ndarray, ranks: np.ndarray, n_queries: int) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each query, from flat (query, rank of one relevant item) pairs.

    Returns arrays of length ``n_queries``; a query with no relevant item among the pairs gets NaN.
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    if query_index.shape != ranks.shape:
        raise BadValue(f"query_index {query_index.shape} and ranks {ranks.shape} differ in shape")
    if ranks.size and ranks.min() < 1:
        raise BadValue("ranks are 1-based")
    order = np.lexsort((ranks, query_index))
    query_index, ranks = query_index[order], ranks[order]
    # One sortable key per (query, rank): hits = relevant items of the same query ranked at or above.
    key = query_index * (int(ranks.max(initial=0)) + 1) + ranks
    first = np.searchsorted(query_index, query_index, side="left")
    hits = np.searchsorted(key, key, side="right") - first

    count = np.bincount(query_index, minlength=n_queries).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        def mean_of(values: np.ndarray) -> np.ndarray:
            return np.bincount(query_index, weights=values, minlength=n_queries) / count

        best = np.full(n_queries, np.iinfo(np.int64).max)
        np.minimum.at(best, query_index, ranks)
        worst = np.zeros(n_queries, dtype=np.int64)
        np.maximum.at(worst, query_index, ranks)
        gains = np.where(ranks <= 10, 1.0 / np.log2(1.0 + ranks), 0.0)
        ideal_curve = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(2.0 + np.arange(10)))])
        ideal = ideal_curve[np.minimum(count, 10).astype(np.int64)]
        result = {
            "map": mean_of(hits / ranks),
            "recall_at_1": mean_of((ranks <= 1).astype(np.float64)),
            "recall_at_10": mean_of((ranks <= 10).astype(np.float64)),
            "mrr_at_10": np.where(best <= 10, 1.0 / best, 0.0),
            "ndcg_at_10": np.bincount(query_index, weights=gains, minlength=n_queries) / ideal,
            "rank_distance": (worst - best).astype(np.float64),
            "max_at_r": worst.astype(np.float64),
        }
    missing = count == 0
    for values in result.values():
        values[missing] = np.nan
    return result


def own_language_first(query_index: np.ndarray, ranks: np.ndarray, candidate_language: np.ndarray,
                       query_language: np.ndarray, n_queries: int) -> np.ndarray:
    """Per query: 1.0 when a relevant item in the query's own language holds the best rank among its relevant
    items (ties for that rank count), 0.0 when none does, NaN for a query with no relevant item or none in its own
    language (it has no own-language item to prefer).

    Flat inputs as in :func:`per_query_metrics`, plus each pair's candidate language and each query's language.
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    candidate_language = np.asarray(candidate_language, dtype=np.int64)
    query_language = np.asarray(query_language, dtype=np.int64)
    best = np.full(n_queries, np.iinfo(np.int64).max)
    np.minimum.at(best, query_index, ranks)
    own = candidate_language == query_language[query_index]
    has_own = np.zeros(n_queries, dtype=bool)
    has_own[query_index[own]] = True
    first = np.zeros(n_queries, dtype=bool)
    first[query_index[own & (ranks == best[query_index])]] = True
    return np.where(has_own, first.astype(np.float64), np.nan)
