"""The Arrow pair store (:mod:`hybrid_retrieval.data.pair_store`) and the readers that write it: the on-disk form
(datasets opens it; the integer columns are zero-copy views), the cache (reused, keyed by the source, one
converter among concurrent processes), malformed rows (named, nothing left behind), resuming a stopped
conversion, Parquet and Hugging Face sources, several hard negatives a row, DataLoader workers, and the sampler's
batches against those of the list-backed implementation it replaced."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybrid_retrieval.data import pair_store
from hybrid_retrieval.data.jsonl_pairs import from_jsonl
from hybrid_retrieval.data.lareqa_pairs import from_lareqa
from hybrid_retrieval.data.pairs import ParallelPairs
from hybrid_retrieval.data.table_pairs import from_hf, from_parquet
from hybrid_retrieval.training.batches import PairCollator, PairTexts
from hybrid_retrieval.training.sampler import HybridBatchSampler

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "sampler_batches_a426d6d.json"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(folder))
    return folder


def rows_of(n_groups: int, languages: list[str], negatives: int = 0) -> list[dict]:
    rows = []
    for g in range(n_groups):
        for lang in languages[: 1 + g % len(languages)]:
            row = {"group": f"q{g * 7 % 1000}", "language": lang, "query": f"question {g} in {lang}",
                   "passage": f"answer {g} in {lang}"}
            if negatives:
                row["hard_negatives"] = [f"wrong {g}.{k} in {lang}" for k in range(negatives)]
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "pairs").iterdir() if p.is_dir()) if (cache / "pairs").exists() else []


# ------------------------------------------------------------------------------------------------ the store


def test_a_store_is_a_datasets_folder_with_zero_copy_integer_columns(tmp_path: Path, cache: Path) -> None:
    import datasets

    rows = rows_of(40, ["en", "de", "zh"], negatives=2)
    pairs = from_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    (folder,) = stores(cache)
    assert pairs.folder == folder and len(pairs) == len(rows)
    # The integer columns are views of the memory-mapped index file (groups int32, languages int8): no copy, not
    # writeable.
    assert pairs.groups.dtype == np.int32 and pairs.languages.dtype == np.int8
    for array in (pairs.groups, pairs.languages):
        assert not array.flags.owndata and not array.flags.writeable
    first_seen: dict[str, int] = {}
    assert pairs.groups.tolist() == [first_seen.setdefault(r["group"], len(first_seen)) for r in rows]
    assert [pairs.language_names[i] for i in pairs.languages] == [r["language"] for r in rows]
    # datasets opens the folder as it opens its own save_to_disk output.
    loaded = datasets.load_from_disk(str(folder))
    assert loaded.num_rows == len(rows) and loaded.column_names == ["group", "language", "query", "passage",
                                                                     "hard_negatives"]
    assert loaded[5] == {**{k: rows[5][k] for k in ("group", "language", "query", "passage")},
                         "hard_negatives": rows[5]["hard_negatives"]}
    assert pairs.to_hf().num_rows == len(rows)
    # A batch's texts, by row.
    queries, passages, negatives = pairs.fetch([3, 0], [4, 1], hard_negatives=1)
    assert queries == [rows[3]["query"], rows[0]["query"]] and passages == [rows[4]["passage"], rows[1]["passage"]]
    assert negatives == [rows[4]["hard_negatives"][:1], rows[1]["hard_negatives"][:1]]
    # A store travels to another process as its folder, not as its rows.
    payload = pickle.dumps(pairs)
    assert len(payload) < 500
    again = pickle.loads(payload)
    assert again.queries == pairs.queries and again.groups.tolist() == pairs.groups.tolist()


def test_the_cache_is_reused_and_follows_the_source(tmp_path: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows_of(20, ["en", "de"]))
    first = from_jsonl(path)
    data_file = first.folder / "data-00000-of-00001.arrow"
    written = data_file.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pair_store, "write_store", no_conversion)
    again = from_jsonl(path)
    assert again.folder == first.folder and data_file.stat().st_mtime_ns == written
    assert again.digest == first.digest
    monkeypatch.undo()
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(cache))
    # Another file with the same rows: another cache entry, the same digest (it describes what the rows hold).
    copy = write_jsonl(tmp_path / "copy.jsonl", rows_of(20, ["en", "de"]))
    same = from_jsonl(copy, name="train")
    assert same.folder != first.folder and same.digest == first.digest
    # The file changes: a new store, another digest.
    write_jsonl(path, rows_of(21, ["en", "de"]))
    changed = from_jsonl(path)
    assert changed.folder != first.folder and len(changed) > len(first) and changed.digest != first.digest
    # Options are part of the key.
    assert from_jsonl(path, hard_negative=None).folder not in {changed.folder, first.folder}


CONVERT = """
import json, os, sys, time
from hybrid_retrieval.data import pair_store
real = pair_store.write_store
def counted(*args, **kwargs):
    with open(sys.argv[2], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # hold the lock while the other process arrives
    return real(*args, **kwargs)
pair_store.write_store = counted
from hybrid_retrieval.data.jsonl_pairs import from_jsonl
pairs = from_jsonl(sys.argv[1])
print(json.dumps({"folder": str(pairs.folder), "rows": len(pairs), "digest": pairs.digest}))
"""


def test_concurrent_processes_convert_once_and_share_the_store(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows_of(200, ["en", "de", "fr"]))
    log = tmp_path / "conversions.log"
    env = {**os.environ, "HYBRID_RETRIEVAL_CACHE": str(cache)}
    processes = [subprocess.Popen([sys.executable, "-c", CONVERT, str(path), str(log)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
    found = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert len(log.read_text().split()) == 1  # one process converted; the others waited and opened its store
    assert len({f["folder"] for f in found}) == 1 and len({f["digest"] for f in found}) == 1
    assert [p.name for p in (cache / "pairs").iterdir() if p.is_dir()] == [Path(found[0]["folder"]).name]


@pytest.mark.parametrize(
    ("line", "field"),
    [('{"group": "g", "language": "en", "query": "", "passage": "p"}', "'query'"),
     ('{"group": "g", "language": "en", "query": "q", "passage": ["p"]}', "'passage'"),
     ('{"group": "g", "language": "en", "query": "q", "passage": "p", "hard_negatives": [""]}', "'hard_negatives'"),
     ('{"group": "g", "language": "en", "query": "q"', "not valid JSON")],
)
def test_a_malformed_row_is_named_and_leaves_no_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                     line: str, field: str) -> None:
    # Small blocks and parts: the bad line comes after parts already committed.
    monkeypatch.setattr("hybrid_retrieval.data.jsonl_pairs.BLOCK_BYTES", 256)
    monkeypatch.setattr(pair_store, "PART_ROWS", 4)
    rows = rows_of(30, ["en", "de"])
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(36, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=field) as info:
        from_jsonl(path)
    assert f"{path}:37" in str(info.value)
    assert list((cache / "pairs").iterdir()) == [] or all(p.suffix == ".lock" for p in (cache / "pairs").iterdir())


def test_a_stopped_conversion_resumes_after_its_last_part(tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_retrieval.data import jsonl_pairs

    path = write_jsonl(tmp_path / "train.jsonl", rows_of(60, ["en", "de", "es"], negatives=1))
    monkeypatch.setattr(jsonl_pairs, "BLOCK_BYTES", 300)
    monkeypatch.setattr(pair_store, "PART_ROWS", 7)
    whole = from_jsonl(path, name="whole")
    real = jsonl_pairs.jsonl_chunks
    read: list[int] = []

    def stopping(file, keep):
        inner = real(file, keep)

        def chunks(position):
            for i, chunk in enumerate(inner(position)):
                if i == 9 and position is None:
                    raise KeyboardInterrupt  # killed mid-conversion
                read.append(len(chunk.query))
                yield chunk

        return chunks

    monkeypatch.setattr(jsonl_pairs, "jsonl_chunks", stopping)
    with pytest.raises(KeyboardInterrupt):
        from_jsonl(path)
    (partial,) = [p for p in (cache / "pairs").iterdir() if p.name.endswith(".partial")]
    committed = json.loads((partial / "progress.json").read_text())["parts"]
    assert committed and sum(part[1] for part in committed) < len(whole)
    read.clear()
    resumed = from_jsonl(path)
    assert sum(read) == len(whole) - sum(part[1] for part in committed)  # only what was not committed is read again
    assert not partial.exists() and resumed.digest == whole.digest
    assert resumed.groups.tolist() == whole.groups.tolist() and resumed.queries == whole.queries
    assert resumed.hard_negatives == whole.hard_negatives


# ------------------------------------------------------------------------------------------------ Parquet, datasets


def parquet_rows(n: int) -> pa.Table:
    return pa.table({"qid": pa.array([i // 2 * 10 for i in range(n)], pa.int64()),
                     "lang": [("en", "de")[i % 2] for i in range(n)],
                     "question": [f"question {i}" for i in range(n)],
                     "positive": [f"answer {i}" for i in range(n)],
                     "hard_negatives": [[f"wrong {i}.{k}" for k in range(i % 3)] for i in range(n)]})


COLUMNS = {"group": "qid", "language": "lang", "query": "question", "passage": "positive"}


def test_parquet_files_and_folders(tmp_path: Path, cache: Path) -> None:
    table = parquet_rows(50)
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(table.slice(0, 20), folder / "part-0.parquet")
    pq.write_table(table.slice(20), folder / "part-1.parquet", row_group_size=7)
    pairs = from_parquet(folder, columns=COLUMNS)
    assert len(pairs) == 50 and pairs.n_groups == 25 and pairs.language_names == ["en", "de"]
    assert pairs.queries == table.column("question").to_pylist()
    assert pairs.hard_negatives == table.column("hard_negatives").to_pylist()
    assert pairs.max_hard_negatives == 2
    single = from_parquet(folder / "part-0.parquet", columns=COLUMNS)
    assert len(single) == 20
    with pytest.raises(ValueError, match=r"no column for query \(column 'query'\)"):
        from_parquet(folder, columns={k: v for k, v in COLUMNS.items() if k != "query"})
    bad = table.to_pylist()
    bad[33]["positive"] = "  "
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet", row_group_size=10)
    with pytest.raises(ValueError, match=r"bad.parquet: Parquet row 33: field 'passage' must be a non-empty string"):
        from_parquet(tmp_path / "bad.parquet", columns=COLUMNS)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet file"):
        from_parquet(tmp_path / "cache")


def test_hugging_face_datasets_saved_to_disk(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    table = parquet_rows(30)
    data = datasets.Dataset(table)
    data.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": data, "dev": datasets.Dataset(table.slice(0, 4))}).save_to_disk(str(tmp_path / "dict"))
    one = from_hf(str(tmp_path / "one"), columns=COLUMNS)
    dev = from_hf(str(tmp_path / "dict"), split="dev", columns=COLUMNS)
    assert len(one) == 30 and len(dev) == 4 and one.queries == table.column("question").to_pylist()
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'dev'\]"):
        from_hf(str(tmp_path / "dict"), split="test", columns=COLUMNS)
    # Neither a folder nor reachable: the error says what to point at instead (datasets' own offline mode here,
    # read when datasets is imported; the project's HYBRID_RETRIEVAL_OFFLINE does not ask the hub at all).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HYBRID_RETRIEVAL_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="could not be loaded.*save_to_disk"):
        from_hf("nobody/no-such-dataset")
    monkeypatch.setenv("HYBRID_RETRIEVAL_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no such folder, and HYBRID_RETRIEVAL_OFFLINE is set"):
        from_hf("nobody/no-such-dataset")


# ------------------------------------------------------------------------------------------------ batches


def test_several_hard_negatives_a_row_enter_the_batch(tmp_path: Path, cache: Path) -> None:
    rows = rows_of(30, ["en", "de"], negatives=3)
    rows[2]["hard_negative"] = "single first"
    pairs = from_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    assert pairs.hard_negatives[2] == ["single first", *rows[2]["hard_negatives"]]
    items = [(0, 2, 2), (0, 5, 6)]
    for k, expected in ((0, []), (1, ["single first", rows[6]["hard_negatives"][0]]),
                        (2, ["single first", rows[2]["hard_negatives"][0], *rows[6]["hard_negatives"][:2]])):
        texts = PairTexts([pairs], hard_negatives=k).__getitems__(items)
        assert texts["hard_negative"] == expected
        assert texts["query"] == [rows[2]["query"], rows[5]["query"]]
        assert texts["monolingual"] is False and texts["rows"] == items


def test_workers_yield_the_batches_of_the_training_process(tmp_path: Path, cache: Path, tiny_encoder) -> None:
    import torch
    from torch.utils.data import DataLoader

    pairs = from_jsonl(write_jsonl(tmp_path / "train.jsonl", rows_of(300, ["en", "de", "fr", "es"], negatives=2)))

    def batches(workers: int) -> list[dict]:
        sampler = HybridBatchSampler([pairs], batch_size=8, mono_ratio=0.5, seed=3, batches_per_epoch=12)
        options = {"num_workers": workers, "persistent_workers": True} if workers else {}
        loader = DataLoader(PairTexts([pairs], 2), batch_sampler=sampler, collate_fn=PairCollator(tiny_encoder.tokenize),
                            **options)
        return list(loader)

    plain, parallel = batches(0), batches(2)
    assert len(plain) == len(parallel) == 12
    for a, b in zip(plain, parallel):
        assert a["rows"] == b["rows"] and a["monolingual"] == b["monolingual"]
        for side in ("query", "passage", "hard_negative"):
            assert torch.equal(a[side]["input_ids"], b[side]["input_ids"])


def synthetic(n_groups: int = 6000, n_languages: int = 8, seed: int = 7) -> ParallelPairs:
    """The synthetic set of tests/data/sampler_batches_a426d6d.json: groups in 1-8 languages, a few repeated
    (group, language) rows, shuffled, groups numbered by first appearance."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        k = int(rng.integers(1, n_languages + 1))
        for lang in sorted(rng.choice(n_languages, size=k, replace=False).tolist()):
            rows.append((g, lang))
    for g in rng.choice(n_groups, size=50, replace=False).tolist():
        rows.append((g, rows[[r[0] for r in rows].index(g)][1]))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    first: dict[int, int] = {}
    groups = [first.setdefault(g, len(first)) for g, _ in rows]
    return ParallelPairs(name="synthetic", groups=np.array(groups), languages=np.array([lang for _, lang in rows]),
                         language_names=[f"l{i}" for i in range(n_languages)],
                         queries=[f"q{g}-{lang}" for g, lang in rows], passages=[f"p{g}-{lang}" for g, lang in rows])


def test_the_sampler_yields_the_batches_of_the_list_backed_implementation(data_root: Path, cache: Path) -> None:
    """Digests of every batch of two epochs, for 108 settings, recorded with the list-backed data path (commit
    a426d6d, whose sampler built int64 indices of Python-list datasets): MLQA-R through the store, the synthetic
    set in memory, and both together."""
    expected = json.loads(GOLDEN.read_text())
    mlqa = from_lareqa("mlqa_r", data_root)
    assert mlqa.folder is not None  # read back from the store
    sets = {"mlqa_r": [mlqa], "synthetic": [synthetic()], "both": [mlqa, synthetic()]}
    found = {}
    for key in expected:
        name, alpha, weighting, replicas, rank, batch = key.split("|")
        sampler = HybridBatchSampler(sets[name], batch_size=int(batch), mono_ratio=float(alpha), seed=42,
                                     language_weighting=weighting, num_replicas=int(replicas), rank=int(rank),
                                     batches_per_epoch=60)
        digest = hashlib.sha256()
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            for rows in sampler:
                digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        found[key] = digest.hexdigest()[:16]
    assert found == expected
