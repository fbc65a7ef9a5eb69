"""Parallel training data: rows of (group, language, query, passage[, hard negative]).

Rows that share a group are translations of each other; that is what makes cross-lingual (X-Y) batches
possible and what a batch must avoid mixing (a passage's translation would be a false negative).

Sources:

- :func:`from_lareqa`: one row per (question, language) of XQuAD-R / MLQA-R; query = the question,
  passage = its gold sentence (optionally followed by the paragraph), group = the shared question id.
- :func:`from_squad`: SQuAD v1.1-format files (``.json`` or ``.json.gz``), one per language, e.g. the machine
  translations SQuAD-es and SQuAD-it; rows sharing a question id across the files are one group. The passage is
  the sentence holding the answer, found by :func:`sentence_spans` (rules in :func:`read_squad_file`).
- :func:`from_jsonl`: a JSON-lines file, one object per line (blank lines are skipped)::

      {"group": "q17", "language": "de", "query": "...", "passage": "...", "hard_negative": "..."}

  ``group``, ``language``, ``query`` and ``passage`` are non-empty strings; ``hard_negative`` is optional
  (a non-empty string or null). Other keys are rejected so that a misspelt key is noticed. Groups and
  languages are numbered in order of first appearance.

All three are plain functions so that Hydra can build them from a ``train_data`` config, whose ``datasets`` list
holds entries like ``{_target_: hybrid_retrieval.data.pairs.from_lareqa, name: mlqa_r}``; build them with
:func:`build_datasets` (a bare ``hydra.utils.instantiate`` with the default ``_convert_`` would turn the
dataclasses back into DictConfigs).
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.data.jsonl import json_objects
from hybrid_retrieval.data.lareqa import (PASSAGE_TEXTS, DataFormatError, Paragraph, _get, check_holdout,
                                          format_passage, holdout_groups, load_language_files, sha1_order)
from hybrid_retrieval.data.sources import DATA_ENV, DataNotFoundError, resolve_dataset_dir

log = logging.getLogger(__name__)

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
    "from_jsonl",
    "from_lareqa",
    "from_squad",
    "load_squad",
    "read_jsonl_rows",
    "read_squad_file",
    "resolve_squad_files",
    "sentence_spans",
    "split_sentences",
    "squad_rows",
    "xquad_question_ids",
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
    holdout: Any = None,
) -> ParallelPairs:
    """Training rows from XQuAD-R / MLQA-R: one per (question, language), grouped by question id.

    - holdout: a spec ``{dataset, groups, seed}`` (``train_data.holdout``); when it names this dataset, its
      held-out question groups (:func:`~hybrid_retrieval.data.lareqa.holdout_groups`: whole paragraphs, every
      language) are left out of training, for the selection split ``dataset=mlqa_r_selection`` to evaluate.

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
    spec = check_holdout(holdout)
    files = load_language_files(name, root, languages)
    held = holdout_groups(spec, root) if spec is not None and spec["dataset"] == name else frozenset()

    kept: set[str] | None = None
    if max_groups is not None or held:
        # Same stable order as load_split's cap; a kept id keeps its rows in every language.
        all_ids = set().union(*({q.id for q in f.questions} for f in files.values())) - held
        kept = set(sha1_order(all_ids)[:max_groups]) if max_groups is not None else all_ids

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
    group_ids = [r.group for r in rows]
    language_ids = [r.language for r in rows]
    queries = [r.query for r in rows]
    passages = [r.passage for r in rows]
    negatives = [r.hard_negative for r in rows]
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


# ----------------------------------------------------------------------------------------------------------
# SQuAD-format files: SQuAD v1.1 and its machine translations (SQuAD-es, SQuAD-it, ...), one file per language

SQUAD_HARD_NEGATIVES = (None, "same_paragraph")
# How a question's answer sentence was found; see read_squad_file.
SQUAD_ANSWER_MATCHES = ("exact", "in_sentence", "relocated", "offset_only")
XQUAD_IDS_FILE = "xquad.en.json"

