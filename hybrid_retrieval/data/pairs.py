"""Parallel training data: rows of (group, language, query, passage[, hard negative]).

Rows that share a group are translations of each other; that is what makes cross-lingual (X-Y) batches
possible and what a batch must avoid mixing (a passage's translation would be a false negative).

Sources:

- :func:`from_lareqa`: one row per (question, language) of XQuAD-R / MLQA-R; query = the question,
  passage = its gold sentence (optionally followed by the paragraph), group = the shared question id.
- :func:`from_jsonl`: a JSON-lines file, one object per line (blank lines are skipped)::

      {"group": "q17", "language": "de", "query": "...", "passage": "...", "hard_negative": "..."}

  ``group``, ``language``, ``query`` and ``passage`` are non-empty strings; ``hard_negative`` is optional
  (a non-empty string or null). Other keys are rejected so that a misspelt key is noticed. Groups and
  languages are numbered in order of first appearance.

Both are plain functions so that Hydra can build them from a ``train_data`` config, whose ``datasets`` list
holds entries like ``{_target_: hybrid_retrieval.data.pairs.from_lareqa, name: mlqa_r}``; build them with
:func:`build_datasets` (a bare ``hydra.utils.instantiate`` with the default ``_convert_`` would turn the
dataclasses back into DictConfigs).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS, format_passage, load_language_files, sha1_order

__all__ = [
    "HARD_NEGATIVE_SOURCES",
    "JSONL_HARD_NEGATIVES",
    "JSONL_FIELDS",
    "PASSAGE_TEXTS",
    "ParallelPairs",
    "build_datasets",
    "from_jsonl",
    "from_lareqa",
]

HARD_NEGATIVE_SOURCES = (None, "same_paragraph")  # from_lareqa
JSONL_HARD_NEGATIVES = (None, "file")  # from_jsonl
JSONL_FIELDS = {"group": True, "language": True, "query": True, "passage": True, "hard_negative": False}


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


def _index(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Number values by first appearance."""
    ids: dict[str, int] = {}
    codes = np.fromiter((ids.setdefault(v, len(ids)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(ids)


def from_lareqa(
    name: str,
    root: str | os.PathLike[str] | None = None,
    languages: Sequence[str] | str | None = None,
    passage_text: str = "sentence",
    max_groups: int | None = None,
    hard_negative: str | None = None,
) -> ParallelPairs:
    """Training rows from XQuAD-R / MLQA-R: one per (question, language), grouped by question id.

    - passage_text: "sentence" (the gold sentence) or "sentence_paragraph" (sentence + " " + paragraph), the
      same option and the same :func:`~hybrid_retrieval.data.lareqa.format_passage` as evaluation.
    - max_groups: keep the first this many question ids in the stable sha1 order that ``load_split``'s cap
      uses, with their rows in every language.
    - hard_negative: None, or "same_paragraph": the sentence after the gold one in its paragraph, else the one
      before (None for one-sentence paragraphs); formatted like the passage.
    """
    if passage_text not in PASSAGE_TEXTS:
        raise ValueError(f"passage_text must be one of {list(PASSAGE_TEXTS)}, got {passage_text!r}")
    if hard_negative not in HARD_NEGATIVE_SOURCES:
        raise ValueError(f"hard_negative must be one of {list(HARD_NEGATIVE_SOURCES)}, got {hard_negative!r}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise ValueError(f"max_groups must be null or a positive int, got {max_groups!r}")
    files = load_language_files(name, root, languages)

    kept: set[str] | None = None
    if max_groups is not None:
        # Same stable order as load_split's cap; a kept id keeps its rows in every language.
        all_ids = set().union(*({q.id for q in f.questions} for f in files.values()))
        kept = set(sha1_order(all_ids)[:max_groups])

    group_ids: list[str] = []
    language_ids: list[str] = []
    queries: list[str] = []
    passages: list[str] = []
    negatives: list[str | None] = []
    for lang, parsed in files.items():
        for q in parsed.questions:
            if kept is not None and q.id not in kept:
                continue
            para = parsed.paragraphs[q.paragraph]
            sentence = para.sentences[q.sentence]
            group_ids.append(q.id)
            language_ids.append(lang)
            queries.append(q.text)
            passages.append(format_passage(sentence, para.context, passage_text))
            if hard_negative == "same_paragraph":
                other = q.sentence + 1 if q.sentence + 1 < len(para.sentences) else q.sentence - 1
                if other < 0:
                    negatives.append(None)
                else:
                    negatives.append(format_passage(para.sentences[other], para.context, passage_text))
    groups, _ = _index(group_ids)
    language_names = list(files)
    lookup = {lang: i for i, lang in enumerate(language_names)}
    return ParallelPairs(
        name=name,
        groups=groups,
        languages=np.array([lookup[lang] for lang in language_ids], dtype=np.int64),
        language_names=language_names,
        queries=queries,
        passages=passages,
        hard_negatives=negatives if hard_negative is not None else None,
    )


def from_jsonl(path: str | os.PathLike[str], name: str | None = None, hard_negative: str | None = "file") -> ParallelPairs:
    """Training rows from a JSON-lines file (format in the module docstring); `name` defaults to the file stem.

    hard_negative: "file" uses the rows' ``hard_negative`` fields (where present); None ignores them.

    Every line is checked; an error names the file, the line number and the field.
    """
    if hard_negative not in JSONL_HARD_NEGATIVES:
        raise ValueError(f"hard_negative must be one of {list(JSONL_HARD_NEGATIVES)}, got {hard_negative!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"training data file {str(file)!r} does not exist (train_data path)")
    group_ids: list[str] = []
    language_ids: list[str] = []
    queries: list[str] = []
    passages: list[str] = []
    negatives: list[str | None] = []
    with file.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
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
            group_ids.append(row["group"])
            language_ids.append(row["language"])
            queries.append(row["query"])
            passages.append(row["passage"])
            negatives.append(row.get("hard_negative"))
    if not queries:
        raise ValueError(f"{file}: no rows (expected one JSON object per line)")
    groups, _ = _index(group_ids)
    languages, language_names = _index(language_ids)
    return ParallelPairs(
        name=name or file.stem,
        groups=groups,
        languages=languages,
        language_names=language_names,
        queries=queries,
        passages=passages,
        hard_negatives=negatives if hard_negative == "file" and any(n is not None for n in negatives) else None,
    )


def build_datasets(train_data: Any) -> list[ParallelPairs]:
    """Instantiate a ``train_data`` config (or its ``datasets`` list) into a list of :class:`ParallelPairs`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig
    from omegaconf.errors import MissingMandatoryValue

    entries = train_data.datasets if isinstance(train_data, (DictConfig, dict)) else train_data
    if isinstance(entries, (DictConfig, dict)) or not entries:
        raise ValueError("train_data.datasets must be a non-empty list of dataset configs with a _target_")
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
