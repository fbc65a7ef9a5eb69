"""Parallel training data: rows of (group, language, query, passage[, hard negative]) as :class:`ParallelPairs`.

Rows that share a group are translations of each other; that is what makes cross-lingual (X-Y) batches
possible and what a batch must avoid mixing (a passage's translation would be a false negative).

Readers, each in its own module, which ``conf/train_data`` names:

- :func:`from_lareqa` (:mod:`~hybrid_retrieval.data.lareqa_pairs`): one row per (question, language) of
  XQuAD-R / MLQA-R; query = the question, passage = its gold sentence (optionally followed by the paragraph),
  group = the shared question id.
- :func:`from_squad` (:mod:`~hybrid_retrieval.data.squad`): SQuAD v1.1-format files, one per language, e.g. the
  machine translations SQuAD-es and SQuAD-it; the passage is the sentence holding the answer
  (:mod:`~hybrid_retrieval.data.sentences` splits the paragraphs).
- :func:`from_jsonl` (:mod:`~hybrid_retrieval.data.jsonl_pairs`): a JSON-lines file, one row per line.

All three are plain functions so that Hydra can build them from a ``train_data`` config, whose ``datasets`` list
holds entries like ``{_target_: hybrid_retrieval.data.lareqa_pairs.from_lareqa, name: mlqa_r}``; build them with
:func:`build_datasets` (a bare ``hydra.utils.instantiate`` with the default ``_convert_`` would turn the
dataclasses back into DictConfigs).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS, Paragraph, check_holdout, format_passage
from hybrid_retrieval.data.pair_store import (META, Chunk, cached_store, content_digest, open_index, open_rows,
                                              read_meta, store_folder, store_key)

__all__ = [
    "PASSAGE_TEXTS",
    "PairRow",
    "ParallelPairs",
    "LanguageCoverage",
    "build_datasets",
    "check_reader_options",
    "language_coverage",
    "question_rows",
]

class TextColumn(Sequence[Any]):
    """One column of a pairs table as a read-only sequence: ``column[i]`` reads one value, iteration reads a chunk
    at a time; nothing is copied until read."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.chunks = column.chunks
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        chunk = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.chunks[chunk][index - int(self.offsets[chunk])].as_py()

    def take(self, rows: Sequence[int] | np.ndarray) -> list[Any]:
        """The values of `rows`, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        chunks = np.searchsorted(self.offsets, rows, side="right") - 1
        local = rows - self.offsets[chunks]
        return [self.chunks[c][i].as_py() for c, i in zip(chunks.tolist(), local.tolist())]

    def __iter__(self) -> Iterator[Any]:
        for chunk in self.chunks:
            yield from chunk.to_pylist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (TextColumn, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-sequence semantics: compared by value


class ParallelPairs:
    """One training dataset: rows of (group, language, query, passage, hard negatives) in an Arrow table. Rows
    that share a group are translations of each other.

    ``groups`` and ``languages`` are integer arrays (group index 0..n_groups-1, language index into
    ``language_names``): for a store (:meth:`open`) they are read-only views of its memory-mapped index, so
    every process that opens it shares the same pages. Texts stay in the table until a batch reads them
    (:meth:`fetch`). Built from Python lists (``queries``, ``passages``, ``hard_negatives``: per row None, one
    string or a list of strings) the table is held in memory.
    """

    def __init__(self, name: str, groups: Any, languages: Any, language_names: Sequence[str],
                 queries: Sequence[str] | None = None, passages: Sequence[str] | None = None,
                 hard_negatives: Sequence[Any] | None = None, *, table: pa.Table | None = None,
                 folder: Path | None = None, digest: str | None = None,
                 negatives: tuple[int, int] | None = None) -> None:
        self.name = name
        self.groups = groups if isinstance(groups, np.ndarray) and groups.dtype.kind == "i" \
            else np.asarray(groups, dtype=np.int64)
        self.languages = languages if isinstance(languages, np.ndarray) and languages.dtype.kind == "i" \
            else np.asarray(languages, dtype=np.int64)
        self.language_names = list(language_names)
        self.folder = folder
        if table is None:
            table = self._table_from_lists(queries, passages, hard_negatives)
        self.table = table
        self._digest = digest
        self.validate()
        self.query_column = TextColumn(table.column("query"))
        self.passage_column = TextColumn(table.column("passage"))
        self.negative_column = TextColumn(table.column("hard_negatives"))
        if negatives is None:
            counts = pc.list_value_length(table.column("hard_negatives"))
            negatives = (int(pc.sum(pc.greater(counts, 0)).as_py() or 0), int(pc.max(counts).as_py() or 0))
        # (rows with hard negatives, the most a row has): a store's metadata says, without reading the column.
        self.rows_with_hard_negatives, self.max_hard_negatives = negatives

    def _table_from_lists(self, queries: Sequence[Any] | None, passages: Sequence[Any] | None,
                          hard_negatives: Sequence[Any] | None) -> pa.Table:
        where = f"ParallelPairs {self.name!r}"
        n = len(self.groups)
        lengths = {"queries": len(queries or []), "passages": len(passages or [])}
        if hard_negatives is not None:
            lengths["hard_negatives"] = len(hard_negatives)
        for field, length in lengths.items():
            if length != n:
                raise BadValue(f"{where}: {field} has {length} rows, expected {n} like groups")
        for field, values in (("queries", queries), ("passages", passages)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise BadValue(f"{where}: {field}[{bad}] is {type(values[bad]).__name__}, expected str")
        negatives: list[list[str]] = []
        for i, value in enumerate(hard_negatives if hard_negatives is not None else [None] * n):
            value = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise BadValue(f"{where}: hard_negatives[{i}] is {type(value).__name__}, expected str, a list of "
                                 "str or None")
            negatives.append(list(value))
        return pa.table({"group": pa.array([str(g) for g in self.groups.tolist()], pa.string()),
                         "language": pa.array([self.language_names[i] if 0 <= i < len(self.language_names) else ""
                                               for i in self.languages.tolist()], pa.string()),
                         "query": pa.array(list(queries), pa.string()),
                         "passage": pa.array(list(passages), pa.string()),
                         "hard_negatives": pa.array(negatives, pa.list_(pa.string()))})

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> ParallelPairs:
        """A converted store (:mod:`~hybrid_retrieval.data.pair_store`), memory-mapped."""
        folder = Path(folder)
        meta = read_meta(folder)
        groups, languages = open_index(folder)
        return cls(meta["name"], groups, languages, meta["language_names"], table=open_rows(folder, meta["files"]),
                   folder=folder, digest=meta["digest"],
                   negatives=(meta["rows_with_hard_negatives"], meta["max_hard_negatives"]))

    @classmethod
    def from_rows(cls, name: str, rows: Sequence[PairRow] | Callable[[], Sequence[PairRow]],
                  language_names: Sequence[str] | None = None, hard_negatives: bool = False,
                  store: StoreSpec | None = None) -> ParallelPairs:
        """A dataset of rows with string ids: groups numbered by first appearance; languages indexed into
        `language_names` (default: by first appearance); the rows' hard negatives kept when `hard_negatives`.
        With `store` the rows are converted into the cache (once) and opened from there. `rows` may be a function
        that makes them: with `store` it runs only when the cache does not hold them yet."""
        if store is not None:
            folder = store_folder(name, store_key(store.reader, store.options, store.sources))
            if (folder / META).exists():
                return cls.open(folder)
        if callable(rows):
            rows = rows()
        if store is not None:
            def chunks(_: Any) -> Iterator[Chunk]:
                for start in range(0, len(rows), 100_000):
                    part = rows[start : start + 100_000]
                    yield Chunk([r.group for r in part], [r.language for r in part], [r.query for r in part],
                                [r.passage for r in part],
                                [[r.hard_negative] if hard_negatives and r.hard_negative is not None else []
                                 for r in part],
                                where=lambda i, start=start: f"{store.source} row {start + i + 1}")
            return cls.open(cached_store(name, store.reader, store.options, store.sources, chunks, language_names))
        groups, _ = _index([row.group for row in rows])
        if language_names is None:
            languages, language_names = _index([row.language for row in rows])
        else:
            lookup = {language: i for i, language in enumerate(language_names)}
            languages = np.array([lookup[row.language] for row in rows], dtype=np.int64)
        return cls(name=name, groups=groups, languages=languages, language_names=list(language_names),
                   queries=[row.query for row in rows], passages=[row.passage for row in rows],
                   hard_negatives=[row.hard_negative for row in rows] if hard_negatives else None)

    def __len__(self) -> int:
        return len(self.groups)

    def __getstate__(self) -> dict[str, Any]:
        # A store travels as its folder (DataLoader workers started by spawn, DDP ranks): each process maps the
        # same files instead of receiving a copy of the table.
        if self.folder is not None:
            return {"folder": str(self.folder)}
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "folder" in state and len(state) == 1:
            state = ParallelPairs.open(state["folder"]).__dict__
        self.__dict__.update(state)

    @property
    def digest(self) -> str:
        """What the rows hold: for a store, digested once when it was written (constant time here, at any size);
        for a table in memory, digested now. Equal data, equal digest, wherever it was read from."""
        if self._digest is None:
            self._digest = content_digest(self.table, self.language_names)
        return self._digest

    @property
    def queries(self) -> TextColumn:
        return self.query_column

    @property
    def passages(self) -> TextColumn:
        return self.passage_column

    @property
    def hard_negatives(self) -> TextColumn | None:
        """Each row's list of hard negatives (empty lists for rows without), or None when no row has one."""
        return self.negative_column if self.rows_with_hard_negatives else None

    def fetch(self, query_rows: Sequence[int], passage_rows: Sequence[int],
              hard_negatives: int = 1) -> tuple[list[str], list[str], list[list[str]]]:
        """The texts of one batch: the queries of `query_rows`, the passages of `passage_rows` and up to
        `hard_negatives` hard negatives of each passage row."""
        queries = self.query_column.take(query_rows)
        passages = self.passage_column.take(passage_rows)
        if hard_negatives <= 0 or not self.rows_with_hard_negatives:
            return queries, passages, [[] for _ in passages]
        return queries, passages, [n[:hard_negatives] for n in self.negative_column.take(passage_rows)]

    def to_hf(self) -> Any:
        """The table as a Hugging Face ``datasets.Dataset`` (memory-mapped for a store)."""
        import datasets

        if self.folder is not None:
            return datasets.load_from_disk(str(self.folder))
        return datasets.Dataset(self.table)

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    def validate(self) -> ParallelPairs:
        """Check shapes and index ranges; raises ValueError naming the field. Returns self. (Texts are checked
        where the table is written.)"""
        n = self.table.num_rows
        where = f"ParallelPairs {self.name!r}"
        for field in ("groups", "languages"):
            array = getattr(self, field)
            if array.ndim != 1 or len(array) != n:
                raise BadValue(f"{where}: {field} has shape {array.shape}, expected ({n},) like queries")
        if n == 0:
            raise BadValue(f"{where}: no rows")
        if len(set(self.language_names)) != len(self.language_names):
            raise BadValue(f"{where}: language_names has repeats: {self.language_names}")
        if self.languages.min() < 0 or self.languages.max() >= len(self.language_names):
            raise BadValue(
                f"{where}: languages must index language_names (0..{len(self.language_names) - 1}), "
                f"got range {self.languages.min()}..{self.languages.max()}"
            )
        if self.groups.min() != 0 or not np.bincount(self.groups).all():
            raise BadValue(f"{where}: groups must be numbered 0..n_groups-1 with none unused")
        return self

    def rows_by_group(self) -> list[np.ndarray]:
        """rows_by_group()[g]: sorted row indices of group g."""
        order = np.argsort(self.groups, kind="stable")
        bounds = np.searchsorted(self.groups[order], np.arange(self.n_groups + 1))
        return [order[bounds[g] : bounds[g + 1]] for g in range(self.n_groups)]

    @functools.cached_property
    def coverage(self) -> LanguageCoverage:
        """Rows and groups per language, languages per group: computed once (the summary and the sampler's index
        both read it)."""
        return language_coverage(self.groups, self.languages, len(self.language_names), self.n_groups)

    def summary(self) -> dict[str, Any]:
        """Counts for logging: rows, groups, rows per language, groups by how many languages they span."""
        spans = np.bincount(self.coverage.languages_per_group)
        return {
            "name": self.name,
            "rows": len(self),
            "groups": self.n_groups,
            "languages": {name: len(self.coverage.rows_by_language[i]) for i, name in enumerate(self.language_names)},
            "groups_by_language_count": {k: int(v) for k, v in enumerate(spans) if v},
            "hard_negatives": self.rows_with_hard_negatives,
        }


