"""Exact ranks of each query's relevant candidates, the only thing the ranking metrics need.

Every metric of the evaluation protocol (AP over the full ranking, R@k, MRR@10, nDCG@10, rank distance) is a
function of where the relevant candidates land in a ranking. So instead of sorting full rankings per query and
per setting, one counting pass over the score matrix records, for every (query, relevant candidate) pair:

- ``rank_in_language``: its rank among the candidates of its own language (monolingual and cross-lingual
  settings: queries in X against the candidates of one language Y);
- ``rank_overall``: its rank in the pool of all languages (multilingual setting).

Tie rule: a candidate's rank is the number of candidates scoring at least as high as it (itself included), i.e.
tied candidates all take the last position of their tie group. With it, AP equals scikit-learn's
``average_precision_score`` (one threshold per distinct score), ties included.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numba
import numpy as np

from hybrid_retrieval.config_error import BadValue


@dataclass(frozen=True)
class RelevantRanks:
    """Ranks of every (query, relevant candidate) pair; flat arrays of equal length, ordered by query."""

    query_index: np.ndarray  # int64, query of the pair
    candidate_index: np.ndarray  # int64, relevant candidate of the pair
    candidate_language: np.ndarray  # int64, language id of that candidate
    rank_in_language: np.ndarray  # int64, 1-based rank among candidates of that language
    rank_overall: np.ndarray  # int64, 1-based rank among all candidates


def pad_relevant(relevant: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged relevant lists -> (indices padded with 0, mask of real entries), both (queries, max relevant)."""
    width = max((len(r) for r in relevant), default=0)
    padded = np.zeros((len(relevant), max(width, 1)), dtype=np.int64)
    mask = np.zeros_like(padded, dtype=bool)
    for i, rel in enumerate(relevant):
        padded[i, : len(rel)] = rel
        mask[i, : len(rel)] = True
    return padded, mask


def _validate(query_emb: np.ndarray, candidate_emb: np.ndarray, candidate_language: np.ndarray,
              relevant: Sequence[np.ndarray]) -> None:
    if query_emb.ndim != 2 or candidate_emb.ndim != 2 or query_emb.shape[1] != candidate_emb.shape[1]:
        raise BadValue(
            f"embeddings must be 2-D with the same width; got queries {query_emb.shape}, "
            f"candidates {candidate_emb.shape}")
    if len(relevant) != len(query_emb):
        raise BadValue(f"relevant has {len(relevant)} entries for {len(query_emb)} queries")
    if len(candidate_language) != len(candidate_emb):
        raise BadValue(
            f"candidate_language has {len(candidate_language)} entries for {len(candidate_emb)} candidates")
    if len(candidate_language) and candidate_language.min() < 0:
        raise BadValue("candidate_language holds negative language ids; expected ids 0, 1, 2, ...")
    for name, emb in (("query", query_emb), ("candidate", candidate_emb)):
        if not np.isfinite(emb).all():
            raise BadValue(f"{name} embeddings hold NaN or infinite values; ranks would be undefined")
    lengths = np.fromiter((len(rel) for rel in relevant), dtype=np.int64, count=len(relevant))
    if np.any(lengths == 0):
        raise BadValue(f"query {int(np.argmin(lengths))} has no relevant candidate")
    if len(relevant):
        flat = np.concatenate([np.asarray(rel, dtype=np.int64) for rel in relevant])
        outside = (flat < 0) | (flat >= len(candidate_emb))
        if outside.any():
            query = int(np.searchsorted(np.cumsum(lengths), np.argmax(outside), side="right"))
            raise BadValue(f"query {query} has a relevant index outside 0..{len(candidate_emb) - 1}")


