"""Metric time after encoding at full XQuAD-R size (13,090 queries x 13,014 candidates).

Compares, in one run: the bare score matmul, the evaluator's metrics (scores + exact ranks + every setting),
and the straightforward per-query computation (sort each query's scores, read ranks off), which must give
identical ranks.

    python benchmarks/bench_metrics.py [--embeddings run_folder_with_query_emb.npy] [--threads 2]

Without --embeddings, embeddings are synthetic: each parallel group shares a direction plus noise, so ranks
spread like a real multilingual encoder's (relevant items from rank 1 to thousands).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_split
from hybrid_retrieval.evaluation.ranks import relevant_ranks, relevant_ranks_reference, score_chunks
from machine import cpu_description  # benchmarks/machine.py (the script's own folder is on sys.path)


def synthetic_embeddings(split, dim: int = 384, noise: float = 1.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = sorted({q.group for q in split.queries})
    direction = {g: rng.standard_normal(dim) for g in groups}
    language_shift = {lang: rng.standard_normal(dim) * 0.8 for lang in split.languages}
    queries = np.stack([direction[q.group] + language_shift[q.language] + noise * rng.standard_normal(dim)
                        for q in split.queries])
    # A candidate shares the direction of the questions it answers (first one), else random.
    owner = {}
    for i, rel in enumerate(split.relevant):
        for c in rel:
            owner.setdefault(int(c), split.queries[i].group)
    candidates = np.stack([
        (direction[owner[c]] if c in owner else rng.standard_normal(dim))
        + language_shift[split.candidates[c].language] + noise * rng.standard_normal(dim)
        for c in range(len(split.candidates))])
    for matrix in (queries, candidates):
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return queries.astype(np.float32), candidates.astype(np.float32)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="folder with query_emb.npy and candidate_emb.npy for the full XQuAD-R split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--chunk-sizes", default="",
                        help="also time the rank pass alone at these query chunk sizes, e.g. 128,256,512,1024")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = load_split("xquad_r", root=args.data_root)
    if args.embeddings:
        q = np.load(args.embeddings / "query_emb.npy")
        c = np.load(args.embeddings / "candidate_emb.npy")
        kind = f"embeddings from {args.embeddings}"
    else:
        q, c = synthetic_embeddings(split)
        kind = "synthetic embeddings"
    print(f"XQuAD-R: {len(q)} queries x {len(c)} candidates, {kind}, {args.threads} threads")
    print(f"CPU: {cpu_description()}")

    def bare_matmul() -> None:
        _ = q @ c.T

    matmul_s = best_of(bare_matmul, args.repeat)
    print(f"bare score matmul (q @ c.T):              {matmul_s:7.2f} s")
    metrics_s = best_of(lambda: evaluate_split(q, c, split, num_threads=args.threads), args.repeat)
    print(f"evaluator, all settings and metrics:      {metrics_s:7.2f} s   ({metrics_s / matmul_s:.2f}x the matmul)")
    result = evaluate_split(q, c, split, num_threads=args.threads)
    print(f"  mono mAP {result.summary['mono']['map']:.4f}, cross mAP {result.summary['cross']['map']:.4f}, "
          f"multi mAP {result.summary['multi']['map']:.4f}, rank distance {result.summary['multi']['rank_distance']:.1f}")
    lang_ids = split.candidate_language_ids()
    for size in [int(x) for x in args.chunk_sizes.split(",") if x]:
        seconds = best_of(lambda size=size: relevant_ranks(q, c, lang_ids, split.relevant, chunk_size=size,
                                                           num_threads=args.threads), args.repeat)
        print(f"  rank pass alone, chunks of {size:5d} queries: {seconds:7.2f} s   ({seconds / matmul_s:.2f}x the matmul)")
    if args.skip_reference:
        return
    lang = split.candidate_language_ids()
    start = time.perf_counter()
    scores = np.concatenate([block.copy() for _, block in score_chunks(q, c)])
    reference = relevant_ranks_reference(scores, lang, split.relevant)
    reference_s = time.perf_counter() - start
    fast = relevant_ranks(q, c, lang, split.relevant, num_threads=args.threads)
    identical = all(np.array_equal(getattr(fast, f), getattr(reference, f))
                    for f in ("query_index", "candidate_index", "rank_in_language", "rank_overall"))
    print(f"straightforward per-query ranks:          {reference_s:7.2f} s   ({reference_s / metrics_s:.1f}x slower)")
    print(f"ranks identical to the straightforward computation: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