@dataclass(frozen=True)
class LanguageCoverage:
    """Which languages a dataset's groups are in: the rows of each language (ascending; int32 where row numbers
    fit), the distinct groups each language holds, and the number of languages each group has rows in."""

    rows_by_language: list[np.ndarray]
    groups_per_language: list[int]
    languages_per_group: np.ndarray


def language_coverage(groups: np.ndarray, languages: np.ndarray, n_languages: int, n_groups: int) -> LanguageCoverage:
    """:class:`LanguageCoverage` of dense group ids (0..n_groups-1) and language indices (0..n_languages-1), in
    one pass per language."""
    dtype = np.int32 if len(groups) < 2**31 else np.int64
    rows_by_language, groups_per_language = [], []
    languages_per_group = np.zeros(n_groups, dtype=np.int32)
    for language in range(n_languages):
        rows = np.flatnonzero(languages == language).astype(dtype)
        present = np.bincount(groups[rows], minlength=n_groups) > 0
        rows_by_language.append(rows)
        groups_per_language.append(int(np.count_nonzero(present)))
        languages_per_group += present
    return LanguageCoverage(rows_by_language, groups_per_language, languages_per_group)


@dataclass(frozen=True)
class StoreSpec:
    """Where a reader's rows are cached: the reader's name, its options and the source files they depend on."""

    reader: str
    options: dict[str, Any]
    sources: list[str]
    source: str  # how a row's place is named in messages (a file or dataset name)


