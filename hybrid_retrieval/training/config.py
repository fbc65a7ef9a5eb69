"""The ``train`` node's schema (``conf/config.yaml``, overridden by ``conf/experiment/*.yaml``): an unknown key or a
value of the wrong type is refused when Hydra composes the config. :func:`check_train_config` checks, before any
model loads, what a type cannot say: ranges, and rules across keys and across the nodes a training run reads.
``conf/config.yaml`` says what each option does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError, positive_int, require


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 5.0e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"                 # linear | cosine | constant
    seed: int = 42
    freeze_embeddings: bool = True
    grad_cache_chunk: Optional[int] = None
    gradient_checkpointing: bool = False
    sparse_embeddings: bool = True
    hard_negatives: int = 1
    num_workers: int = 0
    dynamic_padding: bool = False
    checkpoint_every_n_steps: Optional[int] = 50
    resume: Optional[str] = None             # a run folder | last | auto
    contamination: str = "refuse"            # refuse | warn | off
    log_batches: bool = False
    evaluate_before: Any = True              # true | false | first_job
    merge_ratio: Optional[float] = None
    monitor: str = "val/multi/map"
    monitor_mode: str = "max"                # max | min


@dataclass
class TrainerConfig:
    """The ``trainer`` node (``conf/trainer/default.yaml``): Lightning ``Trainer`` arguments, each with Lightning's
    own default. The ones the project sets itself are not options: the hardware's (``hardware.*``), the logger,
    the callbacks and checkpoints (``conf/callbacks``, the run folder), the sampler (``use_distributed_sampler``)."""

    max_epochs: Optional[int] = None
    min_epochs: Optional[int] = None
    max_steps: int = -1
    min_steps: Optional[int] = None
    max_time: Optional[Any] = None              # "DD:HH:MM:SS" or {days, hours, ...}
    limit_train_batches: Optional[Any] = None   # an int (batches) or a float (share of an epoch)
    limit_val_batches: Optional[Any] = None
    val_check_interval: Optional[Any] = None    # an int (batches) or a float (share of an epoch)
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    overfit_batches: Any = 0.0
    fast_dev_run: Any = False
    log_every_n_steps: Optional[int] = None
    enable_progress_bar: Optional[bool] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None   # norm | value
    deterministic: Optional[Any] = None         # true | false | warn
    benchmark: Optional[bool] = None
    inference_mode: bool = True
    profiler: Optional[str] = None              # simple | advanced | pytorch
    detect_anomaly: bool = False
    reload_dataloaders_every_n_epochs: int = 0


def check_monitor(cfg: DictConfig) -> None:
    """``train.monitor`` must be a key validation logs (validation logs no loss), with the matching mode."""
    from hybrid_retrieval.evaluation.sets import lower_is_better, monitor_keys

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
    ``train.resume`` (resolved once by ``run_folder.plan_run``): each node's owner checks its own rules; the
    rules across nodes are here."""
    from hybrid_retrieval.evaluation.config import check_dataset, check_extra_datasets
    from hybrid_retrieval.hardware import check_hardware
    from hybrid_retrieval.models.config import check_model, model_dimension, model_folder
    from hybrid_retrieval.tracking import check_logger

    check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_extra_datasets(cfg)
    check_hardware(cfg.hardware)
    check_logger(cfg)
    if str(cfg.sampler.get("_target_", "")).endswith(".HybridBatchSampler"):
        ratio = cfg.sampler.get("mono_ratio")
        require(isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0, "sampler.mono_ratio",
                "a number in [0, 1] (1 = monolingual batches only, 0 = cross-lingual only)", ratio)
    require(positive_int(cfg.train.batch_size), "train.batch_size", "a positive integer", cfg.train.batch_size)
    require(cfg.model.get("language_projection") is None, "model.language_projection",
             "null in training (it is fitted on a trained model: python -m hybrid_retrieval.evaluate "
             "checkpoint=<run folder>/checkpoints/best.ckpt model.language_projection={rank: r})",
             cfg.model.get("language_projection"))
    for option in ("num_workers", "hard_negatives"):
        value = cfg.train.get(option, 0)
        require(value >= 0, f"train.{option}", "a non-negative integer", value)
    from hybrid_retrieval.data.overlap import CONTAMINATION_POLICIES

    require(cfg.train.get("contamination", "refuse") in CONTAMINATION_POLICIES, "train.contamination",
             f"one of {', '.join(CONTAMINATION_POLICIES)}", cfg.train.get("contamination"))
    require(cfg.train.lr > 0, "train.lr", "a positive number", cfg.train.lr)
    require(cfg.train.get("schedule") in ("linear", "cosine", "constant"), "train.schedule",
             "linear, cosine or constant", cfg.train.get("schedule"))
    require(float(cfg.train.get("warmup_ratio", 0)) >= 0 and float(cfg.train.get("warmup_ratio", 0)) < 1,
             "train.warmup_ratio", "a number in [0, 1)", cfg.train.get("warmup_ratio"))
    from hybrid_retrieval.losses.matryoshka import check_matryoshka

    try:
        matryoshka = cfg.get("matryoshka") or {}
        check_matryoshka(matryoshka.get("dims"), matryoshka.get("weights"),
                         model_dimension(cfg.model, model_folder(cfg.model)))
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
    from hybrid_retrieval.losses.distill import InBatchDistillation
    from hybrid_retrieval.models.merge import check_merge

    try:  # the checks of the merge and of the distillation term themselves, before any model loads
        if cfg.train.get("merge_ratio") is not None:
            check_merge("start", cfg.train.merge_ratio, "train.")
        distill = cfg.get("distill") or {}
        InBatchDistillation(distill.get("weight", 0.0), distill.get("temperature", 0.05))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    chunk = cfg.train.get("grad_cache_chunk")
    require(chunk is None or positive_int(chunk), "train.grad_cache_chunk", "null or a positive integer", chunk)
    if chunk is not None:
        accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
        require(accumulate == 1, "trainer.accumulate_grad_batches", "1 with train.grad_cache_chunk (gradient "
                 "caching already gives the whole batch's negatives; accumulation would not add any)", accumulate)


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
