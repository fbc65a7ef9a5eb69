"""MIRACL: topics, qrels and corpus files, trec_eval metrics against pytrec_eval on the real dev qrels, the
evaluation set end to end on a synthetic corpus (real topics and judged docids, the tiny model, real FAISS)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytrec_eval
from conftest import CONF_DIR, REPO_ROOT
from miracl_corpus import write_shard, write_synthetic_corpus
from omegaconf import OmegaConf

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data import miracl as data
from hybrid_retrieval.data.sources import DataNotFoundError
from hybrid_retrieval.evaluation import ir
from hybrid_retrieval.evaluation.config import check_dataset
from hybrid_retrieval.evaluation.corpus import CorpusEncodingError
from hybrid_retrieval.evaluation.miracl import SUMMARY_METRICS, MiraclSet, check_config, load_set
from hybrid_retrieval.evaluation.sets import monitor_keys
from hybrid_retrieval.schemas import load_node

LANGUAGES = ["sw", "te", "yo"]
TREC_MEASURES = {"ndcg_cut.10", "recall.100", "recip_rank"}


def dataset_config(**overrides: Any) -> Any:
    cfg = load_node(CONF_DIR / "dataset" / "miracl.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def trec_eval(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    return pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)


def assert_matches_trec_eval(ours: dict[str, dict[str, float]], run: dict[str, dict[str, float]],
                             qrels: dict[str, dict[str, int]]) -> int:
    """Per topic: nDCG@10 and Recall@100 equal pytrec_eval's; MRR@10 equals its reciprocal rank (over the whole
    run, so independent of our cut) when that rank is within 10, else 0. Returns the topics compared."""
    reference = trec_eval(run, qrels)
    for topic, values in ours.items():
        if topic not in reference:  # not retrieved at all: trec_eval -c counts it as 0, as we do
            assert values == {"ndcg_at_10": 0.0, "recall_at_100": 0.0, "mrr_at_10": 0.0}
            continue
        expected = reference[topic]
        assert values["ndcg_at_10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-12), topic
        assert values["recall_at_100"] == pytest.approx(expected["recall_100"], abs=1e-12), topic
        rr = expected["recip_rank"]
        assert values["mrr_at_10"] == pytest.approx(rr if rr >= 0.1 - 1e-12 else 0.0, abs=1e-12), topic
    return len(reference)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_pytrec_eval_on_every_real_dev_qrels(data_root: Path) -> None:
    """A run made here for every topic of the 18 dev qrels: judged and unjudged passages, scores with many ties
    (one decimal), 120 hits a topic so the Recall@100 cut matters, a few topics left out of the run."""
    rng = random.Random(0)
    compared = 0
    for language in data.LANGUAGES:
        qrels = data.read_qrels(data_root / "miracl" / data.qrels_filename(language))
        run: dict[str, dict[str, float]] = {}
        for n, (topic, judged) in enumerate(qrels.items()):
            if n % 50 == 7:
                continue  # not retrieved
            docids = list(judged) + [f"{rng.randrange(10**7)}#{rng.randrange(40)}" for _ in range(120 - len(judged))]
            run[topic] = {d: round(rng.random(), 1) for d in rng.sample(docids, min(120, len(docids)))}
        ours = ir.evaluate_run(run, qrels)
        assert set(ours) == set(qrels)  # every dev topic has a relevant judgment
        compared += assert_matches_trec_eval(ours, run, qrels)
        means = ir.mean_metrics(ours)
        assert 0.0 < means["ndcg_at_10"] < 1.0 and 0.0 < means["recall_at_100"] <= 1.0
    assert compared > 12_000


def test_ties_are_broken_by_docid_descending_as_trec_eval_does() -> None:
    qrels = {"q": {"a#1": 1, "b#1": 0, "c#1": 1}}
    run = {"q": {"a#1": 0.5, "b#1": 0.5, "c#1": 0.5, "d#1": 0.5, "e#1": 0.9}}
    assert ir.ranked_docids(run["q"]) == ["e#1", "d#1", "c#1", "b#1", "a#1"]
    ours = ir.evaluate_run(run, qrels)["q"]
    # c#1 at rank 3, a#1 at rank 5: DCG = 1/log2(4) + 1/log2(6); ideal = 1 + 1/log2(3)
    assert ours["ndcg_at_10"] == pytest.approx((1 / 2 + 1 / np.log2(6)) / (1 + 1 / np.log2(3)))
    assert ours["mrr_at_10"] == pytest.approx(1 / 3)
    assert_matches_trec_eval({"q": ours}, run, qrels)
    # The rank column of a run file does not matter, only scores and docids.
    assert ir.ranked_docids({"x#1": 1.0, "y#1": 2.0}) == ["y#1", "x#1"]


def test_unjudged_passages_count_as_non_relevant(data_root: Path) -> None:
    """Scoring only the judged passages of a run (dropping unjudged ones) inflates nDCG; we never do that."""
    qrels = data.read_qrels(data_root / "miracl" / data.qrels_filename("sw"))
    rng = random.Random(1)
    run = {}
    for topic, judged in qrels.items():
        hits = {d: 0.5 + rng.random() / 4 for d in judged}  # judged passages below ...
        hits.update({f"9{topic}{i}#0": 0.8 + rng.random() / 10 for i in range(5)})  # ... five unjudged ones
        run[topic] = hits
    honest = ir.mean_metrics(ir.evaluate_run(run, qrels))
    judged_only = {t: {d: s for d, s in hits.items() if d in qrels[t]} for t, hits in run.items()}
    inflated = ir.mean_metrics(ir.evaluate_run(judged_only, qrels))
    assert inflated["ndcg_at_10"] > honest["ndcg_at_10"] + 0.1
    assert inflated["mrr_at_10"] > honest["mrr_at_10"] + 0.1
    assert_matches_trec_eval(ir.evaluate_run(run, qrels), run, qrels)
    assert honest["mrr_at_10"] <= 1 / 6 + 1e-12  # five unjudged passages always come first


def test_run_files_round_trip_exactly(tmp_path: Path) -> None:
    run = ir.run_from_arrays(["1", "2"], np.array([[0.3, 0.1 + 2e-8, 0.1], [0.7, -0.2, 0.0]], np.float32),
                             np.array([[2, 0, 1], [1, 0, -1]]), ["10#0", "11#0", "12#0"])
    assert run == {"1": {"12#0": pytest.approx(0.3), "10#0": pytest.approx(0.1 + 2e-8), "11#0": pytest.approx(0.1)},
                   "2": {"11#0": pytest.approx(0.7), "10#0": pytest.approx(-0.2)}}
    path = ir.write_run(tmp_path / "run.trec", run, "tag")
    assert ir.read_run(path) == run  # bit-identical scores: ties in the file are ties in memory
    assert path.read_text().splitlines()[0].split()[:4] == ["1", "Q0", "12#0", "1"]
    with pytest.raises(ValueError, match="retrieves docid '10#0' twice"):
        ir.run_from_arrays(["1"], np.array([[0.3, 0.2]]), np.array([[0, 0]]), ["10#0"])
    with pytest.raises(ValueError, match="line 1: expected 6 columns"):
        (tmp_path / "bad.trec").write_text("1 Q0 12#0 1 0.3\n")
        ir.read_run(tmp_path / "bad.trec")


# ---------------------------------------------------------------------------------------------- input files


def test_real_dev_files_load(data_root: Path) -> None:
    sw = data.load_language("sw", data_root)
    assert len(sw.topics) == 482 and sw.dropped == 0
    assert sw.topics["6"] == "Bandari kubwa nchini Kenya iko wapi?"
    assert sw.qrels["6"]["32589#0"] == 1 and sw.qrels["6"]["33690#3"] == 0
    assert len(data.load_language("yo", data_root, max_topics=10).topics) == 10


@pytest.mark.parametrize(("kind", "content", "message"), [
    ("topics", "6\tBandari kubwa?\n8\n", r"line 2: expected 2 tab-separated columns 'qid<TAB>query', got 1"),
    ("topics", "6\tone\n6\ttwo\n", r"line 2: topic '6' appears twice"),
    ("topics", "6\t  \n", r"line 1: topic '6' has an empty query"),
    ("qrels", "6\tQ0\t32589#0\t1\n6\tQ0\t32589\t1\n", r"line 2: docid '32589' is not '<doc>#<passage>'"),
    ("qrels", "6\tQ0\t32589-0\t1\n", r"line 1: docid '32589-0' is not '<doc>#<passage>'"),
    ("qrels", "6\tQ0\t32589#0\n", r"line 1: expected 4 columns 'qid Q0 docid rel', got 3"),
    ("qrels", "6\tQ0\t32589#0\tyes\n", r"line 1: relevance 'yes' is not an integer"),
])
def test_topic_and_qrels_errors_name_file_and_line(tmp_path: Path, kind: str, content: str, message: str) -> None:
    path = tmp_path / f"{kind}.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(data.MiraclFormatError, match=rf"{kind}\.tsv {message}"):
        (data.read_topics if kind == "topics" else data.read_qrels)(path)


def test_topics_and_qrels_must_belong_together(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "miracl"
    folder.mkdir()
    (folder / data.topics_filename("yo")).write_text("1\tone\n", encoding="utf-8")
    (folder / data.qrels_filename("yo")).write_text("1 Q0 5#0 1\n2 Q0 6#0 1\n", encoding="utf-8")
    with pytest.raises(data.MiraclFormatError, match=r"judgments for 1 topic\(s\) missing from .*e\.g\. \['2'\]"):
        data.load_language("yo", tmp_path, verify=False)
    with pytest.raises(Exception, match=r"sha256 is .* expected .*HYBRID_RETRIEVAL_VERIFY=0"):
        data.load_language("yo", tmp_path)  # an edited dev file is not the published benchmark
    with pytest.raises(DataNotFoundError, match=r"dataset\.root='.*' holds no miracl/ folder"):
        data.load_language("yo", tmp_path / "miracl" / "nothing")


@pytest.mark.parametrize(("name", "rows", "message"), [
    ("docs-0.jsonl", ["docid,title,text", "1#0,a,b"],
     r"docs-0\.jsonl line 1: not valid JSON .*expected JSONL: a JSON object with docid, title and text per line"),
    ("docs-0.jsonl", [["1#0", "t", "x"]], r"line 1: expected a JSON object with docid, title and text, got a list"),
    ("docs-0.jsonl", [{"docid": "1#0", "title": "t"}], r"line 1: field 'text' is None; expected a non-empty string"),
    ("docs-0.jsonl", [{"id": "1#0", "text": "x"}], r"line 1: field 'docid' is None"),
])
def test_corpus_shard_errors_name_shard_line_and_field(tmp_path: Path, name: str, rows: list[Any],
                                                       message: str) -> None:
    write_shard(tmp_path / name, rows)
    with pytest.raises(data.MiraclFormatError, match=message):
        list(data.iter_passages(data.corpus_shards(tmp_path)))


def test_corpus_folder_that_is_not_jsonl_shards(tmp_path: Path) -> None:
    write_shard(tmp_path / "docs-0.jsonl", [{"docid": "1#0", "title": "", "text": "x"}])
    (tmp_path / "docs-1.parquet").write_bytes(b"PAR1")
    with pytest.raises(data.MiraclFormatError, match=r"\['docs-1\.parquet'\] are not JSONL shards"):
        data.corpus_shards(tmp_path)
    (tmp_path / "docs-1.parquet").unlink()
    (tmp_path / "docs-2.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.MiraclFormatError, match=r"docs-2\.jsonl\.gz: cannot be read as gzip JSONL"):
        list(data.iter_passages(data.corpus_shards(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.MiraclFormatError, match=r"holds no \*\.jsonl or \*\.jsonl\.gz shards"):
        data.corpus_shards(tmp_path / "empty")


def test_corpus_cap_keeps_every_judged_passage_plus_the_first_n_others(tmp_path: Path) -> None:
    rows = [{"docid": f"{i}#0", "title": f"T{i}", "text": f"text {i}"} for i in range(100)]
    write_shard(tmp_path / "docs-0.jsonl.gz", rows[:40], gz=True)
    write_shard(tmp_path / "docs-10.jsonl", rows[60:], gz=False)  # natural order: docs-2 comes before docs-10
    write_shard(tmp_path / "docs-2.jsonl", rows[40:60], gz=False)
    shards = data.corpus_shards(tmp_path)
    assert [p.name for p in shards] == ["docs-0.jsonl.gz", "docs-2.jsonl", "docs-10.jsonl"]
    assert [p.docid for p in data.iter_passages(shards)] == [f"{i}#0" for i in range(100)]
    judged = {"3#0", "55#0", "97#0"}
    kept = [p.docid for p in data.select_passages(shards, judged, 5)]
    assert kept == ["0#0", "1#0", "2#0", "3#0", "4#0", "5#0", "55#0", "97#0"]
    assert len(list(data.select_passages(shards, judged, None))) == 100
    passage = data.Passage("1#0", "Nairobi", "ni mji mkuu")
    assert data.passage_text(passage) == "Nairobi ni mji mkuu" and data.passage_text(passage, "text") == "ni mji mkuu"
    write_shard(tmp_path / "docs-11.jsonl", [rows[0]])
    with pytest.raises(data.MiraclFormatError, match=r"docid '0#0' appears twice"):
        list(data.select_passages(data.corpus_shards(tmp_path), set(), None))


def test_missing_corpus_says_what_to_download_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_RETRIEVAL_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as error:
        data.corpus_dir("sw")
    message = str(error.value)
    assert "hf download miracl/miracl-corpus --repo-type dataset --include 'miracl-corpus-v1.0-sw/*'" in message
    assert "dataset.corpus_root=<dir>" in message and "miracl-corpus/miracl-corpus-v1.0-sw/" in message
    assert "1 gzipped shard" in message and "HYBRID_RETRIEVAL_OFFLINE" in message
    with pytest.raises(DataNotFoundError, match=r"dataset\.corpus_root='.*' holds no miracl-corpus-v1\.0-te/"):
        data.corpus_dir("te", tmp_path)
    (tmp_path / "data" / "miracl-corpus" / "te").mkdir(parents=True)
    assert data.corpus_dir("te") == tmp_path / "data" / "miracl-corpus" / "te"


# -------------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_option_before_reading_data(tmp_path: Path) -> None:
    check_config(dataset_config())
    cases = [
        ({"languages": ["sw", "xx"]}, r"dataset\.languages: \['xx'\] not in MIRACL"),
        ({"languages": ["sw", "sw"]}, r"dataset\.languages: \['sw'\] given more than once"),
        ({"max_corpus_passages": 0}, r"dataset\.max_corpus_passages=0: expected null \(all\) or a positive"),
        ({"top_k": 10}, r"dataset\.top_k=10: expected an integer >= 100"),
        ({"passage_text": "body"}, r"dataset\.passage_text='body'"),
        ({"corpus_root": str(tmp_path / "nope")}, r"dataset\.corpus_root='.*nope' is not a directory"),
        ({"index": {"type": "flat", "factory": "IVF8,Bogus"}},
         r"dataset\.index\.factory='IVF8,Bogus': FAISS cannot build this index"),
        ({"index": {"type": "annoy"}}, r"dataset\.index\.type='annoy'"),
        ({"index": {"type": "ivfpq", "rerank": -1}}, r"dataset\.index\.rerank=-1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            check_config(dataset_config(**overrides))
    with pytest.raises(ConfigError, match=r"extra_datasets\.m: dataset\.languages: \['xx'\] not in MIRACL"):
        check_dataset(dataset_config(languages=["xx"]), "extra_datasets.m")


def test_metric_names_are_known_before_any_data() -> None:
    assert SUMMARY_METRICS == {"mono": ("ndcg_at_10", "recall_at_100", "mrr_at_10")}
    keys = monitor_keys("miracl", {"mlqa": "mlqa_r"})
    assert "val/mono/ndcg_at_10" in keys and "val/miracl/mono/recall_at_100" in keys
    assert "val/mlqa/multi/map" in keys and all("@" not in k for k in keys)


# ----------------------------------------------------------------------------------------- the evaluation set


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("miracl-corpus"), LANGUAGES, data_root, distractors=300,
                                  max_topics=25)


@pytest.fixture(scope="module")
def evaluated(tiny_encoder: Any, corpus_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    cfg = dataset_config(languages=LANGUAGES, corpus_root=str(corpus_root), max_topics_per_language=25,
                         progress=False)
    evaluation_set = load_set("miracl", cfg)
    return evaluation_set, evaluation_set.evaluate(tiny_encoder, batch_size=32, num_threads=1)


def test_evaluation_set_matches_pytrec_eval_on_its_run_files(evaluated: tuple[MiraclSet, Any], data_root: Path,
                                                             tmp_path: Path) -> None:
    evaluation_set, result = evaluated
    assert evaluation_set.describe().startswith("MIRACL dev (sw, te, yo: 75 topics; full corpus; index flat")
    files = evaluation_set.write_report(result, tmp_path, prefix="m_")
    assert sorted(p.name for p in files) == ["m_metrics.json", "m_run.sw.trec", "m_run.te.trec", "m_run.yo.trec"]
    for language in LANGUAGES:
        topics = evaluation_set.languages[language]
        qrels = data.read_qrels(data_root / "miracl" / data.qrels_filename(language))  # the real file
        qrels = {t: qrels[t] for t in topics.topics}
        run = ir.read_run(tmp_path / f"m_run.{language}.trec")
        assert set(run) == set(topics.topics) and all(len(hits) == 100 for hits in run.values())
        reference = trec_eval(run, qrels)
        mean = {m: np.mean([reference[t][m] for t in reference]) for m in ("ndcg_cut_10", "recall_100")}
        values = result.per_language["mono"][language]
        assert values["ndcg_at_10"] == pytest.approx(mean["ndcg_cut_10"], abs=1e-12)
        assert values["recall_at_100"] == pytest.approx(mean["recall_100"], abs=1e-12)
        assert_matches_trec_eval(result.per_topic[language], run, qrels)
        assert result.counts[language]["judged_missing"] == 0
    summary = result.summary["mono"]
    for metric in SUMMARY_METRICS["mono"]:
        assert summary[metric] == pytest.approx(np.mean([result.per_language["mono"][x][metric] for x in LANGUAGES]))
    # The synthetic relevant passages repeat their query: even a random small model finds many of them.
    assert 0.2 < summary["ndcg_at_10"] < 1.0 and summary["recall_at_100"] > 0.8
    saved = json.loads((tmp_path / "m_metrics.json").read_text())
    assert saved["summary"] == result.summary and set(saved["per_topic"]) == set(LANGUAGES)
    flat = result.flat("val/miracl/")
    assert flat["val/miracl/mono/te/mrr_at_10"] == result.per_language["mono"]["te"]["mrr_at_10"]
    assert len(flat) == 3 + 3 * 3 and "macro" in result.table() and "nDCG@10" in result.table()


def test_evaluation_does_not_inflate_ndcg_with_judged_only_scoring(evaluated: tuple[MiraclSet, Any]) -> None:
    """The synthetic corpus has unjudged passages that repeat queries; the tiny model ranks them high. Dropping
    them from the run (scoring judged passages only) would raise nDCG@10: the set's figure is the honest one."""
    evaluation_set, result = evaluated
    for language in LANGUAGES:
        qrels = evaluation_set.languages[language].qrels
        run = result.runs[language]
        unjudged_in_top10 = sum(1 for t, hits in run.items() for d in ir.ranked_docids(hits)[:10] if d not in qrels[t])
        assert unjudged_in_top10 > 0
        judged_only = {t: {d: s for d, s in hits.items() if d in qrels[t]} for t, hits in run.items()}
        inflated = ir.mean_metrics(ir.evaluate_run(judged_only, qrels))["ndcg_at_10"]
        assert inflated > result.per_language["mono"][language]["ndcg_at_10"] + 0.01


