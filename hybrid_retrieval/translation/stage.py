"""The translation stage: training rows in one language -> the same rows in other languages, as training JSONL.

1. :func:`read_input`: SQuAD-format JSON (one language; rows by :func:`hybrid_retrieval.data.squad.squad_rows`)
   or the training JSONL (checked by :func:`~hybrid_retrieval.data.jsonl_pairs.from_jsonl`, so the translated
   file has exactly the schema training reads). Errors name the file (and line) before any model is loaded.
2. :func:`plan_units`: the texts to translate, each once: a row's query whole, its passage and hard negative split
   into sentences (:func:`~hybrid_retrieval.data.sentences.split_sentences`; sentence-level models translate long
   passages badly) unless ``split_passages`` is off. Identical texts are one unit.
3. :func:`translate_units`: per target language, every unit is looked up in the cache; the rest run through the
   model in length-sorted batches (:func:`~hybrid_retrieval.translation.translator.plan_length_batches`, planned over
   all units so that a resumed run makes the same batches), each batch appended to the cache when it finishes.
4. :func:`assemble_rows` / :func:`write_output`: the source rows as they were, then per target language the
   translated rows (same group, so translations share it; passage sentences rejoined), written atomically as
   training JSONL, with a line-aligned provenance file beside it (model, source language, source row and group).

A row whose query or passage translates to nothing (empty output) is left out and counted. Rows whose group
already has a row in the target language (input rows in several languages) are not translated again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_retrieval.data.jsonl_pairs import read_jsonl_rows
from hybrid_retrieval.data.pairs import PairRow
from hybrid_retrieval.data.sentences import split_sentences
from hybrid_retrieval.data.squad import read_squad_file, squad_rows, xquad_reference
from hybrid_retrieval.progress import Progress
from hybrid_retrieval.translation.languages import joiner

__all__ = [
    "INPUT_FORMATS",
    "InputError",
    "SourceRow",
    "StageStats",
    "TranslationStopped",
    "UnitPlan",
    "assemble_rows",
    "detect_format",
    "plan_units",
    "provenance_path",
    "read_input",
    "translate_units",
    "write_output",
]

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "squad", "jsonl")


class InputError(ValueError):
    """An input file that cannot be translated; the message names the option, the file and (JSONL) the line."""


class TranslationStopped(RuntimeError):
    """The run stopped after ``translate.max_batches`` model batches; the cache holds them, a rerun continues."""


@dataclass(frozen=True)
class SourceRow:
    """An input row with where it came from: `index` over the input's rows; `line` its JSONL line (1-based)."""

    row: PairRow
    index: int
    line: int | None = None


def detect_format(path: Path, input_format: str) -> str:
    """"squad" or "jsonl": as configured, or for "auto" by the name (``.jsonl``; ``.json``/``.json.gz``), else
    by the first non-blank line (a complete JSON object with a ``query`` field is JSONL)."""
    if input_format not in INPUT_FORMATS:
        raise InputError(f"translate.input_format={input_format!r}: expected one of {list(INPUT_FORMATS)}")
    if input_format != "auto":
        return input_format
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "squad"
    with path.open("rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            return "squad"
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        return "jsonl" if "query" in json.loads(first) else "squad"
    except (ValueError, TypeError):
        return "squad"


def read_input(path: str | os.PathLike[str] | None, source_language: str, input_format: str = "auto",
               squad: Mapping[str, Any] | None = None, max_rows: int | None = None) -> list[SourceRow]:
    """Every row of the input, checked (rows of other languages than `source_language` included: they are kept
    in the output untranslated). `squad`: ``passage_text``, ``drop_xquad``, ``xquad_root``, ``hard_negative``
    for SQuAD-format input. `max_rows`: keep the first this many rows of `source_language` (and every other row).
    """
    if path is None or str(path) == "":
        raise InputError("translate.input is not set: give a SQuAD-format .json/.json.gz or a training .jsonl")
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"translate.input={str(path)!r}: no such file")
    if file.stat().st_size == 0:
        raise InputError(f"translate.input={str(path)!r}: {file} is empty (expected SQuAD-format JSON or training "
                         "JSONL rows)")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise InputError(f"translate.max_rows={max_rows!r}: expected null or a positive integer")
    kind = detect_format(file, input_format)
    if kind == "squad":
        options = dict(squad or {})
        reference = xquad_reference(options.get("xquad_root")) if options.get("drop_xquad", True) else None
        parsed = read_squad_file(file, source_language, reference.ids if reference else None,
                                 reference.paragraphs if reference else ())
        rows = [SourceRow(row, i) for i, row in enumerate(squad_rows(
            {source_language: parsed}, options.get("passage_text", "sentence"), None, options.get("hard_negative")))]
    else:
        # The training reader checks every line (file:line and field in its errors).
        rows = [SourceRow(row, index, number) for index, (number, row) in enumerate(read_jsonl_rows(file))]
    sources = [r for r in rows if r.row.language == source_language]
    if not sources:
        found = sorted({r.row.language for r in rows})
        raise InputError(f"translate.input={str(path)!r}: no rows in translate.source_language="
                         f"{source_language!r}; the file's languages: {found}")
    if max_rows is not None:
        keep = {r.index for r in sources[:max_rows]}
        rows = [r for r in rows if r.row.language != source_language or r.index in keep]
    return rows


