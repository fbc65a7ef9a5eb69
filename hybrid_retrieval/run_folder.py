"""A training run's folder: the names of its files, its ``run_info.json``, and what ``train.resume`` makes of a run.

``<run folder>/`` holds ``checkpoints/best.ckpt`` (the best weights and the model config), ``checkpoints/last.ckpt``
(the full training state a resume continues from), ``run_info.json`` (the MLflow run and store, the config the run
started with and, once finished, its monitored best value), Hydra's ``.hydra/config.yaml`` and the command's
``status.json`` (``tracking.folder_status``).

:func:`plan_run` resolves ``train.resume`` once into a :class:`RunPlan` (a fresh run, or a resume from which
checkpoint into which MLflow run); ``run.py`` makes it and hands it to ``training.train.train``. A job of a rerun
sweep that finished before is told by :func:`finished_job`, which runs before the job writes its own status.
No Lightning and no MLflow here: ``run.py`` reads the folder before the heavy imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import ConfigError, require
from hybrid_retrieval.tracking import STATUS_FILE

RUN_INFO = "run_info.json"
CHECKPOINTS = "checkpoints"
# Lightning's ModelCheckpoint takes the file name without ``.ckpt`` (callbacks.BestCheckpoint, ResumeCheckpoint).
BEST = "best"
LAST = "last"
BEST_CHECKPOINT = f"{CHECKPOINTS}/{BEST}.ckpt"  # paths inside a run folder
LAST_CHECKPOINT = f"{CHECKPOINTS}/{LAST}.ckpt"
HYDRA_CONFIG = ".hydra/config.yaml"
# Where error messages point a user for a trained model's checkpoint.
BEST_CHECKPOINT_EXAMPLE = f"outputs/train/<date>/<time>/{BEST_CHECKPOINT}"


def check_checkpoint_file(value: Any, option: str = "checkpoint") -> Path:
    """``checkpoint=``: an existing file (read and checked in full by ``models.checkpoint.read_checkpoint``)."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option}={str(value)!r}: file does not exist; expected a checkpoint written by run.py "
                          f"({BEST_CHECKPOINT_EXAMPLE})")
    return path


# ------------------------------------------------------------------------------------------------ run_info.json


def read_run_info(folder: Path) -> dict[str, Any]:
    """A training run folder's ``run_info.json``: its MLflow run and store, starting config and, once finished, its
    monitored best value."""
    return json.loads((Path(folder) / RUN_INFO).read_text())


def write_run_info(folder: Path, run_id: str, tracking_uri: str, experiment_name: str, cfg: DictConfig) -> None:
    """What a resumed run needs to log into the same MLflow run (and a sweep's report, to find the store), and the
    config it started with (a resume must match it)."""
    (Path(folder) / RUN_INFO).write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                                                     "experiment_name": experiment_name,
                                                     "config": OmegaConf.to_container(cfg, resolve=False)}))


def record_best(folder: Path, monitor: str, best: float) -> None:
    """The finished run's result, kept in run_info.json (a rerun sweep with train.resume=auto skips the job)."""
    info = read_run_info(folder)
    info.update(monitor=monitor, best=best)
    (Path(folder) / RUN_INFO).write_text(json.dumps(info))


def saved_config(folder: Path) -> dict:
    """The config a run started with: kept in run_info.json (Hydra rewrites .hydra/config.yaml when a job reruns in
    the same folder), else .hydra/config.yaml (runs from before run_info kept it)."""
    info = read_run_info(folder) if (folder / RUN_INFO).is_file() else {}
    if "config" in info:
        return info["config"]
    return OmegaConf.to_container(OmegaConf.load(folder / HYDRA_CONFIG), resolve=False)


