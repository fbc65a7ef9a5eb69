"""Training pairs from tables: Parquet files (:func:`from_parquet`) and Hugging Face datasets (:func:`from_hf`).

A row has the columns ``group``, ``language``, ``query``, ``passage`` and optionally ``hard_negative`` (a string or
null) and ``hard_negatives`` (a list of strings); ``columns`` maps these names to the table's own when they
differ (``{query: question, passage: positive}``). A group may be stored as an integer (it is read as its decimal
string). Rows sharing a group are translations of each other.

Both are converted once into an Arrow store (:mod:`~hybrid_retrieval.data.pair_store`), record batch by record
batch; an error names the file, the row (counted from 0 within the file) and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hybrid_retrieval.config_error import BadValue, MissingPath
from hybrid_retrieval.data.pair_store import Chunk, StoreError, cached_store, joined_negatives
from hybrid_retrieval.data.pairs import ParallelPairs

__all__ = ["TABLE_FIELDS", "from_hf", "from_parquet", "parquet_files"]

TABLE_FIELDS = ("group", "language", "query", "passage", "hard_negative", "hard_negatives")
REQUIRED = TABLE_FIELDS[:4]
BATCH_ROWS = 65_536


def _column_names(columns: Mapping[str, str] | None) -> dict[str, str]:
    names = {field: field for field in TABLE_FIELDS}
    unknown = sorted(set(columns or {}) - set(TABLE_FIELDS))
    if unknown:
        raise BadValue(f"columns: unknown field(s) {unknown}; expected keys among {list(TABLE_FIELDS)}")
    names.update({k: str(v) for k, v in (columns or {}).items()})
    return names


def parquet_files(path: str | os.PathLike[str]) -> list[Path]:
    """A ``.parquet`` file, or every ``*.parquet`` under a folder (sorted by path)."""
    source = Path(path).expanduser()
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(source.rglob("*.parquet"))
        if files:
            return files
        raise MissingPath(f"{source}: no *.parquet file in this folder (train_data path)")
    raise MissingPath(f"training data {str(source)!r} does not exist (train_data path: a .parquet file or a "
                            "folder of them)")


def _strings(batch: pa.RecordBatch, column: str, field: str, where: Any) -> pa.Array:
    array = batch.column(column)
    if pa.types.is_integer(array.type) and field == "group":
        return pc.cast(array, pa.string())
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.string())
    raise StoreError(f"{where(0)}: field {field!r} (column {column!r}) must hold strings, it has type {array.type}")


def _negatives(batch: pa.RecordBatch, names: dict[str, str], where: Any) -> pa.Array | None:
    """Each row's hard negatives from the columns that are there (:func:`joined_negatives`)."""
    one = _strings(batch, names["hard_negative"], "hard_negative", where) \
        if names["hard_negative"] in batch.schema.names else None
    many = None
    if names["hard_negatives"] in batch.schema.names:
        many = batch.column(names["hard_negatives"])
        if not (pa.types.is_list(many.type) or pa.types.is_large_list(many.type)) or not (
                pa.types.is_string(many.type.value_type) or pa.types.is_large_string(many.type.value_type)):
            raise StoreError(f"{where(0)}: field 'hard_negatives' (column {names['hard_negatives']!r}) must be a "
                             f"list of strings, it has type {many.type}")
    return joined_negatives(one, many)


def _batch_chunk(batch: pa.RecordBatch, names: dict[str, str], keep_negatives: bool, where: Any,
                 position: Any) -> Chunk:
    missing = [f"{field} (column {names[field]!r})" for field in REQUIRED if names[field] not in batch.schema.names]
    if missing:
        raise StoreError(f"{where(0)}: no column for {', '.join(missing)}; the table has {batch.schema.names} "
                         "(map them with the reader's columns option)")
    texts = {field: _strings(batch, names[field], field, where) for field in REQUIRED}
    return Chunk(texts["group"], texts["language"], texts["query"], texts["passage"],
                 _negatives(batch, names, where) if keep_negatives else None, where=where, position=position)


