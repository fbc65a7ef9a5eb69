"""The config nodes' schemas, registered with Hydra's ConfigStore as ``schema/<name>``.

Each schema is a dataclass beside the code that reads the node; a group's YAML files name it first in their
defaults list (``- /schema/hardware@_here_``), ``conf/config.yaml`` names the ``train`` node's. Hydra then
refuses, while composing, a key the schema does not have and a value of the wrong type, naming the key
(``hardware.num_threads=two``, ``train.bach_size=8``, a misspelt key in an experiment preset). A file of another
class (a sampler or loss of one's own, docs/extending.md) names no schema: its node is untyped. Every entry point
registers them before composing: :func:`hybrid_retrieval.cli.hydra_main`, and the tests' ``conftest.py``.
"""

from __future__ import annotations

from typing import Any


def schemas() -> dict[str, Any]:
    """ConfigStore name -> its schema dataclass."""
    from hybrid_retrieval.adaptation.config import AdaptConfig
    from hybrid_retrieval.data.config import SCHEMAS as TRAIN_DATA
    from hybrid_retrieval.evaluation.config import SCHEMAS as DATASETS
    from hybrid_retrieval.hardware import HardwareConfig
    from hybrid_retrieval.losses.config import DistillConfig, InfoNCELossConfig, MatryoshkaConfig
    from hybrid_retrieval.models.config import ModelConfig
    from hybrid_retrieval.tracking import LoggerConfig
    from hybrid_retrieval.training.config import TrainConfig, TrainerConfig
    from hybrid_retrieval.training.sampler import SamplerConfig

    return {"hardware": HardwareConfig, "logger": LoggerConfig, "loss": InfoNCELossConfig,
            "matryoshka": MatryoshkaConfig, "distill": DistillConfig, "model": ModelConfig, "sampler": SamplerConfig,
            "train": TrainConfig, "trainer": TrainerConfig, "adapt": AdaptConfig, **DATASETS, **TRAIN_DATA}


# Nodes with one schema per kind of group file: ``dataset_miracl`` types the ``dataset`` node.
KINDED_NODES = ("dataset", "train_data")


def node_of(name: str) -> str:
    """The config node a schema types: ``dataset_miracl`` -> ``dataset``, ``train_data_hf`` -> ``train_data``."""
    return next((node for node in KINDED_NODES if name.startswith(f"{node}_")), name)


def register() -> None:
    """Store every schema in Hydra's ConfigStore (group ``schema``); safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in schemas().items():
        store.store(group="schema", name=name, node=schema)


def check_known_keys(cfg: Any, added: list[str] | None = None, groups: Any = ()) -> None:
    """A key added with ``+`` on the command line (``+train.bach_size=8``) is not checked by Hydra against the
    node's schema: refused here, before any work, naming the key and the ones the node has. ``added``: the
    command line's ``+key=value`` overrides; a new top-level key (``+run_nmae=x``) is no option of any command
    and is refused too, unless it names a config group (``groups``: ``+experiment=...``)."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from hybrid_retrieval.config_error import ConfigError
    from hybrid_retrieval.upgrade import typed_nodes

    for override in added or []:
        key = override.lstrip("+").split("=", 1)[0]
        if override.startswith("+") and not override.startswith("++") and "." not in key and "@" not in key \
                and key.split("/")[0] not in groups:
            options = sorted(str(k) for k in cfg.keys() if k != key)
            raise ConfigError(f"{key}: not an option of this command (added with +{key}=); its options are: "
                              f"{', '.join(options)}")

    for path, schema in typed_nodes(cfg):
        known = {field.name for field in fields(schema)}
        unknown = sorted(str(key) for key in OmegaConf.select(cfg, path).keys() if key not in known)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}: not an option of {path} (its schema "
                              f"{schema.__module__}.{schema.__name__}); the options are: "
                              f"{', '.join(sorted(known - {'_target_', '_partial_', '_convert_'}))}")


def describe(nodes: list[str] | None = None) -> str:
    """Every option of the typed nodes with its type and default, one line each (``python -m
    hybrid_retrieval.options``); ``nodes`` picks nodes (``dataset``) or schemas (``dataset_miracl``)."""
    import dataclasses
    import typing

    lines = []
    for name, schema in schemas().items():
        node = node_of(name)
        if nodes and node not in nodes and name not in nodes:
            continue
        hints = typing.get_type_hints(schema)
        kind = f", {name[len(node) + 1:]} files" if name != node else ""
        lines.append(f"{node}:  ({schema.__module__}.{schema.__name__}{kind})")
        for field in dataclasses.fields(schema):
            if field.name.startswith("_"):
                continue
            hint = hints[field.name]
            shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            default = "required" if field.default in (dataclasses.MISSING, "???") else repr(field.default)
            lines.append(f"  {node}.{field.name}: {shown} = {default}")
    return "\n".join(lines)


def load_node(path: Any) -> Any:
    """One group file read alone, outside a composition (``conf/model/tiny.yaml``): its schema's defaults merged
    with its keys, as composing it gives, with the ``defaults`` list gone."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    defaults = node.pop("defaults", None) or []
    for entry in defaults:
        entry = str(entry)
        if entry.startswith("/schema/"):
            name = entry[len("/schema/"):].split("@", 1)[0]
            node = OmegaConf.merge(OmegaConf.structured(schemas()[name]), node)
    return node
