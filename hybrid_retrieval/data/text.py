"""Unlabelled text for domain adaptation (masked language modelling), from files or the project's own data.

Sources (``adapt.text.source``) and the options each reads:

- ``folder``: every ``*.txt`` file under ``path`` (recursively, sorted by path), UTF-8. ``unit: line`` (default):
  one text per non-empty line; ``unit: paragraph``: texts are blocks separated by blank lines, their lines
  joined with a space.
- ``jsonl``: one JSON object per line of the file ``path``; the text is the string in ``field`` (default
  ``text``). Blank lines are skipped; a line without the field is an error naming the line.
- ``hf_dataset``: a ``datasets`` dataset saved with ``save_to_disk`` at ``path`` (``split`` picks one of a
  DatasetDict), or, with ``hub_name`` instead of ``path``, ``datasets.load_dataset(hub_name, split=split)``
  (needs the network or the Hugging Face cache); the text is the column ``field``.
- ``lareqa``: the candidate sentences (``unit: sentence``) or paragraphs (``unit: paragraph``, default) of the
  LAReQA split ``name`` (xquad_r | mlqa_r), ``languages`` (null = all), from ``root`` / the usual lookup.
- ``tatoeba``: the non-English sentences of Tatoeba's ``languages`` (ISO 639-3, null = all 112). LASER's files
  are a test set: adapting on them and then evaluating on Tatoeba is transductive (see ``eval_corpus``).
- ``eval_corpus``: the passages of an evaluation set, ``name`` = xquad_r | mlqa_r (as ``lareqa``) or tatoeba
  (as ``tatoeba``). Reading the evaluation corpus's own unlabelled text is legitimate (no labels are used) but
  changes what the evaluation measures, so it has its own source name, is never a default, and is tagged in
  MLflow (``adapt_uses_eval_corpus``); :func:`check_text_options` refuses ``lareqa``/``tatoeba`` sources that
  name one of the run's evaluation sets, so the overlap can only be chosen this way.

Every source returns stripped, non-empty texts with exact duplicates removed (first occurrence kept), so a
held-out slice never repeats a training text. ``max_texts`` keeps a seeded random sample of that many.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.data.jsonl import json_objects

__all__ = ["TEXT_SOURCES", "TextSourceError", "check_text_options", "load_texts", "read_hf_dataset",
           "read_jsonl", "read_text_folder", "uses_eval_corpus"]

TEXT_SOURCES = ("folder", "jsonl", "hf_dataset", "lareqa", "tatoeba", "eval_corpus")
FOLDER_UNITS = ("line", "paragraph")
LAREQA_UNITS = ("sentence", "paragraph")
EVAL_CORPORA = ("xquad_r", "mlqa_r", "tatoeba")
OPTIONS = ("source", "path", "field", "unit", "name", "root", "languages", "split", "hub_name", "max_texts")


class TextSourceError(ValueError):
    """A text source cannot give any text: the message names the option or the file and what was expected."""


def _option(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unique(texts: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        text = text.strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def read_text_folder(path: str | os.PathLike[str], unit: str = "line", option: str = "adapt.text") -> list[str]:
    """Texts of every ``*.txt`` under `path`: one per non-empty line, or per blank-line-separated paragraph."""
    if unit not in FOLDER_UNITS:
        raise TextSourceError(f"{option}.unit={unit!r}: expected one of {FOLDER_UNITS} for source 'folder'")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TextSourceError(f"{option}.path={str(path)!r}: not a folder; expected a folder of .txt files")
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise TextSourceError(f"{option}.path={str(path)!r}: the folder holds no .txt files")
    texts: list[str] = []
    for file in files:
        try:
            content = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise TextSourceError(f"{file}: not valid UTF-8 ({error})") from error
        lines = content.splitlines()
        if unit == "line":
            texts.extend(lines)
        else:
            block: list[str] = []
            for line in [*lines, ""]:
                if line.strip():
                    block.append(line.strip())
                elif block:
                    texts.append(" ".join(block))
                    block = []
    texts = _unique(texts)
    if not texts:
        raise TextSourceError(f"{option}.path={str(path)!r}: its {len(files)} .txt file(s) hold no text")
    return texts


def read_jsonl(path: str | os.PathLike[str], field: str = "text", option: str = "adapt.text") -> list[str]:
    """The string ``field`` of every JSON object (one per line) in the file `path`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TextSourceError(f"{option}.path={str(path)!r}: no such file; expected a JSONL file")
    texts: list[str] = []
    with file.open(encoding="utf-8") as handle:
        for _, where, row in json_objects(handle, lambda n: f"{file}:{n}", TextSourceError):
            if field not in row:
                raise TextSourceError(f"{where}: no field {field!r} ({option}.field); the object has "
                                      f"{sorted(row)}")
            if not isinstance(row[field], str):
                raise TextSourceError(f"{where}: field {field!r} is {type(row[field]).__name__}, expected "
                                      "a string")
            texts.append(row[field])
    texts = _unique(texts)
    if not texts:
        raise TextSourceError(f"{option}.path={str(path)!r}: no text in field {field!r} of any line")
    return texts


