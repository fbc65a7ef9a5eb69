"""XQuAD-R and MLQA-R (LAReQA) as retrieval splits: queries, a multilingual candidate pool and relevance.

Each ``<lang>.json`` is SQuAD v1.1 plus, per paragraph, ``sentences`` and ``sentence_breaks`` (character
spans into ``context``). A candidate is one sentence of one paragraph in one language; the pool is every
sentence of every selected language (XQuAD-R: 13,014; MLQA-R: 20,534).

Relevance (the LAReQA rule): question id ``g`` in language X is relevant to, in every selected language Y
where ``g`` exists, the sentence of g's paragraph (in Y's file) whose span holds ``answers[0].answer_start``.
Spans are half-open, ``start <= answer_start < end``, because ``sentences[i] == context[start:end]``: in
Chinese, sentences abut (one ends where the next starts) and an answer that begins a sentence would
otherwise also match the previous one. Every question in both datasets matches exactly one span this way.

Capping (``max_questions_per_language``) keeps the split parallel: question ids are visited in a stable
pseudo-random order (by sha1 of the id) and an id is kept only if every selected language it appears in is
still under the cap, so a kept id is kept in all of its languages. With a cap, a language's candidate pool is
the sentences of the paragraphs that hold at least one kept question in that language (so the pool shrinks
with the queries and every relevant sentence is in it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.sources import check_languages, get_source, resolve_dataset_dir

__all__ = [
    "PASSAGE_TEXTS",
    "Candidate",
    "DataFormatError",
    "LanguageFile",
    "LareqaSplit",
    "Paragraph",
    "Query",
    "Question",
    "cap_groups",
    "format_passage",
    "holdout_groups",
    "load_language_files",
    "load_split",
    "read_language_file",
    "sha1_order",
]

PASSAGE_TEXTS = ("sentence", "sentence_paragraph")


def format_passage(sentence: str, paragraph: str, passage_text: str) -> str:
    """The text a passage is encoded as, in training and evaluation alike: the sentence alone
    (``passage_text="sentence"``) or the sentence followed by its paragraph (``"sentence_paragraph"``)."""
    if passage_text == "sentence":
        return sentence
    if passage_text == "sentence_paragraph":
        return f"{sentence} {paragraph}"
    raise BadValue(f"passage_text={passage_text!r}: expected one of {list(PASSAGE_TEXTS)}")


class DataFormatError(ValueError):
    """A data file does not have the expected structure; the message names the file and the field."""


@dataclass(frozen=True)
class Query:
    id: str  # unique per (question, language): f"{group}/{language}"
    group: str  # parallel-group id: the SQuAD/MLQA question id shared across languages
    language: str
    text: str


@dataclass(frozen=True)
class Candidate:
    id: str  # f"{language}/{paragraph_index}/{sentence_index}", paragraph_index running over the file
    language: str
    sentence: str
    paragraph: str  # the paragraph's full context


@dataclass
class LareqaSplit:
    """One evaluation split: queries of the selected languages against the pooled candidates of them all."""

    name: str  # "xquad_r" | "mlqa_r"
    languages: list[str]  # in the order requested (or sorted)
    queries: list[Query]
    candidates: list[Candidate]
    relevant: list[np.ndarray]  # relevant[i]: sorted int64 indices into candidates, all languages

    def candidate_texts(self, passage_text: str = "sentence") -> list[str]:
        """Candidate strings to encode, formatted by :func:`format_passage`."""
        format_passage("", "", passage_text)  # a bad option fails even on an empty split
        return [format_passage(c.sentence, c.paragraph, passage_text) for c in self.candidates]

    def query_texts(self) -> list[str]:
        return [q.text for q in self.queries]

    def query_language_ids(self) -> np.ndarray:
        """Index into ``self.languages`` of each query's language (int64)."""
        index = {language: i for i, language in enumerate(self.languages)}
        return np.fromiter((index[q.language] for q in self.queries), dtype=np.int64, count=len(self.queries))

    def candidate_language_ids(self) -> np.ndarray:
        """Index into ``self.languages`` of each candidate's language (int64)."""
        index = {language: i for i, language in enumerate(self.languages)}
        return np.fromiter((index[c.language] for c in self.candidates), dtype=np.int64, count=len(self.candidates))