def score_chunks(query_emb: np.ndarray, candidate_emb: np.ndarray,
                 chunk_size: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
    """Inner-product scores, ``chunk_size`` queries at a time: yields (first query index, scores block).

    The block is a reused buffer: consume it before asking for the next one.
    """
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    candidate_t = np.ascontiguousarray(np.asarray(candidate_emb, dtype=np.float32).T)
    buffer = np.empty((min(chunk_size, max(len(query_emb), 1)), candidate_t.shape[1]), dtype=np.float32)
    for start in range(0, len(query_emb), chunk_size):
        stop = min(start + chunk_size, len(query_emb))
        block = buffer[: stop - start]
        np.matmul(query_emb[start:stop], candidate_t, out=block)
        yield start, block


@numba.njit(nogil=True, cache=True)
def _count_at_least(scores: np.ndarray, threshold: float) -> int:  # pragma: no cover - compiled
    count = 0
    for c in range(scores.shape[0]):
        count += scores[c] >= threshold  # branch-free, so the loop compiles to SIMD compares
    return count


@numba.njit(nogil=True, cache=True)
def _count_ranks(block: np.ndarray, thresholds: np.ndarray, width: np.ndarray, threshold_language: np.ndarray,
                 bounds: np.ndarray, rank_overall: np.ndarray,
                 rank_in_language: np.ndarray) -> None:  # pragma: no cover - compiled
    """For each row and each of its ``width`` thresholds: how many scores are >= it, per language segment.

    Columns are grouped by language (``bounds[l]:bounds[l + 1]`` is language l), so each count is a
    contiguous SIMD scan; its own language's count is the in-language rank, the sum over languages the
    overall rank. The row stays in cache across its thresholds, so the cost is about one read of the block.
    """
    n_languages = len(bounds) - 1
    for i in range(block.shape[0]):
        row = block[i]
        for j in range(width[i]):
            threshold = thresholds[i, j]
            total = 0
            for language in range(n_languages):
                count = _count_at_least(row[bounds[language]:bounds[language + 1]], threshold)
                total += count
                if language == threshold_language[i, j]:
                    rank_in_language[i, j] = count
            rank_overall[i, j] = total


def relevant_ranks(query_emb: np.ndarray, candidate_emb: np.ndarray, candidate_language: np.ndarray,
                   relevant: Sequence[np.ndarray], chunk_size: int = 1024,
                   num_threads: int = 2) -> RelevantRanks:
    """Exact ranks of each query's relevant candidates under inner-product scoring.

    Candidates are grouped by language, scores computed one chunk of queries at a time (one BLAS matmul,
    :func:`score_chunks`), and a compiled pass counts, per row, the scores at or above each relevant score in
    each language. No sorting of score rows; rows of a chunk are split over ``num_threads`` threads.
    Identical to :func:`relevant_ranks_reference`, ties included.
    """
    candidate_language = np.asarray(candidate_language, dtype=np.int64)
    _validate(query_emb, candidate_emb, candidate_language, relevant)
    order = np.argsort(candidate_language, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    counts = np.bincount(candidate_language) if len(candidate_language) else np.zeros(1, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    padded, mask = pad_relevant(relevant)
    width = mask.sum(axis=1).astype(np.int64)
    padded_lang = candidate_language[padded]
    padded_position = position[padded]
    rank_in_language = np.zeros(padded.shape, dtype=np.int64)
    rank_overall = np.zeros(padded.shape, dtype=np.int64)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start, block in score_chunks(query_emb, np.asarray(candidate_emb)[order], chunk_size):
            stop = start + len(block)
            # Thresholds are read back from the same matrix so they compare bit-exactly with it.
            thresholds = np.take_along_axis(block, padded_position[start:stop], axis=1)

            def count(rows: range, start: int = start, block: np.ndarray = block,
                      thresholds: np.ndarray = thresholds) -> None:
                lo, hi = start + rows.start, start + rows.stop
                _count_ranks(block[rows.start:rows.stop], thresholds[rows.start:rows.stop], width[lo:hi],
                             padded_lang[lo:hi], bounds, rank_overall[lo:hi], rank_in_language[lo:hi])

            step = -(-len(block) // max(1, num_threads))
            list(pool.map(count, [range(lo, min(lo + step, len(block))) for lo in range(0, len(block), step)]))

    rows, cols = np.nonzero(mask)
    return RelevantRanks(
        query_index=rows.astype(np.int64),
        candidate_index=padded[rows, cols],
        candidate_language=padded_lang[rows, cols],
        rank_in_language=rank_in_language[rows, cols],
        rank_overall=rank_overall[rows, cols],
    )


def relevant_ranks_reference(scores: np.ndarray, candidate_language: np.ndarray,
                             relevant: Sequence[np.ndarray]) -> RelevantRanks:
    """The straightforward computation, one query at a time: sort its scores, read ranks off the sorted lists.

    Kept as the independent check of :func:`relevant_ranks` (tests and ``benchmarks/bench_metrics.py``);
    ``scores`` is the full (queries x candidates) matrix, e.g. the blocks of :func:`score_chunks` stacked.
    """
    candidate_language = np.asarray(candidate_language, dtype=np.int64)
    out: dict[str, list[int]] = {k: [] for k in RelevantRanks.__dataclass_fields__}
    for q, rel in enumerate(relevant):
        row = scores[q]
        descending = -np.sort(-row)
        for c in rel:
            within = -np.sort(-row[candidate_language == candidate_language[c]])
            out["query_index"].append(q)
            out["candidate_index"].append(int(c))
            out["candidate_language"].append(int(candidate_language[c]))
            # Tied candidates take the last position of their group: count everything scoring >= it.
            out["rank_overall"].append(int(np.count_nonzero(descending >= row[c])))
            out["rank_in_language"].append(int(np.count_nonzero(within >= row[c])))
    return RelevantRanks(**{k: np.asarray(v, dtype=np.int64) for k, v in out.items()})
