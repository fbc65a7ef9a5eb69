"""Training pairs on disk: one Arrow table per source, converted once, memory-mapped by every process.

A store is a folder in the on-disk form of Hugging Face ``datasets`` (``datasets.load_from_disk`` opens it)::

    data-00000-of-00003.arrow ...   the rows: group, language, query, passage, hard_negatives (list of strings)
    index.arrow                     one record batch: group_index (int32), language_index (int8 up to 127
                                    languages), read zero-copy
    state.json, dataset_info.json   what datasets.load_from_disk reads
    pairs.json                      rows, groups, language names, the reader, its options, the fingerprint

A reader yields chunks of rows (:class:`Chunk`), each with a resume position; :func:`cached_store` writes them
into ``$HYBRID_RETRIEVAL_CACHE/pairs/<name>-<fingerprint>/``, keyed by the sources' paths, sizes and modification
times and the reader's options. One process converts (a file lock), the others wait and map the same files. Rows
are committed in parts of about ``PART_ROWS`` rows: a conversion that is killed resumes after its last part; one
that meets a malformed row removes what it wrote and raises naming the place and field. Group and language
indices are given in order of first appearance (languages in the order of the reader's list when it has one),
once every part is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from hybrid_retrieval.data.sources import cache_root

__all__ = ["PART_ROWS", "STORE_VERSION", "Chunk", "StoreError", "cached_store", "joined_negatives", "open_index",
           "open_rows",
           "pairs_cache_dir", "read_meta", "source_stats", "store_key", "write_store"]

STORE_VERSION = 1
PART_ROWS = 2_000_000
SCHEMA = pa.schema([("group", pa.string()), ("language", pa.string()), ("query", pa.string()),
                    ("passage", pa.string()), ("hard_negatives", pa.list_(pa.string()))])
TEXT_FIELDS = ("group", "language", "query", "passage")
META = "pairs.json"
INDEX = "index.arrow"


class StoreError(ValueError):
    """A malformed row or source (the message names the file, the row and the field)."""


@dataclass
class Chunk:
    """Rows a reader hands to the store: equal-length columns, where each row came from, and where to resume.

    ``where(i)`` names row i's place in messages (``"train.jsonl:17"``, ``"part-0.parquet row 3"``);
    ``position``: the reader's position after this chunk (JSON-able), given back to it on resume."""

    group: Sequence[str] | pa.Array
    language: Sequence[str] | pa.Array
    query: Sequence[str] | pa.Array
    passage: Sequence[str] | pa.Array
    hard_negatives: Sequence[Sequence[str]] | pa.Array | None = None
    where: Callable[[int], str] = field(default=lambda i: f"row {i}")
    position: Any = None


def pairs_cache_dir() -> Path:
    """``$HYBRID_RETRIEVAL_CACHE/pairs`` (default ``~/.cache/hybrid_retrieval/pairs``)."""
    return cache_root() / "pairs"


