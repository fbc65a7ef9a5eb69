"""Parallel training data: rows of (group, language, query, passage[, hard negative]) as :class:`ParallelPairs`.

Rows that share a group are translations of each other; that is what makes cross-lingual (X-Y) batches
possible and what a batch must avoid mixing (a passage's translation would be a false negative).

Readers, each in its own module; their names stay importable from here, where ``conf/train_data`` names them:

- :func:`from_lareqa` (:mod:`~hybrid_retrieval.data.lareqa_pairs`): one row per (question, language) of
  XQuAD-R / MLQA-R; query = the question, passage = its gold sentence (optionally followed by the paragraph),
  group = the shared question id.
- :func:`from_squad` (:mod:`~hybrid_retrieval.data.squad`): SQuAD v1.1-format files, one per language, e.g. the
  machine translations SQuAD-es and SQuAD-it; the passage is the sentence holding the answer
  (:mod:`~hybrid_retrieval.data.sentences` splits the paragraphs).
- :func:`from_jsonl` (:mod:`~hybrid_retrieval.data.jsonl_pairs`): a JSON-lines file, one row per line.

All three are plain functions so that Hydra can build them from a ``train_data`` config, whose ``datasets`` list
holds entries like ``{_target_: hybrid_retrieval.data.pairs.from_lareqa, name: mlqa_r}``; build them with
:func:`build_datasets` (a bare ``hydra.utils.instantiate`` with the default ``_convert_`` would turn the
dataclasses back into DictConfigs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS, Paragraph, check_holdout, format_passage

__all__ = [
    "HARD_NEGATIVE_SOURCES",
    "JSONL_FIELDS",
    "JSONL_HARD_NEGATIVES",
    "PASSAGE_TEXTS",
    "SQUAD_ANSWER_MATCHES",
    "SQUAD_HARD_NEGATIVES",
    "PairRow",
    "ParallelPairs",
    "SquadFile",
    "SquadQuestion",
    "build_datasets",
    "check_reader_options",
    "from_jsonl",
    "from_lareqa",
    "from_squad",
    "load_squad",
    "question_rows",
    "read_jsonl_rows",
    "read_squad_file",
    "resolve_squad_files",
    "sentence_spans",
    "split_sentences",
    "squad_rows",
    "xquad_question_ids",
]

# Where the names this module re-exports live: conf/train_data's ``_target_``s (and the configs runs logged) say
# ``hybrid_retrieval.data.pairs.from_lareqa``; loaded on first use, since those modules import this one.
_MOVED = {
    **dict.fromkeys(("from_lareqa", "HARD_NEGATIVE_SOURCES"), "lareqa_pairs"),
    **dict.fromkeys(("from_jsonl", "read_jsonl_rows", "JSONL_FIELDS", "JSONL_HARD_NEGATIVES"), "jsonl_pairs"),
    **dict.fromkeys(("from_squad", "load_squad", "read_squad_file", "resolve_squad_files", "squad_rows",
                     "xquad_question_ids", "SquadFile", "SquadQuestion", "SQUAD_ANSWER_MATCHES",
                     "SQUAD_HARD_NEGATIVES"), "squad"),
    **dict.fromkeys(("sentence_spans", "split_sentences"), "sentences"),
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"hybrid_retrieval.data.{module}"), name)


@dataclass
class ParallelPairs:
    """One training dataset: rows of (group, language, query, passage[, hard negative]). Rows that share a group
    are translations of each other."""

    name: str
    groups: np.ndarray  # int64 group index per row (0..n_groups-1)
    languages: np.ndarray  # int64 language index per row, into language_names
    language_names: list[str]
    queries: list[str]
    passages: list[str]
    hard_negatives: list[str | None] | None

    def __post_init__(self) -> None:
        # Accept lists for convenience; everything downstream relies on int64 arrays.
        self.groups = np.asarray(self.groups, dtype=np.int64)
        self.languages = np.asarray(self.languages, dtype=np.int64)
        self.language_names = list(self.language_names)
        self.validate()

    @classmethod
    def from_rows(cls, name: str, rows: Sequence[PairRow], language_names: Sequence[str] | None = None,
                  hard_negatives: bool = False) -> ParallelPairs:
        """A dataset of rows with string ids: groups numbered by first appearance; languages indexed into
        `language_names` (default: by first appearance); the rows' hard negatives kept when `hard_negatives`."""
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
        return len(self.queries)

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    def validate(self) -> ParallelPairs:
        """Check shapes, index ranges and text types; raises ValueError naming the field. Returns self."""
        n = len(self.queries)
        where = f"ParallelPairs {self.name!r}"
        for field in ("groups", "languages"):
            array = getattr(self, field)
            if array.ndim != 1 or len(array) != n:
                raise ValueError(f"{where}: {field} has shape {array.shape}, expected ({n},) like queries")
        lengths = {"passages": len(self.passages)}
        if self.hard_negatives is not None:
            lengths["hard_negatives"] = len(self.hard_negatives)
        for field, length in lengths.items():
            if length != n:
                raise ValueError(f"{where}: {field} has {length} rows, expected {n} like queries")
        if n == 0:
            raise ValueError(f"{where}: no rows")
        if len(set(self.language_names)) != len(self.language_names):
            raise ValueError(f"{where}: language_names has repeats: {self.language_names}")
        if self.languages.min() < 0 or self.languages.max() >= len(self.language_names):
            raise ValueError(
                f"{where}: languages must index language_names (0..{len(self.language_names) - 1}), "
                f"got range {self.languages.min()}..{self.languages.max()}"
            )
        used = np.unique(self.groups)
        if used[0] != 0 or used[-1] != len(used) - 1:
            raise ValueError(f"{where}: groups must be numbered 0..n_groups-1 with none unused")
        for field in ("queries", "passages"):
            values = getattr(self, field)
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"{where}: {field}[{bad}] is {type(values[bad]).__name__}, expected str")
        if self.hard_negatives is not None:
            bad = next((i for i, v in enumerate(self.hard_negatives) if v is not None and not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(
                    f"{where}: hard_negatives[{bad}] is {type(self.hard_negatives[bad]).__name__}, expected str or None"
                )
        return self

    def rows_by_group(self) -> list[np.ndarray]:
        """rows_by_group()[g]: sorted row indices of group g."""
        order = np.argsort(self.groups, kind="stable")
        bounds = np.searchsorted(self.groups[order], np.arange(self.n_groups + 1))
        return [order[bounds[g] : bounds[g + 1]] for g in range(self.n_groups)]

    def summary(self) -> dict[str, Any]:
        """Counts for logging: rows, groups, rows per language, groups by how many languages they span."""
        per_language = Counter(self.languages.tolist())
        spans = Counter(len(np.unique(self.languages[rows])) for rows in self.rows_by_group())
        return {
            "name": self.name,
            "rows": len(self),
            "groups": self.n_groups,
            "languages": {self.language_names[i]: per_language[i] for i in range(len(self.language_names))},
            "groups_by_language_count": dict(sorted(spans.items())),
            "hard_negatives": 0 if self.hard_negatives is None else sum(h is not None for h in self.hard_negatives),
        }


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
        raise ValueError(f"passage_text must be one of {list(PASSAGE_TEXTS)}, got {passage_text!r}")
    if hard_negative not in hard_negatives:
        raise ValueError(f"hard_negative must be one of {list(hard_negatives)}, got {hard_negative!r}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise ValueError(f"max_groups must be null or a positive int, got {max_groups!r}")


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
        raise ValueError("train_data.datasets must be a non-empty list of dataset configs with a _target_")
    holdout = train_data.get("holdout") if isinstance(train_data, (DictConfig, dict)) else None
    if holdout is not None:
        check_holdout(holdout)
        # One spec for the whole train_data: every LAReQA entry of the held-out dataset leaves those groups out.
        entries = [{**entry, "holdout": holdout} if str(entry.get("_target_", "")).endswith(".from_lareqa") else entry
                   for entry in entries]
    try:
        built = instantiate(entries, _convert_="all")
    except MissingMandatoryValue as exc:
        raise ValueError(
            f"train_data config lacks a required value ({exc.full_key}); for train_data=jsonl set "
            f"train_data.path=/path/to/file.jsonl"
        ) from exc
    for i, item in enumerate(built):
        if not isinstance(item, ParallelPairs):
            raise ValueError(
                f"train_data.datasets[{i}] built a {type(item).__name__}, expected ParallelPairs "
                f"(use _target_: hybrid_retrieval.data.pairs.from_lareqa or from_jsonl)"
            )
    return list(built)