def test_corpus_cap_and_kept_embeddings(tiny_encoder: Any, corpus_root: Path, evaluated: tuple[MiraclSet, Any],
                                        tmp_path: Path) -> None:
    """max_corpus_passages keeps judged passages + N others; embeddings_dir keeps embeddings and index for the
    next run of the same model (nothing re-encoded), and refuses another model's."""
    full = evaluated[1]
    cfg = dataset_config(languages=["yo"], corpus_root=str(corpus_root), max_topics_per_language=25,
                         max_corpus_passages=20, progress=False, embeddings_dir=str(tmp_path / "emb"))
    capped_set = load_set("miracl", cfg)
    capped = capped_set.evaluate(tiny_encoder, batch_size=32, num_threads=1)
    judged = capped_set.languages["yo"].judged_docids()
    assert capped.counts["yo"]["passages"] == len(judged) + 20 < full.counts["yo"]["passages"]
    assert "judged + 20 other passages" in capped_set.describe()
    # Fewer distractors: the capped corpus is easier (numbers comparable only between equal caps).
    assert capped.per_language["mono"]["yo"]["ndcg_at_10"] >= full.per_language["mono"]["yo"]["ndcg_at_10"]
    folder = tmp_path / "emb" / "yo"
    index_dirs = [p for p in folder.iterdir() if p.name.startswith("index-")]
    assert len(index_dirs) == 1 and json.loads((folder / "manifest.json").read_text())["complete"]
    stamps = {p.name: p.stat().st_mtime_ns for p in [*folder.iterdir(), *index_dirs[0].iterdir()]}
    again = load_set("miracl", cfg).evaluate(tiny_encoder, batch_size=32, num_threads=1)
    assert again.per_topic == capped.per_topic
    assert {p.name: p.stat().st_mtime_ns for p in [*folder.iterdir(), *index_dirs[0].iterdir()]} == stamps
    other = type(tiny_encoder)(tiny_encoder.backbone, tiny_encoder.tokenizer, name="other",
                               max_query_length=64, max_passage_length=256)
    with pytest.raises(CorpusEncodingError, match=r"dataset\.embeddings_dir \(yo\)=.* holds embeddings of another "
                                                  r"config \(model 'tiny'"):
        load_set("miracl", cfg).evaluate(other, batch_size=32, num_threads=1)


