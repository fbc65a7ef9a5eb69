"""FAISS indexes on a synthetic corpus of 1M x 384 embeddings: build time, queries/s, size, Recall@100 against Flat.

    python benchmarks/bench_index.py [--n 1000000] [--dim 384] [--queries 1000] [--threads 2] \
        [--work /tmp/bench_index] [--out docs/results/index_benchmark.md] [--only flat,ivfpq]

The corpus is written once as memory-mapped embedding shards (hybrid_retrieval/evaluation/corpus.py, 100k rows a
shard) and every index is built from them block by block, as for a real corpus. Vectors: 4,096 random centres plus
Gaussian noise with a power-law spectrum (variance of dimension j ~ 1/j), L2-normalised; queries drawn the same way.
The noise is much larger than the centres, so neighbourhoods are nearly unclustered: a hard case for IVF lists and
product quantisation (real sentence embeddings cluster more), so their recalls here are lower bounds; Flat and the
sharded Flat are exact whatever the data. Recall@100 = share of the exact (Flat) top 100 that an index returns in
its top 100, averaged over queries. The table is rewritten after each index, so an interrupted run keeps what it
measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hybrid_retrieval.evaluation.corpus import EmbeddingShards, open_embeddings, write_embedding_shards
from hybrid_retrieval.evaluation.index import build_index, load_index, save_index
from machine import cpu_description

CONFIGS: dict[str, dict[str, Any]] = {
    "flat": {"type": "flat"},
    "flat_sharded": {"type": "flat", "shard_size": 250_000},
    "ivf": {"type": "ivf", "nprobe": 16, "train_size": 160_000},
    "ivfpq": {"type": "ivfpq"},
    "ivfpq_rerank": {"type": "ivfpq", "rerank": 1000},  # the ivfpq index, re-scored from the embeddings on disk
    "hnsw": {"type": "hnsw", "M": 32, "ef_construction": 40, "ef_search": 128},
}
NOTES = {
    "flat": "exact inner product, every vector scanned",
    "flat_sharded": "4 Flat indexes of 250k, merged by score",
    "ivf": "IVF4000,Flat, nprobe 16, k-means on 160k",
    "ivfpq": "IVF4000,PQ48x8 (48 B/vector), nprobe 32, trained on 160k",
    "ivfpq_rerank": "the same + top 1,000 re-scored exactly from the memory-mapped shards",
    "hnsw": "HNSW32, efConstruction 40 (200 in conf/index/hnsw.yaml: ~5x the build time), efSearch 128",
}


def synthetic(n: int, dim: int, seed: int, centres: np.ndarray, chunk: int = 100_000):
    """(ids, vectors) chunks of clustered, L2-normalised vectors."""
    rng = np.random.default_rng(seed)
    spectrum = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        which = rng.integers(0, len(centres), size)
        x = centres[which] + 0.35 * rng.standard_normal((size, dim), dtype=np.float32) * spectrum * np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield [str(i) for i in range(start, start + size)], x.astype(np.float32)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def write_table(path: Path, rows: list[dict[str, Any]], header: str) -> None:
    lines = [header, "",
             "| index | build s | queries/s | index MB | RSS +MB | Recall@100 vs Flat | config |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['build_s']:.1f} | {r['qps']:.0f} | {r['size_mb']:.0f} | {r['rss_mb']:.0f} | "
                     f"{r['recall']:.4f} | {r['note']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_index"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/index_benchmark.md"))
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, args.dim), dtype=np.float32) * (np.arange(1, args.dim + 1) ** -0.5)
    centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)

    folder = args.work / f"emb-{args.n}x{args.dim}"
    started = time.perf_counter()
    try:
        corpus: EmbeddingShards = open_embeddings(folder)
    except ValueError:
        shutil.rmtree(folder, ignore_errors=True)
        corpus = write_embedding_shards(folder, synthetic(args.n, args.dim, 1, centres), model="synthetic",
                                        config={"n": args.n, "dim": args.dim, "seed": 1})
    print(f"corpus: {len(corpus):,} x {corpus.dim} in {folder} ({time.perf_counter() - started:.1f} s)", flush=True)
    _, queries = next(synthetic(args.queries, args.dim, 2, centres, chunk=args.queries))

    load = os.getloadavg()[0]
    header = (f"# FAISS indexes on {len(corpus):,} x {corpus.dim} synthetic embeddings\n\n"
              f"`python benchmarks/bench_index.py --n {args.n} --threads {args.threads}` "
              f"({time.strftime('%Y-%m-%d')}; faiss {faiss.__version__}, {args.threads} threads; {args.queries:,} "
              f"queries, top {args.k}).\n\nCPU: {cpu_description()}; load average {load:.1f} when it started "
              "(other jobs shared the machine, so times are upper bounds).\n\nbuild s = train + add, from the "
              "memory-mapped shards; queries/s = one batch of all queries; index MB = saved size; RSS +MB = "
              "resident memory the built index added; Recall@100 = share of the exact top 100 returned.")
    rows: list[dict[str, Any]] = []
    exact = None
    for name in args.only.split(","):
        spec = CONFIGS[name]
        before = rss_mb()
        if name == "ivfpq_rerank" and "ivfpq" in [r["name"] for r in rows]:
            index = load_index(args.work / "index-ivfpq", vectors=corpus)  # the same index, re-scoring on
            index.spec["rerank"] = spec["rerank"]
            build_s = next(r["build_s"] for r in rows if r["name"] == "ivfpq")
        else:
            start = time.perf_counter()
            index = build_index(corpus, spec, model="synthetic")
            build_s = time.perf_counter() - start
        grown = rss_mb() - before
        start = time.perf_counter()
        _, found = index.search(queries, args.k)
        qps = len(queries) / (time.perf_counter() - start)
        if exact is None:
            if name != "flat":
                exact = build_index(corpus, {"type": "flat"}).search(queries, args.k)[1]
            else:
                exact = found
        saved = save_index(index, args.work / f"index-{name}")
        rows.append({"name": name, "build_s": build_s, "qps": qps, "size_mb": folder_mb(saved), "rss_mb": grown,
                     "recall": recall_at(found, exact), "note": NOTES[name]})
        print(rows[-1], flush=True)
        del index
        write_table(args.out, rows, header)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
