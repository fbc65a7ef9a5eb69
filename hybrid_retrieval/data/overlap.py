"""Text overlap between training data and evaluation data: one normalisation, exact matches at any scale, and
near-duplicates (translations of one text into close languages, another machine translation of it).

- :func:`normalise`: Unicode compatibility decomposition (NFKD: full-width letters become ASCII, accented letters
  a letter and its mark, so composed and decomposed input agree), lower case, every run of punctuation, symbols and white space made one space,
  trimmed. Two texts that differ only in case, spacing, quotes or punctuation normalise to the same string. It
  runs in Arrow's compute kernels, so a column of 100M training texts is normalised without Python strings.
- :func:`similarity_matrices`: character n-gram TF-IDF vectors (n = 3-5 inside word boundaries, sublinear counts,
  L2-normalised) and their cosine, the classic near-duplicate measure; it finds a text's translation into a
  related language (Italian against Spanish or Romanian) well above unrelated texts of the same article.
- :func:`check_contamination`: at the start of training, every evaluation set's queries and passages against the
  training queries, passages and hard negatives (normalised, exact); ``train.contamination`` says what an overlap
  does (refuse, the default, when evaluation passages are trained on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hybrid_retrieval.config_error import BadValue

__all__ = ["CONTAMINATION_POLICIES", "ContaminationError", "OverlapReport", "check_contamination", "find_overlap",
           "normalise", "similarity_matrices"]

log = logging.getLogger(__name__)
CONTAMINATION_POLICIES = ("refuse", "warn", "off")

_SEPARATORS = r"[\p{P}\p{S}\s]+"


def normalise(texts: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array | pa.ChunkedArray:
    """The normalised form of each text (module docstring), as an Arrow string array."""
    array = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), type=pa.string())
    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    array = pc.utf8_normalize(array, "NFKD")
    array = pc.utf8_lower(array)
    array = pc.replace_substring_regex(array, _SEPARATORS, " ")
    return pc.utf8_trim_whitespace(array)


def similarity_matrices(left: Sequence[str], rights: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Cosine of character n-gram TF-IDF vectors (module docstring) of `left` against each list of `rights`
    (``len(left) x len(right)`` each), with one vocabulary and IDF over all the texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not left or not any(rights):
        return [np.zeros((len(left), len(right))) for right in rights]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, lowercase=True,
                                 dtype=np.float32)
    matrix = vectorizer.fit_transform([*left, *(t for right in rights for t in right)])
    left_rows, start, out = matrix[:len(left)], len(left), []
    for right in rights:
        out.append((left_rows @ matrix[start:start + len(right)].T).toarray())
        start += len(right)
    return out



# ------------------------------------------------------------------------------------------------------------------
# Training texts against evaluation texts

MIN_CHARACTERS = 12       # normalised texts shorter than this ("yes", "1990", a name) are not counted as overlap
EXAMPLES = 5


@dataclass
class SetOverlap:
    """Evaluation texts of one (dataset, role, language) found among the training texts."""

    dataset: str
    role: str              # "query" or "passage"
    language: str
    texts: int             # distinct normalised texts of at least MIN_CHARACTERS
    found: int
    training: dict[str, int] = field(default_factory=dict)  # training dataset -> how many of them it holds
    examples: list[str] = field(default_factory=list)


@dataclass
class OverlapReport:
    """Every evaluation set's texts checked against every training dataset's queries, passages, hard negatives."""

    sets: list[SetOverlap]
    not_compared: list[str]            # evaluation data whose texts are not checked (named, with why)
    training_texts: int                # training texts read (queries + passages + hard negatives)
    seconds: float = 0.0

    @property
    def passage_overlap(self) -> list[SetOverlap]:
        return [s for s in self.sets if s.role == "passage" and s.found]

    def summary(self) -> str:
        found = [s for s in self.sets if s.found]
        if not found:
            return (f"no evaluation text among the {self.training_texts:,} training texts "
                    f"({len(self.sets)} evaluation groups compared)")
        return "; ".join(f"{s.dataset} {s.language} {'queries' if s.role == 'query' else 'passages'}: "
                         f"{s.found} of {s.texts} "
                         f"(in {', '.join(f'{k}: {v}' for k, v in s.training.items())})" for s in found)

    def to_dict(self) -> dict[str, Any]:
        return {"sets": [asdict(s) for s in self.sets], "not_compared": self.not_compared,
                "training_texts": self.training_texts, "seconds": round(self.seconds, 3),
                "min_characters": MIN_CHARACTERS}


def _training_columns(dataset: Any) -> Iterator[pa.Array]:
    table = dataset.table
    for name in ("query", "passage"):
        if name in table.column_names:
            yield from table.column(name).chunks
    if "hard_negatives" in table.column_names:
        for chunk in table.column("hard_negatives").chunks:
            yield pc.list_flatten(chunk)


def find_overlap(training: Sequence[Any], evaluation: Sequence[tuple[str, str, str, Sequence[str]]],
                 not_compared: Sequence[str] = ()) -> OverlapReport:
    """Which evaluation texts (``(dataset, role, language, texts)`` groups) the training datasets (each with an
    Arrow ``table`` of query / passage / hard_negatives columns and a ``name``) hold, after :func:`normalise`.

    Arrow kernels only: each training chunk is normalised and looked up in the evaluation texts' set, so the cost
    is one pass over the training texts at C++ speed, whatever their number.
    """
    started = time.perf_counter()
    groups = []
    for dataset, role, language, texts in evaluation:
        normal = normalise(list(texts))
        kept = pc.unique(normal.filter(pc.greater_equal(pc.utf8_length(normal), MIN_CHARACTERS)))
        groups.append((dataset, role, language, kept))
    value_set = pc.unique(pa.concat_arrays([g[3] for g in groups])) if groups else pa.array([], pa.string())
    found: dict[str, set[str]] = {}
    total = 0
    for data in training:
        hits: set[str] = set()
        for chunk in _training_columns(data):
            total += len(chunk)
            normal = normalise(chunk)
            hits.update(normal.filter(pc.is_in(normal, value_set=value_set)).to_pylist())
        found[data.name] = hits
    sets = []
    for dataset, role, language, kept in groups:
        texts = set(kept.to_pylist())
        by_training = {name: len(texts & hits) for name, hits in found.items() if texts & hits}
        matched = sorted(set().union(*(texts & hits for hits in found.values()))) if found else []
        sets.append(SetOverlap(dataset, role, language, len(texts), len(matched), by_training, matched[:EXAMPLES]))
    return OverlapReport(sets, list(not_compared), total, time.perf_counter() - started)


def evaluation_texts(sets: Sequence[Any]) -> tuple[list[tuple[str, str, str, list[str]]], list[str]]:
    """Each evaluation set's texts by role and language (``EvaluationSet.texts``), and the sets (or parts) that
    offer none to compare."""
    groups, missing = [], []
    for evaluation_set in sets:
        texts = evaluation_set.texts()
        groups += [(evaluation_set.key, role, language, values) for role, language, values in texts.groups]
        missing += [f"{evaluation_set.key}: {why}" for why in texts.not_compared]
    return groups, missing


class ContaminationError(ValueError):
    """Training data holds evaluation passages (a leak) and the run did not allow it."""


def check_contamination(training: Sequence[Any], sets: Sequence[Any], policy: str = "refuse") -> OverlapReport | None:
    """:func:`find_overlap` of the run's training data and evaluation sets, under ``train.contamination``:
    ``refuse`` (default) raises :class:`ContaminationError` when evaluation passages are among the training texts,
    ``warn`` logs the overlap and goes on, ``off`` does not compare."""
    if policy not in CONTAMINATION_POLICIES:
        raise BadValue(f"train.contamination={policy!r}: expected one of {list(CONTAMINATION_POLICIES)}")
    if policy == "off":
        return None
    groups, missing = evaluation_texts(sets)
    report = find_overlap(training, groups, missing)
    leaks = report.passage_overlap
    if leaks and policy == "refuse":
        first = leaks[0]
        raise ContaminationError(
            f"the training data holds evaluation passages: {report.summary()}. For example "
            f"({first.dataset}, {first.language}): {first.examples[:3]}. Train on data without them (for a "
            f"selection split: train_data.holdout), or set train.contamination=warn to train anyway")
    log.log(logging.WARNING if any(s.found for s in report.sets) else logging.INFO, "overlap of training and "
            "evaluation texts: %s (%.1f s)", report.summary(), report.seconds)
    return report
