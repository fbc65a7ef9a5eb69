"""Mine hard negatives with a model: ``python -m hybrid_retrieval.mine output=mined/`` (rules in
:mod:`hybrid_retrieval.data.mining`).

Encodes the training data's queries and distinct passages (``train_data``, its holdout respected) with the model
(``model=...``, ``model.path=`` or ``checkpoint=``, also merged with ``merge_with=start``), mines one hard
negative per row and writes ``pairs.jsonl`` (the training JSONL: ``train_data=jsonl train_data.path=<output>/pairs.jsonl``),
``pairs.provenance.jsonl`` (model, rank, score, positive score and skipped candidates of every line) and
``mine.json`` (settings and counts), and logs an MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.pairs import build_datasets
from hybrid_retrieval.hardware import check_device, check_hardware
from hybrid_retrieval.data.mining import MiningSettings, mine_negatives, passage_pool
from hybrid_retrieval.models.source import check_model_source, encode_texts, load_model, model_source
from hybrid_retrieval.run_folder import output_folder

OUTPUT_FILES = ("pairs.jsonl", "pairs.provenance.jsonl", "mine.json")


def check_mine_config(cfg: DictConfig) -> MiningSettings:
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    check_model_source(cfg)
    options = cfg.mining
    try:
        settings = MiningSettings(tuple(options.rank_window), options.get("max_score_ratio"),
                                  bool(options.get("same_language", True)))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
    folder = output_folder(cfg)
    if (folder / OUTPUT_FILES[0]).exists() and not cfg.get("overwrite"):
        raise ConfigError(f"output={str(folder)!r} already holds {OUTPUT_FILES[0]}; choose another folder or pass "
                          "overwrite=true")
    return settings


def mine(cfg: DictConfig) -> Path:
    settings = check_mine_config(cfg)
    try:
        datasets = build_datasets(cfg.train_data)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"train_data: {error}") from error
    torch.set_num_threads(cfg.hardware.num_threads)
    encoder = load_model(cfg)
    folder = output_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    source = model_source(cfg)
    with tracking.mlflow_run(cfg, job="mine", tags={"model": encoder.name},
                             title=f"mine hard negatives with {encoder.name}") as run:
        started = time.perf_counter()
        counts = {"rows": 0, "with_negative": 0}
        skipped_total: dict[str, int] = {}
        rows_out, provenance = [], []
        for data in datasets:
            queries, passages = list(data.queries), list(data.passages)  # mining reads every row: once, in order
            texts, groups, languages, row_to_pool = passage_pool(passages, data.groups, data.languages)
            passage_emb, _ = encode_texts(encoder, texts, "passage", cfg.hardware)
            query_emb, _ = encode_texts(encoder, queries, "query", cfg.hardware)
            mined = mine_negatives(query_emb, passage_emb, data.groups, data.languages, row_to_pool, groups,
                                   languages, settings)
            for row, negative in enumerate(mined):
                language = data.language_names[int(data.languages[row])]
                text = texts[negative.passage] if negative.passage >= 0 else None
                rows_out.append({"group": f"{data.name}:{int(data.groups[row])}", "language": language,
                                 "query": queries[row], "passage": passages[row], "hard_negative": text})
                provenance.append({"line": len(rows_out), "dataset": data.name, "model": source,
                                   "rank": negative.rank, "score": negative.score,
                                   "positive_score": negative.positive_score, "skipped": negative.skipped})
                counts["rows"] += 1
                counts["with_negative"] += text is not None
                for reason, n in negative.skipped.items():
                    skipped_total[reason] = skipped_total.get(reason, 0) + n
        seconds = time.perf_counter() - started
        with (folder / OUTPUT_FILES[0]).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out)
        with (folder / OUTPUT_FILES[1]).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in provenance)
        summary = {"model": source, "settings": {"rank_window": list(settings.rank_window),
                                                 "max_score_ratio": settings.max_score_ratio,
                                                 "same_language": settings.same_language},
                   "train_data": OmegaConf.to_container(cfg.train_data, resolve=True), **counts,
                   "skipped_candidates": skipped_total, "seconds": round(seconds, 1)}
        (folder / OUTPUT_FILES[2]).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        run.log_metrics({"rows": counts["rows"], "with_negative": counts["with_negative"], "time/mine_s": seconds,
                         **{f"skipped/{k}": v for k, v in skipped_total.items()}})
        run.log_artifact(folder / OUTPUT_FILES[2])
    print(f"mined {counts['with_negative']} hard negatives for {counts['rows']} rows in {seconds:.1f} s "
          f"(skipped candidates: {skipped_total})")
    tracking.print_summary({"pairs": folder / OUTPUT_FILES[0],
                            "train on them": f"python run.py train_data=jsonl train_data.path={folder / OUTPUT_FILES[0]}"},
                           run)
    return folder


@hydra_main("mine")
def main(cfg: DictConfig) -> None:
    mine(cfg)


if __name__ == "__main__":
    main()
