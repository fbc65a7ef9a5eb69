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
"""

from __future__ import annotations

import numpy as np

METRICS = ("map", "recall_at_1", "recall_at_10", "mrr_at_10", "ndcg_at_10", "rank_distance")


def average_precision(ranks: np.ndarray) -> float:
    """AP of one query from the ranks of its relevant items (any order)."""
    ranks = np.sort(np.asarray(ranks, dtype=np.int64))
    if ranks.size == 0:
        raise ValueError("average precision needs at least one relevant item")
    hits = np.searchsorted(ranks, ranks, side="right")
    return float(np.mean(hits / ranks))


def per_query_metrics(query_index: np.ndarray, ranks: np.ndarray, n_queries: int) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each query, from flat (query, rank of one relevant item) pairs.

    Returns arrays of length ``n_queries``; a query with no relevant item among the pairs gets NaN.
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    if query_index.shape != ranks.shape:
        raise ValueError(f"query_index {query_index.shape} and ranks {ranks.shape} differ in shape")
    if ranks.size and ranks.min() < 1:
        raise ValueError("ranks are 1-based")
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
        }
    missing = count == 0
    for values in result.values():
        values[missing] = np.nan
    return result