# ----------------------------------------------------------------------------------------------------------
# One language file, parsed and validated


@dataclass(frozen=True)
class Paragraph:
    context: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    paragraph: int  # running paragraph index in the file
    sentence: int  # index of the gold sentence within that paragraph
    answer_text: str
    answer_start: int


@dataclass(frozen=True)
class LanguageFile:
    """One ``<lang>.json``: its paragraphs (file order) and questions (file order), gold sentences resolved."""

    path: Path
    language: str
    paragraphs: tuple[Paragraph, ...]
    questions: tuple[Question, ...]


def _fail(path: Path, field: str, expected: str, value: Any) -> DataFormatError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return DataFormatError(f"{path}: field {field}: expected {expected}, got {shown}")


def get_field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, field: str, expected: str) -> Any:
    if not isinstance(obj, dict):
        parent = field.rsplit(".", 1)[0] if "." in field else "(top level)"
        raise _fail(path, parent, "an object", obj)
    if key not in obj:
        raise DataFormatError(f"{path}: field {field} is missing (expected {expected})")
    value = obj[key]
    # bool is an int subclass; a true/false offset is a data error, not an offset.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(path, field, expected, value)
    return value


def _parse(raw: Any, path: Path, language: str) -> LanguageFile:
    data = get_field(raw, "data", list, path, "data", "a list of articles")
    paragraphs: list[Paragraph] = []
    questions: list[Question] = []
    seen: set[str] = set()
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        for p, para in enumerate(get_field(article, "paragraphs", list, path, f"{where_a}.paragraphs", "a list")):
            where = f"{where_a}.paragraphs[{p}]"
            context = get_field(para, "context", str, path, f"{where}.context", "a string")
            sentences = get_field(para, "sentences", list, path, f"{where}.sentences", "a list of strings")
            breaks = get_field(para, "sentence_breaks", list, path, f"{where}.sentence_breaks", "a list of [start, end]")
            if len(breaks) != len(sentences):
                raise DataFormatError(
                    f"{path}: field {where}.sentence_breaks has {len(breaks)} spans but {where}.sentences has "
                    f"{len(sentences)} sentences; expected one span per sentence"
                )
            for s, sentence in enumerate(sentences):
                if not isinstance(sentence, str):
                    raise _fail(path, f"{where}.sentences[{s}]", "a string", sentence)
            spans: list[tuple[int, int]] = []
            for s, span in enumerate(breaks):
                if (
                    not isinstance(span, list)
                    or len(span) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                ):
                    raise _fail(path, f"{where}.sentence_breaks[{s}]", "[start, end] integers", span)
                spans.append((span[0], span[1]))
            paragraph_index = len(paragraphs)
            for q, qa in enumerate(get_field(para, "qas", list, path, f"{where}.qas", "a list of questions")):
                where_q = f"{where}.qas[{q}]"
                qid = get_field(qa, "id", str, path, f"{where_q}.id", "a string")
                text = get_field(qa, "question", str, path, f"{where_q}.question", "a string")
                answers = get_field(qa, "answers", list, path, f"{where_q}.answers", "a non-empty list")
                if not answers:
                    raise _fail(path, f"{where_q}.answers", "a non-empty list", answers)
                answer_text = get_field(answers[0], "text", str, path, f"{where_q}.answers[0].text", "a string")
                start = get_field(answers[0], "answer_start", int, path, f"{where_q}.answers[0].answer_start", "an int")
                if qid in seen:
                    raise DataFormatError(f"{path}: field {where_q}.id: question id {qid!r} occurs twice")
                seen.add(qid)
                hits = [s for s, (lo, hi) in enumerate(spans) if lo <= start < hi]
                if len(hits) != 1:
                    raise DataFormatError(
                        f"{path}: field {where_q}.answers[0].answer_start={start} (question {qid!r}) lies in "
                        f"{len(hits)} sentence spans of {where}.sentence_breaks; expected exactly one"
                    )
                questions.append(Question(qid, text, paragraph_index, hits[0], answer_text, start))
            paragraphs.append(Paragraph(context, tuple(sentences)))
    return LanguageFile(path, language, tuple(paragraphs), tuple(questions))


