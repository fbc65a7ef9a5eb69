"""Training texts against evaluation texts (data/overlap.py): the normalisation, the overlap report, the
train.contamination policies, and every offline conf/train_data x conf/dataset pair."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from hybrid_retrieval.data.overlap import ContaminationError, check_contamination, find_overlap, normalise
from hybrid_retrieval.data.pairs import PairRow, ParallelPairs, build_datasets
from hybrid_retrieval.evaluation.sets import load_evaluation_sets
from miracl_corpus import write_synthetic_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"


def test_normalise() -> None:
    texts = ["  The  Amazon, rainforest!  ", "the amazon rainforest", "ＴＨＥ　ＡＭＡＺＯＮ — rainforest?",
             "«Der Regenwald»", "l'Amazzonia\t\u00e8\ngrande", "e\u0300 grande"]
    assert normalise(texts).to_pylist() == ["the amazon rainforest", "the amazon rainforest",
                                            "the amazon rainforest", "der regenwald", "l amazzonia e\u0300 grande",
                                            "e\u0300 grande"]  # composed and decomposed letters agree
    # the same result on an Arrow column with nulls, in chunks
    column = pa.chunked_array([["A.B"], [None, "a b"]])
    assert normalise(column).to_pylist() == ["a b", None, "a b"]
    assert {t for t in normalise(["x!", "X", "", "?"]).to_pylist() if t} == {"x"}


def _pairs(name: str, rows: list[tuple[str, str, str, str, str | None]]) -> ParallelPairs:
    return ParallelPairs.from_rows(name, [PairRow(*row) for row in rows], hard_negatives=True)


TRAIN = _pairs("train", [
    ("g1", "en", "Who built the dam on the river?", "The dam was built by the Romans in 120 AD.",
     "The river flows north through the valley."),
    ("g1", "de", "Wer baute den Damm am Fluss?", "Der Damm wurde von den Römern im Jahr 120 gebaut.", None),
    ("g2", "en", "When did the museum open?", "In 1852.", None),
])


def test_find_overlap_counts_queries_passages_and_hard_negatives_by_set_and_language() -> None:
    evaluation = [
        ("xq", "passage", "en", ["the dam was built by the ROMANS in 120 AD", "Unrelated sentence about cats.",
                                  "The river flows north through the valley!"]),
        ("xq", "query", "de", ["Wer baute den Damm am Fluss", "Eine andere Frage zum Thema?"]),
        ("xq", "passage", "de", ["Ein ganz anderer Satz hier."]),
        ("mq", "passage", "en", ["In 1852!"]),   # shorter than MIN_CHARACTERS once normalised: not counted
    ]
    report = find_overlap([TRAIN], evaluation, ["miracl: corpus not compared"])
    by_key = {(s.dataset, s.role, s.language): s for s in report.sets}
    passages = by_key["xq", "passage", "en"]
    assert (passages.texts, passages.found, passages.training) == (3, 2, {"train": 2})  # a passage, a hard negative
    assert passages.examples == ["the dam was built by the romans in 120 ad",
                                 "the river flows north through the valley"]
    assert (by_key["xq", "query", "de"].found, by_key["xq", "passage", "de"].found) == (1, 0)
    assert by_key["mq", "passage", "en"].texts == 0
    assert report.training_texts == 3 + 3 + 1 and report.not_compared == ["miracl: corpus not compared"]
    assert [(s.dataset, s.language) for s in report.passage_overlap] == [("xq", "en")]
    assert "xq en passages: 2 of 3 (in train: 2)" in report.summary()


class _Set:
    """An evaluation set as check_contamination reads it: a key and its texts."""

    def __init__(self, key: str, groups: list) -> None:
        from hybrid_retrieval.evaluation.sets import SetTexts

        self.key, self._texts = key, SetTexts(groups)

    def texts(self):  # noqa: ANN201
        return self._texts


def test_policies() -> None:
    leaking = [_Set("xq", [("passage", "en", ["The dam was built by the Romans in 120 AD."])])]
    with pytest.raises(ContaminationError, match=r"xq en passages: 1 of 1.*train.contamination=warn"):
        check_contamination([TRAIN], leaking, "refuse")
    assert check_contamination([TRAIN], leaking, "warn").passage_overlap
    assert check_contamination([TRAIN], leaking, "off") is None
    # evaluation queries in training are reported, not refused
    queries = [_Set("xq", [("query", "de", ["Wer baute den Damm am Fluss?"])])]
    assert check_contamination([TRAIN], queries, "refuse").sets[0].found == 1
    with pytest.raises(ValueError, match="train.contamination='maybe'"):
        check_contamination([TRAIN], queries, "maybe")


TRAIN_DATA = ["mlqa_r", "xquad_r", "squad_mt", "mlqa_r_squad_mt"]
NEEDS_FILES = {"jsonl", "parquet", "hf", "mmarco"}  # readers of the user's own files: nothing here to read
DATASETS = ["xquad_r", "xquad_r_slice", "mlqa_r", "mlqa_r_selection", "tatoeba", "miracl"]
# evaluation set -> the training data that holds its texts (a set trained and evaluated on itself)
SOURCE = {"xquad_r": {"xquad_r"}, "xquad_r_slice": {"xquad_r"}, "mlqa_r": {"mlqa_r", "mlqa_r_squad_mt"},
          "mlqa_r_selection": {"mlqa_r", "mlqa_r_squad_mt"}, "tatoeba": set(), "miracl": set()}


@pytest.mark.slow
def test_every_offline_train_data_and_dataset_pair(data_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(data_root))
    monkeypatch.setenv("HYBRID_RETRIEVAL_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(tmp_path / "cache"))
    assert {p.stem for p in (CONF / "train_data").glob("*.yaml")} == set(TRAIN_DATA) | NEEDS_FILES
    assert {p.stem for p in (CONF / "dataset").glob("*.yaml")} == set(DATASETS)
    corpus = write_synthetic_corpus(tmp_path / "miracl-corpus", ["sw", "te", "yo"], data_root)
    seen = {}
    with initialize_config_dir(str(CONF), version_base=None):
        for train_data, dataset in itertools.product(TRAIN_DATA, DATASETS):
            languages = "[sw,te,yo]" if dataset == "miracl" else "null"
            overrides = [f"train_data={train_data}", f"dataset={dataset}", f"dataset.languages={languages}"]
            if dataset == "mlqa_r_selection":  # the split is named by a holdout
                overrides.append("train_data.holdout={dataset: mlqa_r, groups: 200, seed: 0}")
            if dataset == "miracl":  # the corpus is on the hub only: a synthetic one for three languages
                overrides.append(f"dataset.corpus_root={corpus}")
            cfg = compose("config", overrides=overrides)
            if dataset == "mlqa_r_selection":
                # the held-out groups, evaluated: train on all of MLQA-R (no holdout) to see the overlap
                training_cfg = compose("config", overrides=[f"train_data={train_data}"])
            else:
                training_cfg = cfg
            sets = load_evaluation_sets(cfg.dataset, None)
            report = check_contamination(build_datasets(training_cfg.train_data), sets, "warn")
            passages = {s.dataset for s in report.passage_overlap}
            queries = {s.dataset for s in report.sets if s.role == "query" and s.found}
            seen[train_data, dataset] = (passages, queries)
            expected = {cfg.dataset.name} if train_data in SOURCE[dataset] else set()
            assert queries == expected, (train_data, dataset, report.summary())
            if dataset != "miracl":  # MIRACL's corpus is not compared (its topics are)
                assert passages == expected, (train_data, dataset, report.summary())
            # every query of a set trained on, or none (passages: the answer sentences are trained on, not the rest)
            assert all(s.found == s.texts for s in report.sets if s.found and s.role == "query"), report.summary()
    # the selection split's own training run (with the holdout) holds none of its texts
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["train_data.holdout={dataset: mlqa_r, groups: 200, seed: 0}",
                                           "dataset=mlqa_r_selection", "dataset.languages=null"])
        report = check_contamination(build_datasets(cfg.train_data), load_evaluation_sets(cfg.dataset, None))
        assert not any(s.found for s in report.sets), report.summary()
    assert len(seen) == len(TRAIN_DATA) * len(DATASETS)


@pytest.mark.slow
def test_a_run_trained_on_its_evaluation_set_is_refused_before_the_model_loads(data_root: Path, tmp_path: Path) -> None:
    env = {"HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HYBRID_RETRIEVAL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, str(REPO_ROOT / "run.py"), "model=tiny", "train_data=xquad_r", "dataset=xquad_r",
               f"hydra.run.dir={tmp_path / 'run'}", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert refused.returncode != 0
    assert "train.contamination" in refused.stderr and "xquad_r" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started
    allowed = subprocess.run([*command, "train.contamination=warn", "trainer.limit_train_batches=2",
                              "dataset.max_questions_per_language=5", "train.batch_size=4"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    written = json.loads((tmp_path / "run" / "contamination.json").read_text())
    assert any(s["found"] for s in written["sets"] if s["role"] == "passage")
