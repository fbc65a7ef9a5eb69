"""Tatoeba bitext retrieval: for each language X, find each sentence's translation among that pair's sentences.

Per language X (its own pair: the English side differs per language) and per direction:

- ``xx_to_en``: queries = the X sentences, candidates = the pair's English sentences, relevant = the same line;
- ``en_to_xx``: the reverse.

Metrics, from the rank of the one relevant candidate under this project's tie rule (a candidate's rank is the
number of candidates scoring at least as high, itself included; :mod:`hybrid_retrieval.evaluation.ranks`):

- ``accuracy_at_1``: the LASER / XTREME measure (1 - LASER's error rate): the nearest neighbour by cosine is the
  gold line. Tie rule: the gold line must score strictly higher than every other candidate; a tie for first
  place counts as a miss (rank 1 under the tie rule above). LASER and XTREME take FAISS's top-1, which breaks
  an exact tie by index order; none of the 112 files repeats a sentence on either side, so exact ties only
  arise from embeddings that coincide for different sentences, where an arbitrary index order should not
  score a hit.
- ``map``: average precision; with one relevant item it is 1 / rank (no cut-off).
- ``ndcg_at_10``: binary gain, ``1 / log2(1 + rank)`` if rank <= 10, else 0 (the ideal DCG is 1).

Each (language, direction) value is the mean over that pair's queries; summaries are macro averages over the
languages (``xx_to_en``, ``en_to_xx``, and ``both`` = the mean of the two directions, LASER's usual figure),
and the same over the low-resource subset (``low_resource/xx_to_en``, ...). Pure numpy (plus the compiled rank
pass); :func:`evaluate_tatoeba_embeddings` takes precomputed embeddings, :func:`evaluate_tatoeba_encoder` encodes
a :class:`~hybrid_retrieval.data.tatoeba.TatoebaSplit` first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.evaluation.metrics import per_query_metrics
from hybrid_retrieval.evaluation.ranks import relevant_ranks
from hybrid_retrieval.evaluation.result import RetrievalResult

__all__ = ["DIRECTIONS", "LOW_RESOURCE_PREFIX", "METRICS", "SETTINGS", "TatoebaResult", "evaluate_pair",
           "evaluate_tatoeba_embeddings", "evaluate_tatoeba_encoder"]

DIRECTIONS = ("xx_to_en", "en_to_xx")
BOTH = "both"
SETTINGS = (*DIRECTIONS, BOTH)
LOW_RESOURCE_PREFIX = "low_resource/"
METRICS = ("accuracy_at_1", "map", "ndcg_at_10")
# Which of per_query_metrics' outputs each metric is (one relevant item: recall@1 is the strict top-1 hit).
_SOURCE_METRIC = {"accuracy_at_1": "recall_at_1", "map": "map", "ndcg_at_10": "ndcg_at_10"}


@dataclass
class TatoebaResult(RetrievalResult):
    """Per-language values of each direction, their macro averages, and the low-resource averages.

    ``summary``: setting -> metric (settings: see SETTINGS, LOW_RESOURCE_PREFIX); ``per_language``: direction ->
    language -> metric.
    """

    pairs: dict[str, int]  # language -> number of pairs evaluated
    low_resource: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Summary rows (one per setting), then one row per language; low-resource languages marked '*'."""
        header = f"{'setting':<24}" + "".join(f"{m:>15}" for m in METRICS)
        lines = [header, "-" * len(header)]
        for setting, values in self.summary.items():
            lines.append(f"{setting:<24}" + "".join(f"{values[m]:>15.4f}" for m in METRICS))
        lines += ["", (f"{'language':<10}{'pairs':>6}{'xx->en acc@1':>14}{'en->xx acc@1':>14}"
                       f"{'xx->en map':>12}{'en->xx map':>12}")]
        low = set(self.low_resource)
        for language, count in self.pairs.items():
            forward = self.per_language["xx_to_en"][language]
            backward = self.per_language["en_to_xx"][language]
            label = f"{language}{'*' if language in low else ''}"
            lines.append(f"{label:<10}{count:>6}{forward['accuracy_at_1']:>14.4f}{backward['accuracy_at_1']:>14.4f}"
                         f"{forward['map']:>12.4f}{backward['map']:>12.4f}")
        if low:
            lines.append("* low-resource subset")
        return "\n".join(lines)


