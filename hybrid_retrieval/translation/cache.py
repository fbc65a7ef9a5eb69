"""A resumable translation cache: one JSON-lines file, appended batch by batch.

Each line is one translated text::

    {"model": "facebook/nllb-200-distilled-600M", "settings": "num_beams=4,...", "source_language": "es",
     "target_language": "sw", "sha256": "<sha256 of the source text>", "translation": "..."}

keyed by (model, settings, source language, target language, sha256 of the source text); one file can hold
several models (Marian: one per language pair) and settings. A batch's lines are
written, flushed and fsynced as soon as it is translated, so a run killed at any point keeps every finished batch
and the next run translates only what is missing. A line cut short by the kill is dropped (and cut off the file)
when the cache is opened again. One run holds the cache at a time (an OS file lock, released when the process
dies, even by SIGKILL).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybrid_retrieval.config_error import BadValue

__all__ = ["CacheInUseError", "TranslationCache", "text_sha256"]


class CacheInUseError(RuntimeError):
    """Another translate run holds the cache file."""


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TranslationCache:
    """Translations made with `settings` by `models`, from a JSON-lines file (other entries stay in the file)."""

    def __init__(self, path: str | os.PathLike[str], models: Sequence[str], settings: str) -> None:
        from filelock import FileLock, Timeout

        self.path = Path(path).expanduser()
        self.models = frozenset(models)
        self.settings = settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise CacheInUseError(
                f"translation cache {self.path} is in use by another translate run ({self._lock.lock_file}); "
                "wait for it, or give this run its own translate.cache"
            ) from None
        self._entries: dict[tuple[str, str, str, str], str] = {}
        self.dropped_partial_line = False
        self._load()
        self._handle = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            data = handle.read()
        end = len(data)
        if data and not data.endswith(b"\n"):
            # The last write was cut short (the run was killed mid-line): drop that line so appends start clean.
            end = data.rfind(b"\n") + 1
            with self.path.open("r+b") as handle:
                handle.truncate(end)
            self.dropped_partial_line = True
        for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = (entry["model"], entry["source_language"], entry["target_language"], entry["sha256"])
                if entry["model"] in self.models and entry["settings"] == self.settings:
                    self._entries[key] = entry["translation"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BadValue(f"{self.path}:{number}: not a translation cache line ({exc}); move the file away "
                                 "or set translate.cache to another file") from None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model: str, source_language: str, target_language: str, text: str) -> str | None:
        return self._entries.get((model, source_language, target_language, text_sha256(text)))

    def add(self, model: str, source_language: str, target_language: str, texts: Sequence[str],
            translations: Sequence[str]) -> None:
        """Record one batch: appended, flushed and fsynced before this returns."""
        lines = []
        for text, translation in zip(texts, translations, strict=True):
            digest = text_sha256(text)
            self._entries[(model, source_language, target_language, digest)] = translation
            entry: dict[str, Any] = {"model": model, "settings": self.settings,
                                     "source_language": source_language, "target_language": target_language,
                                     "sha256": digest, "translation": translation}
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.write("".join(lines))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._lock.release()

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
