"""MTEB's own evaluation on this project's models (hybrid_retrieval/evaluation/mteb_eval.py, hybrid_retrieval/mteb.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mteb")

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_command(args: list[str], data_root: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("truncate_dim", [None, 24])
def test_mteb_ndcg_of_a_monolingual_slice_agrees_with_the_project_evaluator(
        tiny_encoder: Any, data_root: Path, tmp_path: Path, truncate_dim: int | None) -> None:
    import mteb

    from hybrid_retrieval.data.lareqa import load_split
    from hybrid_retrieval.evaluation.evaluator import evaluate_encoder
    from hybrid_retrieval.evaluation.mteb_eval import (MtebEncoder, main_scores, model_meta, resolve_tasks,
                                                       weights_revision)

    encoder = copy.deepcopy(tiny_encoder)
    encoder.truncate_dim = truncate_dim
    local = {"root": str(data_root), "languages": ["en"], "max_questions_per_language": 100}
    tasks = resolve_tasks(["XQuADRMonolingual"], local)
    meta = model_meta(encoder, "tiny-check", weights_revision(encoder))
    result = mteb.evaluate(MtebEncoder(encoder, meta), tasks, cache=mteb.ResultCache(cache_path=str(tmp_path)),
                           show_progress_bar=False, encode_kwargs={"batch_size": 64})
    theirs = main_scores(result, tasks)["mteb/XQuADRMonolingual/en/ndcg_at_10"]

    split = load_split("xquad_r", root=data_root, languages=["en"], max_questions_per_language=100)
    assert len(split.queries) == 100
    ours = evaluate_encoder(encoder, split).per_language["mono"]["en"]["ndcg_at_10"]
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert 0.02 < ours < 0.98  # a score that could disagree
    # MTEB's layout: results/<org>__<model>/<revision>/<Task>.json beside model_meta.json; a truncated model is
    # filed as an experiment of its own.
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    revision = weights_revision(encoder)
    prefix = f"results/hybrid_retrieval__tiny-check/{revision}"
    prefix += "" if truncate_dim is None else f"/experiments/{meta.experiment_name}"
    assert f"{prefix}/XQuADRMonolingual.json" in files and f"{prefix}/model_meta.json" in files, files


def test_model_names_never_fall_back_to_the_base_model(tmp_path: Path, tiny_encoder: Any) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.models.export import export_encoder, run_model_name
    from hybrid_retrieval.mteb import locate_model, model_name

    run = tmp_path / "outputs" / "train" / "2026-12-04" / "15-06-38"
    (run / ".hydra").mkdir(parents=True)
    export_encoder(tiny_encoder, run / "model")  # no recorded name: the run's is derived
    cfg = OmegaConf.create({"name": None, "model": {"name": "tiny"}})
    for given in (run, run / "model"):
        folder, run_dir = locate_model(given)
        assert (folder, run_dir) == (run / "model", run)
        assert model_name(cfg, folder, run_dir, "tiny") == "tiny-ft-2026-12-04_15-06-38"
    named = export_encoder(tiny_encoder, tmp_path / "copy", card={"model_name": run_model_name(run, "tiny")})
    assert model_name(cfg, *locate_model(named), "tiny") == "tiny-ft-2026-12-04_15-06-38"  # the export recorded it
    assert model_name(cfg, None, None, "tiny") == "tiny"  # a configured base model is itself


@pytest.mark.slow
def test_a_task_without_reachable_data_fails_before_encoding(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_command(["-m", "hybrid_retrieval.mteb", "model=tiny", "tasks=[XQuADRMonolingual,XQuADRetrieval]",
                        "local.languages=[en]", f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}",
                        f"+hydra.job.env_set.HF_HOME={tmp_path / 'hf'}"], data_root)
    assert proc.returncode != 0
    assert "tasks: XQuADRetrieval: its data" in proc.stderr and "load_data()" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "results").exists()  # nothing evaluated, nothing encoded
    assert not (tmp_path / "mlflow.db").exists()  # checked before the MLflow run
    proc = run_command(["-m", "hybrid_retrieval.mteb", "model=tiny", "tasks=[NoSuchTask]",
                        f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run2'}"], data_root)
    assert proc.returncode != 0 and "tasks: 'NoSuchTask' is not an MTEB task" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_matryoshka_training_to_card_to_mteb_results_filed_under_the_run(tmp_path: Path, data_root: Path) -> None:
    import yaml
    from mlflow.tracking import MlflowClient
    from test_cli import SMALL_TRAIN

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tmp_path / "2026-12-04" / "15-06-38"
    proc = run_command(["run.py", *SMALL_TRAIN, "trainer.limit_train_batches=2", "loss.matryoshka_dims=[64,32]",
                        "loss.matryoshka_weights=[1,0.5]", "train.grad_cache_chunk=4", "model.truncate_dim=32",
                        "+dataset@extra_datasets.mlqa=mlqa_r", "extra_datasets.mlqa.languages=[en,de]",
                        "extra_datasets.mlqa.max_questions_per_language=10", f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={run}"], data_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = run / "model"
    settings = json.loads((model / "hybrid_retrieval.json").read_text())
    assert (settings["matryoshka_dims"], settings["truncate_dim"]) == ([64, 32], 32)
    assert settings["model_name"] == "tiny-ft-2026-12-04_15-06-38"
    front = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    (index,) = front["model-index"]
    assert {r["dataset"]["type"] for r in index["results"]} == {"xquad_r", "mlqa_r"}  # every evaluation set
    final = json.loads((run / "metrics.json").read_text())["summary"]["multi"]["map"]
    xquad = next(r for r in index["results"] if r["dataset"]["type"] == "xquad_r")
    assert {m["type"]: m["value"] for m in xquad["metrics"]}["multi_map"] == pytest.approx(final, abs=1e-6)

    proc = run_command(["-m", "hybrid_retrieval.mteb", f"model.path={run}", "model=tiny", "local.languages=[en]",
                        "local.max_questions_per_language=20", f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'mteb_job'}"], data_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (filed,) = (run / "mteb" / "results").iterdir()  # under the run folder, named after the run
    assert filed.name == "hybrid_retrieval__tiny-ft-2026-12-04_15-06-38"
    (result_file,) = filed.rglob("XQuADRMonolingual.json")
    meta = json.loads((result_file.parent / "model_meta.json").read_text())
    assert meta["name"] == "hybrid_retrieval/tiny-ft-2026-12-04_15-06-38" and meta["embed_dim"] == 32
    client = MlflowClient(tracking_uri=uri)
    (mteb_run,) = [r for r in client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
                   if r.data.tags.get("job") == "mteb"]
    assert mteb_run.info.status == "FINISHED"
    score = json.loads(result_file.read_text())["scores"]["test"][0]["ndcg_at_10"]
    assert mteb_run.data.metrics["mteb/XQuADRMonolingual/en/ndcg_at_10"] == pytest.approx(score)
