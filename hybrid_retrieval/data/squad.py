"""SQuAD v1.1-format files (SQuAD and its machine translations SQuAD-es, SQuAD-it, ...), one per language, as
training pairs (:func:`from_squad`): rows sharing a question id across the files are one group. The passage is
the sentence holding the answer, found by :func:`~hybrid_retrieval.data.sentences.sentence_spans` (rules in
:func:`read_squad_file`).
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.config_error import BadValue, MissingPath
from hybrid_retrieval.data.lareqa import DataFormatError, Paragraph, get_field, sha1_order
from hybrid_retrieval.data.overlap import similarity_matrices
from hybrid_retrieval.data.pairs import PairRow, ParallelPairs, StoreSpec, check_reader_options, question_rows
from hybrid_retrieval.data.sentences import sentence_spans
from hybrid_retrieval.data.sources import DATA_ENV, DataNotFoundError, resolve_dataset_dir

log = logging.getLogger(__name__)

__all__ = ["SQUAD_ANSWER_MATCHES", "SQUAD_HARD_NEGATIVES", "SquadFile", "SquadQuestion", "from_squad", "load_squad",
           "read_squad_file", "resolve_squad_files", "squad_rows", "xquad_question_ids"]

SQUAD_HARD_NEGATIVES = (None, "same_paragraph")
# How a question's answer sentence was found; see read_squad_file.
SQUAD_ANSWER_MATCHES = ("exact", "in_sentence", "relocated", "offset_only")
XQUAD_IDS_FILE = "xquad.en.json"


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
    dropped_paragraphs: int  # paragraphs dropped: they hold an excluded (XQuAD) question id or match its text
    dropped_questions: int  # the questions of those paragraphs
    unanswered: tuple[str, ...]  # ids of questions without an aligned answer (skipped)
    dropped_by_text: int = 0  # of dropped_paragraphs, those no excluded id would have caught

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
            "dropped_by_text": self.dropped_by_text,
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


# A paragraph is XQuAD's when the sum over XQuAD's languages of its character n-gram cosine to one XQuAD paragraph
# (data/overlap.similarity_matrices) reaches TEXT_MATCH_SCORE and is TEXT_MATCH_MARGIN times its next best XQuAD
# paragraph's. Measured on the paragraphs whose SQuAD ids tell: it finds 207 of SQuAD-it's 212 and all 230 of
# SQuAD-es's XQuAD paragraphs (scripts/xquad_text_match.py, docs/data.md#squad-and-xquad).
TEXT_MATCH_SCORE = 0.6
TEXT_MATCH_MARGIN = 1.3


def xquad_text_matches(contexts: list[str], xquad_paragraphs: tuple[tuple[str, ...], ...]) -> np.ndarray:
    """Which of `contexts` match an XQuAD paragraph by text (rule above); `xquad_paragraphs` holds each XQuAD
    language's paragraphs, aligned across languages."""
    if not contexts or not xquad_paragraphs:
        return np.zeros(len(contexts), dtype=bool)
    score = sum(similarity_matrices(contexts, xquad_paragraphs))
    top = np.sort(score, axis=1)[:, ::-1]
    second = top[:, 1] if top.shape[1] > 1 else np.zeros(len(top))
    return (top[:, 0] >= TEXT_MATCH_SCORE) & (top[:, 0] >= TEXT_MATCH_MARGIN * second)