def _parquet_chunks(files: Sequence[Path], names: dict[str, str], keep_negatives: bool) -> Any:
    import pyarrow.parquet as pq

    def chunks(position: Any) -> Iterator[Chunk]:
        first_file, first_batch = (position["file"], position["batch"]) if position else (0, 0)
        for f in range(first_file, len(files)):
            handle = pq.ParquetFile(files[f])
            wanted = [c for c in dict.fromkeys(names.values()) if c in handle.schema_arrow.names]
            row = 0
            for b, batch in enumerate(handle.iter_batches(batch_size=BATCH_ROWS, columns=wanted)):
                start = row
                row += batch.num_rows
                if f == first_file and b < first_batch:
                    continue
                yield _batch_chunk(batch, names, keep_negatives,
                                   lambda i, f=f, start=start: f"{files[f]}: Parquet row {start + i}",
                                   {"file": f, "batch": b + 1})
            first_batch = 0

    return chunks


def from_parquet(path: str | os.PathLike[str], name: str | None = None, hard_negative: str | None = "file",
                 columns: Mapping[str, str] | None = None) -> ParallelPairs:
    """Training rows from a Parquet file or a folder of them (every ``*.parquet`` below it, in path order).

    - columns: the table's name for each field that is named otherwise (module docstring).
    - hard_negative: "file" uses the rows' ``hard_negative`` / ``hard_negatives`` columns where present; None
      ignores them.
    """
    if hard_negative not in (None, "file"):
        raise BadValue(f"hard_negative must be one of [None, 'file'], got {hard_negative!r}")
    names = _column_names(columns)
    files = parquet_files(path)
    label = name or Path(path).expanduser().resolve().name.removesuffix(".parquet")
    folder = cached_store(label, "parquet", {"hard_negative": hard_negative, "columns": names}, files,
                          _parquet_chunks(files, names, hard_negative == "file"))
    return ParallelPairs.open(folder)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def from_hf(path: str, split: str = "train", name: str | None = None, hard_negative: str | None = "file",
            columns: Mapping[str, str] | None = None, config: str | None = None) -> ParallelPairs:
    """Training rows from a Hugging Face dataset: a folder written by ``save_to_disk`` (a ``Dataset`` or a
    ``DatasetDict``, whose `split` is read), a folder of Parquet files, or a dataset name on the hub (downloaded
    by ``datasets.load_dataset(path, config, split=split)`` where the hub is reachable).

    Options as in :func:`from_parquet`.
    """
    if hard_negative not in (None, "file"):
        raise BadValue(f"hard_negative must be one of [None, 'file'], got {hard_negative!r}")
    names = _column_names(columns)
    folder = Path(path).expanduser()
    if folder.is_dir() and not _is_saved_dataset(folder):
        return from_parquet(folder, name, hard_negative, columns)
    import datasets

    if folder.is_dir():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise BadValue(f"{folder}: no split {split!r}; it has {list(loaded)} (train_data split option)")
            loaded = loaded[split]
        label = name or folder.resolve().name
        sources: list[Any] = [folder]
    else:
        from hybrid_retrieval.data.sources import OFFLINE_ENV, offline

        if offline():
            raise MissingPath(f"Hugging Face dataset {path!r}: no such folder, and {OFFLINE_ENV} is set, so the "
                                    "hub is not asked; save it with datasets' save_to_disk (or as Parquet files) and "
                                    "set the path to that folder")
        try:
            loaded = datasets.load_dataset(path, config, split=split)
        except Exception as error:  # the hub unreachable, an unknown name: say what to point at instead
            raise MissingPath(
                f"Hugging Face dataset {path!r} (split {split!r}) could not be loaded: {type(error).__name__}: "
                f"{error}. Without the hub, save it with datasets' save_to_disk (or as Parquet files) and set the "
                "path to that folder") from None
        label = name or path.replace("/", "_")
        sources = [Path(f["filename"]) for f in loaded.cache_files]
    table = loaded.data.table if hasattr(loaded.data, "table") else loaded.data
    where_source = str(folder) if folder.is_dir() else path

    def chunks(position: Any) -> Iterator[Chunk]:
        start = position["row"] if position else 0
        for offset in range(start, table.num_rows, BATCH_ROWS):
            part = table.slice(offset, BATCH_ROWS)
            batch = pa.RecordBatch.from_arrays([part.column(c).combine_chunks() for c in part.column_names],
                                               names=part.column_names)
            yield _batch_chunk(batch, names, hard_negative == "file",
                               lambda i, offset=offset: f"{where_source} ({split}): row {offset + i}",
                               {"row": offset + len(part)})

    store = cached_store(label, "hf", {"split": split, "config": config, "hard_negative": hard_negative,
                                       "columns": names, "fingerprint": getattr(loaded, "_fingerprint", None)},
                         sources, chunks)
    return ParallelPairs.open(store)
