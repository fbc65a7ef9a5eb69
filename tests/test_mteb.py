"""MTEB's own evaluation on this project's models (hybrid_retrieval/evaluation/mteb_tasks.py, hybrid_retrieval/mteb.py)."""

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


SLICE = {"languages": ["en", "de", "th"], "max_questions_per_language": 20}
SETTING_TASKS = {"mono": "XQuADRMonolingual", "cross": "XQuADRCrossLingual", "multi": "XQuADRMultilingual"}


@pytest.fixture(scope="module")
def three_settings(tiny_encoder: Any, data_root: Path, tmp_path_factory: pytest.TempPathFactory,
                   one_torch_thread: Any) -> dict[str, Any]:
    """The three local XQuAD-R tasks on a 3-language, 20-question slice, evaluated by MTEB (results in a cache
    folder) and by the project's evaluator, with the tiny model."""
    import mteb

    from hybrid_retrieval.data.lareqa import load_split
    from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_encoder
    from hybrid_retrieval.evaluation.mteb_tasks import MtebEncoder, model_meta, resolve_tasks, weights_revision

    folder = tmp_path_factory.mktemp("mteb_three_settings")
    tasks = resolve_tasks(list(SETTING_TASKS.values()), {"root": str(data_root), **SLICE})
    meta = model_meta(tiny_encoder, "tiny-check", weights_revision(tiny_encoder))
    result = mteb.evaluate(MtebEncoder(tiny_encoder, meta), tasks, cache=mteb.ResultCache(cache_path=str(folder)),
                           show_progress_bar=False, encode_kwargs={"batch_size": 64})
    split = load_split("xquad_r", root=data_root, **SLICE)
    return {"tasks": tasks, "meta": meta, "result": result, "folder": folder,
            "ours": evaluate_encoder(tiny_encoder, split)}


@pytest.mark.parametrize("setting", ["mono", "cross", "multi"])
def test_mteb_main_score_of_each_setting_equals_the_project_evaluator(three_settings: dict[str, Any],
                                                                      setting: str) -> None:
    from hybrid_retrieval.evaluation.mteb_tasks import main_scores

    name = SETTING_TASKS[setting]
    ours = three_settings["ours"]
    (task,) = [t for t in three_settings["tasks"] if t.metadata.name == name]
    (task_result,) = [r for r in three_settings["result"].task_results if r.task_name == name]
    assert task.metadata.main_score == "map"
    scores = main_scores(three_settings["result"], three_settings["tasks"])
    # The task's score (MTEB's mean over subsets) is the project's macro average over languages / pairs.
    assert task_result.get_score() == pytest.approx(ours.summary[setting]["map"], abs=1e-6)
    assert scores[f"mteb/{name}/map"] == pytest.approx(ours.summary[setting]["map"], abs=1e-6)
    assert 0.02 < ours.summary[setting]["map"] < 0.98  # a score that could disagree
    subsets = {s["hf_subset"]: s for s in task_result.scores["test"]}
    if setting == "multi":
        (subset,) = subsets.values()
        assert subset["hf_subset"] == "default" and len(subset["languages"]) == 3
        for metric in ("map", "rank_distance", "max_at_r", "own_language_first"):
            assert subset[metric] == pytest.approx(ours.summary["multi"][metric], abs=1e-6), metric
            for language in SLICE["languages"]:
                assert subset[f"{metric}_{language}"] == pytest.approx(
                    ours.per_language["multi"][language][metric], abs=1e-6), (metric, language)
    else:
        expected = ours.per_language[setting]
        assert set(subsets) == set(expected)  # en / en-de ...: one subset per language / ordered pair
        for subset, values in expected.items():
            assert subsets[subset]["map"] == pytest.approx(values["map"], abs=1e-6), subset
            assert subsets[subset]["ndcg_at_10"] == pytest.approx(values["ndcg_at_10"], abs=1e-5), subset
    for subset in subsets.values():
        # An independent check of the ranking: MTEB's own MAP@1000 (pytrec_eval, rounded to 5 decimals) is the same
        # number here, every pool of the slice being under 1000 sentences.
        assert subset["map_at_1000"] == pytest.approx(subset["map"], abs=1e-5)


