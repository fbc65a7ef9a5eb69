"""Training pairs from mMARCO (:func:`from_mmarco`), the machine translations of MS MARCO passage ranking.

The files are read in the layout the dataset is published in (``unicamp-dl/mmarco`` on the Hugging Face hub), under
a root folder::

    data/triples.train.ids.small.tsv                          qid<TAB>positive pid<TAB>negative pid (all languages)
    data/google/queries/train/<language>_queries.train.tsv    qid<TAB>query text
    data/google/collections/<language>_collection.tsv         pid<TAB>passage text

with full language names (``english``, ``german``, ...). One row per (triple, language): language by language in
the order given, triples in file order; group = the query id, so a query's rows in every language are one group
(and its several triples in one language several rows of it); query = the query's text in that language, passage =
the positive passage's text, hard negatives = [the triple's negative passage's text].

The collections (8.8M passages per language) are never loaded into Python: one pass over each file in binary finds
every line's id and the byte range of its text (numpy arrays, sorted by id); triples are then read in chunks of
:data:`CHUNK_TRIPLES`, their ids looked up with ``np.searchsorted`` and the texts sliced out of the memory-mapped
file. The rows go into the pair store (:func:`~hybrid_retrieval.data.pair_store.cached_store`): converted once,
resumed after its last committed part when killed.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hybrid_retrieval.config_error import BadValue, MissingPath
from hybrid_retrieval.data.pair_store import Chunk, StoreError, cached_store
from hybrid_retrieval.data.pairs import ParallelPairs

log = logging.getLogger(__name__)

__all__ = ["CHUNK_TRIPLES", "MMARCO_HARD_NEGATIVES", "MMARCO_LANGUAGES", "TRIPLE_FIELDS", "TRIPLES_FILE",
           "from_mmarco", "mmarco_files", "mmarco_languages"]

# Full name (as in the file names) -> ISO 639-1 code (the dataset's language names), in the published order.
MMARCO_LANGUAGES = {
    "english": "en", "chinese": "zh", "french": "fr", "german": "de", "indonesian": "id", "italian": "it",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "arabic": "ar", "dutch": "nl", "hindi": "hi",
    "japanese": "ja", "vietnamese": "vi",
}
MMARCO_HARD_NEGATIVES = (None, "triple")
TRIPLES_FILE = "data/triples.train.ids.small.tsv"
QUERIES_FILE = "data/google/queries/train/{language}_queries.train.tsv"
COLLECTION_FILE = "data/google/collections/{language}_collection.tsv"
TRIPLE_FIELDS = ("qid", "positive pid", "negative pid")
CHUNK_TRIPLES = 100_000  # triples read, looked up and handed to the store at a time
INDEX_BLOCK = 64 << 20  # bytes of a queries or collection file scanned at a time while indexing it
MAX_DIGITS = 18  # an id of more digits would overflow int64


def mmarco_languages(languages: Sequence[str] | str | None) -> list[tuple[str, str]]:
    """``(full name, code)`` of each language, in the order given; full names (``german``) or ISO codes (``de``),
    any case; a string is a comma-separated list; None = all 14."""
    if languages is None:
        return list(MMARCO_LANGUAGES.items())
    if isinstance(languages, str):
        languages = [part for part in (p.strip() for p in languages.split(",")) if part]
    by_code = {code: full for full, code in MMARCO_LANGUAGES.items()}
    found: list[tuple[str, str]] = []
    for language in languages:
        key = str(language).strip().lower()
        full = key if key in MMARCO_LANGUAGES else by_code.get(key)
        if full is None:
            raise BadValue(f"mMARCO has no language {language!r}; languages are full names or ISO codes of "
                             f"{', '.join(f'{f} ({c})' for f, c in MMARCO_LANGUAGES.items())}")
        if any(full == seen for seen, _ in found):
            raise BadValue(f"languages names {full!r} twice: {list(languages)}")
        found.append((full, MMARCO_LANGUAGES[full]))
    if not found:
        raise BadValue("languages must name at least one mMARCO language (null = all)")
    return found


def mmarco_files(root: str | os.PathLike[str], languages: Sequence[str] | str | None = None) -> dict[str, Path]:
    """The files :func:`from_mmarco` reads under `root`: ``triples``, then ``<language>_queries`` and
    ``<language>_collection`` per language. A missing one raises FileNotFoundError naming the path expected."""
    if root is None or not str(root).strip():
        raise MissingPath("mMARCO root is not set: set the root option (train_data.root=/path/to/mmarco, the "
                                f"folder holding {TRIPLES_FILE})")
    base = Path(root).expanduser()
    files = {"triples": base / TRIPLES_FILE}
    for full, _ in mmarco_languages(languages):
        files[f"{full}_queries"] = base / QUERIES_FILE.format(language=full)
        files[f"{full}_collection"] = base / COLLECTION_FILE.format(language=full)
    for path in files.values():
        if not path.is_file():
            raise MissingPath(
                f"mMARCO file {str(path)!r} does not exist; root {str(base)!r} must hold the published layout "
                f"({TRIPLES_FILE}, {QUERIES_FILE}, {COLLECTION_FILE}): set the root option "
                "(train_data.root=/path/to/mmarco)")
    return files


def from_mmarco(
    root: str | os.PathLike[str],
    languages: Sequence[str] | str | None = None,
    name: str = "mmarco",
    max_triples: int | None = None,
    hard_negative: str | None = "triple",
) -> ParallelPairs:
    """Training rows from mMARCO under `root` (layout in the module docstring): one per (triple, language),
    grouped by query id; converted into the pair store once, then memory-mapped.

    - languages: full names (``english``) or ISO codes (``en``), in the order the rows are written; None = all 14.
      The dataset's language names are the codes.
    - max_triples: only the first this many triples of the triples file (in every language); None = all.
    - hard_negative: "triple": the triple's negative passage is the row's hard negative; None: no hard negatives.

    A missing file raises FileNotFoundError naming the path expected; a malformed triple, or one whose qid or pid
    is not in a language's file, raises :class:`~hybrid_retrieval.data.pair_store.StoreError` naming the triples
    file, the line and the field (and the language's file), and leaves nothing in the cache.
    """
    if hard_negative not in MMARCO_HARD_NEGATIVES:
        raise BadValue(f"hard_negative must be one of {list(MMARCO_HARD_NEGATIVES)}, got {hard_negative!r}")
    if max_triples is not None and (isinstance(max_triples, bool) or not isinstance(max_triples, int)
                                    or max_triples < 1):
        raise BadValue(f"max_triples must be null or a positive int, got {max_triples!r}")
    chosen = mmarco_languages(languages)
    files = mmarco_files(root, [full for full, _ in chosen])
    codes = [code for _, code in chosen]
    options = {"languages": codes, "max_triples": max_triples, "hard_negative": hard_negative}

    def chunks(position: Any) -> Iterator[Chunk]:
        return _chunks(files, chosen, max_triples, hard_negative, position)

    folder = cached_store(name, "mmarco", options, [str(p) for p in files.values()], chunks, codes)
    return ParallelPairs.open(folder)


def _chunks(files: dict[str, Path], languages: list[tuple[str, str]], max_triples: int | None,
            hard_negative: str | None, position: Any) -> Iterator[Chunk]:
    """The store's rows from `position` on (None: the start): ``{"language": index into languages, "line": lines
    of the triples file read, "triples": triples read, "offset": byte offset in the triples file}`` after each
    chunk; a language's last chunk points at the start of the next language."""
    start = position or {"language": 0, "line": 0, "triples": 0, "offset": 0}
    triples = _Mapped(files["triples"])

    def done(count: int, offset: int) -> bool:
        return offset >= triples.size or (max_triples is not None and count >= max_triples)

    try:
        for index in range(int(start["language"]), len(languages)):
            line, count, offset = ((int(start["line"]), int(start["triples"]), int(start["offset"]))
                                   if index == int(start["language"]) else (0, 0, 0))
            offset = max(offset, triples.start)
            if done(count, offset):
                continue
            full, code = languages[index]
            queries = _IdTexts(files[f"{full}_queries"], "qid")
            try:
                collection = _IdTexts(files[f"{full}_collection"], "pid")
            except BaseException:
                queries.close()
                raise
            try:
                while not done(count, offset):
                    limit = CHUNK_TRIPLES if max_triples is None else min(CHUNK_TRIPLES, max_triples - count)
                    ids, numbers, lines_read, offset = _read_triples(triples, offset, line, limit)
                    line += lines_read
                    count += len(numbers)
                    following = ({"language": index + 1, "line": 0, "triples": 0, "offset": 0}
                                 if done(count, offset) else
                                 {"language": index, "line": line, "triples": count, "offset": offset})
                    if not len(numbers):
                        continue
                    yield _chunk(ids, numbers, full, code, triples.path, queries, collection, hard_negative,
                                 following)
            finally:
                queries.close()
                collection.close()
    finally:
        triples.close()


