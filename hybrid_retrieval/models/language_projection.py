"""Removing the language subspace from embeddings, after training and without labels (``model.language_projection``).

Embeddings of a multilingual encoder carry a language component: each language's texts sit around their own mean,
and in a pooled (multilingual) ranking that pulls a query's own language up. LSAR (Xie et al., arXiv 2401.05792)
estimates the subspace spanned by the languages' means from unlabelled text and projects it out:

1. encode ``per_language`` texts of each language (never the test set: Tatoeba sentences, or one text file per
   language) and take each language's mean embedding ``m_l``;
2. centre the means over languages (``M = [m_l - mean_l m_l]``) and take the top ``rank`` right singular vectors of
   ``M``: an orthonormal basis ``B`` (d x rank) of the directions in which languages differ most;
3. every embedding becomes ``normalize(e - B B^T e)``: the same linear map for every text, so queries and passages
   of any language (one never seen in step 1 too) need no language label.

With ``rank = L - 1`` (L languages) the basis spans every difference of language means, so all L means project to
one point: per-language mean centering (Libovicky et al., 2020) for the languages it was estimated on, as one
linear map. The map is applied by :meth:`Encoder.encode` (so evaluate, encode, search, mine and MTEB get it),
saved beside the model (``language_projection.npz``) and exported as a sentence-transformers Dense module (weight
``I - B B^T``, no bias) before the final Normalize, so users of an exported model get it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hybrid_retrieval.config_error import BadValue, MissingPath

log = logging.getLogger(__name__)

FILE = "language_projection.npz"
TEXT_SOURCES = ("tatoeba", "files")
# XQuAD-R / MLQA-R codes -> Tatoeba's ISO 639-3 codes (texts=tatoeba with languages given as the evaluation's codes)
TATOEBA_CODES = {"ar": "ara", "de": "deu", "el": "ell", "en": "eng", "es": "spa", "hi": "hin", "ru": "rus",
                 "th": "tha", "tr": "tur", "vi": "vie", "zh": "cmn", "it": "ita", "ro": "ron", "fr": "fra"}


@dataclass(frozen=True)
class LanguageProjection:
    """``e -> normalize(e - basis basis^T e)``; ``basis`` is d x rank with orthonormal columns."""

    basis: np.ndarray
    languages: tuple[str, ...]
    singular_values: tuple[float, ...]   # of the centred means, all of them (how much each direction carries)
    source: str

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def matrix(self) -> np.ndarray:
        """The linear map ``I - B B^T`` (d x d, symmetric) before re-normalisation."""
        return np.eye(self.basis.shape[0], dtype=np.float64) - self.basis.astype(np.float64) @ self.basis.T

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """Project and re-normalise rows (float32); a zero row stays zero."""
        x = np.asarray(embeddings, dtype=np.float32)
        x = x - (x @ self.basis) @ self.basis.T
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms > 0, norms, 1.0)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, basis=self.basis, languages=np.asarray(self.languages),
                 singular_values=np.asarray(self.singular_values), source=np.asarray(self.source))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LanguageProjection:
        with np.load(path) as data:
            return cls(data["basis"].astype(np.float32), tuple(str(x) for x in data["languages"]),
                       tuple(float(x) for x in data["singular_values"]), str(data["source"]))


def fit_projection(embeddings: Mapping[str, np.ndarray], rank: int, source: str = "") -> LanguageProjection:
    """LSAR's basis (module docstring) from each language's embeddings (rows; at least one per language)."""
    languages = [language for language, rows in embeddings.items() if len(rows)]
    if len(languages) < 2:
        raise BadValue(f"model.language_projection needs texts in at least 2 languages; got {languages}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= len(languages) - 1:
        raise BadValue(f"model.language_projection.rank={rank!r}: expected an integer in 1..{len(languages) - 1} "
                         f"(the number of languages its texts span, {len(languages)}, minus one)")
    means = np.stack([np.asarray(embeddings[language], dtype=np.float64).mean(axis=0) for language in languages])
    centred = means - means.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    return LanguageProjection(vt[:rank].T.astype(np.float32), tuple(languages),
                              tuple(float(s) for s in singular), source)


def check_projection_config(options: Any) -> None:
    """Option errors before any model loads (rank's upper bound is checked once the languages are known)."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise BadValue(f"model.language_projection={options!r}: expected null or a mapping with rank, texts, "
                         "per_language (and languages / path)")
    unknown = set(options) - {"rank", "texts", "per_language", "languages", "path"}
    if unknown:
        raise BadValue(f"model.language_projection: unknown key(s) {sorted(unknown)}; expected rank, texts, "
                         "per_language, languages, path")
    rank, texts, per_language = options.get("rank"), options.get("texts", "tatoeba"), options.get("per_language", 500)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise BadValue(f"model.language_projection.rank={rank!r}: expected a positive integer")
    if texts not in TEXT_SOURCES:
        raise BadValue(f"model.language_projection.texts={texts!r}: expected one of {list(TEXT_SOURCES)}")
    if not isinstance(per_language, int) or isinstance(per_language, bool) or per_language < 1:
        raise BadValue(f"model.language_projection.per_language={per_language!r}: expected a positive integer")
    if texts == "files" and not options.get("path"):
        raise BadValue("model.language_projection.texts=files: set model.language_projection.path=<folder of "
                         "<language>.txt files, one text a line>")


def projection_texts(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """The first ``per_language`` texts of each language from the configured source."""
    texts, per_language = options.get("texts", "tatoeba"), int(options.get("per_language", 500))
    languages = options.get("languages")
    out: dict[str, list[str]] = {}
    if texts == "tatoeba":
        from hybrid_retrieval.data.tatoeba import load_tatoeba

        wanted = list(languages) if languages else list(TATOEBA_CODES)[:11]   # XQuAD-R's eleven by default
        codes = [TATOEBA_CODES.get(code, code) for code in wanted]
        split = load_tatoeba(languages=[c for c in codes if c != "eng"], max_pairs_per_language=per_language,
                             low_resource=None)
        for code, pair in split.pairs.items():
            out[code] = list(pair.sentences)
        if "eng" in codes:  # English: the English sides, in order, as many as asked
            english = [t for pair in split.pairs.values() for t in pair.english]
            out["eng"] = list(dict.fromkeys(english))[:per_language]
    else:  # files
        folder = Path(str(options["path"])).expanduser()
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise MissingPath(f"model.language_projection.path={str(folder)!r}: no <language>.txt files there")
        for file in files:
            if languages and file.stem not in languages:
                continue
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            out[file.stem] = lines[:per_language]
    return out


def fit_for_encoder(encoder: Any, options: Mapping[str, Any], batch_size: int = 64,
                    dtype: Any = None) -> LanguageProjection:
    """Encode the configured texts with `encoder` (as passages, without any projection) and fit the basis."""
    check_projection_config(options)
    texts = projection_texts(options)
    previous, encoder.language_projection = getattr(encoder, "language_projection", None), None
    try:
        embeddings = {language: encoder.encode(values, kind="passage", batch_size=batch_size, dtype=dtype)
                      for language, values in texts.items()}
    finally:
        encoder.language_projection = previous
    source = f"{options.get('texts', 'tatoeba')}: {', '.join(f'{k} {len(v)}' for k, v in texts.items())}"
    projection = fit_projection(embeddings, int(options["rank"]), source)
    log.info("language projection: rank %d over %d languages (%s); singular values of the centred means %s",
             projection.rank, len(projection.languages), source,
             ", ".join(f"{s:.3f}" for s in projection.singular_values))
    return projection
