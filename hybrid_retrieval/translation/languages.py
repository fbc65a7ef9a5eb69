"""Language codes of the translation model families (NLLB-200, M2M100, Marian) and how texts are joined.

The data speaks ISO 639-1 codes (``es``, ``sw``); each model family has its own: NLLB-200 uses FLORES-200 codes
(``spa_Latn``), M2M100 its ISO codes written as ``__es__`` tokens, Marian (OPUS-MT) one model per language pair
named by ISO codes. A preset in ``conf/translate_model/`` maps the data's codes to the model's
(``language_codes``); a code that the model family itself uses (``swh_Latn`` for NLLB) is accepted as is. Checked
before any model is loaded, so a typo fails in a second with a list of valid codes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "FAMILIES",
    "LanguageError",
    "family_codes",
    "joiner",
    "model_language_code",
]

FAMILIES = ("nllb", "m2m100", "marian")
# Scripts written without spaces between sentences: translated sentences are joined without one.
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "km", "bo", "yue", "wuu"})
_NO_SPACE_SUFFIXES = ("_Hans", "_Hant", "_Jpan", "_Thai", "_Laoo", "_Mymr", "_Khmr", "_Tibt")
_MARIAN_CODE = re.compile(r"[a-z]{2,3}(_[A-Za-z]{4})?")


class LanguageError(ValueError):
    """A language code the chosen translation model family does not know; the message lists valid ones."""


@dataclass(frozen=True)
class _Family:
    codes: tuple[str, ...]  # every code of the family ("" = open set, checked by pattern)
    description: str


def family_codes(family: str) -> tuple[str, ...]:
    """All language codes a family's tokenizer knows (empty for Marian: its codes are ISO, one model per pair)."""
    return _family(family).codes


def _family(family: str) -> _Family:
    if family == "nllb":
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

        return _Family(tuple(FAIRSEQ_LANGUAGE_CODES), "FLORES-200 codes such as spa_Latn, swh_Latn, zho_Hans")
    if family == "m2m100":
        from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

        return _Family(tuple(FAIRSEQ_LANGUAGE_CODES["m2m100"]), "ISO 639-1 codes such as es, sw, zh")
    if family == "marian":
        return _Family((), "ISO 639 codes as in the OPUS-MT model names (es, it, sw)")
    raise LanguageError(f"translate_model.family={family!r}: expected one of {list(FAMILIES)}")


def model_language_code(family: str, language: str, language_codes: Mapping[str, str] | None, option: str,
                        preset: str = "") -> str:
    """The model's code for the data's `language`: through `language_codes` (the preset's mapping), else the
    code itself when the family knows it. Raises :class:`LanguageError` naming `option` and listing valid codes."""
    spec = _family(family)
    mapping = dict(language_codes or {})
    if not isinstance(language, str) or not language.strip():
        raise LanguageError(f"{option}={language!r}: expected a language code such as 'es'")
    code = mapping.get(language, language)
    if spec.codes:
        if code in spec.codes:
            return code
    elif _MARIAN_CODE.fullmatch(code):
        return code
    known = ", ".join(f"{k} ({v})" for k, v in list(mapping.items())[:12])
    where = f"translate_model={preset} (family {family})" if preset else f"family {family}"
    examples = ", ".join(spec.codes[:6]) if spec.codes else ""
    raise LanguageError(
        f"{option}={language!r}: unknown language for {where}. Valid: a key of translate_model.language_codes"
        f"{' (' + known + ', ...)' if known else ''}, or one of the family's {len(spec.codes) or 'ISO'} codes: "
        f"{spec.description}{' (' + examples + ', ...)' if examples else ''}. "
        f"Add `{language}: <model code>` to translate_model.language_codes for another mapping."
    )


def joiner(language: str, model_code: str = "") -> str:
    """What joins translated sentences of one passage: nothing for scripts without spaces, else a space."""
    base = language.replace("_", "-").split("-")[0].lower()
    if base in _NO_SPACE_LANGUAGES or model_code.endswith(_NO_SPACE_SUFFIXES):
        return ""
    return " "
