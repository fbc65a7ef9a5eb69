"""Retrieval quality and index cost at truncated embedding sizes (Matryoshka): the mono / cross / multilingual mAP,
the language-bias measures (rank distance, Max@R, own-language-first rate) and the flat FAISS index's size and query
speed of the first k dimensions, re-normalised (what ``model.truncate_dim=k`` evaluates), for each k.

    python benchmarks/truncation.py --run LABEL=FOLDER [--run LABEL=FOLDER ...] [--dims 384 256 128 64]
        [--dataset xquad_r] [--out docs/results/truncation]
    python benchmarks/truncation.py --model me5_small [--model-path <run>/model] --embeddings FOLDER ...

A FOLDER holds query_emb.npy / candidate_emb.npy, as ``python -m hybrid_retrieval.evaluate save_embeddings=true``
writes them into its run folder (full XQuAD-R in fp32: the embeddings of the protocol's pool). A label given
several times (one folder per seed) is reported as mean ± standard deviation over its folders. ``--model`` encodes
instead (and, with ``--embeddings``, keeps the embeddings there for the next run). ``--out`` writes
``truncation.json`` (every figure, each run's own values and the commit of the checkout its folder lies in, the
command, the CPU), ``truncation.md`` and ``per_run.csv`` (one row per run folder and size).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from machine import cpu_description  # benchmarks/machine.py (the script's own folder is on sys.path)

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_split
from hybrid_retrieval.schemas import load_node

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("mono", "map", "Mo mAP"), ("cross", "map", "Cr mAP"), ("multi", "map", "Mul mAP"),
           ("multi", "rank_distance", "rank distance"), ("multi", "max_at_r", "Max@R"),
           ("multi", "own_language_first", "own-lang-first"))
KEPT = ("Mo mAP", "Cr mAP", "Mul mAP")  # reported also as a share of the full size's value


def truncated(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components re-normalised, as ``Encoder.encode`` with ``truncate_dim=dim``."""
    part = np.ascontiguousarray(embeddings[:, :dim], dtype=np.float32)
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def encode(model: str, model_path: str | None, split) -> tuple[np.ndarray, np.ndarray]:
    from hydra.utils import instantiate

    config = load_node(REPO_ROOT / "conf" / "model" / f"{model}.yaml")
    if model_path:
        config.path = model_path
    encoder = instantiate(config)
    queries = encoder.encode(split.query_texts(), "query", batch_size=64)
    candidates = encoder.encode(split.candidate_texts("sentence"), "passage", batch_size=64)
    return queries, candidates


def load_embeddings(folder: Path, check_only: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    files = [folder / f"{name}.npy" for name in ("query_emb", "candidate_emb")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--run: {', '.join(missing)} not found; write them with python -m "
                         f"hybrid_retrieval.evaluate save_embeddings=true (into the run folder) or use --model")
    if check_only:
        return None
    return np.load(files[0]), np.load(files[1])


def index_cost(queries: np.ndarray, candidates: np.ndarray, k: int = 100, repeats: int = 3) -> dict[str, float]:
    """Size of a flat inner-product FAISS index over ``candidates`` and its search speed (best of ``repeats``)."""
    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(candidates)
    size = faiss.serialize_index(index).size
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - started)
    return {"index_bytes": float(size), "queries_per_s": len(queries) / best}


def measure(queries: np.ndarray, candidates: np.ndarray, split, dims: list[int], threads: int) -> dict[int, dict]:
    """Every column of the table at each size, for one model's embeddings."""
    rows: dict[int, dict[str, float]] = {}
    for dim in dims:
        q, c = truncated(queries, dim), truncated(candidates, dim)
        summary = evaluate_split(q, c, split, num_threads=threads).summary
        rows[dim] = {name: float(summary[setting][metric]) for setting, metric, name in COLUMNS}
        rows[dim].update(index_cost(q, c))
    full = rows[dims[0]]
    for dim in dims:
        for name in KEPT:
            rows[dim][f"{name} kept"] = rows[dim][name] / full[name]
    return rows


def checkout_commit(folder: Path | None) -> str | None:
    """The commit of the git checkout a folder lies in (the code that trained and encoded it), or None."""
    where = folder if folder is not None and folder.exists() else REPO_ROOT
    found = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None


def parse_runs(values: list[str]) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for value in values:
        label, sep, folder = value.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--run {value!r}: expected LABEL=FOLDER (a folder with query_emb.npy/candidate_emb.npy)")
        runs.setdefault(label, []).append(Path(folder))
    return runs