@dataclass
class UnitPlan:
    """Unique texts to translate and, per source row to translate, which units make its fields."""

    texts: list[str]  # unique units, in order of first appearance
    rows: list[SourceRow]  # rows of the source language
    query: list[int]  # per row: its query's unit
    passage: list[list[int]]  # per row: its passage's units (sentences)
    hard_negative: list[list[int] | None]
    targets_by_row: list[list[str]]  # per row: the target languages it is translated into


def plan_units(rows: Sequence[SourceRow], source_language: str, target_languages: Sequence[str],
               split_passages: bool = True) -> UnitPlan:
    index: dict[str, int] = {}
    texts: list[str] = []

    def unit(text: str) -> int:
        text = text.strip()
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    def units(text: str) -> list[int]:
        pieces = split_sentences(text, source_language) if split_passages else [text]
        return [unit(piece) for piece in pieces if piece.strip()]

    present = {(r.row.group, r.row.language) for r in rows}
    plan = UnitPlan(texts, [], [], [], [], [])
    for r in rows:
        if r.row.language != source_language:
            continue
        targets = [t for t in target_languages if (r.row.group, t) not in present]
        if not targets:
            continue
        plan.rows.append(r)
        plan.query.append(unit(r.row.query))
        plan.passage.append(units(r.row.passage))
        plan.hard_negative.append(units(r.row.hard_negative) if r.row.hard_negative else None)
        plan.targets_by_row.append(targets)
    return plan


@dataclass
class StageStats:
    """What a run did; ``translated`` counts texts that went through the model (cache misses)."""

    source_rows: int = 0
    unique_texts: int = 0
    cache_hits: int = 0
    translated: int = 0
    model_batches: int = 0
    skipped_batches: int = 0  # batches whose texts were all in the cache
    rows_written: int = 0
    empty_dropped: int = 0
    seconds: float = 0.0
    per_target: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def translate_units(plan: UnitPlan, source_language: str, targets: Mapping[str, str], models: Mapping[str, str],
                    translator_for: Callable[[str], Any], cache: Any, batch_size: int, max_batch_tokens: int | None,
                    max_batches: int | None = None, progress_every_s: float = 30.0,
                    stats: StageStats | None = None) -> dict[str, list[str]]:
    """Translations of every unit each target needs: ``{target language: [translation per unit, "" if unused]}``.

    `targets`: target language -> the model's code for it; `models`: target language -> model id (the cache
    key); `translator_for(target)` gives its :class:`~hybrid_retrieval.translation.translator.Seq2SeqTranslator`;
    `cache`: a :class:`~hybrid_retrieval.translation.cache.TranslationCache`. Batches are planned over all units a
    target needs; a batch whose units are all cached is skipped; otherwise its missing units are translated and
    appended to `cache`. After `max_batches` model batches :class:`TranslationStopped` is raised.
    """
    from hybrid_retrieval.translation.translator import plan_length_batches

    stats = stats if stats is not None else StageStats()
    needed: dict[str, list[int]] = {}
    for target in targets:
        wanted: set[int] = set()
        for r, row_targets in enumerate(plan.targets_by_row):
            if target in row_targets:
                wanted.add(plan.query[r])
                wanted.update(plan.passage[r])
                wanted.update(plan.hard_negative[r] or ())
        needed[target] = sorted(wanted)
    stats.unique_texts = sum(len(u) for u in needed.values())
    progress = Progress(stats.unique_texts, f"translate {source_language}->{','.join(targets)}", "texts",
                        every_s=progress_every_s)
    results: dict[str, list[str]] = {}
    try:
        for target, code in targets.items():
            translator = translator_for(target)
            units = needed[target]
            out = [""] * len(plan.texts)
            per = {"units": len(units), "cache_hits": 0, "translated": 0, "model_batches": 0}
            lengths = translator.token_lengths([plan.texts[u] for u in units], code)
            for batch in plan_length_batches(lengths, batch_size, max_batch_tokens):
                batch_units = [units[i] for i in batch]
                missing = []
                for u in batch_units:
                    cached = cache.get(models[target], source_language, target, plan.texts[u])
                    if cached is None:
                        missing.append(u)
                    else:
                        out[u] = cached
                per["cache_hits"] += len(batch_units) - len(missing)
                if not missing:
                    stats.skipped_batches += 1
                    progress.update(len(batch_units))
                    continue
                if max_batches is not None and stats.model_batches >= max_batches:
                    raise TranslationStopped(f"stopped after translate.max_batches={max_batches} model batches; "
                                             "the cache keeps them: run again to continue")
                texts = [plan.texts[u] for u in missing]
                translations = translator.translate(texts, code)
                cache.add(models[target], source_language, target, texts, translations)
                for u, translation in zip(missing, translations):
                    out[u] = translation
                per["translated"] += len(missing)
                per["model_batches"] += 1
                stats.model_batches += 1
                stats.translated += len(missing)
                progress.set_note(target)
                progress.update(len(batch_units))
            stats.cache_hits += per["cache_hits"]
            stats.per_target[target] = per
            results[target] = out
    finally:
        progress.close()
    return results


