"""The evaluation-set nodes (``dataset`` and each of ``extra_datasets``): one schema per kind of set, named by its
``conf/dataset/*.yaml`` file (Hydra refuses an unknown key or a wrong type while composing), and
:func:`check_dataset`, the rules a type cannot say, checked before any model loads or any data is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError, positive_int, require


@dataclass
class LareqaDatasetConfig:
    """XQuAD-R / MLQA-R (``conf/dataset/xquad_r.yaml``)."""

    name: str = "???"                                   # xquad_r | mlqa_r
    root: Optional[str] = None
    languages: Optional[Any] = None                     # null = all; a list, or one name
    max_questions_per_language: Optional[int] = None
    passage_text: str = "sentence"                      # sentence | sentence_paragraph


@dataclass
class LareqaSelectionConfig(LareqaDatasetConfig):
    """MLQA-R's held-out question groups (``conf/dataset/mlqa_r_selection.yaml``): the selection split."""

    holdout: Any = "???"                                # {dataset, groups, seed}: train_data.holdout


@dataclass
class TatoebaDatasetConfig:
    """Tatoeba bitext retrieval (``conf/dataset/tatoeba.yaml``)."""

    name: str = "tatoeba"
    root: Optional[str] = None
    languages: Optional[Any] = None                     # null = all; a list, or one name
    max_pairs_per_language: Optional[int] = None
    kind: str = "query"                                 # query | passage
    low_resource: Optional[list[str]] = None


@dataclass
class MiraclDatasetConfig:
    """MIRACL corpus retrieval (``conf/dataset/miracl.yaml``)."""

    name: str = "miracl"
    root: Optional[str] = None
    corpus_root: Optional[str] = None
    split: str = "dev"                                  # dev | train | testA | testB
    languages: Optional[Any] = None                     # null = all; a list, or one name
    max_topics_per_language: Optional[int] = None
    max_corpus_passages: Optional[int] = None
    passage_text: str = "title_text"                    # title_text | text
    top_k: int = 100
    shard_size: int = 20000
    embeddings_dir: Optional[str] = None
    progress: bool = True
    index: Optional[Any] = None                         # as conf/index/*.yaml


SCHEMAS = {"dataset_lareqa": LareqaDatasetConfig, "dataset_lareqa_selection": LareqaSelectionConfig,
           "dataset_tatoeba": TatoebaDatasetConfig, "dataset_miracl": MiraclDatasetConfig}


def check_dataset(dataset: DictConfig, option: str = "dataset") -> None:
    from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS
    from hybrid_retrieval.data.sources import check_languages
    from hybrid_retrieval.evaluation.sets import kind_module, register_kind

    try:
        register_kind(dataset, option)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    try:
        kind = kind_module(dataset.get("name"))
    except ValueError as error:
        raise ConfigError(f"{option}.name={dataset.get('name')!r}: {error}") from error
    if kind.__name__ != "hybrid_retrieval.evaluation.lareqa":  # other kinds check their own options, if any
        try:
            if hasattr(kind, "check_config"):
                kind.check_config(dataset)
        except ValueError as error:
            raise ConfigError(f"{option}: {error}") from error
        return
    try:
        check_languages(dataset.name, dataset.get("languages"))
    except (ValueError, KeyError) as error:
        raise ConfigError(f"{option}: {error}") from error
    cap = dataset.get("max_questions_per_language")
    require(cap is None or positive_int(cap), f"{option}.max_questions_per_language",
             "null or a positive integer", cap)
    require(dataset.get("passage_text") in PASSAGE_TEXTS, f"{option}.passage_text",
             f"one of {PASSAGE_TEXTS}", dataset.get("passage_text"))
    if "holdout" in dataset:
        from omegaconf.errors import InterpolationResolutionError

        from hybrid_retrieval.data.lareqa import check_holdout

        try:
            spec = check_holdout(dataset.get("holdout"), f"{option}.holdout")
        except InterpolationResolutionError as error:
            raise ConfigError(f"{option}.holdout: {error}; set train_data.holdout (training) or {option}.holdout "
                              "(python -m hybrid_retrieval.evaluate)") from error
        except ValueError as error:
            raise ConfigError(str(error)) from error
        require(spec is not None, f"{option}.holdout", "a holdout spec for the selection split: set "
                 "train_data.holdout='{dataset: mlqa_r, groups: 400, seed: 0}'", None)
        require(spec["dataset"] == dataset.name, f"{option}.holdout.dataset", f"{dataset.name!r} (the dataset "
                 "it holds out of)", spec["dataset"])


def check_extra_datasets(cfg: DictConfig) -> None:
    for key, dataset in (cfg.get("extra_datasets") or {}).items():
        require(key != cfg.dataset.name, f"extra_datasets.{key}",
                 f"a key other than the main dataset's name {cfg.dataset.name!r} (metrics are logged under it)", key)
        require(isinstance(dataset, DictConfig) and "name" in dataset, f"extra_datasets.{key}",
                 "a dataset config, e.g. +dataset@extra_datasets.mlqa=mlqa_r", dataset)
        check_dataset(dataset, f"extra_datasets.{key}")


def evaluation_datasets(cfg: DictConfig) -> list[str]:
    """Names of the datasets a run evaluates on (adaptation text must not silently be one of them)."""
    return [cfg.dataset.name, *(extra.name for extra in (cfg.get("extra_datasets") or {}).values())]