def _chunk(ids: np.ndarray, numbers: np.ndarray, full: str, code: str, triples: Path, queries: _IdTexts,
           collection: _IdTexts, hard_negative: str | None, position: dict[str, int]) -> Chunk:
    """One chunk of rows: the triples' texts in one language (ids: (n, 3) qid, positive pid, negative pid;
    numbers: their lines in the triples file)."""
    looked = [queries.locate(ids[:, 0]), collection.locate(ids[:, 1])]
    if hard_negative is not None:
        looked.append(collection.locate(ids[:, 2]))
    missing = [np.flatnonzero(~found) for _, found in looked]
    first = min((int(m[0]) for m in missing if len(m)), default=None)
    if first is not None:
        field = next(f for f, m in enumerate(missing) if len(m) and m[0] == first)
        source = queries if field == 0 else collection
        raise StoreError(f"{triples}:{int(numbers[first])}: field {TRIPLE_FIELDS[field]!r} {int(ids[first, field])} "
                         f"is not in {source.path} ({full})")
    n = len(ids)
    query = queries.texts(looked[0][0], lambda i: f"{triples}:{int(numbers[i])}: query {int(ids[i, 0])}")
    passage = collection.texts(looked[1][0], lambda i: f"{triples}:{int(numbers[i])}: positive pid {int(ids[i, 1])}")
    negatives = None
    if hard_negative is not None:
        texts = collection.texts(looked[2][0], lambda i: f"{triples}:{int(numbers[i])}: negative pid {int(ids[i, 2])}")
        negatives = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), texts)

    def where(i: int) -> str:
        qid, positive, negative = (int(v) for v in ids[i])
        return (f"{triples}:{int(numbers[i])} ({full}: qid {qid} in {queries.path.name}, positive pid {positive}"
                f"{f', negative pid {negative}' if hard_negative is not None else ''} in {collection.path.name})")

    return Chunk(group=pa.array(ids[:, 0]).cast(pa.string()), language=pa.array([code] * n, pa.string()),
                 query=query, passage=passage, hard_negatives=negatives, where=where, position=position)