def check_same_config(cfg: DictConfig, folder: Path) -> None:
    """A resumed (or skipped) run continues the same experiment: its config equals this one but for ``train.resume``."""
    from hybrid_retrieval.upgrade import upgrade_config

    saved = upgrade_config(saved_config(folder), cfg)  # what an older version wrote, in today's spelling
    current = OmegaConf.to_container(cfg, resolve=False)
    for config in (saved, current):
        config.get("train", {}).pop("resume", None)
    differences = sorted(_differences(saved, current))
    require(not differences, "train.resume", "the same command as the run being resumed, plus train.resume; these "
             f"options differ: {differences[:8]}", f"{cfg.train.get('resume')} ({folder})")


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in set(a) | set(b):
            out += _differences(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [path]


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class RunPlan:
    """What a training run is, resolved once from ``train.resume``: where it writes and what it continues."""

    folder: Path                # the run folder: the resumed run's, else this job's
    resumed: bool = False
    run_id: str | None = None   # the MLflow run a resume logs into (from run_info.json)

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path | None:
        """The checkpoint a resume continues from; None for a fresh run."""
        return self.folder / LAST_CHECKPOINT if self.resumed else None


def job_folder() -> Path:
    """This job's Hydra run folder (the current folder outside Hydra)."""
    from hybrid_retrieval.tracking import job_context

    return Path(job_context()["output_dir"])


def _resumable(folder: Path) -> bool:
    return (folder / LAST_CHECKPOINT).is_file() and (folder / RUN_INFO).is_file()


def plan_run(cfg: DictConfig) -> RunPlan:
    """The run ``train.resume`` asks for, checked. Unset: a fresh run in this job's folder. A folder: a resume of
    the run there, which must hold ``checkpoints/last.ckpt``, ``run_info.json`` and the composed config, that config
    equal to this one but for ``train.resume`` (a resumed run continues the same experiment). ``last``: the newest
    run under outputs/train with a resumable checkpoint. ``auto``: this job's own folder when it holds a resumable
    checkpoint, else a fresh start — with a fixed ``hydra.sweep.dir``, rerunning a stopped sweep continues it
    (finished jobs are skipped by :func:`finished_job`)."""
    value = cfg.train.get("resume")
    if not value:
        return RunPlan(lock_run_folder(job_folder()))
    if value == "auto":
        folder = lock_run_folder(job_folder())
        if not _resumable(folder):
            return RunPlan(folder)
    elif value == "last":
        from hydra.core.hydra_config import HydraConfig

        base = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
        candidates = sorted((p.parent.parent for p in (base / "outputs" / "train").glob(f"*/*/{LAST_CHECKPOINT}")),
                            key=lambda p: p.stat().st_mtime)
        require(bool(candidates), "train.resume", "a run folder; 'last' found no run with a resumable checkpoint "
                 f"under {base / 'outputs' / 'train'}", value)
        folder = candidates[-1]
    else:
        folder = Path(str(value)).expanduser()
    for needed in (LAST_CHECKPOINT, RUN_INFO, HYDRA_CONFIG):
        require((folder / needed).is_file(), "train.resume", f"a run folder of run.py holding {needed} "
                 f"(written by a run with train.checkpoint_every_n_steps, or stopped by SIGTERM/Ctrl+C)", str(value))
    check_same_config(cfg, folder)
    check_resumable_checkpoint(folder, cfg)
    lock_run_folder(folder)
    return RunPlan(folder, resumed=True, run_id=read_run_info(folder)["mlflow_run_id"])


LOCK_FILE = ".run.lock"
_held: dict[Path, Any] = {}  # folder -> its open lock file, kept for the life of the process


def lock_run_folder(folder: Path) -> Path:
    """Hold ``<folder>/.run.lock`` for this process's life (``flock``: the kernel releases it when the process
    ends, however it ends, so a dead holder never keeps it). A second process that plans a run in the same folder
    (two resumes at once, the same sweep started twice) is refused at once, naming the holder's pid, host and
    start time. Only the first process of a job takes it (DDP and SLURM ranks > 0 run in their rank 0's folder).
    ``flock`` is per machine on most network file systems: two hosts are told apart only where the file system
    shares locks."""
    import fcntl
    import os
    import socket
    import time

    folder = Path(folder)
    if any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
        return folder
    key = folder.resolve()
    if key in _held:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run folder {folder} is in use by {holder}: two runs writing one folder would mix their "
                          "checkpoints and MLflow run. Wait for it to end, or stop it (its last.ckpt stays "
                          "resumable) and resume again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
    handle.flush()
    _held[key] = handle
    return folder


def check_resumable_checkpoint(folder: Path, cfg: DictConfig) -> None:
    """The run folder's ``last.ckpt`` is whole (every zip entry's checksum; a file truncated by a full disk or a
    network file system fails here), this project's format, and of this run's model: checked before any work, so a
    refused resume leaves the folder as it was."""
    import warnings
    import zipfile

    from hybrid_retrieval.models.checkpoint import CheckpointError, read_checkpoint

    path = folder / LAST_CHECKPOINT
    advice = (f"nothing was changed in {folder}. Its best weights may still serve (checkpoint={folder / BEST_CHECKPOINT} "
              "for evaluate / export), or start afresh in a new folder (without train.resume)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise ConfigError(f"train.resume: {path} is damaged ({error}): not a whole checkpoint; {advice}") from None
    if damaged is not None:
        raise ConfigError(f"train.resume: {path} is damaged (entry {damaged} fails its checksum); {advice}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a full training state holds Python objects: expected here
            checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(f"train.resume: {error}; {advice}") from None
    if checkpoint.model.get("name") != cfg.model.get("name"):
        raise ConfigError(f"train.resume: {path} holds a {checkpoint.model.get('name')!r} model, this run trains "
                          f"{cfg.model.get('name')!r}: a checkpoint of another run; {advice}")


def finished_job(cfg: DictConfig) -> float | None:
    """With ``train.resume=auto``: the monitored best value of this job's folder when a run there finished with the
    same config (the job is then skipped), else None. Read before the job writes its own ``status.json``; a changed
    command is refused here without marking the finished run's folder failed."""
    if cfg.train.get("resume") != "auto":
        return None
    folder = job_folder()
    status = folder / STATUS_FILE
    if not (status.is_file() and (folder / RUN_INFO).is_file()):
        return None
    info = read_run_info(folder)
    if json.loads(status.read_text()).get("status") != "finished" or "best" not in info:
        return None
    check_same_config(cfg, folder)
    return float(info["best"])


# ------------------------------------------------------------------------------------------------ a command's output


def output_folder(cfg: DictConfig, option: str = "output", subfolder: str | None = None) -> Path:
    """``cfg.<option>``, else the run folder (or its ``subfolder``) when it is null."""
    if cfg.get(option):
        return Path(str(cfg.get(option))).expanduser()
    return job_folder() / subfolder if subfolder else job_folder()


def check_new_folder(folder: Path, option: str, overwrite: bool,
                     error: type[Exception] = ConfigError) -> Path:
    """A folder a command fills: new, empty, or ``overwrite=true``."""
    if folder.exists() and not folder.is_dir():
        raise error(f"{option}={str(folder)!r}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise error(f"{option}={str(folder)!r}: folder exists and is not empty; choose another folder or pass "
                    "overwrite=true to replace it")
    return folder
