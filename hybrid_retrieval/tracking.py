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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import BadValue, MissingPath


@dataclass
class LoggerConfig:
    """The ``logger`` node's schema (``conf/logger/mlflow.yaml``)."""

    tracking_uri: str                   # sqlite:///<file>, file:<folder> or http(s)://<server>
    experiment_name: str = "hybrid_retrieval"
    log_model: bool = True              # the exported folder also as an MLflow model (sentence-transformers flavour)
    delivery_timeout: float = 60        # seconds a command waits at its end for MLflow writes still held


MAX_PARAM_LENGTH = 6000
STATUS_FILE = "status.json"  # a command's outcome in its run folder (folder_status)
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
            if not _locked(error) or attempt == attempts - 1:
                raise
            time.sleep(base_delay * (2 ** attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def _locked(error: BaseException) -> bool:
    return "locked" in str(error).lower()


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def check_tracking_uri(tracking_uri: str, option: str = "logger.tracking_uri") -> None:
    """A store this process can write to, checked before any work (a folder that cannot be written fails here)."""
    import os

    if tracking_uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return
    path = sqlite_path(tracking_uri)
    if path is None:
        raise BadValue(f"{option}={tracking_uri!r}: expected sqlite:///<path>.db (the default), a database URI or "
                         "an http(s):// MLflow server; MLflow >= 3.13 refuses plain folder stores")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadValue(f"{option}={tracking_uri!r}: cannot create or write the folder {folder} "
                         f"({existing} is not a writable folder); point it at a writable place, e.g. "
                         "logger.tracking_uri=sqlite:///$HOME/mlruns/mlflow.db")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadValue(f"{option}={tracking_uri!r}: the store {path} is not writable")


def get_client(tracking_uri: str):
    """A client whose store exists: processes that start together on a new SQLite store create it once."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(tracking_uri)
    if path is None:
        import os

        # A run's writes are sent by its Delivery, which waits and sends again itself: MLflow's own HTTP retries
        # (7, backing off up to minutes) would only delay the first write after the server is back.
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(name, value)
        return MlflowClient(tracking_uri=tracking_uri)
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store's tables on first use; two processes doing that at once fail
    # ("table ... already exists"), so the first touch of the store is serialised.
    with FileLock(str(path) + ".lock", timeout=300):
        client = MlflowClient(tracking_uri=tracking_uri)
        with_retry(lambda: client.search_experiments(max_results=1))
    return client


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, judges); these runs are model
# training, so the experiment says so.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def get_experiment_id(client: Any, name: str) -> str:
    def fetch() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            # Artifacts beside a SQLite store, not in ./mlruns of whichever folder the first run started from.
            store = sqlite_path(client.tracking_uri) if hasattr(client, "tracking_uri") else None
            location = (store.parent / "artifacts").resolve().as_uri() if store is not None else None
            try:
                client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
            except Exception:
                pass  # another job created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise RuntimeError(f"could not create the MLflow experiment {name!r}")
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id

    return with_retry(fetch)


def sweep_parent_run(client: Any, experiment_id: str, sweep_id: str, sweep_name: str) -> str:
    """The run that groups every job of one sweep (shown nested in the MLflow UI); created by the first job."""
    def fetch() -> str:
        found = client.search_runs([experiment_id], filter_string=f"tags.sweep_id = '{sweep_id}' "
                                   "and tags.sweep_parent = 'true'", max_results=1)
        if found:
            return found[0].info.run_id
        note = (f"Sweep `{command_line()}`, writing to `{sweep_id}`. Its jobs are nested below; the comparison "
                "table and plots are in the artifacts (report/) when the sweep ends.")
        run = client.create_run(experiment_id, run_name=sweep_name,
                                tags={"sweep_id": sweep_id, "sweep_parent": "true", NOTE: note})
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    return with_retry(fetch)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN/inf values (MLflow stores them, but they break charts and sorting)."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def job_context() -> dict[str, Any]:
    """Where this Hydra job writes, what it overrides, and which sweep (if any) it belongs to."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"output_dir": str(Path.cwd()), "overrides": "", "sweep_id": "", "job_num": "0"}
    hydra_cfg = HydraConfig.get()
    overrides = ",".join(hydra_cfg.overrides.task)
    context = {"output_dir": hydra_cfg.runtime.output_dir, "overrides": overrides, "sweep_id": "",
               "job_num": str(hydra_cfg.job.get("num", 0)), "override_list": list(hydra_cfg.overrides.task)}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        context["sweep_id"] = str(Path(hydra_cfg.sweep.dir).resolve())
    return context


NOTE = "mlflow.note.content"  # the run's description in the UI (Markdown)


def _driver() -> str:
    """The driver as a user types it: ``python run.py``, ``python -m hybrid_retrieval.<command>``."""
    import sys

    script = Path(sys.argv[0])
    if script.name == "run.py":
        return "python run.py"
    if script.parent.name == "hybrid_retrieval":
        return f"python -m hybrid_retrieval.{script.stem}"
    return f"python {sys.argv[0]}"


def command_line() -> str:
    """How this process was started, as a user types it (``python run.py ...``, ``python -m hybrid_retrieval.x``)."""
    import shlex
    import sys

    return " ".join([_driver(), *(shlex.quote(arg) for arg in sys.argv[1:])])


def swept_overrides(argv: Sequence[str] | None = None) -> list[str]:
    """The overrides of a multirun command line that list several values (``sampler=mono,cross``)."""
    import sys

    swept = []
    for arg in (sys.argv[1:] if argv is None else argv):
        if arg.startswith("-") or "=" not in arg:
            continue
        value, depth = arg.split("=", 1)[1], 0
        for char in value:
            depth += char in "[({"
            depth -= char in "])}"
            if char == "," and depth == 0:
                swept.append(arg)
                break
        else:
            if value.startswith(("range(", "choice(", "glob(")):
                swept.append(arg)
    return swept


def job_command(context: Mapping[str, Any]) -> str:
    """The command that reruns this one job alone: the driver and the job's own overrides (a sweep job's values,
    without -m)."""
    import shlex

    if "override_list" not in context:
        return command_line()
    return " ".join([_driver(), *(shlex.quote(o) for o in context["override_list"])])


def source_tags() -> dict[str, str]:
    """MLflow's own source fields (the UI's Source column): the entry point (``run.py`` or the command module,
    relative to the project), and the git commit when the project is a git checkout."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    name = str(script.relative_to(root)) if script is not None and script.is_relative_to(root) else _driver()
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def start_run(tracking_uri: str, experiment_name: str, run_name: str | None = None,
              tags: Mapping[str, str] | None = None, title: str | None = None) -> tuple[Any, str]:
    """Create a run (nested under its sweep's parent run in a multirun); returns (client, run id).

    Its name: ``run_name``, else ``title`` followed by the command-line overrides; its description (the UI's
    "Description"): the title, the command that reruns this job, and the run folder."""
    client = get_client(tracking_uri)
    experiment_id = get_experiment_id(client, experiment_name)
    context = job_context()
    all_tags = {"overrides": context["overrides"] or "(defaults)", "output_dir": context["output_dir"],
                "command": job_command(context), **source_tags()}
    if context["sweep_id"]:
        folder = Path(context["sweep_id"])
        parent = sweep_parent_run(client, experiment_id, context["sweep_id"],
                                  f"sweep {folder.parent.name}/{folder.name} " + " ".join(swept_overrides()))
        all_tags.update({"mlflow.parentRunId": parent, "sweep_id": context["sweep_id"],
                         "job_num": context["job_num"]})
    all_tags.update(tags or {})
    shown = context["overrides"]
    if context["sweep_id"]:  # a sweep job's name shows its values of what the sweep varies
        keys = {o.split("=", 1)[0] for o in swept_overrides()}
        shown = ",".join(o for o in context.get("override_list", []) if o.split("=", 1)[0] in keys)
    name = run_name or " · ".join(part for part in (title, shown) if part) or None
    all_tags[NOTE] = "\n\n".join(part for part in (
        f"**{title}**" if title else "", f"Command: `{all_tags['command']}`",
        f"Run folder: `{context['output_dir']}`") if part)
    run = with_retry(lambda: client.create_run(experiment_id, run_name=name, tags=all_tags))
    return client, run.info.run_id


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """The page of an experiment (or one run) in the model-training view of the MLflow UI."""
    page = f"{UI_ADDRESS}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def print_summary(items: Mapping[str, Any], run: TrackedRun | None = None, tracking_uri: str | None = None) -> None:
    """The end of every command: where its outputs are, its MLflow run, and how to open the UI on that store."""
    rows = [(name, str(value)) for name, value in items.items() if value not in (None, "", [])]
    uri = run.tracking_uri if run is not None else tracking_uri
    if run is not None:
        rows.append(("MLflow run", f"{run.run_id} ({ui_link(run.experiment_id, run.run_id)})"))
    if uri:
        rows.append(("MLflow UI", ui_command(uri)))
    width = max(len(name) for name, _ in rows) + 1 if rows else 0
    print()
    for name, value in rows:
        print(f"{name + ':':<{width}} {value}")


class TrackedRun:
    """One MLflow run; what :func:`mlflow_run` yields. Its writes go through a :class:`Delivery` when it has one (off
    the caller's thread, journaled in the run folder), else straight to the store."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, experiment_id: str = "", description: str = "",
                 delivery: Delivery | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.description = description
        self.delivery = delivery

    def _send(self, write: dict[str, Any]) -> None:
        if self.delivery is not None:
            self.delivery.put(write)
        else:
            apply_write(self.client, self.run_id, self.tracking_uri, write)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)  # one timestamp, kept: a write sent twice is stored once
        values = [[k, v, now, int(step)] for k, v in finite_metrics(metrics).items()]
        if values:
            self._send({"op": "metrics", "metrics": values})

    def log_params(self, params: Mapping[str, str]) -> None:
        if params:
            self._send({"op": "params", "params": dict(params)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._send({"op": "artifacts", "path": str(Path(folder).resolve()), "artifact_path": artifact_path})

    def log_sentence_transformer(self, folder: str | Path, name: str = "sentence_transformer") -> None:
        """An exported model folder as an MLflow model of the sentence-transformers flavour, in this run's
        experiment and linked to this run (the UI's Models column, the registry); its URI (``models:/<id>``,
        which ``mlflow.sentence_transformers.load_model`` reads) becomes the run's ``model_uri`` tag."""
        self._send({"op": "model", "path": str(Path(folder).resolve()), "name": name})

    def log_datasets(self, datasets: Sequence[Any]) -> None:
        """MLflow dataset inputs (the UI's Dataset column): each :class:`~hybrid_retrieval.data.fingerprint.DatasetInfo`
        with its name, digest, source, schema and row count, tagged with its context (training / evaluation).
        A resumed run logging the same data again adds nothing."""
        import json

        inputs = []
        for info in datasets:
            schema = json.dumps({"mlflow_colspec": [{"type": kind, "name": name, "required": True}
                                                    for name, kind in info.columns.items()]}) if info.columns else None
            profile = json.dumps({"num_rows": info.rows}) if info.rows is not None else None
            source = json.dumps({"uri": Path(info.source).as_uri() if Path(info.source).is_absolute() else info.source})
            inputs.append({"name": info.name, "digest": info.digest, "source": source, "schema": schema,
                           "profile": profile, "context": info.context})
        if inputs:
            self._send({"op": "inputs", "datasets": inputs})

    def set_tag(self, key: str, value: Any) -> None:
        self._send({"op": "tag", "key": key, "value": str(value)[:MAX_TAG_LENGTH]})

    def add_to_description(self, text: str) -> None:
        """Append a paragraph (Markdown) to the run's description."""
        self.description = f"{self.description}\n\n{text}" if self.description else text
        self.set_tag(NOTE, self.description)

    def end(self, status: str) -> None:
        self._send({"op": "status", "status": status})


MAX_TAG_LENGTH = 5000


def apply_write(client: Any, run_id: str, tracking_uri: str, write: Mapping[str, Any]) -> None:
    """One write of a :class:`TrackedRun` (a journal line of :class:`Delivery`) sent to the store."""
    from mlflow.entities import Metric, Param

    op = write["op"]
    if op == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in write["metrics"]]
        for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            with_retry(lambda: client.log_batch(run_id, metrics=metrics[start:start + 900]))
    elif op == "params":
        params = [Param(k, v) for k, v in write["params"].items()]
        for start in range(0, len(params), 90):  # MLflow caps params per batch at 100
            with_retry(lambda: client.log_batch(run_id, params=params[start:start + 90]))
    elif op == "tag":
        with_retry(lambda: client.set_tag(run_id, write["key"], write["value"]))
    elif op in ("artifact", "artifacts"):
        _log_artifacts(client, run_id, Path(write["path"]), write.get("artifact_path"))
    elif op == "model":
        _log_sentence_transformer(client, run_id, tracking_uri, Path(write["path"]), write["name"])
    elif op == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local", source=d["source"],
                                       schema=d["schema"], profile=d["profile"]),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in write["datasets"]]
        with_retry(lambda: client.log_inputs(run_id, datasets=inputs))
    elif op == "status":
        with_retry(lambda: client.set_terminated(run_id, write["status"]))
    elif op != "header":
        raise BadValue(f"unknown MLflow write {op!r}")


_ARTIFACT_FOLDERS: dict[str, Path | None] = {}  # run id -> its local artifact folder (a run's never changes)


def _local_artifact_folder(client: Any, run_id: str) -> Path | None:
    """Where a run's artifacts live when its store keeps them on a local file system, else None."""
    from urllib.parse import unquote, urlparse

    if run_id not in _ARTIFACT_FOLDERS:
        parsed = urlparse(with_retry(lambda: client.get_run(run_id)).info.artifact_uri)
        _ARTIFACT_FOLDERS[run_id] = Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None
    return _ARTIFACT_FOLDERS[run_id]


def _log_artifacts(client: Any, run_id: str, path: Path, artifact_path: str | None) -> None:
    """A file or a folder's files into the run's artifacts. In a local store each file is copied through a
    temporary file (``storage.copy_file_atomic``): a full disk leaves no partial artifact and names the bytes."""
    from hybrid_retrieval.storage import copy_file_atomic

    if not path.exists():
        raise MissingPath(f"{path}: gone before it was sent to MLflow")
    local = _local_artifact_folder(client, run_id)
    if local is None:
        if path.is_dir():
            with_retry(lambda: client.log_artifacts(run_id, str(path), artifact_path))
        else:
            with_retry(lambda: client.log_artifact(run_id, str(path), artifact_path))
        return
    target = local / (artifact_path or "")
    files = [(path, target / path.name)] if path.is_file() else [
        (file, target / file.relative_to(path)) for file in sorted(path.rglob("*")) if file.is_file()]
    advice = f"every file is in the run folder; free space and run {DELIVER_COMMAND} <run folder>"
    for source, destination in files:
        copy_file_atomic(source, destination, f"MLflow artifact {destination.name}", advice)


def _log_sentence_transformer(client: Any, run_id: str, tracking_uri: str, folder: Path, name: str) -> None:
    # (`name` differs from the run's ``model/`` artifact folder: MLflow lists a run's ``<name>/`` artifacts from a
    # logged model of that name when there is one.)
    import mlflow
    from sentence_transformers import SentenceTransformer

    from hybrid_retrieval.storage import DiskFullError, folder_size, free_bytes

    run = with_retry(lambda: client.get_run(run_id))
    local = _local_artifact_folder(client, run_id)
    needed = folder_size(folder)
    if local is not None and (free_bytes(local) or needed) < needed:  # MLflow copies in place: refuse up front
        raise DiskFullError(f"the MLflow model {name}", local, needed,
                            f"the model is in the run folder; free space and run {DELIVER_COMMAND} <run folder>")
    model = SentenceTransformer(str(folder), device="cpu")
    logged = with_retry(lambda: client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, model_type="sentence-transformers"))
    # MLflow's model logging reads the process-wide tracking URI: set for this call only.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.sentence_transformers.log_model(
            model, name=name, run_id=run_id, model_id=logged.model_id,
            # Listed, not inferred: inference would load the model again in a subprocess.
            pip_requirements=["sentence-transformers", "transformers", "torch"],
            metadata={"prompts": dict(model.prompts), "source_folder": folder.name})
    finally:
        mlflow.set_tracking_uri(previous)
    with_retry(lambda: client.set_tag(run_id, "model_uri", info.model_uri))


