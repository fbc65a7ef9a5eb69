"""Training pairs from XQuAD-R / MLQA-R (:func:`from_lareqa`): one row per (question, language), grouped by
question id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hybrid_retrieval.data.lareqa import check_holdout, holdout_groups, load_language_files, sha1_order
from hybrid_retrieval.data.pairs import ParallelPairs, StoreSpec, check_reader_options, question_rows

__all__ = ["HARD_NEGATIVE_SOURCES", "from_lareqa"]

HARD_NEGATIVE_SOURCES = (None, "same_paragraph")


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
    check_reader_options(passage_text, max_groups, hard_negative, HARD_NEGATIVE_SOURCES)
    spec = check_holdout(holdout)
    files = load_language_files(name, root, languages)
    held = holdout_groups(spec, root) if spec is not None and spec["dataset"] == name else frozenset()

    kept: set[str] | None = None
    if max_groups is not None or held:
        # Same stable order as load_split's cap; a kept id keeps its rows in every language.
        all_ids = set().union(*({q.id for q in f.questions} for f in files.values())) - held
        kept = set(sha1_order(all_ids)[:max_groups]) if max_groups is not None else all_ids

    rows = question_rows(files, passage_text, hard_negative, kept)
    store = StoreSpec("lareqa", {"name": name, "languages": list(files), "passage_text": passage_text,
                                 "max_groups": max_groups, "hard_negative": hard_negative,
                                 "holdout": spec if held else None},
                      [str(f.path) for f in files.values()], name)
    return ParallelPairs.from_rows(name, rows, list(files), hard_negatives=hard_negative is not None, store=store)
