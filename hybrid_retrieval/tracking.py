"""MLflow at the edge: config flattening, run grouping for sweeps, and logging through an explicit client.

Everything goes through ``MlflowClient`` with explicit run ids, never MLflow's process-global "active run",
so jobs of a Hydra sweep that share a process cannot leak runs into each other. The default store is a SQLite
file (MLflow >= 3.13 refuses a plain ``./mlruns`` folder store).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf

MAX_PARAM_LENGTH = 6000
T = TypeVar("T")


def flatten_config(cfg: DictConfig | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Resolved config as flat ``a.b.c -> value`` strings, cut to MLflow's param length limit."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            if not node and path:
                out[path] = "{}"
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        else:
            out[path] = str(node)[:MAX_PARAM_LENGTH]

    walk(container, prefix)
    return out


def with_retry(action: Callable[[], T], attempts: int = 8, base_delay: float = 0.2) -> T:
    """Run an MLflow call, retrying while SQLite reports a concurrent writer ("database is locked")."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:  # MLflow wraps the sqlite error in several exception types
            if "locked" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(base_delay * (2 ** attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def check_tracking_uri(tracking_uri: str, option: str = "logger.tracking_uri") -> None:
    """A store this process can write to, checked before any work (a folder that cannot be written fails here)."""
    import os

    if tracking_uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return
    path = sqlite_path(tracking_uri)
    if path is None:
        raise ValueError(f"{option}={tracking_uri!r}: expected sqlite:///<path>.db (the default), a database URI or "
                         "an http(s):// MLflow server; MLflow >= 3.13 refuses plain folder stores")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option}={tracking_uri!r}: cannot create or write the folder {folder} "
                         f"({existing} is not a writable folder); point it at a writable place, e.g. "
                         "logger.tracking_uri=sqlite:///$HOME/mlruns/mlflow.db")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option}={tracking_uri!r}: the store {path} is not writable")


def get_client(tracking_uri: str):
    """A client whose store exists: processes that start together on a new SQLite store create it once."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(tracking_uri)
    if path is None:
        return MlflowClient(tracking_uri=tracking_uri)
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store's tables on first use; two processes doing that at once fail
    # ("table ... already exists"), so the first touch of the store is serialised.
    with FileLock(str(path) + ".lock", timeout=300):
        client = MlflowClient(tracking_uri=tracking_uri)
        with_retry(lambda: client.search_experiments(max_results=1))
    return client


def get_experiment_id(client: Any, name: str) -> str:
    def fetch() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:
            # Another job created it first.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    return with_retry(fetch)


def sweep_parent_run(client: Any, experiment_id: str, sweep_id: str, sweep_name: str) -> str:
    """The run that groups every job of one sweep (shown nested in the MLflow UI); created by the first job."""
    def fetch() -> str:
        found = client.search_runs([experiment_id], filter_string=f"tags.sweep_id = '{sweep_id}' "
                                   "and tags.sweep_parent = 'true'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=sweep_name,
                                tags={"sweep_id": sweep_id, "sweep_parent": "true"})
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    return with_retry(fetch)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN/inf values (MLflow stores them, but they break charts and sorting)."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
    for start in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
        with_retry(lambda: client.log_batch(run_id, metrics=batch[start:start + 900]))


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 90):  # MLflow caps params per batch at 100
        with_retry(lambda: client.log_batch(run_id, params=items[start:start + 90]))


def job_context() -> dict[str, str]:
    """Where this Hydra job writes, what it overrides, and which sweep (if any) it belongs to."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"output_dir": str(Path.cwd()), "overrides": "", "sweep_id": "", "job_num": "0"}
    hydra_cfg = HydraConfig.get()
    overrides = ",".join(hydra_cfg.overrides.task)
    context = {"output_dir": hydra_cfg.runtime.output_dir, "overrides": overrides, "sweep_id": "",
               "job_num": str(hydra_cfg.job.get("num", 0))}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        context["sweep_id"] = str(Path(hydra_cfg.sweep.dir).resolve())
    return context