JOURNAL = "mlflow_journal.jsonl"        # every write of the run folder's MLflow run, one JSON object a line
DELIVERED = "mlflow_journal.delivered"  # how many of the journal's lines the store has
DELIVER_COMMAND = "python -m hybrid_retrieval.deliver"


def transient(error: BaseException) -> bool:
    """An error that sending the same write again may cure: the store unreachable, busy or full."""
    from mlflow.exceptions import MlflowException

    from hybrid_retrieval.storage import is_disk_full

    if is_disk_full(error) or _locked(error):
        return True
    if isinstance(error, MlflowException):
        return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        return isinstance(error, requests.exceptions.RequestException)
    except ImportError:
        return False


class Delivery:
    """A run's MLflow writes, off the training thread. :meth:`put` appends the write to ``<run folder>/``
    ``mlflow_journal.jsonl`` and returns; a worker thread sends the journal's lines in order (consecutive metric
    writes as one batch), and on a transient failure (server unreachable, store locked or full) waits and sends the
    same line again, so nothing is lost and training never waits for the store. Memory stays bounded: the queue is
    the file. ``mlflow_journal.delivered`` counts the lines sent; a write sent twice (a kill between sending and
    counting) is stored once: metrics keep their timestamps, params their values, tags and artifacts are replaced.
    :meth:`close` waits up to ``timeout`` seconds for the rest; what is left is sent later by
    ``python -m hybrid_retrieval.deliver <run folder>`` (or by the run's resume)."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, folder: Path) -> None:
        import threading

        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / JOURNAL
        self.counter = self.folder / DELIVERED
        self.written = sum(1 for _ in self.path.open(encoding="utf-8")) if self.path.is_file() else 0
        self.delivered = min(int(self.counter.read_text() or 0), self.written) if self.counter.is_file() else 0
        self.dropped: list[str] = []       # writes the store refused for good (logged as warnings)
        self.failure: str | None = None    # the latest transient error, while it lasts
        self._condition = threading.Condition()
        self._give_up = threading.Event()
        self._file = self.path.open("a", encoding="utf-8")
        self._reader = self.path.open(encoding="utf-8")
        for _ in range(self.delivered):
            self._reader.readline()
        self.put({"op": "header", "tracking_uri": tracking_uri, "run_id": run_id})
        self._thread = threading.Thread(target=self._work, name="mlflow-delivery", daemon=True)
        self._thread.start()

    def put(self, write: Mapping[str, Any]) -> None:
        import json

        line = json.dumps(write, ensure_ascii=False)
        with self._condition:
            self._file.write(line + "\n")
            self._file.flush()
            self.written += 1
            self._condition.notify_all()

    def _next(self) -> tuple[dict[str, Any], int]:
        """The next write, with the metric writes right behind it merged into it; how many lines that was."""
        import json

        first = json.loads(self._reader.readline())
        lines = 1
        if first["op"] == "metrics":
            while self.delivered + lines < self.written and len(first["metrics"]) < 900:
                position = self._reader.tell()
                following = json.loads(self._reader.readline())
                if following["op"] != "metrics":
                    self._reader.seek(position)
                    break
                first["metrics"] += following["metrics"]
                lines += 1
        return first, lines

    def _work(self) -> None:
        import logging

        log = logging.getLogger(__name__)
        delay = 1.0
        while True:
            with self._condition:
                while self.delivered >= self.written and not self._give_up.is_set():
                    self._condition.wait(0.5)
                if self._give_up.is_set():
                    return
            write, lines = self._next()
            while True:
                try:
                    apply_write(self.client, self.run_id, self.tracking_uri, write)
                    if self.failure is not None:
                        log.info("MLflow store reachable again: sending the writes held since %s", self.failure)
                    self.failure, delay = None, 1.0
                    break
                except Exception as error:  # noqa: BLE001 - the store's errors must not reach training
                    if not transient(error):
                        self.dropped.append(f"{write['op']}: {type(error).__name__}: {error}")
                        log.warning("MLflow refused a %s write (not sent again): %s", write["op"], error)
                        break
                    first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
                    if self.failure is None:
                        log.warning("MLflow store %s takes no writes (%s); the command goes on, the writes wait in %s",
                                    self.tracking_uri, first_line, self.path)
                    self.failure = f"{type(error).__name__}: {first_line}"
                    if self._give_up.wait(delay):
                        return
                    delay = min(delay * 2, 15.0)
            with self._condition:
                self.delivered += lines
                self.counter.write_text(str(self.delivered))
                self._condition.notify_all()

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every write to be sent; returns how many lines were not."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self.delivered < self.written and time.monotonic() < deadline and self._thread.is_alive():
                self._condition.wait(min(0.5, max(deadline - time.monotonic(), 0.01)))
            left = self.written - self.delivered
        self._give_up.set()
        self._thread.join(timeout=5)
        self._file.close()
        return left

    def summary(self) -> str:
        """What the unsent lines hold, in words (``3 metric writes, 2 artifacts, the run's status``)."""
        import json
        from collections import Counter

        with self.path.open(encoding="utf-8") as handle:
            lines = handle.readlines()[self.delivered:]
        kinds = Counter(json.loads(line)["op"] for line in lines)
        kinds.pop("header", None)
        names = {"metrics": "metric writes", "params": "param writes", "tag": "tags", "artifact": "artifacts",
                 "artifacts": "artifact folders", "model": "MLflow model", "inputs": "dataset inputs"}
        return ", ".join("the run's status" if kind == "status" else f"{count} {names.get(kind, kind)}"
                         for kind, count in kinds.items())


def deliver(folder: str | Path, timeout: float = 600.0) -> tuple[int, list[str]]:
    """Send what a run folder's journal holds beyond what the store has (``python -m hybrid_retrieval.deliver``);
    returns (lines left unsent, writes the store refused)."""
    import json

    path = Path(folder) / JOURNAL
    if not path.is_file():
        raise MissingPath(f"{path}: no MLflow journal in {folder}; expected the run folder of a command")
    header = None
    for line in path.open(encoding="utf-8"):
        write = json.loads(line)
        if write["op"] == "header":
            header = write
    if header is None:
        raise BadValue(f"{path}: no header line naming the MLflow store and run")
    delivery = Delivery(get_client(header["tracking_uri"]), header["run_id"], header["tracking_uri"], Path(folder))
    return delivery.close(timeout), delivery.dropped


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, job: str, tags: Mapping[str, str] | None = None,
               resume_run_id: str | None = None, title: str | None = None,
               folder: str | Path | None = None) -> Iterator[TrackedRun]:
    """The run lifecycle every command shares.

    Creates the run (nested under its sweep's parent run in a multirun), or reopens ``resume_run_id``; logs the
    flattened config as params (``train.resume`` excepted: it is the ``resumed_from`` tag) and the composed config
    files of ``.hydra/``; ends it FINISHED, or FAILED (KILLED on an interrupt or a signal) with the error as the
    ``error`` tag, and lets the exception propagate. Check inputs before entering: a bad value then leaves no run
    behind. Runs of this host whose process died without ending them (SIGKILL) are marked KILLED on the way.

    The store must answer when the run starts. After that every write goes through a :class:`Delivery` journaled
    in ``folder`` (default: the job's output folder): a store that goes away holds up nothing, and what it missed
    is sent when it is back, or at the end within ``logger.delivery_timeout`` seconds, or later by
    ``python -m hybrid_retrieval.deliver <folder>`` (the one line printed at the end says what and how).
    """
    import os
    import socket

    identity = {"host": socket.gethostname(), "pid": str(os.getpid())}
    if resume_run_id is None:
        client, run_id = start_run(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.get("run_name"),
                                   tags={"job": job, **(tags or {}), **identity}, title=title or job)
    else:
        client, run_id = get_client(cfg.logger.tracking_uri), resume_run_id
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        for key, value in identity.items():
            with_retry(lambda: client.set_tag(run_id, key, value))
    started = with_retry(lambda: client.get_run(run_id))
    if folder is None and _in_hydra_job():
        folder = job_context()["output_dir"]
    delivery = Delivery(client, run_id, cfg.logger.tracking_uri, Path(folder)) if folder is not None else None
    run = TrackedRun(client, run_id, cfg.logger.tracking_uri, started.info.experiment_id,
                     started.data.tags.get(NOTE, ""), delivery)
    timeout = float(cfg.logger.get("delivery_timeout", 60))
    try:
        mark_dead_runs(client, run_id)
        params = {k: v for k, v in flatten_config(cfg).items() if k != "train.resume"}
        if resume_run_id is not None:  # a param may be logged once: only what the first attempt did not log
            params = {k: v for k, v in params.items() if k not in started.data.params}
        run.log_params(params)
        hydra_folder = Path(job_context()["output_dir"]) / ".hydra"
        if hydra_folder.is_dir():  # the composed config files of this job
            run.log_artifacts(hydra_folder, "config")
        yield run
    except BaseException as error:
        status = getattr(error, "mlflow_status", None) or (
            "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED")
        with contextlib.suppress(Exception):  # the original error matters more than a failed status update
            run.set_tag("error", f"{type(error).__name__}: {error}")
            run.end(status)
            # A signal leaves little time before the scheduler's SIGKILL: what is not sent now waits in the journal.
            finish_delivery(run, min(timeout, 10.0))
        raise
    run.end("FINISHED")
    finish_delivery(run, timeout)


