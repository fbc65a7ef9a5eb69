"""Tatoeba: the loader on the real LASER files, and the bitext metrics against independent computations."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score

from hybrid_retrieval.data.sources import DataNotFoundError
from hybrid_retrieval.data.tatoeba import (LANGUAGES, LOW_RESOURCE, PAIR_COUNTS, TatoebaFormatError,
                                           check_tatoeba_options, load_tatoeba)
from hybrid_retrieval.evaluation.tatoeba import evaluate_pair, evaluate_tatoeba_embeddings, evaluate_tatoeba_encoder
from hybrid_retrieval.schemas import load_node

CONF = Path(__file__).resolve().parents[1] / "conf"


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------------------------------- loader


def test_loader_reads_all_112_languages_with_their_counts(data_root: Path) -> None:
    split = load_tatoeba(root=data_root)
    assert len(split.languages) == 112 == len(LANGUAGES)
    assert {x: len(p) for x, p in split.pairs.items()} == PAIR_COUNTS
    assert len(split.pairs["tha"]) == 548 and len(split.pairs["deu"]) == 1000 and len(split.pairs["tzl"]) == 104
    assert len(split) == 88877  # `cat tatoeba.*-eng.eng | wc -l`
    assert split.low_resource == list(LOW_RESOURCE)
    # Line i of one side is line i of the file, and translates line i of the other side.
    folder = data_root / "tatoeba"
    for language in ("deu", "amh", "cmn"):
        pair = split.pairs[language]
        assert list(pair.sentences) == read_lines(folder / f"tatoeba.{language}-eng.{language}")
        assert list(pair.english) == read_lines(folder / f"tatoeba.{language}-eng.eng")
    assert split.pairs["deu"].english[0] == "Mary said she didn't know where Tom was."


def test_the_configured_low_resource_list_exists_in_the_files(data_root: Path) -> None:

    cfg = load_node(CONF / "dataset" / "tatoeba.yaml")
    assert tuple(cfg.low_resource) == LOW_RESOURCE
    for language in LOW_RESOURCE:
        assert (data_root / "tatoeba" / f"tatoeba.{language}-eng.{language}").is_file()


def test_languages_order_cap_and_low_resource_subset(data_root: Path) -> None:
    split = load_tatoeba(languages=["tha", "amh", "deu", "kab"], max_pairs_per_language=200)
    assert split.languages == ["tha", "amh", "deu", "kab"]
    assert {x: len(p) for x, p in split.pairs.items()} == {"tha": 200, "amh": 168, "deu": 200, "kab": 200}
    full = load_tatoeba(languages=["deu"])
    assert split.pairs["deu"].sentences == full.pairs["deu"].sentences[:200]
    assert split.pairs["deu"].english == full.pairs["deu"].english[:200]
    assert split.low_resource == ["amh", "kab"]  # the configured subset, restricted to the selected languages
    assert load_tatoeba(languages=["deu"], low_resource=["deu"]).low_resource == ["deu"]
    assert load_tatoeba(languages=["deu"], low_resource=None).low_resource == []


def test_bad_options_name_the_option_and_list_valid_codes() -> None:
    with pytest.raises(ValueError, match=r"dataset\.languages: unknown Tatoeba language code\(s\) \['xx'\]") as error:
        check_tatoeba_options(["deu", "xx"])
    assert "'zsm'" in str(error.value) and "112" in str(error.value)
    with pytest.raises(ValueError, match=r"dataset\.low_resource: unknown .*\['de'\]"):
        check_tatoeba_options(None, ["de"])
    with pytest.raises(ValueError, match="given more than once"):
        check_tatoeba_options(["deu", "deu"])
    with pytest.raises(ValueError, match="empty"):
        check_tatoeba_options([])
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="max_pairs_per_language"):
            check_tatoeba_options(None, None, bad)


def test_missing_folder_says_where_to_put_the_laser_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataNotFoundError, match="not a directory"):
        load_tatoeba(root=tmp_path / "nowhere", languages=["deu"])
    with pytest.raises(DataNotFoundError, match="holds no tatoeba/ folder") as error:
        load_tatoeba(root=tmp_path, languages=["deu"])
    assert "facebookresearch/LASER" in str(error.value)
    # Nothing under $HYBRID_RETRIEVAL_DATA nor in the cache: never downloaded, says where it looked.
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(tmp_path))
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="never downloaded") as error:
        load_tatoeba(languages=["deu"])
    message = str(error.value)
    assert str(tmp_path / "cache" / "data" / "tatoeba") in message and "HYBRID_RETRIEVAL_DATA" in message


def test_incomplete_or_edited_copies_are_refused(tmp_path: Path, data_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tatoeba"
    folder.mkdir()
    for name in ("tatoeba.deu-eng.deu", "tatoeba.deu-eng.eng", "tatoeba.amh-eng.amh"):
        shutil.copy(data_root / "tatoeba" / name, folder / name)
    assert len(load_tatoeba(root=tmp_path, languages=["deu"]).pairs["deu"]) == 1000
    with pytest.raises(DataNotFoundError, match=r"missing tatoeba\.amh-eng\.eng"):
        load_tatoeba(root=tmp_path, languages=["deu", "amh"])
    # One side a line short: misaligned, always refused.
    english = read_lines(folder / "tatoeba.deu-eng.eng")
    (folder / "tatoeba.deu-eng.eng").write_text("\n".join(english[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(TatoebaFormatError, match="999"):
        load_tatoeba(root=folder, languages=["deu"])
    # Both sides cut equally: not LASER's release, refused unless verification is off.
    german = read_lines(folder / "tatoeba.deu-eng.deu")
    (folder / "tatoeba.deu-eng.deu").write_text("\n".join(german[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(TatoebaFormatError, match="expected 1000"):
        load_tatoeba(root=folder, languages=["deu"])
    monkeypatch.setenv("HYBRID_RETRIEVAL_VERIFY", "0")
    assert len(load_tatoeba(root=folder, languages=["deu"]).pairs["deu"]) == 999


# -------------------------------------------------------------------------------------------------- metrics


def trigram_presence(texts: list[str], vocabulary: dict[str, int]) -> np.ndarray:
    """0/1 vectors of character trigrams: inner products are small integers, exact in float32, with many ties."""
    out = np.zeros((len(texts), len(vocabulary)), dtype=np.float32)
    for i, text in enumerate(texts):
        padded = f" {text.lower()} "
        for k in range(len(padded) - 2):
            out[i, vocabulary[padded[k:k + 3]]] = 1.0
    return out


def trigram_embeddings(split) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    embeddings = {}
    for language, pair in split.pairs.items():
        texts = [*pair.sentences, *pair.english]
        vocabulary: dict[str, int] = {}
        for text in texts:
            padded = f" {text.lower()} "
            for k in range(len(padded) - 2):
                vocabulary.setdefault(padded[k:k + 3], len(vocabulary))
        embeddings[language] = (trigram_presence(list(pair.sentences), vocabulary),
                                trigram_presence(list(pair.english), vocabulary))
    return embeddings


def reference_direction(queries: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """One direction computed another way: scikit-learn AP, argmax for top-1, scikit-learn nDCG where untied."""
    scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
    n = len(scores)
    ap, hit, ndcg = [], [], []
    for i, row in enumerate(scores):
        truth = np.zeros(n, dtype=int)
        truth[i] = 1
        ap.append(average_precision_score(truth, row))
        best = np.flatnonzero(row == row.max())
        hit.append(float(int(np.argmax(row)) == i and len(best) == 1))  # a shared first place is a miss
        if np.count_nonzero(row == row[i]) == 1:
            ndcg.append(ndcg_score(truth[None, :], row[None, :], k=10))
        else:
            # scikit-learn averages the gain over a tie; the project's rule puts the gold last in its group.
            rank = int(np.count_nonzero(row >= row[i]))
            ndcg.append(1.0 / math.log2(1 + rank) if rank <= 10 else 0.0)
    return {"accuracy_at_1": float(np.mean(hit)), "map": float(np.mean(ap)), "ndcg_at_10": float(np.mean(ndcg))}


@pytest.mark.slow
def test_metrics_match_independent_computation_on_real_files(data_root: Path) -> None:
    split = load_tatoeba(languages=["deu", "tzl", "swg", "hsb", "amh"], max_pairs_per_language=300,
                         low_resource=["tzl", "amh", "kab"])
    embeddings = trigram_embeddings(split)
    result = evaluate_tatoeba_embeddings(embeddings, split.low_resource)
    expected = {language: {"xx_to_en": reference_direction(s, e), "en_to_xx": reference_direction(e, s)}
                for language, (s, e) in embeddings.items()}
    for language in split.languages:
        for direction in ("xx_to_en", "en_to_xx"):
            assert result.per_language[direction][language] == pytest.approx(expected[language][direction],
                                                                               abs=1e-12)
    # The data really exercises the tie rule: a gold line sharing first place, and amh's all-zero scores
    # (no trigram in common with English: every candidate ties, so the gold ranks last).
    s, e = embeddings["deu"]
    scores = s @ e.T
    gold = np.diag(scores)
    assert np.any((gold == scores.max(axis=1)) & ((scores == gold[:, None]).sum(axis=1) > 1))
    assert result.per_language["xx_to_en"]["deu"]["accuracy_at_1"] > 0.05
    assert result.per_language["xx_to_en"]["amh"] == pytest.approx(
        {"accuracy_at_1": 0.0, "map": 1 / 168, "ndcg_at_10": 0.0})
    # Macro averages over all languages and over the low-resource subset (kab is not selected).
    assert result.low_resource == ["tzl", "amh"]
    for direction in ("xx_to_en", "en_to_xx"):
        for metric in ("accuracy_at_1", "map", "ndcg_at_10"):
            values = {x: expected[x][direction][metric] for x in split.languages}
            assert result.summary[direction][metric] == pytest.approx(np.mean(list(values.values())))
            assert result.summary[f"low_resource/{direction}"][metric] == pytest.approx(
                (values["tzl"] + values["amh"]) / 2)
    for metric in ("accuracy_at_1", "map", "ndcg_at_10"):
        assert result.summary["both"][metric] == pytest.approx(
            np.mean([(expected[x]["xx_to_en"][metric] + expected[x]["en_to_xx"][metric]) / 2
                     for x in split.languages]))
    assert result.pairs == {"deu": 300, "tzl": 104, "swg": 112, "hsb": 300, "amh": 168}


def test_hand_worked_ties() -> None:
    source = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    english = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    # xx -> en scores: q0 [1, 1, 0] (gold ties with line 1: rank 2), q1 [0, 0, 1] (gold 0, three candidates
    # score >= 0: rank 3), q2 [0, 0, 1] (rank 1). en -> xx: e0 [1, 0, 0] rank 1, e1 [1, 0, 0] rank 3,
    # e2 [0, 1, 1] rank 2.
    ndcg = (1 / math.log2(3) + 1 / math.log2(4) + 1) / 3
    expected = {"accuracy_at_1": 1 / 3, "map": (1 / 2 + 1 / 3 + 1) / 3, "ndcg_at_10": ndcg}
    values = evaluate_pair(source, english)
    assert values["xx_to_en"] == pytest.approx(expected)
    assert values["en_to_xx"] == pytest.approx(expected)
    # A query scoring every candidate equally ranks its gold last: rank 12, so nDCG@10 = 0 and AP = 1/12.
    flat = np.zeros((12, 3), dtype=np.float32)
    varied = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    assert evaluate_pair(flat, varied)["xx_to_en"] == pytest.approx(
        {"accuracy_at_1": 0.0, "map": 1 / 12, "ndcg_at_10": 0.0})
    # Perfect retrieval.
    assert evaluate_pair(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))["en_to_xx"] == pytest.approx(
        {"accuracy_at_1": 1.0, "map": 1.0, "ndcg_at_10": 1.0})
    with pytest.raises(ValueError, match="same shape"):
        evaluate_pair(np.eye(3, dtype=np.float32), np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="language 'x'"):
        evaluate_tatoeba_embeddings({"x": (np.eye(3), np.eye(2))})


def test_result_names_json_and_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    embeddings = {x: (rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32))
                  for x in ("deu", "amh")}
    result = evaluate_tatoeba_embeddings(embeddings, low_resource=["amh"])
    flat = result.flat("val/tatoeba/")
    assert flat["val/tatoeba/xx_to_en/accuracy_at_1"] == result.summary["xx_to_en"]["accuracy_at_1"]
    assert flat["val/tatoeba/low_resource/both/map"] == result.summary["low_resource/both"]["map"]
    assert flat["val/tatoeba/en_to_xx/amh/ndcg_at_10"] == result.per_language["en_to_xx"]["amh"]["ndcg_at_10"]
    # 6 settings x 3 metrics + 2 directions x 2 languages x 3 metrics; MLflow's allowed characters only.
    assert len(flat) == 18 + 12
    assert all(re.fullmatch(r"[\w\-./ ]+", name) for name in flat)
    saved = json.loads(result.save_json(tmp_path / "tatoeba.json").read_text())
    assert saved["summary"] == result.summary and saved["low_resource"] == ["amh"]
    table = result.table()
    assert "low_resource/xx_to_en" in table and "amh*" in table and "deu " in table
    # No low-resource language selected: no low_resource settings.
    assert set(evaluate_tatoeba_embeddings(embeddings).summary) == {"xx_to_en", "en_to_xx", "both"}


def test_encoder_path_encodes_each_distinct_sentence_once_and_maps_rows_back(tiny_encoder, data_root: Path) -> None:
    split = load_tatoeba(languages=["fra", "kab"], max_pairs_per_language=300)
    result = evaluate_tatoeba_encoder(tiny_encoder, split)
    distinct = {t for p in split.pairs.values() for t in (*p.sentences, *p.english)}
    assert result.timings["texts"] == len(distinct) < 1200  # English sentences recur across pairs
    # The same numbers as encoding each side on its own (both sides as queries).
    direct = {x: (tiny_encoder.encode(list(p.sentences), kind="query"),
                  tiny_encoder.encode(list(p.english), kind="query")) for x, p in split.pairs.items()}
    expected = evaluate_tatoeba_embeddings(direct, split.low_resource)
    for direction in ("xx_to_en", "en_to_xx"):
        for language in split.languages:
            # Batches differ, so embeddings may differ in the last bits: allow one flipped near-tie.
            assert result.per_language[direction][language] == pytest.approx(
                expected.per_language[direction][language], abs=1 / 300 + 1e-9)
    assert result.low_resource == ["kab"] and result.timings["encode_s"] > 0
    passage = evaluate_tatoeba_encoder(tiny_encoder, split, kind="passage")
    assert passage.summary != result.summary  # the kind (prefix) is really used
