"""The package's shape: no import cycle, no module reaching into another's private names, no driver importing a
driver; and the Lightning callbacks a training run gets come from ``conf/callbacks``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.training.config import check_train_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hybrid_retrieval"
CONF = str(ROOT / "conf")
# The command-line modules (python -m hybrid_retrieval.<name>); shared driver code lives in cli.py.
DRIVERS = ("adapt", "encode", "evaluate", "export", "mine", "mteb", "report", "search", "translate")


def module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def imports(file: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every ``import`` in `file`, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            found += [(m, []) for m in submodules]
            found.append((node.module, [a.name for a in node.names if f"{node.module}.{a.name}" not in known]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(m, names) for m, names in found if m in known and m != "hybrid_retrieval"]


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: {target for target, _ in imports(f, set(modules))} - {m} for m, f in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "hybrid_retrieval.models.loading" in graph["hybrid_retrieval.models.encoder"]
    assert cycles(graph) == []


def test_no_module_imports_a_private_name_of_another() -> None:
    modules = module_names()
    private = [(m, target, name) for m, file in modules.items() for target, names in imports(file, set(modules))
               for name in names if name.startswith("_") and target != m]
    assert private == []


def test_no_driver_imports_another_driver() -> None:
    modules = module_names()
    drivers = {f"hybrid_retrieval.{name}" for name in DRIVERS}
    assert drivers <= set(modules)
    crossing = [(m, target) for m in sorted(drivers) for target, _ in imports(modules[m], set(modules))
                if target in drivers and target != m]
    assert crossing == []


# The package's floors, lowest first: a module imports only from its own floor or the ones below (docs/extending.md
# draws them). Commands sit on top; training uses the libraries; the libraries use the base.
FLOORS = {
    "base": ("config_error", "storage", "progress", "distributed", "hardware", "kernels", "upgrade"),
    "libraries": ("run_folder", "data", "models", "losses", "evaluation", "tracking", "adaptation", "translation",
                  "reporting"),
    "training": ("training",),
    "commands": ("cli", "schemas", "options", *DRIVERS, "prepare", "deliver"),
}


def floor(module: str) -> int:
    part = module.split(".")[1]
    return next(i for i, parts in enumerate(FLOORS.values()) if part in parts)


def test_every_part_of_the_package_is_on_one_floor() -> None:
    parts = {m.split(".")[1] for m in module_names() if m.count(".") >= 1}
    placed = [part for parts_ in FLOORS.values() for part in parts_]
    assert sorted(placed) == sorted(set(placed)) and parts == set(placed)


def test_no_library_module_is_named_like_a_command() -> None:
    """``python -m hybrid_retrieval.<command>`` is a command; no module below it takes a command's name, so a listing
    of the package tells them apart."""
    commands = set(FLOORS["commands"]) - {"cli", "schemas", "options"}
    clashing = [m for m in module_names() if m.count(".") >= 2 and m.rsplit(".", 1)[1] in commands]
    assert clashing == [] and "hybrid_retrieval.evaluation.evaluator" not in module_names()


def test_no_import_runs_back_up_a_floor() -> None:
    graph = import_graph()
    upward = sorted((m, target) for m, targets in graph.items() if m.count(".") >= 1
                    for target in targets if floor(target) > floor(m))
    assert upward == []


def test_no_hub_a_module_many_import_does_not_itself_reach_across_the_package() -> None:
    """A module imported by ten or more others reaches fewer than five other parts of the package (the config
    checks' module this replaced was imported by ten and reached eight)."""
    graph = import_graph()
    importers: dict[str, set[str]] = {m: set() for m in graph}
    for m, targets in graph.items():
        for target in targets:
            importers[target].add(m)

    def part(module: str) -> str:
        return module.split(".")[1]

    hubs = {m: sorted({part(t) for t in graph[m]} - {part(m)}) for m in graph
            if len(importers[m]) >= 10 and len({part(t) for t in graph[m]} - {part(m)}) >= 5}
    assert hubs == {}
    assert max(len(found) for found in importers.values()) >= 10  # the count sees the widely used modules


# ------------------------------------------------------------------------------------------------ callbacks


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny", *overrides])


class FolderNote:
    """A callback that takes the run folder (the contract of ``build_callbacks``)."""

    def __init__(self, run_folder: Path, label: str = "") -> None:
        self.run_folder, self.label = Path(run_folder), label


def test_callbacks_come_from_the_config(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

    from hybrid_retrieval.training.callbacks import BatchLog, TrainingProgress
    from hybrid_retrieval.training.train import build_callbacks

    default = build_callbacks(composed([]), tmp_path)
    assert [type(c) for c in default] == [LearningRateMonitor, TrainingProgress]
    assert default[0].logging_interval == "step"

    cfg = composed(["~callbacks.learning_rate_monitor", "train.log_batches=true",
                    "+callbacks.early_stopping={_target_: pytorch_lightning.callbacks.EarlyStopping, "
                    "monitor: val/multi/map, mode: max, patience: 2}",
                    f"+callbacks.note={{_target_: {__name__}.FolderNote, label: x}}"])
    check_train_config(cfg)
    built = build_callbacks(cfg, tmp_path)
    assert [type(c).__name__ for c in built] == ["TrainingProgress", "EarlyStopping", "FolderNote", "BatchLog"]
    early, note, batches = built[1], built[2], built[3]
    assert isinstance(early, EarlyStopping) and early.patience == 2 and early.monitor == "val/multi/map"
    assert note.run_folder == tmp_path and note.label == "x"
    assert isinstance(batches, BatchLog) and batches.folder == tmp_path / "batches"


@pytest.mark.parametrize("override,named", [
    ("+callbacks.bad={logging_interval: step}", "callbacks.bad._target_"),
    ("+callbacks.bad={_target_: no_such_package.Callback}", "callbacks.bad._target_"),
    ("+callbacks.bad=3", "callbacks.bad._target_"),
])
def test_a_bad_callback_is_refused_by_the_config_check(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_train_config(composed([override]))


# ------------------------------------------------------------------------------------------------ results


def test_every_result_kind_shares_one_json_form_and_one_metric_name_scheme(tmp_path: Path) -> None:
    import json

    import numpy as np

    from hybrid_retrieval.evaluation.lareqa_protocol import EvaluationResult
    from hybrid_retrieval.evaluation.miracl import MiraclResult
    from hybrid_retrieval.evaluation.result import RetrievalResult
    from hybrid_retrieval.evaluation.tatoeba import TatoebaResult

    summary = {"mono": {"map": 0.5}}
    per_language = {"mono": {"sw": {"map": 0.25}, "yo": {"map": 0.75}}}
    results = [
        EvaluationResult(summary, per_language, timings={"encode_s": 1.0}, query_emb=np.ones((2, 3))),
        MiraclResult(summary, per_language, counts={"sw": {"topics": 2}}, runs={"sw": {"q": {"d": 1.0}}},
                     notes=["n"]),
        TatoebaResult(summary, per_language, pairs={"sw": 10}, low_resource=["sw"]),
    ]
    for result in results:
        assert isinstance(result, RetrievalResult)
        assert result.flat("val/x/") == {"val/x/mono/map": 0.5, "val/x/mono/sw/map": 0.25, "val/x/mono/yo/map": 0.75}
        saved = json.loads(result.save_json(tmp_path / f"{type(result).__name__}.json").read_text(encoding="utf-8"))
        assert "query_emb" not in saved and "runs" not in saved  # in memory only
        back = type(result).from_dict(saved)
        assert back.to_dict() == result.to_dict() == saved
    with pytest.raises(NotImplementedError, match="RetrievalResult has no table"):
        RetrievalResult(summary, per_language).table()


def test_a_run_from_before_conf_callbacks_resumes_and_other_changes_are_still_refused(tmp_path: Path) -> None:
    import json

    from omegaconf import OmegaConf

    from hybrid_retrieval.run_folder import RUN_INFO, check_same_config

    cfg = composed(["train.resume=somewhere"])
    saved = OmegaConf.to_container(cfg, resolve=False)
    del saved["callbacks"]  # what a run folder written before conf/callbacks holds
    (tmp_path / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "x", "config": saved}))
    check_same_config(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        check_same_config(composed(["train.resume=somewhere", "train.lr=1e-4"]), tmp_path)
    saved["callbacks"] = {}  # a run with callbacks recorded: they are compared like any option
    (tmp_path / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "x", "config": saved}))
    with pytest.raises(ConfigError, match="callbacks"):
        check_same_config(cfg, tmp_path)