def _join(glue: str, texts: Sequence[str], units: Sequence[int]) -> str:
    """A passage from its translated sentences (an empty translation is skipped)."""
    return glue.join(t for t in (texts[u] for u in units) if t)


def assemble_rows(rows: Sequence[SourceRow], plan: UnitPlan, translations: Mapping[str, list[str]],
                  model_codes: Mapping[str, str], models: Mapping[str, str], source_language: str,
                  stats: StageStats | None = None) -> tuple[list[PairRow], list[dict[str, Any]]]:
    """Output rows and their provenance records: every input row as it was, then, target by target, the
    translated rows in input order (same group; passage sentences rejoined)."""
    stats = stats if stats is not None else StageStats()
    out: list[PairRow] = []
    provenance: list[dict[str, Any]] = []
    for r in rows:
        out.append(r.row)
        provenance.append({"translated": False, "model": None, "source_language": r.row.language,
                           "source_group": r.row.group, "source_row": r.index, "source_line": r.line})
    for target, texts in translations.items():
        glue = joiner(target, model_codes.get(target, ""))
        for k, r in enumerate(plan.rows):
            if target not in plan.targets_by_row[k]:
                continue
            query, passage = texts[plan.query[k]], _join(glue, texts, plan.passage[k])
            if not query or not passage:
                stats.empty_dropped += 1
                continue
            negative = _join(glue, texts, plan.hard_negative[k]) if plan.hard_negative[k] else None
            out.append(PairRow(r.row.group, target, query, passage, negative or None))
            provenance.append({"translated": True, "model": models[target], "source_language": source_language,
                               "target_language": target, "source_group": r.row.group, "source_row": r.index,
                               "source_line": r.line})
    stats.rows_written = len(out)
    return out, provenance


def provenance_path(output: Path) -> Path:
    """``pairs.jsonl`` -> ``pairs.provenance.jsonl``: line i describes line i of the output."""
    name = output.name.removesuffix(".jsonl")
    return output.with_name(f"{name}.provenance.jsonl")


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.writelines(lines)
    os.replace(tmp, path)


def write_output(path: str | os.PathLike[str], rows: Sequence[PairRow],
                 provenance: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """The training JSONL (``{"group","language","query","passage"[,"hard_negative"]}``, what
    :func:`~hybrid_retrieval.data.jsonl_pairs.from_jsonl` reads) and its provenance file, each replaced atomically."""
    output = Path(path).expanduser()
    lines = []
    for row in rows:
        record = {"group": row.group, "language": row.language, "query": row.query, "passage": row.passage}
        if row.hard_negative:
            record["hard_negative"] = row.hard_negative
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _write_atomic(output, lines)
    side = provenance_path(output)
    _write_atomic(side, [json.dumps(dict(p), ensure_ascii=False) + "\n" for p in provenance])
    return output, side