def _in_hydra_job() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


def finish_delivery(run: TrackedRun, timeout: float) -> None:
    """Wait for the run's writes; print one line when some could not be sent (what, and the command that sends
    them later) and one for each write the store refused."""
    if run.delivery is None:
        return
    delivery = run.delivery
    left = delivery.close(timeout)
    for refused in delivery.dropped:
        print(f"MLflow refused: {refused}")
    if left:
        print(f"MLflow: not delivered to {run.tracking_uri} ({delivery.failure or 'the store did not answer'}): "
              f"{delivery.summary()}; the run folder has everything, send it with: "
              f"{DELIVER_COMMAND} {delivery.folder}")


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

    path = Path(folder or job_context()["output_dir"]) / STATUS_FILE
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
        killed = isinstance(error, (KeyboardInterrupt, SystemExit)) or getattr(error, "mlflow_status", "") == "KILLED"
        cause = error
        if type(error).__module__.split(".")[0] == "hydra" and error.__cause__ is not None:
            cause = error.__cause__  # what failed inside instantiate(), not Hydra's wrapper around it
        write("killed" if killed else "failed", f"{type(cause).__name__}: {cause}")
        raise
    write("finished")


# ------------------------------------------------------------------------------------------------ reading runs

REPORTED_PREFIXES = ("val/", "best/", "train/loss")


