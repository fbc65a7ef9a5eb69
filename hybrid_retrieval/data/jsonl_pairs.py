"""Training pairs from a JSON-lines file (:func:`from_jsonl`), one object per line (blank lines are skipped)::

    {"group": "q17", "language": "de", "query": "...", "passage": "...", "hard_negative": "..."}

``group``, ``language``, ``query`` and ``passage`` are non-empty strings; ``hard_negative`` is optional (a non-empty
string or null). Other keys are rejected so that a misspelt key is noticed. Groups and languages are numbered in
order of first appearance.
"""

from __future__ import annotations

import os
from pathlib import Path

from hybrid_retrieval.data.jsonl import json_objects
from hybrid_retrieval.data.pairs import PairRow, ParallelPairs

__all__ = ["JSONL_FIELDS", "JSONL_HARD_NEGATIVES", "from_jsonl", "read_jsonl_rows"]

JSONL_HARD_NEGATIVES = (None, "file")
JSONL_FIELDS = {"group": True, "language": True, "query": True, "passage": True, "hard_negative": False}


def read_jsonl_rows(path: str | os.PathLike[str]) -> list[tuple[int, PairRow]]:
    """Every row of a training JSON-lines file (format in the module docstring) with its line number (1-based),
    each line checked; an error names the file, the line number and the field."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"training data file {str(file)!r} does not exist (train_data path)")
    rows: list[tuple[int, PairRow]] = []
    with file.open("r", encoding="utf-8") as handle:
        for number, where, row in json_objects(handle, lambda n: f"{file}:{n}", ValueError):
            unknown = sorted(set(row) - set(JSONL_FIELDS))
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}; expected fields {list(JSONL_FIELDS)}")
            for field, required in JSONL_FIELDS.items():
                value = row.get(field)
                if value is None and not required:
                    continue
                if field not in row:
                    raise ValueError(f"{where}: field {field!r} is missing (expected a non-empty string)")
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
            rows.append((number, PairRow(row["group"], row["language"], row["query"], row["passage"],
                                         row.get("hard_negative"))))
    return rows


def from_jsonl(path: str | os.PathLike[str], name: str | None = None, hard_negative: str | None = "file") -> ParallelPairs:
    """Training rows from a JSON-lines file (format in the module docstring); `name` defaults to the file stem.

    hard_negative: "file" uses the rows' ``hard_negative`` fields (where present); None ignores them.

    Every line is checked (:func:`read_jsonl_rows`); an error names the file, the line number and the field.
    """
    if hard_negative not in JSONL_HARD_NEGATIVES:
        raise ValueError(f"hard_negative must be one of {list(JSONL_HARD_NEGATIVES)}, got {hard_negative!r}")
    file = Path(path).expanduser()
    rows = [row for _, row in read_jsonl_rows(file)]
    if not rows:
        raise ValueError(f"{file}: no rows (expected one JSON object per line)")
    keep = hard_negative == "file" and any(row.hard_negative is not None for row in rows)
    return ParallelPairs.from_rows(name or file.stem, rows, hard_negatives=keep)