def _direction_metrics(query_emb: np.ndarray, candidate_emb: np.ndarray, num_threads: int) -> dict[str, float]:
    n = len(query_emb)
    relevant = [np.array([i], dtype=np.int64) for i in range(n)]  # query i's translation is candidate i
    ranks = relevant_ranks(query_emb, candidate_emb, np.zeros(n, dtype=np.int64), relevant,
                           num_threads=num_threads)
    per_query = per_query_metrics(ranks.query_index, ranks.rank_in_language, n)
    return {m: float(np.mean(per_query[_SOURCE_METRIC[m]])) for m in METRICS}


def evaluate_pair(source_emb: np.ndarray, english_emb: np.ndarray, num_threads: int = 2) -> dict[str, dict[str, float]]:
    """Both directions of one language pair: ``{"xx_to_en": {metric: value}, "en_to_xx": {...}}``.

    Row i of `source_emb` and row i of `english_emb` are translations; scores are inner products (pass
    L2-normalised embeddings for cosine).
    """
    source_emb, english_emb = np.asarray(source_emb), np.asarray(english_emb)
    if source_emb.ndim != 2 or source_emb.shape != english_emb.shape:
        raise BadValue(f"a pair needs two 2-D embedding arrays of the same shape (row i translates row i); got "
                         f"{source_emb.shape} and {english_emb.shape}")
    if len(source_emb) == 0:
        raise BadValue("a pair needs at least one sentence")
    return {"xx_to_en": _direction_metrics(source_emb, english_emb, num_threads),
            "en_to_xx": _direction_metrics(english_emb, source_emb, num_threads)}


def _macro(per_language: Mapping[str, Mapping[str, Mapping[str, float]]],
           languages: Sequence[str]) -> dict[str, dict[str, float]]:
    summary = {d: {m: float(np.mean([per_language[d][x][m] for x in languages])) for m in METRICS}
               for d in DIRECTIONS}
    # Per language the mean of both directions, then over languages: with equal weights that is the same as
    # the mean of the two directions' macro averages.
    summary[BOTH] = {m: (summary["xx_to_en"][m] + summary["en_to_xx"][m]) / 2 for m in METRICS}
    return summary


def evaluate_tatoeba_embeddings(embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]],
                                low_resource: Sequence[str] = (), num_threads: int = 2) -> TatoebaResult:
    """Evaluate precomputed embeddings: ``embeddings[language] = (sentences_emb, english_emb)``, row i of one
    translating row i of the other. `low_resource`: languages of the low-resource subset (those present count)."""
    started = time.perf_counter()
    if not embeddings:
        raise BadValue("no language to evaluate: embeddings is empty")
    per_language: dict[str, dict[str, dict[str, float]]] = {d: {} for d in DIRECTIONS}
    pairs: dict[str, int] = {}
    for language, (source_emb, english_emb) in embeddings.items():
        try:
            values = evaluate_pair(source_emb, english_emb, num_threads=num_threads)
        except ValueError as error:
            raise BadValue(f"language {language!r}: {error}") from error
        for direction in DIRECTIONS:
            per_language[direction][language] = values[direction]
        pairs[language] = len(source_emb)
    languages = list(embeddings)
    summary = _macro(per_language, languages)
    low = [x for x in low_resource if x in embeddings]
    if low:
        summary.update({f"{LOW_RESOURCE_PREFIX}{s}": v for s, v in _macro(per_language, low).items()})
    return TatoebaResult(summary, per_language, pairs, low, {"metrics_s": time.perf_counter() - started})


