"""mMARCO training pairs (:func:`hybrid_retrieval.data.mmarco.from_mmarco`) on a miniature in the published layout:
rows against a plain-Python lookup, groups across languages, the cache, errors naming file, line and field, and a
conversion resumed after an interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mmarco_mini import MiniMmarco, write_mini_mmarco, write_triples

from hybrid_retrieval.data import mmarco, pair_store
from hybrid_retrieval.data.mmarco import from_mmarco, mmarco_files, mmarco_languages
from hybrid_retrieval.data.pair_store import StoreError

LANGUAGES = ["english", "german", "chinese"]
CODES = ["en", "de", "zh"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(folder))
    return folder


@pytest.fixture
def mini(tmp_path: Path) -> MiniMmarco:
    return write_mini_mmarco(tmp_path / "mmarco", LANGUAGES, n_queries=6, n_passages=24, triples=16)


def read_tsv(path: Path) -> dict[int, str]:
    """``id -> text`` of an ``id<TAB>text`` file, read with plain Python."""
    found: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8-sig").split("\n"):
        line = line[:-1] if line.endswith("\r") else line
        if line:
            key, text = line.split("\t", 1)
            found[int(key)] = text
    return found


def expected_rows(mini: MiniMmarco, languages: list[str], triples: list[tuple[int, int, int]],
                  negatives: bool = True) -> list[dict[str, Any]]:
    rows = []
    for language, code in zip(languages, [mmarco.MMARCO_LANGUAGES[lang] for lang in languages]):
        queries, passages = read_tsv(mini.queries_file(language)), read_tsv(mini.collection_file(language))
        for qid, positive, negative in triples:
            rows.append({"group": str(qid), "language": code, "query": queries[qid], "passage": passages[positive],
                         "hard_negatives": [passages[negative]] if negatives else []})
    return rows


def store_entries(cache: Path) -> list[str]:
    """What the pairs cache holds, lock files aside."""
    folder = cache / "pairs"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_rows_match_a_plain_lookup(tmp_path: Path, cache: Path, newline: str) -> None:
    mini = write_mini_mmarco(tmp_path / "mmarco", LANGUAGES, n_queries=6, n_passages=24, triples=16,
                             newline=newline)
    pairs = from_mmarco(mini.root, LANGUAGES)
    assert pairs.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples)
    assert pairs.language_names == CODES
    assert pairs.languages.tolist() == [i for i in range(3) for _ in mini.triples]
    assert pairs.name == "mmarco" and pairs.folder is not None and pairs.folder.parent == cache / "pairs"
    # One group per qid, numbered by first appearance, the same in every language.
    order = list(dict.fromkeys(q for q, _, _ in mini.triples))
    assert pairs.groups.tolist() == [order.index(q) for _ in LANGUAGES for q, _, _ in mini.triples]
    assert pairs.n_groups == len(set(mini.qids)) == len(order)
    assert max(np.bincount(pairs.groups[pairs.languages == 0])) > 1  # a query's several triples: several rows
    summary = pairs.summary()
    assert summary["languages"] == {code: len(mini.triples) for code in CODES}
    assert summary["groups_by_language_count"] == {3: len(order)}
    assert pairs.rows_with_hard_negatives == len(pairs) and pairs.max_hard_negatives == 1
    queries, passages, negatives = pairs.fetch([0, len(mini.triples)], [1], hard_negatives=1)
    assert queries[0].startswith("english query") and queries[1].startswith("german query")
    assert passages[0].startswith("english passage") and negatives[0][0].startswith("english passage")


def test_languages_by_code_and_order(mini: MiniMmarco, cache: Path) -> None:
    by_name = from_mmarco(mini.root, LANGUAGES)
    by_code = from_mmarco(mini.root, ["EN", "de", "Chinese"])
    assert by_code.folder == by_name.folder  # the cache key holds the codes
    reordered = from_mmarco(mini.root, ["zh", "en"])
    assert reordered.language_names == ["zh", "en"]
    assert reordered.table.to_pylist() == expected_rows(mini, ["chinese", "english"], mini.triples)
    assert mmarco_languages("german, fr") == [("german", "de"), ("french", "fr")]
    assert [code for _, code in mmarco_languages(None)] == list(mmarco.MMARCO_LANGUAGES.values())
    with pytest.raises(ValueError, match="no language 'klingon'"):
        from_mmarco(mini.root, ["english", "klingon"])
    with pytest.raises(ValueError, match="twice"):
        from_mmarco(mini.root, ["english", "en"])


def test_hard_negatives_off(mini: MiniMmarco, cache: Path) -> None:
    pairs = from_mmarco(mini.root, LANGUAGES, hard_negative=None)
    assert pairs.hard_negatives is None and pairs.rows_with_hard_negatives == 0
    assert pairs.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples, negatives=False)
    assert pairs.folder != from_mmarco(mini.root, LANGUAGES).folder
    with pytest.raises(ValueError, match="hard_negative must be one of"):
        from_mmarco(mini.root, LANGUAGES, hard_negative="bm25")


def test_max_triples(mini: MiniMmarco, cache: Path) -> None:
    pairs = from_mmarco(mini.root, LANGUAGES, max_triples=5)
    assert len(pairs) == 15
    assert pairs.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples[:5])
    everything = from_mmarco(mini.root, LANGUAGES, max_triples=1000)
    assert everything.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_triples must be"):
            from_mmarco(mini.root, LANGUAGES, max_triples=bad)


def test_small_chunks_give_the_same_rows(mini: MiniMmarco, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmarco, "CHUNK_TRIPLES", 3)
    monkeypatch.setattr(mmarco, "INDEX_BLOCK", 64)  # many index blocks, and lines longer than a block
    pairs = from_mmarco(mini.root, LANGUAGES, max_triples=11)
    assert pairs.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples[:11])


def test_second_call_reuses_the_cache(mini: MiniMmarco, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = from_mmarco(mini.root, LANGUAGES)
    assert first.folder is not None
    written = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}

    def no_conversion(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr(mmarco, "_chunks", no_conversion)
    second = from_mmarco(mini.root, LANGUAGES)
    assert second.folder == first.folder
    assert {p.name: p.stat().st_mtime_ns for p in second.folder.iterdir()} == written
    assert second.table.to_pylist() == first.table.to_pylist()
    assert store_entries(cache) == [first.folder.name]
    # A changed source is a new store.
    monkeypatch.undo()
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(cache))
    path = mini.collection_file("german")
    path.write_text(path.read_text(encoding="utf-8").replace("german passage", "deutsche Passage"), encoding="utf-8")
    third = from_mmarco(mini.root, LANGUAGES)
    assert third.folder != first.folder
    assert third.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples)


@pytest.mark.parametrize("missing", ["collection", "queries", "triples"])
def test_a_missing_file_names_the_expected_path(mini: MiniMmarco, cache: Path, missing: str) -> None:
    path = {"collection": mini.collection_file("german"), "queries": mini.queries_file("chinese"),
            "triples": mini.triples_file}[missing]
    path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        from_mmarco(mini.root, LANGUAGES)
    message = str(error.value)
    assert str(path) in message and "train_data.root" in message and "root option" in message
    assert path.relative_to(mini.root).as_posix() in {
        "data/google/collections/german_collection.tsv", "data/google/queries/train/chinese_queries.train.tsv",
        "data/triples.train.ids.small.tsv"}
    assert store_entries(cache) == []
    with pytest.raises(FileNotFoundError, match="root is not set"):
        mmarco_files(None)


@pytest.mark.parametrize("column", [0, 1, 2])
def test_an_id_missing_from_a_language_file(mini: MiniMmarco, cache: Path, column: int) -> None:
    """The id in column `column` of triple 5 is dropped from German's file: the error names the triples file, the
    line where the id is first used, the field and the German file, and nothing stays in the cache (English was
    converted before German)."""
    victim = mini.triples[4][column]
    path = mini.queries_file("german") if column == 0 else mini.collection_file("german")
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join(line for line in lines if not line.startswith(f"{victim}\t")), encoding="utf-8")
    # Where the id is first looked up: a qid in column 0; a pid as positive or negative, the positive first.
    line, field = next((i + 1, name) for i, triple in enumerate(mini.triples)
                       for name, value in zip(mmarco.TRIPLE_FIELDS, triple)
                       if value == victim and (name == "qid") == (column == 0))
    with pytest.raises(StoreError) as error:
        from_mmarco(mini.root, LANGUAGES)
    assert str(error.value) == f"{mini.triples_file}:{line}: field {field!r} {victim} is not in {path} (german)"
    assert store_entries(cache) == []


def test_an_unknown_negative_is_ignored_without_hard_negatives(tmp_path: Path, cache: Path) -> None:
    mini = write_mini_mmarco(tmp_path / "mmarco", LANGUAGES, triples=4)
    q, p, _ = mini.triples[2]
    write_triples(mini.triples_file, [*mini.triples[:2], (q, p, 10**9), *mini.triples[3:]])
    with pytest.raises(StoreError, match=rf"triples\.train\.ids\.small\.tsv:3: field 'negative pid' {10**9} "):
        from_mmarco(mini.root, LANGUAGES)
    assert len(from_mmarco(mini.root, LANGUAGES, hard_negative=None)) == 12


@pytest.mark.parametrize(("line", "field"), [
    ("17\t4", "'negative pid' is missing"),
    ("17", "'positive pid' is missing"),
    ("x17\t4\t5", "'qid' must be a non-negative integer, got 'x17'"),
    ("17\t\t5", "'positive pid' must be a non-negative integer, got ''"),
    ("17\t4\t-5", "'negative pid' must be a non-negative integer, got '-5'"),
    ("17\t4\t5\t6", "'negative pid' is followed by 1 more field"),
    ("1234567890123456789\t4\t5", "'qid' must be a non-negative integer"),
])
def test_a_malformed_triple_names_file_line_and_field(mini: MiniMmarco, cache: Path, line: str, field: str) -> None:
    write_triples(mini.triples_file, [*mini.triples[:3], "", line, *mini.triples[3:]])
    with pytest.raises(StoreError) as error:
        from_mmarco(mini.root, LANGUAGES)
    assert f"{mini.triples_file}:5: field {field}" in str(error.value)
    assert store_entries(cache) == []


def test_a_malformed_language_file(mini: MiniMmarco, cache: Path) -> None:
    path = mini.collection_file("chinese")
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join([*lines[:2], "no tab here", *lines[2:]]), encoding="utf-8")
    with pytest.raises(StoreError, match=r"chinese_collection\.tsv:3: field 'pid' must be a non-negative integer "
                                         r"followed by a tab and the text, got 'no tab here'"):
        from_mmarco(mini.root, LANGUAGES)
    assert store_entries(cache) == []
    repeated = lines[5].split("\t")[0]
    path.write_text("\n".join([*lines, f"{repeated}\tagain"]), encoding="utf-8")
    with pytest.raises(StoreError, match=rf"chinese_collection\.tsv:{len(lines) + 1}: field 'pid' {repeated} repeats "
                                         r"the pid of line 6"):
        from_mmarco(mini.root, LANGUAGES)
    assert store_entries(cache) == []


def test_an_empty_passage_names_the_triple(mini: MiniMmarco, cache: Path) -> None:
    _, p, _ = mini.triples[6]
    path = mini.collection_file("german")
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join(f"{p}\t " if line.startswith(f"{p}\t") else line for line in lines), encoding="utf-8")
    with pytest.raises(StoreError) as error:
        from_mmarco(mini.root, LANGUAGES)
    line = next(i + 1 for i, t in enumerate(mini.triples) if p in t[1:])
    message = str(error.value)
    assert f"{mini.triples_file}:{line} (german: qid" in message and "field" in message
    assert store_entries(cache) == []


def test_invalid_utf8_names_the_triple_and_the_file(mini: MiniMmarco, cache: Path) -> None:
    _, p, _ = mini.triples[2]
    path = mini.collection_file("chinese")
    data = path.read_bytes()
    at = (b"\n" + data).index(f"\n{p}\t".encode()) + len(f"{p}\t")  # where its text begins
    path.write_bytes(data[:at] + b"\xff\xfe" + data[at:])
    line, field = next((i + 1, "positive" if t[1] == p else "negative")
                       for i, t in enumerate(mini.triples) if p in t[1:])
    with pytest.raises(StoreError) as error:
        from_mmarco(mini.root, LANGUAGES)
    assert str(error.value).startswith(f"{mini.triples_file}:{line}: {field} pid {p}: its text in {path} (byte {at}) "
                                       "is not valid UTF-8")
    assert store_entries(cache) == []


def test_a_byte_order_mark_is_skipped(mini: MiniMmarco, cache: Path) -> None:
    for path in (mini.triples_file, mini.queries_file("german"), mini.collection_file("german")):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    pairs = from_mmarco(mini.root, LANGUAGES)
    assert pairs.table.to_pylist() == expected_rows(mini, LANGUAGES, mini.triples)


def test_every_position_resumes_where_it_was(mini: MiniMmarco, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks read from a chunk's position are exactly the chunks that followed it."""
    monkeypatch.setattr(mmarco, "CHUNK_TRIPLES", 3)
    files = mmarco_files(mini.root, LANGUAGES)
    chosen = mmarco_languages(LANGUAGES)

    def rows(position: Any) -> list[tuple[Any, list[dict[str, Any]]]]:
        return [(c.position, pair_store.check_chunk(c).to_pylist())
                for c in mmarco._chunks(files, chosen, 10, "triple", position)]

    everything = rows(None)
    assert len(everything) == 3 * 4  # 10 triples in chunks of 3, 3, 3, 1 per language
    assert [r for _, chunk in everything for r in chunk] == expected_rows(mini, LANGUAGES, mini.triples[:10])
    json.dumps([p for p, _ in everything])
    assert everything[-1][0]["language"] == len(LANGUAGES)
    for i, (position, _) in enumerate(everything):
        assert rows(position) == everything[i + 1 :]


