"""Evaluation sets as every command sees them: loading from config, one evaluator call, metric names, reports.

Training (validation) and ``python -m hybrid_retrieval.evaluate`` both go through this module, so a training run
and an evaluation run of the same model on the same data log the same metric keys:

- ``val/<setting>/<metric>``: macro averages on the main evaluation set (``dataset``; what ``train.monitor`` names);
- ``val/<key>/<setting>/<metric>`` and ``val/<key>/<setting>/<language or pair>/<metric>`` for every set, the main
  one under its dataset name (e.g. ``val/xquad_r/cross/en-de/map``), extra sets under their key;
- ``time/<key>/encode_s``, ``time/<key>/metrics_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hybrid_retrieval.data.lareqa import LareqaSplit, load_split
from hybrid_retrieval.evaluation.evaluator import SETTINGS, EvaluationResult, evaluate_encoder, evaluate_split
from hybrid_retrieval.evaluation.heatmap import plot_cross_lingual_heatmap
from hybrid_retrieval.evaluation.metrics import METRICS

PREFIX = "val"
# Metrics each setting reports (rank distance needs several languages in one ranking).
SETTING_METRICS = {setting: METRICS if setting == "multi" else tuple(m for m in METRICS if m != "rank_distance")
                   for setting in SETTINGS}
LOWER_IS_BETTER = ("rank_distance",)


@dataclass
class EvaluationSet:
    """A split to evaluate on, the key its metrics are logged under, and how its passages are written."""

    key: str
    split: LareqaSplit
    passage_text: str = "sentence"


def load_dataset(dataset: Any) -> LareqaSplit:
    """The split a ``conf/dataset`` config describes."""
    return load_split(dataset.name, root=dataset.get("root"), languages=dataset.get("languages"),
                      max_questions_per_language=dataset.get("max_questions_per_language"))


def load_evaluation_sets(dataset: Any, extra_datasets: Mapping[str, Any] | None = None) -> list[EvaluationSet]:
    """The main set (key = its dataset name) first, then each extra set under its key."""
    sets = [EvaluationSet(dataset.name, load_dataset(dataset), dataset.passage_text)]
    for key, extra in (extra_datasets or {}).items():
        sets.append(EvaluationSet(str(key), load_dataset(extra), extra.passage_text))
    return sets


def monitor_keys(main_key: str, extra_keys: Sequence[str] = ()) -> list[str]:
    """Every summary key validation logs, i.e. every value ``train.monitor`` may take."""
    keys = [f"{PREFIX}/{s}/{m}" for s, metrics in SETTING_METRICS.items() for m in metrics]
    for key in (main_key, *extra_keys):
        keys += [f"{PREFIX}/{key}/{s}/{m}" for s, metrics in SETTING_METRICS.items() for m in metrics]
    return keys


def encode_dtype(hardware: Any) -> Any:
    import torch

    return torch.bfloat16 if hardware.encode_dtype == "bfloat16" else None


def evaluate_set(encoder: Any, evaluation_set: EvaluationSet, batch_size: int = 64, dtype: Any = None,
                 num_threads: int = 2) -> EvaluationResult:
    """Encode the set's queries and passages with ``encoder`` and compute every setting and metric.

    Under distributed training the encoding is split over ranks and gathered once (every rank then holds the
    same embeddings and computes the same metrics).
    """
    from hybrid_retrieval.distributed import encode_across_ranks, rank_and_world

    if rank_and_world()[1] == 1:
        return evaluate_encoder(encoder, evaluation_set.split, evaluation_set.passage_text, batch_size=batch_size,
                                dtype=dtype, num_threads=num_threads)
    split = evaluation_set.split
    started = time.perf_counter()
    query_emb = encode_across_ranks(encoder, split.query_texts(), "query", batch_size=batch_size, dtype=dtype)
    candidate_emb = encode_across_ranks(encoder, split.candidate_texts(evaluation_set.passage_text), "passage",
                                        batch_size=batch_size, dtype=dtype)
    encode_s = time.perf_counter() - started
    result = evaluate_split(query_emb, candidate_emb, split, num_threads=num_threads)
    result.timings.update({"encode_s": encode_s, "texts": float(len(query_emb) + len(candidate_emb))})
    result.query_emb, result.candidate_emb = query_emb, candidate_emb
    return result


def metric_values(result: EvaluationResult, key: str, main: bool) -> dict[str, float]:
    """The logged metrics of one set's result (names in the module docstring)."""
    metrics = result.flat(prefix=f"{PREFIX}/{key}/")
    if main:
        metrics.update({f"{PREFIX}/{s}/{m}": v for s, values in result.summary.items() for m, v in values.items()})
    for name in ("encode_s", "metrics_s"):
        if name in result.timings:
            metrics[f"time/{key}/{name}"] = result.timings[name]
    return metrics


def write_report(result: EvaluationResult, split: LareqaSplit, folder: Path, prefix: str = "") -> list[Path]:
    """``<prefix>metrics.json`` and ``<prefix>cross_lingual_map.png`` in ``folder``; returns the files written."""
    metrics = result.save_json(folder / f"{prefix}metrics.json")
    heatmap = plot_cross_lingual_heatmap(result.cross_matrix(split.languages), split.languages,
                                         folder / f"{prefix}cross_lingual_map.png",
                                         title=f"{split.name} mAP: query x candidate language")
    return [metrics, heatmap]


def write_reports(results: Mapping[str, EvaluationResult], sets: Sequence[EvaluationSet], folder: Path) -> list[Path]:
    """Reports of every set: the main one unprefixed, extra sets prefixed with ``<key>_``."""
    files: list[Path] = []
    for i, evaluation_set in enumerate(sets):
        if evaluation_set.key in results:
            files += write_report(results[evaluation_set.key], evaluation_set.split, folder,
                                  prefix="" if i == 0 else f"{evaluation_set.key}_")
    return files


def describe(evaluation_set: EvaluationSet) -> str:
    split = evaluation_set.split
    return (f"{split.name} ({len(split.queries)} queries, {len(split.candidates)} candidates, "
            f"passage text = {evaluation_set.passage_text})")
