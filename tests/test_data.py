"""Tests for the data layer: locating/downloading LAReQA files, evaluation splits, training pairs."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from hybrid_retrieval.data import lareqa, sources
from hybrid_retrieval.data.jsonl_pairs import from_jsonl
from hybrid_retrieval.data.lareqa import DataFormatError, load_split
from hybrid_retrieval.data.lareqa_pairs import from_lareqa
from hybrid_retrieval.data.pairs import ParallelPairs, build_datasets
from hybrid_retrieval.data.sources import DataChecksumError, DataNotFoundError, resolve_dataset_dir
from hybrid_retrieval.schemas import load_node

CONF = Path(__file__).resolve().parents[1] / "conf"

# From each dataset's SOURCE.md (and the LAReQA README).
XQUAD_CANDIDATES = {
    "ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
    "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196,
}  # fmt: skip
MLQA_QUESTIONS = {"ar": 517, "de": 512, "en": 1148, "es": 500, "hi": 507, "vi": 511, "zh": 504}
MLQA_CANDIDATES = {"ar": 2545, "de": 2362, "en": 6264, "es": 1787, "hi": 2426, "vi": 2828, "zh": 2322}

ENV_VARS = (sources.DATA_ENV, sources.CACHE_ENV, sources.DATA_URL_ENV, sources.OFFLINE_ENV, sources.VERIFY_ENV)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data env vars; an empty cache under tmp_path. Returns the cache root."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv(sources.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def xquad(data_root: Path) -> lareqa.LareqaSplit:
    return load_split("xquad_r", data_root)


@pytest.fixture(scope="module")
def mlqa(data_root: Path) -> lareqa.LareqaSplit:
    return load_split("mlqa_r", data_root)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A localhost HTTP server over an empty folder; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------------------------------------
# sources.resolve_dataset_dir


def test_pinned_checksums_match_local_copies(data_root: Path) -> None:
    for source in sources.DATASETS.values():
        for language, digest in source.sha256.items():
            path = data_root / source.folder / source.filename(language)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_explicit_root_parent_or_dataset_folder(data_root: Path, clean_env: Path) -> None:
    assert resolve_dataset_dir("xquad_r", data_root) == data_root / "xquad-r"
    assert resolve_dataset_dir("mlqa_r", str(data_root / "mlqa-r")) == data_root / "mlqa-r"


def test_explicit_root_missing_file_is_an_error(tmp_path: Path, data_root: Path, clean_env: Path) -> None:
    partial = tmp_path / "partial" / "xquad-r"
    partial.mkdir(parents=True)
    shutil.copy(data_root / "xquad-r" / "en.json", partial / "en.json")
    # The requested languages are present: fine.
    assert resolve_dataset_dir("xquad_r", partial.parent, languages=["en"]) == partial
    with pytest.raises(DataNotFoundError) as info:
        resolve_dataset_dir("xquad_r", partial.parent)
    message = str(info.value)
    assert "ar.json" in message and "zh.json" in message and "en.json" not in message
    assert str(partial) in message and "dataset.root" in message
    # A root without the dataset never falls through to the cache or a download.
    with pytest.raises(DataNotFoundError, match="holds no xquad-r"):
        resolve_dataset_dir("xquad_r", tmp_path / "partial" / "..")
    with pytest.raises(DataNotFoundError, match="not a directory"):
        resolve_dataset_dir("xquad_r", tmp_path / "nowhere")


def test_local_files_must_match_pinned_checksums(tmp_path: Path, data_root: Path, clean_env: Path) -> None:
    # The other dataset's folder is recognised, not loaded as this one.
    with pytest.raises(DataChecksumError, match="it is xquad-r/ar.json, not mlqa-r/ar.json"):
        load_split("mlqa_r", data_root / "xquad-r")
    edited = tmp_path / "xquad-r"
    edited.mkdir()
    text = (data_root / "xquad-r" / "th.json").read_text(encoding="utf-8")
    (edited / "th.json").write_text(text.replace("?", "？", 1), encoding="utf-8")
    with pytest.raises(DataChecksumError, match="edited or corrupt") as info:
        resolve_dataset_dir("xquad_r", edited, languages=["th"])
    assert str(edited / "th.json") in str(info.value) and sources.VERIFY_ENV in str(info.value)
    assert resolve_dataset_dir("xquad_r", edited, languages=["th"], verify=False) == edited


def test_env_root_is_used_and_must_be_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path, clean_env: Path
) -> None:
    monkeypatch.setenv(sources.DATA_ENV, str(data_root))
    assert resolve_dataset_dir("mlqa_r") == data_root / "mlqa-r"
    partial = tmp_path / "env"
    (partial / "mlqa-r").mkdir(parents=True)
    shutil.copy(data_root / "mlqa-r" / "de.json", partial / "mlqa-r" / "de.json")
    monkeypatch.setenv(sources.DATA_ENV, str(partial))
    with pytest.raises(DataNotFoundError, match="missing ar.json, en.json"):
        resolve_dataset_dir("mlqa_r")


def test_unknown_dataset_or_language_lists_valid_ones(data_root: Path) -> None:
    with pytest.raises(ValueError, match=r"expected one of \['mlqa_r', 'xquad_r'\]"):
        resolve_dataset_dir("xquad", data_root)
    with pytest.raises(ValueError, match=r"valid languages: \['ar', 'de', 'en', 'es', 'hi', 'vi', 'zh'\]"):
        load_split("mlqa_r", data_root, languages=["en", "th"])
    with pytest.raises(ValueError, match="more than once"):
        load_split("mlqa_r", data_root, languages=["en", "en"])
    with pytest.raises(ValueError, match="positive int"):
        load_split("mlqa_r", data_root, max_questions_per_language=0)


def test_download_into_cache_with_checksums(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path, clean_env: Path, serve: tuple[Path, str]
) -> None:
    served, url = serve
    shutil.copytree(data_root / "xquad-r", served / "xquad-r")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(sources.DATA_ENV, str(empty))  # set, but without xquad-r/: falls through
    monkeypatch.setenv(sources.DATA_URL_ENV, url)

    folder = resolve_dataset_dir("xquad_r", languages=["en", "de"])
    assert folder == clean_env / "data" / "xquad-r"
    assert sorted(p.name for p in folder.iterdir()) == ["de.json", "en.json"]  # no temporary files left
    for name in ("en.json", "de.json"):
        assert (folder / name).read_bytes() == (data_root / "xquad-r" / name).read_bytes()

    # Cached now: works with the origin gone.
    monkeypatch.setenv(sources.DATA_URL_ENV, _closed_port_url())
    split = load_split("xquad_r", languages=["en", "de"])
    assert len(split.queries) == 2 * 1190
    assert len(split.candidates) == XQUAD_CANDIDATES["en"] + XQUAD_CANDIDATES["de"]


def test_download_checksum_mismatch_saves_nothing(
    monkeypatch: pytest.MonkeyPatch, data_root: Path, clean_env: Path, serve: tuple[Path, str]
) -> None:
    served, url = serve
    (served / "mlqa-r").mkdir()
    corrupt = (data_root / "mlqa-r" / "es.json").read_bytes().replace(b'"question"', b'"questlon"', 1)
    (served / "mlqa-r" / "es.json").write_bytes(corrupt)
    with pytest.raises(DataChecksumError, match="checksum mismatch") as info:
        resolve_dataset_dir("mlqa_r", languages=["es"], base_url=url)
    assert sources.DATASETS["mlqa_r"].sha256["es"] in str(info.value)
    cache = clean_env / "data" / "mlqa-r"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_nothing_found_names_files_places_and_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(sources.DATA_ENV, str(empty))
    monkeypatch.setenv(sources.DATA_URL_ENV, _closed_port_url())
    with pytest.raises(DataNotFoundError) as info:
        resolve_dataset_dir("mlqa_r", timeout=5)
    message = str(info.value)
    for expected in ("ar.json", "zh.json", str(empty), str(clean_env / "data" / "mlqa-r"),
                     "download failed", "dataset.root=", sources.DATA_ENV):  # fmt: skip
        assert expected in message, expected

    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DataNotFoundError, match="download \\(disabled"):
        resolve_dataset_dir("mlqa_r")


# --------------------------------------------------------------------------------------------------------
# lareqa.load_split


def test_xquad_r_counts(xquad: lareqa.LareqaSplit) -> None:
    assert xquad.languages == sorted(XQUAD_CANDIDATES)
    assert len(xquad.queries) == 13_090
    assert len(xquad.candidates) == 13_014
    assert Counter(c.language for c in xquad.candidates) == XQUAD_CANDIDATES
    assert Counter(q.language for q in xquad.queries) == dict.fromkeys(XQUAD_CANDIDATES, 1190)
    assert len({q.id for q in xquad.queries}) == 13_090 and len({c.id for c in xquad.candidates}) == 13_014
    assert len({q.group for q in xquad.queries}) == 1190
    cand_lang = xquad.candidate_language_ids()
    for rel in xquad.relevant:
        assert rel.dtype == np.int64 and len(rel) == 11
        assert np.all(np.diff(rel) > 0)
        assert sorted(cand_lang[rel].tolist()) == list(range(11))  # one per language


def test_mlqa_r_counts(mlqa: lareqa.LareqaSplit) -> None:
    assert len(mlqa.queries) == 4_199
    assert len(mlqa.candidates) == 20_534
    assert Counter(c.language for c in mlqa.candidates) == MLQA_CANDIDATES
    assert Counter(q.language for q in mlqa.queries) == MLQA_QUESTIONS
    languages_of = {}
    for q in mlqa.queries:
        languages_of.setdefault(q.group, set()).add(q.language)
    assert len(languages_of) == 1148
    cand_lang = np.array(mlqa.languages)[mlqa.candidate_language_ids()]
    for q, rel in zip(mlqa.queries, mlqa.relevant, strict=True):
        assert 2 <= len(rel) <= 4
        # One relevant sentence in each language where the question id exists, and nowhere else.
        assert sorted(cand_lang[rel].tolist()) == sorted(languages_of[q.group])


def test_relevant_sentence_holds_answer_start(data_root: Path, xquad: lareqa.LareqaSplit,
                                              mlqa: lareqa.LareqaSplit) -> None:  # fmt: skip
    """LAReQA rule, checked against the raw JSON; and how often the answer text is not inside that sentence."""
    lacking = {}
    for split in (xquad, mlqa):
        folder = data_root / sources.DATASETS[split.name].folder
        by_id = {c.id: i for i, c in enumerate(split.candidates)}
        gold_index = {}
        for language in split.languages:
            raw = json.loads((folder / f"{language}.json").read_text(encoding="utf-8"))
            paragraphs = [p for article in raw["data"] for p in article["paragraphs"]]
            for p_index, para in enumerate(paragraphs):
                for qa in para["qas"]:
                    start = qa["answers"][0]["answer_start"]
                    holding = [s for s, (lo, hi) in enumerate(para["sentence_breaks"]) if lo <= start < hi]
                    assert len(holding) == 1
                    gold_index[(qa["id"], language)] = by_id[f"{language}/{p_index}/{holding[0]}"]
                    if qa["answers"][0]["text"] not in para["sentences"][holding[0]]:
                        lacking[split.name] = lacking.get(split.name, 0) + 1
        for q, rel in zip(split.queries, split.relevant, strict=True):
            expected = sorted(gold_index[(q.group, lang)] for lang in split.languages if (q.group, lang) in gold_index)
            assert rel.tolist() == expected
    # Answers that run past the end of the sentence they start in (the sentence breaks are data; the files
    # are pinned by checksum, so these counts are exact).
    assert lacking == {"xquad_r": 113, "mlqa_r": 25}


def test_parallel_cap_xquad(data_root: Path) -> None:
    split = load_split("xquad_r", data_root, max_questions_per_language=40)
    assert Counter(q.language for q in split.queries) == dict.fromkeys(XQUAD_CANDIDATES, 40)
    groups = {lang: {q.group for q in split.queries if q.language == lang} for lang in split.languages}
    assert all(g == groups["en"] for g in groups.values())
    assert all(len(rel) == 11 for rel in split.relevant)
    again = load_split("xquad_r", data_root, max_questions_per_language=40)
    assert [q.id for q in again.queries] == [q.id for q in split.queries]


def test_parallel_cap_mlqa(data_root: Path, mlqa: lareqa.LareqaSplit) -> None:
    cap = 60
    split = load_split("mlqa_r", data_root, languages=["de", "es", "zh", "ar"], max_questions_per_language=cap)
    counts = Counter(q.language for q in split.queries)
    assert max(counts.values()) == cap and set(counts) == {"de", "es", "zh", "ar"}
    full_languages: dict[str, set[str]] = {}
    for q in mlqa.queries:
        if q.language in split.languages:
            full_languages.setdefault(q.group, set()).add(q.language)
    kept: dict[str, set[str]] = {}
    for q in split.queries:
        kept.setdefault(q.group, set()).add(q.language)
    # A kept id is kept in every selected language that has it.
    assert all(kept[g] == full_languages[g] for g in kept)
    # Pool = sentences of the paragraphs holding a kept question; every relevant sentence is in it.
    cand_paragraphs = {c.id.rsplit("/", 1)[0] for c in split.candidates}
    gold_paragraphs = {split.candidates[i].id.rsplit("/", 1)[0] for rel in split.relevant for i in rel}
    assert cand_paragraphs == gold_paragraphs
    assert len(split.candidates) < sum(MLQA_CANDIDATES[lang] for lang in split.languages)


def test_language_subset_order_and_relevance(data_root: Path) -> None:
    split = load_split("xquad_r", data_root, languages=["zh", "en"])
    assert split.languages == ["zh", "en"]
    assert [q.language for q in split.queries] == ["zh"] * 1190 + ["en"] * 1190
    assert len(split.candidates) == 1196 + 1180
    assert split.candidates[0].language == "zh" and split.candidates[-1].language == "en"
    assert all(len(rel) == 2 for rel in split.relevant)
    assert split.query_language_ids().tolist() == [0] * 1190 + [1] * 1190

    mlqa = load_split("mlqa_r", data_root, languages="de")  # a single name is one language
    assert mlqa.languages == ["de"] and len(mlqa.queries) == 512 and len(mlqa.candidates) == 2362
    pair = load_split("mlqa_r", data_root, languages=["de", "es"])
    assert Counter(len(rel) for rel in pair.relevant) == {1: 512 + 500 - 2 * 196, 2: 2 * 196}


def test_passage_text_option(xquad: lareqa.LareqaSplit) -> None:
    sentences = xquad.candidate_texts()
    with_context = xquad.candidate_texts("sentence_paragraph")
    c = xquad.candidates[5]
    assert sentences[5] == c.sentence
    assert with_context[5] == f"{c.sentence} {c.paragraph}"
    assert c.sentence in c.paragraph
    assert xquad.query_texts()[0] == xquad.queries[0].text
    with pytest.raises(ValueError, match="sentence_paragraph"):
        xquad.candidate_texts("paragraph")


def test_dataset_configs_drive_load_split(data_root: Path) -> None:
    for name in ("xquad_r", "mlqa_r"):
        cfg = load_node(CONF / "dataset" / f"{name}.yaml")
        assert set(cfg) == {"name", "root", "languages", "max_questions_per_language", "passage_text"}
        assert cfg.name == name and cfg.root is None
        split = load_split(cfg.name, data_root, cfg.languages, cfg.max_questions_per_language)
        assert len(split.candidate_texts(cfg.passage_text)) == len(split.candidates)


def test_malformed_file_errors_name_file_and_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path
) -> None:
    monkeypatch.setenv(sources.VERIFY_ENV, "0")  # edited copies on purpose

    def original() -> dict:
        return json.loads((data_root / "xquad-r" / "en.json").read_text(encoding="utf-8"))

    folder = tmp_path / "xquad-r"
    folder.mkdir()
    path = folder / "en.json"

    raw = original()
    raw["data"][0]["paragraphs"][1]["qas"][2]["answers"][0]["answer_start"] = "12"
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_split("xquad_r", tmp_path, languages=["en"])
    assert str(path) in str(info.value)
    assert "data[0].paragraphs[1].qas[2].answers[0].answer_start" in str(info.value)

    raw = original()
    raw["data"][0]["paragraphs"][1]["qas"][2]["answers"][0]["answer_start"] = 10**6
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataFormatError, match="lies in 0 sentence spans"):
        load_split("xquad_r", tmp_path, languages=["en"])

    raw = original()
    del raw["data"][3]["paragraphs"][0]["sentence_breaks"]
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"data\[3\]\.paragraphs\[0\]\.sentence_breaks is missing"):
        load_split("xquad_r", tmp_path, languages=["en"])

    path.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_split("xquad_r", tmp_path, languages=["en"])


def test_repeated_load_reuses_parsed_files(data_root: Path) -> None:
    # Speed itself is measured outside the tests (about 0.6 s cold, 0.2 s warm on 2 cores); here: the cache works.
    lareqa._read_cached.cache_clear()
    first = load_split("xquad_r", data_root)
    misses = lareqa._read_cached.cache_info().misses
    second = load_split("xquad_r", data_root)
    assert lareqa._read_cached.cache_info().misses == misses
    assert lareqa._read_cached.cache_info().hits >= len(first.languages)
    assert [q.id for q in first.queries] == [q.id for q in second.queries]


# --------------------------------------------------------------------------------------------------------
# pairs


def test_from_lareqa_mlqa(data_root: Path, mlqa: lareqa.LareqaSplit) -> None:
    pairs = from_lareqa("mlqa_r", data_root)
    assert len(pairs) == 4_199 and pairs.n_groups == 1148
    summary = pairs.summary()
    assert summary["languages"] == MLQA_QUESTIONS
    assert summary["groups_by_language_count"] == {2: 65, 3: 263, 4: 820}
    assert pairs.hard_negatives is None and summary["hard_negatives"] == 0
    # Same rows as the evaluation split: query text, and passage = the relevant sentence in the same language.
    assert pairs.queries == mlqa.query_texts()
    languages = np.array(mlqa.languages)[mlqa.candidate_language_ids()]
    for row in range(0, len(pairs), 97):
        query = mlqa.queries[row]
        own = [i for i in mlqa.relevant[row] if languages[i] == query.language]
        assert pairs.passages[row] == mlqa.candidates[own[0]].sentence
        assert pairs.language_names[pairs.languages[row]] == query.language
    # Rows of one group share the question id.
    group_of_row = [q.group for q in mlqa.queries]
    for rows in pairs.rows_by_group()[:50]:
        assert len({group_of_row[r] for r in rows}) == 1 and 2 <= len(rows) <= 4


def test_from_lareqa_options(data_root: Path) -> None:
    pairs = from_lareqa("mlqa_r", data_root, languages=["en", "de"], passage_text="sentence_paragraph",
                        max_groups=100, hard_negative="same_paragraph")  # fmt: skip
    assert pairs.n_groups == 100 and pairs.language_names == ["en", "de"]
    assert Counter(pairs.languages.tolist())[0] == 100  # every MLQA-R id exists in English
    sentences = from_lareqa("mlqa_r", data_root, languages=["en", "de"], max_groups=100)
    assert sentences.queries == pairs.queries
    for sentence, passage, negative in zip(sentences.passages, pairs.passages, pairs.hard_negatives, strict=True):
        context = passage[len(sentence) + 1 :]
        assert passage.startswith(sentence + " ") and sentence in context
        assert len(negative) <= 1
        if negative:
            assert negative[0] != passage and negative[0].endswith(" " + context)
    with pytest.raises(ValueError, match="passage_text"):
        from_lareqa("mlqa_r", data_root, passage_text="paragraph")


def test_train_data_configs_instantiate(data_root: Path, tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF / "train_data" / "mlqa_r.yaml")
    cfg.datasets[0].root = str(data_root)
    datasets = build_datasets(cfg)
    assert len(datasets) == 1 and isinstance(datasets[0], ParallelPairs) and len(datasets[0]) == 4_199
    cfg = OmegaConf.load(CONF / "train_data" / "xquad_r.yaml")
    cfg.datasets[0].root = str(data_root)
    cfg.datasets[0].max_groups = 10
    assert len(build_datasets(cfg.datasets)[0]) == 110

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"group": "a", "language": "en", "query": "q", "passage": "p"}\n', encoding="utf-8")
    root = OmegaConf.create({"train_data": OmegaConf.load(CONF / "train_data" / "jsonl.yaml")})
    with pytest.raises(ValueError, match="train_data.path=/path/to/file.jsonl"):
        build_datasets(root.train_data)
    root.train_data.path = str(path)
    assert build_datasets(root.train_data)[0].name == "pairs"
    with pytest.raises(ValueError, match="expected ParallelPairs"):
        build_datasets([{"_target_": "builtins.dict", "a": 1}])


def test_from_jsonl_good(tmp_path: Path) -> None:
    rows = [
        {"group": "g1", "language": "en", "query": "Who?", "passage": "Ann did.", "hard_negative": "Bob ran."},
        {"group": "g1", "language": "de", "query": "Wer?", "passage": "Ann war es."},
        {"group": "g2", "language": "de", "query": "Wo?", "passage": "In Bonn.", "hard_negative": None},
        {"group": "g2", "language": "fr", "query": "Où?", "passage": "À Bonn."},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    pairs = from_jsonl(path)
    assert pairs.name == "train" and len(pairs) == 4
    assert pairs.groups.tolist() == [0, 0, 1, 1] and pairs.groups.dtype == np.int32
    assert pairs.language_names == ["en", "de", "fr"] and pairs.languages.tolist() == [0, 1, 1, 2]
    assert pairs.queries[3] == "Où?" and pairs.passages[1] == "Ann war es."
    assert pairs.hard_negatives == [["Bob ran."], [], [], []]
    assert pairs.summary() == {
        "name": "train", "rows": 4, "groups": 2, "languages": {"en": 1, "de": 2, "fr": 1},
        "groups_by_language_count": {2: 2}, "hard_negatives": 1,
    }  # fmt: skip
    without = tmp_path / "plain.jsonl"
    without.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert from_jsonl(without, name="x").hard_negatives is None
    # The dataset's hard_negative option is the one switch: null ignores the file's hard negatives.
    assert from_jsonl(path, hard_negative=None).hard_negatives is None
    with pytest.raises(ValueError, match="hard_negative must be one of"):
        from_jsonl(path, hard_negative="same_paragraph")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"group": "g", "language": "en", "query": "q"', "not valid JSON"),
        ('["g", "en", "q", "p"]', "expected a JSON object"),
        ('{"group": "g", "language": "en", "query": "q"}', "field 'passage' is missing"),
        ('{"group": "g", "language": "en", "query": 3, "passage": "p"}', "field 'query' must be a non-empty string"),
        ('{"group": "g", "language": " ", "query": "q", "passage": "p"}', "field 'language' must be a non-empty"),
        ('{"group": "g", "language": "en", "query": "q", "passage": "p", "hard_negativs": ["n"]}',
         r"unknown field\(s\) \['hard_negativs'\]"),
        ('{"group": "g", "language": "en", "query": "q", "passage": "p", "hard_negatives": "n"}',
         "field 'hard_negatives' must be a list of non-empty strings"),
        ('{"group": "g", "language": "en", "query": "q", "passage": "p", "hard_negatives": ["n", " "]}',
         "field 'hard_negatives' must be a list of non-empty strings"),
        ('{"group": "g", "language": "en", "query": "q", "passage": "p", "hard_negative": 1}', "'hard_negative'"),
    ],
)  # fmt: skip
def test_from_jsonl_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"group": "g0", "language": "en", "query": "q", "passage": "p"}'
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        from_jsonl(path)
    assert f"{path}:3" in str(info.value)


def test_from_jsonl_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        from_jsonl(empty)


def test_parallel_pairs_validate() -> None:
    ok = ParallelPairs("t", [0, 0, 1], [0, 1, 0], ["en", "de"], ["a", "b", "c"], ["x", "y", "z"], None)
    assert ok.n_groups == 2 and [r.tolist() for r in ok.rows_by_group()] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="passages has 2 rows, expected 3"):
        ParallelPairs("t", [0, 0, 1], [0, 1, 0], ["en", "de"], ["a", "b", "c"], ["x", "y"], None)
    with pytest.raises(ValueError, match="languages must index language_names"):
        ParallelPairs("t", [0, 0, 1], [0, 2, 0], ["en", "de"], ["a", "b", "c"], ["x", "y", "z"], None)
    with pytest.raises(ValueError, match="none unused"):
        ParallelPairs("t", [0, 0, 2], [0, 1, 0], ["en", "de"], ["a", "b", "c"], ["x", "y", "z"], None)
    with pytest.raises(ValueError, match="hard_negatives has 1 rows"):
        ParallelPairs("t", [0, 0, 1], [0, 1, 0], ["en", "de"], ["a", "b", "c"], ["x", "y", "z"], ["n"])


def test_json_objects_numbers_lines_skips_blanks_and_names_the_bad_line() -> None:
    from hybrid_retrieval.data.jsonl import json_objects

    class BadInput(ValueError):
        pass

    lines = ['{"a": 1}', "", "   ", '{"a": 2, "b": "x"}']
    got = list(json_objects(lines, lambda n: f"f.jsonl:{n}", BadInput))
    assert got == [(1, "f.jsonl:1", {"a": 1}), (4, "f.jsonl:4", {"a": 2, "b": "x"})]

    expected = r"^f\.jsonl:2: not valid JSON \(.* at column 8\); expected JSONL: a JSON object per line$"
    with pytest.raises(BadInput, match=expected):
        list(json_objects(['{"a": 1}', '{"a": 1'], lambda n: f"f.jsonl:{n}", BadInput))
    with pytest.raises(BadInput, match=r"^f\.jsonl:1: expected a JSON object with a, got a list$"):
        list(json_objects(["[1, 2]"], lambda n: f"f.jsonl:{n}", BadInput, "a JSON object with a"))


def test_every_target_in_conf_resolves_and_an_old_target_is_upgraded() -> None:
    """The readers live in their own modules, which conf/train_data names; a config an older version logged names
    ``hybrid_retrieval.data.pairs.<reader>``, which the upgrade step maps to the reader's module."""
    import re

    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from hybrid_retrieval.data import pairs
    from hybrid_retrieval.upgrade import RENAMED_TARGETS, upgrade_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    targets = {t for file in conf.rglob("*.yaml") for t in re.findall(r"_target_: *([\w.]+)", file.read_text())}
    assert "hybrid_retrieval.data.squad.from_squad" in targets and not targets & set(RENAMED_TARGETS)
    for target in targets:
        assert get_object(target) is not None, target
    for old, new in RENAMED_TARGETS.items():
        assert not hasattr(pairs, old.rsplit(".", 1)[1])  # no shim left in data/pairs.py
        saved = {"train_data": {"datasets": [{"_target_": old, "name": "mlqa_r"}]}}
        assert upgrade_config(saved, OmegaConf.create({})) == {"train_data": {"datasets": [{"_target_": new,
                                                                                            "name": "mlqa_r"}]}}
        assert get_object(new) is not None