@pytest.mark.parametrize(("part_rows", "interrupt_at"), [(5, 3), (5, 6), (5, 8), (5, 12), (1, 6), (1, 11), (1, 15)])
def test_an_interrupted_conversion_resumes(mini: MiniMmarco, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           part_rows: int, interrupt_at: int) -> None:
    """Parts of `part_rows` rows, chunks of 3 triples (13 triples: 5 chunks a language): interrupted before its
    `interrupt_at`-th chunk, a conversion keeps its committed parts, and the next call converts only the rest into
    a store equal to an uninterrupted one. (Parts of 1 row: the commit before chunk 6 or 11 ends a language.)"""
    monkeypatch.setattr(mmarco, "CHUNK_TRIPLES", 3)
    monkeypatch.setattr(pair_store, "PART_ROWS", part_rows)
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(tmp_path / "reference"))
    reference = from_mmarco(mini.root, LANGUAGES, max_triples=13)

    checked = pair_store.check_chunk
    calls: list[int] = []

    def interrupting(chunk: Any) -> Any:
        calls.append(len(chunk.group))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return checked(chunk)

    cache = tmp_path / "cache"
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(cache))
    monkeypatch.setattr(pair_store, "check_chunk", interrupting)
    with pytest.raises(KeyboardInterrupt):
        from_mmarco(mini.root, LANGUAGES, max_triples=13)
    (partial,) = [p for p in (cache / "pairs").iterdir() if p.name.endswith(".partial")]
    state = json.loads((partial / "progress.json").read_text())
    committed = sum(part[1] for part in state["parts"])  # [name, rows, ...]
    assert state["parts"] and 0 < committed <= sum(calls[:-1])

    calls.clear()
    monkeypatch.setattr(pair_store, "check_chunk", lambda chunk: calls.append(len(chunk.group)) or checked(chunk))
    resumed = from_mmarco(mini.root, LANGUAGES, max_triples=13)
    assert sum(calls) == len(reference) - committed  # only what was not committed is read again
    assert resumed.table.to_pylist() == reference.table.to_pylist()
    assert resumed.groups.tolist() == reference.groups.tolist()
    assert resumed.languages.tolist() == reference.languages.tolist()
    assert resumed.language_names == reference.language_names == CODES
    assert resumed.digest == reference.digest
    assert resumed.folder is not None and resumed.folder.name == reference.folder.name
    assert store_entries(cache) == [resumed.folder.name]


def test_the_config_builds_the_dataset(tmp_path: Path, cache: Path) -> None:
    """``train_data=mmarco train_data.root=...`` through Hydra and build_datasets: the seven languages, codes as the
    language names; without a root the error names the missing value."""
    from hydra import compose, initialize_config_dir

    from hybrid_retrieval.data.pairs import build_datasets

    languages = ["english", "chinese", "french", "german", "indonesian", "italian", "portuguese"]
    mini = write_mini_mmarco(tmp_path / "mmarco", languages, triples=8)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["train_data=mmarco", f"train_data.root={mini.root}",
                                                       "train_data.datasets.0.max_triples=5"])
        unset = compose(config_name="config", overrides=["train_data=mmarco"])
    (pairs,) = build_datasets(cfg.train_data)
    assert pairs.name == "mmarco" and pairs.language_names == ["en", "zh", "fr", "de", "id", "it", "pt"]
    assert pairs.table.to_pylist() == expected_rows(mini, languages, mini.triples[:5])
    with pytest.raises(ValueError, match=r"train_data\.datasets\[0\]\.root"):
        build_datasets(unset.train_data)