def read_hf_dataset(path: str | os.PathLike[str] | None = None, field: str = "text", split: str | None = None,
                    hub_name: str | None = None, option: str = "adapt.text") -> list[str]:
    """Column `field` of a ``datasets`` dataset: saved to disk at `path`, else ``load_dataset(hub_name)``."""
    import datasets

    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise TextSourceError(f"{option}.path={str(path)!r}: not a folder; expected a dataset written by "
                                  "Dataset.save_to_disk")
        try:
            data = datasets.load_from_disk(str(folder))
        except FileNotFoundError as error:
            raise TextSourceError(f"{option}.path={str(path)!r}: not a saved dataset ({error})") from error
    elif hub_name:
        try:
            data = datasets.load_dataset(hub_name, split=split or "train")
        except Exception as error:  # offline, missing, gated...: one message with the cause
            raise TextSourceError(f"{option}.hub_name={hub_name!r}: could not load it from the hub or its cache "
                                  f"({type(error).__name__}: {error}); save it with save_to_disk and set "
                                  f"{option}.path instead") from error
    else:
        raise TextSourceError(f"{option}: source 'hf_dataset' needs path (a save_to_disk folder) or hub_name")
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            raise TextSourceError(f"{option}.split={split!r}: expected one of the dataset's splits {splits}")
        data = data[split]
    if field not in data.column_names:
        raise TextSourceError(f"{option}.field={field!r}: not a column of the dataset; columns: {data.column_names}")
    values = data[field]
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise TextSourceError(f"{option}.field={field!r}: holds {type(bad).__name__} values, expected strings")
    texts = _unique(values)
    if not texts:
        raise TextSourceError(f"{option}: the dataset's column {field!r} holds no text")
    return texts


def _lareqa_texts(name: str, root: Any, languages: Any, unit: str, option: str) -> list[str]:
    from hybrid_retrieval.data.lareqa import load_split

    if unit not in LAREQA_UNITS:
        raise TextSourceError(f"{option}.unit={unit!r}: expected one of {LAREQA_UNITS} for a LAReQA split")
    try:
        split = load_split(name, root=root, languages=languages)
    except ValueError as error:  # unknown dataset or language
        raise TextSourceError(f"{option}: {error}") from error
    return _unique(c.sentence if unit == "sentence" else c.paragraph for c in split.candidates)


def _tatoeba_texts(root: Any, languages: Any, option: str) -> list[str]:
    from hybrid_retrieval.data.tatoeba import check_tatoeba_options, load_tatoeba

    try:
        check_tatoeba_options(languages, None, option=option)
    except ValueError as error:
        raise TextSourceError(str(error)) from error
    split = load_tatoeba(root=root, languages=languages, low_resource=None)
    return _unique(t for pair in split.pairs.values() for t in pair.sentences)


def _get(options: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = options.get(key, default)
    return default if value is None else value


def check_text_options(options: Mapping[str, Any], eval_datasets: Sequence[str] = (),
                       option: str = "adapt.text") -> None:
    """Cheap checks before any file is read: a known source, its required options, known keys, and no silent
    use of an evaluation set (`eval_datasets`: the dataset names the run evaluates on)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TextSourceError(f"{option}: unknown option(s) {unknown}; expected some of {list(OPTIONS)}")
    source = options.get("source")
    if source not in TEXT_SOURCES:
        raise TextSourceError(f"{option}.source={source!r}: expected one of {TEXT_SOURCES}")
    if source in ("folder", "jsonl") and not options.get("path"):
        raise TextSourceError(f"{option}.path is not set; source {source!r} needs a "
                              f"{'folder of .txt files' if source == 'folder' else 'JSONL file'}")
    if source == "hf_dataset" and not (options.get("path") or options.get("hub_name")):
        raise TextSourceError(f"{option}: source 'hf_dataset' needs path (a save_to_disk folder) or hub_name")
    if source == "lareqa" and options.get("name") not in ("xquad_r", "mlqa_r"):
        raise TextSourceError(f"{option}.name={options.get('name')!r}: expected xquad_r or mlqa_r for source "
                              "'lareqa'")
    if source == "eval_corpus" and options.get("name") not in EVAL_CORPORA:
        raise TextSourceError(f"{option}.name={options.get('name')!r}: expected one of {EVAL_CORPORA} for source "
                              "'eval_corpus'")
    cap = options.get("max_texts")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise TextSourceError(f"{option}.max_texts={cap!r}: expected null (all) or a positive integer")
    dataset = options.get("name") if source == "lareqa" else "tatoeba" if source == "tatoeba" else None
    if dataset is not None and dataset in set(eval_datasets):
        raise TextSourceError(
            f"{option}: source {source!r} reads {dataset}, which this run evaluates on. Adapting on the evaluation "
            f"corpus must be an explicit choice: set {option}.source=eval_corpus {option}.name={dataset}")


def uses_eval_corpus(options: Mapping[str, Any]) -> bool:
    """Whether these options read an evaluation set's own passages (the ``eval_corpus`` source)."""
    return options.get("source") == "eval_corpus"


def load_texts(options: Mapping[str, Any], seed: int = 0, eval_datasets: Sequence[str] = (),
               option: str = "adapt.text") -> list[str]:
    """The texts that `options` (the keys of ``adapt.text``, see the module docstring) describe."""
    options = dict(options)
    check_text_options(options, eval_datasets, option)
    source = options["source"]
    if source == "folder":
        texts = read_text_folder(options["path"], _get(options, "unit", "line"), option)
    elif source == "jsonl":
        texts = read_jsonl(options["path"], _get(options, "field", "text"), option)
    elif source == "hf_dataset":
        texts = read_hf_dataset(options.get("path"), _get(options, "field", "text"), options.get("split"),
                                options.get("hub_name"), option)
    elif source == "tatoeba" or (source == "eval_corpus" and options["name"] == "tatoeba"):
        texts = _tatoeba_texts(options.get("root"), options.get("languages"), option)
    else:  # lareqa, or eval_corpus of a LAReQA split
        texts = _lareqa_texts(options["name"], options.get("root"), options.get("languages"),
                              _get(options, "unit", "paragraph"), option)
    cap = options.get("max_texts")
    if cap is not None and cap < len(texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=cap, replace=False))
        texts = [texts[i] for i in keep]
    return texts
