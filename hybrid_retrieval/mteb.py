"""MTEB from the command line: ``python -m hybrid_retrieval.mteb model.path=<run folder> tasks=[XQuADRMonolingual]``.

Runs the ``mteb`` package's own evaluation (``mteb.evaluate``) on a model: a run folder of ``run.py`` (its exported
``model/``), an exported folder, or a configured model (``model=me5_small``, ``model=me5_small_hub`` with any
``model.checkpoint=<hub id>``). Queries get the model's query prefix, documents its passage prefix
(:mod:`hybrid_retrieval.evaluation.mteb_tasks`), ``model.truncate_dim`` applies. Besides MTEB's own tasks, the
local ones run the LAReQA protocol's three settings on the project's data: ``XQuADRMonolingual``,
``XQuADRCrossLingual``, ``XQuADRMultilingual`` and the ``MLQAR...`` ones.

The results are MTEB's layout (``<output>/results/hybrid_retrieval__<name>/<weights hash>/<Task>.json`` and
``model_meta.json``), by default under the run folder (``<run>/mteb``) for a run, the model named after its run so a
fine-tuned model is never filed under (nor reuses the cached results of) its base model; every command also files
them in ``shared_results`` (default ``outputs/mteb/shared``, where a configured model's results go directly), so
``mteb.ResultCache("outputs/mteb/shared").load_results(tasks=resolve_tasks([...]))`` lists a fine-tuned model next
to its zero-shot base model. Embeddings are cached under ``<output>/embeddings/`` (MTEB's embedding cache, per
model, weights hash and encoder settings): a second command on the same model encodes nothing twice. A local task
whose cached results were computed on another data selection (``local.*``) is evaluated afresh. The main scores go
to MLflow (``mteb/<task>/<subset>/<metric>``) through the run lifecycle of every command.

Every task's data is loaded before the model: a task whose data is not reachable (offline) stops the command
there, named, with the way to provide it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.sources import OFFLINE_ENV
from hybrid_retrieval.hardware import check_device, check_hardware
from hybrid_retrieval.models.config import check_model
from hybrid_retrieval.models.model_folder import read_run_config, run_model_name
from hybrid_retrieval.models.loading import folder_matryoshka
from hybrid_retrieval.run_folder import CHECKPOINTS, HYDRA_CONFIG, RUN_INFO
from hybrid_retrieval.tracking import check_logger

RUN_MARKERS = (RUN_INFO, HYDRA_CONFIG.split("/")[0], CHECKPOINTS, "metrics.json")


def locate_model(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) for ``model.path``: a run folder (its ``model/`` export), the export inside
    a run folder, or any other model folder."""
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model", path
    parent = path.parent
    if (path / "config.json").is_file() and any((parent / marker).exists() for marker in RUN_MARKERS):
        return path, parent
    return path, None


def model_name(cfg: DictConfig, folder: Path | None, run_dir: Path | None, encoder_name: str) -> str:
    """What MTEB files the results under (without the ``hybrid_retrieval/`` organisation): ``name=``, else the
    name the export recorded, else the run's (``<model>-ft-<run>``), else the folder's; the config's name for a
    configured (base) model."""
    if cfg.get("name"):
        return str(cfg.name)
    if folder is None:
        return str(cfg.model.name)
    recorded = folder_matryoshka(folder).get("model_name")
    if recorded:
        return str(recorded)
    if run_dir is not None:
        return run_model_name(run_dir, encoder_name)
    return folder.name


def base_model(run_dir: Path | None, encoder_name: str) -> str:
    """What a fine-tuned model was adapted from (MTEB's ``adapted_from``): the run's ``model.checkpoint`` (or its
    ``model.name``) from its saved config, else the name the folder's settings give."""
    model = (read_run_config(run_dir).get("model") or {}) if run_dir is not None else {}
    if model.get("checkpoint") or model.get("name"):
        return str(model.get("checkpoint") or model.get("name"))
    return encoder_name


def check_mteb_config(cfg: DictConfig) -> tuple[Path | None, Path | None]:
    """Checks before anything loads; (model folder, run folder) from ``model.path`` (None, None without one)."""
    tasks = cfg.get("tasks")
    if not tasks or isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"tasks={OmegaConf.to_container(tasks) if tasks is not None else None!r}: expected a list "
                          "of MTEB task names, e.g. tasks=[XQuADRMonolingual,XQuADRCrossLingual,XQuADRMultilingual] or "
                          "tasks=[XQuADRetrieval,MLQARetrieval]")
    folder = run_dir = None
    if cfg.model.get("path"):
        folder, run_dir = locate_model(cfg.model.path)
        with open_dict(cfg):
            cfg.model.path = str(folder)
    check_model(cfg.model)
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    check_logger(cfg)
    return folder, run_dir


