"""Embed a text file: ``python -m hybrid_retrieval.encode input=texts.jsonl kind=passage output=emb/``.

Input is ``.txt`` (one text per line; ids are 0-based line numbers) or ``.jsonl`` (objects with an id and a text
field, names set by ``id_field`` / ``text_field``). Writes ``embeddings.npy`` (float32, input order), ``ids.txt``
and ``meta.json`` into ``output``. The model is ``model=...`` (with ``model.path=<exported folder>`` for an
export) or ``checkpoint=<run.py checkpoint>``. Everything is checked before the model is loaded.

The file readers and model helpers here are shared with ``python -m hybrid_retrieval.search``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from hybrid_retrieval import tracking
from hybrid_retrieval.config_checks import ConfigError, check_device, check_hardware, check_model
from hybrid_retrieval.data.jsonl import json_objects
from hybrid_retrieval.hardware import encode_dtype, torch_device
from hybrid_retrieval.models.encoder import Encoder

KINDS = ("query", "passage")
TEXT_SUFFIXES = (".txt", ".jsonl")
OUTPUT_FILES = ("embeddings.npy", "ids.txt", "meta.json")


class InputFileError(ValueError):
    """An input text file that cannot be used; the message names the option, the file and the line."""


@dataclass
class TextFile:
    """Texts of one input file, in file order, with their ids (strings without whitespace, unique)."""

    path: Path
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _check_id(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputFileError(f"{where}: field {field!r} is {value!r}; expected a string or an integer")
    text = str(value)
    if not text or any(c.isspace() for c in text):
        # Ids go into TREC run files, whose columns are separated by whitespace.
        raise InputFileError(f"{where}: field {field!r} is {text!r}; expected a non-empty id without whitespace")
    return text


def read_texts(path: str | Path | None, option: str = "input", id_field: str = "id",
               text_field: str = "text") -> TextFile:
    """Read a ``.txt`` (one text a line, id = 0-based line number) or ``.jsonl`` (``{id_field, text_field}``
    objects) file. Raises :class:`InputFileError` naming `option`, the file and the line for anything unusable:
    a missing or empty file, an unknown suffix, a blank text line, a JSONL line that is not an object or lacks a
    field, an id with whitespace or used twice."""
    if path is None or str(path).strip() == "":
        raise InputFileError(f"{option} is not set; expected {option}=<file> ({' or '.join(TEXT_SUFFIXES)})")
    path = Path(str(path)).expanduser()
    if path.suffix not in TEXT_SUFFIXES:
        raise InputFileError(f"{option}={str(path)!r}: unknown file type {path.suffix!r}; expected a .txt file (one "
                             "text per line) or a .jsonl file (one JSON object per line)")
    if not path.is_file():
        raise InputFileError(f"{option}={str(path)!r}: file does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputFileError(f"{option}={str(path)!r}: not UTF-8 text ({err})") from err
    while lines and not lines[-1].strip():  # trailing blank lines are not texts
        lines.pop()
    if not lines:
        raise InputFileError(f"{option}={str(path)!r}: the file is empty; expected at least one text")
    ids: list[str] = []
    texts: list[str] = []
    if path.suffix == ".txt":
        for number, line in enumerate(lines):
            if not line.strip():
                raise InputFileError(f"{option}={str(path)!r} line {number + 1}: empty line; every line is one text "
                                     "(ids are 0-based line numbers, so blank lines cannot be skipped)")
            ids.append(str(number))
            texts.append(line)
        return TextFile(path=path, ids=ids, texts=texts)
    seen: dict[str, int] = {}
    objects = json_objects(lines, lambda number: f"{option}={str(path)!r} line {number}", InputFileError,
                           f"a JSON object with fields {id_field!r} and {text_field!r}")
    for number, where, record in objects:
        for field in (id_field, text_field):
            if field not in record:
                raise InputFileError(f"{where}: missing field {field!r} (has {sorted(record)[:6]}); set "
                                     f"{'id_field' if field == id_field else 'text_field'}=<name> if it is "
                                     "called otherwise")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(f"{where}: field {text_field!r} is {text!r:.80}; expected a non-empty string")
        identifier = _check_id(record[id_field], where, id_field)
        if identifier in seen:
            raise InputFileError(f"{where}: id {identifier!r} already used on line {seen[identifier]}")
        seen[identifier] = number
        ids.append(identifier)
        texts.append(text)
    return TextFile(path=path, ids=ids, texts=texts)


# ------------------------------------------------------------------------------------------------ the model


def check_model_source(cfg: DictConfig) -> None:
    """The model must be loadable: ``checkpoint`` an existing file, else ``model`` a valid config (a given
    ``model.path`` an existing model folder with its tokenizer)."""
    if cfg.get("checkpoint"):
        path = Path(str(cfg.checkpoint)).expanduser()
        if not path.is_file():
            raise ConfigError(f"checkpoint={str(cfg.checkpoint)!r}: file does not exist; expected a checkpoint "
                              "written by run.py (outputs/train/<date>/<time>/checkpoints/best.ckpt)")
        return
    check_model(cfg.model)
    if cfg.model.get("path"):
        from hybrid_retrieval.models.encoder import resolve_hub_folder
        from hybrid_retrieval.models.export import check_tokenizer_files

        check_tokenizer_files(resolve_hub_folder(cfg.model.name, None, cfg.model.path))


def load_model(cfg: DictConfig) -> Encoder:
    """The encoder of ``checkpoint`` if set, else of the ``model`` config, in eval mode on ``hardware``'s device."""
    if cfg.get("checkpoint"):
        from hybrid_retrieval.models.checkpoint import encoder_from_checkpoint, merge_with_start, read_checkpoint

        checkpoint = read_checkpoint(cfg.checkpoint)
        encoder = encoder_from_checkpoint(checkpoint)
        ratio = merge_ratio(cfg)
        if ratio is not None:  # WiSE-FT with the run's starting model
            encoder = merge_with_start(encoder, checkpoint, ratio)
        truncate_dim = cfg.get("model", {}).get("truncate_dim")
        if truncate_dim is not None:  # the command line's size wins over the one the checkpoint was trained with
            from hybrid_retrieval.models.encoder import check_truncate_dim

            check_truncate_dim(truncate_dim, encoder.embedding_dim)
            encoder.truncate_dim = int(truncate_dim)
    else:
        from hydra.utils import instantiate

        encoder = instantiate(cfg.model)
    return encoder.to(torch_device(cfg.hardware)).eval()


