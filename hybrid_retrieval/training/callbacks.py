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
from hybrid_retrieval.run_folder import BEST, LAST


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
    an exception or a signal (the last finite state, for a NaN loss). ``train.resume`` continues from it. Under
    DDP not on an exception (``save_on_exception=False``): the ranks may be at different points of a step then, so
    every rank saves (the periodic checkpoint) or none does."""

    def __init__(self, dirpath: str | Path, every_n_steps: int | None, save_on_exception: bool = True) -> None:
        super().__init__(dirpath=str(dirpath), filename=LAST, monitor=None, save_top_k=1, save_weights_only=False,
                         every_n_train_steps=every_n_steps, save_on_exception=save_on_exception,
                         enable_version_counter=False, auto_insert_metric_name=False)


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


class RankDiedError(RuntimeError):
    """A DDP rank ended during training: which one, how (a signal or an exit status), and the resume."""

    def __init__(self, message: str, by_signal: bool) -> None:
        super().__init__(message)
        self.mlflow_status = "KILLED" if by_signal else "FAILED"


def _collective_timed_out(error: BaseException) -> bool:
    """gloo's "Timed out waiting ...ms for recv operation", NCCL's watchdog "... timeout" (through the causes)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        if isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text):
            return True
        error = error.__cause__ or error.__context__
    return False


