"""Zero-shot evaluation from the command line: ``python -m hybrid_retrieval.evaluate model=me5_small dataset=xquad_r``.

Encodes the dataset's queries and candidates, computes the protocol (mono / cross / multilingual), prints the
table, writes ``metrics.json`` (and the top-10 rankings) into the run folder and logs everything to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from hybrid_retrieval.config_checks import check_evaluate_config
from hybrid_retrieval.data.lareqa import LareqaSplit, load_split
from hybrid_retrieval.evaluation.evaluator import EvaluationResult, evaluate_encoder
from hybrid_retrieval.evaluation.heatmap import plot_cross_lingual_heatmap
from hybrid_retrieval.evaluation.index import write_rankings
from hybrid_retrieval import tracking


def load_dataset(dataset: DictConfig) -> LareqaSplit:
    return load_split(dataset.name, root=dataset.get("root"), languages=dataset.get("languages"),
                      max_questions_per_language=dataset.get("max_questions_per_language"))


def encode_dtype(hardware: DictConfig) -> torch.dtype | None:
    return torch.bfloat16 if hardware.encode_dtype == "bfloat16" else None


def write_report(result: EvaluationResult, split: LareqaSplit, folder: Path, prefix: str = "") -> list[Path]:
    """metrics.json and the cross-lingual heatmap, in ``folder``; returns the files written."""
    metrics = result.save_json(folder / f"{prefix}metrics.json")
    heatmap = plot_cross_lingual_heatmap(result.cross_matrix(split.languages), split.languages,
                                         folder / f"{prefix}cross_lingual_map.png",
                                         title=f"{split.name} mAP: query x candidate language")
    return [metrics, heatmap]


def evaluate(cfg: DictConfig) -> EvaluationResult:
    """Run the evaluation that ``cfg`` describes (validated first) and log it; returns the result."""
    check_evaluate_config(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    split = load_dataset(cfg.dataset)
    encoder = instantiate(cfg.model)
    encoder.eval()
    client, run_id = tracking.start_run(cfg.logger.tracking_uri, cfg.logger.experiment_name,
                                        cfg.get("run_name"), tags={"job": "evaluate"})
    try:
        tracking.log_params(client, run_id, tracking.flatten_config(cfg))
        result = evaluate_encoder(encoder, split, candidate_text=cfg.dataset.candidate_text,
                                  batch_size=cfg.hardware.encode_batch_size, dtype=encode_dtype(cfg.hardware),
                                  num_threads=cfg.hardware.num_threads)
        folder = Path(tracking.job_context()["output_dir"])
        files = write_report(result, split, folder)
        if cfg.get("save_embeddings"):
            for name, matrix in (("query_emb", result.query_emb), ("candidate_emb", result.candidate_emb)):
                np.save(folder / f"{name}.npy", matrix)
        if cfg.get("rankings_top_k"):
            # Rankings re-encode nothing: they reuse the embeddings kept on the result.
            files.append(write_rankings(folder / "rankings.jsonl", split, result.query_emb, result.candidate_emb,
                                        k=int(cfg.rankings_top_k)))
        tracking.log_metrics(client, run_id, {**result.flat(), **{f"time/{k}": v for k, v in result.timings.items()}})
        tracking.log_hydra_configs(client, run_id)
        for path in files:
            tracking.with_retry(lambda: client.log_artifact(run_id, str(path)))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    print(f"\n{split.name}: {len(split.queries)} queries, {len(split.candidates)} candidates, "
          f"candidate text = {cfg.dataset.candidate_text}, model = {cfg.model.name}")
    print(result.table())
    print(f"\nencoding {result.timings['encode_s']:.1f} s, metrics {result.timings['metrics_s']:.2f} s")
    print(f"metrics: {folder / 'metrics.json'}")
    print(f"MLflow UI: {tracking.ui_command(cfg.logger.tracking_uri)}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    result = evaluate(cfg)
    return float(np.nan_to_num(result.summary["multi"]["map"]))


if __name__ == "__main__":
    main()