# Sentence splitting. A boundary is a run of sentence-final marks plus any closing quotes or brackets; marks that
# are written before a space (Latin ".!?…", Devanagari danda, Arabic/Urdu, Ethiopic) must be followed by
# whitespace, full-width CJK marks need none. No boundary when the next sentence would start with a lowercase
# letter (scripts without case never are), nor after a period that ends an abbreviation or an initial.
_CLOSERS = "\"'»”’)]}」』）】》"
_OPENERS = "\"'«“‘([{¿¡"
_SPACED_MARKS = ".!?…" + "।॥" + "؟۔" + "።"
_BARE_MARKS = "。！？｡" + "။" + "។"
_EXTRA_SPACED_MARKS = {"el": ";"}  # the Greek question mark is written as ';'
_COMMON_ABBREVIATIONS = "mr mrs dr prof st jr sr mt no fig vs"  # titles and names that English ones keep
_ABBREVIATIONS: dict[str, frozenset[str]] = {
    language: frozenset((_COMMON_ABBREVIATIONS + " " + words).split())
    for language, words in {
        "en": "ms gen col lt sgt capt rev ft approx inc ltd co corp dept est",
        "es": "sra srta dra ud uds lic ing arq gral av pág núm aprox ee uu",
        "it": "sig sigg dott ing avv arch on sen pag art cap ca",
        "de": "nr str bzw ca vgl evtl mio mrd jh jhd",
        "fr": "mm mme mlle pr ste",
        "pt": "sra dra av",
    }.items()
}


def _base_language(language: str | None) -> str:
    return (language or "").replace("_", "-").split("-")[0].lower()


@lru_cache(maxsize=32)
def _boundary_pattern(language: str) -> re.Pattern[str]:
    spaced = re.escape(_SPACED_MARKS + _EXTRA_SPACED_MARKS.get(language, ""))
    closers = re.escape(_CLOSERS)
    return re.compile(rf"[{spaced}]+[{closers}]*(?=\s)|[{re.escape(_BARE_MARKS)}]+[{closers}]*")


def _ends_abbreviation(text: str, period: int, language: str) -> bool:
    """Whether the period at `period` closes an abbreviation, an initial or (German) an ordinal number."""
    word_start = period
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:period].lstrip(_OPENERS).rsplit("-", 1)[-1]  # "Trinity-St." ends in "St"
    if not word:
        return False
    if "." in word:  # "U.S.", "z.B.", "E.I."
        return True
    if len(word) == 1 and word.isalpha():  # initials ("J. K. Rowling"), Spanish "a. C."
        return True
    if language == "de" and word.isdigit() and len(word) <= 2:  # "am 7. Januar", "die 5. Liga"; not "1943."
        return True
    return word.lower() in _ABBREVIATIONS.get(language, frozenset())


def sentence_spans(text: str, language: str | None = None) -> list[tuple[int, int]]:
    """The sentences of `text` as half-open spans ``[start, end)`` that cover it without gaps.

    A span runs from a sentence's first character to the next sentence's first character, so trailing
    whitespace belongs to the sentence before it (``text[start:end].strip()`` is the sentence) and every offset
    of `text` lies in exactly one span. A simple rule-based splitter, no model (rules above ``_CLOSERS``):
    `language` (an ISO code such as ``es``; a region or script suffix is ignored) picks the abbreviation list
    (en, es, it, de, fr, pt), the Greek question mark and German ordinals. Languages written without sentence
    punctuation (Thai, Lao) come out as one sentence per paragraph. Against XQuAD-R's human sentence breaks it
    reproduces 94-98 % of the sentences exactly (es 94 %, en/de/ru 98 %; zh 89 % and tr 91 %, where the
    annotations themselves often keep two sentences together), and picks the annotated answer sentence for 96 %
    (es) to 98 % (en, ru) of XQuAD's questions.
    """
    n = len(text)
    if n == 0:
        return []
    base = _base_language(language)
    starts = [0]
    for match in _boundary_pattern(base).finditer(text):
        following = match.end()
        while following < n and text[following].isspace():
            following += 1
        if following >= n:
            break
        if text[following].islower():
            continue
        marks = match.group().rstrip(_CLOSERS)
        if marks == "." and _ends_abbreviation(text, match.start(), base):
            continue
        if following > starts[-1]:
            starts.append(following)
    return [(start, end) for start, end in zip(starts, starts[1:] + [n])]


