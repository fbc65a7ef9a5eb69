"""The model a command encodes with: ``checkpoint=<run folder>/checkpoints/best.ckpt`` (optionally merged with its
run's starting model) or a ``model`` config, checked before anything loads, loaded in eval mode on the
configured device, with ``model.language_projection`` fitted on it where set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.models.config import projection_options
from hybrid_retrieval.tracking import job_context


def check_model_source(cfg: DictConfig) -> None:
    """The model must be loadable: ``checkpoint`` an existing file, else ``model`` a valid config (a given
    ``model.path`` an existing model folder with its tokenizer)."""
    from hybrid_retrieval.models.config import check_model
    from hybrid_retrieval.run_folder import check_checkpoint_file

    if cfg.get("checkpoint"):
        check_checkpoint_file(cfg.checkpoint)
        projection_options(cfg.get("model"))  # checked here too: the checkpoint brings its model, not these options
        return
    check_model(cfg.model)
    if cfg.model.get("path"):
        from hybrid_retrieval.models.loading import check_tokenizer_files, resolve_hub_folder

        check_tokenizer_files(resolve_hub_folder(cfg.model.name, None, cfg.model.path))


def load_model(cfg: DictConfig) -> Any:
    """The encoder of ``checkpoint`` if set, else of the ``model`` config, in eval mode on ``hardware``'s device."""
    from hybrid_retrieval.hardware import torch_device

    if cfg.get("checkpoint"):
        from hybrid_retrieval.models.checkpoint import encoder_from_checkpoint, merge_with_start, read_checkpoint

        ratio = merge_ratio(cfg)
        checkpoint = read_checkpoint(cfg.checkpoint)
        encoder = encoder_from_checkpoint(checkpoint)
        if ratio is not None:  # WiSE-FT with the run's starting model
            encoder = merge_with_start(encoder, checkpoint, ratio)
        truncate_dim = cfg.get("model", {}).get("truncate_dim")
        if truncate_dim is not None:  # the command line's size wins over the one the checkpoint was trained with
            from hybrid_retrieval.models.encoder import check_truncate_dim

            check_truncate_dim(truncate_dim, encoder.embedding_dim)
            encoder.truncate_dim = int(truncate_dim)
    else:
        from hydra.utils import instantiate

        encoder = instantiate(cfg.model)
    encoder = encoder.to(torch_device(cfg.hardware)).eval()
    options = projection_options(cfg.get("model"))
    if options is not None:
        from hybrid_retrieval.hardware import encode_dtype
        from hybrid_retrieval.models.language_projection import fit_for_encoder

        projection = fit_for_encoder(encoder, options, batch_size=cfg.hardware.encode_batch_size,
                                     dtype=encode_dtype(cfg.hardware))
        projection.save(Path(job_context()["output_dir"]))
        encoder.language_projection = projection
    return encoder


def merge_ratio(cfg: DictConfig) -> float | None:
    """``merge_with=start merge_ratio=r`` (checked; only with ``checkpoint=``), or None."""
    from hybrid_retrieval.models.merge import check_merge

    try:
        ratio = check_merge(cfg.get("merge_with"), cfg.get("merge_ratio", 1.0))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if ratio is not None and not cfg.get("checkpoint"):
        raise ConfigError("merge_with=start needs checkpoint=<run folder>/checkpoints/best.ckpt: the checkpoint "
                          "records the model its run started from")
    return ratio


def model_source(cfg: DictConfig) -> str:
    """Where the weights came from, for meta files and MLflow tags."""
    if cfg.get("checkpoint"):
        merged = f" merged with start at {cfg.merge_ratio}" if cfg.get("merge_with") else ""
        return f"checkpoint:{Path(str(cfg.checkpoint)).expanduser().resolve()}{merged}"
    if cfg.model.get("path"):
        return f"path:{Path(str(cfg.model.path)).expanduser().resolve()}"
    return f"{cfg.model.source}:{cfg.model.get('checkpoint') or cfg.model.name}"


def encode_texts(encoder: Any, texts: list[str], kind: str, hardware: DictConfig) -> tuple[np.ndarray, float]:
    """Embeddings (float32, input order) and the seconds it took."""
    from hybrid_retrieval.hardware import encode_dtype

    dtype = encode_dtype(hardware)
    start = time.perf_counter()
    emb = encoder.encode(texts, kind, batch_size=int(hardware.encode_batch_size), dtype=dtype)
    return emb.astype(np.float32, copy=False), time.perf_counter() - start
