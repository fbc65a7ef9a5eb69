"""Evaluation from the command line: ``python -m hybrid_retrieval.evaluate model=me5_small dataset=xquad_r``.

Any model: a configured one (``model=...``), an exported folder (``model.path=<run folder>/model``) or a training
checkpoint (``checkpoint=<run folder>/checkpoints/best.ckpt``). Encodes the evaluation sets, computes the protocol
(mono / cross / multilingual), prints the table, writes ``metrics.json``, the heatmap and the top-10 rankings into
the run folder, and logs everything to MLflow under the same metric names as training's validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.fingerprint import evaluation_data
from hybrid_retrieval.evaluation.lareqa_protocol import EvaluationResult, evaluate_split
from hybrid_retrieval.evaluation.index import write_rankings
from hybrid_retrieval.evaluation.lareqa import LareqaSet
from hybrid_retrieval.evaluation.sets import describe, evaluate_set, load_evaluation_sets, metric_values, write_reports
from hybrid_retrieval.hardware import encode_dtype, encode_dtype_name
from hybrid_retrieval.models.source import load_model
from hybrid_retrieval.run_folder import job_folder


def check_evaluate_config(cfg: DictConfig) -> None:
    """Every option evaluate reads, before any model loads: each node by its owner."""
    from hybrid_retrieval.evaluation.config import check_dataset, check_extra_datasets
    from hybrid_retrieval.hardware import check_device, check_hardware
    from hybrid_retrieval.models.config import check_model
    from hybrid_retrieval.run_folder import check_checkpoint_file

    if cfg.get("checkpoint") is not None:
        check_checkpoint_file(cfg.checkpoint)
    else:  # a checkpoint carries its own model config
        check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_extra_datasets(cfg)
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    tracking.check_logger(cfg)

def saved_embeddings(folder: str, main: object) -> tuple[np.ndarray, np.ndarray]:
    """``embeddings=<folder>``'s query and candidate matrices, checked against the main set before any model loads."""
    if not isinstance(main, LareqaSet):
        raise ConfigError(f"embeddings={folder!r}: only a LAReQA main set (xquad_r, mlqa_r) is scored from saved "
                          "embeddings")
    split = main.split
    matrices = []
    for name, rows in (("query_emb", len(split.queries)), ("candidate_emb", len(split.candidates))):
        path = Path(str(folder)).expanduser() / f"{name}.npy"
        if not path.is_file():
            raise ConfigError(f"embeddings={folder!r}: {path} does not exist; write it with save_embeddings=true "
                              "(evaluate or run.py) for the same dataset")
        matrix = np.load(path, mmap_mode="r")
        if matrix.ndim != 2 or matrix.shape[0] != rows:
            raise ConfigError(f"embeddings={folder!r}: {path} holds {matrix.shape} but {main.describe()} has {rows} "
                              f"{name.split('_')[0]} rows: embeddings of another dataset or slice")
        matrices.append(np.asarray(matrix, dtype=np.float32))
    return matrices[0], matrices[1]


def rescore(encoder: object, main: LareqaSet, saved: tuple[np.ndarray, np.ndarray], num_threads: int
            ) -> EvaluationResult:
    """The main set scored from saved embeddings, through the encoder's language projection when it has one."""
    query_emb, candidate_emb = saved
    projection = getattr(encoder, "language_projection", None)
    if projection is not None:
        query_emb, candidate_emb = projection.apply(query_emb), projection.apply(candidate_emb)
    result = evaluate_split(query_emb, candidate_emb, main.split, num_threads=num_threads)
    result.timings.update({"encode_s": 0.0, "texts": 0.0})  # nothing encoded
    result.query_emb, result.candidate_emb = query_emb, candidate_emb
    return result


def evaluate(cfg: DictConfig) -> dict[str, EvaluationResult]:
    """Run the evaluation that ``cfg`` describes (validated first) and log it; returns the result of each set."""
    check_evaluate_config(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    sets = load_evaluation_sets(cfg.dataset, cfg.get("extra_datasets"))
    saved = saved_embeddings(cfg.get("embeddings"), sets[0]) if cfg.get("embeddings") else None
    encoder = load_model(cfg)
    folder = job_folder()
    results: dict[str, EvaluationResult] = {}
    tags = {"model": encoder.name, "dataset": cfg.dataset.name, "encode_dtype": encode_dtype_name(cfg.hardware)}
    if cfg.get("checkpoint"):
        tags["checkpoint"] = str(cfg.checkpoint)
    with tracking.mlflow_run(cfg, job="evaluate", tags=tags,
                             title=f"evaluate {encoder.name} on {cfg.dataset.name}") as run:
        run.log_datasets(evaluation_data(cfg.dataset, cfg.get("extra_datasets"), sets))
        metrics: dict[str, float] = {}
        for i, evaluation_set in enumerate(sets):
            if i == 0 and saved is not None:
                result = rescore(encoder, evaluation_set, saved, cfg.hardware.num_threads)
            else:
                result = evaluate_set(encoder, evaluation_set, batch_size=cfg.hardware.encode_batch_size,
                                      dtype=encode_dtype(cfg.hardware), num_threads=cfg.hardware.num_threads)
            results[evaluation_set.key] = result
            metrics.update(metric_values(result, evaluation_set.key, main=i == 0))
        files = write_reports(results, sets, folder)
        main, result = sets[0], results[sets[0].key]
        lareqa = isinstance(main, LareqaSet)  # embeddings and rankings of the LAReQA protocol's pool
        if cfg.get("save_embeddings") and lareqa:
            for name, matrix in (("query_emb", result.query_emb), ("candidate_emb", result.candidate_emb)):
                np.save(folder / f"{name}.npy", matrix)
        if cfg.get("rankings_top_k") and lareqa:
            # Rankings re-encode nothing: they reuse the embeddings kept on the result.
            files.append(write_rankings(folder / "rankings.jsonl", main.split, result.query_emb,
                                        result.candidate_emb, k=int(cfg.rankings_top_k)))
        run.log_metrics(metrics)
        for path in files:
            run.log_artifact(path)
    for i, evaluation_set in enumerate(sets):
        print(f"\n{'' if i == 0 else evaluation_set.key + ': '}{describe(evaluation_set)}, model = {encoder.name}")
        print(results[evaluation_set.key].table())
        timings = results[evaluation_set.key].timings
        print(f"encoding {timings['encode_s']:.1f} s, metrics {timings['metrics_s']:.2f} s")
    wall = process_seconds()
    if wall is not None:
        encoding = sum(r.timings.get("encode_s", 0.0) for r in results.values())
        print(f"wall {wall:.1f} s since the process started: encoding {encoding:.1f} s, everything else (start-up, "
              f"loading, tokenising, ranks, metrics, reports) {wall - encoding:.1f} s = "
              f"{(wall - encoding) / max(encoding, 1e-9):.1%} beyond encoding")
    tracking.print_summary({"metrics": folder / "metrics.json",
                            "plots": " ".join(str(p) for p in files if str(p).endswith(".png")),
                            "run folder": folder}, run)
    return results


def process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): imports and start-up included."""
    import os

    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


@hydra_main("evaluate")
def main(cfg: DictConfig) -> float:
    results = evaluate(cfg)
    summary = results[cfg.dataset.name].summary  # what a sweeper optimises: multilingual mAP, else the first metric
    value = summary["multi"]["map"] if "multi" in summary else next(iter(next(iter(summary.values())).values()))
    return float(np.nan_to_num(value))


if __name__ == "__main__":
    main()
