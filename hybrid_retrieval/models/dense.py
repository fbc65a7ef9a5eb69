"""The optional dense head on top of pooling: built from a config, read and written in sentence-transformers'
``Dense`` format (``<folder>/config.json`` + ``model.safetensors``) so exports load there unchanged."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.models.loading import ModelNotFoundError

__all__ = ["ACTIVATIONS", "build_dense", "dense_linear", "save_dense"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
DENSE_WEIGHTS = "model.safetensors"


def dense_linear(dense: nn.Module) -> nn.Linear:
    linear = dense[0] if isinstance(dense, nn.Sequential) else dense
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"dense head must be nn.Linear or nn.Sequential(Linear, activation), got {type(dense)}")
    return linear


def activation_module(name: str) -> nn.Module:
    key = name.rsplit(".", 1)[-1].lower()  # accepts sentence-transformers' "torch.nn.modules.activation.Tanh"
    if key not in ACTIVATIONS:
        raise BadValue(f"model.dense.activation={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


def load_dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, torch_file = folder / DENSE_WEIGHTS, folder / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    if torch_file.is_file():
        return torch.load(str(torch_file), map_location="cpu", weights_only=True)
    raise ModelNotFoundError(f"dense head folder {folder} has neither {DENSE_WEIGHTS} nor pytorch_model.bin")


def build_dense(spec: Mapping[str, Any], model_dir: Path | None, hidden: int, seed: int) -> nn.Module:
    """Build the dense head: weights from ``<model folder>/<spec.folder>`` (sentence-transformers Dense format)
    when that folder exists, otherwise freshly initialised (with a warning) for fine-tuning."""
    unknown = set(spec) - {"folder", "out_features", "activation", "bias"}
    if unknown:
        raise BadValue(f"model.dense has unknown keys {sorted(unknown)}; allowed: folder, out_features, "
                         "activation, bias")
    folder = model_dir / spec["folder"] if model_dir is not None and spec.get("folder") else None
    if folder is not None and (folder / "config.json").is_file():
        st_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        in_features = int(st_config.get("in_features", hidden))
        out_features = int(st_config.get("out_features", spec.get("out_features", hidden)))
        bias = bool(st_config.get("bias", spec.get("bias", True)))
        activation = str(st_config.get("activation_function", spec.get("activation", "tanh")))
        if in_features != hidden:
            raise BadValue(f"{folder}/config.json: in_features={in_features} but the backbone hidden size is {hidden}")
        linear = nn.Linear(in_features, out_features, bias=bias)
        state = load_dense_weights(folder)
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    else:
        out_features = int(spec.get("out_features", hidden))
        activation = str(spec.get("activation", "tanh"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            linear = nn.Linear(hidden, out_features, bias=bool(spec.get("bias", True)))
        if spec.get("folder"):
            where = folder if folder is not None else f"<model folder>/{spec['folder']}"
            warnings.warn(f"dense head weights not found at {where}; the dense layer is newly initialised",
                          stacklevel=3)
    return nn.Sequential(linear, activation_module(activation))


def save_dense(dense: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    linear = dense_linear(dense)
    activation = dense[1] if isinstance(dense, nn.Sequential) and len(dense) > 1 else nn.Identity()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None,
              "activation_function": f"torch.nn.modules.activation.{type(activation).__name__}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({f"linear.{k}": v.detach().cpu().contiguous() for k, v in linear.state_dict().items()},
              str(folder / DENSE_WEIGHTS))