def merge_ratio(cfg: DictConfig) -> float | None:
    """``merge_with=start merge_ratio=r`` (checked; only with ``checkpoint=``), or None."""
    from hybrid_retrieval.config_checks import ConfigError
    from hybrid_retrieval.models.merge import check_merge

    try:
        ratio = check_merge(cfg.get("merge_with"), cfg.get("merge_ratio", 1.0))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if ratio is not None and not cfg.get("checkpoint"):
        raise ConfigError("merge_with=start needs checkpoint=<run folder>/checkpoints/best.ckpt: the checkpoint "
                          "records the model its run started from")
    return ratio


def model_source(cfg: DictConfig) -> str:
    """Where the weights came from, for meta files and MLflow tags."""
    if cfg.get("checkpoint"):
        merged = f" merged with start at {cfg.merge_ratio}" if cfg.get("merge_with") else ""
        return f"checkpoint:{Path(str(cfg.checkpoint)).expanduser().resolve()}{merged}"
    if cfg.model.get("path"):
        return f"path:{Path(str(cfg.model.path)).expanduser().resolve()}"
    return f"{cfg.model.source}:{cfg.model.get('checkpoint') or cfg.model.name}"


def encode_texts(encoder: Encoder, texts: list[str], kind: str, hardware: DictConfig) -> tuple[np.ndarray, float]:
    """Embeddings (float32, input order) and the seconds it took."""
    dtype = encode_dtype(hardware)
    start = time.perf_counter()
    emb = encoder.encode(texts, kind, batch_size=int(hardware.encode_batch_size), dtype=dtype)
    return emb.astype(np.float32, copy=False), time.perf_counter() - start


def output_folder(cfg: DictConfig) -> Path:
    """``output``, or the Hydra run folder when it is null."""
    if cfg.get("output"):
        return Path(str(cfg.output)).expanduser()
    return Path(tracking.job_context()["output_dir"])


# ---------------------------------------------------------------------------------------------------- driver


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="encode")
def main(cfg: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    encode(cfg)


if __name__ == "__main__":
    main()