def test_local_task_metadata_and_results_are_validated_by_mteb(three_settings: dict[str, Any]) -> None:
    import mteb

    from hybrid_retrieval.evaluation.mteb_tasks import LANGUAGE_CODES, LOCAL_TASKS

    assert set(LOCAL_TASKS) == {f"{d}{s}" for d in ("XQuADR", "MLQAR")
                                for s in ("Monolingual", "CrossLingual", "Multilingual")}
    tasks = three_settings["tasks"]
    mono, cross, multi = tasks
    assert mono.metadata.eval_langs == {x: [LANGUAGE_CODES[x]] for x in SLICE["languages"]}
    assert cross.metadata.eval_langs["en-th"] == ["eng-Latn", "tha-Thai"] and len(cross.hf_subsets) == 6
    assert multi.hf_subsets == ["default"] and set(multi.metadata.languages) == {"eng", "deu", "tha"}
    assert len({t.metadata.revision for t in tasks}) == 3  # the selection and the setting name the revision
    for task in tasks:
        task.metadata._validate_metadata()
    # MTEB's result loading, validated against the local tasks (it does not know them by name: pass the objects).
    loaded = mteb.ResultCache(cache_path=str(three_settings["folder"])).load_results(
        tasks=tasks, validate_and_filter=True, include_remote=False)
    (model,) = loaded.model_results
    assert model.model_name == "hybrid_retrieval/tiny-check"
    ours = three_settings["ours"].summary
    by_name = {r.task_name: r for r in model.task_results}
    for setting, name in SETTING_TASKS.items():
        validated = by_name[name].validate_and_filter_scores(next(t for t in tasks if t.metadata.name == name))
        assert validated.get_score() == pytest.approx(ours[setting]["map"], abs=1e-6)  # files keep 6 decimals


def test_a_search_model_gets_the_project_scores_from_mteb_top_k(tiny_encoder: Any, data_root: Path,
                                                                  three_settings: dict[str, Any]) -> None:
    import mteb
    from mteb.models import SearchEncoderWrapper

    from hybrid_retrieval.evaluation.mteb_tasks import MtebEncoder, resolve_tasks

    # A search model (MTEB's SearchProtocol: no embeddings to rank the whole pool with): every pool of the slice is
    # under MTEB's top 1000, so the scores read off its retrieved lists are the project's.
    tasks = resolve_tasks(["XQuADRMultilingual"], {"root": str(data_root), **SLICE})
    model = SearchEncoderWrapper(MtebEncoder(tiny_encoder, three_settings["meta"]))
    (subset,) = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False).task_results[0].scores["test"]
    for metric in ("map", "rank_distance", "max_at_r", "own_language_first"):
        assert subset[metric] == pytest.approx(three_settings["ours"].summary["multi"][metric], abs=1e-6), metric


