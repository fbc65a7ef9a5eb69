"""Tatoeba (LASER's 112-language test set) as bitext retrieval pairs: sentences in X and their English lines.

The folder ``tatoeba/`` holds ``tatoeba.<xxx>-eng.<xxx>`` and ``tatoeba.<xxx>-eng.eng`` for 112 languages (ISO
639-3 codes), one sentence per line, line i of one file the translation of line i of the other; up to 1,000
pairs a language (see :data:`PAIR_COUNTS`). The English side differs from one language to the next (it is not
n-way parallel), so each language is a pair of its own: :class:`TatoebaPair`.

It is looked up like the LAReQA data (:mod:`hybrid_retrieval.data.sources`): an explicit ``root`` (the folder
holding ``tatoeba/``, or ``tatoeba/`` itself), else ``$HYBRID_RETRIEVAL_DATA/tatoeba``, else the cache
``~/.cache/hybrid_retrieval/data/tatoeba`` (``$HYBRID_RETRIEVAL_CACHE/data/tatoeba``). There is no download:
a missing folder is an error saying where to put LASER's files. Every file read must hold the pinned number of
lines of LASER's release (:data:`PAIR_COUNTS`, a cheap check that catches truncated or swapped files);
``HYBRID_RETRIEVAL_VERIFY=0`` accepts edited copies (the two sides must still have equal lengths).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.sources import DATA_ENV, VERIFY_ENV, DataNotFoundError, default_cache_dir, sort_out_languages

__all__ = [
    "FOLDER",
    "LANGUAGES",
    "LOW_RESOURCE",
    "ORIGIN",
    "PAIR_COUNTS",
    "TatoebaFormatError",
    "TatoebaPair",
    "TatoebaSplit",
    "check_tatoeba_options",
    "load_tatoeba",
    "resolve_tatoeba_dir",
]

FOLDER = "tatoeba"
ORIGIN = ("https://github.com/facebookresearch/LASER/tree/74bc6ae7ffb7cba670fe0f428d0ede9f666fb821/data/tatoeba/v1 "
          "(files tatoeba.<xxx>-eng.<xxx> and tatoeba.<xxx>-eng.eng)")

# Sentence pairs per language in LASER's data/tatoeba/v1 (commit 74bc6ae); also the list of valid codes.
PAIR_COUNTS: dict[str, int] = {
    "afr": 1000, "amh": 168, "ang": 134, "ara": 1000, "arq": 911, "arz": 477, "ast": 127, "awa": 231, "aze": 1000,
    "bel": 1000, "ben": 1000, "ber": 1000, "bos": 354, "bre": 1000, "bul": 1000, "cat": 1000, "cbk": 1000,
    "ceb": 600, "ces": 1000, "cha": 137, "cmn": 1000, "cor": 1000, "csb": 253, "cym": 575, "dan": 1000,
    "deu": 1000, "dsb": 479, "dtp": 1000, "ell": 1000, "epo": 1000, "est": 1000, "eus": 1000, "fao": 262,
    "fin": 1000, "fra": 1000, "fry": 173, "gla": 829, "gle": 1000, "glg": 1000, "gsw": 117, "heb": 1000,
    "hin": 1000, "hrv": 1000, "hsb": 483, "hun": 1000, "hye": 742, "ido": 1000, "ile": 1000, "ina": 1000,
    "ind": 1000, "isl": 1000, "ita": 1000, "jav": 205, "jpn": 1000, "kab": 1000, "kat": 746, "kaz": 575,
    "khm": 722, "kor": 1000, "kur": 410, "kzj": 1000, "lat": 1000, "lfn": 1000, "lit": 1000, "lvs": 1000,
    "mal": 687, "mar": 1000, "max": 284, "mhr": 1000, "mkd": 1000, "mon": 440, "nds": 1000, "nld": 1000,
    "nno": 1000, "nob": 1000, "nov": 257, "oci": 1000, "orv": 835, "pam": 1000, "pes": 1000, "pms": 525,
    "pol": 1000, "por": 1000, "ron": 1000, "rus": 1000, "slk": 1000, "slv": 823, "spa": 1000, "sqi": 1000,
    "srp": 1000, "swe": 1000, "swg": 112, "swh": 390, "tam": 307, "tat": 1000, "tel": 234, "tgl": 1000,
    "tha": 548, "tuk": 203, "tur": 1000, "tzl": 104, "uig": 1000, "ukr": 1000, "urd": 1000, "uzb": 428,
    "vie": 1000, "war": 1000, "wuu": 1000, "xho": 142, "yid": 848, "yue": 1000, "zsm": 1000,
}
LANGUAGES: tuple[str, ...] = tuple(sorted(PAIR_COUNTS))

# Default low-resource subset (also the default of conf/dataset/tatoeba.yaml): languages with little or no
# pretraining text for the models here, i.e. absent from CC-100 (the corpus of XLM-R, and so of
# multilingual-E5's base) or among its smallest parts (amh, gla, yid). Left out although absent from CC-100:
# constructed languages with Romance vocabulary (ido, ile, ina, lfn, nov), historical ones (ang, orv) and
# varieties whose standard language is high-resource (arq, arz, yue, nds, oci, ...), which these models read
# well; tzl and wuu stay, as in the low-resource lists of the LASER/XTREME line of work.
LOW_RESOURCE: tuple[str, ...] = (
    "amh", "ast", "awa", "cbk", "csb", "dsb", "dtp", "fao", "gla", "gsw", "hsb", "kab", "kzj", "mhr", "pam",
    "swg", "tzl", "wuu", "yid",
)


class TatoebaFormatError(ValueError):
    """A Tatoeba file does not have the expected content; the message names the file."""


@dataclass(frozen=True)
class TatoebaPair:
    """One language's bitext: ``sentences[i]`` (in ``language``) translates ``english[i]``."""

    language: str
    sentences: tuple[str, ...]
    english: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sentences)