def _process_state(pid: int) -> str:
    """What a live rank is doing, from the kernel's process table (Linux), in words."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "in an unknown state"
    return {"T": "was stopped (SIGSTOP or Ctrl+Z)", "t": "was stopped by a debugger",
            "D": "was waiting on I/O in the kernel (a hung file system?)", "Z": "had ended",
            "R": "was running (still computing, or waiting in another collective)",
            "S": "was sleeping (waiting in another collective, or on a lock)"}.get(state, f"was in state {state}")


class RankHungError(RankDiedError):
    """A collective gave up after ``hardware.collective_timeout_s`` while every rank was alive: which ranks were
    stuck in what state, and the resume."""

    def __init__(self, message: str) -> None:
        super().__init__(message, by_signal=False)


class RankWatch(pl.Callback):
    """Rank 0's watch over the ranks Lightning started as child processes (``hardware=ddp_cpu``, ``ddp`` on one
    node). A rank that dies makes the others fail in their next collective with a transport error (gloo's
    "Connection reset by peer") or wait in it (NCCL) until ``hardware.collective_timeout_s``; neither says which
    rank died. This watch polls the children every 0.1 s; when one ends with a non-zero status, training's error
    is replaced by a :class:`RankDiedError` naming the rank, its pid, the signal or exit status, the step and the
    resume command. Rank 0 then writes no checkpoint on the way out (``ResumeCheckpoint`` saves on an exception only
    in one process): the periodic ``last.ckpt``, written by every rank together, is the one a resume continues
    from. A rank 0 stuck in a collective is stopped by the watch itself 10 s after the death, with the same
    message. Lightning's own child watcher, which SIGKILLs rank 0 within 5 s of a child's death before anything
    could be said, is given an empty list to watch: this one takes its place.

    A rank that hangs alive (stopped, or stuck on a file system) makes rank 0's next collective give up after
    ``hardware.collective_timeout_s``: that error becomes a :class:`RankHungError` naming the timeout and each
    other rank's process state, and the ranks are stopped.

    SIGTERM to any rank (a scheduler preempting one node) stops all of them at the same step: the signal only sets
    a flag, the ranks agree on it after every step, write ``last.ckpt`` together and exit with status 143. Every
    rank saves or none does; a resume continues from that step."""

    def __init__(self, run_folder: Path, collective_timeout_s: float | None = None, poll_s: float = 0.1,
                 grace_s: float = 10.0) -> None:
        self.run_folder = Path(run_folder)
        self.collective_timeout_s = collective_timeout_s
        self.poll_s, self.grace_s = poll_s, grace_s
        self.procs: list[Any] = []
        self.world = 1
        self.step = 0
        self.dead: tuple[int, int, int] | None = None  # (rank, pid, return code)
        self.reported = None
        self.sigterm = False    # this rank received SIGTERM
        self.stopping = False   # the ranks agreed to stop: the children's exit 143 is expected
        self._thread: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import signal

        if trainer.world_size > 1:
            # After Lightning's own handler (registered before this hook): its handler broadcasts from inside the
            # signal handler, a collective only the signalled rank joins. Here SIGTERM only sets a flag.
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Every step, the ranks agree whether any of them received SIGTERM (one all-reduce of one number); if so,
        every rank takes part in writing ``last.ckpt`` at this step, and all stop at its end (exit status 143)."""
        if trainer.world_size <= 1:
            return
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.sigterm else 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        self.stopping = True
        resumable = next(c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint))
        if resumable._last_global_step_saved != trainer.global_step:
            resumable._save_checkpoint(trainer, resumable.format_checkpoint_name({}))
        # Lightning's own stop: it logs this step's metrics, then raises SIGTERMException at the end of the step
        # (train.fit turns it into exit status 143), on every rank alike.
        trainer._signal_connector.received_sigterm = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading

        launcher = getattr(trainer.strategy, "launcher", None)
        self.procs = list(getattr(launcher, "procs", None) or [])
        if not trainer.is_global_zero or not self.procs:
            return
        self.world = trainer.world_size
        for thread in threading.enumerate():
            if thread.name == "child-process-observer":
                thread._child_processes = []  # Lightning's watcher: see the class docstring
        self.reported = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rank-watch", daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step = trainer.global_step

    def _watch(self) -> None:
        import os
        import sys
        import time

        while self.dead is None:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code and not (self.stopping and code == 143):  # a signal (negative) or an error exit
                    self.dead = (rank, proc.pid, code)
                    break
            else:
                if all(proc.returncode == 0 for proc in self.procs):
                    return  # every child finished
                time.sleep(self.poll_s)
        if self.reported.wait(self.grace_s):
            return
        # Rank 0 is stuck in a collective: say it from here and end the job.
        print(f"RankDiedError: {self.message()}", file=sys.stderr, flush=True)
        self._stop_children()
        os._exit(1)

    def _stop_children(self) -> None:
        import contextlib
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGKILL)

    def error(self, failure: BaseException | None = None, wait_s: float = 3.0) -> RankDiedError | None:
        """After training failed on rank 0 with ``failure``: the dead rank's error (waiting up to ``wait_s`` for the
        watch to see the death that caused the failure); a :class:`RankHungError` when every rank is alive and
        ``failure`` is a collective's timeout; else None."""
        import time

        if self._thread is None:
            return None
        deadline = time.monotonic() + wait_s
        while self.dead is None and time.monotonic() < deadline:
            time.sleep(self.poll_s / 2)
        if self.dead is not None:
            error: RankDiedError = RankDiedError(self.message(), by_signal=self.dead[2] < 0)
        elif failure is not None and _collective_timed_out(failure):
            # The ranks' states are read before they are stopped.
            states = [(rank, proc.pid, _process_state(proc.pid)) for rank, proc in enumerate(self.procs, start=1)]
            error = RankHungError(self.hung_message(states))
        else:
            return None
        self.reported.set()
        self._stop_children()
        return error

    def hung_message(self, states: list[tuple[int, int, str]]) -> str:
        waited = f"{self.collective_timeout_s:g} s" if self.collective_timeout_s else "torch's default timeout"
        ranks = "; ".join(f"rank {rank} (pid {pid}) {state}" for rank, pid, state in states)
        return (f"rank 0 of {self.world} waited {waited} (hardware.collective_timeout_s) in a collective at step "
                f"{self.step} and gave up: {ranks}; the other ranks were stopped." + self._resume_text())

    def message(self) -> str:
        import signal

        rank, pid, code = self.dead
        if code < 0:
            name = signal.Signals(-code).name
            how = f"killed by {name}" + (" (the signal of the kernel's OOM killer and of `kill -9`: "
                                         "`dmesg | grep -i oom` tells which)" if name == "SIGKILL" else "")
        else:
            how = f"exited with status {code} (its own error is in the job's output above)"
        text = (f"rank {rank} of {self.world} (pid {pid}) died at step {self.step}: {how}; the other ranks were "
                "stopped.")
        return text + self._resume_text()

    def _resume_text(self) -> str:
        from hybrid_retrieval.tracking import job_command, job_context
        from hybrid_retrieval.run_folder import LAST_CHECKPOINT

        last = self.run_folder / LAST_CHECKPOINT
        if not last.is_file():
            return " No resumable checkpoint was written yet (train.checkpoint_every_n_steps): start the run again."
        import torch

        try:
            step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", "?")
        except Exception:  # noqa: BLE001 - the message must come out; a resume checks the file in full
            step = "?"
        command = " ".join(part for part in job_command(job_context()).split(" ")
                           if not part.startswith("train.resume="))
        return f" {last} (step {step}) is whole: continue with {command} train.resume={self.run_folder}"
