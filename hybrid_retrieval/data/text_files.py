"""Text files of ids and texts that commands read: ``.txt`` (one text a line, ids are 0-based line numbers) or
``.jsonl`` (objects with an id and a text field). Used by ``encode`` (``input=``) and ``search``
(``queries=``, ``passages=``); every unusable line is reported with the option, the file and the line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_retrieval.data.jsonl import json_objects

TEXT_SUFFIXES = (".txt", ".jsonl")
TEXT_COLUMNS = {"id": "string", "text": "string"}  # what a command reads from either kind of file


class InputFileError(ValueError):
    """An input text file that cannot be used; the message names the option, the file and the line."""


@dataclass
class TextFile:
    """Texts of one input file, in file order, with their ids (strings without whitespace, unique)."""

    path: Path
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _check_id(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputFileError(f"{where}: field {field!r} is {value!r}; expected a string or an integer")
    text = str(value)
    if not text or any(c.isspace() for c in text):
        # Ids go into TREC run files, whose columns are separated by whitespace.
        raise InputFileError(f"{where}: field {field!r} is {text!r}; expected a non-empty id without whitespace")
    return text


def read_texts(path: str | Path | None, option: str = "input", id_field: str = "id",
               text_field: str = "text") -> TextFile:
    """Read a ``.txt`` (one text a line, id = 0-based line number) or ``.jsonl`` (``{id_field, text_field}``
    objects) file. Raises :class:`InputFileError` naming `option`, the file and the line for anything unusable:
    a missing or empty file, an unknown suffix, a blank text line, a JSONL line that is not an object or lacks a
    field, an id with whitespace or used twice."""
    if path is None or str(path).strip() == "":
        raise InputFileError(f"{option} is not set; expected {option}=<file> ({' or '.join(TEXT_SUFFIXES)})")
    path = Path(str(path)).expanduser()
    if path.suffix not in TEXT_SUFFIXES:
        raise InputFileError(f"{option}={str(path)!r}: unknown file type {path.suffix!r}; expected a .txt file (one "
                             "text per line) or a .jsonl file (one JSON object per line)")
    if not path.is_file():
        raise InputFileError(f"{option}={str(path)!r}: file does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputFileError(f"{option}={str(path)!r}: not UTF-8 text ({err})") from err
    while lines and not lines[-1].strip():  # trailing blank lines are not texts
        lines.pop()
    if not lines:
        raise InputFileError(f"{option}={str(path)!r}: the file is empty; expected at least one text")
    ids: list[str] = []
    texts: list[str] = []
    if path.suffix == ".txt":
        for number, line in enumerate(lines):
            if not line.strip():
                raise InputFileError(f"{option}={str(path)!r} line {number + 1}: empty line; every line is one text "
                                     "(ids are 0-based line numbers, so blank lines cannot be skipped)")
            ids.append(str(number))
            texts.append(line)
        return TextFile(path=path, ids=ids, texts=texts)
    seen: dict[str, int] = {}
    objects = json_objects(lines, lambda number: f"{option}={str(path)!r} line {number}", InputFileError,
                           f"a JSON object with fields {id_field!r} and {text_field!r}")
    for number, where, record in objects:
        for field in (id_field, text_field):
            if field not in record:
                raise InputFileError(f"{where}: missing field {field!r} (has {sorted(record)[:6]}); set "
                                     f"{'id_field' if field == id_field else 'text_field'}=<name> if it is "
                                     "called otherwise")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(f"{where}: field {text_field!r} is {text!r:.80}; expected a non-empty string")
        identifier = _check_id(record[id_field], where, id_field)
        if identifier in seen:
            raise InputFileError(f"{where}: id {identifier!r} already used on line {seen[identifier]}")
        seen[identifier] = number
        ids.append(identifier)
        texts.append(text)
    return TextFile(path=path, ids=ids, texts=texts)