@dataclass(frozen=True)
class PairRow:
    """One training row with its group's string id (what :func:`from_jsonl` reads and the translation stage writes)."""

    group: str
    language: str
    query: str
    passage: str
    hard_negative: str | None = None


def _index(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Number values by first appearance."""
    ids: dict[str, int] = {}
    codes = np.fromiter((ids.setdefault(v, len(ids)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(ids)


def check_reader_options(passage_text: str, max_groups: int | None, hard_negative: str | None,
                         hard_negatives: Sequence[str | None]) -> None:
    """The options the LAReQA and SQuAD readers share; `hard_negatives`: the reader's accepted sources."""
    if passage_text not in PASSAGE_TEXTS:
        raise BadValue(f"passage_text must be one of {list(PASSAGE_TEXTS)}, got {passage_text!r}")
    if hard_negative not in hard_negatives:
        raise BadValue(f"hard_negative must be one of {list(hard_negatives)}, got {hard_negative!r}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise BadValue(f"max_groups must be null or a positive int, got {max_groups!r}")


def question_rows(files: Mapping[str, Any], passage_text: str, hard_negative: str | None,
                  kept: set[str] | None = None) -> list[PairRow]:
    """One row per (question, language) of parsed LAReQA or SQuAD files (``questions`` pointing into
    ``paragraphs``), language by language, questions in file order, only the ids in `kept` when given; group = the
    question id, passage = its answer sentence formatted as `passage_text` says. ``hard_negative: same_paragraph``:
    the sentence after the answer sentence in its paragraph, else the one before (None for a one-sentence
    paragraph), formatted like the passage."""
    rows: list[PairRow] = []
    for language, parsed in files.items():
        for q in parsed.questions:
            if kept is not None and q.id not in kept:
                continue
            para: Paragraph = parsed.paragraphs[q.paragraph]
            negative = None
            other = q.sentence + 1 if q.sentence + 1 < len(para.sentences) else q.sentence - 1
            if hard_negative and other >= 0:
                negative = format_passage(para.sentences[other], para.context, passage_text)
            rows.append(PairRow(q.id, language, q.text,
                                format_passage(para.sentences[q.sentence], para.context, passage_text), negative))
    return rows


def build_datasets(train_data: Any) -> list[ParallelPairs]:
    """Instantiate a ``train_data`` config (or its ``datasets`` list) into a list of :class:`ParallelPairs`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig
    from omegaconf.errors import MissingMandatoryValue

    entries = train_data.datasets if isinstance(train_data, (DictConfig, dict)) else train_data
    if isinstance(entries, (DictConfig, dict)) or not entries:
        raise BadValue("train_data.datasets must be a non-empty list of dataset configs with a _target_")
    holdout = train_data.get("holdout") if isinstance(train_data, (DictConfig, dict)) else None
    if holdout is not None:
        check_holdout(holdout)
        # One spec for the whole train_data: every LAReQA entry of the held-out dataset leaves those groups out.
        entries = [{**entry, "holdout": holdout} if str(entry.get("_target_", "")).endswith(".from_lareqa") else entry
                   for entry in entries]
    try:
        built = instantiate(entries, _convert_="all")
    except MissingMandatoryValue as exc:
        raise BadValue(
            f"train_data config lacks a required value ({exc.full_key}): set it on the command line, e.g. "
            "train_data.path=/path/to/file.jsonl (train_data=jsonl, parquet, hf) or train_data.root=/path/to/mmarco "
            "(train_data=mmarco)"
        ) from exc
    for i, item in enumerate(built):
        if not isinstance(item, ParallelPairs):
            raise BadValue(
                f"train_data.datasets[{i}] built a {type(item).__name__}, expected ParallelPairs "
                f"(use _target_: hybrid_retrieval.data.lareqa_pairs.from_lareqa or hybrid_retrieval.data.jsonl_pairs.from_jsonl)"
            )
    return list(built)