def split_sentences(text: str, language: str | None = None) -> list[str]:
    """The sentences of `text` (stripped), by :func:`sentence_spans`."""
    return [text[start:end].strip() for start, end in sentence_spans(text, language)]


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    text: str
    paragraph: int  # index into SquadFile.paragraphs
    sentence: int  # index of the answer sentence in that paragraph's sentences
    answer_text: str
    answer_start: int  # where the answer was located (the file's offset unless match == "relocated")
    match: str  # one of SQUAD_ANSWER_MATCHES


@dataclass(frozen=True)
class SquadFile:
    """One SQuAD-format file: its kept paragraphs (split into sentences) and answerable questions, file order."""

    path: Path
    language: str
    paragraphs: tuple[Paragraph, ...]
    questions: tuple[SquadQuestion, ...]
    dropped_paragraphs: int  # paragraphs dropped because they hold an excluded (XQuAD) question id
    dropped_questions: int  # the questions of those paragraphs
    unanswered: tuple[str, ...]  # ids of questions without an aligned answer (skipped)

    def answer_in_sentence(self) -> float:
        """Fraction of questions whose answer text (case-folded) lies inside their chosen sentence."""
        if not self.questions:
            return float("nan")
        inside = sum(
            q.answer_text.casefold() in self.paragraphs[q.paragraph].sentences[q.sentence].casefold()
            for q in self.questions
        )
        return inside / len(self.questions)

    def summary(self) -> dict[str, Any]:
        matches = Counter(q.match for q in self.questions)
        return {
            "file": str(self.path),
            "language": self.language,
            "paragraphs": len(self.paragraphs),
            "questions": len(self.questions),
            "dropped_paragraphs": self.dropped_paragraphs,
            "dropped_questions": self.dropped_questions,
            "unanswered": len(self.unanswered),
            "matches": {m: matches[m] for m in SQUAD_ANSWER_MATCHES},
            "answer_in_sentence": self.answer_in_sentence(),
        }


def _nearest_occurrence(context: str, text: str, position: int) -> int | None:
    best: int | None = None
    found = context.find(text)
    while found >= 0:
        if best is None or abs(found - position) < abs(best - position):
            best = found
        found = context.find(text, found + 1)
    return best


def _parse_squad(raw: Any, path: Path, language: str, exclude: frozenset[str]) -> SquadFile:
    data = _get(raw, "data", list, path, "data", "a list of articles")
    paragraphs: list[Paragraph] = []
    questions: list[SquadQuestion] = []
    unanswered: list[str] = []
    seen: set[str] = set()
    dropped_paragraphs = dropped_questions = 0
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        for p, para in enumerate(_get(article, "paragraphs", list, path, f"{where_a}.paragraphs", "a list")):
            where = f"{where_a}.paragraphs[{p}]"
            context = _get(para, "context", str, path, f"{where}.context", "a string")
            qas = _get(para, "qas", list, path, f"{where}.qas", "a list of questions")
            parsed: list[tuple[str, str, int | None, str]] = []  # (id, question, answer start, answer text)
            for q, qa in enumerate(qas):
                where_q = f"{where}.qas[{q}]"
                qid = _get(qa, "id", str, path, f"{where_q}.id", "a string")
                text = _get(qa, "question", str, path, f"{where_q}.question", "a string")
                answers = _get(qa, "answers", list, path, f"{where_q}.answers", "a list of answers")
                if qid in seen:
                    raise DataFormatError(f"{path}: field {where_q}.id: question id {qid!r} occurs twice")
                seen.add(qid)
                chosen: tuple[int, str] | None = None
                for i, answer in enumerate(answers):
                    field = f"{where_q}.answers[{i}]"
                    answer_text = _get(answer, "text", str, path, f"{field}.text", "a string")
                    start = _get(answer, "answer_start", int, path, f"{field}.answer_start", "an int")
                    if start >= len(context):
                        raise DataFormatError(
                            f"{path}: question {qid!r}: field {field}.answer_start={start} lies outside every "
                            f"sentence: {where}.context has {len(context)} characters; expected an offset below "
                            f"{len(context)} (or -1 for an answer the translation could not align)"
                        )
                    if chosen is None and start >= 0 and answer_text.strip():
                        chosen = (start, answer_text.strip())
                parsed.append((qid, text, *(chosen if chosen else (None, ""))))
            if any(qid in exclude for qid, *_ in parsed):
                dropped_paragraphs += 1
                dropped_questions += len(parsed)
                continue
            spans = sentence_spans(context, language)
            sentences = tuple(context[s:e].strip() for s, e in spans)
            starts = [s for s, _ in spans]
            paragraph_index = len(paragraphs)
            paragraphs.append(Paragraph(context, sentences))
            for qid, text, start, answer_text in parsed:
                if start is None:
                    unanswered.append(qid)
                    continue
                sentence = bisect.bisect_right(starts, start) - 1
                if context.startswith(answer_text, start):
                    match = "exact"
                elif answer_text.casefold() in sentences[sentence].casefold():
                    match = "in_sentence"
                else:
                    nearest = _nearest_occurrence(context, answer_text, start)
                    if nearest is None:
                        match = "offset_only"
                    else:
                        match, start = "relocated", nearest
                        sentence = bisect.bisect_right(starts, start) - 1
                questions.append(SquadQuestion(qid, text, paragraph_index, sentence, answer_text, start, match))
    return SquadFile(path, language, tuple(paragraphs), tuple(questions), dropped_paragraphs, dropped_questions,
                     tuple(unanswered))


