"""Export a trained model: ``python -m hybrid_retrieval.export checkpoint=<run>/checkpoints/best.ckpt output=my-model``.

Rebuilds the encoder from the checkpoint and writes a folder that transformers, sentence-transformers and this
project (``model.path=my-model``) load, with a model card built from the run folder the checkpoint sits in
(its config, metrics and MTEB results, when present): the card run.py's own export writes. An existing non-empty
``out`` is refused unless ``overwrite=true``; the checkpoint is fully checked before the MLflow run starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.models.checkpoint import (TrainingCheckpoint, encoder_from_checkpoint, merge_with_start,
                                                read_checkpoint)
from hybrid_retrieval.models.model_folder import export_encoder, run_card
from hybrid_retrieval.models.loading import SETTINGS_FILE
from hybrid_retrieval.models.publish import REPO_ID, push_folder
from hybrid_retrieval.models.source import merge_ratio
from hybrid_retrieval.run_folder import BEST_CHECKPOINT_EXAMPLE, check_checkpoint_file, check_new_folder


def check_export_config(cfg: DictConfig) -> tuple[Path, Path]:
    """(checkpoint file, output folder), checked: the file exists, the folder is new, empty or overwritable."""
    if not cfg.get("checkpoint"):
        raise ConfigError("checkpoint is not set; expected checkpoint=<file written by run.py>, e.g. "
                          f"{BEST_CHECKPOINT_EXAMPLE}")
    if not cfg.get("output"):
        raise ConfigError("output is not set; expected output=<folder to write the model into>")
    checkpoint = check_checkpoint_file(cfg.checkpoint)
    repo = cfg.get("push_to_hub")
    if repo is not None and not (isinstance(repo, str) and REPO_ID.match(repo)):
        raise ConfigError(f"push_to_hub={repo!r}: expected <user or organisation>/<model name>, or null")
    return checkpoint, check_new_folder(Path(str(cfg.output)).expanduser(), "output", bool(cfg.get("overwrite")))


def model_card(checkpoint: TrainingCheckpoint, cfg: DictConfig) -> dict[str, Any]:
    """Card contents: the card of the run folder holding the checkpoint (``<run>/checkpoints/<file>``), as run.py's
    own export writes it (:func:`~hybrid_retrieval.models.model_folder.run_card`), and the title/description options."""
    card: dict[str, Any] = {}
    if cfg.get("title"):
        card["title"] = str(cfg.title)
    if cfg.get("description"):
        card["description"] = str(cfg.description)
    run_dir = checkpoint.path.resolve().parent.parent
    card.update(run_card(run_dir, checkpoint.path, checkpoint.model, checkpoint.info))
    return card


def export(cfg: DictConfig) -> Path:
    """Export the checkpoint that `cfg` names (validated and loaded first) and log it; returns the folder."""
    checkpoint_file, out = check_export_config(cfg)
    projection_file = cfg.get("language_projection")
    if projection_file and not Path(str(projection_file)).expanduser().is_file():
        raise ConfigError(f"language_projection={str(projection_file)!r}: no such file; give the "
                          "language_projection.npz an evaluate run wrote (model.language_projection=...)")
    ratio = merge_ratio(cfg)
    checkpoint = read_checkpoint(checkpoint_file)
    encoder = encoder_from_checkpoint(checkpoint)
    card = model_card(checkpoint, cfg)
    if ratio is not None:
        encoder = merge_with_start(encoder, checkpoint, ratio)
        card["merge"] = f"WiSE-FT: (1 - {ratio}) x the starting model + {ratio} x the checkpoint's weights"
    if projection_file:
        from hybrid_retrieval.models.language_projection import LanguageProjection

        encoder.language_projection = LanguageProjection.load(Path(str(projection_file)).expanduser())
        card["language_projection"] = (f"the language subspace (rank {encoder.language_projection.rank}, "
                                       f"{encoder.language_projection.source}) is projected out")
    matryoshka = (card.get("training") or {}).get("matryoshka")
    if isinstance(matryoshka, dict) and matryoshka.get("dims"):  # the folder records the sizes it was trained at
        encoder.matryoshka_dims = [int(d) for d in matryoshka["dims"]]
    with tracking.mlflow_run(cfg, job="export", tags={"model": encoder.name},
                             title=f"export {encoder.name}") as run:
        start = time.perf_counter()
        folder = export_encoder(encoder, out, card=card, overwrite=bool(cfg.get("overwrite")))
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        run.log_metrics({"time/export_s": seconds, "size_mb": size / 2**20})
        run.set_tag("export_path", str(folder))
        run.set_tag("checkpoint", str(checkpoint.path.resolve()))
        for name in (SETTINGS_FILE, "README.md"):
            run.log_artifact(folder / name, "model")
        if cfg.logger.get("log_model", False):
            run.log_sentence_transformer(folder)
        if cfg.get("push_to_hub"):
            url = push_folder(folder, str(cfg.push_to_hub), private=bool(cfg.get("hub_private", True)))
            run.set_tag("hub_commit", url)
            print(f"pushed {folder} to https://huggingface.co/{cfg.push_to_hub} ({url})")
    print(f"exported {encoder.name} ({encoder.embedding_dim} dims, {size / 2**20:.1f} MB) to {folder} in "
          f"{seconds:.1f} s")
    tracking.print_summary({"model": folder, "load it with": f"SentenceTransformer({str(folder)!r}), "
                            f"AutoModel.from_pretrained({str(folder)!r}) or model.path={folder}"}, run)
    return folder


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
