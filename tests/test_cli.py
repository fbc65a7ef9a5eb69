"""The command-line entry points end to end: evaluation CLI, training, a 2-job multirun, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_retrieval.evaluation.sets import monitor_keys

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = ["dataset.languages=[en,de,el]", "dataset.max_questions_per_language=20"]
SMALL_TRAIN = SMALL_EVAL + ["model=tiny", "train.batch_size=8", "trainer.limit_train_batches=3",
                            "train_data.datasets.0.max_groups=60", "train_data.datasets.0.languages=[en,de,es]",
                            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def run_command(args: list[str], data_root: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_and_logs_to_mlflow(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    proc = run_command(["-m", "hybrid_retrieval.evaluate", "model=tiny", *SMALL_EVAL, f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={out}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multi" in proc.stdout and "rank_distance" in proc.stdout
    assert "MLflow UI:" in proc.stdout and "workflowType=machine_learning" in proc.stdout  # the summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"mono", "cross", "multi"}
    assert set(metrics["per_language"]["mono"]) == {"en", "de", "el"}
    assert len(metrics["per_language"]["cross"]) == 6
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 60 and all(len(r["top"]) == 10 for r in rankings)

    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    # The same names as training's validation, so MLflow compares evaluation and training runs side by side.
    assert run.data.metrics["val/multi/map"] == pytest.approx(metrics["summary"]["multi"]["map"])
    assert run.data.metrics["val/xquad_r/multi/map"] == pytest.approx(metrics["summary"]["multi"]["map"])
    assert run.data.metrics["val/xquad_r/cross/en-de/map"] == pytest.approx(
        metrics["per_language"]["cross"]["en-de"]["map"])
    assert run.data.params["model.name"] == "tiny"
    assert {"metrics.json", "cross_lingual_map.png", "rankings.jsonl", "config/config.yaml"} <= artifact_paths(client, run.info.run_id)


@pytest.mark.slow
def test_sweep_stopped_by_max_steps_validates_saves_and_exports_every_job(tmp_path: Path, data_root: Path) -> None:
    # max_steps ends the epoch before Lightning's epoch-end validation: each job must still validate its last
    # weights, keep them as the best checkpoint and export them.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # MLQA-R is the training data too: the plumbing of an extra set is tested here, so the overlap is allowed
    extra = ["+dataset@extra_datasets.mlqa=mlqa_r", "extra_datasets.mlqa.languages=[en,de]",
             "extra_datasets.mlqa.max_questions_per_language=15", "train.contamination=warn"]
    small = [arg for arg in SMALL_TRAIN if not arg.startswith("trainer.limit_train_batches")]
    proc = run_command(["run.py", "-m", "sampler=mono,cross,hybrid", "trainer.max_steps=4", *small, *extra,
                        f"logger.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    jobs = [r for r in runs if r.data.tags.get("job") == "train"]
    assert len(parents) == 1 and len(jobs) == 3
    assert {r.data.tags["sampler"] for r in jobs} == {"mono", "cross", "hybrid"}
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for name in ("val/multi/map", "val/mono/map", "val/cross/map", "val/multi/rank_distance", "train/loss",
                     "val/xquad_r/cross/en-el/map", "val/mlqa/multi/map", "val/mlqa/cross/de-en/map"):
            assert name in run.data.metrics, name
        assert not any("@" in name for name in run.data.metrics)
        assert run.data.params["sampler.mono_ratio"] == {"mono": "1.0", "cross": "0.0", "hybrid": "0.5"}[run.data.tags["sampler"]]
        artifacts = artifact_paths(client, run.info.run_id)
        assert {"metrics.json", "cross_lingual_map.png", "config/config.yaml", "config/overrides.yaml",
                "mlqa_metrics.json", "mlqa_cross_lingual_map.png"} <= artifacts
        # The extra set does not feed the monitored metric: val/multi/map is the main dataset's.
        assert run.data.metrics["val/multi/map"] == run.data.metrics["val/xquad_r/multi/map"]
        history = client.get_metric_history(run.info.run_id, "val/multi/map")
        assert sorted(m.step for m in history) == [0, 4]  # before training, and the last weights
        best = run.data.metrics["best/val/multi/map"]
        # the best checkpoint is chosen among validations during training (step > 0)
        assert best == pytest.approx(max(m.value for m in history if m.step > 0))
        assert run.data.metrics["best/step"] == 4
        assert Path(run.data.tags["best_checkpoint"]).is_file()
        model_dir = Path(run.data.tags["model_dir"])
        assert (model_dir / "config.json").is_file() and (model_dir / "modules.json").is_file()
        assert {"model/README.md", "model/hybrid_retrieval.json"} <= artifacts
        # train.monitor accepts exactly the summary keys validation logs.
        logged = {k for k in run.data.metrics if k.startswith("val/") and k.count("/") == 2}
        assert logged == {k for k in monitor_keys("xquad_r") if k.count("/") == 2}
    mono_job = next(r for r in jobs if r.data.tags["sampler"] == "mono")
    assert mono_job.data.metrics["train/mono_batch"] == 1.0

    # The trained model, evaluated afterwards from its export and from its checkpoint, gives exactly the
    # training run's final validation metrics, logged under the same names.
    job_dir = Path(mono_job.data.tags["output_dir"])
    trained = json.loads((job_dir / "metrics.json").read_text())
    for source in (f"model.path={job_dir / 'model'}", f"checkpoint={mono_job.data.tags['best_checkpoint']}"):
        out = tmp_path / source.split("=")[0]
        proc = run_command(["-m", "hybrid_retrieval.evaluate", source, *SMALL_EVAL, f"logger.tracking_uri={uri}",
                            f"hydra.run.dir={out}", "rankings_top_k=0"], data_root, REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evaluated = json.loads((out / "metrics.json").read_text())
        assert evaluated["summary"] == trained["summary"]
        assert evaluated["per_language"] == trained["per_language"]
    evaluations = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("job") == "evaluate"]
    assert len(evaluations) == 2
    for run in evaluations:
        assert run.info.status == "FINISHED"
        for name in ("val/multi/map", "val/xquad_r/cross/en-el/map"):
            assert run.data.metrics[name] == pytest.approx(mono_job.data.metrics[name])


@pytest.mark.slow
def test_training_is_reproducible_with_or_without_the_step_0_validation(tmp_path: Path, data_root: Path) -> None:
    finals = []
    for before in ("true", "false"):
        out = tmp_path / before
        proc = run_command(["run.py", *SMALL_TRAIN, "trainer.deterministic=true", f"train.evaluate_before={before}",
                            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={out}"],
                           data_root, REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        finals.append(json.loads((out / "metrics.json").read_text())["summary"])
    assert finals[0] == finals[1]


@pytest.mark.parametrize("override,named", [
    ("sampler.mono_ratio=1.5", "sampler.mono_ratio"),
    ("dataset.languages=[en,xx]", "xx"),
    ("dataset.passage_text=title", "dataset.passage_text"),
    ("train.monitor=val/loss", "validation computes retrieval metrics only"),
    ("train.monitor=val/multi/rank_distance", "train.monitor_mode"),
    ("train.monitor=val/multi/map@10", "train.monitor"),
    ("model=xlmr", "model.path=/local/copy"),
    ("+dataset@extra_datasets.mlqa=mlqa_r extra_datasets.mlqa.languages=[th]", "extra_datasets.mlqa"),
    ("+dataset@extra_datasets.xquad_r=mlqa_r", "extra_datasets.xquad_r"),
    ("-m hardware=ddp_cpu sampler=mono,cross", "hardware.strategy=ddp in a local multirun"),
    ("train.grad_cache_chunk=0", "train.grad_cache_chunk"),
    ("train.grad_cache_chunk=4 trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
])
def test_bad_config_fails_before_any_work(tmp_path: Path, data_root: Path, override: str, named: str) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = [arg for arg in override.split() if arg.startswith("-")]  # Hydra wants -m before the overrides
    rest = [arg for arg in override.split() if not arg.startswith("-")]
    proc = run_command(["run.py", *flags, *([] if override.startswith("model=") else ["model=tiny"]), *rest,
                        f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       data_root, REPO_ROOT)
    assert proc.returncode != 0
    assert named in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started, so nothing half-written


@pytest.mark.slow
def test_an_interrupted_training_still_ends_validated_saved_and_exported(tmp_path: Path, data_root: Path) -> None:
    import signal

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    small = [arg for arg in SMALL_TRAIN if not arg.startswith("trainer.limit_train_batches")]
    args = [sys.executable, "run.py", *small, "trainer.max_epochs=1000", "trainer.check_val_every_n_epoch=1000",
            "train.evaluate_before=false", f"logger.tracking_uri={uri}", f"hydra.run.dir={out}"]
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        steps = 0
        while steps < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            # "training data" is logged once the run exists: the store's tables are created by then.
            log_file = out / "run.log"
            if log_file.is_file() and "training data" in log_file.read_text():
                client = mlflow_client(uri)
                experiment = client.get_experiment_by_name("hybrid_retrieval")
                if experiment is not None:
                    runs = client.search_runs([experiment.experiment_id])
                    if runs:
                        steps = len(client.get_metric_history(runs[0].info.run_id, "train/loss"))
        assert steps >= 3, "training did not start"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # an interrupted job is not a success
    (run,) = mlflow_client(uri).search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "interrupt", stderr[-3000:]
    step = int(run.data.metrics["best/step"])
    assert step >= 3 and "val/multi/map" in run.data.metrics
    assert Path(run.data.tags["best_checkpoint"]).is_file()
    assert (out / "metrics.json").is_file() and (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_adaptation_then_training_is_one_job(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_command(["run.py", *SMALL_TRAIN, "adapt=mlm", "adapt.steps=3", "adapt.head_warmup_steps=2",
                        "adapt.heldout_size=8", "adapt.batch_size=4", "adapt.text.max_texts=48",
                        f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["adapt_method"] == "mlm"
    assert run.data.tags["adapt_uses_eval_corpus"] == "false"
    for name in ("adapt/heldout_loss_before", "adapt/heldout_loss_after", "adapt/heldout_perplexity_after",
                 "val/multi/map", "train/loss"):
        assert name in run.data.metrics, name
    # The evaluation corpus as adaptation text must be chosen explicitly: naming it as plain lareqa text is refused.
    proc = run_command(["run.py", "model=tiny", "adapt=mlm", "adapt.text.name=xquad_r",
                        f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'bad'}"], data_root, REPO_ROOT)
    assert proc.returncode != 0 and "eval_corpus" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_evaluate_cli_on_tatoeba(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_command(["-m", "hybrid_retrieval.evaluate", "model=tiny", "dataset=tatoeba", "dataset.languages=[deu,amh]",
                        "dataset.max_pairs_per_language=30", "dataset.low_resource=[amh]", f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'run'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert run.data.metrics["val/low_resource/both/accuracy_at_1"] == pytest.approx(
        metrics["summary"]["low_resource/both"]["accuracy_at_1"])
    assert run.data.metrics["val/tatoeba/xx_to_en/amh/map"] == pytest.approx(metrics["per_language"]["xx_to_en"]["amh"]["map"])


def test_evaluate_with_a_gpu_config_on_a_machine_without_one_fails_before_any_work(tmp_path: Path,
                                                                                    data_root: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = run_command(["-m", "hybrid_retrieval.evaluate", "hardware=gpu", "model=tiny", *SMALL_EVAL,
                        f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path / 'run'}"],
                       data_root, REPO_ROOT)
    assert proc.returncode != 0
    assert "hardware.accelerator='gpu': expected a CUDA device visible to torch" in proc.stderr, proc.stderr[-2000:]
    assert "hardware=cpu" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
