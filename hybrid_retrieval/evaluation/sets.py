"""Evaluation sets as every command sees them: loading from config, one evaluator call, metric names, reports.

Training (validation) and ``python -m hybrid_retrieval.evaluate`` both go through this module, so a training run
and an evaluation run of the same model on the same data log the same metric keys:

- ``val/<setting>/<metric>``: macro averages on the main evaluation set (``dataset``; what ``train.monitor`` names);
- ``val/<key>/<setting>/<metric>`` and ``val/<key>/<setting>/<language or pair>/<metric>`` for every set, the main
  one under its dataset name (e.g. ``val/xquad_r/cross/en-de/map``), extra sets under their key;
- ``time/<key>/encode_s``, ``time/<key>/metrics_s``.

A dataset name maps to a *kind* of evaluation set (:data:`KIND_OF_DATASET`; a set of your own names its module
with ``dataset.module``, :func:`register_kind`, docs/extending.md#an-evaluation-set). The kind's module provides
``SUMMARY_METRICS`` (setting -> metrics its summary holds, known before any data is read, so that config checks
can validate ``train.monitor``), ``LOWER_IS_BETTER`` and ``load_set(key, dataset_config) -> EvaluationSet``.
An :class:`EvaluationSet` evaluates an encoder into a result with ``summary``, ``per_language``, ``timings``,
``flat(prefix)``, ``table()`` and ``save_json(path)`` (a :class:`~hybrid_retrieval.evaluation.result.RetrievalResult`;
the LAReQA kind is :mod:`hybrid_retrieval.evaluation.lareqa`), describes itself, and writes its report files.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hybrid_retrieval.config_error import BadValue

PREFIX = "val"

# Dataset name -> module of its kind (imported when a dataset of that kind is used).
KIND_OF_DATASET = {
    "xquad_r": "hybrid_retrieval.evaluation.lareqa",
    "mlqa_r": "hybrid_retrieval.evaluation.lareqa",
    "tatoeba": "hybrid_retrieval.evaluation.tatoeba",
    "miracl": "hybrid_retrieval.evaluation.miracl",
}


@dataclass
class SetTexts:
    """An evaluation set's texts, for the training-data overlap check (data/overlap.check_contamination)."""

    groups: list[tuple[str, str, Sequence[str]]]  # (role "query" | "passage", language, texts)
    not_compared: list[str] = field(default_factory=list)  # parts whose texts are not listed, and why


class EvaluationSet(ABC):
    """One evaluation set and the key its metrics are logged under."""

    key: str

    def texts(self) -> SetTexts:
        """Its queries and passages by language (overridden by every kind here)."""
        return SetTexts([], [f"{type(self).__name__} lists no texts"])

    @abstractmethod
    def evaluate(self, encoder: Any, batch_size: int = 64, dtype: Any = None, num_threads: int = 2) -> Any:
        """Encode with ``encoder`` (split over ranks under DDP) and compute every setting and metric."""

    @abstractmethod
    def describe(self) -> str:
        """One line: the data and its size."""

    @abstractmethod
    def write_report(self, result: Any, folder: Path, prefix: str = "") -> list[Path]:
        """``<prefix>metrics.json`` and any figures, in ``folder``; returns the files written."""


def register_kind(dataset: Any, option: str = "dataset") -> None:
    """A set of your own: a dataset config that names its kind's module (``module: my_extensions``) makes that
    module evaluate the datasets of its ``name`` in this process. The project's sets name none."""
    module = dataset.get("module") if hasattr(dataset, "get") else None
    if module is None:
        return
    name = dataset.get("name")
    known = KIND_OF_DATASET.get(name)
    if known is not None and known != module and known.startswith("hybrid_retrieval."):
        raise BadValue(f"{option}.name={name!r} is one of the project's sets ({known}): give your set another name")
    try:
        loaded = importlib.import_module(str(module))
    except ImportError as error:
        raise BadValue(f"{option}.module={module!r}: not importable ({error}); put its folder on PYTHONPATH or run "
                         "from it") from error
    missing = [attribute for attribute in ("SUMMARY_METRICS", "load_set") if not hasattr(loaded, attribute)]
    if missing:
        raise BadValue(f"{option}.module={module!r} lacks {', '.join(missing)} (what a kind of evaluation set "
                         "provides: hybrid_retrieval/evaluation/sets.py)")
    KIND_OF_DATASET[name] = str(module)