def _parse_squad(raw: Any, path: Path, language: str, exclude: frozenset[str],
                 exclude_texts: tuple[tuple[str, ...], ...] = ()) -> SquadFile:
    data = get_field(raw, "data", list, path, "data", "a list of articles")
    by_text: set[tuple[int, int]] = set()
    if exclude_texts:
        where = [(a, p) for a, article in enumerate(data) if isinstance(article, dict)
                 for p, para in enumerate(article.get("paragraphs") or []) if isinstance(para, dict)
                 and isinstance(para.get("context"), str)]
        contexts = [data[a]["paragraphs"][p]["context"] for a, p in where]
        by_text = {where[i] for i in np.flatnonzero(xquad_text_matches(contexts, exclude_texts))}
    dropped_by_text = 0
    paragraphs: list[Paragraph] = []
    questions: list[SquadQuestion] = []
    unanswered: list[str] = []
    seen: set[str] = set()
    dropped_paragraphs = dropped_questions = 0
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        for p, para in enumerate(get_field(article, "paragraphs", list, path, f"{where_a}.paragraphs", "a list")):
            where = f"{where_a}.paragraphs[{p}]"
            context = get_field(para, "context", str, path, f"{where}.context", "a string")
            qas = get_field(para, "qas", list, path, f"{where}.qas", "a list of questions")
            parsed: list[tuple[str, str, int | None, str]] = []  # (id, question, answer start, answer text)
            for q, qa in enumerate(qas):
                where_q = f"{where}.qas[{q}]"
                qid = get_field(qa, "id", str, path, f"{where_q}.id", "a string")
                text = get_field(qa, "question", str, path, f"{where_q}.question", "a string")
                answers = get_field(qa, "answers", list, path, f"{where_q}.answers", "a list of answers")
                if qid in seen:
                    raise DataFormatError(f"{path}: field {where_q}.id: question id {qid!r} occurs twice")
                seen.add(qid)
                chosen: tuple[int, str] | None = None
                for i, answer in enumerate(answers):
                    field = f"{where_q}.answers[{i}]"
                    answer_text = get_field(answer, "text", str, path, f"{field}.text", "a string")
                    start = get_field(answer, "answer_start", int, path, f"{field}.answer_start", "an int")
                    if start >= len(context):
                        raise DataFormatError(
                            f"{path}: question {qid!r}: field {field}.answer_start={start} lies outside every "
                            f"sentence: {where}.context has {len(context)} characters; expected an offset below "
                            f"{len(context)} (or -1 for an answer the translation could not align)"
                        )
                    if chosen is None and start >= 0 and answer_text.strip():
                        chosen = (start, answer_text.strip())
                parsed.append((qid, text, *(chosen if chosen else (None, ""))))
            id_match = any(qid in exclude for qid, *_ in parsed)
            if id_match or (a, p) in by_text:
                dropped_paragraphs += 1
                dropped_by_text += not id_match
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
                     tuple(unanswered), dropped_by_text)


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
def _read_squad_cached(path_str: str, language: str, exclude: frozenset[str], exclude_texts: tuple[tuple[str, ...], ...],
                       mtime_ns: int, size: int) -> SquadFile:
    # mtime and size are part of the key so an edited file is re-read.
    path = Path(path_str)
    return _parse_squad(_read_json(path), path, language, exclude, exclude_texts)


