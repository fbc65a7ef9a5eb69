"""Locate the LAReQA evaluation files (XQuAD-R, MLQA-R) on disk, downloading them when allowed.

The project never ships data. A dataset folder (``xquad-r/`` or ``mlqa-r/``, holding ``<lang>.json``) is
looked up in this order:

1. an explicit ``root`` (config ``dataset.root``): the folder that holds ``xquad-r/`` etc., or the dataset
   folder itself. A root that lacks the dataset or some of its files is an error naming what is missing;
   it never falls through to a download, so a mistyped path is noticed.
2. ``$HYBRID_RETRIEVAL_DATA``: same layout. If the dataset folder exists there it must be complete;
   if it does not exist the search goes on (the variable may point at a folder with other datasets only).
3. the cache ``$HYBRID_RETRIEVAL_CACHE/data/<folder>`` (default ``~/.cache/hybrid_retrieval/data/<folder>``).
4. a download of the missing files from the public origin at a pinned commit, each checked against its
   sha256 and written atomically into the cache. ``$HYBRID_RETRIEVAL_DATA_URL`` (or ``base_url``)
   replaces the origin: files are then fetched from ``<base_url>/<folder>/<lang>.json``. Setting
   ``HYBRID_RETRIEVAL_OFFLINE=1`` (or ``download=False``) skips this step.
5. otherwise :class:`DataNotFoundError`, saying which files are missing where and what to set.

Every file used, wherever it was found, must have its pinned sha256 (:class:`DataChecksumError` otherwise),
so results are always on the published benchmark and a folder of the other dataset is never mistaken for
this one. Hashes are computed once per process and file version (about 50 ms for all of XQuAD-R).
``HYBRID_RETRIEVAL_VERIFY=0`` (or ``verify=False``) skips the check for deliberately edited copies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hybrid_retrieval.config_error import BadValue

__all__ = [
    "CACHE_ENV",
    "DATASETS",
    "DATA_ENV",
    "DATA_URL_ENV",
    "OFFLINE_ENV",
    "VERIFY_ENV",
    "DataChecksumError",
    "DataNotFoundError",
    "DatasetSource",
    "check_languages",
    "dataset_languages",
    "cache_root",
    "default_cache_dir",
    "get_source",
    "resolve_dataset_dir",
]

DATA_ENV = "HYBRID_RETRIEVAL_DATA"
CACHE_ENV = "HYBRID_RETRIEVAL_CACHE"
DATA_URL_ENV = "HYBRID_RETRIEVAL_DATA_URL"
OFFLINE_ENV = "HYBRID_RETRIEVAL_OFFLINE"
VERIFY_ENV = "HYBRID_RETRIEVAL_VERIFY"
DEFAULT_TIMEOUT_S = 20.0

_LAREQA_RAW = "https://raw.githubusercontent.com/google-research-datasets/lareqa"


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are neither in a configured folder, nor in the cache, nor downloadable."""


