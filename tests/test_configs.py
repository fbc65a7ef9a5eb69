"""Every config group composes, presets carry what they promise, and config checks name the bad option."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.training.config import check_train_config

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(overrides: list[str], name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_default_is_the_cpu_sized_hybrid_run() -> None:
    cfg = composed([])
    assert cfg.model.name == "me5_small" and cfg.sampler.name == "hybrid" and cfg.sampler.mono_ratio == 0.5
    assert cfg.train_data.datasets[0].name == "mlqa_r" and cfg.dataset.name == "xquad_r"
    check_train_config(cfg)


@pytest.mark.parametrize("sampler,alpha", [("mono", 1.0), ("cross", 0.0), ("hybrid", 0.5)])
def test_sampler_options(sampler: str, alpha: float) -> None:
    cfg = composed([f"sampler={sampler}", "model=tiny"])
    assert cfg.sampler.mono_ratio == alpha
    check_train_config(cfg)


@pytest.mark.parametrize("preset,model,batch,lr", [("paper_xlmr", "xlmr", 100, 3e-5),
                                                    ("paper_labse", "labse", 100, 3e-5),
                                                    ("demo", "me5_small", 32, 5e-5),
                                                    ("compare", "me5_small", 32, 5e-5),
                                                    ("compare_gpu", "xlmr", 100, 3e-5)])
def test_experiment_presets(preset: str, model: str, batch: int, lr: float) -> None:
    cfg = composed([f"experiment={preset}"])
    assert cfg.model.name == model
    assert cfg.train.batch_size == batch and cfg.train.lr == pytest.approx(lr)
    assert cfg.train.weight_decay == 0.01
    if preset.startswith("compare"):  # full XQuAD-R, resumable, one step-0 validation per sweep
        assert cfg.dataset.languages is None and cfg.dataset.max_questions_per_language is None
        assert cfg.train.resume == "auto" and cfg.train.evaluate_before == "first_job"
    if preset.startswith(("paper", "compare_gpu")):
        assert cfg.dataset.languages is None and cfg.dataset.max_questions_per_language is None
        assert cfg.hardware.accelerator == "gpu" and cfg.sampler.mono_ratio == 0.5
        assert cfg.model.query_prefix == "Query: " and cfg.model.passage_prefix == "Passage: "


def test_labse_is_cls_dense_tanh_normalised() -> None:
    cfg = composed(["model=labse"])
    assert cfg.model.pooling == "cls" and cfg.model.normalize
    assert cfg.model.dense.activation == "tanh" and cfg.model.dense.out_features == 768


@pytest.mark.parametrize("override,option", [
    ("sampler.mono_ratio=-0.1", "sampler.mono_ratio"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.schedule=step", "train.schedule"),
    ("train.monitor=val/mono/accuracy", "train.monitor"),
    ("dataset.max_questions_per_language=0", "dataset.max_questions_per_language"),
    ("hardware.encode_dtype=float16", "hardware.encode_dtype"),
    ("model.pooling=max", "model.pooling"),
    ("model.source=pypi", "model.source"),
    ("model.max_query_length=0", "model.max_query_length"),
])
def test_bad_values_name_the_option(override: str, option: str) -> None:
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        check_train_config(composed(["model=tiny", override]))


def test_evaluate_config_composes() -> None:
    cfg = composed(["model=tiny", "dataset=mlqa_r"], name="evaluate")
    assert cfg.dataset.name == "mlqa_r" and cfg.logger.experiment_name == "hybrid_retrieval"


def test_cluster_recipe_composes_for_submitit() -> None:
    """The SLURM recipe cannot run here; its composed launcher config must match the hardware it launches."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hardware=slurm", "model=tiny",
                                                       "hardware.num_nodes=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node == cfg.hardware.devices == 8
    assert launcher.cpus_per_task == cfg.hardware.num_threads
    assert cfg.hardware.strategy == "ddp" and cfg.hardware.accelerator == "gpu"
    check_train_config(cfg)


def test_joblib_launcher_composes() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize("hardware,strategy,devices", [("ddp", "ddp", -1), ("ddp_cpu", "ddp", 2), ("gpu", "auto", 1)])
def test_hardware_options(hardware: str, strategy: str, devices: int) -> None:
    cfg = composed([f"hardware={hardware}", "model=tiny"])
    assert cfg.hardware.strategy == strategy and cfg.hardware.devices == devices
    check_train_config(cfg)


