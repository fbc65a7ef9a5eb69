"""The training driver behind ``run.py``: config in; a validated, saved and exported encoder, an MLflow run and the
best monitored value out.

Order: config checks, training data, evaluation sets and a trial sampler (bad input fails here, in seconds), the
model, then the MLflow run. Whatever stops training (``max_steps``, ``max_epochs``, ``limit_train_batches``, an
interrupt), the last weights are validated if they were not, the best checkpoint is chosen among the validations
that ran, and the best weights are exported to ``<run folder>/model/``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.evaluation.sets import describe, write_reports
from hybrid_retrieval.hardware import (encode_dtype, encode_dtype_name, set_attention_backends, trainer_precision,
                                       uses_gpu)
from hybrid_retrieval.models.model_folder import run_card
from hybrid_retrieval.run_folder import CHECKPOINTS, RunPlan, plan_run, record_best, write_run_info
from hybrid_retrieval.training.callbacks import (BatchLog, BestCheckpoint, RankWatch, ResumeCheckpoint,
                                                 RunFolderCheckpointIO, TrackedRunLogger)
from hybrid_retrieval.training.config import check_train_config
from hybrid_retrieval.training.datamodule import HybridDataModule
from hybrid_retrieval.training.inputs import TrainingInputs, load_training_inputs
from hybrid_retrieval.training.module import EvaluationSettings, HybridRetrievalModule, OptimizerSettings
from hybrid_retrieval.training.strategy import trainer_strategy

log = logging.getLogger(__name__)


def write_holdout(folder: Path, cfg: DictConfig) -> Path:
    """``holdout.json``: the selection split's spec and every question id it held out of training."""
    import json

    from hybrid_retrieval.data.lareqa import check_holdout, holdout_groups

    spec = check_holdout(cfg.train_data.holdout)
    ids = sorted(holdout_groups(spec))
    path = folder / "holdout.json"
    path.write_text(json.dumps({"holdout": spec, "question_groups": len(ids), "ids": ids}, indent=1))
    return path


def evaluates_before(cfg: DictConfig) -> bool:
    """``train.evaluate_before``: true, false, or ``first_job`` (only job 0 of a sweep)."""
    value = cfg.train.evaluate_before
    if value == "first_job":
        return tracking.job_context()["job_num"] == "0"
    return bool(value)


def build_datamodule(cfg: DictConfig, inputs: TrainingInputs | None = None) -> HybridDataModule:
    """Training data, sampler and evaluation sets; every data error surfaces here, before the model loads."""
    inputs = inputs or load_training_inputs(cfg)
    return HybridDataModule(inputs.datasets, inputs.sampler_factory, cfg.train.batch_size, cfg.train.seed,
                            inputs.evaluation_sets, cfg.train.get("hard_negatives", 1), cfg.train.get("num_workers", 0))