@lru_cache(maxsize=64)
def _read_cached(path_str: str, language: str, mtime_ns: int, size: int) -> LanguageFile:
    # mtime and size are part of the key so an edited file is re-read.
    path = Path(path_str)
    try:
        with path.open("r", encoding="utf-8") as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    return _parse(raw, path, language)


def read_language_file(path: str | os.PathLike[str], language: str) -> LanguageFile:
    """Parse and validate one LAReQA ``<lang>.json`` (cached in-process per path, size and mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _read_cached(str(resolved), language, stat.st_mtime_ns, stat.st_size)


# ----------------------------------------------------------------------------------------------------------
# Splits


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def sha1_order(ids: Iterable[str]) -> list[str]:
    """`ids` sorted by the sha1 of each: a pseudo-random order that is the same on every run and machine."""
    return sorted(ids, key=_sha1)


def cap_groups(ids_by_language: dict[str, set[str]], cap: int) -> set[str]:
    """Question ids to keep so that no language has more than `cap` and kept ids stay parallel.

    Ids are visited in sha1 order (stable across runs and machines); an id is kept only if every language
    it appears in is still under the cap, so it is kept in all of them.
    """
    counts = dict.fromkeys(ids_by_language, 0)
    kept: set[str] = set()
    for group in sha1_order(set().union(*ids_by_language.values())):
        languages = [lang for lang, ids in ids_by_language.items() if group in ids]
        if all(counts[lang] < cap for lang in languages):
            kept.add(group)
            for lang in languages:
                counts[lang] += 1
        if all(count >= cap for count in counts.values()):
            break
    return kept


def _check_cap(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise BadValue(f"max_questions_per_language must be null or a positive int, got {value!r}")
    return int(value)


def load_language_files(
    name: str, root: str | os.PathLike[str] | None = None, languages: Sequence[str] | str | None = None
) -> dict[str, LanguageFile]:
    """Parsed files of dataset `name` for `languages` (all when None), keyed in the requested order."""
    source = get_source(name)
    chosen = check_languages(name, languages)
    folder = resolve_dataset_dir(name, root, chosen)
    return {lang: read_language_file(folder / source.filename(lang), lang) for lang in chosen}


HOLDOUT_KEYS = ("dataset", "groups", "seed")


def check_holdout(holdout: Any, option: str = "train_data.holdout") -> dict[str, Any] | None:
    """A holdout spec as a plain dict (None when off); a clear error naming ``option`` when malformed."""
    if holdout is None:
        return None
    if not hasattr(holdout, "get") or set(holdout) - set(HOLDOUT_KEYS):
        raise BadValue(f"{option} must be null or a mapping with keys {list(HOLDOUT_KEYS)} "
                         f"(e.g. {{dataset: mlqa_r, groups: 400, seed: 0}}), got {holdout!r}")
    spec = {"dataset": holdout.get("dataset", "mlqa_r"), "groups": holdout.get("groups"),
            "seed": holdout.get("seed", 0)}
    if spec["dataset"] not in ("mlqa_r", "xquad_r"):
        raise BadValue(f"{option}.dataset must be mlqa_r or xquad_r, got {spec['dataset']!r}")
    groups = spec["groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise BadValue(f"{option}.groups must be a positive int (question groups held out), got {groups!r}")
    if isinstance(spec["seed"], bool) or not isinstance(spec["seed"], int):
        raise BadValue(f"{option}.seed must be an int, got {spec['seed']!r}")
    return spec


def holdout_groups(holdout: Any, root: str | os.PathLike[str] | None = None) -> frozenset[str]:
    """The question ids a holdout spec (``{dataset, groups, seed}``) holds out of training, for selection.

    ``groups`` ids are drawn in a seeded stable order (sha1 of ``"<seed>:<id>"``) over every language of the
    dataset, so training and the selection split agree whatever languages either uses. The set is then closed
    over paragraphs: an id whose paragraph (in any language) also holds a held-out question is held out too, so
    no held-out sentence, nor its translation, is ever a training passage. All languages of a group go together:
    a held-out question's translation is never trained on.
    """
    spec = check_holdout(holdout)
    if spec is None:
        return frozenset()
    return _holdout_groups(spec["dataset"], None if root is None else str(root), spec["groups"], spec["seed"])


@lru_cache(maxsize=8)
def _holdout_groups(name: str, root: str | None, size: int, seed: int) -> frozenset[str]:
    files = load_language_files(name, root, None)
    all_ids = set().union(*({q.id for q in f.questions} for f in files.values()))
    if size >= len(all_ids):
        raise BadValue(f"holdout.groups={size} would hold out every one of {name}'s {len(all_ids)} question ids")
    chosen = set(sorted(all_ids, key=lambda group: _sha1(f"{seed}:{group}"))[:size])
    by_paragraph: dict[tuple[str, int], set[str]] = {}
    for lang, parsed in files.items():
        for q in parsed.questions:
            by_paragraph.setdefault((lang, q.paragraph), set()).add(q.id)
    while True:  # closure: a paragraph holding a held-out question is held out whole, in every language
        grown = set(chosen)
        for ids in by_paragraph.values():
            if ids & chosen:
                grown |= ids
        if grown == chosen:
            return frozenset(chosen)
        chosen = grown


def load_split(
    name: str,
    root: str | os.PathLike[str] | None = None,
    languages: Sequence[str] | str | None = None,
    max_questions_per_language: int | None = None,
    holdout: Any = None,
) -> LareqaSplit:
    """Load XQuAD-R ("xquad_r") or MLQA-R ("mlqa_r") as a :class:`LareqaSplit`.

    `root`: see :func:`hybrid_retrieval.data.sources.resolve_dataset_dir`. `languages`: subset, kept in the
    given order (None: all, sorted); queries and candidates are then only those languages, and relevance is
    restricted to them. `max_questions_per_language`: parallel cap (module docstring). `holdout`: a spec of
    :func:`holdout_groups`; the split is then only the held-out question groups (the selection split), with the
    pool shrunk to their paragraphs as under a cap.
    """
    cap = _check_cap(max_questions_per_language)
    spec = check_holdout(holdout, "dataset.holdout")
    if spec is not None and spec["dataset"] != name:
        raise BadValue(f"dataset.holdout.dataset={spec['dataset']!r} but the dataset is {name!r}")
    files = load_language_files(name, root, languages)
    chosen = list(files)

    kept: set[str] | None = None
    if spec is not None:
        kept = set(holdout_groups(spec, root))
    if cap is not None:
        ids_by_language = {lang: {q.id for q in f.questions if kept is None or q.id in kept} for lang, f in files.items()}
        kept = cap_groups(ids_by_language, cap)

    candidates: list[Candidate] = []
    gold: dict[tuple[str, str], int] = {}  # (group, language) -> candidate index of its relevant sentence
    queries: list[Query] = []
    for lang, parsed in files.items():
        questions = [q for q in parsed.questions if kept is None or q.id in kept]
        if kept is None:
            paragraph_ids = range(len(parsed.paragraphs))
        else:
            paragraph_ids = sorted({q.paragraph for q in questions})
        first_sentence: dict[int, int] = {}
        for p in paragraph_ids:
            para = parsed.paragraphs[p]
            first_sentence[p] = len(candidates)
            candidates.extend(
                Candidate(f"{lang}/{p}/{s}", lang, sentence, para.context) for s, sentence in enumerate(para.sentences)
            )
        for q in questions:
            gold[(q.id, lang)] = first_sentence[q.paragraph] + q.sentence
            queries.append(Query(f"{q.id}/{lang}", q.id, lang, q.text))

    # Parallel queries share one relevance array; it is read-only so that sharing is safe.
    by_group: dict[str, list[int]] = {}
    for (group, _lang), index in gold.items():
        by_group.setdefault(group, []).append(index)
    arrays: dict[str, np.ndarray] = {}
    for group, indices in by_group.items():
        array = np.array(sorted(indices), dtype=np.int64)
        array.setflags(write=False)
        arrays[group] = array
    relevant = [arrays[q.group] for q in queries]
    return LareqaSplit(name=name, languages=chosen, queries=queries, candidates=candidates, relevant=relevant)