SCHEMA_GROUPS = ("hardware", "sampler", "logger", "model", "loss", "dataset", "train_data", "trainer", "adapt")
KIND_SCHEMAS = {"dataset": {"xquad_r": "dataset_lareqa", "xquad_r_slice": "dataset_lareqa", "mlqa_r": "dataset_lareqa",
                            "mlqa_r_selection": "dataset_lareqa_selection", "tatoeba": "dataset_tatoeba",
                            "miracl": "dataset_miracl"},
                "train_data": {"hf": "train_data_hf", "jsonl": "train_data_file", "parquet": "train_data_file",
                               "mmarco": "train_data_mmarco"}}


@pytest.mark.parametrize("command", ["config", "evaluate", "encode", "export", "adapt", "search", "mine", "mteb",
                                     "prepare"])
def test_every_option_of_a_schema_group_composes_into_its_schema(command: str) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.schemas import schemas

    conf = Path(CONF)
    default = composed([], command)
    holdout = "+train_data.holdout={dataset: mlqa_r, groups: 40, seed: 0}"
    for group in (g for g in SCHEMA_GROUPS if g in default):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            extra = [holdout] if option == "mlqa_r_selection" and "train_data" not in default else []
            if option == "mlqa_r_selection" and "train_data" in default:
                extra = ["train_data.holdout={dataset: mlqa_r, groups: 40, seed: 0}"]
            cfg = composed([f"{group}={option}", *extra], command)
            name = KIND_SCHEMAS[group][option] if group == "dataset" else KIND_SCHEMAS.get(group, {}).get(option, group)
            assert OmegaConf.get_type(cfg[group]) is schemas()[name], (command, group, option)
    if command == "config":
        assert OmegaConf.get_type(composed([]).train) is schemas()["train"]


def test_an_extra_evaluation_set_is_typed_by_its_own_schema() -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.schemas import check_known_keys, schemas
    from hybrid_retrieval.upgrade import typed_nodes

    cfg = composed(["+dataset@extra_datasets.tatoeba=tatoeba", "+dataset@extra_datasets.miracl=miracl"])
    assert OmegaConf.get_type(cfg.extra_datasets.tatoeba) is schemas()["dataset_tatoeba"]
    assert ("extra_datasets.miracl", schemas()["dataset_miracl"]) in typed_nodes(cfg)
    with pytest.raises(Exception) as raised:
        composed(["+dataset@extra_datasets.tatoeba=tatoeba", "extra_datasets.tatoeba.max_pairs_per_language=many"])
    assert "full_key: extra_datasets.tatoeba.max_pairs_per_language" in f"{raised.value} {raised.value.__cause__}"
    with pytest.raises(ConfigError, match=r"extra_datasets\.tatoeba\.kinds: not an option"):
        check_known_keys(composed(["+dataset@extra_datasets.tatoeba=tatoeba", "+extra_datasets.tatoeba.kinds=x"]))


@pytest.mark.parametrize("override, key, expected", [
    ("hardware.num_threads=two", "hardware.num_threads", "Integer"),
    ("hardware.collective_timeout_s=soon", "hardware.collective_timeout_s", "Float"),
    ("train.batch_size=abc", "train.batch_size", "Integer"),
    ("train.freeze_embeddings=maybe", "train.freeze_embeddings", "bool"),
    ("sampler.mono_ratio=half", "sampler.mono_ratio", "Float"),
    ("logger.log_model=maybe", "logger.log_model", "bool"),
    ("model.unpad=maybe", "model.unpad", "bool"),
    ("model.max_passage_length=long", "model.max_passage_length", "Integer"),
    ("loss.temperature=warm", "loss.temperature", "Float"),
    ("matryoshka.dims=[384,half]", "matryoshka.dims", "Integer"),
    ("distill.weight=heavy", "distill.weight", "Float"),
    ("trainer.max_steps=many", "trainer.max_steps", "Integer"),
    ("train_data=hf train_data.split=[a,b]", "train_data.split", "str"),
    ("adapt=mlm adapt.steps=many", "adapt.steps", "Integer"),
    ("adapt=none adapt.steps=many", "adapt.steps", "Integer"),
    ("dataset.max_questions_per_language=all", "dataset.max_questions_per_language", "Integer"),
    ("dataset=miracl dataset.top_k=many", "dataset.top_k", "Integer")])