@pytest.mark.parametrize("truncate_dim", [None, 24])
def test_mteb_files_results_in_its_layout_and_agrees_with_the_project_on_a_truncated_model(
        tiny_encoder: Any, data_root: Path, tmp_path: Path, truncate_dim: int | None, one_torch_thread: Any) -> None:
    import mteb

    from hybrid_retrieval.data.lareqa import load_split
    from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_encoder
    from hybrid_retrieval.evaluation.mteb_tasks import (MtebEncoder, main_scores, model_meta, resolve_tasks,
                                                       weights_revision)

    encoder = copy.deepcopy(tiny_encoder)
    encoder.truncate_dim = truncate_dim
    local = {"root": str(data_root), "languages": ["en"], "max_questions_per_language": 100}
    tasks = resolve_tasks(["XQuADRMonolingual"], local)
    meta = model_meta(encoder, "tiny-check", weights_revision(encoder))
    result = mteb.evaluate(MtebEncoder(encoder, meta), tasks, cache=mteb.ResultCache(cache_path=str(tmp_path)),
                           show_progress_bar=False, encode_kwargs={"batch_size": 64})
    theirs = main_scores(result, tasks)["mteb/XQuADRMonolingual/en/map"]
    (subset,) = result.task_results[0].scores["test"]

    split = load_split("xquad_r", root=data_root, languages=["en"], max_questions_per_language=100)
    assert len(split.queries) == 100
    ours = evaluate_encoder(encoder, split).per_language["mono"]["en"]
    assert theirs == pytest.approx(ours["map"], abs=1e-6)
    assert subset["ndcg_at_10"] == pytest.approx(ours["ndcg_at_10"], abs=1e-4)
    assert 0.02 < ours["ndcg_at_10"] < 0.98  # a score that could disagree
    # MTEB's layout: results/<org>__<model>/<revision>/<Task>.json beside model_meta.json; a truncated model is
    # filed as an experiment of its own.
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    revision = weights_revision(encoder)
    prefix = f"results/hybrid_retrieval__tiny-check/{revision}"
    prefix += "" if truncate_dim is None else f"/experiments/{meta.experiment_name}"
    assert f"{prefix}/XQuADRMonolingual.json" in files and f"{prefix}/model_meta.json" in files, files


class CountingEncoder:
    """The tiny Encoder, counting the texts it encodes."""

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.texts = encoder, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)

    def encode(self, texts: Any, kind: str, **kwargs: Any) -> Any:
        self.texts += len(texts)
        return self.encoder.encode(texts, kind, **kwargs)


def test_a_second_command_reuses_cached_embeddings_and_reruns_a_changed_selection(
        tiny_encoder: Any, data_root: Path, tmp_path: Path, three_settings: dict[str, Any]) -> None:
    import mteb

    from hybrid_retrieval.evaluation.mteb_tasks import (MtebEncoder, embedding_cache, encoder_settings, main_scores,
                                                       resolve_tasks)
    from hybrid_retrieval.mteb import evaluation_groups

    meta = three_settings["meta"]
    local = {"root": str(data_root), **SLICE}
    folder = tmp_path / "embeddings" / encoder_settings(tiny_encoder)
    first = CountingEncoder(tiny_encoder)
    tasks = resolve_tasks(["XQuADRMonolingual"], local)
    mteb.evaluate(embedding_cache(MtebEncoder(first, meta), folder), tasks, cache=None, show_progress_bar=False)
    assert first.texts > 0
    # Another command (a new wrapper, the same folder), the other two settings: the same texts, nothing encoded.
    second = CountingEncoder(tiny_encoder)
    tasks = resolve_tasks(["XQuADRCrossLingual", "XQuADRMultilingual"], local)
    result = mteb.evaluate(embedding_cache(MtebEncoder(second, meta), folder), tasks, cache=None,
                           show_progress_bar=False)
    assert second.texts == 0
    expected = main_scores(three_settings["result"], three_settings["tasks"])
    for key, value in main_scores(result, tasks).items():
        assert value == pytest.approx(expected[key], abs=1e-6), key
    # Cached results of another selection are not taken for this one's (MTEB alone would keep them).
    cache = mteb.ResultCache(cache_path=str(three_settings["folder"]))
    same = resolve_tasks(["XQuADRMultilingual"], local)
    other = resolve_tasks(["XQuADRMultilingual"], {**local, "max_questions_per_language": 10})
    assert evaluation_groups(same, cache, meta, overwrite=False) == [("only-missing", same)]
    assert evaluation_groups(other, cache, meta, overwrite=False) == [("always", other)]


