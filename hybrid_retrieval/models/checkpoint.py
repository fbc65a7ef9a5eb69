"""Rebuild an :class:`Encoder` from a training checkpoint (``checkpoints/best.ckpt`` of a ``run.py`` run).

A checkpoint of this project is a Lightning checkpoint whose ``state_dict`` holds the encoder under ``encoder.``
and whose ``hybrid_retrieval`` entry records ``{"format": 1, "model": <the resolved conf/model dict>}``: the
model config rebuilds the architecture and tokenizer, the state dict fills in the trained weights.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_retrieval.config_error import MissingPath
from hybrid_retrieval.models.encoder import Encoder, load_encoder

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "CheckpointError", "TrainingCheckpoint", "encoder_from_checkpoint",
           "load_checkpoint_encoder", "merge_with_start", "read_checkpoint"]

CHECKPOINT_KEY = "hybrid_retrieval"
CHECKPOINT_FORMAT = 1
ENCODER_PREFIX = "encoder."
# conf/model keys that are Hydra's, not load_encoder's.
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project can rebuild an encoder from; the message names the file."""


@dataclass
class TrainingCheckpoint:
    """What a checkpoint holds for export: the encoder's weights, its model config and a little bookkeeping."""

    path: Path
    model: dict[str, Any]
    encoder_state: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # epoch, global_step, other hybrid_retrieval entries


def _not_torch(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is not a torch checkpoint ({reason}); expected a file written by "
                           "torch.save, e.g. checkpoints/best.ckpt of a run.py run")


def _torch_load(path: Path) -> Any:
    # torch.save writes a zip archive (since torch 1.6): anything else is not a checkpoint, and is never unpickled.
    if not zipfile.is_zipfile(path):
        raise _not_torch(path, "not a zip archive")
    try:
        # Memory-mapped: a caller that reads only the model config and step (a model card) touches no weights.
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():
            raise _not_torch(path, _short(err)) from err
        # Lightning may pickle objects beyond tensors and containers (e.g. saved hyper-parameters). The format
        # check that follows still applies: only this project's own checkpoints are used.
        warnings.warn(f"checkpoint {path} holds Python objects beyond tensors; it is unpickled in full, so load "
                      "only checkpoints you trust", UserWarning, stacklevel=3)
    except Exception as err:  # torch raises many types for a file it cannot read
        raise _not_torch(path, _short(err)) from err
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any unpickling failure means the same thing here
        raise CheckpointError(f"checkpoint {path} could not be read ({_short(err)})") from err


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def read_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read and validate `path`: a torch file, with this project's ``hybrid_retrieval`` entry and encoder weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MissingPath(f"checkpoint {path} {where}; expected a checkpoint file such as "
                                "outputs/train/<date>/<time>/checkpoints/best.ckpt")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, Mapping) or CHECKPOINT_KEY not in ckpt:
        found = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, Mapping) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"not a hybrid_retrieval checkpoint: {path} has no {CHECKPOINT_KEY!r} entry (found "
                              f"{found}); expected a checkpoint written by run.py")
    meta = ckpt[CHECKPOINT_KEY]
    if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, Mapping) else meta
        raise CheckpointError(f"checkpoint {path}: {CHECKPOINT_KEY}.format={got!r} is not supported; expected "
                              f"{CHECKPOINT_FORMAT}")
    model = meta.get("model")
    if not isinstance(model, Mapping) or "source" not in model or "name" not in model:
        raise CheckpointError(f"checkpoint {path}: {CHECKPOINT_KEY}.model must be the resolved conf/model config "
                              f"(with name, source, ...); got {model!r:.200}")
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} has no state_dict; expected a Lightning checkpoint")
    encoder_state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder_state:
        raise CheckpointError(f"checkpoint {path}: no '{ENCODER_PREFIX}*' weights in its state_dict (found "
                              f"{sorted(state)[:5]}); expected the LightningModule's encoder weights")
    info = {k: ckpt[k] for k in ("epoch", "global_step") if k in ckpt}
    info.update({k: v for k, v in meta.items() if k not in ("format", "model")})
    return TrainingCheckpoint(path=path, model=dict(model), encoder_state=encoder_state, info=info)


def encoder_from_checkpoint(checkpoint: TrainingCheckpoint) -> Encoder:
    """Rebuild the encoder that `checkpoint` was trained with and load its weights (strictly: every key)."""
    kwargs = {k: v for k, v in checkpoint.model.items() if k not in HYDRA_KEYS}
    with warnings.catch_warnings():
        # The dense head is freshly initialised before the checkpoint's weights replace it: not worth a warning.
        warnings.filterwarnings("ignore", message="dense head weights not found")
        try:
            encoder = load_encoder(**kwargs)
        except TypeError as err:
            raise CheckpointError(f"checkpoint {checkpoint.path}: its model config does not fit load_encoder "
                                  f"({err})") from err
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(checkpoint.encoder_state))
    unexpected = sorted(set(checkpoint.encoder_state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(checkpoint.encoder_state)
                        if tuple(expected[k].shape) != tuple(checkpoint.encoder_state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. {k}: checkpoint "
                         f"{tuple(checkpoint.encoder_state[k].shape)}, model {tuple(expected[k].shape)})")
        raise CheckpointError(f"checkpoint {checkpoint.path}: its encoder weights do not match the encoder its "
                              f"model config {kwargs.get('name')!r} builds: {'; '.join(parts)}")
    encoder.load_state_dict(checkpoint.encoder_state, strict=True)
    return encoder.eval()


def merge_with_start(encoder: Encoder, checkpoint: TrainingCheckpoint, ratio: float) -> Encoder:
    """WiSE-FT of a checkpoint's encoder with the model its run started from (rebuilt from the model config the
    checkpoint records): ``(1 - ratio) * start + ratio * trained``, in place (:mod:`hybrid_retrieval.models.merge`)."""
    from hybrid_retrieval.models.merge import merge_into

    if "merge" in checkpoint.info:
        raise CheckpointError(f"checkpoint {checkpoint.path} already holds a merge with its start "
                              f"({checkpoint.info['merge']}); merge its run's trained weights, or drop merge_with")
    kwargs = {k: v for k, v in checkpoint.model.items() if k not in HYDRA_KEYS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dense head weights not found")
        start = load_encoder(**kwargs)
    merge_into(encoder, start.to(next(encoder.parameters()).device), ratio)
    return encoder


def load_checkpoint_encoder(path: str | Path) -> Encoder:
    """The trained :class:`Encoder` stored in a checkpoint written by ``run.py`` (see the module docstring).

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for a file that is not a torch
    checkpoint, not one of this project's, or whose weights do not fit the model config it records.
    """
    return encoder_from_checkpoint(read_checkpoint(path))