def test_a_wrong_type_is_refused_at_composition_naming_the_key(override: str, key: str, expected: str) -> None:
    with pytest.raises(Exception) as raised:
        composed(override.split())
    text = f"{raised.value} {raised.value.__cause__}"
    assert f"full_key: {key}" in text and expected in text, text


@pytest.mark.parametrize("group, text, key", [
    ("experiment", "# @package _global_\ntrain:\n  bach_size: 8\n", "train.bach_size"),
    ("experiment", "# @package _global_\nhardware:\n  num_thread: 3\n", "hardware.num_thread"),
    ("hardware", "defaults:\n  - /schema/hardware@_here_\n  - _self_\nname: typo\nnum_thread: 3\n",
     "hardware.num_thread"),
    ("sampler", "defaults:\n  - /schema/sampler@_here_\n  - _self_\nname: typo\nmono_ration: 0.3\n",
     "sampler.mono_ration"),
    ("model", "defaults:\n  - /schema/model@_here_\n  - _self_\nname: typo\nsource: random\npoolling: cls\n",
     "model.poolling"),
    ("loss", "defaults:\n  - /schema/loss@_here_\n  - _self_\ntemprature: 0.02\n", "loss.temprature"),
    ("dataset", "defaults:\n  - /schema/dataset_miracl@_here_\n  - _self_\ntopk: 10\n", "dataset.topk"),
    ("experiment", "# @package _global_\nmodel:\n  max_query_lenght: 32\n", "model.max_query_lenght")])
def test_a_misspelt_key_in_a_config_file_is_refused_at_composition(tmp_path: Path, group: str, text: str,
                                                                    key: str) -> None:
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / group / "typo.yaml").write_text(text)
    with pytest.raises(Exception) as raised:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            compose(config_name="config", overrides=[f"{group}=typo"])
    assert f"full_key: {key}" in str(raised.value) and "not in" in str(raised.value), str(raised.value)


def test_a_key_added_with_plus_is_refused_before_any_work() -> None:
    from hybrid_retrieval.schemas import check_known_keys

    check_known_keys(composed(["model=tiny"]))
    for override, key in (("+train.bach_size=8", "train.bach_size"), ("+hardware.foo=1", "hardware.foo"),
                          ("+logger.uri=x", "logger.uri"), ("+model.pool=cls", "model.pool"),
                          ("+loss.temp=1", "loss.temp"), ("+dataset.lang=[en]", "dataset.lang"),
                          ("+trainer.max_step=5", "trainer.max_step"), ("+train_data.paht=x", "train_data.paht")):
        with pytest.raises(ConfigError, match=rf"{key}: not an option of .*the options are: .*"):
            check_known_keys(composed([override]))


def test_a_top_level_key_added_with_plus_is_refused_unless_it_names_a_group() -> None:
    from hybrid_retrieval.cli import config_groups
    from hybrid_retrieval.schemas import check_known_keys

    groups = config_groups(Path(CONF))
    assert {"experiment", "dataset", "model"} <= groups
    cfg = composed(["+run_nmae=x"])
    with pytest.raises(ConfigError, match=r"run_nmae: not an option of this command .*run_name, sampler"):
        check_known_keys(cfg, ["+run_nmae=x"], groups)
    check_known_keys(composed(["+index=flat"]), ["+index=flat"], groups)  # a group the command does not use
    check_known_keys(composed(["+dataset@extra_datasets.t=tatoeba"]), ["+dataset@extra_datasets.t=tatoeba"], groups)
    check_known_keys(composed(["+callbacks.extra=null"]), ["+callbacks.extra=null"], groups)  # an untyped node


def test_a_renamed_option_is_refused_naming_the_new_one() -> None:
    import subprocess
    import sys

    for command in ("hybrid_retrieval.export", "hybrid_retrieval.report", "hybrid_retrieval.adapt"):
        proc = subprocess.run([sys.executable, "-m", command, "out=/nowhere/model"], capture_output=True, text=True,
                              cwd=Path(CONF).parent, timeout=120)
        assert proc.returncode == 1 and "out= is now output=" in proc.stderr, (command, proc.stderr[-2000:])
        assert "write output=/nowhere/model" in proc.stderr and not Path("/nowhere").exists()
    proc = subprocess.run([sys.executable, "run.py", "loss.matryoshka_dims=[384,64]", "+loss.distill_weight=1"],
                          capture_output=True, text=True, cwd=Path(CONF).parent, timeout=120)
    assert proc.returncode == 1 and "loss.matryoshka_dims= is now matryoshka.dims=" in proc.stderr, proc.stderr[-2000:]
    assert "write matryoshka.dims=[384,64]" in proc.stderr