class DataChecksumError(RuntimeError):
    """A data file's sha256 differs from the pinned one (a download is then not written to the cache)."""


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset lives: its folder name, its languages and the pinned origin of each file."""

    name: str
    folder: str
    base_url: str  # files are at f"{base_url}/{folder}/{lang}.json"
    sha256: dict[str, str]  # language -> sha256 of <lang>.json
    license: str

    @property
    def languages(self) -> list[str]:
        return sorted(self.sha256)

    def filename(self, language: str) -> str:
        return f"{language}.json"


DATASETS: dict[str, DatasetSource] = {
    "xquad_r": DatasetSource(
        name="xquad_r",
        folder="xquad-r",
        base_url=f"{_LAREQA_RAW}/9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c",
        sha256={
            "ar": "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
            "de": "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
            "el": "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6",
            "en": "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
            "es": "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
            "hi": "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
            "ru": "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1",
            "th": "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4",
            "tr": "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94",
            "vi": "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
            "zh": "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
        },
        license="CC BY-SA 4.0",
    ),
    # MLQA-R was later removed from the upstream repository; this commit still has it.
    "mlqa_r": DatasetSource(
        name="mlqa_r",
        folder="mlqa-r",
        base_url=f"{_LAREQA_RAW}/354d67d1cd066854cdfbf5ad0e6105528976141d",
        sha256={
            "ar": "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137",
            "de": "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886",
            "en": "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4",
            "es": "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7",
            "hi": "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654",
            "vi": "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85",
            "zh": "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc",
        },
        license="CC BY-NC 4.0 (non-commercial)",
    ),
}


def get_source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` for `name`; ValueError listing the valid names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise BadValue(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None


def dataset_languages(name: str) -> list[str]:
    """All languages of dataset `name`, sorted."""
    return get_source(name).languages


def sort_out_languages(languages: Sequence[str] | str | None,
                       valid: Sequence[str]) -> tuple[list[str] | None, list[str], list[str]]:
    """A language option as every dataset reads it: (the codes given, in order, or None when not given; the
    unknown ones; the repeated ones). Each dataset words its own errors from these."""
    if languages is None:
        return None, [], []
    if isinstance(languages, str):
        languages = [languages]
    chosen = [str(language) for language in languages]
    known = set(valid)
    unknown = [language for language in chosen if language not in known]
    repeated = sorted({language for language in chosen if chosen.count(language) > 1})
    return chosen, unknown, repeated


def check_languages(name: str, languages: Sequence[str] | str | None) -> list[str]:
    """Validated language list for `name`: all (sorted) when None, else in the order given, no repeats."""
    valid = dataset_languages(name)
    chosen, unknown, repeated = sort_out_languages(languages, valid)
    if chosen is None:
        return valid
    if not chosen:
        raise BadValue(f"languages for {name!r} is empty; give null (all) or some of {valid}")
    if unknown:
        raise BadValue(f"unknown language(s) {unknown} for dataset {name!r}; valid languages: {valid}")
    if repeated:
        raise BadValue(f"language(s) {repeated} given more than once for dataset {name!r}")
    return chosen


def cache_root() -> Path:
    """The project's cache: ``$HYBRID_RETRIEVAL_CACHE`` or ``~/.cache/hybrid_retrieval`` (data, training pairs and
    translations each have a folder in it)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hybrid_retrieval"


def default_cache_dir() -> Path:
    """Data cache: ``$HYBRID_RETRIEVAL_CACHE/data`` or ``~/.cache/hybrid_retrieval/data``."""
    return cache_root() / "data"


def _dataset_folder_in(root: Path, source: DatasetSource) -> Path | None:
    """The dataset folder under `root` (root/<folder>) or root itself when it is that folder."""
    if (root / source.folder).is_dir():
        return root / source.folder
    if root.name == source.folder or any((root / source.filename(lang)).is_file() for lang in source.languages):
        return root
    return None


def _missing(folder: Path, source: DatasetSource, languages: Sequence[str]) -> list[str]:
    return [source.filename(lang) for lang in languages if not (folder / source.filename(lang)).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=256)
def cached_sha256(path_str: str, mtime_ns: int, size: int) -> str:
    # mtime and size in the key: an edited file is hashed again.
    return _sha256(Path(path_str))


def _known_files() -> dict[str, str]:
    """sha256 -> "<folder>/<lang>.json" over all datasets, to say what a wrong file actually is."""
    return {
        digest: f"{src.folder}/{src.filename(lang)}" for src in DATASETS.values() for lang, digest in src.sha256.items()
    }


def _verify(folder: Path, source: DatasetSource, languages: Sequence[str]) -> None:
    for language in languages:
        path = (folder / source.filename(language)).resolve()
        stat = path.stat()
        actual = cached_sha256(str(path), stat.st_mtime_ns, stat.st_size)
        expected = source.sha256[language]
        if actual != expected:
            other = _known_files().get(actual)
            what = f"it is {other}, not {source.folder}/{source.filename(language)}" if other else "edited or corrupt"
            raise DataChecksumError(
                f"{path}: sha256 is {actual}, expected {expected} ({what}). Point dataset.root at the "
                f"{source.folder}/ files, or set {VERIFY_ENV}=0 to use an edited copy."
            )


