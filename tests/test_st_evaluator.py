"""The LAReQA protocol as a sentence-transformers evaluator: the project's numbers on a SentenceTransformer, its
metric names and primary metric inside ``SentenceTransformerTrainer``, and clear errors for bad options."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import model_config
from omegaconf import OmegaConf

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.lareqa_protocol import SUMMARY_METRICS, evaluate_encoder
from hybrid_retrieval.evaluation.st_evaluator import LareqaEvaluator
from hybrid_retrieval.models.encoder import Encoder, load_encoder
from hybrid_retrieval.models.model_folder import export_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LANGUAGES = ["en", "de", "el"]
CAP = 20
EXPECTED_KEYS = {f"{s}_{m}" for s, metrics in SUMMARY_METRICS.items() for m in metrics}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def split(data_root: Path) -> Any:
    return load_split("xquad_r", root=data_root, languages=LANGUAGES, max_questions_per_language=CAP)


def dot_product_tiny() -> Encoder:
    """The tiny model without L2 normalisation: the exported folder scores by dot product."""
    config = OmegaConf.to_container(model_config("tiny"), resolve=True)
    config["normalize"] = False
    return load_encoder(**{k: v for k, v in config.items() if not k.startswith("_")})


@pytest.fixture(scope="module", params=["cosine", "dot"])
def exported(request: pytest.FixtureRequest, tiny_encoder: Encoder,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Encoder, Any]:
    """(project encoder, the same encoder exported and loaded by sentence-transformers)."""
    from sentence_transformers import SentenceTransformer

    encoder = tiny_encoder if request.param == "cosine" else dot_product_tiny()
    folder = export_encoder(encoder, tmp_path_factory.mktemp("st-evaluator") / f"tiny-{request.param}")
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.similarity_fn_name == request.param
    return encoder, model


def test_evaluator_reproduces_the_projects_evaluation(exported: tuple[Encoder, Any], split: Any,
                                                      data_root: Path, tmp_path: Path) -> None:
    encoder, model = exported
    evaluator = LareqaEvaluator("xquad_r", languages=LANGUAGES, max_questions_per_language=CAP, root=data_root)
    assert [q.id for q in evaluator.split.queries] == [q.id for q in split.queries]
    metrics = evaluator(model, output_path=str(tmp_path), epoch=1, steps=2)
    reference = evaluate_encoder(encoder, split)

    assert set(metrics) == {f"xquad_r_{key}" for key in EXPECTED_KEYS}
    for setting, values in reference.summary.items():
        for metric, value in values.items():
            assert metrics[f"xquad_r_{setting}_{metric}"] == pytest.approx(value, abs=1e-6), f"{setting} {metric}"
    assert evaluator.primary_metric == "xquad_r_multi_map" and evaluator.greater_is_better
    assert 0.0 < metrics[evaluator.primary_metric] <= 1.0
    # The full result (per language and pair) stays on the evaluator.
    assert set(evaluator.last_result.per_language["cross"]) == {f"{x}-{y}" for x in LANGUAGES for y in LANGUAGES
                                                                if x != y}
    # The results CSV sentence-transformers evaluators append to, and the model card data.
    rows = list(csv.reader((tmp_path / "LAReQA_evaluation_xquad_r_results.csv").open(encoding="utf-8")))
    assert rows[0][:3] == ["epoch", "steps", "mono_map"] and rows[1][:2] == ["1", "2"]
    assert float(rows[1][rows[0].index("multi_map")]) == pytest.approx(metrics["xquad_r_multi_map"])
    assert model.model_card_data.eval_results_dict[evaluator] == metrics


def test_prepared_split_settings_and_name(exported: tuple[Encoder, Any], split: Any) -> None:
    encoder, model = exported
    evaluator = LareqaEvaluator(split, name="", settings=("multi",))
    metrics = evaluator(model)
    assert set(metrics) == {f"multi_{m}" for m in SUMMARY_METRICS["multi"]}
    assert evaluator.primary_metric == "multi_map"
    assert metrics["multi_rank_distance"] == pytest.approx(evaluate_encoder(encoder, split).summary["multi"]
                                                           ["rank_distance"], abs=1e-6)
    mono = LareqaEvaluator(split, name="dev", settings=["mono"])
    assert mono.primary_metric == "dev_mono_map"
    assert set(mono(model)) == {f"dev_mono_{m}" for m in SUMMARY_METRICS["mono"]}


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"settings": ("mono", "bilingual")}, "settings"),
    ({"settings": ()}, "settings"),
    ({"dataset": "xquad"}, "dataset"),
    ({"dataset": "tatoeba"}, "dataset"),
    ({"passage_text": "paragraph"}, "passage_text"),
    ({"batch_size": 0}, "batch_size"),
    ({"languages": ["en", "xx"]}, "language"),
    ({"languages": ["en"]}, "cross"),
])
def test_bad_options_fail_naming_the_option(kwargs: dict[str, Any], option: str, data_root: Path) -> None:
    with pytest.raises(ValueError, match=option):
        LareqaEvaluator(**{"root": data_root, "max_questions_per_language": 2, **kwargs})


def test_prepared_split_refuses_file_options_and_bad_similarity(split: Any) -> None:
    with pytest.raises(ValueError, match="languages"):
        LareqaEvaluator(split, languages=["en"])
    # The protocol ranks by inner product: a model scored by distance is refused before anything is encoded.
    with pytest.raises(ValueError, match="similarity_fn_name='euclidean'"):
        LareqaEvaluator(split)(SimpleNamespace(similarity_fn_name="euclidean"))


@pytest.mark.slow
def test_two_step_trainer_run_logs_the_evaluator_metrics(tiny_encoder: Encoder, split: Any,
                                                         tmp_path: Path) -> None:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(export_encoder(tiny_encoder, tmp_path / "tiny")), device="cpu")
    pairs = [(q.text, c.sentence) for q, rel in zip(split.queries, split.relevant) for c in [split.candidates[rel[0]]]]
    train = Dataset.from_dict({"anchor": [a for a, _ in pairs[:16]], "positive": [p for _, p in pairs[:16]]})
    evaluator = LareqaEvaluator(split, name="xquad_dev")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, eval_strategy="steps", eval_steps=1,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
        metric_for_best_model=evaluator.primary_metric, greater_is_better=evaluator.greater_is_better,
        logging_steps=1, learning_rate=1e-3)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                         loss=MultipleNegativesRankingLoss(model), evaluator=evaluator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    evaluations = [log for log in trainer.state.log_history if "eval_xquad_dev_multi_map" in log]
    assert [log["step"] for log in evaluations] == [1, 2]
    for log in evaluations:
        assert {f"eval_xquad_dev_{key}" for key in EXPECTED_KEYS} <= set(log)
    # metric_for_best_model names the primary metric: the trainer tracks it (and would keep that checkpoint).
    assert trainer.state.best_metric == max(log["eval_xquad_dev_multi_map"] for log in evaluations)
    # The evaluator saw the trained weights: step 2's numbers are those of evaluating the final model.
    final = LareqaEvaluator(split, name="xquad_dev")(model)
    assert final["xquad_dev_multi_map"] == pytest.approx(evaluations[-1]["eval_xquad_dev_multi_map"], abs=1e-6)
    csv_file = tmp_path / "out" / "eval" / "LAReQA_evaluation_xquad_dev_results.csv"
    assert len(csv_file.read_text(encoding="utf-8").splitlines()) == 3