def test_a_run_saved_before_a_typed_option_existed_resumes_at_its_default_and_not_otherwise(tmp_path: Path) -> None:
    import json

    from omegaconf import OmegaConf

    from hybrid_retrieval.run_folder import RUN_INFO, check_same_config

    cfg = composed(["train.resume=somewhere"])
    saved = OmegaConf.to_container(cfg, resolve=False)
    for node, key in (("hardware", "cudnn_attention"), ("hardware", "collective_timeout_s"),
                      ("logger", "delivery_timeout"), ("train", "dynamic_padding")):
        del saved[node][key]  # what a run folder written before the option existed holds
    (tmp_path / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "x", "config": saved}))
    check_same_config(cfg, tmp_path)  # today's values are the defaults: the same experiment
    with pytest.raises(ConfigError, match=r"train\.dynamic_padding"):
        check_same_config(composed(["train.resume=somewhere", "train.dynamic_padding=true"]), tmp_path)
    from hybrid_retrieval.upgrade import upgrade_config

    # A sampler of another class names no schema: its saved node gets no HybridBatchSampler options.
    other = {"_target_": "my_extensions.InOrderSampler", "_partial_": True, "name": "in_order"}
    assert upgrade_config({"sampler": dict(other)}, OmegaConf.create({"sampler": other})) == {"sampler": other}
    # A key the node's schema no longer has was not read: dropped, so it makes no difference.
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["dataset"]["max_pairs_per_language"] = 5
    (tmp_path / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "x", "config": saved}))
    check_same_config(cfg, tmp_path)
