"""The LAReQA kind of evaluation set (XQuAD-R, MLQA-R): the mono / cross / multi protocol of
:mod:`hybrid_retrieval.evaluation.lareqa_protocol` over a split, reported as ``metrics.json`` and a cross-lingual heatmap."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_retrieval.data.lareqa import LareqaSplit, load_split
from hybrid_retrieval.evaluation import lareqa_protocol
from hybrid_retrieval.evaluation.lareqa_protocol import EvaluationResult, evaluate_encoder, evaluate_split
from hybrid_retrieval.evaluation.sets import EvaluationSet, SetTexts

__all__ = ["LOWER_IS_BETTER", "SUMMARY_METRICS", "LareqaSet", "load_dataset", "load_set"]

SUMMARY_METRICS = lareqa_protocol.SUMMARY_METRICS
LOWER_IS_BETTER = ("rank_distance", "max_at_r", "own_language_first")


@dataclass
class LareqaSet(EvaluationSet):
    """XQuAD-R / MLQA-R: the mono / cross / multi protocol over a split, passages written as ``passage_text``."""

    key: str
    split: LareqaSplit
    passage_text: str = "sentence"

    def evaluate(self, encoder: Any, batch_size: int = 64, dtype: Any = None, num_threads: int = 2) -> EvaluationResult:
        from hybrid_retrieval.distributed import encode_across_ranks, rank_and_world

        split = self.split
        if rank_and_world()[1] == 1:
            return evaluate_encoder(encoder, split, self.passage_text, batch_size=batch_size, dtype=dtype,
                                    num_threads=num_threads)
        started = time.perf_counter()
        query_emb = encode_across_ranks(encoder, split.query_texts(), "query", batch_size=batch_size, dtype=dtype)
        candidate_emb = encode_across_ranks(encoder, split.candidate_texts(self.passage_text), "passage",
                                            batch_size=batch_size, dtype=dtype)
        encode_s = time.perf_counter() - started
        result = evaluate_split(query_emb, candidate_emb, split, num_threads=num_threads)
        result.timings.update({"encode_s": encode_s, "texts": float(len(query_emb) + len(candidate_emb))})
        result.query_emb, result.candidate_emb = query_emb, candidate_emb
        return result

    def texts(self) -> SetTexts:
        split = self.split
        queries = [[] for _ in split.languages]
        for text, language in zip(split.query_texts(), split.query_language_ids()):
            queries[language].append(text)
        passages = [[] for _ in split.languages]
        for text, language in zip(split.candidate_texts(self.passage_text), split.candidate_language_ids()):
            passages[language].append(text)
        return SetTexts([(role, language, values) for role, texts in (("query", queries), ("passage", passages))
                         for language, values in zip(split.languages, texts)])

    def describe(self) -> str:
        split = self.split
        return (f"{split.name} ({len(split.queries)} queries, {len(split.candidates)} candidates, "
                f"passage text = {self.passage_text})")

    def write_report(self, result: EvaluationResult, folder: Path, prefix: str = "") -> list[Path]:
        from hybrid_retrieval.evaluation.heatmap import plot_cross_lingual_heatmap

        metrics = result.save_json(folder / f"{prefix}metrics.json")
        per_query = [result.save_per_query(folder / f"{prefix}per_query.npz")] if result.per_query else []
        heatmap = plot_cross_lingual_heatmap(result.cross_matrix(self.split.languages), self.split.languages,
                                             folder / f"{prefix}cross_lingual_map.png",
                                             title=f"{self.split.name} mAP: query x candidate language")
        return [metrics, heatmap, *per_query]


def load_dataset(dataset: Any) -> LareqaSplit:
    """The LAReQA split a ``conf/dataset`` config describes."""
    return load_split(dataset.name, root=dataset.get("root"), languages=dataset.get("languages"),
                      max_questions_per_language=dataset.get("max_questions_per_language"),
                      holdout=dataset.get("holdout"))


def load_set(key: str, dataset: Any) -> LareqaSet:
    return LareqaSet(key, load_dataset(dataset), dataset.passage_text)
