"""What a user reads: the project's own errors as one block without a traceback, no third-party noise, each
progress line once; and what MLflow shows of a run: its data sets (digest, context) and its source."""

from __future__ import annotations

import json
import logging
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.test_cli import REPO_ROOT, SMALL_EVAL, mlflow_client, run_command

NOISE = ("_pytree.py", "LeafSpec", "litlogger", "exists and is not empty", "dataloader is not resumable",
         "newly initialized")


# ------------------------------------------------------------------------------------------- the error block


@pytest.mark.parametrize("args,message", [
    (["run.py", "model=tiny", "sampler.mono_ratio=1.5"], "ConfigError: sampler.mono_ratio=1.5: expected"),
    (["run.py", "model=tiny", "train_data=jsonl", "train_data.path=/nonexistent.jsonl"],
     "FileNotFoundError: training data file '/nonexistent.jsonl' does not exist"),
    (["run.py", "model=tiny", "train.resume=/nonexistent/run"], "train.resume='/nonexistent/run'"),
    (["-m", "hybrid_retrieval.encode", "model=tiny", "kind=query", "input=/nonexistent.txt"],
     "InputFileError: input='/nonexistent.txt': file does not exist"),
    (["-m", "hybrid_retrieval.evaluate", "model=tiny", "model.path=/nonexistent/model"], "/nonexistent/model"),
])
def test_the_projects_own_errors_are_one_block_without_a_traceback(tmp_path: Path, data_root: Path, args: list[str],
                                                                     message: str) -> None:
    store = [] if any(a.startswith("logger.") for a in args) else [f"logger.tracking_uri=sqlite:///{tmp_path}/m.db"]
    proc = run_command([*args, *store, f"hydra.run.dir={tmp_path / 'run'}"], data_root, REPO_ROOT)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert message in "\n".join(proc.stderr.splitlines()[:3]), proc.stderr  # within the first lines
    assert "HYDRA_FULL_ERROR=1" in proc.stderr  # how to see the stack
    assert not any(noise in proc.stderr for noise in NOISE), proc.stderr


