"""Convert training data ahead of time: ``python -m hybrid_retrieval.prepare train_data=jsonl train_data.path=...``.

Builds every dataset of ``train_data`` into the pairs cache (:mod:`~hybrid_retrieval.data.pair_store`) with a
progress bar (a log line every 30 s off a terminal) and prints, per dataset, its rows, groups, languages, hard
negatives and cache folder. A dataset already converted is only opened; a conversion that was stopped resumes
after its last committed part. Training with the same ``train_data`` then starts from the cache. (The data is not
a result: no MLflow run is opened.)
"""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig

from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.pairs import build_datasets


def prepare(cfg: DictConfig) -> list[dict[str, Any]]:
    started = time.perf_counter()
    try:
        datasets = build_datasets(cfg.train_data)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"train_data: {error}") from error
    seconds = time.perf_counter() - started
    found = []
    for data in datasets:
        summary = data.summary()
        found.append({**summary, "cache": str(data.folder) if data.folder is not None else "(in memory)"})
        languages = ", ".join(f"{name} {rows:,}" for name, rows in summary["languages"].items())
        print(f"{data.name}: {summary['rows']:,} rows, {summary['groups']:,} groups, "
              f"{len(summary['languages'])} languages ({languages}), {summary['hard_negatives']:,} rows with hard "
              f"negatives (at most {data.max_hard_negatives} a row)")
        print(f"  cache: {found[-1]['cache']}")
    print(f"ready in {seconds:.1f} s; train with the same train_data options to read it from the cache")
    return found


@hydra_main("prepare")
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    main()
