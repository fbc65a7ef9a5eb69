"""The config groups' schemas, registered with Hydra's ConfigStore as ``schema/<node>``.

Each schema is a dataclass beside the code that reads the node; a group's YAML files name it first in their
defaults list (``- /schema/hardware@_here_``), ``conf/config.yaml`` names the ``train`` node's. Hydra then
refuses, while composing, a key the schema does not have and a value of the wrong type, naming the key
(``hardware.num_threads=two``, ``train.bach_size=8``, a misspelt key in an experiment preset). Every entry point
registers them before composing: :func:`hybrid_retrieval.cli.hydra_main`, and the tests' ``conftest.py``.
"""

from __future__ import annotations

from typing import Any


def schemas() -> dict[str, Any]:
    """node -> its schema dataclass."""
    from hybrid_retrieval.hardware import HardwareConfig
    from hybrid_retrieval.tracking import LoggerConfig
    from hybrid_retrieval.training.config import TrainConfig
    from hybrid_retrieval.training.sampler import SamplerConfig

    return {"hardware": HardwareConfig, "logger": LoggerConfig, "sampler": SamplerConfig, "train": TrainConfig}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (group ``schema``); safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for node, schema in schemas().items():
        store.store(group="schema", name=node, node=schema)


def typed_nodes(cfg: Any) -> list[tuple[str, Any]]:
    """(node, schema) for each node of the composed ``cfg`` that its schema types (a sampler file of another
    class names no schema: its node is untyped)."""
    from omegaconf import DictConfig, OmegaConf

    return [(node, schema) for node, schema in schemas().items()
            if isinstance(cfg, DictConfig) and isinstance(cfg.get(node), DictConfig)
            and OmegaConf.get_type(cfg[node]) is schema]


def with_schema_defaults(config: dict[str, Any], current: Any) -> dict[str, Any]:
    """A config written before an option existed (a run folder's saved config), with the options added since set
    to their schema defaults, in place, in each node ``current`` (today's composed config) types: what composing
    it today would give. A resume compares it with today's config, so an option added since does not count as a
    change."""
    import dataclasses

    for node, schema in typed_nodes(current):
        section = config.get(node)
        if not isinstance(section, dict):
            continue
        for field in dataclasses.fields(schema):
            if field.name not in section and field.default is not dataclasses.MISSING:
                section[field.name] = field.default
    return config


def check_known_keys(cfg: Any) -> None:
    """A key added with ``+`` on the command line (``+train.bach_size=8``) is not checked by Hydra against the
    node's schema: refused here, before any work, naming the key and the ones the node has."""
    from dataclasses import fields

    from hybrid_retrieval.config_error import ConfigError

    for node, schema in typed_nodes(cfg):
        known = {field.name for field in fields(schema)}
        unknown = sorted(str(key) for key in cfg[node].keys() if key not in known)
        if unknown:
            raise ConfigError(f"{node}.{unknown[0]}: not an option of {node} (its schema "
                              f"{schema.__module__}.{schema.__name__}); the options are: "
                              f"{', '.join(sorted(known - {'_target_', '_partial_'}))}")


def describe(nodes: list[str] | None = None) -> str:
    """Every option of the typed nodes with its type and default, one line each (``python -m
    hybrid_retrieval.options``)."""
    import dataclasses
    import typing

    lines = []
    for node, schema in schemas().items():
        if nodes and node not in nodes:
            continue
        hints = typing.get_type_hints(schema)
        lines.append(f"{node}:  ({schema.__module__}.{schema.__name__})")
        for field in dataclasses.fields(schema):
            if field.name in ("_target_", "_partial_"):
                continue
            hint = hints[field.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            default = "required" if field.default is dataclasses.MISSING else repr(field.default)
            lines.append(f"  {node}.{field.name}: {kind} = {default}")
    return "\n".join(lines)