def kind_module(dataset_name: str) -> Any:
    """The module that evaluates datasets called ``dataset_name``; a clear error for an unknown name."""
    if dataset_name not in KIND_OF_DATASET:
        raise BadValue(f"dataset.name={dataset_name!r}: expected one of {sorted(KIND_OF_DATASET)}, or a set of "
                         "your own that names its module (dataset.module; docs/extending.md#an-evaluation-set)")
    return importlib.import_module(KIND_OF_DATASET[dataset_name])


def load_evaluation_sets(dataset: Any, extra_datasets: Mapping[str, Any] | None = None) -> list[EvaluationSet]:
    """The main set (key = its dataset name) first, then each extra set under its key."""
    register_kind(dataset)
    sets = [kind_module(dataset.name).load_set(dataset.name, dataset)]
    for key, extra in (extra_datasets or {}).items():
        register_kind(extra, f"extra_datasets.{key}")
        sets.append(kind_module(extra.name).load_set(str(key), extra))
    return sets


def monitor_keys(main: str, extra: Mapping[str, str] | Sequence[str] = ()) -> list[str]:
    """Every summary key validation logs, i.e. every value ``train.monitor`` may take.

    ``main`` is the main dataset's name; ``extra`` maps each extra set's key to its dataset name (a plain list of
    keys means LAReQA sets).
    """
    extra = dict(extra) if isinstance(extra, Mapping) else {key: "xquad_r" for key in extra}
    summary = kind_module(main).SUMMARY_METRICS
    keys = [f"{PREFIX}/{s}/{m}" for s, metrics in summary.items() for m in metrics]
    for key, name in ((main, main), *extra.items()):
        keys += [f"{PREFIX}/{key}/{s}/{m}" for s, metrics in kind_module(name).SUMMARY_METRICS.items()
                 for m in metrics]
    return keys


def lower_is_better(dataset_name: str, metric: str) -> bool:
    return metric in getattr(kind_module(dataset_name), "LOWER_IS_BETTER", ())


def evaluate_set(encoder: Any, evaluation_set: EvaluationSet, batch_size: int = 64, dtype: Any = None,
                 num_threads: int = 2) -> Any:
    """One evaluator call: encode the set with ``encoder`` and compute every setting and metric."""
    return evaluation_set.evaluate(encoder, batch_size=batch_size, dtype=dtype, num_threads=num_threads)


def metric_values(result: Any, key: str, main: bool) -> dict[str, float]:
    """The logged metrics of one set's result (names in the module docstring)."""
    metrics = result.flat(prefix=f"{PREFIX}/{key}/")
    if main:
        metrics.update({f"{PREFIX}/{s}/{m}": v for s, values in result.summary.items() for m, v in values.items()})
    for name in ("encode_s", "metrics_s"):
        if name in result.timings:
            metrics[f"time/{key}/{name}"] = result.timings[name]
    return metrics


def write_reports(results: Mapping[str, Any], sets: Sequence[EvaluationSet], folder: Path) -> list[Path]:
    """Reports of every set: the main one unprefixed, extra sets prefixed with ``<key>_``."""
    files: list[Path] = []
    for i, evaluation_set in enumerate(sets):
        if evaluation_set.key in results:
            files += evaluation_set.write_report(results[evaluation_set.key], folder,
                                                 prefix="" if i == 0 else f"{evaluation_set.key}_")
    return files


def describe(evaluation_set: EvaluationSet) -> str:
    return evaluation_set.describe()