def verify_enabled(verify: bool | None) -> bool:
    if verify is not None:
        return verify
    return os.environ.get(VERIFY_ENV, "").strip().lower() not in {"0", "false", "no", "off"}


def _download(url: str, target: Path, expected_sha256: str, timeout: float) -> None:
    """Fetch `url` into `target` atomically, only if its sha256 matches; the cache never holds a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise DataChecksumError(
                f"checksum mismatch for {url}: sha256 is {actual}, expected {expected_sha256}; "
                f"the file was not saved to {target.parent}. The origin or a proxy served different content; "
                f"download the file yourself and set dataset.root or ${DATA_ENV}."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_dataset_dir(
    name: str,
    root: str | os.PathLike[str] | None = None,
    languages: Sequence[str] | str | None = None,
    *,
    download: bool | None = None,
    verify: bool | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Folder holding ``<lang>.json`` for every requested language of dataset `name` ("xquad_r" | "mlqa_r").

    `languages` limits which files must exist (default: all of the dataset's languages). `download`
    None means "allowed unless $HYBRID_RETRIEVAL_OFFLINE is set"; `verify` None means "check sha256 unless
    $HYBRID_RETRIEVAL_VERIFY=0". `base_url` (else $HYBRID_RETRIEVAL_DATA_URL,
    else the pinned GitHub commit) is where missing files are fetched from. See the module docstring for
    the search order.
    """
    source = get_source(name)
    wanted = check_languages(name, languages)

    def checked(folder: Path) -> Path:
        if verify_enabled(verify):
            _verify(folder, source, wanted)
        return folder

    hint = (
        f"Set dataset.root=/path (the folder holding {source.folder}/, or {source.folder}/ itself) "
        f"or export {DATA_ENV}=/path."
    )

    if root is not None and str(root) != "":
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise DataNotFoundError(f"dataset.root {str(root_path)!r} for {name} is not a directory. {hint}")
        folder = _dataset_folder_in(root_path, source)
        if folder is None:
            raise DataNotFoundError(
                f"dataset.root {str(root_path)!r} holds no {source.folder}/ folder and no "
                f"<lang>.json files of {name}. {hint}"
            )
        missing = _missing(folder, source, wanted)
        if missing:
            raise DataNotFoundError(f"{name}: missing {', '.join(missing)} in {folder}. {hint}")
        return checked(folder)

    looked: list[str] = []
    env_root = os.environ.get(DATA_ENV, "")
    if env_root:
        env_path = Path(env_root).expanduser()
        folder = _dataset_folder_in(env_path, source) if env_path.is_dir() else None
        if folder is not None:
            missing = _missing(folder, source, wanted)
            if missing:
                raise DataNotFoundError(f"{name}: missing {', '.join(missing)} in {folder} (from ${DATA_ENV}). {hint}")
            return checked(folder)
        looked.append(f"${DATA_ENV}={env_root} (no {source.folder}/ there)")
    else:
        looked.append(f"${DATA_ENV} (not set)")

    cache_folder = default_cache_dir() / source.folder
    missing = _missing(cache_folder, source, wanted)
    if not missing:
        return checked(cache_folder)
    looked.append(f"cache {cache_folder} (missing {', '.join(missing)})")

    allowed = (not offline()) if download is None else download
    if not allowed:
        looked.append(f"download (disabled by download=False or ${OFFLINE_ENV})")
    else:
        base = (base_url or os.environ.get(DATA_URL_ENV) or source.base_url).rstrip("/")
        failures: list[str] = []
        for filename in missing:
            language = filename.removesuffix(".json")
            url = f"{base}/{source.folder}/{filename}"
            try:
                _download(url, cache_folder / filename, source.sha256[language], timeout)
            except DataChecksumError:
                raise
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                failures.append(f"{url}: {reason}")
        if not failures:
            return checked(cache_folder)
        looked.append("download failed: " + "; ".join(failures))

    still_missing = _missing(cache_folder, source, wanted)
    raise DataNotFoundError(
        f"{name} ({source.license}) not found: missing {', '.join(still_missing)}. Looked at: "
        + "; ".join(looked)
        + f". {hint}"
    )