def start_run(tracking_uri: str, experiment_name: str, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """Create a run (nested under its sweep's parent run in a multirun); returns (client, run id)."""
    client = get_client(tracking_uri)
    experiment_id = get_experiment_id(client, experiment_name)
    context = job_context()
    all_tags = {"overrides": context["overrides"] or "(defaults)", "output_dir": context["output_dir"]}
    if context["sweep_id"]:
        parent = sweep_parent_run(client, experiment_id, context["sweep_id"],
                                  f"sweep {Path(context['sweep_id']).name}")
        all_tags.update({"mlflow.parentRunId": parent, "sweep_id": context["sweep_id"],
                         "job_num": context["job_num"]})
    all_tags.update(tags or {})
    name = run_name or context["overrides"] or None
    run = with_retry(lambda: client.create_run(experiment_id, run_name=name, tags=all_tags))
    return client, run.info.run_id


def log_hydra_configs(client: Any, run_id: str) -> None:
    """The composed config files of this job (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``)."""
    folder = Path(job_context()["output_dir"]) / ".hydra"
    if folder.is_dir():
        with_retry(lambda: client.log_artifacts(run_id, str(folder), "config"))


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class TrackedRun:
    """One MLflow run, written through the retrying client; what :func:`mlflow_run` yields."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def log_params(self, params: Mapping[str, str]) -> None:
        log_params(self.client, self.run_id, params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with_retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        with_retry(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path))

    def set_tag(self, key: str, value: Any) -> None:
        with_retry(lambda: self.client.set_tag(self.run_id, key, str(value)[:MAX_TAG_LENGTH]))


MAX_TAG_LENGTH = 5000


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, job: str, tags: Mapping[str, str] | None = None,
               resume_run_id: str | None = None) -> Iterator[TrackedRun]:
    """The run lifecycle every command shares.

    Creates the run (nested under its sweep's parent run in a multirun), or reopens ``resume_run_id``; logs the
    flattened config as params (``train.resume`` excepted: it is the ``resumed_from`` tag) and the composed config
    files of ``.hydra/``; ends it FINISHED, or FAILED (KILLED on an interrupt or a signal) with the error as the
    ``error`` tag, and lets the exception propagate. Check inputs before entering: a bad value then leaves no run
    behind. Runs of this host whose process died without ending them (SIGKILL) are marked KILLED on the way.
    """
    import os
    import socket

    identity = {"host": socket.gethostname(), "pid": str(os.getpid())}
    if resume_run_id is None:
        client, run_id = start_run(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.get("run_name"),
                                   tags={"job": job, **(tags or {}), **identity})
    else:
        client, run_id = get_client(cfg.logger.tracking_uri), resume_run_id
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        for key, value in identity.items():
            with_retry(lambda: client.set_tag(run_id, key, value))
    run = TrackedRun(client, run_id, cfg.logger.tracking_uri)
    try:
        mark_dead_runs(client, run_id)
        params = {k: v for k, v in flatten_config(cfg).items() if k != "train.resume"}
        if resume_run_id is not None:  # a param may be logged once: only what the first attempt did not log
            logged = with_retry(lambda: client.get_run(run_id)).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        run.log_params(params)
        log_hydra_configs(client, run_id)
        yield run
    except BaseException as error:
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than a failed status update
            run.set_tag("error", f"{type(error).__name__}: {error}")
            with_retry(lambda: client.set_terminated(run_id, status))
        raise
    with_retry(lambda: client.set_terminated(run_id, "FINISHED"))


def mark_dead_runs(client: Any, current_run_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs started on this host by processes that no longer exist (killed by SIGKILL, or
    by the machine going down); returns their ids."""
    import os
    import socket

    host = socket.gethostname()
    experiment_id = with_retry(lambda: client.get_run(current_run_id)).info.experiment_id
    found = with_retry(lambda: client.search_runs([experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.host = '{host}'"), max_results=200))
    dead = []
    for other in found:
        pid = other.data.tags.get("pid", "")
        if other.info.run_id == current_run_id or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        with_retry(lambda: client.set_tag(other.info.run_id, "error",
                                          f"process {pid} on {host} ended without closing this run (killed)"))
        with_retry(lambda: client.set_terminated(other.info.run_id, "KILLED"))
        dead.append(other.info.run_id)
    return dead


@contextlib.contextmanager
def folder_status(folder: str | Path | None = None) -> Iterator[None]:
    """``status.json`` in a command's run folder: running, then finished, failed (with the error) or killed, so a
    folder left by a failure is told apart from a run in progress."""
    import json

    path = Path(folder or job_context()["output_dir"]) / "status.json"
    started = time.time()

    def write(status: str, error: str | None = None) -> None:
        with contextlib.suppress(OSError):  # a status file must never hide the real outcome
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"status": status, "started": started, "ended": None if status == "running" else time.time()}
            if error:
                record["error"] = error
            path.write_text(json.dumps(record, indent=2) + "\n")

    write("running")
    try:
        yield
    except BaseException as error:
        killed = isinstance(error, (KeyboardInterrupt, SystemExit))
        write("killed" if killed else "failed", f"{type(error).__name__}: {error}")
        raise
    write("finished")