def build_losses(cfg: DictConfig) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The training loss: what ``loss`` builds, wrapped in :class:`MatryoshkaLoss` when ``matryoshka.dims`` is set;
    and the distillation term beside it (None when ``distill.weight`` is 0)."""
    from hybrid_retrieval.losses.distill import InBatchDistillation
    from hybrid_retrieval.losses.matryoshka import MatryoshkaLoss

    loss = instantiate(cfg.loss)
    matryoshka = cfg.get("matryoshka") or {}
    if matryoshka.get("dims") is not None:
        weights = matryoshka.get("weights")
        loss = MatryoshkaLoss(loss, list(matryoshka.dims), None if weights is None else list(weights))
    distill = cfg.get("distill") or {}
    weight = distill.get("weight", 0.0)
    return loss, InBatchDistillation(weight, distill.get("temperature", 0.05)) if weight else None


def build_module(cfg: DictConfig, encoder: Any = None) -> HybridRetrievalModule:
    loss, distill = build_losses(cfg)
    return HybridRetrievalModule(
        encoder=encoder if encoder is not None else instantiate(cfg.model), loss=loss, distill=distill,
        merge_ratio=cfg.train.get("merge_ratio"),
        optimizer=OptimizerSettings(cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_ratio, cfg.train.schedule),
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        freeze_embeddings=cfg.train.freeze_embeddings,
        evaluation=EvaluationSettings(cfg.hardware.encode_batch_size, encode_dtype(cfg.hardware),
                                      cfg.hardware.num_threads, keep_embeddings=bool(cfg.get("save_embeddings"))),
        grad_cache_chunk=cfg.train.get("grad_cache_chunk"), gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")),
        dynamic_padding=bool(cfg.train.get("dynamic_padding", False)),
        sparse_embeddings=bool(cfg.train.get("sparse_embeddings", False)))


def build_callbacks(cfg: DictConfig, output_dir: Path) -> list[pl.Callback]:
    """The callbacks of ``conf/callbacks`` (each entry with a ``_target_``; one whose constructor takes
    ``run_folder`` gets the run folder), then the batch log when ``train.log_batches`` is set."""
    callbacks: list[pl.Callback] = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None or "_target_" not in node:
            continue
        factory = instantiate(node, _partial_=True)
        takes_folder = "run_folder" in inspect.signature(factory.func).parameters
        callbacks.append(factory(run_folder=output_dir) if takes_folder else factory())
    if cfg.train.get("log_batches"):
        callbacks.append(BatchLog(output_dir / "batches"))
    return callbacks


def build_trainer(cfg: DictConfig, run: tracking.TrackedRun | None, checkpoint: BestCheckpoint,
                  output_dir: Path) -> pl.Trainer:
    """Lightning's trainer: the run's own checkpoints (best by ``train.monitor``, resumable every
    ``train.checkpoint_every_n_steps``), the callbacks of the config, the MLflow logger."""
    from hybrid_retrieval.progress import on_terminal

    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.train.get("grad_cache_chunk"):
        options["gradient_clip_val"] = None  # the module clips: it steps the optimiser itself
    if not on_terminal():  # logs and CI: a line every N seconds (TrainingProgress) instead of a redrawn bar
        options["enable_progress_bar"] = False
    distributed = str(cfg.hardware.get("strategy", "auto")).startswith("ddp")
    resumable = ResumeCheckpoint(output_dir / CHECKPOINTS, cfg.train.get("checkpoint_every_n_steps"),
                                 save_on_exception=not distributed)
    callbacks = [checkpoint, resumable, *build_callbacks(cfg, output_dir)]
    if distributed:
        callbacks.append(RankWatch(output_dir, cfg.hardware.get("collective_timeout_s")))
    return pl.Trainer(
        accelerator=cfg.hardware.accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
        strategy=trainer_strategy(cfg.hardware), precision=trainer_precision(cfg.hardware),
        logger=TrackedRunLogger(run, hold_until_checkpoint=True), callbacks=callbacks,
        plugins=[RunFolderCheckpointIO()],  # a full disk never leaves a partial checkpoint
        default_root_dir=str(output_dir), use_distributed_sampler=False, enable_model_summary=False, **options)


class Terminated(SystemExit):
    """SIGTERM stopped training: the resumable checkpoint is saved, the run is KILLED, the exit status is 143."""


def fit(trainer: pl.Trainer, module: HybridRetrievalModule, datamodule: HybridDataModule,
        checkpoint: BestCheckpoint, evaluate_before: bool, seed: int, ckpt_path: Path | None = None) -> bool:
    """Fit, then validate the last weights if no validation saw them. Returns True when training was interrupted."""
    if evaluate_before:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the zero-shot starting point, step 0
        # Iterating a DataLoader draws from torch's RNG; re-seed so training (dropout, sampler) is the same with
        # or without this extra validation.
        pl.seed_everything(seed, workers=True, verbose=False)
    interrupted = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except Exception as failure:
        watch = next((c for c in trainer.callbacks if isinstance(c, RankWatch)), None)
        died = watch.error(failure) if watch is not None else None
        if died is not None:  # a DDP rank died or hung: say which and how, not the transport error it caused here
            raise died from None
        raise
    except SystemExit:
        if not trainer.interrupted:
            raise
        if getattr(trainer, "received_sigterm", False):
            # A scheduler stopping the job: the resumable checkpoint was written on the way out (ResumeCheckpoint);
            # leave quickly, before its SIGKILL, and not as a success.
            log.warning("SIGTERM at step %d: resumable checkpoint saved; continue with train.resume=<run folder>",
                        trainer.global_step)
            raise Terminated(143) from None
        # Lightning turns Ctrl+C into SystemExit after a graceful shutdown; keep what was trained.
        interrupted = True
        log.warning("training interrupted at step %d; validating and saving the last weights", trainer.global_step)
    if checkpoint.needs_final_validation(trainer):
        with checkpoint.final_validation():
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return interrupted


def adapt(cfg: DictConfig, encoder: Any, inputs: TrainingInputs, run: tracking.TrackedRun | None) -> None:
    """The adaptation stage (``adapt=mlm``), in place, its ``adapt/...`` metrics in the same MLflow run."""
    from hybrid_retrieval.adaptation import adapt_encoder
    from hybrid_retrieval.evaluation.config import evaluation_datasets

    result = adapt_encoder(encoder, cfg.adapt, log_metrics=run.log_metrics if run is not None else None,
                           texts=inputs.adapt_texts, eval_datasets=evaluation_datasets(cfg),
                           settings=inputs.adapt_settings)
    log.info("adaptation: %s", {k: v for k, v in result.items() if "heldout" in k})
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)  # training starts from the same RNG state


def logged_data(cfg: DictConfig, inputs: TrainingInputs, datamodule: HybridDataModule) -> list[Any]:
    """What the run reads, for MLflow's dataset inputs: training pairs (and adaptation text), evaluation sets."""
    from hybrid_retrieval.data.fingerprint import evaluation_data, texts_data, training_data

    data = training_data(OmegaConf.to_container(cfg.train_data.datasets, resolve=True), inputs.datasets)
    if inputs.adapt_texts is not None:
        from hybrid_retrieval.adaptation import adapt_tags

        data.append(texts_data(inputs.adapt_texts, "adapt text", "training", adapt_tags(cfg.adapt)["adapt_text"]))
    return data + evaluation_data(cfg.dataset, cfg.get("extra_datasets"), datamodule.evaluation_sets)


