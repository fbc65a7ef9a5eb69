"""Training pairs from a JSON-lines file (:func:`from_jsonl`), one object per line (blank lines are skipped)::

    {"group": "q17", "language": "de", "query": "...", "passage": "...", "hard_negative": "...",
     "hard_negatives": ["...", "..."]}

``group``, ``language``, ``query`` and ``passage`` are non-empty strings; ``hard_negative`` (a non-empty string or
null) and ``hard_negatives`` (a list of non-empty strings or null) are optional, and a row's hard negatives are
the first followed by the list. Other keys are rejected so that a misspelt key is noticed. Groups and languages
are numbered in order of first appearance.

The file is converted once into an Arrow store (:mod:`~hybrid_retrieval.data.pair_store`), a block of lines at a
time with pyarrow's JSON parser; a block it refuses, or with an empty field, is read again line by line so that
the error names the line and the field.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from hybrid_retrieval.config_error import BadValue, MissingPath
from hybrid_retrieval.data.jsonl import json_objects
from hybrid_retrieval.data.pair_store import TEXT_FIELDS, Chunk, StoreError, cached_store, joined_negatives
from hybrid_retrieval.data.pairs import PairRow, ParallelPairs

__all__ = ["JSONL_FIELDS", "JSONL_HARD_NEGATIVES", "check_jsonl_row", "from_jsonl", "jsonl_chunks", "read_jsonl_rows"]

JSONL_HARD_NEGATIVES = (None, "file")
JSONL_FIELDS = {"group": True, "language": True, "query": True, "passage": True, "hard_negative": False,
                "hard_negatives": False}
BLOCK_BYTES = 16 << 20
_SCHEMA = pa.schema([("group", pa.string()), ("language", pa.string()), ("query", pa.string()),
                     ("passage", pa.string()), ("hard_negative", pa.string()),
                     ("hard_negatives", pa.list_(pa.string()))])


def check_jsonl_row(row: dict[str, Any], where: str) -> None:
    """One parsed line against the format of the module docstring; the error names `where` and the field."""
    unknown = sorted(set(row) - set(JSONL_FIELDS))
    if unknown:
        raise StoreError(f"{where}: unknown field(s) {unknown}; expected fields {list(JSONL_FIELDS)}")
    for field, required in JSONL_FIELDS.items():
        value = row.get(field)
        if value is None and not required:
            continue
        if field not in row:
            raise StoreError(f"{where}: field {field!r} is missing (expected a non-empty string)")
        if field == "hard_negatives":
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise StoreError(f"{where}: field 'hard_negatives' must be a list of non-empty strings or null, "
                                 f"got {value!r}")
        elif not isinstance(value, str) or not value.strip():
            raise StoreError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")


def read_jsonl_rows(path: str | os.PathLike[str]) -> list[tuple[int, PairRow]]:
    """Every row of a training JSON-lines file with its line number (1-based), each line checked (the rows' first
    hard negative only); an error names the file, the line number and the field. For small files; training reads
    the file through :func:`from_jsonl`."""
    file = _existing(path)
    rows: list[tuple[int, PairRow]] = []
    with file.open("r", encoding="utf-8") as handle:
        for number, where, row in json_objects(handle, lambda n: f"{file}:{n}", StoreError):
            check_jsonl_row(row, where)
            negative = row.get("hard_negative") or next(iter(row.get("hard_negatives") or []), None)
            rows.append((number, PairRow(row["group"], row["language"], row["query"], row["passage"], negative)))
    return rows


def _existing(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingPath(f"training data file {str(file)!r} does not exist (train_data path)")
    return file


def _check_lines(block: bytes, file: Path, first_line: int) -> None:
    """Read a block again line by line; raises naming the first bad line and field."""
    lines = block.decode("utf-8", errors="strict").split("\n")
    for number, where, row in json_objects(lines, lambda n: f"{file}:{first_line + n - 1}", StoreError):
        check_jsonl_row(row, where)


def _incomplete(column: pa.ChunkedArray, required: bool) -> bool:
    """A missing value in a required field, or an empty or blank string in any."""
    if required and column.null_count:
        return True
    if pa.types.is_list(column.type):
        column = column.combine_chunks().flatten()
    return bool(pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py())


def _place(file: Path, block: bytes, first_line: int) -> Callable[[int], str]:
    """``where(i)``: ``file:line`` of the parser's row i in a block (its i-th non-blank line). The line numbers are
    counted only when a message needs one, not for every block converted."""
    found: list[int] = []

    def where(i: int) -> str:
        if not found:
            found.extend(first_line + n for n, line in enumerate(block.split(b"\n")) if line.strip())
        return f"{file}:{found[i]}"

    return where


def jsonl_chunks(file: Path, keep_negatives: bool) -> Any:
    """The chunk generator of :func:`~hybrid_retrieval.data.pair_store.cached_store` for a training JSON-lines file;
    its position is ``{"offset": bytes read, "line": lines read}``."""
    options = pj.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="error")

    def chunks(position: Any) -> Iterator[Chunk]:
        offset, line = (position["offset"], position["line"]) if position else (0, 0)
        with file.open("rb") as handle:
            handle.seek(offset)
            rest = b""
            while True:
                data = handle.read(BLOCK_BYTES)
                block = rest + data
                if not block:
                    return
                cut = block.rfind(b"\n") + 1 if data else len(block)
                if cut == 0:  # a line longer than a block: read on
                    rest = block
                    continue
                block, rest = block[:cut], block[cut:]
                first = line + 1
                try:
                    table = pj.read_json(io.BytesIO(block), parse_options=options,
                                         read_options=pj.ReadOptions(block_size=max(len(block), 1 << 20)))
                except (pa.ArrowInvalid, UnicodeDecodeError) as error:
                    _check_lines(block, file, first)
                    last = first + block.count(b"\n")
                    raise StoreError(f"{file}: lines {first}-{last}: {error}") from None
                if any(_incomplete(table.column(name), name in TEXT_FIELDS) for name in _SCHEMA.names):
                    _check_lines(block, file, first)
                offset += len(block)
                line += block.count(b"\n")
                negatives = joined_negatives(table.column("hard_negative").combine_chunks(),
                                             table.column("hard_negatives").combine_chunks()) if keep_negatives else None
                yield Chunk(table.column("group"), table.column("language"), table.column("query"),
                            table.column("passage"), negatives,
                            where=_place(file, block, first), position={"offset": offset, "line": line})

    return chunks


def from_jsonl(path: str | os.PathLike[str], name: str | None = None, hard_negative: str | None = "file") -> ParallelPairs:
    """Training rows from a JSON-lines file (format in the module docstring); `name` defaults to the file stem.

    hard_negative: "file" uses the rows' ``hard_negative`` / ``hard_negatives`` fields (where present); None
    ignores them.

    Converted once into the pairs cache; an error names the file, the line number and the field.
    """
    if hard_negative not in JSONL_HARD_NEGATIVES:
        raise BadValue(f"hard_negative must be one of {list(JSONL_HARD_NEGATIVES)}, got {hard_negative!r}")
    file = _existing(path)
    folder = cached_store(name or file.stem, "jsonl", {"hard_negative": hard_negative}, [file],
                          jsonl_chunks(file, hard_negative == "file"))
    return ParallelPairs.open(folder)
