"""Passage search: FAISS indexes by config against the exact rank pass, saved indexes, input files, the CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CONF_DIR, REPO_ROOT
from omegaconf import OmegaConf

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.lareqa import LareqaSplit, load_split
from hybrid_retrieval.data.text_files import InputFileError, read_texts
from hybrid_retrieval.evaluation.index import (IndexConfigError, build_index, load_index, resolve_index_spec,
                                               save_index, write_search_results, write_trec_run)
from hybrid_retrieval.evaluation.ranks import relevant_ranks
from hybrid_retrieval.models.encoder import Encoder

TIE = 1e-6  # scores this close count as tied: FAISS and BLAS may sum in different orders


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def index_config(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "index" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def split(data_root: Path) -> LareqaSplit:
    return load_split("xquad_r", languages=["en", "de"], max_questions_per_language=30, root=data_root)


@pytest.fixture(scope="module")
def files(split: LareqaSplit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The split as search input: passages.jsonl (candidate sentences) and queries.jsonl / queries.txt."""
    folder = tmp_path_factory.mktemp("search_input")
    write_jsonl(folder / "passages.jsonl", [{"id": c.id, "text": c.sentence} for c in split.candidates])
    write_jsonl(folder / "queries.jsonl", [{"id": q.id, "text": q.text} for q in split.queries])
    (folder / "queries.txt").write_text("".join(q.text + "\n" for q in split.queries[:7]), encoding="utf-8")
    return {"passages": folder / "passages.jsonl", "queries": folder / "queries.jsonl",
            "queries_txt": folder / "queries.txt"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def embeddings(tiny_encoder: Encoder, split: LareqaSplit) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings, passage embeddings) of the tiny model, as the search command computes them."""
    return (tiny_encoder.encode(split.query_texts(), "query"),
            tiny_encoder.encode([c.sentence for c in split.candidates], "passage"))


# ------------------------------------------------------------------------------------------------- indexes


def test_flat_index_agrees_with_exact_rank_pass(embeddings: tuple[np.ndarray, np.ndarray],
                                                split: LareqaSplit) -> None:
    queries, passages = embeddings
    index = build_index(passages, index_config("flat"), [c.id for c in split.candidates], model="tiny")
    assert index.spec["factory"] == "Flat" and len(index) == len(split.candidates)
    top_k = 50
    scores, rows = index.search(queries, top_k)
    assert rows.shape == (len(queries), top_k) and (rows >= 0).all()
    exact = queries @ passages.T
    # Top-1: the best score, and its exact rank is 1 unless other passages tie with it.
    top_ranks = relevant_ranks(queries, passages, np.zeros(len(passages), np.int64), [r[:1] for r in rows])
    for q in range(len(queries)):
        assert scores[q, 0] == pytest.approx(exact[q].max(), abs=TIE)
        tied = int((exact[q] >= exact[q, rows[q, 0]] - TIE).sum())
        assert 1 <= top_ranks.rank_overall[q] <= tied
    unique_best = [q for q in range(len(queries)) if np.sort(exact[q])[-2] < exact[q].max() - TIE]
    assert len(unique_best) > 0.9 * len(queries)
    assert all(rows[q, 0] == exact[q].argmax() for q in unique_best)
    # Every relevant passage within the top k sits where the exact rank pass puts it (up to ties).
    ranks = relevant_ranks(queries, passages, np.zeros(len(passages), np.int64), split.relevant)
    checked = 0
    for q, c, rank in zip(ranks.query_index, ranks.candidate_index, ranks.rank_overall):
        if rank > top_k:
            assert c not in rows[q][: top_k - 1]
            continue
        position = int(np.flatnonzero(rows[q] == c)[0]) + 1
        tied = int((np.abs(exact[q] - exact[q, c]) <= TIE).sum())
        assert rank - tied < position <= rank
        checked += 1
    assert checked >= 20  # enough relevant passages land in the top 50 for the comparison to mean something


@pytest.mark.parametrize("name", ["flat", "hnsw", "ivf"])
def test_saved_index_reloads_and_answers_the_same(name: str, embeddings: tuple[np.ndarray, np.ndarray],
                                                 split: LareqaSplit, tmp_path: Path) -> None:
    queries, passages = embeddings
    ids = [c.id for c in split.candidates]
    index = build_index(passages, index_config(name), ids, model="tiny", extra={"passages": "p.jsonl"})
    scores, rows = index.search(queries, 10)
    folder = save_index(index, tmp_path / "index")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.txt", "index.faiss", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["dim"], manifest["count"], manifest["model"], manifest["metric"]) == \
        (64, len(ids), "tiny", "inner_product")
    assert manifest["spec"]["type"] == name and manifest["passages"] == "p.jsonl"
    loaded = load_index(folder)
    assert loaded.ids == ids and loaded.spec == index.spec and loaded.extra == {"passages": "p.jsonl"}
    again_scores, again_rows = loaded.search(queries, 10)
    np.testing.assert_array_equal(again_rows, rows)
    np.testing.assert_allclose(again_scores, scores, atol=1e-6)
    # Saving over it replaces the whole folder and leaves nothing else behind.
    save_index(build_index(passages[:100], None, ids[:100]), folder)
    assert len(load_index(folder)) == 100 and [p.name for p in tmp_path.iterdir()] == ["index"]


def recall_at_10(approximate: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approximate, exact)]))


def test_approximate_indexes_recall_flat_top10(embeddings: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    queries, passages = embeddings
    _, exact = build_index(passages, index_config("flat")).search(queries, 10)
    _, hnsw = build_index(passages, index_config("hnsw")).search(queries, 10)
    assert recall_at_10(hnsw, exact) >= 0.95
    # The shipped IVF config, and a coarse one, trained on a sample: nprobe trades recall for speed, and the
    # value survives saving (a reloaded index that forgot it would scan one list).
    _, ivf = build_index(passages, index_config("ivf")).search(queries, 10)
    assert recall_at_10(ivf, exact) >= 0.95
    coarse = {**index_config("ivf"), "nlist": 8, "train_size": 300}
    recalls = {}
    for nprobe in (1, 8):
        index = build_index(passages, {**coarse, "nprobe": nprobe})
        recalls[nprobe] = recall_at_10(index.search(queries, 10)[1], exact)
        reloaded = load_index(save_index(index, tmp_path / f"ivf{nprobe}"))
        assert recall_at_10(reloaded.search(queries, 10)[1], exact) == recalls[nprobe]
    assert recalls[8] == 1.0 and recalls[1] < recalls[8]


def test_index_config_errors_name_the_option() -> None:
    with pytest.raises(IndexConfigError, match=r"index\.nlist=500 is larger than the 313 passages"):
        resolve_index_spec({**index_config("ivf"), "nlist": 500}, count=313)
    with pytest.raises(IndexConfigError, match=r"index\.nlist=100 is larger than the 50 passages .*train_size=50"):
        resolve_index_spec({**index_config("ivf"), "nlist": 100, "train_size": 50}, count=313)
    with pytest.raises(IndexConfigError, match=r"index\.factory='IVF8,Bogus': FAISS cannot build this index"):
        resolve_index_spec({"type": "flat", "factory": "IVF8,Bogus"}, count=313, dim=64)
    with pytest.raises(IndexConfigError, match=r"index\.factory='IVF8,PQ7'.*64-dimensional"):
        resolve_index_spec({"type": "flat", "factory": "IVF8,PQ7"}, count=313, dim=64)  # 7 does not divide 64
    with pytest.raises(IndexConfigError, match=r"index\.M=0: expected a positive integer"):
        resolve_index_spec({**index_config("hnsw"), "M": 0})
    with pytest.raises(IndexConfigError, match=r"index\.type='annoy': expected one of"):
        resolve_index_spec({"type": "annoy"})
    with pytest.raises(IndexConfigError, match=r"unknown keys \['nprobe'\] for index\.type='hnsw'"):
        resolve_index_spec({**index_config("hnsw"), "nprobe": 4})
    assert resolve_index_spec(index_config("ivf"), count=313)["factory"] == "IVF8,Flat"  # about 4·√n, ≤ n/39


def test_trec_and_jsonl_writers(tmp_path: Path) -> None:
    scores = np.array([[0.9, 0.5, -1.0], [0.7, 0.6, 0.2]], np.float32)
    rows = np.array([[2, 0, -1], [1, 2, 0]])
    run = write_trec_run(tmp_path / "run.trec", ["q1", "q2"], scores, rows, ["a", "b", "c"], "tiny")
    assert run.read_text().splitlines() == [
        "q1 Q0 c 1 0.89999998 tiny", "q1 Q0 a 2 0.50000000 tiny",
        "q2 Q0 b 1 0.69999999 tiny", "q2 Q0 c 2 0.60000002 tiny", "q2 Q0 a 3 0.20000000 tiny"]
    with pytest.raises(ValueError, match="run tag 'my run'"):
        write_trec_run(tmp_path / "x.trec", ["q1"], scores, rows, ["a", "b", "c"], "my run")
    results = write_search_results(tmp_path / "r.jsonl", ["q1"], ["what?"], scores[:1], rows[:1], ["a", "b", "c"])
    assert json.loads(results.read_text()) == {"id": "q1", "text": "what?", "hits": [
        {"id": "c", "score": 0.9, "rank": 1}, {"id": "a", "score": 0.5, "rank": 2}]}


# --------------------------------------------------------------------------------------------- input files


def test_read_texts_formats(tmp_path: Path) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("first line\nсекунда\n北京\n\n\n", encoding="utf-8")
    texts = read_texts(txt)
    assert texts.ids == ["0", "1", "2"] and texts.texts == ["first line", "секунда", "北京"]
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"pid": 7, "body": "a"}, {"pid": "x-1", "body": "b"}])
    texts = read_texts(jsonl, "passages", id_field="pid", text_field="body")
    assert texts.ids == ["7", "x-1"] and texts.texts == ["a", "b"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("q.csv", "a,b\n", r"queries='.*q\.csv': unknown file type '\.csv'; expected a \.txt file"),
    ("empty.txt", "\n\n", r"queries='.*empty\.txt': the file is empty"),
    ("gap.txt", "one\n\nthree\n", r"queries='.*gap\.txt' line 2: empty line"),
    ("list.jsonl", '["id", "text"]\n', r"queries='.*list\.jsonl' line 1: expected a JSON object with fields 'id' "
                                       r"and 'text', got a list"),
    ("field.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "question": "b"}\n',
     r"queries='.*field\.jsonl' line 2: missing field 'text'.*text_field=<name>"),
    ("json.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": \n', r"queries='.*json\.jsonl' line 2: not valid JSON"),
    ("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
     r"queries='.*dup\.jsonl' line 2: id 'a' already used on line 1"),
    ("space.jsonl", '{"id": "a b", "text": "x"}\n', r"line 1: field 'id' is 'a b'; expected a non-empty id without "
                                                     r"whitespace"),
    ("blank.jsonl", '{"id": "a", "text": "  "}\n', r"line 1: field 'text' is '  '; expected a non-empty string"),
])
def test_read_texts_errors_name_option_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputFileError, match=message):
        read_texts(path, "queries")


def test_read_texts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"passages='.*nope\.jsonl': file does not exist"):
        read_texts(tmp_path / "nope.jsonl", "passages")
    with pytest.raises(InputFileError, match=r"queries is not set; expected queries=<file>"):
        read_texts(None, "queries")


# -------------------------------------------------------------------------------------------------- driver


def search_config(*overrides: str) -> Any:
    """conf/search.yaml composed as the command line would, in this process."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="search", overrides=list(overrides))


