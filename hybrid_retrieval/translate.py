"""Machine-translate training pairs: ``python -m hybrid_retrieval.translate translate.input=<file>
translate.source_language=es translate.target_languages=[sw,yo]``.

Input: SQuAD-format JSON (one language) or the training JSONL. Output: training JSONL (the source rows, then
their translations, sharing their groups) for ``python run.py train_data=jsonl train_data.path=<output>``, with
``<output stem>.provenance.jsonl`` beside it (line i: model, source language, source row and group of line i).
Translations go through a cache appended batch by batch, so a killed run resumes where it stopped. The input,
options, language codes and model are checked before any model is loaded and before the MLflow run starts.
See ``hybrid_retrieval/translation/`` and ``conf/translate.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.data.fingerprint import describe
from hybrid_retrieval.run_folder import job_folder
from hybrid_retrieval.translation.job import TranslateJob, prepare_job, run_job
from hybrid_retrieval.translation.stage import TranslationStopped


def translate(cfg: DictConfig) -> TranslateJob:
    """Run the translation that ``cfg`` describes (checked first) and log it; returns the job with its stats."""
    import torch

    folder = job_folder()
    job = prepare_job(cfg, folder)
    torch.set_num_threads(cfg.hardware.num_threads)
    tags = {"model": ",".join(sorted(set(job.models.values()))), "source_language": job.source_language,
            "target_languages": ",".join(job.targets)}
    stopped: TranslationStopped | None = None
    with tracking.mlflow_run(cfg, job="translate", tags=tags,
                             title=f"translate {job.source_language} -> {','.join(job.targets)}") as run:
        # The pairs it translates: training data of the run that trains on its output.
        run.log_datasets([describe(job.rows, Path(str(cfg.translate.input)).name, "training",
                                   Path(str(cfg.translate.input)).expanduser().resolve())])
        try:
            output, provenance = run_job(job)
        except TranslationStopped as error:
            stopped = error
            run.set_tag("stopped_by", "max_batches")
        stats = job.stats.as_dict()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "translate_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        run.log_metrics({f"translate/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        run.log_artifact(folder / "translate_stats.json")
        run.set_tag("cache", str(job.cache))
        if stopped is None:
            run.set_tag("output", str(output))
    s = job.stats
    print(f"texts: {s.unique_texts} to translate ({s.cache_hits} from the cache {job.cache}, {s.translated} "
          f"translated in {s.model_batches} batches) in {s.seconds:.1f} s")
    if stopped is not None:
        print(f"{stopped}; no output written")
        tracking.print_summary({"cache": job.cache}, run)
        return job
    print(f"wrote {s.rows_written} rows ({len(job.rows)} input + translations into {', '.join(job.targets)}"
          f"{f'; {s.empty_dropped} left out: empty translation' if s.empty_dropped else ''}) to {output}")
    tracking.print_summary({"pairs": output, "provenance": provenance,
                            "train on it": f"python run.py train_data=jsonl train_data.path={output}"}, run)
    return job


@hydra_main("translate")
def main(cfg: DictConfig) -> None:
    translate(cfg)


if __name__ == "__main__":
    main()
