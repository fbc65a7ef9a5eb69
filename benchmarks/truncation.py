"""Retrieval quality at truncated embedding sizes (Matryoshka): full XQuAD-R (or MLQA-R) encoded once, then the
mono / cross / multilingual mAP and the language bias (rank distance) of the first k dimensions, re-normalised
(what ``model.truncate_dim=k`` evaluates), for each k.

    python benchmarks/truncation.py --model me5_small --dims 384 256 128 64 [--model-path <run>/model]
        [--dataset xquad_r] [--embeddings folder] [--out docs/results/truncation/me5_small.md]

``--embeddings``: a folder with query_emb.npy / candidate_emb.npy (``python -m hybrid_retrieval.evaluate
save_embeddings=true`` writes them; so does this script, into the same folder, after encoding). Besides quality, the
table gives the flat index's size at each k (float32: 4 k bytes per passage).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.evaluator import evaluate_split
from machine import cpu_description  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]


def truncated(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components re-normalised, as ``Encoder.encode`` with ``truncate_dim=dim``."""
    part = embeddings[:, :dim].astype(np.float32)
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def encode(args: argparse.Namespace, split) -> tuple[np.ndarray, np.ndarray]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{args.model}.yaml")
    if args.model_path:
        config.path = args.model_path
    encoder = instantiate(config)
    queries = encoder.encode(split.query_texts(), "query", batch_size=64)
    candidates = encoder.encode(split.candidate_texts("sentence"), "passage", batch_size=64)
    return queries, candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="me5_small")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dataset", default="xquad_r", choices=["xquad_r", "mlqa_r"])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64])
    parser.add_argument("--embeddings", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = load_split(args.dataset)
    started = time.perf_counter()
    files = [args.embeddings / f"{n}.npy" for n in ("query_emb", "candidate_emb")] if args.embeddings else []
    if files and all(f.is_file() for f in files):
        queries, candidates = (np.load(f) for f in files)
        how = f"embeddings from {args.embeddings}"
    else:
        queries, candidates = encode(args, split)
        how = f"encoded in {time.perf_counter() - started:.0f} s"
        if args.embeddings:
            args.embeddings.mkdir(parents=True, exist_ok=True)
            np.save(files[0], queries)
            np.save(files[1], candidates)
    full = queries.shape[1]
    dims = [d for d in args.dims if d <= full]
    lines = [f"{args.dataset}, {len(split.queries)} queries x {len(split.candidates)} candidates, model "
             f"{args.model_path or args.model} (zero-shot unless a path is given); {how}; {cpu_description()}", "",
             "| dims | Mo mAP | Cr mAP | Mul mAP | rank distance | Mo / full | Cr / full | Mul / full | index MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    reference = None
    for dim in dims:
        result = evaluate_split(truncated(queries, dim), truncated(candidates, dim), split, num_threads=args.threads)
        s = result.summary
        values = (s["mono"]["map"], s["cross"]["map"], s["multi"]["map"])
        reference = reference or values
        ratios = " | ".join(f"{v / r:.3f}" for v, r in zip(values, reference))
        lines.append(f"| {dim} | {values[0]:.4f} | {values[1]:.4f} | {values[2]:.4f} | "
                     f"{s['multi']['rank_distance']:.1f} | {ratios} | {4 * dim * len(split.candidates) / 2**20:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