def test_a_saved_config_of_an_older_version_reads_in_todays_spelling() -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.upgrade import upgrade_config

    current = composed(["model=tiny", "matryoshka.dims=[64,32]", "distill.weight=0.5"])
    today = OmegaConf.to_container(current, resolve=False)
    old = OmegaConf.to_container(current, resolve=False)
    del old["matryoshka"], old["distill"], old["callbacks"], old["model"]["cache_dir"]
    old["loss"].update(matryoshka_dims=[64, 32], distill_weight=0.5, distill_temperature=0.05)
    old["train_data"]["datasets"][0]["_target_"] = "hybrid_retrieval.data.pairs.from_lareqa"
    assert upgrade_config(old, current) == today


def test_the_options_command_lists_every_typed_option_with_its_type_and_default() -> None:
    import dataclasses
    import subprocess
    import sys

    from hybrid_retrieval.schemas import node_of, schemas

    proc = subprocess.run([sys.executable, "-m", "hybrid_retrieval.options"], capture_output=True, text=True,
                          cwd=Path(CONF).parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, schema in schemas().items():
        node = node_of(name)
        for field in dataclasses.fields(schema):
            if not field.name.startswith("_"):
                assert any(line.strip().startswith(f"{node}.{field.name}: ") for line in lines), (node, field.name)
    assert "  train.batch_size: int = 32" in lines and "  hardware.collective_timeout_s: Optional[float] = None" in lines
    assert "  sampler.mono_ratio: float = required" in lines and "  dataset.top_k: int = 100" in lines
    assert "dataset:  (hybrid_retrieval.evaluation.config.MiraclDatasetConfig, miracl files)" in lines
    bad = subprocess.run([sys.executable, "-m", "hybrid_retrieval.options", "trian"], capture_output=True, text=True,
                         cwd=Path(CONF).parent, timeout=120)
    assert bad.returncode == 2 and "unknown node 'trian'" in bad.stderr


def test_the_trainer_options_are_lightning_trainer_arguments_with_lightnings_defaults() -> None:
    """Every ``trainer`` option is passed to ``pytorch_lightning.Trainer`` as is: a field of the schema must be one of
    its arguments, with its default (an option at its default changes nothing), and not one the project sets."""
    import dataclasses
    import inspect

    import pytorch_lightning as pl

    from hybrid_retrieval.training.config import TrainerConfig

    parameters = inspect.signature(pl.Trainer.__init__).parameters
    for field in dataclasses.fields(TrainerConfig):
        assert field.name in parameters, field.name
        assert field.default == parameters[field.name].default, field.name
    set_by_the_project = {"accelerator", "devices", "num_nodes", "strategy", "precision", "logger", "callbacks",
                          "plugins", "default_root_dir", "use_distributed_sampler", "enable_model_summary"}
    assert not set_by_the_project & {field.name for field in dataclasses.fields(TrainerConfig)}


def test_the_adapt_schema_is_the_mlm_settings_with_method_and_text(caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import logging

    from hybrid_retrieval.adaptation.config import AdaptConfig, MLMSettings
    from hybrid_retrieval.adaptation.mlm import check_adapt_config

    schema = {f.name: f.default for f in dataclasses.fields(AdaptConfig)}
    settings = {f.name: f.default for f in dataclasses.fields(MLMSettings)}
    assert schema == {"method": "none", "text": None, **settings}
    assert composed(["adapt=mlm", "adapt.steps=7"]).adapt.steps == 7
    with pytest.raises(Exception) as raised:
        composed(["adapt=mlm", "adapt.step=7"])
    assert "adapt.step" in str(raised.value)
    # A sweep over adapt=none,mlm sets the MLM options once: adapt=none takes them and says it does not use them.
    with caplog.at_level(logging.INFO, logger="hybrid_retrieval.adaptation.mlm"):
        assert check_adapt_config(composed(["adapt=none", "adapt.steps=5"]).adapt) is None
    assert "adapt=none: adapt.steps not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybrid_retrieval.adaptation.mlm"):
        check_adapt_config(composed(["adapt=none"]).adapt)
    assert "not used" not in caplog.text