def test_model_names_never_fall_back_to_the_base_model(tmp_path: Path, tiny_encoder: Any) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.models.model_folder import export_encoder, run_model_name
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
                        f"shared_results={tmp_path / 'shared'}",
                        f"+hydra.job.env_set.HF_HOME={tmp_path / 'hf'}"], data_root)
    assert proc.returncode != 0
    assert "tasks: XQuADRetrieval: its data" in proc.stderr and "load_data()" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "results").exists()  # nothing evaluated, nothing encoded
    assert not (tmp_path / "shared").exists()
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
    proc = run_command(["run.py", *SMALL_TRAIN, "trainer.limit_train_batches=2", "matryoshka.dims=[64,32]",
                        "matryoshka.weights=[1,0.5]", "train.grad_cache_chunk=4", "model.truncate_dim=32",
                        "+dataset@extra_datasets.mlqa=mlqa_r", "extra_datasets.mlqa.languages=[en,de]",
                        "extra_datasets.mlqa.max_questions_per_language=10", "train.contamination=warn",
                        f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={run}"], data_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = run / "model"
    settings = json.loads((model / "hybrid_retrieval.json").read_text())
    assert (settings["matryoshka_dims"], settings["truncate_dim"]) == ([64, 32], 32)
    assert settings["model_name"] == "tiny-ft-2026-12-04_15-06-38"
    front = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    (index,) = front["model-index"]
    # XQuAD-R under its hub id, one result per setting (MLQA-R has no hub id: only in the card's text).
    assert {r["dataset"]["type"] for r in index["results"]} == {"google-research-datasets/xquad_r"}
    final = json.loads((run / "metrics.json").read_text())["summary"]["multi"]["map"]
    multi = next(r for r in index["results"] if r["dataset"].get("config") == "multi")
    assert {m["type"]: m["value"] for m in multi["metrics"]}["map"] == pytest.approx(final, abs=1e-6)

    shared = tmp_path / "shared"
    proc = run_command(["-m", "hybrid_retrieval.mteb", f"model.path={run}", "model=tiny", "local.languages=[en]",
                        "local.max_questions_per_language=20", f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'mteb_job'}", f"shared_results={shared}"], data_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is not valid" not in proc.stderr  # MTEB's prompt-name warning: the CLI never reads the exported prompts
    (filed,) = (run / "mteb" / "results").iterdir()  # under the run folder, named after the run
    assert filed.name == "hybrid_retrieval__tiny-ft-2026-12-04_15-06-38"
    (result_file,) = filed.rglob("XQuADRMonolingual.json")
    meta = json.loads((result_file.parent / "model_meta.json").read_text())
    assert meta["name"] == "hybrid_retrieval/tiny-ft-2026-12-04_15-06-38" and meta["embed_dim"] == 32
    client = MlflowClient(tracking_uri=uri)
    (mteb_run,) = [r for r in client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
                   if r.data.tags.get("job") == "mteb"]
    assert mteb_run.info.status == "FINISHED"
    score = json.loads(result_file.read_text())["scores"]["test"][0]["map"]
    assert mteb_run.data.metrics["mteb/XQuADRMonolingual/en/map"] == pytest.approx(score, abs=1e-6)  # 6 decimals

    # The zero-shot base model, same tasks: filed in the shared result cache, where MTEB's result loading lists the
    # fine-tuned model next to it.
    proc = run_command(["-m", "hybrid_retrieval.mteb", "model=tiny", "local.languages=[en]",
                        "local.max_questions_per_language=20", f"logger.tracking_uri={uri}",
                        f"hydra.run.dir={tmp_path / 'mteb_zero_shot'}", f"shared_results={shared}"], data_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "mteb_zero_shot" / "results").exists()
    import mteb

    from hybrid_retrieval.evaluation.mteb_tasks import resolve_tasks

    tasks = resolve_tasks(["XQuADRMonolingual"], {"root": str(data_root), "languages": ["en"],
                                                  "max_questions_per_language": 20})
    loaded = mteb.ResultCache(cache_path=str(shared)).load_results(tasks=tasks, validate_and_filter=True,
                                                                   include_remote=False, load_experiments="match_name")
    names = {m.model_name: m for m in loaded.model_results}
    assert set(names) == {"hybrid_retrieval/tiny", "hybrid_retrieval/tiny-ft-2026-12-04_15-06-38"}
    fine_tuned = names["hybrid_retrieval/tiny-ft-2026-12-04_15-06-38"].task_results[0]
    assert fine_tuned.get_score() == pytest.approx(score, abs=1e-6)