@dataclass
class TatoebaSplit:
    """The selected languages' pairs, in the order asked for, and which of them form the low-resource subset."""

    languages: list[str]
    pairs: dict[str, TatoebaPair]
    low_resource: list[str] = field(default_factory=list)  # a subset of `languages`, in the order configured
    name: str = "tatoeba"

    def __len__(self) -> int:
        return sum(len(p) for p in self.pairs.values())


def _codes(value: Sequence[str] | str | None, option: str) -> list[str] | None:
    codes, unknown, repeated = sort_out_languages(value, LANGUAGES)
    if codes is None:
        return None
    if unknown:
        raise BadValue(f"{option}: unknown Tatoeba language code(s) {unknown}; expected ISO 639-3 codes among "
                         f"the 112 languages: {list(LANGUAGES)}")
    if repeated:
        raise BadValue(f"{option}: language code(s) {repeated} given more than once")
    return codes


def check_tatoeba_options(
    languages: Sequence[str] | str | None = None,
    low_resource: Sequence[str] | str | None = LOW_RESOURCE,
    max_pairs_per_language: int | None = None,
    option: str = "dataset",
) -> tuple[list[str], list[str]]:
    """Validated (languages, low-resource subset of them); cheap, so config checks can call it before any work.

    `languages` None means all 112 (sorted); `low_resource` None means none. A low-resource code must be a valid
    code, but need not be selected: the subset is its intersection with `languages`.
    """
    chosen = _codes(languages, f"{option}.languages")
    if chosen is not None and not chosen:
        raise BadValue(f"{option}.languages is empty; give null (all 112) or some of {list(LANGUAGES)}")
    chosen = list(LANGUAGES) if chosen is None else chosen
    low = _codes(low_resource, f"{option}.low_resource") or []
    if max_pairs_per_language is not None and (
        isinstance(max_pairs_per_language, bool) or not isinstance(max_pairs_per_language, int)
        or max_pairs_per_language < 1
    ):
        raise BadValue(f"{option}.max_pairs_per_language={max_pairs_per_language!r}: expected null (all) or a "
                         "positive integer")
    selected = set(chosen)
    return chosen, [c for c in low if c in selected]


def _filenames(language: str) -> tuple[str, str]:
    return f"tatoeba.{language}-eng.{language}", f"tatoeba.{language}-eng.eng"


def _folder_in(root: Path) -> Path | None:
    """``root/tatoeba`` or `root` itself when it holds Tatoeba files."""
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if root.name == FOLDER or any(root.glob("tatoeba.*-eng.eng")):
        return root
    return None


def _missing(folder: Path, languages: Sequence[str]) -> list[str]:
    return [name for lang in languages for name in _filenames(lang) if not (folder / name).is_file()]


