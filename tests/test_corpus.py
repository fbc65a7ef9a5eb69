"""Streamed corpus encoding (memory-mapped shards, manifest, resume after a real kill) and the corpus-scale FAISS
indexes built from it (IVF-PQ trained on a sample, exact re-scoring, sharded indexes, save and reload)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO_ROOT

from hybrid_retrieval.evaluation.corpus import (
    CorpusEncodingError, EmbeddingShards, encode_corpus, encoder_fingerprint, open_embeddings, write_embedding_shards,
)
from hybrid_retrieval.evaluation.index import (
    IndexConfigError, PassageIndex, ShardedIndex, build_index, load_index, resolve_index_spec, save_index,
)

WORDS = "alpha beta gamma delta river mountain city school market history music football island".split()


def passages(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(id, text) pairs of very different lengths, so length sorting has work to do."""
    rng = np.random.default_rng(seed)
    return [(f"p{i}", " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))) for i in range(n)]


def encoder_fn(encoder: Any, calls: list[int] | None = None) -> Any:
    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(len(texts))
        return encoder.encode(texts, "passage", batch_size=32)
    return encode


CONFIG = {"model": "tiny", "passage_text": "text"}


@pytest.mark.slow
def test_shards_hold_the_encoder_embeddings_in_input_order(tiny_encoder: Any, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_RETRIEVAL_PROGRESS_EVERY_S", "0.0001")  # a progress line at every update
    caplog.set_level("INFO", logger="hybrid_retrieval.progress")
    items = passages(700)
    shards = encode_corpus(encoder_fn(tiny_encoder), iter(items), tmp_path / "emb", model="tiny", config=CONFIG,
                           dim=tiny_encoder.embedding_dim, shard_size=300, total=len(items))
    assert any("texts/s" in r.getMessage() for r in caplog.records)  # progress: texts and their rate
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["model"] == "tiny" and manifest["count"] == 700
    assert manifest["dim"] == 64 and [s["count"] for s in manifest["shards"]] == [300, 300, 100]
    assert manifest["config"]["shard_size"] == 300 and len(manifest["config_hash"]) == 16
    assert isinstance(shards.array(1), np.memmap) and shards.array(1).shape == (300, 64)
    assert shards.ids() == [pid for pid, _ in items]
    direct = tiny_encoder.encode([t for _, t in items], "passage", batch_size=32)
    np.testing.assert_allclose(shards.to_array(), direct, atol=2e-6)
    rows = np.array([699, 0, 301, 301, 299])
    np.testing.assert_array_equal(shards.take(rows), shards.to_array()[rows])
    # A finished folder is answered from disk: nothing encoded again.
    calls: list[int] = []
    again = encode_corpus(encoder_fn(tiny_encoder, calls), iter(items), tmp_path / "emb", model="tiny",
                          config=CONFIG, dim=64, shard_size=300, progress=False)
    assert calls == [] and again.ids() == shards.ids()


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from hydra.utils import instantiate
    from conftest import model_config
    from test_corpus import CONFIG, passages
    from hybrid_retrieval.evaluation.corpus import encode_corpus

    encoder = instantiate(model_config("tiny")).eval()
    calls = []

    def encode(texts):
        calls.append(len(texts))
        if len(calls) == 3:  # in the middle of shard 2 (two slices a shard): a real kill, no clean-up
            os.kill(os.getpid(), signal.SIGKILL)
        return encoder.encode(texts, "passage", batch_size=32)

    encode_corpus(encode, iter(passages(1000)), {folder!r}, model="tiny", config=CONFIG, dim=64, shard_size=200,
                  progress=False)
""")


@pytest.mark.slow
def test_a_killed_encoding_resumes_without_re_encoding_finished_shards(tiny_encoder: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hybrid_retrieval.evaluation.corpus as corpus

    monkeypatch.setattr(corpus, "PROGRESS_SLICE", 100)  # two encoder calls a shard, here and in the child
    folder = tmp_path / "emb"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=str(REPO_ROOT / "tests"), folder=str(folder)).replace(
        "from hybrid_retrieval.evaluation.corpus import encode_corpus",
        "import hybrid_retrieval.evaluation.corpus as c; c.PROGRESS_SLICE = 100; encode_corpus = c.encode_corpus"))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and [s["count"] for s in manifest["shards"]] == [200]
    with pytest.raises(CorpusEncodingError, match="the encoding is not finished"):
        open_embeddings(folder)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-00000.*")}
    (folder / ".shard-00001.npy.partial").write_bytes(b"half a shard")  # what a kill during a write leaves

    calls: list[int] = []
    items = passages(1000)
    resumed = encode_corpus(encoder_fn(tiny_encoder, calls), iter(items), folder, model="tiny", config=CONFIG,
                            dim=64, shard_size=200, progress=False)
    assert sum(calls) == 800  # only the unfinished shards
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-00000.*")} == finished
    assert not list(folder.glob(".*.partial")) and len(resumed) == 1000 and resumed.ids() == [i for i, _ in items]
    whole = encode_corpus(encoder_fn(tiny_encoder), iter(items), tmp_path / "whole", model="tiny", config=CONFIG,
                          dim=64, shard_size=200, progress=False)
    np.testing.assert_allclose(resumed.to_array(), whole.to_array(), atol=1e-6)


def test_folders_of_another_config_or_corpus_are_refused(tiny_encoder: Any, tmp_path: Path) -> None:
    items = passages(250)
    folder = tmp_path / "emb"
    encode = encoder_fn(tiny_encoder)
    encode_corpus(encode, iter(items[:150]), folder, model="tiny", config=CONFIG, dim=64, shard_size=100,
                  progress=False, option="dataset.embeddings_dir")
    with pytest.raises(CorpusEncodingError, match=r"dataset\.embeddings_dir=.* holds embeddings of another config "
                                                  r"\(model 'tiny'"):
        encode_corpus(encode, iter(items), folder, model="tiny", config={**CONFIG, "passage_text": "title_text"},
                      dim=64, shard_size=100, progress=False, option="dataset.embeddings_dir")
    with pytest.raises(CorpusEncodingError, match="another config"):  # the shard size decides the chunks
        encode_corpus(encode, iter(items), folder, model="tiny", config=CONFIG, dim=64, shard_size=50,
                      progress=False)
    # Resuming a partial folder over a corpus that changed under it: caught on the finished shards' ids.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusEncodingError, match="shard 0 holds other passages than the corpus gives now"):
        encode_corpus(encode, iter(items[1:]), folder, model="tiny", config=CONFIG, dim=64, shard_size=100,
                      progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusEncodingError, match=r"is not empty \(\['notes\.txt'\]\) and holds no manifest\.json"):
        encode_corpus(encode, iter(items), tmp_path / "other", model="tiny", config=CONFIG, dim=64, progress=False)
    with pytest.raises(ValueError, match="shard_size=0"):
        encode_corpus(encode, iter(items), tmp_path / "x", model="tiny", config=CONFIG, dim=64, shard_size=0)


def test_fingerprint_follows_the_weights(tiny_encoder: Any) -> None:
    import copy

    import torch

    first = encoder_fingerprint(tiny_encoder)
    assert encoder_fingerprint(tiny_encoder) == first
    changed = copy.deepcopy(tiny_encoder)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert encoder_fingerprint(changed) != first


# ------------------------------------------------------------------------------------------ indexes on shards


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddingShards, np.ndarray, np.ndarray]:
    """6,000 x 64 embeddings as 4 memory-mapped shards, 100 queries, and the exact top 100 of each."""
    x = clustered(6000, 64, 0)
    folder = tmp_path_factory.mktemp("stored") / "emb"
    shards = write_embedding_shards(folder, ((list(map(str, range(s, s + 1500))), x[s:s + 1500])
                                             for s in range(0, 6000, 1500)), model="m", config={"seed": 0})
    queries = clustered(100, 64, 1)
    exact = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :100]
    return shards, queries, exact


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_flat_from_shards_and_sharded_flat_are_exact(stored: tuple[EmbeddingShards, np.ndarray, np.ndarray],
                                                     tmp_path: Path) -> None:
    shards, queries, exact = stored
    whole = build_index(shards, {"type": "flat"}, model="m")
    assert isinstance(whole, PassageIndex) and whole.ids == [str(i) for i in range(6000)]
    assert whole.extra["embeddings_config_hash"] == shards.config_hash
    split = build_index(shards, {"type": "flat", "shard_size": 2500})  # parts straddle the embedding shards
    assert isinstance(split, ShardedIndex) and split.starts == [0, 2500, 5000]
    assert [p.ntotal for p in split.parts] == [2500, 2500, 1000]
    s1, r1 = whole.search(queries, 100)
    s2, r2 = split.search(queries, 100)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    assert recall(r2, exact) == 1.0 and recall(r1, exact) == 1.0
    assert (np.diff(s2, axis=1) <= 1e-7).all()  # merged best first
    loaded = load_index(save_index(split, tmp_path / "idx"))
    assert isinstance(loaded, ShardedIndex) and loaded.ids == split.ids and loaded.starts == split.starts
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "ids.txt", "index-00000.faiss", "index-00001.faiss", "index-00002.faiss", "manifest.json"]
    np.testing.assert_array_equal(loaded.search(queries, 100)[1], r2)


@pytest.mark.slow
def test_ivfpq_trained_on_a_sample_and_rerank(stored: tuple[EmbeddingShards, np.ndarray, np.ndarray],
                                              tmp_path: Path) -> None:
    shards, queries, exact = stored
    spec = {"type": "ivfpq", "nlist": 16, "m": 16, "nbits": 6, "nprobe": 16, "train_size": 2600}
    plain = build_index(shards, spec)
    assert plain.spec["factory"] == "IVF16,PQ16x6"
    reranked = build_index(shards, {**spec, "rerank": 1000, "shard_size": 3000})
    r_plain, r_rerank = recall(plain.search(queries, 100)[1], exact), recall(reranked.search(queries, 100)[1], exact)
    assert r_plain < 0.8 and r_rerank > 0.98  # 12 bytes a vector lose the order; exact re-scoring restores it
    scores, rows = reranked.search(queries, 100)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, shards.to_array()[rows]), atol=1e-5)
    # Saved next to the embeddings and reloaded: the manifest points at them, so rerank works after loading.
    folder = save_index(reranked, shards.folder.parent / "index-ivfpq")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["embeddings"] == str(shards.folder.resolve()) and manifest["spec"]["rerank"] == 1000
    np.testing.assert_array_equal(load_index(folder).search(queries, 100)[1], rows)
    # Every part is a copy of one trained index: the same lists and code books.
    import faiss

    centroids = [faiss.extract_index_ivf(p).quantizer.reconstruct_n(0, 16) for p in reranked.parts]
    np.testing.assert_array_equal(centroids[0], centroids[1])
    without = PassageIndex(plain.index, plain.ids, {**plain.spec, "rerank": 10})
    with pytest.raises(ValueError, match="index.rerank needs the passage embeddings"):
        without.search(queries, 5)


def test_ivfpq_config_errors_come_before_any_work() -> None:
    with pytest.raises(IndexConfigError, match=r"index\.m=7: must divide the embedding dimension 64"):
        resolve_index_spec({"type": "ivfpq", "m": 7}, count=5000, dim=64)
    with pytest.raises(IndexConfigError, match=r"index\.m=null picks dim/8 sub-quantisers, but 100 is not"):
        resolve_index_spec({"type": "ivfpq"}, count=5000, dim=100)
    with pytest.raises(IndexConfigError, match=r"index\.nbits=8 needs at least 256 training passages.*200 are used"):
        resolve_index_spec({"type": "ivfpq", "nlist": 4, "train_size": 200}, count=5000, dim=64)
    with pytest.raises(IndexConfigError, match=r"index\.shard_size=0: expected null or a positive integer"):
        resolve_index_spec({"type": "flat", "shard_size": 0})
    with pytest.raises(IndexConfigError, match=r"index\.factory='IVF8,PQ7'.*64-dimensional"):
        resolve_index_spec({"type": "ivfpq", "factory": "IVF8,PQ7"}, count=5000, dim=64)
    resolved = resolve_index_spec({"type": "ivfpq"}, count=100_000, dim=384)
    assert resolved["factory"] == "IVF1264,PQ48x8" and resolved["train_size"] == 40 * 1264