@pytest.mark.slow
def test_approximate_index_by_config(tiny_encoder: Any, corpus_root: Path, evaluated: tuple[MiraclSet, Any]) -> None:
    """dataset.index: IVF-PQ in several parts, re-scoring more candidates than a part holds, must give exactly the
    flat index's run (the plumbing of training, sharding, merging and re-scoring loses nothing); without
    re-scoring, 12-byte codes change the ranking."""
    spec = {"type": "ivfpq", "nlist": 4, "m": 16, "nbits": 6, "shard_size": 300}
    flat = evaluated[1]
    results = {}
    for rerank in (0, 1000):
        cfg = dataset_config(languages=["sw"], corpus_root=str(corpus_root), max_topics_per_language=25,
                             progress=False, index={**spec, "rerank": rerank})
        results[rerank] = load_set("miracl", cfg).evaluate(tiny_encoder, batch_size=32, num_threads=1)
    for topic, values in flat.per_topic["sw"].items():
        assert results[1000].per_topic["sw"][topic] == pytest.approx(values, abs=1e-9)
    assert results[0].runs["sw"] != flat.runs["sw"]


# ------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_evaluate_cli_prints_and_logs_per_language_metrics(corpus_root: Path, data_root: Path,
                                                           tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HYBRID_RETRIEVAL_PROGRESS_EVERY_S": "0.0001"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_retrieval.evaluate", "model=tiny", "dataset=miracl",
         "dataset.languages=[sw,te,yo]", f"dataset.corpus_root={corpus_root}", "dataset.max_topics_per_language=25",
         f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MIRACL dev (sw, te, yo: 75 topics" in proc.stdout and "macro" in proc.stdout
    assert "texts/s" in proc.stdout + proc.stderr  # the corpus progress line (a bar on a terminal)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["per_language"]["mono"]) == set(LANGUAGES)
    assert (tmp_path / "run" / "run.te.trec").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    logged = runs[0].data.metrics
    for language in LANGUAGES:
        for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
            assert logged[f"val/miracl/mono/{language}/{metric}"] == pytest.approx(
                metrics["per_language"]["mono"][language][metric])
    assert logged["val/mono/ndcg_at_10"] == pytest.approx(metrics["summary"]["mono"]["ndcg_at_10"])
