"""Checks on a composed config, run before any model is loaded or any data is read.

Each error names the option (as it is written on the command line) and what was expected, so a typo in a
sweep fails in a second instead of after minutes of encoding.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from hybrid_retrieval.data.lareqa import CANDIDATE_TEXTS
from hybrid_retrieval.data.sources import check_languages
from hybrid_retrieval.evaluation.evaluator import SETTINGS
from hybrid_retrieval.evaluation.metrics import METRICS
from hybrid_retrieval.models.encoder import POOLINGS, resolve_hub_folder
from hybrid_retrieval.models.encoder import SOURCES as MODEL_SOURCES

ENCODE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option."""


def _require(condition: bool, option: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r}: expected {expected}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_model(model: DictConfig, option: str = "model") -> None:
    _require("_target_" in model, f"{option}._target_", "a loader such as "
             "hybrid_retrieval.models.encoder.load_encoder", None)
    _require(model.get("source") in MODEL_SOURCES, f"{option}.source", f"one of {MODEL_SOURCES}",
             model.get("source"))
    _require(model.get("pooling") in POOLINGS, f"{option}.pooling", f"one of {POOLINGS}", model.get("pooling"))
    for key in ("max_query_length", "max_passage_length"):
        _require(_positive_int(model.get(key)), f"{option}.{key}", "a positive integer", model.get(key))
    if model.source == "hub":
        # A missing local copy must stop the run here, not after data loading and MLflow set-up.
        resolve_hub_folder(model.name, model.get("checkpoint"), model.get("path"))


def check_dataset(dataset: DictConfig, option: str = "dataset") -> None:
    try:
        check_languages(dataset.name, dataset.get("languages"))
    except (ValueError, KeyError) as error:
        raise ConfigError(f"{option}: {error}") from error
    cap = dataset.get("max_questions_per_language")
    _require(cap is None or _positive_int(cap), f"{option}.max_questions_per_language",
             "null or a positive integer", cap)
    _require(dataset.get("candidate_text") in CANDIDATE_TEXTS, f"{option}.candidate_text",
             f"one of {CANDIDATE_TEXTS}", dataset.get("candidate_text"))


def check_hardware(hardware: DictConfig) -> None:
    _require(_positive_int(hardware.get("num_threads")), "hardware.num_threads", "a positive integer",
             hardware.get("num_threads"))
    _require(hardware.get("encode_dtype") in ENCODE_DTYPES, "hardware.encode_dtype",
             f"one of {ENCODE_DTYPES}", hardware.get("encode_dtype"))
    _require(_positive_int(hardware.get("encode_batch_size")), "hardware.encode_batch_size",
             "a positive integer", hardware.get("encode_batch_size"))


def check_monitor(metric: str, mode: str, option: str) -> None:
    parts = metric.split("/")
    valid = (len(parts) == 3 and parts[0] == "val" and parts[1] in SETTINGS and parts[2] in METRICS) or \
        metric == "val/loss"
    _require(valid, option, f"'val/loss' or 'val/<{'|'.join(SETTINGS)}>/<{'|'.join(METRICS)}>'", metric)
    _require(mode in ("max", "min"), f"{option} mode", "max or min", mode)


def check_evaluate_config(cfg: DictConfig) -> None:
    check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_hardware(cfg.hardware)


def check_train_config(cfg: DictConfig) -> None:
    check_evaluate_config(cfg)
    ratio = cfg.sampler.get("mono_ratio")
    _require(isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0, "sampler.mono_ratio",
             "a number in [0, 1] (1 = monolingual batches only, 0 = cross-lingual only)", ratio)
    _require(_positive_int(cfg.train.batch_size), "train.batch_size", "a positive integer", cfg.train.batch_size)
    _require(isinstance(cfg.train.lr, (int, float)) and cfg.train.lr > 0, "train.lr", "a positive number",
             cfg.train.lr)
    _require(cfg.train.get("schedule") in ("linear", "cosine", "constant"), "train.schedule",
             "linear, cosine or constant", cfg.train.get("schedule"))
    _require(float(cfg.train.get("warmup_ratio", 0)) >= 0 and float(cfg.train.get("warmup_ratio", 0)) < 1,
             "train.warmup_ratio", "a number in [0, 1)", cfg.train.get("warmup_ratio"))
    check_monitor(cfg.train.monitor, cfg.train.monitor_mode, "train.monitor")
    extra = cfg.get("extra_datasets") or {}
    for key, dataset in extra.items():
        _require(key != cfg.dataset.name, f"extra_datasets.{key}",
                 f"a key other than the main dataset's name {cfg.dataset.name!r} (metrics are logged under it)", key)
        _require(isinstance(dataset, DictConfig) and "name" in dataset, f"extra_datasets.{key}",
                 "a dataset config, e.g. +dataset@extra_datasets.mlqa=mlqa_r", dataset)
        check_dataset(dataset, f"extra_datasets.{key}")
    _require(len(cfg.train_data.get("datasets") or []) > 0, "train_data.datasets", "at least one dataset",
             cfg.train_data.get("datasets"))
