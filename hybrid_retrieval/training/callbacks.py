"""Callbacks that own checkpoints and the MLflow logger Lightning writes through.

:class:`BestCheckpoint` is Lightning's ``ModelCheckpoint`` keeping the best weights by ``train.monitor``; it also
remembers which steps were validated, the best step, and the evaluation results of the best validation (for the
final report), and it accepts one explicit validation after fit (:meth:`BestCheckpoint.final_validation`) so that
training stopped by ``max_steps``, ``limit_train_batches`` or an interrupt still ends with validated, saved
weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

from hybrid_retrieval.evaluation.evaluator import EvaluationResult
from hybrid_retrieval.tracking import TrackedRun


class BestCheckpoint(ModelCheckpoint):
    """Best weights (``<dirpath>/best.ckpt``, weights and model config only) among the validations that ran."""

    def __init__(self, dirpath: str | Path, monitor: str, mode: str = "max") -> None:
        super().__init__(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode, save_top_k=1,
                         save_weights_only=True, save_on_train_epoch_end=False, auto_insert_metric_name=False,
                         enable_version_counter=False)
        self.validated_steps: list[int] = []
        self.best_step: int | None = None
        self.best_results: dict[str, EvaluationResult] = {}
        self.best_metrics: dict[str, float] = {}
        self.last_results: dict[str, EvaluationResult] = {}
        self.last_metrics: dict[str, float] = {}
        self.zero_shot_metrics: dict[str, float] = {}  # a validation before fit (``train.evaluate_before``)
        self._current: dict[str, EvaluationResult] = {}
        self._final = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, EvaluationResult):
            self._current[batch.key] = outputs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_results = self._current
        self.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not self._counts(trainer):
            # A validation outside fit (the zero-shot starting point) is not a candidate for the best weights.
            if not self.validated_steps:
                self.zero_shot_metrics = dict(self.last_metrics)
            return
        self.validated_steps.append(trainer.global_step)
        before = self.best_model_score
        super().on_validation_end(trainer, pl_module)
        if self.best_model_score is not before:  # ModelCheckpoint replaced its best: this validation won
            self.best_step = trainer.global_step
            self.best_results = self._current
            self.best_metrics = dict(self.last_metrics)

    def _counts(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING or self._final

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        if self._final and trainer.state.fn == TrainerFn.VALIDATING:
            return self._last_global_step_saved == trainer.global_step
        return super()._should_skip_saving_checkpoint(trainer)

    def needs_final_validation(self, trainer: pl.Trainer) -> bool:
        """True when the last weights were never validated during fit."""
        return trainer.global_step not in self.validated_steps

    @contextlib.contextmanager
    def final_validation(self) -> Iterator[None]:
        """Within this block, a ``trainer.validate`` of the last weights competes for the best checkpoint."""
        self._final = True
        try:
            yield
        finally:
            self._final = False


class TrackedRunLogger(Logger):
    """Lightning's metrics into an MLflow run, through the same retrying writes as every other command.

    The run's lifecycle (params, status) belongs to :func:`hybrid_retrieval.tracking.mlflow_run`; this logger only
    writes metrics.
    """

    def __init__(self, run: TrackedRun | None) -> None:
        super().__init__()
        self.run = run

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run.run_id if self.run is not None else ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is logged once, flattened, when the run starts

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run is not None:  # None on DDP ranks other than 0
            self.run.log_metrics(metrics, step=step or 0)


class BatchLog(pl.Callback):
    """Writes what every training batch held, one JSON line per step, to ``<folder>/rank<k>.jsonl``.

    Each line: step, batch kind (mono / cross), query and passage languages, and the sampled rows as
    (dataset, query row, passage row). Under DDP every rank writes its own file; together they show the global
    batch the sampler built (same kind and language on every rank, distinct rows).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = (self.folder / f"rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        import json

        record = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                  "kind": "mono" if batch["monolingual"] else "cross",
                  "languages": sorted(set(batch["languages"])), "passage_languages": sorted(set(batch["passage_languages"])),
                  "rows": [list(row) for row in batch["rows"]]}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