def test_search_config_errors_come_before_any_work(files: dict[str, Path], tmp_path: Path) -> None:
    from hybrid_retrieval.search import search

    db = tmp_path / "mlflow.db"
    common = ["model=tiny", f"logger.tracking_uri=sqlite:///{db}", f"output={tmp_path / 'out'}"]
    cases = [
        ([f"queries={files['queries']}"], ConfigError, r"passages=None, index_dir=None: expected exactly one"),
        ([f"queries={files['queries']}", f"passages={files['passages']}", f"index_dir={tmp_path}"], ConfigError,
         "expected exactly one"),
        ([f"queries={files['queries']}", f"passages={files['passages']}", "top_k=0"], ConfigError,
         r"top_k=0: expected a positive integer"),
        ([f"queries={files['passages'].with_suffix('.tsv')}", f"passages={files['passages']}"], InputFileError,
         r"queries=.*unknown file type '\.tsv'"),
        ([f"queries={files['queries']}", f"index_dir={tmp_path / 'missing'}"], FileNotFoundError,
         r"index_dir='.*missing' does not exist"),
        ([f"queries={files['queries']}", f"passages={files['passages']}", "index=ivf", "index.nlist=1000"],
         IndexConfigError, r"index\.nlist=1000 is larger than the 313 passages"),
        ([f"queries={files['queries']}", f"passages={files['passages']}", "index=hnsw", "index.M=-1"],
         IndexConfigError, r"index\.M=-1"),
        ([f"queries={files['queries']}", f"passages={files['passages']}", "checkpoint=/no/such.ckpt"],
         ConfigError, r"checkpoint='/no/such\.ckpt': file does not exist"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            search(search_config(*common, *overrides))
    assert not db.exists() and not (tmp_path / "out").exists()


def test_reused_index_must_come_from_the_same_model(embeddings: tuple[np.ndarray, np.ndarray], split: LareqaSplit,
                                                    files: dict[str, Path], tmp_path: Path) -> None:
    from hybrid_retrieval.search import search

    _, passages = embeddings
    folder = save_index(build_index(passages, None, [c.id for c in split.candidates], model="other-model"),
                        tmp_path / "index")
    db = tmp_path / "mlflow.db"
    cfg = search_config("model=tiny", f"queries={files['queries']}", f"index_dir={folder}",
                        f"logger.tracking_uri=sqlite:///{db}", f"output={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=r"index_dir=.* holds 64-dimensional embeddings of model 'other-model', "
                                          r"but the queries would be encoded by 'tiny'"):
        search(cfg)
    assert not db.exists()


# ------------------------------------------------------------------------------------------------- the CLI


def run_cli(args: list[str], data_root: Path) -> subprocess.CompletedProcess:
    from tests.test_cli import run_command

    return run_command(["-m", *args], data_root, REPO_ROOT)


def read_trec(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_search_cli_builds_saves_and_reuses_an_index(files: dict[str, Path], split: LareqaSplit, data_root: Path,
                                                     embeddings: tuple[np.ndarray, np.ndarray],
                                                     tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "search"
    proc = run_cli(["hybrid_retrieval.search", "model=tiny", f"passages={files['passages']}",
                    f"queries={files['queries']}", "top_k=10", f"output={out}", f"logger.tracking_uri={uri}",
                    f"hydra.run.dir={tmp_path / 'h1'}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trec = read_trec(out / "run.trec")
    assert len(trec) == 10 * len(split.queries) and all(len(row) == 6 for row in trec)
    assert [row[0] for row in trec[::10]] == [q.id for q in split.queries]
    assert {row[1] for row in trec} == {"Q0"} and {row[5] for row in trec} == {"tiny"}
    for start in range(0, len(trec), 10):
        block = trec[start:start + 10]
        assert [int(row[3]) for row in block] == list(range(1, 11))
        scores = [float(row[4]) for row in block]
        assert scores == sorted(scores, reverse=True)
    # The same hits as the flat index over the same model's embeddings in this process (up to ties).
    queries, passages = embeddings
    exact = queries @ passages.T
    position = {c.id: i for i, c in enumerate(split.candidates)}
    for q, row in enumerate(trec[::10]):
        assert exact[q, position[row[2]]] == pytest.approx(exact[q].max(), abs=1e-5)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [q.id for q in split.queries]
    assert results[3]["text"] == split.queries[3].text
    assert [h["id"] for h in results[3]["hits"]] == [row[2] for row in trec[30:40]]
    assert [h["rank"] for h in results[3]["hits"]] == list(range(1, 11))
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert (manifest["count"], manifest["model"], manifest["spec"]["type"]) == (len(split.candidates), "tiny", "flat")

    # Reuse the saved index with other queries (a .txt file): nothing re-encoded but the queries.
    again = tmp_path / "again"
    proc = run_cli(["hybrid_retrieval.search", "model=tiny", f"index_dir={out / 'index'}",
                    f"queries={files['queries_txt']}", "top_k=5", "tag=reuse", f"output={again}",
                    f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'h2'}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reused = read_trec(again / "run.trec")
    assert len(reused) == 5 * 7 and {row[5] for row in reused} == {"reuse"}
    assert [row[0] for row in reused[::5]] == [str(i) for i in range(7)]  # line numbers
    # The first seven queries of both runs are the same texts: the same top 5.
    assert [row[2] for row in reused] == [row[2] for q in range(7) for row in trec[10 * q:10 * q + 5]]
    assert not (again / "index").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and r.data.tags["job"] == "search" for r in runs)
    built = [r for r in runs if "time/build_index_s" in r.data.metrics]
    assert len(built) == 1 and built[0].data.metrics["passages"] == len(split.candidates)
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] == 2