def _shorten(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def resolve_tatoeba_dir(root: str | os.PathLike[str] | None = None,
                        languages: Sequence[str] | None = None) -> Path:
    """The folder holding both files of every language in `languages` (default: all 112).

    Search order as in the module docstring; a configured `root`, or a ``tatoeba/`` folder found under
    ``$HYBRID_RETRIEVAL_DATA``, that lacks some files is an error (it never falls through to another copy).
    """
    wanted = list(LANGUAGES) if languages is None else list(languages)
    cache = default_cache_dir() / FOLDER
    hint = (f"Put LASER's Tatoeba files ({ORIGIN}) into a folder named {FOLDER}/ and set dataset.root=<the folder "
            f"holding {FOLDER}/> or ${DATA_ENV}=<the folder holding {FOLDER}/>, or copy them to {cache}.")
    if root is not None and str(root) != "":
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise DataNotFoundError(f"dataset.root {str(root_path)!r} for tatoeba is not a directory. {hint}")
        folder = _folder_in(root_path)
        if folder is None:
            raise DataNotFoundError(f"dataset.root {str(root_path)!r} holds no {FOLDER}/ folder and no "
                                    f"tatoeba.*-eng.* files. {hint}")
        missing = _missing(folder, wanted)
        if missing:
            raise DataNotFoundError(f"tatoeba: missing {_shorten(missing)} in {folder}. {hint}")
        return folder

    looked: list[str] = []
    env_root = os.environ.get(DATA_ENV, "")
    if env_root:
        env_path = Path(env_root).expanduser()
        folder = _folder_in(env_path) if env_path.is_dir() else None
        if folder is not None:
            missing = _missing(folder, wanted)
            if missing:
                raise DataNotFoundError(f"tatoeba: missing {_shorten(missing)} in {folder} (from ${DATA_ENV}). {hint}")
            return folder
        looked.append(f"${DATA_ENV}={env_root} (no {FOLDER}/ there)")
    else:
        looked.append(f"${DATA_ENV} (not set)")
    missing = _missing(cache, wanted)
    if not missing:
        return cache
    looked.append(f"cache {cache} ({'missing ' + _shorten(missing) if cache.is_dir() else 'does not exist'})")
    raise DataNotFoundError(f"tatoeba not found (it is never downloaded). Looked at: {'; '.join(looked)}. {hint}")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TatoebaFormatError(f"{path}: not valid UTF-8 ({error})") from error
    # split("\n"), not splitlines(): a sentence may hold U+2028 or similar, which must not cut a line in two.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _verify_enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "").strip().lower() not in {"0", "false", "no", "off"}


def _read_pair(folder: Path, language: str, cap: int | None) -> TatoebaPair:
    source_file, english_file = (folder / name for name in _filenames(language))
    sentences, english = _read_lines(source_file), _read_lines(english_file)
    if len(sentences) != len(english):
        raise TatoebaFormatError(f"{source_file} has {len(sentences)} lines but {english_file} has {len(english)}; "
                                 "line i of one must translate line i of the other")
    expected = PAIR_COUNTS[language]
    if len(sentences) != expected and _verify_enabled():
        raise TatoebaFormatError(f"{source_file}: {len(sentences)} lines, expected {expected} (LASER's release); "
                                 f"a truncated or different file. Set {VERIFY_ENV}=0 to use an edited copy.")
    for path, lines in ((source_file, sentences), (english_file, english)):
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise TatoebaFormatError(f"{path}: empty line(s) {empty[:5]}; every line must hold a sentence")
    if cap is not None:
        # LASER's files list pairs in random order, so the first lines are a fair sample.
        sentences, english = sentences[:cap], english[:cap]
    return TatoebaPair(language, tuple(sentences), tuple(english))


def load_tatoeba(
    root: str | os.PathLike[str] | None = None,
    languages: Sequence[str] | str | None = None,
    low_resource: Sequence[str] | str | None = LOW_RESOURCE,
    max_pairs_per_language: int | None = None,
) -> TatoebaSplit:
    """Load the Tatoeba pairs of `languages` (None: all 112, sorted; else in the order given).

    `low_resource`: codes of the low-resource subset (default :data:`LOW_RESOURCE`; None: none), kept where
    selected. `max_pairs_per_language`: the first N pairs of each language (the files are in random order).
    Codes are checked before any file is read.
    """
    chosen, low = check_tatoeba_options(languages, low_resource, max_pairs_per_language)
    folder = resolve_tatoeba_dir(root, chosen)
    pairs = {lang: _read_pair(folder, lang, max_pairs_per_language) for lang in chosen}
    return TatoebaSplit(languages=chosen, pairs=pairs, low_resource=low)