def source_stats(sources: Sequence[str | os.PathLike[str]]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each source file (every file under a source folder), resolved."""
    found: list[list[Any]] = []
    for source in sources:
        path = Path(source).expanduser().resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            found.append([str(file), stat.st_size, stat.st_mtime_ns])
    return found


def store_key(reader: str, options: dict[str, Any], sources: Sequence[str | os.PathLike[str]]) -> str:
    """The cache key: the store version, the reader, its options and the sources' paths, sizes and modification
    times. (What the rows hold is the store's ``digest``, written with it.)"""
    described = {"version": STORE_VERSION, "reader": reader, "options": options, "sources": source_stats(sources)}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_strings(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string()) if pa.types.is_large_string(values.type) else values
    return pa.array(values, type=pa.string())


def _first_bad(mask: pa.Array) -> int | None:
    """Index of the first true entry of a boolean array (nulls count as true), None when there is none."""
    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def joined_negatives(one: pa.Array | None, many: pa.Array | None) -> pa.Array | None:
    """Each row's hard negatives from a reader's two optional fields: ``hard_negative`` (one string or null) when
    set, followed by ``hard_negatives`` (a list of strings or null); None when neither field is there."""
    lists = []
    if one is not None:
        offsets = np.concatenate([[0], np.cumsum(one.is_valid().to_numpy(zero_copy_only=False))]).astype(np.int32)
        lists.append(pa.ListArray.from_arrays(pa.array(offsets), one.drop_null()))
    if many is not None and many.null_count < len(many):
        lists.append(pc.fill_null(many.cast(pa.list_(pa.string())), pa.scalar([], pa.list_(pa.string()))))
    if len(lists) < 2:
        return lists[0] if lists else None
    return pa.array([a + b for a, b in zip(lists[0].to_pylist(), lists[1].to_pylist())], pa.list_(pa.string()))


def check_chunk(chunk: Chunk) -> pa.RecordBatch:
    """The chunk as a record batch of the store's schema; a missing, empty or non-string value raises
    :class:`StoreError` naming the row's place and the field."""
    columns: dict[str, pa.Array] = {}
    n = None
    for name in TEXT_FIELDS:
        values = getattr(chunk, name)
        try:
            array = _as_strings(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            bad = next(i for i, v in enumerate(values) if not isinstance(v, str))
            raise StoreError(f"{chunk.where(bad)}: field {name!r} must be a non-empty string, "
                             f"got {values[bad]!r}") from None
        if n is not None and len(array) != n:
            raise StoreError(f"{chunk.where(0)}: field {name!r} has {len(array)} values, expected {n}")
        n = len(array)
        bad = _first_bad(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0))
        if bad is not None:
            value = array[bad].as_py()
            raise StoreError(f"{chunk.where(bad)}: field {name!r} must be a non-empty string, got {value!r}")
        columns[name] = array
    negatives = chunk.hard_negatives
    if negatives is None:
        negatives = pa.array([[]] * n, type=pa.list_(pa.string()))
    elif not isinstance(negatives, (pa.Array, pa.ChunkedArray)):
        try:
            negatives = pa.array([list(v) if v is not None else [] for v in negatives], type=pa.list_(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            bad = next(i for i, v in enumerate(negatives)
                       if v is not None and (isinstance(v, str) or not all(isinstance(x, str) for x in v)))
            raise StoreError(f"{chunk.where(bad)}: field 'hard_negatives' must be a list of non-empty strings, "
                             f"got {negatives[bad]!r}") from None
    if isinstance(negatives, pa.ChunkedArray):
        negatives = negatives.combine_chunks()
    if len(negatives) != n:
        raise StoreError(f"{chunk.where(0)}: field 'hard_negatives' has {len(negatives)} values, expected {n}")
    negatives = pc.fill_null(negatives.cast(pa.list_(pa.string())), pa.scalar([], pa.list_(pa.string())))
    flat = negatives.flatten()
    bad_flat = _first_bad(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(flat)), 0)) if len(flat) else None
    if bad_flat is not None:
        row = int(np.searchsorted(negatives.offsets.to_numpy()[1:], bad_flat, side="right"))
        raise StoreError(f"{chunk.where(row)}: field 'hard_negatives' must hold non-empty strings, "
                         f"got {flat[bad_flat].as_py()!r}")
    columns["hard_negatives"] = negatives
    return pa.RecordBatch.from_arrays([columns[f.name] for f in SCHEMA], schema=SCHEMA)


def _codes(column: pa.ChunkedArray, names: Sequence[str] | None, what: str) -> tuple[np.ndarray, pa.Array]:
    """Indices of a string column into `names`, or into its values in order of first appearance."""
    values = pa.array(list(names), pa.string()) if names is not None else pc.unique(column)
    codes = pc.index_in(column, value_set=values)
    if codes.null_count:
        bad = int(pc.index(pc.is_null(codes), True).as_py())
        raise StoreError(f"row {bad}: {what} {column[bad].as_py()!r} is not one of {list(names or [])}")
    # Languages in the smallest type that holds them (a byte a row), groups in int32 up to 2^31.
    types = (np.int8, np.int16, np.int32, np.int64) if what == "language" else (np.int32, np.int64)
    dtype = next(t for t in types if len(values) <= np.iinfo(t).max)
    return codes.to_numpy().astype(dtype, copy=False), values


def write_store(folder: Path, chunks: Callable[[Any], Iterator[Chunk]], meta: dict[str, Any],
                language_names: Sequence[str] | None = None, progress: Any = None) -> None:
    """Convert `chunks(resume_position)` into a complete store at `folder` (through ``<folder>.partial``).

    A ``.partial`` folder left by a killed conversion is resumed after its last committed part; a malformed row
    removes it. `progress`: an object with ``update(n)`` (rows), or None."""
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    state_file = partial / "progress.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"parts": [], "position": None}
    for stray in partial.glob("*.tmp"):
        stray.unlink()
    if progress is not None and state["parts"]:
        progress.update(sum(part[1] for part in state["parts"]))
    writer = None
    part_rows = 0

    def commit(position: Any) -> None:
        nonlocal writer, part_rows
        writer.close()
        name = f"part-{len(state['parts']):05d}.arrow"
        os.replace(partial / (name + ".tmp"), partial / name)
        state["parts"].append([name, part_rows])
        state["position"] = position
        state_file.write_text(json.dumps(state))
        writer, part_rows = None, 0

    try:
        position = state["position"]
        for chunk in chunks(state["position"]):
            batch = check_chunk(chunk)
            if len(batch):
                if writer is None:
                    name = f"part-{len(state['parts']):05d}.arrow"
                    writer = pa.ipc.new_stream(str(partial / (name + ".tmp")), SCHEMA)
                writer.write_batch(batch)
                part_rows += len(batch)
                if progress is not None:
                    progress.update(len(batch))
            position = chunk.position
            if writer is not None and part_rows >= PART_ROWS:
                commit(position)
        if writer is not None:
            commit(position)
        _finish(partial, state["parts"], meta, language_names)
    except StoreError:
        if writer is not None:
            writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    os.replace(partial, folder)


def _finish(folder: Path, parts: list[list[Any]], meta: dict[str, Any], language_names: Sequence[str] | None) -> None:
    """Name the parts as datasets does, number groups and languages, write the index and the metadata."""
    total = len(parts)
    if total == 0 or sum(part[1] for part in parts) == 0:
        raise StoreError(f"{meta.get('source', meta.get('name'))}: no rows")
    files = []
    for i, (name, _) in enumerate(parts):
        target = f"data-{i:05d}-of-{total:05d}.arrow"
        os.replace(folder / name, folder / target)
        files.append(target)
    (folder / "progress.json").unlink(missing_ok=True)
    table = open_rows(folder, files)
    groups, _ = _codes(table.column("group"), None, "group")
    languages, names = _codes(table.column("language"), language_names, "language")
    index = pa.RecordBatch.from_arrays([pa.array(groups), pa.array(languages)], ["group_index", "language_index"])
    with pa.ipc.new_stream(str(folder / (INDEX + ".tmp")), index.schema) as writer:
        writer.write_batch(index)
    os.replace(folder / (INDEX + ".tmp"), folder / INDEX)
    negatives = pc.list_value_length(table.column("hard_negatives"))
    full = {**meta, "version": STORE_VERSION, "files": files, "rows": table.num_rows,
            "groups": int(groups.max()) + 1, "language_names": names.to_pylist(), "digest": content_digest(table, names.to_pylist()),
            "rows_with_hard_negatives": int(pc.sum(pc.greater(negatives, 0)).as_py() or 0),
            "max_hard_negatives": int(pc.max(negatives).as_py() or 0), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_datasets_files(folder, files, full)
    (folder / META).write_text(json.dumps(full, indent=1))


def _string_parts(array: pa.Array) -> tuple[np.ndarray, memoryview]:
    """The lengths and the bytes of a string array's values (a slice reads only its own part of the buffers)."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    return np.diff(offsets), memoryview(data)[offsets[0] : offsets[-1]] if data is not None else memoryview(b"")


def content_digest(table: pa.Table, language_names: Sequence[str]) -> str:
    """A digest of what the rows hold, whatever the record batches' sizes: each column's value lengths and bytes
    are hashed in row order (xxh3, one pass over the mapped files)."""
    hashers = {}
    for name in SCHEMA.names:
        for chunk in table.column(name).chunks:
            parts = [chunk]
            if pa.types.is_list(chunk.type):
                offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
                parts = [chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))]
                hashers.setdefault(f"{name}:count", xxhash.xxh3_128()).update(np.diff(offsets).tobytes())
            for part in parts:
                lengths, data = _string_parts(part)
                hashers.setdefault(f"{name}:lengths", xxhash.xxh3_128()).update(lengths.tobytes())
                hashers.setdefault(f"{name}:bytes", xxhash.xxh3_128()).update(data)
    described = {key: hasher.hexdigest() for key, hasher in sorted(hashers.items())}
    described["languages"] = list(language_names)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _write_datasets_files(folder: Path, files: list[str], meta: dict[str, Any]) -> None:
    """``state.json`` and ``dataset_info.json`` as ``Dataset.save_to_disk`` writes them."""
    from datasets import DatasetInfo, Features

    DatasetInfo(description=f"hybrid_retrieval training pairs {meta.get('name')!r} ({meta.get('reader')})",
                features=Features.from_arrow_schema(SCHEMA)).write_to_directory(str(folder))
    state = {"_data_files": [{"filename": name} for name in files], "_fingerprint": meta["fingerprint"],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())


def open_rows(folder: Path, files: Sequence[str] | None = None) -> pa.Table:
    """The rows of a store, memory-mapped (no copy)."""
    names = files if files is not None else read_meta(folder)["files"]
    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in names]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def open_index(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(groups, languages)``: the store's integer columns as read-only numpy views of the mapped file."""
    batch = pa.ipc.open_stream(pa.memory_map(str(folder / INDEX))).read_next_batch()
    return (batch.column(0).to_numpy(zero_copy_only=True), batch.column(1).to_numpy(zero_copy_only=True))


def store_folder(name: str, key: str) -> Path:
    """Where the store named `name` with cache key `key` (:func:`store_key`) lives (complete once it holds META)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return pairs_cache_dir() / f"{safe}-{key}"


def cached_store(name: str, reader: str, options: dict[str, Any], sources: Sequence[str | os.PathLike[str]],
                 chunks: Callable[[Any], Iterator[Chunk]], language_names: Sequence[str] | None = None,
                 progress: Any = None) -> Path:
    """The store of `reader` with `options` over `sources`: from the cache, else converted now (one process
    converts, the others wait for its lock and open the result)."""
    from filelock import FileLock

    key = store_key(reader, options, sources)
    folder = store_folder(name, key)
    if (folder / META).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / META).exists():
            meta = {"name": name, "reader": reader, "options": options, "fingerprint": key,
                    "source": ", ".join(str(Path(s).expanduser()) for s in sources)}
            from hybrid_retrieval.progress import Progress

            with progress or Progress(None, f"convert {name} into {folder}", unit="rows") as shown:
                write_store(folder, chunks, meta, language_names, shown)
    return folder
