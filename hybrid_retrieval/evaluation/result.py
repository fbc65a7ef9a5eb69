"""The base of every evaluation set's result: one MLflow name scheme, one JSON form.

A result holds ``summary`` (setting -> metric -> macro average) and ``per_language`` (setting -> language or pair
-> metric -> mean over its queries); each kind adds its own fields (counts, pairs, per-topic values) and its own
:meth:`RetrievalResult.table`. Fields marked ``field(metadata=NOT_SAVED)`` (embeddings, runs) stay in memory only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["NOT_SAVED", "RetrievalResult"]

NOT_SAVED = {"saved": False}


@dataclass
class RetrievalResult:
    """Macro averages per setting and the per-language (per-pair) values they average."""

    summary: dict[str, dict[str, float]]
    per_language: dict[str, dict[str, dict[str, float]]]

    json_indent: ClassVar[int] = 2

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Metric names valid for MLflow (no '@'): ``<setting>/<metric>`` and ``<setting>/<group>/<metric>``, each
        after `prefix` (e.g. ``mono/map``, ``cross/en-de/map``, ``val/tatoeba/xx_to_en/amh/map``)."""
        out = {f"{prefix}{s}/{m}": v for s, values in self.summary.items() for m, v in values.items()}
        for setting, groups in self.per_language.items():
            for group, values in groups.items():
                out.update({f"{prefix}{setting}/{group}/{m}": v for m, v in values.items()})
        return out

    @classmethod
    def _saved_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata.get("saved", True)]

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (what :meth:`save_json` writes and :meth:`from_dict` reads)."""
        return {name: getattr(self, name) for name in self._saved_fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalResult:
        """The result :meth:`to_dict` gave; fields with defaults may be missing (files of older versions)."""
        return cls(**{name: data[name] for name in cls._saved_fields() if name in data})

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=self.json_indent, sort_keys=True), encoding="utf-8")
        return path

    def table(self) -> str:
        """The result as a fixed-width text table (each kind lays out its own)."""
        raise NotImplementedError(f"{type(self).__name__} has no table")
