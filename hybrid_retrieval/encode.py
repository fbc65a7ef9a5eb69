"""Embed a text file: ``python -m hybrid_retrieval.encode input=texts.jsonl kind=passage output=emb/``.

Input is ``.txt`` (one text per line; ids are 0-based line numbers) or ``.jsonl`` (objects with an id and a text
field, names set by ``id_field`` / ``text_field``). Writes ``embeddings.npy`` (float32, input order), ``ids.txt``
and ``meta.json`` into ``output``. The model is ``model=...`` (with ``model.path=<exported folder>`` for an
export) or ``checkpoint=<run.py checkpoint>``. Everything is checked before the model is loaded.

The file reader is :mod:`hybrid_retrieval.data.text_files`; the model and output helpers are
:mod:`hybrid_retrieval.cli` (shared with ``search`` and ``evaluate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.fingerprint import describe_file
from hybrid_retrieval.data.text_files import TEXT_COLUMNS, TextFile, read_texts
from hybrid_retrieval.hardware import check_device, check_hardware
from hybrid_retrieval.models.source import check_model_source, encode_texts, load_model, model_source
from hybrid_retrieval.run_folder import output_folder

KINDS = ("query", "passage")
OUTPUT_FILES = ("embeddings.npy", "ids.txt", "meta.json")


def check_encode_config(cfg: DictConfig) -> TextFile:
    """Validate the config and read the input (no model loaded yet); returns the texts."""
    if cfg.get("kind") not in KINDS:
        raise ConfigError(f"kind={cfg.get('kind')!r}: expected one of {KINDS} (it picks the prefix and the "
                          "maximum length)")
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    check_model_source(cfg)
    texts = read_texts(cfg.get("input"), "input", cfg.id_field, cfg.text_field)
    folder = output_folder(cfg)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output={str(folder)!r}: exists and is not a folder")
    if (folder / "embeddings.npy").exists() and not cfg.get("overwrite"):
        raise ConfigError(f"output={str(folder)!r} already holds embeddings.npy; choose another folder or pass "
                          "overwrite=true")
    return texts


def write_embeddings(folder: Path, emb: np.ndarray, ids: list[str], meta: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", emb)
    (folder / "ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [folder / name for name in OUTPUT_FILES]


def encode(cfg: DictConfig) -> Path:
    """Run the encoding `cfg` describes (validated first) and log it to MLflow; returns the output folder."""
    texts = check_encode_config(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    encoder = load_model(cfg)
    folder = output_folder(cfg)
    with tracking.mlflow_run(cfg, job="encode", tags={"model": encoder.name, "kind": cfg.kind},
                             title=f"encode {encoder.name}") as run:
        run.log_datasets([describe_file(texts.path, "inference", file_columns=TEXT_COLUMNS, rows=len(texts))])
        emb, seconds = encode_texts(encoder, texts.texts, cfg.kind, cfg.hardware)
        meta = {"model": encoder.name, "model_source": model_source(cfg), "kind": cfg.kind, "count": len(texts),
                "dim": int(emb.shape[1]), "normalized": encoder.normalize, "dtype": "float32",
                "input": str(texts.path.resolve()), "seconds": round(seconds, 3)}
        files = write_embeddings(folder, emb, texts.ids, meta)
        run.log_metrics({"time/encode_s": seconds, "count": len(texts), "texts_per_s": len(texts) / max(seconds, 1e-9)})
        run.log_artifact(files[-1])
        run.set_tag("output", str(folder.resolve()))
    print(f"{len(texts)} {cfg.kind} embeddings ({emb.shape[1]} dims, model {encoder.name}) in {seconds:.1f} s "
          f"({len(texts) / max(seconds, 1e-9):.1f} texts/s)")
    tracking.print_summary({"embeddings": folder}, run)
    return folder


@hydra_main("encode")
def main(cfg: DictConfig) -> None:
    encode(cfg)


if __name__ == "__main__":
    main()
