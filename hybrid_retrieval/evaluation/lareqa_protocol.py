"""The evaluation protocol: monolingual, cross-lingual and multilingual retrieval, per language and macro-averaged.

- monolingual: queries in X against the candidates of X;
- cross-lingual: queries in X against the candidates of one other language Y, every ordered pair; only queries
  with a relevant candidate in Y count (MLQA-R questions exist in 2-4 languages);
- multilingual: queries in X against all languages pooled in one ranking; also the rank distance (language bias).

Each setting is reported per language (per pair for cross-lingual) as the mean over its queries, and as the
macro average over languages (pairs). :func:`evaluate_embeddings` takes any precomputed embeddings, so any model
can be evaluated; :func:`evaluate_encoder` encodes a LAReQA split first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.evaluation.metrics import BIAS_METRICS, RANKING_METRICS, own_language_first, per_query_metrics
from hybrid_retrieval.evaluation.ranks import relevant_ranks
from hybrid_retrieval.evaluation.result import NOT_SAVED, RetrievalResult

SETTINGS = ("mono", "cross", "multi")
# Metrics each setting reports (rank distance needs several languages in one ranking).
SUMMARY_METRICS = {
    "mono": RANKING_METRICS,
    "cross": RANKING_METRICS,
    "multi": (*RANKING_METRICS, *BIAS_METRICS),
}
TABLE_METRICS = (*RANKING_METRICS, *BIAS_METRICS)


@dataclass
class EvaluationResult(RetrievalResult):
    """Macro averages per setting, plus the per-language (per-pair) values they average."""

    timings: dict[str, float] = field(default_factory=dict)
    # Embeddings the result was computed from, when they were computed here (not saved).
    query_emb: np.ndarray | None = field(default=None, repr=False, metadata=NOT_SAVED)
    candidate_emb: np.ndarray | None = field(default=None, repr=False, metadata=NOT_SAVED)
    # setting -> {"query", "group", <metric>...}: every scored query's values, for paired tests (per_query.npz).
    per_query: dict[str, dict[str, np.ndarray]] | None = field(default=None, repr=False, metadata=NOT_SAVED)
    group_names: dict[str, list[str]] | None = field(default=None, repr=False, metadata=NOT_SAVED)

    def save_per_query(self, path: str | Path) -> Path:
        """Every scored query's metric values as a compressed ``.npz``: ``<setting>/query`` (the query's index in
        the split), ``<setting>/group`` (index into ``<setting>/group_names``: its language, or language pair)
        and ``<setting>/<metric>``. Mono and cross rows are (query, candidate language) pairs."""
        if self.per_query is None or self.group_names is None:
            raise BadValue("this result holds no per-query values (it was not computed in this process)")
        arrays: dict[str, np.ndarray] = {}
        for setting, values in self.per_query.items():
            arrays.update({f"{setting}/{name}": array for name, array in values.items()})
            arrays[f"{setting}/group_names"] = np.asarray(self.group_names[setting])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    def cross_matrix(self, languages: Sequence[str], metric: str = "map") -> np.ndarray:
        """(query language x candidate language) values; the diagonal holds the monolingual ones."""
        matrix = np.full((len(languages), len(languages)), np.nan)
        for i, x in enumerate(languages):
            for j, y in enumerate(languages):
                source = self.per_language["mono"].get(x) if x == y else self.per_language["cross"].get(f"{x}-{y}")
                if source is not None:
                    matrix[i, j] = source[metric]
        return matrix

    def table(self) -> str:
        """The summary as a fixed-width text table, one row per setting."""
        header = f"{'setting':<8}" + "".join(f"{m:>19}" for m in TABLE_METRICS)
        lines = [header, "-" * len(header)]
        for setting in SETTINGS:
            values = self.summary.get(setting, {})
            cells = "".join(f"{values[m]:>19.4f}" if m in values else f"{'':>19}" for m in TABLE_METRICS)
            lines.append(f"{setting:<8}{cells}")
        if "mono" in self.per_language:
            lines.append("")
            lines.append(f"{'language':<10}{'mono map':>10}{'multi map':>10}{'rank dist':>10}")
            for language, values in self.per_language["mono"].items():
                multi = self.per_language["multi"].get(language, {})
                lines.append(f"{language:<10}{values['map']:>10.4f}{multi.get('map', np.nan):>10.4f}"
                             f"{multi.get('rank_distance', np.nan):>10.1f}")
        return "\n".join(lines)


def mean_by_group(metrics: dict[str, np.ndarray], group: np.ndarray, names: Sequence[str],
                   labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric over the queries of each group, skipping queries without a value (NaN)."""
    out: dict[str, dict[str, float]] = {}
    valid = ~np.isnan(metrics["map"])
    for g, label in enumerate(labels):
        members = valid & (group == g)
        if members.any():
            out[label] = {m: float(np.nanmean(metrics[m][members])) for m in names}
    return out


def scored_queries(metrics: dict[str, np.ndarray], group: np.ndarray, names: Sequence[str],
                   row_query: np.ndarray) -> dict[str, np.ndarray]:
    """The rows with a value (a relevant item) as flat arrays: ``query``, ``group`` and each metric of ``names``."""
    valid = ~np.isnan(metrics["map"])
    out = {"query": row_query[valid].astype(np.int32), "group": group[valid].astype(np.int32)}
    out.update({m: metrics[m][valid] for m in names})
    return out


