"""FAISS top-k retrieval over candidate embeddings, for ranked lists people read (error analysis, demos).

The protocol's metrics need ranks over the full ranking and come from :mod:`hybrid_retrieval.evaluation.ranks`;
this index answers "what did the model retrieve first" with an exact inner-product FAISS index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np


class CandidateIndex:
    """Exact inner-product index (``faiss.IndexFlatIP``) over candidate embeddings."""

    def __init__(self, candidate_emb: np.ndarray) -> None:
        candidate_emb = np.ascontiguousarray(candidate_emb, dtype=np.float32)
        if candidate_emb.ndim != 2:
            raise ValueError(f"candidate embeddings must be 2-D, got shape {candidate_emb.shape}")
        self.index = faiss.IndexFlatIP(candidate_emb.shape[1])
        self.index.add(candidate_emb)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, candidate indices) per query, best first."""
        query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
        return self.index.search(query_emb, min(k, len(self)))


def write_rankings(path: str | Path, split: Any, query_emb: np.ndarray, candidate_emb: np.ndarray,
                   k: int = 10, candidate_text: str = "sentence") -> Path:
    """One JSON line per query: its text, language and the top-``k`` multilingual candidates (relevant flagged)."""
    scores, ids = CandidateIndex(candidate_emb).search(query_emb, k)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, query in enumerate(split.queries):
            relevant = set(int(c) for c in split.relevant[i])
            hits = [{"candidate": split.candidates[c].id, "language": split.candidates[c].language,
                     "score": round(float(s), 6), "relevant": int(c) in relevant,
                     "text": split.candidates[c].sentence}
                    for s, c in zip(scores[i], ids[i]) if c >= 0]
            out.write(json.dumps({"query": query.id, "language": query.language, "text": query.text,
                                  "top": hits}, ensure_ascii=False) + "\n")
    return path