def _read_json(path: Path) -> Any:
    """A JSON file, gzip-compressed or not (told by its first bytes, not its name)."""
    try:
        with path.open("rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
        opener = gzip.open if compressed else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise DataFormatError(f"{path}: not a UTF-8 JSON file, gzip-compressed or plain ({exc})") from None


@lru_cache(maxsize=16)
def _read_squad_cached(path_str: str, language: str, exclude: frozenset[str], mtime_ns: int, size: int) -> SquadFile:
    # mtime and size are part of the key so an edited file is re-read.
    path = Path(path_str)
    return _parse_squad(_read_json(path), path, language, exclude)


def read_squad_file(
    path: str | os.PathLike[str], language: str, exclude_ids: frozenset[str] | set[str] | None = None
) -> SquadFile:
    """Parse one SQuAD v1.1-format file (``.json`` or gzip), dropping every paragraph that holds an id of
    `exclude_ids`, and find each question's answer sentence (cached in-process per path, size and mtime).

    Answers: a question's answers are read in order and the first *aligned* one decides; an answer with
    ``answer_start < 0`` or an empty text is unaligned (SQuAD-es marks answers its translation lost with
    ``{"text": "", "answer_start": -1}``). A question without an aligned answer is skipped (listed in
    ``unanswered``). An ``answer_start`` at or beyond the end of the context lies outside every sentence: a
    :class:`~hybrid_retrieval.data.lareqa.DataFormatError` naming the file, the question id and the field.

    The answer sentence is the one whose span (:func:`sentence_spans`) holds the answer's position, where the
    position is, in order of the rule that applies (``SquadQuestion.match``):

    - ``exact``: ``answer_start``, when the context holds the answer text there;
    - ``in_sentence``: ``answer_start``, when its sentence holds the answer text (case-folded) elsewhere:
      translation shifted the offset within the sentence;
    - ``relocated``: the occurrence of the answer text in the context nearest to ``answer_start``;
    - ``offset_only``: ``answer_start``, when the context does not hold the answer text at all.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"SQuAD file {str(resolved)!r} does not exist")
    stat = resolved.stat()
    return _read_squad_cached(str(resolved), language, frozenset(exclude_ids or ()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _read_question_ids(path_str: str, mtime_ns: int, size: int) -> frozenset[str]:
    path = Path(path_str)
    raw = _read_json(path)
    ids: set[str] = set()
    for a, article in enumerate(_get(raw, "data", list, path, "data", "a list of articles")):
        for p, para in enumerate(_get(article, "paragraphs", list, path, f"data[{a}].paragraphs", "a list")):
            for q, qa in enumerate(_get(para, "qas", list, path, f"data[{a}].paragraphs[{p}].qas", "a list")):
                ids.add(_get(qa, "id", str, path, f"data[{a}].paragraphs[{p}].qas[{q}].id", "a string"))
    return frozenset(ids)


def _question_ids(path: Path) -> frozenset[str]:
    stat = path.resolve().stat()
    return _read_question_ids(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def xquad_question_ids(xquad_root: str | os.PathLike[str] | None = None) -> frozenset[str]:
    """The 1,190 question ids of XQuAD (XQuAD-R has the same ids), to keep SQuAD-derived training data apart.

    Read from ``xquad/xquad.en.json``: with `xquad_root` (that file, or a folder holding ``xquad/xquad.en.json``,
    ``xquad.en.json`` or ``xquad-r/en.json``) only there; else from ``$HYBRID_RETRIEVAL_DATA/xquad/``, else from
    XQuAD-R's ``en.json`` found like the evaluation data (``$HYBRID_RETRIEVAL_DATA/xquad-r``, the cache, a
    checksummed download).
    """
    if xquad_root is not None and str(xquad_root) != "":
        root = Path(xquad_root).expanduser()
        candidates = [root] if root.is_file() else [
            root / "xquad" / XQUAD_IDS_FILE, root / XQUAD_IDS_FILE, root / "xquad-r" / "en.json"]
        for candidate in candidates:
            if candidate.is_file():
                return _question_ids(candidate)
        raise DataNotFoundError(
            f"xquad_root={str(xquad_root)!r}: none of {[str(c) for c in candidates]} exists; point xquad_root at "
            f"the folder holding xquad/{XQUAD_IDS_FILE}, or set drop_xquad=false"
        )
    env = os.environ.get(DATA_ENV, "")
    if env and (Path(env).expanduser() / "xquad" / XQUAD_IDS_FILE).is_file():
        return _question_ids(Path(env).expanduser() / "xquad" / XQUAD_IDS_FILE)
    try:
        folder = resolve_dataset_dir("xquad_r", None, ["en"])
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            f"XQuAD question ids (drop_xquad=true) not found: no xquad/{XQUAD_IDS_FILE} under ${DATA_ENV} and "
            f"XQuAD-R's en.json is unavailable ({exc}). Set xquad_root=<folder holding xquad/{XQUAD_IDS_FILE}> "
            "or drop_xquad=false"
        ) from exc
    return _question_ids(folder / "en.json")


def resolve_squad_files(
    files: Mapping[str, str | os.PathLike[str]], root: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """language -> existing file. A relative path is looked up under `root` when given (only there), else under
    ``$HYBRID_RETRIEVAL_DATA``, then the working directory."""
    if not isinstance(files, Mapping) or not files:
        raise ValueError(
            f"files must be a non-empty mapping language -> SQuAD-format file, e.g. "
            f"{{es: squad-es/dev-v1.1-es_small.json}}; got {files!r}"
        )
    env = os.environ.get(DATA_ENV, "")
    resolved: dict[str, Path] = {}
    for language, value in files.items():
        if not isinstance(language, str) or not language.strip():
            raise ValueError(f"files: language key {language!r} must be a non-empty string such as 'es'")
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ValueError(f"files.{language}={value!r}: expected the path of a SQuAD-format .json or .json.gz")
        path = Path(value).expanduser()
        if path.is_absolute():
            candidates = [path]
        elif root is not None and str(root) != "":
            candidates = [Path(root).expanduser() / path]
        else:
            candidates = ([Path(env).expanduser() / path] if env else []) + [Path.cwd() / path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"files.{language}={str(value)!r}: no such file (looked at {', '.join(str(c) for c in candidates)}); "
                f"give an absolute path, or set root=<folder> or ${DATA_ENV} for relative ones"
            )
        resolved[language] = found
    return resolved


def load_squad(
    files: Mapping[str, str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    drop_xquad: bool = True,
    xquad_root: str | os.PathLike[str] | None = None,
) -> dict[str, SquadFile]:
    """Parsed files, keyed by language in the given order; with `drop_xquad`, paragraphs holding an XQuAD
    question id are dropped (:func:`xquad_question_ids`)."""
    paths = resolve_squad_files(files, root)
    exclude = xquad_question_ids(xquad_root) if drop_xquad else frozenset()
    return {language: read_squad_file(path, language, exclude) for language, path in paths.items()}


@dataclass(frozen=True)
class PairRow:
    """One training row with its group's string id (what :func:`from_jsonl` reads and the translation stage writes)."""

    group: str
    language: str
    query: str
    passage: str
    hard_negative: str | None = None