def run_mteb(cfg: DictConfig) -> dict[str, float]:
    """Evaluate as ``cfg`` says (checked first, then every task's data loaded, then the model); returns the main
    scores logged to MLflow."""
    folder, run_dir = check_mteb_config(cfg)
    if os.environ.get(OFFLINE_ENV) == "1":  # before datasets / huggingface_hub read them
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import mteb

    from hybrid_retrieval.evaluation.mteb_tasks import (MtebEncoder, TaskDataError, check_task_data, embedding_cache,
                                                         encoder_settings, main_scores, model_meta, resolve_tasks,
                                                         weights_revision)
    from hybrid_retrieval.hardware import encode_dtype
    from hybrid_retrieval.models.source import load_model

    local = OmegaConf.to_container(cfg.get("local") or {}, resolve=True)
    try:
        tasks = resolve_tasks(list(cfg.tasks), local)
        check_task_data(tasks)  # before the model: nothing is encoded for a task that cannot run
    except (ValueError, TaskDataError) as error:
        raise ConfigError(str(error)) from error
    torch.set_num_threads(cfg.hardware.num_threads)
    encoder = load_model(cfg)
    name = model_name(cfg, folder, run_dir, encoder.name)
    meta = model_meta(encoder, name, weights_revision(encoder),
                      base_model=base_model(run_dir, encoder.name) if folder is not None else None)
    shared = Path(str(cfg.shared_results)).expanduser().resolve() if cfg.get("shared_results") else None
    if cfg.get("output"):
        output = Path(str(cfg.output)).expanduser().resolve()
    elif run_dir is not None:
        output = run_dir / "mteb"
    else:
        output = shared or Path(tracking.job_context()["output_dir"])
    cache = mteb.ResultCache(cache_path=str(output))
    dtype = encode_dtype(cfg.hardware)
    model: Any = MtebEncoder(encoder, meta, cfg.hardware.encode_batch_size, dtype)
    embeddings = None
    if cfg.get("cache_embeddings", True):
        embeddings = output / "embeddings" / meta.model_name_as_path() / str(meta.revision) / encoder_settings(
            encoder, dtype)
        model = embedding_cache(model, embeddings)
    tags = {"model": meta.name, "tasks": ",".join(cfg.tasks)}
    if run_dir is not None:
        tags["source_run"] = str(run_dir)
    with tracking.mlflow_run(cfg, job="mteb", tags=tags, title=f"mteb {meta.name}") as run:
        task_results = []
        for strategy, group in evaluation_groups(tasks, cache, meta, bool(cfg.get("overwrite"))):
            result = mteb.evaluate(model, group, cache=cache, overwrite_strategy=strategy,
                                   encode_kwargs={"batch_size": int(cfg.hardware.encode_batch_size)},
                                   show_progress_bar=False)
            task_results.extend(result.task_results)
        scores = main_scores(task_results, tasks)
        run.log_metrics(scores)
        folder_of_results = cache.get_task_result_path(tasks[0].metadata.name, meta).parent
        for path in sorted(folder_of_results.glob("*.json")):
            run.log_artifact(path, "mteb")
        run.set_tag("mteb_results", str(folder_of_results))
        if shared is not None and shared != output:
            filed = file_results(folder_of_results, mteb.ResultCache(cache_path=str(shared)), tasks[0], meta)
            run.set_tag("mteb_shared_results", str(filed))
    width = max(len(k) for k in scores) if scores else 10
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in scores.items()))
    summary: dict[str, Any] = {"model": f"{meta.name} (revision {meta.revision})", "results": folder_of_results}
    if shared is not None:
        summary["shared results"] = shared
    if embeddings is not None:
        summary["embeddings"] = embeddings
    tracking.print_summary(summary, run)
    return scores


def evaluation_groups(tasks: list[Any], cache: Any, meta: Any, overwrite: bool) -> list[tuple[str, list[Any]]]:
    """(MTEB overwrite strategy, tasks) to evaluate: ``always`` for all with ``overwrite=true``; else
    ``only-missing``, except ``always`` for a task whose cached result has another dataset revision (a local task
    on another data selection: MTEB would keep it, since all its subsets are there)."""
    if overwrite:
        return [("always", list(tasks))]
    stale, kept = [], []
    for task in tasks:
        cached = cache.load_task_result(task.metadata.name, meta)
        revision = task.metadata.dataset.get("revision")
        (stale if cached is not None and revision and cached.dataset_revision != revision else kept).append(task)
    return [(strategy, group) for strategy, group in (("only-missing", kept), ("always", stale)) if group]


def file_results(folder: Path, shared: Any, task: Any, meta: Any) -> Path:
    """Copy a model's result folder (its ``<Task>.json`` files and ``model_meta.json``) to the same place in the
    shared result cache ``shared``; returns that folder."""
    target = shared.get_task_result_path(task.metadata.name, meta).parent
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.json")):
        shutil.copy2(path, target / path.name)
    return target


@hydra_main("mteb")
def main(cfg: DictConfig) -> None:
    run_mteb(cfg)


if __name__ == "__main__":
    main()