def read_squad_file(
    path: str | os.PathLike[str], language: str, exclude_ids: frozenset[str] | set[str] | None = None,
    exclude_texts: tuple[tuple[str, ...], ...] = (),
) -> SquadFile:
    """Parse one SQuAD v1.1-format file (``.json`` or gzip), dropping every paragraph that holds an id of
    `exclude_ids` or whose text matches a paragraph of `exclude_texts` (per language, aligned; rule of
    :func:`xquad_text_matches`), and find each question's answer sentence (cached in-process per path, size, mtime).

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
        raise MissingPath(f"SQuAD file {str(resolved)!r} does not exist")
    stat = resolved.stat()
    return _read_squad_cached(str(resolved), language, frozenset(exclude_ids or ()), tuple(exclude_texts),
                              stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class XQuadReference:
    """What SQuAD-derived training data must not hold: XQuAD's question ids and its paragraphs in each language."""

    ids: frozenset[str]
    paragraphs: tuple[tuple[str, ...], ...]  # per language, aligned by position across languages
    source: Path

    def digest(self) -> str:
        """Enters the training data's cache key: other reference data, other rows."""
        text = " ".join(sorted(self.ids)) + "\n" + "\n".join("\t".join(p) for p in self.paragraphs)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _read_paragraphs(path_str: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(question ids of each paragraph joined, contexts) of one SQuAD-format file, file order."""
    path = Path(path_str)
    raw = _read_json(path)
    keys, contexts = [], []
    for a, article in enumerate(get_field(raw, "data", list, path, "data", "a list of articles")):
        for p, para in enumerate(get_field(article, "paragraphs", list, path, f"data[{a}].paragraphs", "a list")):
            where = f"data[{a}].paragraphs[{p}]"
            contexts.append(get_field(para, "context", str, path, f"{where}.context", "a string"))
            qas = get_field(para, "qas", list, path, f"{where}.qas", "a list")
            keys.append(tuple(get_field(qa, "id", str, path, f"{where}.qas[{q}].id", "a string")
                              for q, qa in enumerate(qas)))
    return tuple(keys), tuple(contexts)


def _paragraphs(path: Path) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    stat = path.resolve().stat()
    return _read_paragraphs(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _xquad_file(xquad_root: str | os.PathLike[str] | None) -> Path:
    """XQuAD's English file (or XQuAD-R's en.json): where :func:`xquad_reference` starts."""
    if xquad_root is not None and str(xquad_root) != "":
        root = Path(xquad_root).expanduser()
        candidates = [root] if root.is_file() else [
            root / "xquad" / XQUAD_IDS_FILE, root / XQUAD_IDS_FILE, root / "xquad-r" / "en.json"]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataNotFoundError(
            f"xquad_root={str(xquad_root)!r}: none of {[str(c) for c in candidates]} exists; point xquad_root at "
            f"the folder holding xquad/{XQUAD_IDS_FILE}, or set drop_xquad=false"
        )
    env = os.environ.get(DATA_ENV, "")
    if env and (Path(env).expanduser() / "xquad" / XQUAD_IDS_FILE).is_file():
        return Path(env).expanduser() / "xquad" / XQUAD_IDS_FILE
    try:
        folder = resolve_dataset_dir("xquad_r", None, ["en"])
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            f"XQuAD question ids (drop_xquad=true) not found: no xquad/{XQUAD_IDS_FILE} under ${DATA_ENV} and "
            f"XQuAD-R's en.json is unavailable ({exc}). Set xquad_root=<folder holding xquad/{XQUAD_IDS_FILE}> "
            "or drop_xquad=false"
        ) from exc
    return folder / "en.json"


def xquad_reference(xquad_root: str | os.PathLike[str] | None = None) -> XQuadReference:
    """XQuAD's 1,190 question ids (XQuAD-R has the same) and its 240 paragraphs in every language found beside the
    English file (``xquad.<lang>.json`` beside ``xquad.en.json``; ``<lang>.json`` beside XQuAD-R's ``en.json``),
    aligned to the English file's paragraphs by their question ids.

    Found as :func:`xquad_question_ids` says. Other languages' files that do not hold exactly the English file's
    paragraphs (by question ids) are skipped with a warning.
    """
    english = _xquad_file(xquad_root)
    keys, contexts = _paragraphs(english)
    pattern = "xquad.*.json" if english.name == XQUAD_IDS_FILE else "*.json"
    paragraphs = [contexts]
    for other in sorted(english.parent.glob(pattern)):
        if other.resolve() == english.resolve():
            continue
        other_keys, other_contexts = _paragraphs(other)
        position = {frozenset(k): i for i, k in enumerate(other_keys)}
        order = [position.get(frozenset(k)) for k in keys]
        if None in order:
            log.warning("%s: its paragraphs are not %s's (by question ids); not used to drop XQuAD paragraphs",
                        other, english)
            continue
        paragraphs.append(tuple(other_contexts[i] for i in order))
    return XQuadReference(frozenset(q for k in keys for q in k), tuple(paragraphs), english)


def xquad_question_ids(xquad_root: str | os.PathLike[str] | None = None) -> frozenset[str]:
    """The 1,190 question ids of XQuAD (XQuAD-R has the same ids), to keep SQuAD-derived training data apart.

    Read from ``xquad/xquad.en.json``: with `xquad_root` (that file, or a folder holding ``xquad/xquad.en.json``,
    ``xquad.en.json`` or ``xquad-r/en.json``) only there; else from ``$HYBRID_RETRIEVAL_DATA/xquad/``, else from
    XQuAD-R's ``en.json`` found like the evaluation data (``$HYBRID_RETRIEVAL_DATA/xquad-r``, the cache, a
    checksummed download).
    """
    return frozenset(q for k in _paragraphs(_xquad_file(xquad_root))[0] for q in k)


def resolve_squad_files(
    files: Mapping[str, str | os.PathLike[str]], root: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """language -> existing file. A relative path is looked up under `root` when given (only there), else under
    ``$HYBRID_RETRIEVAL_DATA``, then the working directory."""
    if not isinstance(files, Mapping) or not files:
        raise BadValue(
            f"files must be a non-empty mapping language -> SQuAD-format file, e.g. "
            f"{{es: squad-es/dev-v1.1-es_small.json}}; got {files!r}"
        )
    env = os.environ.get(DATA_ENV, "")
    resolved: dict[str, Path] = {}
    for language, value in files.items():
        if not isinstance(language, str) or not language.strip():
            raise BadValue(f"files: language key {language!r} must be a non-empty string such as 'es'")
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise BadValue(f"files.{language}={value!r}: expected the path of a SQuAD-format .json or .json.gz")
        path = Path(value).expanduser()
        if path.is_absolute():
            candidates = [path]
        elif root is not None and str(root) != "":
            candidates = [Path(root).expanduser() / path]
        else:
            candidates = ([Path(env).expanduser() / path] if env else []) + [Path.cwd() / path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise MissingPath(
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
    """Parsed files, keyed by language in the given order; with `drop_xquad`, XQuAD's paragraphs are dropped, by
    their question ids and by their text (:func:`xquad_reference`, :func:`xquad_text_matches`)."""
    reference = xquad_reference(xquad_root) if drop_xquad else None
    return _read_files(resolve_squad_files(files, root), reference)


def _read_files(paths: Mapping[str, Path], reference: XQuadReference | None) -> dict[str, SquadFile]:
    return {language: read_squad_file(path, language, reference.ids if reference else None,
                                      reference.paragraphs if reference else ())
            for language, path in paths.items()}


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
    return question_rows(parsed, passage_text, hard_negative, kept)


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
    - drop_xquad: drop every XQuAD paragraph (SQuAD v1.1 dev is XQuAD's source, so training on those paragraphs
      would leak XQuAD-R's evaluation data): those holding an XQuAD question id, and those whose text matches an
      XQuAD paragraph in any of its languages (translations carry made-up ids: SQuAD-it has 165 such paragraphs);
      reference from :func:`xquad_reference` (`xquad_root`).
    - max_groups, hard_negative: as in :func:`from_lareqa` (``same_paragraph``: the sentence after the answer
      sentence, else the one before).

    How the answer sentence is found, and which questions are skipped: :func:`read_squad_file`.
    """
    check_reader_options(passage_text, max_groups, hard_negative, SQUAD_HARD_NEGATIVES)
    paths = {language: path.expanduser().resolve() for language, path in resolve_squad_files(files, root).items()}
    reference = xquad_reference(xquad_root) if drop_xquad else None

    def rows() -> list[PairRow]:  # parsed only when the cache does not hold these rows yet
        parsed = _read_files(paths, reference)
        for squad in parsed.values():
            log.info("%s: %s", name, squad.summary())
        made = squad_rows(parsed, passage_text, max_groups, hard_negative)
        if not made:
            raise BadValue(f"from_squad {name!r}: no answerable questions in {[str(p) for p in paths.values()]}")
        return made

    # The XQuAD data that drop_xquad removes is part of what the rows are: it enters the cache key as a digest.
    store = StoreSpec("squad", {"name": name, "languages": list(paths), "passage_text": passage_text,
                                "drop_xquad": reference.digest() if reference else None, "max_groups": max_groups,
                                "hard_negative": hard_negative}, [str(p) for p in paths.values()], name)
    return ParallelPairs.from_rows(name, rows, list(paths), hard_negatives=hard_negative is not None, store=store)
