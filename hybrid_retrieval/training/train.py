"""The training driver behind ``run.py``: config in, fine-tuned encoder, MLflow run and best metric out."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.config_checks import ConfigError, check_train_config
from hybrid_retrieval.data.pairs import build_datasets
from hybrid_retrieval.evaluate import encode_dtype, load_dataset, write_report
from hybrid_retrieval.training.module import EvaluationSet, HybridRetrievalModule, OptimizerSettings

log = logging.getLogger(__name__)


def _monitored(history: list[tuple[int, dict[str, float], dict[str, Any]]], metric: str,
               mode: str) -> tuple[int, dict[str, float], dict[str, Any]]:
    # Validations during fit only (step > 0): the ones the best checkpoint was chosen from.
    scored = [entry for entry in history if metric in entry[1] and entry[0] > 0]
    if not scored:
        raise RuntimeError(f"no validation logged {metric!r}; check train.monitor")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda entry: entry[1][metric])


def train(cfg: DictConfig) -> float:
    """Fine-tune as ``cfg`` says; returns the best value of ``cfg.train.monitor`` (what sweepers optimise)."""
    check_train_config(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)

    datasets = build_datasets(cfg.train_data)
    sampler_factory = instantiate(cfg.sampler)
    try:  # build one sampler now: a batch size the data cannot fill fails here, not after the model loads
        sampler_factory(datasets=datasets, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    except ValueError as error:
        raise ConfigError(f"sampler={cfg.sampler.name} with train.batch_size={cfg.train.batch_size}: {error}") from error
    split = load_dataset(cfg.dataset)
    evaluation_sets = [EvaluationSet(cfg.dataset.name, split, cfg.dataset.candidate_text)]
    for key, extra in (cfg.get("extra_datasets") or {}).items():
        evaluation_sets.append(EvaluationSet(key, load_dataset(extra), extra.candidate_text))
    encoder = instantiate(cfg.model)
    loss = instantiate(cfg.loss)

    output_dir = Path(tracking.job_context()["output_dir"])
    client, run_id = tracking.start_run(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.get("run_name"),
                                        tags={"job": "train", "sampler": cfg.sampler.name, "model": cfg.model.name})
    try:
        tracking.log_params(client, run_id, tracking.flatten_config(cfg))
        for data in datasets:
            log.info("training data %s", data.summary())
        module = HybridRetrievalModule(
            encoder=encoder, loss=loss, train_datasets=datasets, sampler_factory=sampler_factory,
            batch_size=cfg.train.batch_size,
            evaluation_sets=evaluation_sets,
            optimizer=OptimizerSettings(cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_ratio,
                                        cfg.train.schedule),
            seed=cfg.train.seed, use_hard_negatives=cfg.train.use_hard_negatives,
            freeze_embeddings=cfg.train.freeze_embeddings, eval_batch_size=cfg.hardware.encode_batch_size,
            eval_dtype=encode_dtype(cfg.hardware), num_threads=cfg.hardware.num_threads)
        from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
        from pytorch_lightning.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=cfg.logger.tracking_uri,
                              run_id=run_id)
        checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor=cfg.train.monitor,
                                     mode=cfg.train.monitor_mode, save_top_k=1, save_weights_only=True)
        trainer = pl.Trainer(
            accelerator=cfg.hardware.accelerator, devices=cfg.hardware.devices, precision=cfg.hardware.precision,
            logger=logger, callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
            default_root_dir=str(output_dir), use_distributed_sampler=False, enable_model_summary=False,
            **cfg.trainer)
        if cfg.train.evaluate_before:
            trainer.validate(module, verbose=False)  # the zero-shot starting point, logged at step 0
            # Building the validation loader draws from torch's RNG; re-seed so training (dropout, sampler)
            # is the same with or without this extra validation.
            pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
        trainer.fit(module)

        step, best_metrics, best_results = _monitored(module.history, cfg.train.monitor, cfg.train.monitor_mode)
        files = write_report(best_results[cfg.dataset.name], split, output_dir)
        for extra in evaluation_sets[1:]:
            files += write_report(best_results[extra.name], extra.split, output_dir, prefix=f"{extra.name}_")
        tracking.log_hydra_configs(client, run_id)
        for path in files:
            tracking.with_retry(lambda: client.log_artifact(run_id, str(path)))
        best = best_metrics[cfg.train.monitor]
        tracking.log_metrics(client, run_id, {f"best/{cfg.train.monitor}": best, "best/step": step})
        client.set_tag(run_id, "best_checkpoint", checkpoint.best_model_path or "")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise

    first_step, first_metrics, _ = module.history[0]
    print(f"\n{cfg.dataset.name} ({len(split.queries)} queries, {len(split.candidates)} candidates), "
          f"model {cfg.model.name}, sampler {cfg.sampler.name} (alpha={cfg.sampler.mono_ratio}); "
          f"best {cfg.train.monitor} = {best:.4f} at step {step}")
    print(best_results[cfg.dataset.name].table())
    for extra in evaluation_sets[1:]:
        print(f"\n{extra.name}: {extra.split.name} ({len(extra.split.queries)} queries, "
              f"{len(extra.split.candidates)} candidates), at the same checkpoint")
        print(best_results[extra.name].table())
    if cfg.train.evaluate_before and first_step == 0:
        print(f"(before training: {cfg.train.monitor} = {first_metrics.get(cfg.train.monitor, math.nan):.4f})")
    print(f"\nrun folder: {output_dir}")
    print(f"MLflow UI:  {tracking.ui_command(cfg.logger.tracking_uri)}")
    return float(best)
