"""The command-line entry points end to end: evaluation CLI, training, a 2-job multirun, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = ["dataset.languages=[en,de,el]", "dataset.max_questions_per_language=20"]
SMALL_TRAIN = SMALL_EVAL + ["model=tiny", "train.batch_size=8", "trainer.limit_train_batches=3",
                            "train_data.datasets.0.max_groups=60", "train_data.datasets.0.languages=[en,de,es]",
                            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def run_command(args: list[str], data_root: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1"}
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
    assert run.data.metrics["multi/map"] == pytest.approx(metrics["summary"]["multi"]["map"])
    assert run.data.metrics["cross/en-de/map"] == pytest.approx(metrics["per_language"]["cross"]["en-de"]["map"])
    assert run.data.params["model.name"] == "tiny"
    assert {"metrics.json", "cross_lingual_map.png", "rankings.jsonl", "config/config.yaml"} <= artifact_paths(client, run.info.run_id)


@pytest.mark.slow
def test_two_job_multirun_logs_both_runs_grouped(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    extra = ["+dataset@extra_datasets.mlqa=mlqa_r", "extra_datasets.mlqa.languages=[en,de]",
             "extra_datasets.mlqa.max_questions_per_language=15"]
    proc = run_command(["run.py", "-m", "sampler=mono,cross", *SMALL_TRAIN, *extra, f"logger.tracking_uri={uri}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    jobs = [r for r in runs if r.data.tags.get("job") == "train"]
    assert len(parents) == 1 and len(jobs) == 2
    assert {r.data.tags["sampler"] for r in jobs} == {"mono", "cross"}
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for name in ("val/multi/map", "val/mono/map", "val/cross/map", "val/multi/rank_distance", "train/loss",
                     "val/xquad_r/cross/en-el/map", "val/mlqa/multi/map", "val/mlqa/cross/de-en/map"):
            assert name in run.data.metrics, name
        assert not any("@" in name for name in run.data.metrics)
        assert run.data.params["sampler.mono_ratio"] in {"1.0", "0.0"}
        artifacts = artifact_paths(client, run.info.run_id)
        assert {"metrics.json", "cross_lingual_map.png", "config/config.yaml", "config/overrides.yaml",
                "mlqa_metrics.json", "mlqa_cross_lingual_map.png"} <= artifacts
        # The extra set does not feed the monitored metric: val/multi/map is the main dataset's.
        assert run.data.metrics["val/multi/map"] == run.data.metrics["val/xquad_r/multi/map"]
        history = client.get_metric_history(run.info.run_id, "val/multi/map")
        steps = sorted(m.step for m in history)
        assert len(steps) == 2 and steps[0] == 0 < steps[1]  # before training, and after the 3 training batches
        best = run.data.metrics["best/val/multi/map"]
        # the best checkpoint is chosen among validations during training (step > 0)
        assert best == pytest.approx(max(m.value for m in history if m.step > 0))
        assert Path(run.data.tags["best_checkpoint"]).is_file()
    mono_job = next(r for r in jobs if r.data.tags["sampler"] == "mono")
    assert mono_job.data.metrics["train/mono_batch"] == 1.0


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
    ("dataset.candidate_text=title", "dataset.candidate_text"),
    ("train.monitor=val/multi/map@10", "train.monitor"),
    ("model=xlmr", "model.path=/local/copy"),
    ("+dataset@extra_datasets.mlqa=mlqa_r extra_datasets.mlqa.languages=[th]", "extra_datasets.mlqa"),
    ("+dataset@extra_datasets.xquad_r=mlqa_r", "extra_datasets.xquad_r"),
])
def test_bad_config_fails_before_any_work(tmp_path: Path, data_root: Path, override: str, named: str) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.perf_counter()
    proc = run_command(["run.py", *([] if override.startswith("model=") else ["model=tiny"]), *override.split(),
                        f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'run'}"], data_root, REPO_ROOT)
    assert proc.returncode != 0
    assert named in proc.stderr
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started, so nothing half-written
