"""JSON-lines input, read the same way by every reader of ``.jsonl`` files: one JSON object per line, blank lines
skipped, and an error that names the line (file and number) when it is not valid JSON or not an object."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["json_objects"]


def json_objects(
    lines: Iterable[str], place: Callable[[int], str], error: type[Exception], expected: str = "a JSON object",
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, place, object)`` for each non-blank line of `lines` (numbered from 1).

    `place(number)` names a line in messages (e.g. ``"corpus.jsonl:3"``); a line that is not JSON, or JSON but not
    an object, raises `error` naming that place and what was `expected`. Readers check the fields themselves."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = place(number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected JSONL: {expected} "
                        "per line") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected {expected}, got a {type(record).__name__}")
        yield number, where, record