class _Mapped:
    """A file memory-mapped read-only (an empty file maps to nothing); ``start``: where its lines begin (after a
    UTF-8 byte order mark, if it has one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self.map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self.start = 3 if self.map is not None and self.map[:3] == b"\xef\xbb\xbf" else 0

    def bytes(self, start: int, end: int) -> np.ndarray:
        """``[start, end)`` as a numpy view (no copy)."""
        if self.map is None or end <= start:
            return np.empty(0, np.uint8)
        return np.frombuffer(self.map, np.uint8, count=end - start, offset=start)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still referenced (an exception's traceback): the collector closes it
                pass
        self._file.close()


class _IdTexts(_Mapped):
    """An ``id<TAB>text`` file (queries, a collection): each id's text's byte range, found in one binary pass and
    kept as numpy arrays sorted by id; texts are read by slicing the mapped file."""

    def __init__(self, path: Path, field: str) -> None:
        super().__init__(path)
        self.field = field
        began = time.perf_counter()
        try:
            self.ids, self.starts, self.ends = self._index()
        except BaseException:
            self.close()
            raise
        log.info("indexed %s: %d %ss in %.1f s", path, len(self.ids), field, time.perf_counter() - began)

    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, starts, ends, numbers = [], [], [], []
        offset, line, block = self.start, 0, INDEX_BLOCK
        while offset < self.size:
            end = min(offset + block, self.size)
            buffer = self.bytes(offset, end)
            first, last, consumed = _lines(buffer, end == self.size, None)
            if not consumed:  # a line longer than the block
                block *= 2
                continue
            kept = np.flatnonzero(last > first)  # blank lines are skipped
            number = line + 1 + kept
            line += len(first)
            first, last = first[kept], last[kept]
            tabs = np.flatnonzero(buffer[:consumed] == 9)
            at = np.searchsorted(tabs, first)
            tab = tabs[np.minimum(at, len(tabs) - 1)] if len(tabs) else np.zeros(len(first), np.int64)
            has_tab = (at < len(tabs)) & (tab < last)
            values, ok = _parse_ints(buffer, first, np.where(has_tab, tab, last))
            bad = np.flatnonzero(~(has_tab & ok))
            if len(bad):
                i = int(bad[0])
                text = bytes(buffer[first[i]:last[i]][:200]).decode("utf-8", "replace")
                raise StoreError(f"{self.path}:{int(number[i])}: field {self.field!r} must be a non-negative integer "
                                 f"followed by a tab and the text, got {text!r}")
            ids.append(values)
            starts.append(offset + tab + 1)
            ends.append(offset + last)
            numbers.append(number)
            offset += consumed
            block = INDEX_BLOCK
        if not ids:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        all_ids = all_ids[order]
        repeated = np.flatnonzero(all_ids[1:] == all_ids[:-1])
        if len(repeated):
            lines = np.concatenate(numbers)[order]
            i = int(repeated[0])
            raise StoreError(f"{self.path}:{int(lines[i + 1])}: field {self.field!r} {int(all_ids[i])} repeats the "
                             f"{self.field} of line {int(lines[i])}")
        return all_ids, np.concatenate(starts)[order], np.concatenate(ends)[order]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)``: where each id is in the index, and whether it is there at all."""
        rows = np.searchsorted(self.ids, ids)
        found = rows < len(self.ids)
        found[found] = self.ids[rows[found]] == ids[found]
        return np.where(found, rows, 0), found

    def texts(self, rows: np.ndarray, where: Any) -> pa.Array:
        """The texts of index rows `rows` as one string array, sliced from the mapped file; invalid UTF-8 raises
        :class:`StoreError` naming ``where(i)`` and the file."""
        starts, ends = self.starts[rows], self.ends[rows]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        data = b"".join(map(self.map.__getitem__, map(slice, starts.tolist(), ends.tolist()))) if len(rows) else b""
        kind = pa.string() if offsets[-1] < 2**31 else pa.large_string()
        offsets = offsets.astype(np.int32) if kind == pa.string() else offsets
        array = pa.Array.from_buffers(kind, len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        try:
            array.validate(full=True)
        except pa.ArrowInvalid:
            for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
                try:
                    self.map[start:end].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise StoreError(f"{where(i)}: its text in {self.path} (byte {start}) is not valid UTF-8 "
                                     f"({exc.reason})") from None
            raise
        return array


def _lines(buffer: np.ndarray, at_end: bool, most: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The complete lines at the start of `buffer` (the last one may lack its newline when `at_end`), at most
    `most`: ``(starts, ends, bytes consumed)``, ends without the newline (``\\n`` or ``\\r\\n``)."""
    newlines = np.flatnonzero(buffer == 10)
    if most is not None and len(newlines) >= most:
        newlines, at_end = newlines[:most], False
    consumed = int(newlines[-1]) + 1 if len(newlines) else 0
    ends = newlines
    if at_end and consumed < len(buffer):
        ends, consumed = np.append(newlines, len(buffer)), len(buffer)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    if len(ends):
        ends = ends - ((ends > starts) & (buffer[np.maximum(ends - 1, 0)] == 13))
    return starts, ends, consumed


def _parse_ints(buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, ok)``: the non-negative decimal integers ``buffer[starts[i]:ends[i]]``; ok is false for an empty
    field, one with a non-digit or one of more than :data:`MAX_DIGITS` digits."""
    lengths = ends - starts
    ok = (lengths > 0) & (lengths <= MAX_DIGITS)
    values = np.zeros(len(starts), np.int64)
    last = max(len(buffer) - 1, 0)
    for j in range(min(int(lengths.max(initial=0)), MAX_DIGITS)):
        active = ok & (lengths > j)
        digits = buffer[np.minimum(starts + j, last)].astype(np.int64) - 48
        ok &= ~active | ((digits >= 0) & (digits <= 9))
        values = np.where(active, values * 10 + digits, values)
    return values, ok


def _read_triples(triples: _Mapped, offset: int, line: int, most: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Up to `most` lines of the triples file from byte `offset` (`line` lines read before it): ``(ids (n, 3),
    their line numbers, lines read, the offset after them)``; blank lines are skipped, a malformed line raises
    :class:`StoreError` naming the file, the line and the field."""
    window = 32 * most
    while True:
        end = min(offset + window, triples.size)
        buffer = triples.bytes(offset, end)
        starts, ends, consumed = _lines(buffer, end == triples.size, most)
        if consumed or end == triples.size:
            break
        window *= 2
    lines_read = len(starts)
    kept = np.flatnonzero(ends > starts)
    numbers = line + 1 + kept
    starts, ends = starts[kept], ends[kept]
    tabs = np.flatnonzero(buffer[:consumed] == 9)
    at = np.searchsorted(tabs, starts)
    count = np.searchsorted(tabs, ends) - at
    fields = len(TRIPLE_FIELDS)
    bounds = [starts]
    for k in range(fields - 1):
        tab = tabs[np.minimum(at + k, len(tabs) - 1)] if len(tabs) else np.zeros(len(starts), np.int64)
        bounds += [tab, tab + 1]
    bounds.append(ends)
    parsed = [_parse_ints(buffer, bounds[2 * k], bounds[2 * k + 1]) for k in range(fields)]
    shaped = count == fields - 1
    bad = np.flatnonzero(~(shaped & np.logical_and.reduce([ok for _, ok in parsed])))
    if len(bad):
        i = int(bad[0])
        where = f"{triples.path}:{int(numbers[i])}"
        text = bytes(buffer[starts[i]:ends[i]][:200]).decode("utf-8", "replace")
        expected = "a line is 'qid<TAB>positive pid<TAB>negative pid'"
        if count[i] < fields - 1:
            raise StoreError(f"{where}: field {TRIPLE_FIELDS[count[i] + 1]!r} is missing ({expected}), got {text!r}")
        if count[i] > fields - 1:
            raise StoreError(f"{where}: field 'negative pid' is followed by {int(count[i]) - 2} more field(s) "
                             f"({expected}), got {text!r}")
        k = next(k for k, (_, ok) in enumerate(parsed) if not ok[i])
        value = bytes(buffer[bounds[2 * k][i]:bounds[2 * k + 1][i]]).decode("utf-8", "replace")
        raise StoreError(f"{where}: field {TRIPLE_FIELDS[k]!r} must be a non-negative integer, got {value!r} "
                         f"({expected})")
    ids = np.stack([values for values, _ in parsed], axis=1) if len(starts) else np.empty((0, 3), np.int64)
    return ids, numbers, lines_read, offset + consumed