def sweep_runs(tracking_uri: str, experiment_name: str, sweep: str | Sequence[str] | None = None,
               run_ids: Sequence[str] | None = None, all_runs: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training runs a report covers, as plain records, and the sweep's parent run (empty if none, or if the
    runs come from several sweeps).

    Exactly one source: ``run_ids``; ``sweep`` (a multirun folder or its parent run's id, or a list of them: their
    runs together); ``all_runs`` (every training run of the experiment); none of them = the newest sweep of the
    experiment. Each record holds ``run_id``, ``name``, ``status``, ``tags``, ``params`` and ``history`` (metric
    key -> {step: value}) for the keys a report reads (``val/``, ``best/``, ``train/loss``).
    """
    client = get_client(tracking_uri)
    experiment = with_retry(lambda: client.get_experiment_by_name(experiment_name))
    if experiment is None:
        raise BadValue(f"logger.experiment_name={experiment_name!r}: no such experiment in {tracking_uri}")
    eid = experiment.experiment_id
    parent: Any = None
    order: dict[str, int] = {}  # sweep_id -> its place in `sweep`
    if run_ids:
        runs = [with_retry(lambda rid=rid: client.get_run(rid)) for rid in run_ids]
    elif all_runs:
        runs = with_retry(lambda: client.search_runs([eid], filter_string="tags.job = 'train'", max_results=5000))
    else:
        parents = with_retry(lambda: client.search_runs([eid], filter_string="tags.sweep_parent = 'true'",
                                                        order_by=["attributes.start_time DESC"], max_results=5000))
        if sweep is None:
            if not parents:
                raise BadValue(f"no sweep in experiment {experiment_name!r} of {tracking_uri}: run one with "
                                 "`python run.py -m ...`, or name runs with report.runs=[id,...]")
            chosen = [parents[0]]
        else:
            chosen = []
            for name in [sweep] if isinstance(sweep, str) else list(sweep):
                folder = str(Path(name).resolve())
                found = next((p for p in parents if p.info.run_id == name or p.data.tags.get("sweep_id") == folder),
                             None)
                if found is None:
                    raise BadValue(f"report.sweep={name!r}: neither a sweep folder nor a sweep's parent run id in "
                                     f"experiment {experiment_name!r} of {tracking_uri}")
                chosen.append(found)
        parent = chosen[0] if len(chosen) == 1 else None
        runs, seen = [], set()
        for place, found in enumerate(chosen):
            sweep_id = found.data.tags["sweep_id"]
            order.setdefault(sweep_id, place)
            for run in with_retry(lambda sweep_id=sweep_id: client.search_runs(
                    [eid], filter_string=f"tags.sweep_id = '{sweep_id}' and tags.job = 'train'", max_results=5000)):
                if run.info.run_id not in seen:  # a sweep named twice counts once
                    seen.add(run.info.run_id)
                    runs.append(run)
    records = []
    for run in sorted(runs, key=lambda r: (order.get(r.data.tags.get("sweep_id", ""), 0),
                                           int(r.data.tags.get("job_num", "0") or 0), r.info.start_time)):
        history: dict[str, dict[int, float]] = {}
        for key in run.data.metrics:
            if key.startswith(REPORTED_PREFIXES):
                values = with_retry(lambda key=key: client.get_metric_history(run.info.run_id, key))
                history[key] = {int(m.step): float(m.value) for m in sorted(values, key=lambda m: m.timestamp)}
        records.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                        "tags": dict(run.data.tags), "params": dict(run.data.params), "history": history})
    parent_record = {} if parent is None else {"run_id": parent.info.run_id, "name": parent.info.run_name,
                                               "sweep_id": parent.data.tags.get("sweep_id", "")}
    return records, parent_record


def log_artifacts_to(tracking_uri: str, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    """Log a folder's files to an existing run (e.g. a report to its sweep's parent run)."""
    client = get_client(tracking_uri)
    with_retry(lambda: client.log_artifacts(run_id, str(folder), artifact_path))


def check_logger(cfg: Any) -> None:
    """The ``logger`` node's rules beyond its schema: a tracking URI MLflow can use, and sentence-transformers
    installed where the model is logged in its MLflow flavour; before any work."""
    from omegaconf.errors import InterpolationResolutionError

    from hybrid_retrieval.config_error import ConfigError, require

    try:
        uri = str(cfg.logger.tracking_uri)
    except InterpolationResolutionError:
        return  # the default names Hydra's launch folder: it resolves, and is checked, inside a Hydra run
    try:
        check_tracking_uri(uri)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.logger.get("log_model", True):
        import importlib.util

        require(importlib.util.find_spec("sentence_transformers") is not None, "logger.log_model",
                "false, or sentence-transformers installed (pip install 'sentence-transformers>=6.2,<7'): the model "
                "is logged in its MLflow flavour", cfg.logger.get("log_model"))