def evaluate_tatoeba_encoder(encoder: Any, split: Any, batch_size: int = 64, dtype: Any = None,
                             num_threads: int = 2, kind: str = "query") -> TatoebaResult:
    """Encode a :class:`~hybrid_retrieval.data.tatoeba.TatoebaSplit` with ``encoder`` and evaluate it.

    Both sides are encoded the same way, as `kind` (default "query", i.e. with the model's query prefix):
    translation retrieval is symmetric, and multilingual-E5's card asks for the "query: " prefix on both sides
    of symmetric tasks such as bitext mining. Each distinct sentence is encoded once (English sentences recur
    across pairs), in one length-sorted pass over the whole split.
    """
    started = time.perf_counter()
    unique: dict[str, int] = {}
    for pair in split.pairs.values():
        for text in (*pair.sentences, *pair.english):
            unique.setdefault(text, len(unique))
    emb = encoder.encode(list(unique), kind=kind, batch_size=batch_size, dtype=dtype)
    encode_s = time.perf_counter() - started
    embeddings = {
        language: (emb[[unique[t] for t in pair.sentences]], emb[[unique[t] for t in pair.english]])
        for language, pair in split.pairs.items()
    }
    result = evaluate_tatoeba_embeddings(embeddings, split.low_resource, num_threads=num_threads)
    result.timings.update({"encode_s": encode_s, "texts": float(len(unique))})
    return result


# ---- the evaluation-set kind of ``dataset=tatoeba`` (see hybrid_retrieval/evaluation/sets.py) ----------------

SUMMARY_METRICS = {setting: METRICS for setting in (*SETTINGS, *(LOW_RESOURCE_PREFIX + s for s in SETTINGS))}
LOWER_IS_BETTER: tuple[str, ...] = ()
KINDS = ("query", "passage")


def check_config(dataset: Any) -> None:
    """The options of a ``conf/dataset/tatoeba.yaml`` config, without reading the files."""
    from hybrid_retrieval.data.tatoeba import check_tatoeba_options

    check_tatoeba_options(dataset.get("languages"), dataset.get("low_resource"),
                          dataset.get("max_pairs_per_language"), option="dataset")
    if dataset.get("kind", "query") not in KINDS:
        raise BadValue(f"dataset.kind={dataset.get('kind')!r}: expected one of {KINDS}")


def load_set(key: str, dataset: Any) -> Any:
    from hybrid_retrieval.data.tatoeba import load_tatoeba
    from hybrid_retrieval.evaluation.sets import EvaluationSet, SetTexts

    class TatoebaSet(EvaluationSet):
        def __init__(self) -> None:
            self.key = key
            self.kind = dataset.get("kind", "query")
            self.split = load_tatoeba(root=dataset.get("root"), languages=dataset.get("languages"),
                                      low_resource=dataset.get("low_resource"),
                                      max_pairs_per_language=dataset.get("max_pairs_per_language"))

        def evaluate(self, encoder: Any, batch_size: int = 64, dtype: Any = None, num_threads: int = 2) -> Any:
            return evaluate_tatoeba_encoder(encoder, self.split, batch_size=batch_size, dtype=dtype,
                                            num_threads=num_threads, kind=self.kind)

        def texts(self) -> SetTexts:
            groups = [("passage", language, pair.sentences) for language, pair in self.split.pairs.items()]
            english = [t for pair in self.split.pairs.values() for t in pair.english]
            return SetTexts([*groups, ("passage", "eng", english)])

        def describe(self) -> str:
            pairs = sum(len(p.sentences) for p in self.split.pairs.values())
            return (f"tatoeba ({len(self.split.pairs)} languages, {pairs} pairs, "
                    f"{len(self.split.low_resource)} low-resource)")

        def write_report(self, result: Any, folder: Path, prefix: str = "") -> list[Path]:
            return [result.save_json(folder / f"{prefix}metrics.json")]

    return TatoebaSet()
