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
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only


from hybrid_retrieval.tracking import TrackedRun
from hybrid_retrieval.training.run_folder import BEST, LAST


class BestCheckpoint(ModelCheckpoint):
    """Best weights (``<dirpath>/best.ckpt``, weights and model config only) among the validations that ran."""

    def __init__(self, dirpath: str | Path, monitor: str, mode: str = "max") -> None:
        super().__init__(dirpath=str(dirpath), filename=BEST, monitor=monitor, mode=mode, save_top_k=1,
                         save_weights_only=True, save_on_train_epoch_end=False, auto_insert_metric_name=False,
                         enable_version_counter=False)
        self.validated_steps: list[int] = []
        self.best_step: int | None = None
        self.best_results: dict[str, Any] = {}
        self.best_metrics: dict[str, float] = {}
        self.last_results: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}
        self.zero_shot_metrics: dict[str, float] = {}  # a validation before fit (``train.evaluate_before``)
        self._current: dict[str, Any] = {}
        self._final = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is not None:
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

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hybrid_retrieval"] = {
            "validated_steps": list(self.validated_steps), "best_step": self.best_step,
            "best_metrics": dict(self.best_metrics), "zero_shot_metrics": dict(self.zero_shot_metrics),
            "best_results": {key: _result_state(result) for key, result in self.best_results.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = state_dict.get("hybrid_retrieval", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "hybrid_retrieval"})
        self.validated_steps = list(own.get("validated_steps", []))
        self.best_step = own.get("best_step")
        self.best_metrics = dict(own.get("best_metrics", {}))
        self.zero_shot_metrics = dict(own.get("zero_shot_metrics", {}))
        self.best_results = {key: _result_from_state(value) for key, value in own.get("best_results", {}).items()}

    @contextlib.contextmanager
    def final_validation(self) -> Iterator[None]:
        """Within this block, a ``trainer.validate`` of the last weights competes for the best checkpoint."""
        self._final = True
        try:
            yield
        finally:
            self._final = False


def _result_state(result: Any) -> dict[str, Any]:
    kind = type(result)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", "data": result.to_dict()}


def _result_from_state(state: dict[str, Any]) -> Any:
    import importlib

    module, _, name = state["class"].rpartition(".")
    return getattr(importlib.import_module(module), name).from_dict(state["data"])


class ResumeCheckpoint(ModelCheckpoint):
    """The full training state (weights, optimiser, scheduler, loops, sampler position, RNG) in
    ``<dirpath>/last.ckpt``: every ``every_n_steps`` steps, at the end of each epoch, and when training stops on
    an exception or a signal (the last finite state, for a NaN loss). ``train.resume`` continues from it."""

    def __init__(self, dirpath: str | Path, every_n_steps: int | None) -> None:
        super().__init__(dirpath=str(dirpath), filename=LAST, monitor=None, save_top_k=1, save_weights_only=False,
                         every_n_train_steps=every_n_steps, save_on_exception=True, enable_version_counter=False,
                         auto_insert_metric_name=False)


class RunFolderCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer for the run folder: each checkpoint is serialised in memory, refused before
    any write when its folder has not the room, else written to a temporary file beside it, flushed and renamed
    (``storage.write_bytes_atomic``). A full disk therefore never leaves a partial ``last.ckpt`` or ``best.ckpt``:
    the previous ones stay loadable, and the error names the folder, the bytes needed and the resume."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import io

        import torch

        from hybrid_retrieval.storage import write_bytes_atomic

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        write_bytes_atomic(buffer.getbuffer(), path, f"checkpoint {path.name}", advice=(
            "the checkpoints already there are whole and kept; free space (or set hydra.run.dir on a larger disk "
            f"for a new run) and continue with the same command and train.resume={path.parent.parent}"))


class TrackedRunLogger(Logger):
    """Lightning's metrics into an MLflow run, through the same retrying writes as every other command.

    The run's lifecycle (params, status) belongs to :func:`hybrid_retrieval.tracking.mlflow_run`; this logger only
    writes metrics. With a :class:`ResumeCheckpoint`, metrics are held back until the next resumable checkpoint is
    written: a run killed in between and resumed from that checkpoint logs those steps once, with no duplicates.
    """

    def __init__(self, run: TrackedRun | None, hold_until_checkpoint: bool = False) -> None:
        super().__init__()
        self.run = run
        self.hold_until_checkpoint = hold_until_checkpoint
        self._pending: list[tuple[dict[str, float], int]] = []
        # Metrics up to this step are covered by a resumable checkpoint. Training metrics of the batch that
        # completed step G are logged at step G - 1; validations at the step they evaluated.
        self._safe_step = -1

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
        if self.run is None:  # DDP ranks other than 0
            return
        self._pending.append((dict(metrics), step or 0))
        self.flush(None if not self.hold_until_checkpoint else self._safe_step)

    @rank_zero_only
    def flush(self, up_to: int | None = None) -> None:
        """Write the held metrics (those logged at steps <= ``up_to``, or all), in logging order."""
        kept = []
        for metrics, step in self._pending:
            if up_to is None or step <= up_to:
                self.run.log_metrics(metrics, step=step)
            else:
                kept.append((metrics, step))
        self._pending = kept

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if isinstance(checkpoint_callback, ResumeCheckpoint):  # (a weakref proxy; isinstance sees through it)
            self._safe_step = max(self._safe_step, int(checkpoint_callback._last_global_step_saved) - 1)
            self.flush(self._safe_step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "success":
            self.flush()


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


class TrainingProgress(pl.Callback):
    """Training throughput in pairs/s (all ranks together) with the loss: Lightning's bar on a terminal gets a
    ``pairs/s`` field; in logs and CI (no terminal) a line every N seconds replaces the bar
    (:mod:`hybrid_retrieval.progress`)."""

    def __init__(self, on_terminal: bool | None = None) -> None:
        from hybrid_retrieval.progress import on_terminal as stdout_is_terminal

        self.on_terminal = stdout_is_terminal() if on_terminal is None else on_terminal
        self.progress: Any = None
        self.started = 0.0
        self.pairs = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        from hybrid_retrieval.progress import Progress

        self.started, self.pairs = time.monotonic(), 0
        if not self.on_terminal and trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if total is None:
                with contextlib.suppress(Exception):
                    total = int(trainer.estimated_stepping_batches)
            self.progress = Progress(total, "train", "steps", initial=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import time

        self.pairs += int(batch["query"]["input_ids"].shape[0]) * trainer.world_size
        rate = self.pairs / max(time.monotonic() - self.started, 1e-9)
        pl_module.log("pairs/s", rate, prog_bar=True, logger=False, batch_size=1, rank_zero_only=True)
        if self.progress is not None:
            loss = trainer.callback_metrics.get("train/loss")
            self.progress.set_note(f"{rate:.1f} pairs/s" + (f", loss {float(loss):.4f}" if loss is not None else ""))
            self.progress.update()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
