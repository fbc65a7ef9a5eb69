"""Domain adaptation from the command line: ``python -m hybrid_retrieval.adapt [model=...] [adapt.<option>=...]``.

Reads the unlabelled text (``adapt.text``), continues masked language modelling of the model's backbone
(:func:`hybrid_retrieval.adaptation.mlm.adapt_encoder`), and exports the adapted encoder (pooling, prefixes
unchanged) to ``<run folder>/model`` or ``out``: a folder that ``model.path=`` loads. Logs ``adapt/...`` metrics
(held-out loss and perplexity before and after) to MLflow. Config, output folder and text are all checked
before the model is loaded and before the MLflow run starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.adaptation.mlm import (AdaptConfigError, adapt_encoder, adapt_tags, check_adapt_config,
                                             load_adapt_texts)
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.data.fingerprint import texts_data
from hybrid_retrieval.hardware import check_device, torch_device
from hybrid_retrieval.models.model_folder import export_encoder
from hybrid_retrieval.models.loading import SETTINGS_FILE
from hybrid_retrieval.run_folder import check_new_folder, job_folder, output_folder


def adapt(cfg: DictConfig) -> Path:
    """Run the adaptation that ``cfg`` describes and export the model; returns the model folder."""
    settings = check_adapt_config(cfg.adapt)
    if settings is None:
        raise AdaptConfigError("adapt.method=none: nothing to do; use adapt=mlm")
    check_device(cfg.hardware)
    # Where the model goes (``output``, else ``<run folder>/model``): new, empty or overwritable.
    folder = check_new_folder(output_folder(cfg, "output", "model"), "output", bool(cfg.get("overwrite")),
                              AdaptConfigError)
    torch.set_num_threads(cfg.hardware.num_threads)
    torch.manual_seed(settings.seed)
    texts = load_adapt_texts(cfg.adapt, settings=settings)
    encoder = instantiate(cfg.model)
    encoder = encoder.to(torch_device(cfg.hardware))
    with tracking.mlflow_run(cfg, job="adapt", tags={"model": encoder.name, **adapt_tags(cfg.adapt)},
                             title=f"adapt {encoder.name} (MLM)") as run:
        run.log_datasets([texts_data(texts, "adapt text", "training", adapt_tags(cfg.adapt)["adapt_text"])])
        run.log_metrics({"adapt/texts": float(len(texts))})
        result = adapt_encoder(encoder, cfg.adapt, log_metrics=run.log_metrics, texts=texts, settings=settings)
        card: dict[str, Any] = {
            "title": cfg.get("title") or f"{encoder.name} adapted by masked language modelling",
            "description": f"{encoder.name} after {settings.steps} steps of continued masked language modelling "
                           f"(after {int(result['head_warmup_steps'])} head warm-up steps) on "
                           f"{len(texts)} unlabelled texts; pooling and prefixes unchanged.",
            "training": {"model": OmegaConf.to_container(cfg.model, resolve=True),
                         "adapt": OmegaConf.to_container(cfg.adapt, resolve=True)},
            "data": adapt_tags(cfg.adapt)["adapt_text"],
            "metrics": {k: v for k, v in result.items() if k.startswith("heldout_")},
        }
        if cfg.model.get("checkpoint"):
            card["base_model"] = str(cfg.model.checkpoint)
        started = time.perf_counter()
        folder = export_encoder(encoder.cpu(), folder, card=card, overwrite=bool(cfg.get("overwrite")))
        run.log_metrics({"time/export_s": time.perf_counter() - started})
        report = job_folder() / "adapt.json"
        report.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        run.log_artifact(report)
        for name in (SETTINGS_FILE, "README.md"):
            run.log_artifact(folder / name, "model")
        run.set_tag("model_dir", str(folder))
    print(f"held-out MLM loss {result['heldout_loss_before']:.4f} -> {result['heldout_loss_after']:.4f} "
          f"(perplexity {result['heldout_perplexity_before']:.2f} -> {result['heldout_perplexity_after']:.2f}) "
          f"on {int(result['heldout_texts'])} texts; {result['seconds']:.0f} s")
    tracking.print_summary({"model": f"{folder} (use it with model.path={folder})", "metrics": report}, run)
    return folder


@hydra_main("adapt")
def main(cfg: DictConfig) -> None:
    adapt(cfg)


if __name__ == "__main__":
    main()
