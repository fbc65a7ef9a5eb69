"""Hard negatives mined with a model: for each training query, a passage the model ranks high that is not its answer.

The pool is every distinct passage of the training data. Each query is searched (FAISS, inner product of
L2-normalised embeddings) against the pool, or against its own language's part of it (``same_language``, the
usual lever for monolingual quality). A candidate is skipped when it belongs to the query's translation group
(with parallel data a passage of the group is the answer in another language: a positive, never a negative), when
its text is the query's own passage, when its rank lies outside ``rank_window`` (1-based ranks in the query's full
ranking, positives included: ``[2, 30]`` skips the very top, where unlabelled answers hide) and when its score is
not below ``max_score_ratio`` times the positive's score (NV-Retriever's TopK-PercPos false-negative filter). The
best remaining candidate becomes the row's ``hard_negative``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hybrid_retrieval.config_error import BadValue

__all__ = ["MinedNegative", "MiningSettings", "mine_negatives", "passage_pool"]


@dataclass(frozen=True)
class MiningSettings:
    rank_window: tuple[int, int] = (2, 30)
    max_score_ratio: float | None = 0.95
    same_language: bool = True

    def __post_init__(self) -> None:
        low, high = self.rank_window
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
            raise BadValue(f"mining.rank_window must be [first, last] with 1 <= first <= last, got {self.rank_window}")
        ratio = self.max_score_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise BadValue(f"mining.max_score_ratio must be null or a number in (0, 1], got {ratio!r}")


@dataclass
class MinedNegative:
    """The hard negative of one query (``passage`` = -1 when none passed the filters) and why."""

    passage: int  # index into the pool
    rank: int | None = None
    score: float | None = None
    positive_score: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> candidates skipped for it


def passage_pool(texts: Sequence[str], groups: Sequence[int], languages: Sequence[int]
                 ) -> tuple[list[str], list[frozenset[int]], np.ndarray, np.ndarray]:
    """Distinct passages: (texts, the groups each is a passage of, language of each, pool index of every row)."""
    index: dict[tuple[str, int], int] = {}
    pool_texts: list[str] = []
    pool_groups: list[set[int]] = []
    pool_languages: list[int] = []
    row_to_pool = np.empty(len(texts), dtype=np.int64)
    for row, (text, group, language) in enumerate(zip(texts, groups, languages)):
        key = (text, int(language))
        if key not in index:
            index[key] = len(pool_texts)
            pool_texts.append(text)
            pool_groups.append(set())
            pool_languages.append(int(language))
        pool_groups[index[key]].add(int(group))
        row_to_pool[row] = index[key]
    return pool_texts, [frozenset(g) for g in pool_groups], np.array(pool_languages, dtype=np.int64), row_to_pool


def mine_negatives(query_emb: np.ndarray, passage_emb: np.ndarray, query_group: Sequence[int],
                   query_language: Sequence[int], positive: Sequence[int], pool_groups: Sequence[frozenset[int]],
                   pool_language: np.ndarray, settings: MiningSettings = MiningSettings()) -> list[MinedNegative]:
    """One :class:`MinedNegative` per query (rules in the module docstring).

    ``positive[i]`` is the pool index of query i's own passage; ``pool_groups[j]`` the groups passage j answers.
    Ties in score keep FAISS's order (the lower pool index first).
    """
    import faiss

    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    passage_emb = np.ascontiguousarray(passage_emb, dtype=np.float32)
    low, high = settings.rank_window
    parts = ({lang: np.flatnonzero(pool_language == lang) for lang in np.unique(pool_language)}
             if settings.same_language else {None: np.arange(len(passage_emb))})
    mined: list[MinedNegative | None] = [None] * len(query_emb)
    query_language = np.asarray(query_language)
    for lang, members in parts.items():
        queries = np.flatnonzero(query_language == lang) if lang is not None else np.arange(len(query_emb))
        if not len(queries):
            continue
        index = faiss.IndexFlatIP(passage_emb.shape[1])
        index.add(passage_emb[members])
        scores, rows = index.search(query_emb[queries], min(high, len(members)))
        for q, row_scores, row_ids in zip(queries, scores, rows):
            pos = int(positive[q])
            positive_score = float(query_emb[q] @ passage_emb[pos])
            skipped = {"translation_group": 0, "own_passage": 0, "rank_window": 0, "score_ratio": 0}
            chosen = MinedNegative(-1, positive_score=positive_score, skipped=skipped)
            for rank, (score, local) in enumerate(zip(row_scores, row_ids), start=1):
                if local < 0:
                    break
                candidate = int(members[local])
                if candidate == pos:
                    skipped["own_passage"] += 1
                elif int(query_group[q]) in pool_groups[candidate]:
                    skipped["translation_group"] += 1
                elif rank < low:
                    skipped["rank_window"] += 1
                elif settings.max_score_ratio is not None and score >= settings.max_score_ratio * positive_score:
                    skipped["score_ratio"] += 1
                else:
                    chosen.passage, chosen.rank, chosen.score = candidate, rank, float(score)
                    break
            mined[q] = chosen
    return [m if m is not None else MinedNegative(-1) for m in mined]