def aggregate(per_run: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, dict[str, float]]]:
    """Mean and sample standard deviation (0 for one run) of every value at every size."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for dim in per_run[0]:
        out[dim] = {}
        for name in per_run[0][dim]:
            values = np.array([run[dim][name] for run in per_run])
            out[dim][name] = {"mean": float(values.mean()),
                              "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


def table(results: dict[str, Any]) -> str:
    def cell(value: dict[str, float], digits: int) -> str:
        return f"{value['mean']:.{digits}f}" + (f" ± {value['std']:.{digits}f}" if value["std"] else "")

    lines = ["| model | runs | dims | Mo mAP | Cr mAP | Mul mAP | rank distance | Max@R | own-lang-first "
             "| Mo kept | Cr kept | Mul kept | flat index MB | queries/s |", "|" + "---|" * 14]
    for label, entry in results["models"].items():
        for dim, row in entry["dims"].items():
            lines.append(
                f"| {label} | {len(entry['folders'])} | {dim} | {cell(row['Mo mAP'], 4)} | {cell(row['Cr mAP'], 4)} | "
                f"{cell(row['Mul mAP'], 4)} | {cell(row['rank distance'], 1)} | {cell(row['Max@R'], 1)} | "
                f"{cell(row['own-lang-first'], 3)} | {row['Mo mAP kept']['mean']:.3f} | "
                f"{row['Cr mAP kept']['mean']:.3f} | {row['Mul mAP kept']['mean']:.3f} | "
                f"{row['index_bytes']['mean'] / 2**20:.1f} | {row['queries_per_s']['mean']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=FOLDER")
    parser.add_argument("--model", default=None, help="encode with this conf/model entry instead of --run")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--embeddings", type=Path, default=None, help="with --model: keep the embeddings here")
    parser.add_argument("--dataset", default="xquad_r", choices=["xquad_r", "mlqa_r"])
    parser.add_argument("--languages", nargs="+", default=None, help="a subset of the dataset's languages")
    parser.add_argument("--max-questions", type=int, default=None, help="per language (parallel cap)")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for truncation.json and truncation.md")
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.model):
        raise SystemExit("give either --run LABEL=FOLDER (repeatable) or --model NAME")
    if sorted(args.dims, reverse=True) != args.dims or len(set(args.dims)) != len(args.dims):
        raise SystemExit(f"--dims {args.dims}: expected distinct sizes, largest first (the first is the reference)")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    runs = parse_runs(args.run) if args.run else {args.model_path or args.model: [args.embeddings]}
    if args.run:  # every folder checked before the split is loaded and anything is measured
        for folder in (f for folders in runs.values() for f in folders):
            load_embeddings(folder, check_only=True)
    split = load_split(args.dataset, languages=args.languages, max_questions_per_language=args.max_questions)
    results: dict[str, Any] = {"dataset": args.dataset, "queries": len(split.queries),
                               "candidates": len(split.candidates), "machine": cpu_description(),
                               "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                               "command": " ".join(["python", "benchmarks/truncation.py", *sys.argv[1:]]),
                               "table_commit": checkout_commit(None), "models": {}}
    for label, folders in runs.items():
        per_run = []
        for folder in folders:
            if args.run:
                queries, candidates = load_embeddings(folder)
            elif folder is not None and (folder / "query_emb.npy").is_file():
                queries, candidates = load_embeddings(folder)
            else:
                queries, candidates = encode(args.model, args.model_path, split)
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    np.save(folder / "query_emb.npy", queries)
                    np.save(folder / "candidate_emb.npy", candidates)
            dims = [d for d in args.dims if d <= queries.shape[1]]
            per_run.append(measure(queries, candidates, split, dims, args.threads))
            print(f"{label}: {folder} measured", flush=True)
        results["models"][label] = {"folders": [str(f) for f in folders], "dims": aggregate(per_run),
                                    "runs": [{"folder": str(f), "commit": checkout_commit(f), "dims": run}
                                             for f, run in zip(folders, per_run)]}
    text = (f"{args.dataset}: {results['queries']:,} queries x {results['candidates']:,} candidates; "
            f"{results['machine']}; FAISS flat inner-product index, top 100, {args.threads} threads, best of 3\n\n"
            + table(results))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "truncation.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "truncation.md").write_text(text + "\n")
        with (args.out / "per_run.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            names = [name for _, _, name in COLUMNS]
            writer.writerow(["model", "folder", "commit", "dims", *names])
            for label, entry in results["models"].items():
                for run in entry["runs"]:
                    for dim, row in run["dims"].items():
                        writer.writerow([label, run["folder"], run["commit"], dim,
                                         *(f"{row[name]:.6f}" for name in names)])
    return results


if __name__ == "__main__":
    main()
