"""What training reads, loaded and checked before the heavy imports: training datasets, a trial sampler (a batch
size the data cannot fill fails here) and the evaluation sets. No Lightning and no MLflow here, so data errors
surface in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.overlap import ContaminationError, OverlapReport, check_contamination
from hybrid_retrieval.data.pairs import ParallelPairs, build_datasets
from hybrid_retrieval.evaluation.config import evaluation_datasets
from hybrid_retrieval.evaluation.sets import EvaluationSet, load_evaluation_sets

if TYPE_CHECKING:
    from hybrid_retrieval.adaptation.mlm import MLMSettings


@dataclass
class TrainingInputs:
    datasets: list[ParallelPairs]
    sampler_factory: Callable[..., Any]
    evaluation_sets: list[EvaluationSet]
    adapt_texts: list[str] | None = None  # unlabelled text of the adaptation stage (adapt=mlm)
    adapt_settings: MLMSettings | None = None  # its options, checked once
    overlap: OverlapReport | None = None  # evaluation texts among the training texts (train.contamination)


def load_training_inputs(cfg: DictConfig) -> TrainingInputs:
    from hydra.utils import instantiate

    adapt_settings = None
    if cfg.get("adapt") is not None:  # the one check of the adapt options in a training run, before any data
        from hybrid_retrieval.adaptation.mlm import check_adapt_config

        try:
            adapt_settings = check_adapt_config(cfg.adapt, eval_datasets=evaluation_datasets(cfg))
        except ValueError as error:
            raise ConfigError(str(error)) from error
    sampler_factory = instantiate(cfg.sampler)
    datasets = build_datasets(cfg.train_data)
    from hybrid_retrieval.training.sampler import check_batch_sampler

    try:  # one sampler now: the real ones are built per rank by the datamodule
        check_batch_sampler(sampler_factory(datasets=datasets, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                            num_replicas=1, rank=0))
    except ValueError as error:
        raise ConfigError(f"sampler={cfg.sampler.name} with train.batch_size={cfg.train.batch_size}: {error}") from error
    adapt_texts = None
    if adapt_settings is not None:
        from hybrid_retrieval.adaptation.mlm import load_adapt_texts

        try:
            adapt_texts = load_adapt_texts(cfg.adapt, evaluation_datasets(cfg), adapt_settings)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    evaluation_sets = load_evaluation_sets(cfg.dataset, cfg.get("extra_datasets"))
    try:
        overlap = check_contamination(datasets, evaluation_sets, cfg.train.get("contamination", "refuse"))
    except ContaminationError as error:
        raise ConfigError(str(error)) from error
    return TrainingInputs(datasets, sampler_factory, evaluation_sets, adapt_texts, adapt_settings, overlap)