def load_best_weights(module: HybridRetrievalModule, checkpoint: BestCheckpoint) -> None:
    state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])


def model_card(output_dir: Path, checkpoint: BestCheckpoint) -> dict[str, Any]:
    """The card of the run's own export: the card ``python -m hybrid_retrieval.export`` writes for the same checkpoint
    (:func:`~hybrid_retrieval.models.model_folder.run_card`: from the run folder, its config, reports and MTEB results,
    and the best checkpoint's model config and step)."""
    return run_card(output_dir, checkpoint.best_model_path)


def train(cfg: DictConfig, inputs: TrainingInputs | None = None, plan: RunPlan | None = None) -> float:
    """Fine-tune as ``cfg`` says; returns the best value of ``cfg.train.monitor`` (what sweepers optimise).

    ``inputs`` and ``plan``: the data and the run's plan (``run_folder.plan_run``), when the caller checked the
    config and made them already (``run.py`` does, before importing Lightning); else they are made here.
    """
    if plan is None:
        check_train_config(cfg)
        plan = plan_run(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    set_attention_backends(cfg.hardware)
    if uses_gpu(cfg.hardware) and cfg.train.get("dynamic_padding"):
        log.warning("train.dynamic_padding=true on a GPU: measured 0.10x the pairs/s of plain batches on an H200 "
                    "(each chunk is a forward and backward pass of its own; docs/speed.md#gpu); it is meant for CPUs")
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    inputs = inputs or load_training_inputs(cfg)
    datamodule = build_datamodule(cfg, inputs)
    encoder = instantiate(cfg.model)
    adapting = inputs.adapt_texts is not None and not plan.resumed  # a resumed run's weights are adapted already
    output_dir, last = plan.folder, plan.last_checkpoint
    evaluate_before = evaluates_before(cfg) and not plan.resumed  # a resumed run logged it already
    checkpoint = BestCheckpoint(plan.checkpoint_dir, cfg.train.monitor, cfg.train.monitor_mode)
    ratio = cfg.sampler.get("mono_ratio")  # HybridBatchSampler's alpha; another batch sampler may have none
    tags = {"model": cfg.model.name, "sampler": cfg.sampler.name, "dataset": cfg.dataset.name,
            "seed": str(cfg.train.seed), "precision": trainer_precision(cfg.hardware),
            "encode_dtype": encode_dtype_name(cfg.hardware)}
    if ratio is not None:
        tags["mono_ratio"] = str(ratio)

    from pytorch_lightning.utilities import rank_zero_only

    title = f"{cfg.model.name} {cfg.sampler.name}{'' if ratio is None else f' α={ratio}'} seed={cfg.train.seed}"
    if adapting:
        from hybrid_retrieval.adaptation import adapt_tags

        tags.update(adapt_tags(cfg.adapt))
        title += f" adapt={cfg.adapt.method}"
    # Every DDP rank (started by Lightning, or by SLURM) adapts, trains and validates; rank 0 alone has an MLflow
    # run, and logs, reports and exports.
    tracked = (tracking.mlflow_run(cfg, job="train", tags=tags, resume_run_id=plan.run_id, title=title,
                                   folder=plan.folder)
               if rank_zero_only.rank == 0 else contextlib.nullcontext(None))
    with tracked as run:
        if adapting:  # the same seed and text on every rank: the same adapted weights
            adapt(cfg, encoder, inputs, run)
        module = build_module(cfg, encoder)  # after adaptation: it may freeze the (adapted) embeddings
        if run is not None:
            start_run(cfg, run, plan, inputs, datamodule)
        trainer = build_trainer(cfg, run, checkpoint, output_dir)
        interrupted = fit(trainer, module, datamodule, checkpoint, evaluate_before, cfg.train.seed, last)
        if run is None:
            return float(checkpoint.best_metrics.get(cfg.train.monitor, math.nan))
        if checkpoint.best_step is None:
            raise RuntimeError(f"no validation produced {cfg.train.monitor!r} (validated steps: "
                               f"{checkpoint.validated_steps}); the metrics logged were {sorted(checkpoint.last_metrics)}")
        best = checkpoint.best_metrics[cfg.train.monitor]
        files = write_reports(checkpoint.best_results, datamodule.evaluation_sets, output_dir)
        main_result = checkpoint.best_results.get(datamodule.evaluation_sets[0].key)
        if cfg.get("save_embeddings") and getattr(main_result, "query_emb", None) is not None:
            for name in ("query_emb", "candidate_emb"):  # python -m hybrid_retrieval.evaluate embeddings=<folder>
                np.save(output_dir / f"{name}.npy", getattr(main_result, name))
        for path in files:
            run.log_artifact(path)
        run.log_metrics({f"best/{cfg.train.monitor}": best, "best/step": checkpoint.best_step},
                        step=trainer.global_step)
        run.set_tag("best_checkpoint", checkpoint.best_model_path)
        load_best_weights(module, checkpoint)
        # Every evaluation set's final validation is in the run folder (written just above): the card reads it there.
        card = model_card(output_dir, checkpoint)
        model_dir = export_model(module, card, output_dir / "model")
        run.set_tag("model_dir", model_dir)
        run.add_to_description(f"Model: `{model_dir}` (`model.path={model_dir}`, or "
                               f"`SentenceTransformer(\"{model_dir}\")`)")
        for name in ("README.md", "hybrid_retrieval.json"):
            if (model_dir / name).is_file():
                run.log_artifact(model_dir / name, "model")
        if cfg.logger.get("log_model", True) and not interrupted:
            run.log_sentence_transformer(model_dir)
        if interrupted:
            run.set_tag("stopped_by", "interrupt")
            report(cfg, datamodule, checkpoint, trainer.global_step, output_dir, model_dir, run, files)
            raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; best weights exported")

    report(cfg, datamodule, checkpoint, trainer.global_step, output_dir, model_dir, run, files)
    record_best(output_dir, cfg.train.monitor, float(best))
    return float(best)


def start_run(cfg: DictConfig, run: tracking.TrackedRun, plan: RunPlan, inputs: TrainingInputs,
              datamodule: HybridDataModule) -> None:
    """What rank 0 records before training: the resume, or the new run's ``run_info.json`` and held-out groups; the
    training data; MLflow's dataset inputs."""
    if plan.resumed:
        log.info("resuming %s from %s", plan.folder, plan.last_checkpoint)
        run.set_tag("resumed_from", plan.last_checkpoint)
    else:
        write_run_info(plan.folder, run.run_id, run.tracking_uri, cfg.logger.experiment_name, cfg)
        if cfg.train_data.get("holdout") is not None:
            run.log_artifact(write_holdout(plan.folder, cfg))
    for data in datamodule.summary():
        log.info("training data %s", data)
    if inputs.overlap is not None:
        path = plan.folder / "contamination.json"
        path.write_text(json.dumps(inputs.overlap.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        run.log_artifact(path)
        found = sum(s.found for s in inputs.overlap.sets)
        run.set_tag("contamination", f"{found} evaluation texts in training" if found else "none")
    run.log_datasets(logged_data(cfg, inputs, datamodule))


def export_model(module: HybridRetrievalModule, card: dict[str, Any], folder: Path) -> Path:
    from hybrid_retrieval.losses.matryoshka import MatryoshkaLoss
    from hybrid_retrieval.models.model_folder import export_encoder

    if isinstance(module.loss, MatryoshkaLoss):  # the folder records the sizes it was trained at
        module.encoder.matryoshka_dims = list(module.loss.dims)
    was_training = module.encoder.training
    module.encoder.eval()
    try:
        return Path(export_encoder(module.encoder, folder, card=card, overwrite=True))  # the run's own folder
    finally:
        module.encoder.train(was_training)


def report(cfg: DictConfig, datamodule: HybridDataModule, checkpoint: BestCheckpoint, steps: int, output_dir: Path,
           model_dir: Path, run: tracking.TrackedRun, files: list[Path]) -> None:
    sets = datamodule.evaluation_sets
    ratio = cfg.sampler.get("mono_ratio")
    print(f"\n{describe(sets[0])}, model {cfg.model.name}, sampler {cfg.sampler.name}"
          f"{'' if ratio is None else f' (alpha={ratio})'}; {steps} steps; best {cfg.train.monitor} = "
          f"{checkpoint.best_metrics[cfg.train.monitor]:.4f} at step {checkpoint.best_step}")
    print(checkpoint.best_results[sets[0].key].table())
    for extra in sets[1:]:
        print(f"\n{extra.key}: {describe(extra)}, at the same checkpoint")
        print(checkpoint.best_results[extra.key].table())
    if checkpoint.zero_shot_metrics:
        before = checkpoint.zero_shot_metrics.get(cfg.train.monitor, math.nan)
        print(f"(before training: {cfg.train.monitor} = {before:.4f})")
    tracking.print_summary({
        "model": f"{model_dir}  (transformers / sentence-transformers / model.path=)",
        "checkpoint": checkpoint.best_model_path,
        "metrics": " ".join(str(p) for p in files if str(p).endswith(".json")),
        "plots": " ".join(str(p) for p in files if str(p).endswith(".png")),
        "run folder": output_dir}, run)
