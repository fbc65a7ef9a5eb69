"""Progress of long loops: a tqdm bar with throughput on a terminal, otherwise one log line every N seconds.

Logs and CI stay quiet (no carriage-return bars): when stderr is not a terminal, a line such as
``encode passages: 4200/13014 texts, 151.3 texts/s, about 58 s left`` is logged at most every
``$HYBRID_RETRIEVAL_PROGRESS_EVERY_S`` seconds (default 30) and once at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from hybrid_retrieval.config_error import BadValue

log = logging.getLogger("hybrid_retrieval.progress")
EVERY_ENV = "HYBRID_RETRIEVAL_PROGRESS_EVERY_S"


def every_seconds(default: float = 30.0) -> float:
    value = os.environ.get(EVERY_ENV)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise BadValue(f"{EVERY_ENV}={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise BadValue(f"{EVERY_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """``update(n)`` after each piece of work; ``set_note`` shows e.g. the loss; ``close()`` at the end (or use
    it as a context manager)."""

    def __init__(self, total: int | None, description: str, unit: str = "texts", every_s: float | None = None,
                 initial: int = 0, enabled: bool = True) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.every_s = every_seconds() if every_s is None else every_s
        self.done = initial
        self.initial = initial
        self.note = ""
        self.start = self.last = time.monotonic()
        self.enabled = enabled
        self.bar: Any = None
        self.closed = False
        if enabled and on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit=f" {unit}", unit_scale=True,
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def rate(self) -> float:
        return (self.done - self.initial) / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        text = f"{self.description}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text + (f" ({self.note})" if self.note else "")

    def set_note(self, note: str) -> None:
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and not (self.total and self.done >= self.total):
            log.info(self.line())  # (the last step's line is the one close() writes, once)
            self.last = now

    def close(self) -> None:
        if self.closed or not self.enabled:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif time.monotonic() - self.start >= self.every_s:  # a short loop says nothing; a long one says its end
            log.info(self.line() + " (done)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
