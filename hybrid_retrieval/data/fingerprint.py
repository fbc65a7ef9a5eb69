"""What a run read, described for MLflow's dataset inputs (logged by :mod:`hybrid_retrieval.tracking`): a digest
of the loaded data, its columns, and where it came from. No MLflow here.

The digest is computed from what was loaded (texts, ids, languages, arrays; files a set only points to by their
size and modification time), so it changes when the files change and when a config option picks other rows
(languages, caps), and is equal for equal data wherever it lies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

DIGEST_LENGTH = 12
MAX_DEPTH = 8


@dataclass(frozen=True)
class DatasetInfo:
    """One data set a run read: MLflow's dataset input fields (name, digest, source, schema) and its context
    (``training``, ``evaluation`` or ``inference``)."""

    name: str
    digest: str
    source: str  # the file or folder it was read from
    context: str
    columns: dict[str, str]  # column name -> MLflow type (string, long, double, boolean)
    rows: int | None = None


def _fields(value: Any) -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if not f.name.startswith("_")]
    if hasattr(value, "__dict__"):
        return [(k, v) for k, v in sorted(vars(value).items()) if not k.startswith("_") and not callable(v)]
    return []


def _feed(digest: Any, value: Any, depth: int, seen: set[int]) -> None:
    if value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        digest.update(f"{type(value).__name__}:{value!r};".encode("utf-8", "surrogatepass"))
        return
    if depth > MAX_DEPTH or id(value) in seen:
        digest.update(type(value).__name__.encode())
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        digest.update(f"ndarray:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes() if value.dtype != object else repr(value.tolist()).encode())
    elif isinstance(value, Path):
        try:
            stat = value.stat()
            digest.update(f"file:{value}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(f"missing:{value};".encode())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"{key!s}=".encode())
            _feed(digest, value[key], depth + 1, seen)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item, depth + 1, seen)
    elif isinstance(value, (set, frozenset)):
        for item in sorted(value, key=repr):
            _feed(digest, item, depth + 1, seen)
    else:
        digest.update(f"<{type(value).__qualname__}>".encode())
        for key, item in _fields(value):
            digest.update(f"{key}=".encode())
            _feed(digest, item, depth + 1, seen)


def content_digest(value: Any) -> str:
    """A short sha256 of what ``value`` holds (strings, numbers, arrays, containers, dataclasses and plain objects;
    a ``Path`` by its size and modification time)."""
    digest = hashlib.sha256()
    _feed(digest, value, 0, set())
    return digest.hexdigest()[:DIGEST_LENGTH]


def file_digest(path: str | Path) -> str:
    """A short sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_LENGTH]