def test_hydra_full_error_shows_the_stack(tmp_path: Path, data_root: Path) -> None:
    import os

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        proc = run_command(["run.py", "model=tiny", "sampler.mono_ratio=1.5", f"hydra.run.dir={tmp_path / 'run'}",
                            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db"], data_root, REPO_ROOT)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "training/config.py" in proc.stderr and "sampler.mono_ratio" in proc.stderr


def test_own_errors_are_told_apart_from_bugs() -> None:
    from hydra.errors import InstantiationException

    from hybrid_retrieval.cli import own_error
    from hybrid_retrieval.config_error import ConfigError, UserError
    from hybrid_retrieval.data.sources import DataNotFoundError
    from hybrid_retrieval.tracking import check_tracking_uri

    def raised(action):
        try:
            action()
        except Exception as error:  # the real exception with its real traceback
            return error
        raise AssertionError("nothing raised")

    config = ConfigError("x=1: expected 2")
    assert own_error(config) is config
    # A check's error is the user's: one of config_error's kinds, still the built-in type for callers.
    check = raised(lambda: check_tracking_uri("./mlruns"))
    assert isinstance(check, ValueError) and isinstance(check, UserError) and own_error(check) is check
    assert check.shown_name() == "ValueError" and config.shown_name() == "ConfigError"
    # The same type raised inside a library, or by a failed call on a project line, is a bug: it keeps its stack.
    assert own_error(raised(lambda: np.zeros(3).reshape(2, 2))) is None
    assert own_error(raised(lambda: int("three"))) is None
    assert own_error(RuntimeError("boom")) is None
    # Hydra's instantiate wraps what a `_target_` raised: the cause is reported.
    missing = DataNotFoundError("dataset.root '/x' for mlqa_r is not a directory")
    wrapped = InstantiationException("Error in call to target ...\nfull_key: train_data.datasets0")
    wrapped.__cause__ = missing
    assert own_error(wrapped) is missing


def test_the_failing_option_is_named_as_a_user_types_it() -> None:
    from hydra.errors import InstantiationException

    from hybrid_retrieval.cli import error_block

    cfg = OmegaConf.create({"train_data": {"datasets": [{"name": "mlqa_r"}]}, "model": {"x": 1}})
    cause = FileNotFoundError("training data file '/x.jsonl' does not exist")
    block = error_block(InstantiationException("...\nfull_key: train_data.datasets0"), cause, cfg)
    assert block.splitlines() == ["FileNotFoundError: training data file '/x.jsonl' does not exist",
                                  "(while building train_data.datasets.0)"]
    assert error_block(InstantiationException("...\nfull_key: model"), cause, cfg).endswith("(while building model)")


# ---------------------------------------------------------------------------------------------------- noise


def test_noise_is_dropped_by_message_and_category_only(caplog: pytest.LogCaptureFixture) -> None:
    from hybrid_retrieval.cli import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(resuming=True)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning)
        # Same words, another category; another message, same category: both still shown.
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", RuntimeWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [(type(w.message), str(w.message)[:20]) for w in caught] == [
        (RuntimeWarning, "`isinstance(treespec"), (FutureWarning, "something else is de")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(resuming=False)  # a fresh run into a used folder still hears about it
        warnings.warn("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning)
    assert len(caught) == 1
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/...)")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


# ---------------------------------------------------------------------------------------------- resumable data


def test_lightnings_mid_epoch_resume_warning_is_filtered_only_when_resuming() -> None:
    """The resume is exact (the datamodule's state makes the sampler skip the finished batches; the SIGKILL test in
    test_reliability checks the metrics), so Lightning's "not resumable" warning is wrong here and filtered."""
    from lightning_fabric.utilities.warnings import PossibleUserWarning

    from hybrid_retrieval.cli import quiet_third_party

    message = ("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
               "resumable. This can cause unreliable results if further training is done.")
    for resuming, shown in ((False, 1), (True, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_third_party(resuming=resuming)
            warnings.warn(message, PossibleUserWarning)
        assert len([w for w in caught if "resuming from a checkpoint" in str(w.message)]) == shown


# ----------------------------------------------------------------------------------------------- data sets


def test_a_dataset_digest_changes_with_its_file_and_not_with_its_place(tmp_path: Path) -> None:
    from hybrid_retrieval.data.fingerprint import training_data
    from hybrid_retrieval.data.jsonl_pairs import from_jsonl

    rows = [{"group": f"g{i // 2}", "language": "en" if i % 2 else "de", "query": f"q {i}", "passage": f"p {i}"}
            for i in range(8)]
    first, second = tmp_path / "a" / "pairs.jsonl", tmp_path / "b" / "pairs.jsonl"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def info(path: Path):
        (found,) = training_data([{"path": str(path)}], [from_jsonl(str(path))])
        return found

    a, b = info(first), info(second)
    assert a.digest == b.digest and a.source == str(first) and a.context == "training" and a.rows == 8
    assert {"query": "string", "passage": "string"}.items() <= a.columns.items()
    rows[3]["passage"] = "another passage"
    second.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert info(second).digest != a.digest


def test_runs_log_their_data_sets_and_source(tmp_path: Path) -> None:
    from hybrid_retrieval import tracking
    from hybrid_retrieval.data.fingerprint import DatasetInfo

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create({"logger": {"tracking_uri": uri, "experiment_name": "hybrid_retrieval"}})
    data = [DatasetInfo("mlqa_r", "abc123", str(tmp_path), "training", {"query": "string"}, 10),
            DatasetInfo("xquad_r", "def456", str(tmp_path), "evaluation", {"sentence": "string"}, 5)]
    with tracking.mlflow_run(cfg, job="unit") as run:
        run.log_datasets(data)
        run.log_datasets(data[:1])  # a resumed run logs its data again: nothing is added
    logged = mlflow_client(uri).get_run(run.run_id)
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in logged.inputs.dataset_inputs}
    assert inputs == {("mlqa_r", "abc123", "training"), ("xquad_r", "def456", "evaluation")}
    schema = json.loads(next(d.dataset.schema for d in logged.inputs.dataset_inputs if d.dataset.name == "mlqa_r"))
    assert schema["mlflow_colspec"][0]["name"] == "query"
    tags = logged.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    if (REPO_ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()


# --------------------------------------------------------------------------------------- the default command


@pytest.mark.slow
def test_the_default_commands_start_prints_only_what_matters(tmp_path: Path, data_root: Path) -> None:
    import os

    os.environ["HYBRID_RETRIEVAL_PROGRESS_EVERY_S"] = "0.001"  # a progress line at every step
    try:
        proc = run_command(["run.py", "model=tiny", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
                            "train.batch_size=8", "train_data.datasets.0.max_groups=60", *SMALL_EVAL,
                            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path / 'run'}"],
                           data_root, REPO_ROOT)
    finally:
        del os.environ["HYBRID_RETRIEVAL_PROGRESS_EVERY_S"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert not any(noise in output for noise in NOISE), output[-3000:]
    assert "Traceback" not in output
    progress = [line.split(" - ", 1)[1] for line in output.splitlines() if "[hybrid_retrieval.progress]" in line]
    assert any(line.startswith("train: 2/2 steps") for line in progress), output[-3000:]
    assert len(progress) == len(set(progress)) and sum("train: 2/2" in p for p in progress) == 1, progress
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    contexts = {d.dataset.name: d.tags[0].value for d in run.inputs.dataset_inputs}
    assert contexts == {"mlqa_r": "training", "xquad_r": "evaluation"}
    assert run.data.tags["mlflow.source.name"] == "run.py"