def squad_rows(
    parsed: Mapping[str, SquadFile],
    passage_text: str = "sentence",
    max_groups: int | None = None,
    hard_negative: str | None = None,
) -> list[PairRow]:
    """One row per (answerable question, language), language by language in the mapping's order, questions in
    file order; group = the question id. Options as in :func:`from_squad`."""
    kept: set[str] | None = None
    if max_groups is not None:
        # Same stable order as from_lareqa; a kept id keeps its rows in every language.
        all_ids = set().union(*({q.id for q in f.questions} for f in parsed.values()))
        kept = set(sha1_order(all_ids)[:max_groups])
    rows: list[PairRow] = []
    for language, squad in parsed.items():
        for q in squad.questions:
            if kept is not None and q.id not in kept:
                continue
            para = squad.paragraphs[q.paragraph]
            negative = None
            if hard_negative == "same_paragraph":
                other = q.sentence + 1 if q.sentence + 1 < len(para.sentences) else q.sentence - 1
                if other >= 0:
                    negative = format_passage(para.sentences[other], para.context, passage_text)
            rows.append(PairRow(q.id, language, q.text,
                                format_passage(para.sentences[q.sentence], para.context, passage_text), negative))
    return rows


def _check_squad_options(passage_text: str, max_groups: int | None, hard_negative: str | None) -> None:
    if passage_text not in PASSAGE_TEXTS:
        raise ValueError(f"passage_text must be one of {list(PASSAGE_TEXTS)}, got {passage_text!r}")
    if hard_negative not in SQUAD_HARD_NEGATIVES:
        raise ValueError(f"hard_negative must be one of {list(SQUAD_HARD_NEGATIVES)}, got {hard_negative!r}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise ValueError(f"max_groups must be null or a positive int, got {max_groups!r}")


def from_squad(
    files: Mapping[str, str | os.PathLike[str]],
    name: str = "squad",
    passage_text: str = "sentence",
    drop_xquad: bool = True,
    xquad_root: str | os.PathLike[str] | None = None,
    max_groups: int | None = None,
    hard_negative: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ParallelPairs:
    """Training rows from SQuAD-format files, one per language: one row per (question, language), grouped by
    question id across the files (rows sharing an id are translations of each other).

    - files: language -> path (``.json`` or ``.json.gz``); relative paths are looked up under `root`, else
      ``$HYBRID_RETRIEVAL_DATA``, then the working directory (:func:`resolve_squad_files`).
    - passage_text: "sentence" (the sentence holding the answer) or "sentence_paragraph" (sentence + " " +
      paragraph), formatted by :func:`~hybrid_retrieval.data.lareqa.format_passage` as everywhere else.
    - drop_xquad: drop every paragraph that holds an XQuAD question id (SQuAD v1.1 dev is XQuAD's source, so
      training on those paragraphs would leak XQuAD-R's evaluation data); ids from :func:`xquad_question_ids`
      (`xquad_root`).
    - max_groups, hard_negative: as in :func:`from_lareqa` (``same_paragraph``: the sentence after the answer
      sentence, else the one before).

    How the answer sentence is found, and which questions are skipped: :func:`read_squad_file`.
    """
    _check_squad_options(passage_text, max_groups, hard_negative)
    parsed = load_squad(files, root, drop_xquad, xquad_root)
    for squad in parsed.values():
        log.info("%s: %s", name, squad.summary())
    rows = squad_rows(parsed, passage_text, max_groups, hard_negative)
    if not rows:
        raise ValueError(f"from_squad {name!r}: no answerable questions in {[str(f.path) for f in parsed.values()]}")
    groups, _ = _index([row.group for row in rows])
    language_names = list(parsed)
    lookup = {language: i for i, language in enumerate(language_names)}
    return ParallelPairs(
        name=name,
        groups=groups,
        languages=np.array([lookup[row.language] for row in rows], dtype=np.int64),
        language_names=language_names,
        queries=[row.query for row in rows],
        passages=[row.passage for row in rows],
        hard_negatives=[row.hard_negative for row in rows] if hard_negative is not None else None,
    )
