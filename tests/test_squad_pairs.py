"""SQuAD-format training pairs (from_squad): the real SQuAD-es / SQuAD-it files, the XQuAD drop, the sentence
splitter and the answer-sentence rules, and the train_data configs that use them."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_retrieval.data.lareqa import DataFormatError, read_language_file
from hybrid_retrieval.data.pairs import build_datasets
from hybrid_retrieval.data.sentences import sentence_spans, split_sentences
from hybrid_retrieval.data.sources import DataNotFoundError
from hybrid_retrieval.data.squad import from_squad, load_squad, read_squad_file, xquad_question_ids, xquad_text_matches

REPO_ROOT = Path(__file__).resolve().parents[1]
ES = "squad-es/dev-v1.1-es_small.json"
IT = "squad-it/SQuAD_it-test.json.gz"


@pytest.fixture()
def data_env(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(data_root))
    monkeypatch.setenv("HYBRID_RETRIEVAL_OFFLINE", "1")
    return data_root


# ---------------------------------------------------------------------------------------------------------------
# Real files: the counts of their SOURCE.md files


@pytest.mark.slow
def test_real_files_match_source_counts(data_env: Path) -> None:
    kept = load_squad({"es": ES, "it": IT}, drop_xquad=False)
    assert (len(kept["es"].paragraphs), len(kept["es"].questions)) == (1996, 6583)
    assert (len(kept["it"].paragraphs), len(kept["it"].questions) + len(kept["it"].unanswered)) == (2010, 7609)
    xquad = xquad_question_ids()
    assert len(xquad) == 1190
    assert sum(q.id in xquad for q in kept["es"].questions) == 732
    dropped = load_squad({"es": ES, "it": IT})
    es, it = dropped["es"], dropped["it"]
    assert not any(q.id in xquad for f in dropped.values() for q in f.questions)
    # squad-es/SOURCE.md: 230 paragraphs hold XQuAD ids (732 questions); the text rule drops 285 more
    # (docs/results/contamination/xquad_text_match.json), leaving 1481 paragraphs.
    assert (es.dropped_paragraphs - es.dropped_by_text, es.dropped_by_text, len(es.paragraphs)) == (230, 285, 1481)
    # squad-it: 212 paragraphs by id (778 questions) and 212 by text, 35 of them among the 165 with made-up ids;
    # one question ("d250") has only empty answers and is skipped.
    assert (it.dropped_paragraphs - it.dropped_by_text, it.dropped_by_text, len(it.paragraphs)) == (212, 212, 1586)
    assert it.unanswered == ("d250",)


@pytest.mark.slow
def test_xquad_paragraphs_with_made_up_ids_are_dropped_by_text(data_env: Path) -> None:
    # XQuAD's Amazon rainforest paragraph is in SQuAD-it under the made-up ids d286-d288 (no XQuAD id to match)
    kept = load_squad({"it": IT}, drop_xquad=False)["it"]
    amazon = [q for q in kept.questions if q.id in ("d286", "d287", "d288")]
    assert amazon and kept.paragraphs[amazon[0].paragraph].context.startswith("La foresta pluviale amazzonica")
    assert not any(q.id in ("d286", "d287", "d288") for q in load_squad({"it": IT})["it"].questions)


def test_text_rule_on_hand_made_paragraphs() -> None:
    xquad = (("The Amazon rainforest covers most of the Amazon basin of South America, 7,000,000 square km.",
              "Super Bowl 50 was an American football game to determine the champion of the NFL for 2015.",
              "Oxygen is a chemical element with symbol O and atomic number 8, a member of the chalcogen group."),
             ("La selva amazónica cubre la mayor parte de la cuenca del Amazonas de América del Sur, 7.000.000 km2.",
              "El Super Bowl 50 fue un partido de fútbol americano para determinar el campeón de la NFL en 2015.",
              "El oxígeno es un elemento químico de símbolo O y número atómico 8, del grupo de los calcógenos."))
    # another Spanish translation of the first paragraph; an Italian one of the second; an unrelated paragraph
    contexts = ["La selva amazónica cubre la mayor parte de la cuenca amazónica de Sudamérica, 7.000.000 km2.",
                "Il Super Bowl 50 è stata una partita di football americano per determinare il campione NFL del 2015.",
                "Warsaw is the capital and largest city of Poland, on the Vistula river."]
    assert xquad_text_matches(contexts, xquad).tolist() == [True, True, False]
    assert xquad_text_matches([], xquad).tolist() == [] and not xquad_text_matches(contexts, ()).any()


def test_from_squad_groups_translations_across_languages(data_env: Path) -> None:
    pairs = from_squad({"es": ES, "it": IT}, name="squad_mt")
    summary = pairs.summary()
    # XQuAD's paragraphs dropped by id and by text (test_real_files_match_source_counts)
    assert summary["rows"] == 4939 + 5973 and summary["languages"] == {"es": 4939, "it": 5973}
    # es and it share 3378 question ids once XQuAD's paragraphs are removed (4029 by ids alone: SOURCE.md).
    assert summary["groups_by_language_count"] == {1: 7534 - 3378, 2: 3378}
    assert pairs.n_groups == 7534 and pairs.language_names == ["es", "it"]
    for rows in pairs.rows_by_group()[:2000]:
        assert len(set(pairs.languages[rows].tolist())) == len(rows)  # one row per language in a group
    # A shared id's two rows are the Spanish and Italian versions of one question.
    es = {q.id: q for q in load_squad({"es": ES})["es"].questions}
    two = next(rows for rows in pairs.rows_by_group() if len(rows) == 2)
    assert [pairs.language_names[i] for i in pairs.languages[two]] == ["es", "it"]
    assert pairs.queries[two[0]] in {q.text for q in es.values()}


def test_answer_sentence_is_located_on_real_data(data_env: Path, data_root: Path) -> None:
    parsed = load_squad({"es": ES, "it": IT})
    rates = {lang: f.answer_in_sentence() for lang, f in parsed.items()}
    matches = {lang: f.summary()["matches"] for lang, f in parsed.items()}
    print(f"answer text inside the chosen sentence: {rates}; how located: {matches}")
    assert rates["es"] >= 0.999 and rates["it"] >= 0.999
    assert matches["es"]["exact"] == 4939  # TAR's small file keeps only aligned answers
    assert matches["it"]["in_sentence"] > 0 and matches["it"]["exact"] > 5900
    # Against human sentence annotations: XQuAD is SQuAD-format, XQuAD-R has its sentence breaks.
    same: dict[str, float] = {}
    for lang in ("en", "es", "de", "hi"):
        ours = read_squad_file(data_root / "xquad" / f"xquad.{lang}.json", lang)
        gold = read_language_file(data_root / "xquad-r" / f"{lang}.json", lang)
        gold_sentence = {q.id: gold.paragraphs[q.paragraph].sentences[q.sentence].strip() for q in gold.questions}
        same[lang] = np.mean([ours.paragraphs[q.paragraph].sentences[q.sentence] == gold_sentence[q.id]
                              for q in ours.questions])
    print(f"chosen sentence == XQuAD-R's gold sentence: {same}")
    assert same["en"] >= 0.97 and same["es"] >= 0.95 and same["de"] >= 0.93 and same["hi"] >= 0.96


def test_passage_options_and_hard_negatives(data_env: Path) -> None:
    plain = from_squad({"es": ES}, max_groups=50)
    wide = from_squad({"es": ES}, max_groups=50, passage_text="sentence_paragraph", hard_negative="same_paragraph")
    assert len(plain) == len(wide) == 50 and plain.hard_negatives is None
    parsed = load_squad({"es": ES})["es"]
    by_text = {q.text: q for q in parsed.questions}
    for i in range(50):
        q = by_text[wide.queries[i]]
        para = parsed.paragraphs[q.paragraph]
        assert plain.passages[i] == para.sentences[q.sentence]
        assert wide.passages[i] == f"{para.sentences[q.sentence]} {para.context}"
        neighbour = q.sentence + 1 if q.sentence + 1 < len(para.sentences) else q.sentence - 1
        expected = [] if neighbour < 0 else [f"{para.sentences[neighbour]} {para.context}"]
        assert wide.hard_negatives[i] == expected
    # max_groups keeps a kept id in every language.
    both = from_squad({"es": ES, "it": IT}, max_groups=300)
    assert both.n_groups == 300 and len(both) > 300


# ---------------------------------------------------------------------------------------------------------------
# XQuAD id lookup


def test_xquad_ids_lookup(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert xquad_question_ids(data_root) == xquad_question_ids(data_root / "xquad" / "xquad.en.json")
    # Without xquad/ under $HYBRID_RETRIEVAL_DATA, XQuAD-R's en.json (same ids, checksummed) serves.
    (tmp_path / "xquad-r").mkdir()
    (tmp_path / "xquad-r" / "en.json").symlink_to(data_root / "xquad-r" / "en.json")
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(tmp_path))
    monkeypatch.setenv("HYBRID_RETRIEVAL_OFFLINE", "1")
    assert xquad_question_ids() == xquad_question_ids(data_root)
    with pytest.raises(DataNotFoundError, match=r"xquad_root=.*nowhere.*drop_xquad=false"):
        xquad_question_ids(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# The answer rules on a small hand-made file


def squad_file(tmp_path: Path, qas: list[dict], context: str, name: str = "bad.json", gz: bool = False) -> Path:
    raw = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    path = tmp_path / name
    data = json.dumps(raw, ensure_ascii=False).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


CONTEXT = "Los Broncos ganaron el partido. El estadio está en Santa Clara. Costó 1.200 millones."


def qa(qid: str, *answers: tuple[str, int]) -> dict:
    return {"id": qid, "question": f"¿{qid}?", "answers": [{"text": t, "answer_start": s} for t, s in answers]}


def test_answer_rules(tmp_path: Path) -> None:
    santa = CONTEXT.index("Santa Clara")
    path = squad_file(tmp_path, [
        qa("exact", ("Santa Clara", santa)),
        qa("shifted", ("estadio", santa)),  # offset lands in the right sentence, on other words
        qa("moved", ("1.200 millones", 3)),  # offset in sentence 0; the text is in sentence 2
        qa("lost", ("Madrid", santa)),  # the text is nowhere: the offset decides
        qa("unaligned", ("", -1), ("Broncos", 4)),  # SQuAD-es's marker, then an aligned answer
        qa("none", ("", -1), ("", 0)),
    ], CONTEXT, gz=True)
    parsed = read_squad_file(path, "es")
    assert parsed.paragraphs[0].sentences == ("Los Broncos ganaron el partido.", "El estadio está en Santa Clara.",
                                              "Costó 1.200 millones.")
    got = {q.id: (q.match, q.sentence, q.answer_text) for q in parsed.questions}
    assert got == {"exact": ("exact", 1, "Santa Clara"), "shifted": ("in_sentence", 1, "estadio"),
                   "moved": ("relocated", 2, "1.200 millones"), "lost": ("offset_only", 1, "Madrid"),
                   "unaligned": ("exact", 0, "Broncos")}
    assert parsed.unanswered == ("none",)
    assert parsed.answer_in_sentence() == pytest.approx(4 / 5)


def test_answer_beyond_the_context_names_file_question_and_field(tmp_path: Path) -> None:
    path = squad_file(tmp_path, [qa("ok", ("Broncos", 4)), qa("q-out", ("Broncos", 4), ("x", len(CONTEXT) + 5))],
                      CONTEXT)
    with pytest.raises(DataFormatError) as error:
        read_squad_file(path, "es")
    message = str(error.value)
    assert str(path) in message and "'q-out'" in message
    assert "data[0].paragraphs[0].qas[1].answers[1].answer_start=" in message and "outside every sentence" in message


def test_bad_files_and_options(tmp_path: Path, data_env: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"files\.es='missing\.json'.*root="):
        from_squad({"es": "missing.json"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        from_squad({})
    with pytest.raises(ValueError, match="passage_text"):
        from_squad({"es": ES}, passage_text="paragraph")
    with pytest.raises(ValueError, match="hard_negative"):
        from_squad({"es": ES}, hard_negative="file")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json: not valid JSON"):
        from_squad({"es": str(broken)}, drop_xquad=False)
    no_context = squad_file(tmp_path, [qa("a", ("x", 0))], CONTEXT, name="no_context.json")
    raw = json.loads(no_context.read_text())
    del raw["data"][0]["paragraphs"][0]["context"]
    no_context.write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=r"data\[0\]\.paragraphs\[0\]\.context is missing"):
        read_squad_file(no_context, "es")
    # Relative paths are looked up under root when it is given.
    good = squad_file(tmp_path, [qa("a", ("Broncos", 4))], CONTEXT, name="good.json")
    assert len(from_squad({"es": good.name}, root=tmp_path, drop_xquad=False)) == 1


# ---------------------------------------------------------------------------------------------------------------
# Sentence splitting


@pytest.mark.parametrize(("language", "text", "expected"), [
    ("en", "Dr. Smith met J. K. Rowling in the U.S. last year. They talked.",
     ["Dr. Smith met J. K. Rowling in the U.S. last year.", "They talked."]),
    ("es", "Ganaron (EE. UU.) el título. ¿Quién marcó? Nadie... y luego sí.",
     ["Ganaron (EE. UU.) el título.", "¿Quién marcó?", "Nadie... y luego sí."]),
    ("it", "Il Sig. Rossi arrivò nel 1973. «Era tardi.» Poi partì.",
     ["Il Sig. Rossi arrivò nel 1973.", "«Era tardi.»", "Poi partì."]),
    ("de", "Tesla starb am 7. Januar 1943. Er war 86.", ["Tesla starb am 7. Januar 1943.", "Er war 86."]),
    ("zh", "华沙证券交易所成立于1817年。1991年重建。", ["华沙证券交易所成立于1817年。", "1991年重建。"]),
    ("hi", "यह एक वाक्य है। यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
    ("ar", "من فاز؟ فاز برونكو.", ["من فاز؟", "فاز برونكو."]),
    ("el", "Ποιος κέρδισε; Οι Μπρόνκος.", ["Ποιος κέρδισε;", "Οι Μπρόνκος."]),
    ("en", "Version 1.5 was released; it works.", ["Version 1.5 was released; it works."]),
])
def test_sentence_splitter(language: str, text: str, expected: list[str]) -> None:
    assert split_sentences(text, language) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab C.!?。। \n\"»")), max_size=60),
       st.sampled_from(["en", "es", "de", "zh", None]))
def test_sentence_spans_cover_the_text_without_gaps(text: str, language: str | None) -> None:
    spans = sentence_spans(text, language)
    assert "".join(text[s:e] for s, e in spans) == text
    assert all(s < e for s, e in spans) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(not text[s].isspace() for s, _ in spans[1:])  # every later sentence starts on a character


# ---------------------------------------------------------------------------------------------------------------
# Configs: train_data=squad_mt and the MLQA-R combination, with the hybrid sampler


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


@pytest.mark.slow
def test_train_data_configs_build_and_make_cross_lingual_batches(data_env: Path) -> None:
    from hybrid_retrieval.training.config import check_train_config
    from hybrid_retrieval.training.sampler import HybridBatchSampler

    cfg = compose(["train_data=squad_mt"])
    check_train_config(cfg)
    (squad,) = build_datasets(cfg.train_data)
    assert squad.name == "squad_mt" and len(squad) == 10912
    sampler = HybridBatchSampler([squad], batch_size=32, mono_ratio=0.0, seed=3)
    for batch in list(iter(sampler))[:20]:
        assert len({int(squad.groups[q]) for _, q, _ in batch}) == 32  # no group twice in a batch
        for _, q, p in batch:
            assert squad.groups[q] == squad.groups[p] and squad.languages[q] != squad.languages[p]

    both = build_datasets(compose(["train_data=mlqa_r_squad_mt"]).train_data)
    assert [d.name for d in both] == ["mlqa_r", "squad_mt"] and len(both[1]) == 10912
    sampler = HybridBatchSampler(both, batch_size=16, mono_ratio=0.5, seed=1)
    seen = {info for info in _batch_sources(sampler, 60)}
    assert {0, 1} <= {d for d, _ in seen} and {"mono", "cross"} <= {k for _, k in seen}


def _batch_sources(sampler, n: int):
    for i, _ in enumerate(sampler):
        if i == n:
            return
        yield sampler.last_batch_info.dataset, sampler.last_batch_info.kind


@pytest.mark.slow
def test_run_py_trains_on_squad_mt(tmp_path: Path, data_root: Path) -> None:
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    args = [sys.executable, "run.py", "train_data=squad_mt", "model=tiny", "train.batch_size=8",
            "trainer.limit_train_batches=3", "train_data.datasets.0.max_groups=200", "dataset.languages=[en,es]",
            "dataset.max_questions_per_language=20", "trainer.enable_progress_bar=false",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert "squad_mt" in proc.stdout + proc.stderr