def _mlflow_type(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "long"
    if isinstance(value, (float, np.floating)):
        return "double"
    return "string"


def _sequences(value: Any) -> list[tuple[str, Sequence[Any]]]:
    return [(k, v) for k, v in _fields(value) if isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0]


def _item_columns(item: Any) -> dict[str, str]:
    """One row's fields as columns; a field that is itself a record (an input row and its line) is opened."""
    found: dict[str, str] = {}
    for key, value in _fields(item):
        inner = _fields(value) if not isinstance(value, (str, bytes, Path)) else []
        found.update({k: _mlflow_type(v) for k, v in inner} if inner else {key: _mlflow_type(value)})
    return found


def columns(value: Any) -> tuple[dict[str, str], int | None]:
    """The rows' columns (name -> MLflow type) and row count of a loaded data set: the fields of equal length of
    ``value`` (one list per column, as in training pairs), else the fields of the items of its longest list, looked
    for in ``value`` and the objects it holds (an evaluation split's candidates)."""
    if isinstance(value, (list, tuple)):
        return (_item_columns(value[0]), len(value)) if value and _fields(value[0]) else ({}, len(value))
    lists = _sequences(value)
    if lists:
        longest = max(len(v) for _, v in lists)
        same = [(k, v) for k, v in lists if len(v) == longest]
        if len(same) > 1:
            return {k: _mlflow_type(next((x for x in v if x is not None), "")) for k, v in same}, longest
        rows = same[0][1]
        if _fields(rows[0]):
            return _item_columns(rows[0]), len(rows)
    for _, inner in _fields(value):
        if _fields(inner):
            found = columns(inner)
            if found[0]:
                return found
    return {}, None


def describe(value: Any, name: str, context: str, source: str | Path) -> DatasetInfo:
    """The :class:`DatasetInfo` of a loaded data set (training pairs, an evaluation set)."""
    found, rows = columns(value)
    return DatasetInfo(name=name, digest=content_digest(value), source=str(source), context=context,
                       columns=found, rows=rows)


def describe_file(path: str | Path, context: str, name: str | None = None,
                  file_columns: Mapping[str, str] | None = None, rows: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of one input file, digested by its bytes."""
    path = Path(path).expanduser().resolve()
    return DatasetInfo(name=name or path.name, digest=file_digest(path), source=str(path), context=context,
                       columns=dict(file_columns or {}), rows=rows)


def data_root(configured: str | os.PathLike | None = None) -> Path:
    """Where a data set without a file of its own was read from: its ``root`` option, else
    ``$HYBRID_RETRIEVAL_DATA``, else the download cache."""
    if configured:
        return Path(str(configured)).expanduser().resolve()
    if os.environ.get("HYBRID_RETRIEVAL_DATA"):
        return Path(os.environ["HYBRID_RETRIEVAL_DATA"]).expanduser().resolve()
    from hybrid_retrieval.data.sources import default_cache_dir

    return default_cache_dir()


def _dataset_folder(name: str | None, root: str | None) -> Path:
    """The folder a named data set was read from (``<root>/<its folder>`` for the LAReQA sets)."""
    from hybrid_retrieval.data.sources import DATASETS

    base = data_root(root)
    source = DATASETS.get(str(name)) if name else None
    if source is not None and (base / source.folder).is_dir():
        return base / source.folder
    return base


PAIR_COLUMNS = {"group": "string", "language": "string", "query": "string", "passage": "string",
                "hard_negatives": "string"}


def training_data(entries: Sequence[Mapping[str, Any]], datasets: Sequence[Any]) -> list[DatasetInfo]:
    """The training datasets (``train_data.datasets`` entries and the pairs loaded from them), context
    ``training``; the digest is the pairs' own (written with a store: constant time at any size)."""
    found = []
    for entry, pairs in zip(entries, datasets):
        source = Path(str(entry["path"])).expanduser().resolve() if entry.get("path") else \
            _dataset_folder(entry.get("name") or pairs.name, entry.get("root"))
        found.append(DatasetInfo(name=str(entry.get("name") or pairs.name), digest=pairs.digest[:DIGEST_LENGTH],
                                 source=str(source), context="training", columns=dict(PAIR_COLUMNS),
                                 rows=len(pairs)))
    return found


def evaluation_data(dataset: Mapping[str, Any], extra_datasets: Mapping[str, Any] | None,
                    sets: Sequence[Any]) -> list[DatasetInfo]:
    """The evaluation sets (the main ``dataset`` first, then ``extra_datasets``) as loaded, context
    ``evaluation``."""
    configs = [dataset, *(extra_datasets or {}).values()]
    return [describe(loaded, str(loaded.key), "evaluation", _dataset_folder(config.get("name"), config.get("root")))
            for config, loaded in zip(configs, sets)]


def texts_data(texts: Sequence[str], name: str, context: str, source: str) -> DatasetInfo:
    """Plain texts (the adaptation stage's unlabelled text), one ``text`` column."""
    return DatasetInfo(name=name, digest=content_digest(list(texts)), source=source, context=context,
                       columns={"text": "string"}, rows=len(texts))
