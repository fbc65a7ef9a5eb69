"""TREC-style metrics of a run against qrels: nDCG@10, Recall@100, MRR@10, with trec_eval's conventions.

Corpus retrieval (MIRACL, any collection) is judged on a *run*: each topic's top-k retrieved passages with
scores. These functions follow trec_eval (and so pytrec_eval / ir-measures, which the tests compare against):

- **Order**: a topic's retrieved passages are sorted by score, highest first; **ties are broken by docid in
  descending string order** (trec_eval's ``comp_sim_docno``), never by the run's rank column or file order.
- **Unjudged passages count as non-relevant** (gain 0). Scoring only the judged passages of a run inflates nDCG
  (FlagEmbedding issue #445: 80.2 instead of 61.7 on MIRACL); nothing here drops a retrieved passage.
- **Relevant** means a judgment ``rel >= 1``; gains are the judgment values (MIRACL's are 0/1, i.e. binary).
- ``ndcg_at_10`` (trec_eval ``ndcg_cut_10``): DCG of the top 10, gain / log2(rank + 1), over the ideal DCG of the
  topic's judgments sorted by gain (every judged relevant passage counts, retrieved or not).
- ``recall_at_100`` (``recall_100``): relevant passages among the top 100 / all judged relevant passages.
- ``mrr_at_10``: 1 / rank of the first relevant passage if it is within the top 10, else 0 (trec_eval's
  ``recip_rank`` on the run cut at 10).
- Topics: every topic of the qrels that has at least one relevant judgment is scored; one the run does not
  mention, or whose retrieved list is empty, scores 0 (``trec_eval -c``). Topics without any relevant judgment
  have no defined recall and are not scored (trec_eval would add zeros); run topics without qrels are ignored.
  Means are over the scored topics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from hybrid_retrieval.config_error import BadValue

__all__ = ["CUTOFFS", "METRICS", "Qrels", "Run", "evaluate_run", "mean_metrics", "ranked_docids", "read_run",
           "run_from_arrays", "topic_metrics", "write_run"]

Qrels = Mapping[str, Mapping[str, int]]  # topic -> docid -> judgment
Run = Mapping[str, Mapping[str, float]]  # topic -> docid -> score

METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
CUTOFFS = {"ndcg_at_10": 10, "recall_at_100": 100, "mrr_at_10": 10}
_DISCOUNT = 1.0 / np.log2(np.arange(2, 1002))  # 1 / log2(rank + 1) for ranks 1..1000


def _discount(n: int) -> np.ndarray:
    return _DISCOUNT[:n] if n <= len(_DISCOUNT) else 1.0 / np.log2(np.arange(2, n + 2))


def ranked_docids(scores: Mapping[str, float]) -> list[str]:
    """A topic's retrieved docids in trec_eval's order: score descending, ties by docid descending."""
    # Two stable sorts: docid descending first, then score descending keeps that order among equal scores.
    by_docid = sorted(scores, reverse=True)
    return sorted(by_docid, key=lambda d: scores[d], reverse=True)


def topic_metrics(ranked: Sequence[str], judgments: Mapping[str, int]) -> dict[str, float]:
    """The three metrics of one topic from its ranked docids (best first) and its judgments."""
    relevant = {d: g for d, g in judgments.items() if g >= 1}
    if not relevant:
        raise BadValue("a topic without any relevant judgment has no defined recall or nDCG")
    top10 = [relevant.get(d, 0) for d in ranked[:10]]  # unjudged and non-relevant alike: gain 0
    dcg = float(np.dot(top10, _discount(len(top10)))) if top10 else 0.0
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = float(np.dot(ideal, _discount(len(ideal))))
    found = sum(1 for d in ranked[:100] if d in relevant)
    first = next((i for i, g in enumerate(top10) if g > 0), None)
    return {"ndcg_at_10": dcg / idcg, "recall_at_100": found / len(relevant),
            "mrr_at_10": 0.0 if first is None else 1.0 / (first + 1)}


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
    """Per-topic metrics (topic -> metric -> value) of `run` under the conventions of the module docstring."""
    out: dict[str, dict[str, float]] = {}
    for topic, judgments in qrels.items():
        if not any(g >= 1 for g in judgments.values()):
            continue
        scores = run.get(topic) or {}
        for docid, score in scores.items():
            if isinstance(score, float) and math.isnan(score):
                raise BadValue(f"run: topic {topic!r} docid {docid!r} has score NaN")
        out[topic] = topic_metrics(ranked_docids(scores), judgments)
    return out


def mean_metrics(per_topic: Mapping[str, Mapping[str, float]], topics: Iterable[str] | None = None
                 ) -> dict[str, float]:
    """Mean of each metric over `topics` (default: all of `per_topic`); NaN when there is none."""
    chosen = list(per_topic) if topics is None else [t for t in topics if t in per_topic]
    if not chosen:
        return {m: float("nan") for m in METRICS}
    return {m: float(np.mean([per_topic[t][m] for t in chosen])) for m in METRICS}


def run_from_arrays(topics: Sequence[str], scores: np.ndarray, rows: np.ndarray, docids: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """A run from top-k search results: row ``rows[i, j]`` (``docids`` index; -1 = no hit) scored ``scores[i, j]``
    for topic ``topics[i]``. Scores are kept as float64 of the float32 values, exactly what :func:`write_run`
    writes and :func:`read_run` reads back."""
    run: dict[str, dict[str, float]] = {}
    for topic, topic_scores, topic_rows in zip(topics, scores, rows):
        hits: dict[str, float] = {}
        for score, row in zip(topic_scores.tolist(), topic_rows.tolist()):
            if row < 0:
                continue
            docid = docids[row]
            if docid in hits:
                raise BadValue(f"run: topic {topic!r} retrieves docid {docid!r} twice (the index holds it twice?)")
            hits[docid] = float(score)
        run[topic] = hits
    return run


def write_run(path: str | Path, run: Run, tag: str) -> Path:
    """TREC run file ``topic Q0 docid rank score tag``, ranks from 1 in trec_eval's order; scores written with
    17 significant digits so that reading the file back gives the same floats (and so the same ties)."""
    if not tag or any(c.isspace() for c in tag):
        raise BadValue(f"run tag {tag!r}: expected a non-empty string without whitespace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for topic, scores in run.items():
            for rank, docid in enumerate(ranked_docids(scores), start=1):
                out.write(f"{topic} Q0 {docid} {rank} {scores[docid]:.17g} {tag}\n")
    return path


_RUN_LINE = re.compile(r"^(\S+)\s+\S+\s+(\S+)\s+\S+\s+(\S+)\s+\S+\s*$")


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file (six whitespace-separated columns) as topic -> docid -> score."""
    path = Path(path)
    run: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            match = _RUN_LINE.match(line)
            if match is None:
                raise BadValue(f"{path} line {number}: expected 6 columns 'topic Q0 docid rank score tag', got "
                                 f"{line.strip()[:120]!r}")
            topic, docid, score = match.groups()
            try:
                run.setdefault(topic, {})[docid] = float(score)
            except ValueError:
                raise BadValue(f"{path} line {number}: score {score!r} is not a number") from None
    return run
