"""The one step that reads what older versions wrote: a run folder's saved config (compared with today's by a
resume, :func:`hybrid_retrieval.run_folder.check_same_config`) and command lines with options renamed since.
Each change of a spelling is one entry here; no other module knows the old spellings.

- :data:`RENAMED_TARGETS`: readers that moved to their own modules (``_target_`` values in saved configs).
- :data:`RENAMED_OPTIONS`: options renamed since: moved in saved configs; on a command line refused before
  composing, naming the new one.
- Options added to a typed node since a run started take their schema default; keys a node's schema no longer
  has are dropped (the code does not read them, so they cannot make two runs differ).
- A run started before ``conf/callbacks`` existed ran the default callbacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RENAMED_TARGETS = {
    "hybrid_retrieval.data.pairs." + name: f"hybrid_retrieval.data.{module}.{name}"
    for name, module in (("from_lareqa", "lareqa_pairs"), ("from_squad", "squad"), ("from_jsonl", "jsonl_pairs"))
}
# old option -> (new option, why)
RENAMED_OPTIONS = {
    "out": ("output", "one name for the output folder of every command"),
    **{f"loss.{old}": (new, "the loss node builds the loss alone; Matryoshka and distillation are nodes around it")
       for old, new in (("matryoshka_dims", "matryoshka.dims"), ("matryoshka_weights", "matryoshka.weights"),
                        ("distill_weight", "distill.weight"), ("distill_temperature", "distill.temperature"))},
}


def typed_nodes(cfg: Any) -> list[tuple[str, Any]]:
    """(dotted path, schema dataclass) for each node of a composed ``cfg`` that a schema types (its YAML file named
    one): the top-level nodes and each of ``extra_datasets``."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return []
    candidates = [(str(key), cfg.get(key)) for key in cfg.keys()]
    extra = cfg.get("extra_datasets")
    if isinstance(extra, DictConfig):
        candidates += [(f"extra_datasets.{key}", extra.get(key)) for key in extra.keys()]
    return [(path, OmegaConf.get_type(node)) for path, node in candidates
            if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))]


def upgrade_config(config: dict[str, Any], current: Any = None) -> dict[str, Any]:
    """A saved config (plain containers) brought, in place, to what composing the same command today gives;
    ``current`` is today's composed config (without it, only the renames apply)."""
    from omegaconf import OmegaConf

    _rename_targets(config)
    for old, (new, _) in RENAMED_OPTIONS.items():
        _move(config, old, new)
    if current is None:
        return config
    if "callbacks" not in config and current.get("callbacks") is not None:
        config["callbacks"] = OmegaConf.to_container(current.callbacks, resolve=False)
    for path, schema in typed_nodes(current):
        section: Any = config
        for part in path.split("."):
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue
        fields = {field.name: field for field in dataclasses.fields(schema)}
        for name in [key for key in section if key not in fields]:
            del section[name]
        for name, field in fields.items():
            if name not in section and field.default is not dataclasses.MISSING:
                section[name] = field.default
    return config


def _rename_targets(node: Any) -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target in RENAMED_TARGETS:
            node["_target_"] = RENAMED_TARGETS[target]
        for value in node.values():
            _rename_targets(value)
    elif isinstance(node, list):
        for value in node:
            _rename_targets(value)


def _move(config: dict[str, Any], old: str, new: str) -> None:
    *old_parents, old_key = old.split(".")
    node: Any = config
    for part in old_parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old_key not in node:
        return
    value = node.pop(old_key)
    *new_parents, new_key = new.split(".")
    target = config
    for part in new_parents:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[new_key] = value