def macro_mean(groups: dict[str, dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Each metric's unweighted mean over the groups (languages or language pairs): the protocol's macro average."""
    return {m: float(np.mean([values[m] for values in groups.values()])) for m in names} if groups else {}


def evaluate_embeddings(query_emb: np.ndarray, candidate_emb: np.ndarray, query_language: np.ndarray,
                        candidate_language: np.ndarray, relevant: Sequence[np.ndarray],
                        languages: Sequence[str], num_threads: int = 2) -> EvaluationResult:
    """Evaluate precomputed embeddings under the full protocol.

    ``query_language`` / ``candidate_language`` are indices into ``languages``; ``relevant[i]`` holds the indices
    of query i's relevant candidates (in any language). Scores are inner products: pass L2-normalised
    embeddings for cosine similarity.
    """
    started = time.perf_counter()
    query_language = np.asarray(query_language, dtype=np.int64)
    candidate_language = np.asarray(candidate_language, dtype=np.int64)
    n_lang = len(languages)
    if len(query_language) != len(query_emb):
        raise BadValue(f"query_language has {len(query_language)} entries for {len(query_emb)} queries")
    for name, ids in (("query_language", query_language), ("candidate_language", candidate_language)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_lang):
            raise BadValue(f"{name} holds ids outside 0..{n_lang - 1} (languages: {list(languages)})")

    ranks = relevant_ranks(query_emb, candidate_emb, candidate_language, relevant, num_threads=num_threads)
    n_queries = len(query_emb)

    # Mono and cross share one pass: a "query" there is a (query, candidate language) pair.
    pair = ranks.query_index * n_lang + ranks.candidate_language
    by_pair = per_query_metrics(pair, ranks.rank_in_language, n_queries * n_lang)
    pair_query_lang = np.repeat(query_language, n_lang)
    pair_cand_lang = np.tile(np.arange(n_lang), n_queries)
    pair_label = pair_query_lang * n_lang + pair_cand_lang
    pair_names = [f"{x}-{y}" for x in languages for y in languages]
    by_language_pair = mean_by_group(by_pair, pair_label, SUMMARY_METRICS["cross"], pair_names)
    mono = {x: by_language_pair[f"{x}-{x}"] for x in languages if f"{x}-{x}" in by_language_pair}
    cross = {k: v for k, v in by_language_pair.items() if k.split("-")[0] != k.split("-")[1]}

    by_query = per_query_metrics(ranks.query_index, ranks.rank_overall, n_queries)
    by_query["own_language_first"] = own_language_first(ranks.query_index, ranks.rank_overall,
                                                        ranks.candidate_language, query_language, n_queries)
    multi = mean_by_group(by_query, query_language, SUMMARY_METRICS["multi"], list(languages))

    per_language = {"mono": mono, "cross": cross, "multi": multi}
    summary = {s: macro_mean(per_language[s], SUMMARY_METRICS[s]) for s in SETTINGS}

    pair_query = np.repeat(np.arange(n_queries), n_lang)
    is_mono = pair_query_lang == pair_cand_lang
    names = SUMMARY_METRICS["cross"]
    mono_rows = scored_queries({m: np.where(is_mono, v, np.nan) for m, v in by_pair.items()}, pair_query_lang,
                               names, pair_query)
    cross_rows = scored_queries({m: np.where(is_mono, np.nan, v) for m, v in by_pair.items()}, pair_label,
                                names, pair_query)
    per_query = {"mono": mono_rows, "cross": cross_rows,
                 "multi": scored_queries(by_query, query_language, SUMMARY_METRICS["multi"], np.arange(n_queries))}
    group_names = {"mono": list(languages), "cross": pair_names, "multi": list(languages)}
    return EvaluationResult(summary, per_language, {"metrics_s": time.perf_counter() - started},
                            per_query=per_query, group_names=group_names)


def evaluate_split(query_emb: np.ndarray, candidate_emb: np.ndarray, split: Any,
                   num_threads: int = 2) -> EvaluationResult:
    """:func:`evaluate_embeddings` on a :class:`~hybrid_retrieval.data.lareqa.LareqaSplit`'s structure."""
    return evaluate_embeddings(query_emb, candidate_emb, split.query_language_ids(),
                               split.candidate_language_ids(), split.relevant, split.languages,
                               num_threads=num_threads)


def evaluate_encoder(encoder: Any, split: Any, passage_text: str = "sentence", batch_size: int = 64,
                     dtype: Any = None, num_threads: int = 2) -> EvaluationResult:
    """Encode a split's queries and candidates (written as ``passage_text`` says) with ``encoder``, then evaluate."""
    started = time.perf_counter()
    query_emb = encoder.encode(split.query_texts(), kind="query", batch_size=batch_size, dtype=dtype)
    candidate_emb = encoder.encode(split.candidate_texts(passage_text), kind="passage",
                                   batch_size=batch_size, dtype=dtype)
    encode_s = time.perf_counter() - started
    result = evaluate_split(query_emb, candidate_emb, split, num_threads=num_threads)
    result.timings["encode_s"] = encode_s
    result.timings["texts"] = float(len(query_emb) + len(candidate_emb))
    result.query_emb, result.candidate_emb = query_emb, candidate_emb
    return result
