"""Training from each kind of data a researcher brings, end to end through ``run.py`` and the ``prepare`` command:
an mMARCO miniature in the published layout, a folder of Parquet files, and DataLoader workers that leave the
batches, the resume point and the result unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmarco_mini import write_mini_mmarco

from tests.test_cli import REPO_ROOT, SMALL_EVAL, run_command
from tests.test_reliability import RESUMABLE, _env, _wait_for_batches

pytestmark = pytest.mark.slow

TRAIN = [*SMALL_EVAL, "model=tiny", "train.batch_size=8", "trainer.max_steps=3", "train.evaluate_before=false",
         "trainer.enable_progress_bar=false"]


def test_mmarco_miniature_trains_end_to_end(tmp_path: Path, data_root: Path) -> None:
    mini = tmp_path / "mmarco"
    write_mini_mmarco(mini, ["english", "german", "chinese"], n_queries=40, n_passages=200, triples=120)
    cache = tmp_path / "cache"
    args = ["run.py", *TRAIN, "train_data=mmarco", f"train_data.root={mini}",
            "train_data.datasets.0.languages=[english,german,chinese]", "train.hard_negatives=1",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env={**_env(data_root),
                          "HYBRID_RETRIEVAL_CACHE": str(cache)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]["multi"]["map"] > 0
    (store,) = [p for p in (cache / "pairs").iterdir() if p.is_dir()]
    meta = json.loads((store / "pairs.json").read_text())
    assert meta["rows"] == 360 and meta["language_names"] == ["en", "de", "zh"]
    assert meta["rows_with_hard_negatives"] == 360
    # A missing file is named, with the option that points at the folder, before any model loads.
    proc = run_command(["run.py", *TRAIN, "train_data=mmarco", f"train_data.root={tmp_path}/nowhere",
                        f"hydra.run.dir={tmp_path}/bad"], data_root, REPO_ROOT)
    assert proc.returncode != 0 and "triples.train.ids.small.tsv" in proc.stderr and "root" in proc.stderr


def test_a_parquet_folder_is_prepared_then_trained_from_the_cache(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    languages = ["en", "de", "es"]
    rows = [{"group": g, "language": lang, "query": f"question {g} in {lang}", "passage": f"answer {g} in {lang}",
             "hard_negatives": [f"other {g} in {lang}", f"third {g} in {lang}"]}
            for g in range(120) for lang in languages[: 2 + g % 2]]
    for part in range(3):
        pq.write_table(pa.Table.from_pylist(rows[part::3]), folder / f"part-{part}.parquet")
    env = {**_env(data_root), "HYBRID_RETRIEVAL_CACHE": str(tmp_path / "cache")}
    prepared = subprocess.run([sys.executable, "-m", "hybrid_retrieval.prepare", "train_data=parquet",
                               f"train_data.path={folder}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert f"parquet: {len(rows):,} rows, 120 groups, 3 languages" in prepared.stdout
    (store,) = [p for p in (tmp_path / "cache" / "pairs").iterdir() if p.is_dir()]
    assert f"cache: {store}" in prepared.stdout
    written = (store / "data-00000-of-00001.arrow").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "run.py", *TRAIN, "train_data=parquet", f"train_data.path={folder}",
                           "train.hard_negatives=2", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                           f"hydra.run.dir={tmp_path}/run", "train.log_batches=true"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (store / "data-00000-of-00001.arrow").stat().st_mtime_ns == written  # read from the cache, not rewritten
    assert [p for p in (tmp_path / "cache" / "pairs").iterdir() if p.is_dir()] == [store]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    inputs = [d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == "parquet"]
    assert inputs and inputs[0].digest == json.loads((store / "pairs.json").read_text())["digest"][:12]


def test_workers_change_neither_the_batches_nor_the_resume_nor_the_result(tmp_path: Path, data_root: Path) -> None:
    straight = run_command(["run.py", *RESUMABLE, f"logger.tracking_uri=sqlite:///{tmp_path}/a.db",
                            f"hydra.run.dir={tmp_path}/a"], data_root, REPO_ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    folder = tmp_path / "b"
    workers = [*RESUMABLE, "train.num_workers=2", f"logger.tracking_uri=sqlite:///{tmp_path}/b.db"]
    killed = subprocess.Popen([sys.executable, "run.py", *workers, f"hydra.run.dir={folder}"], cwd=REPO_ROOT,
                              env=_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_batches(folder, killed, 17)  # inside the second epoch, workers already ahead of training
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    resumed = run_command(["run.py", *workers, f"train.resume={folder}", f"hydra.run.dir={tmp_path}/b2"],
                          data_root, REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def batches(run: Path) -> list[list]:
        lines = (run / "batches" / "rank0.jsonl").read_text().splitlines()
        # The killed run may have logged steps past its last checkpoint: the resume repeats those; keep the last.
        by_step = {}
        for line in lines:
            record = json.loads(line)
            by_step[record["step"]] = record["rows"]
        return [by_step[s] for s in sorted(by_step)]

    assert batches(folder) == batches(tmp_path / "a")
    final = [json.loads((run / "metrics.json").read_text())["summary"] for run in (folder, tmp_path / "a")]
    assert final[0] == final[1]
