"""The evaluator on real data with the real pretrained encoder: sane, ordered numbers and FAISS agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_encoder, evaluate_split
from hybrid_retrieval.evaluation.index import CandidateIndex


@pytest.mark.slow
def test_me5_small_zero_shot_on_an_xquad_r_slice(me5_small: Any, tiny_encoder: Any, data_root: Path) -> None:
    split = load_split("xquad_r", root=data_root, languages=["en", "de", "zh"], max_questions_per_language=30)
    result = evaluate_encoder(me5_small, split, "sentence", batch_size=32)
    summary = result.summary
    # A pretrained retriever is far above chance, and a pooled multilingual ranking is harder than one language.
    assert summary["mono"]["map"] > 0.5
    assert summary["mono"]["map"] > summary["multi"]["map"] > 0.2
    assert 0 < summary["multi"]["recall_at_10"] <= 10 / 3 + 1e-9
    random_model = evaluate_encoder(tiny_encoder, split, "sentence", batch_size=32).summary
    assert summary["multi"]["map"] > random_model["multi"]["map"] + 0.1
    assert summary["multi"]["rank_distance"] < random_model["multi"]["rank_distance"]

    # Same embeddings through the public API give the same numbers; FAISS's top-1 agrees with recall@1.
    again = evaluate_split(result.query_emb, result.candidate_emb, split)
    assert again.summary == summary
    _, top = CandidateIndex(result.candidate_emb).search(result.query_emb, 1)
    hit_rate = np.mean([top[i, 0] in set(split.relevant[i].tolist()) for i in range(len(split.queries))])
    multi_hits = np.mean([again.per_language["multi"][lang]["recall_at_1"] for lang in split.languages]) * 3
    assert abs(hit_rate - multi_hits) < 1e-9  # equal query counts per language: macro mean = overall mean
