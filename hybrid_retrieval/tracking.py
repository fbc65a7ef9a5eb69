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


def get_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


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
def mlflow_run(cfg: DictConfig, job: str, tags: Mapping[str, str] | None = None) -> Iterator[TrackedRun]:
    """The run lifecycle every command shares.

    Creates the run (nested under its sweep's parent run in a multirun), logs the flattened config as params and
    the composed config files of ``.hydra/``; ends it FINISHED, or FAILED (KILLED on an interrupt) with the
    error as the ``error`` tag, and lets the exception propagate. Check inputs before entering: a bad value then
    leaves no run behind.
    """
    client, run_id = start_run(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.get("run_name"),
                               tags={"job": job, **(tags or {})})
    run = TrackedRun(client, run_id, cfg.logger.tracking_uri)
    try:
        run.log_params(flatten_config(cfg))
        log_hydra_configs(client, run_id)
        yield run
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than a failed status update
            run.set_tag("error", f"{type(error).__name__}: {error}")
            with_retry(lambda: client.set_terminated(run_id, status))
        raise
    with_retry(lambda: client.set_terminated(run_id, "FINISHED"))
