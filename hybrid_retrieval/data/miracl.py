"""MIRACL (Zhang et al., 2023): topics, qrels and passage-corpus shards, streamed from disk.

**Topics and qrels** (TREC formats, from castorini/anserini-tools; the dev files are in the project's shared data):
``topics.miracl-v1.0-<lang>-<split>.tsv`` (``qid<TAB>query``) and ``qrels.miracl-v1.0-<lang>-<split>.tsv``
(``qid<TAB>Q0<TAB>docid<TAB>rel``, docid ``<wikipedia id>#<passage number>``). Looked up in ``dataset.root``
(the folder holding ``miracl/``, or ``miracl/`` itself), else ``$HYBRID_RETRIEVAL_DATA/miracl/``, else the cache
``$HYBRID_RETRIEVAL_CACHE/data/miracl/``. The dev files must have their pinned sha256 (``HYBRID_RETRIEVAL_VERIFY=0``
accepts edited copies); other splits are read unchecked.

**Corpus** (Wikipedia passages, only on the Hugging Face hub as ``miracl/miracl-corpus``): one folder per language
of JSONL or JSONL.gz shards, one ``{"docid", "title", "text"}`` object a line, as the hub lays it out
(``miracl-corpus-v1.0-<lang>/docs-<i>.jsonl.gz``). A language's folder is ``<base>/miracl-corpus-v1.0-<lang>/`` or
``<base>/<lang>/``, with ``<base>`` looked up in this order:

1. ``dataset.corpus_root`` (an error if that language is not there: a mistyped path never falls through);
2. ``$HYBRID_RETRIEVAL_DATA/miracl-corpus/``;
3. the cache ``$HYBRID_RETRIEVAL_CACHE/data/miracl-corpus/`` (default ``~/.cache/hybrid_retrieval/data/``);
4. a download of that language's shards from the hub into the cache (``huggingface_hub``; ``HF_TOKEN``,
   ``HF_ENDPOINT`` apply), unless ``HYBRID_RETRIEVAL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set;
5. otherwise :class:`~hybrid_retrieval.data.sources.DataNotFoundError` with the exact download command.

Shards are read one line at a time (nothing holds a whole corpus in memory) in natural file order
(``docs-2`` before ``docs-10``), so "the first N passages" is the same on every machine.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.jsonl import json_objects
from hybrid_retrieval.data.sources import (DATA_ENV, VERIFY_ENV, DataChecksumError, DataNotFoundError, cached_sha256,
                                           default_cache_dir, offline, sort_out_languages, verify_enabled)

__all__ = ["CORPUS_REPO", "LANGUAGES", "MiraclFormatError", "MiraclLanguage", "Passage", "check_languages",
           "corpus_dir", "corpus_shards", "find_topics_dir", "iter_passages", "load_language", "passage_text",
           "read_qrels", "read_topics", "select_passages"]

# The 18 languages of MIRACL v1.0 (16 with training data, plus the "surprise" languages de and yo).
LANGUAGES = ("ar", "bn", "de", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th", "yo",
             "zh")
SPLITS = ("dev", "train", "testA", "testB")
TOPICS_FOLDER = "miracl"
CORPUS_FOLDER = "miracl-corpus"
CORPUS_REPO = "miracl/miracl-corpus"
PASSAGE_TEXTS = ("title_text", "text")
SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")
DOCID = re.compile(r"[^\s#]+#\d+")

# sha256 of the dev topics and qrels (anserini-tools @5b819c1a): results are on the published benchmark.
DEV_SHA256: dict[str, tuple[str, str]] = {
    "ar": ("10b534b889ec46e23df478eee09410ef2880d90d419644dfed5d05d39b57ece0",
           "3670a7804dedd5a602dad0661f6adb1e65b197829d5571f428e0af7fc46aa313"),
    "bn": ("46fbf50f1f3972b6908543bad6b6dfc60a75eec80d54aae603efd884ba608d2f",
           "0aab3bcb0bbc5d3e5ed1566a9e3965800239438b5b5f68d5b6bb4acb7f0fec0e"),
    "de": ("6b66ec2cfb4af383e6fe18a08899bfa3a0deeb5e6010758743fa93ab598321c9",
           "5d4a0d7ac42c7839a0513ba6deb6b27fc62803f318be8a7c411e10dbbde7578c"),
    "en": ("25d9e6d17656674fd7aa3b67ee912c71545e664a842b147bfc17e9ff391db3da",
           "a0af836c300e85088c4d73449492e2378280f967cac032853c9e11f3bc8a8d81"),
    "es": ("5e93b5a1cea22a44912e6ad242147c58719dd8ce4bb6304264a53876b70e65ac",
           "2d9441de1e25d7d2faf54f757db618ad5a2927337862a367f1a60e87ef7e40b2"),
    "fa": ("df0ece36ab8048f765aa0bb2dde948f5c764cc25bdfc09fb1f5317ef24ff8b49",
           "3cec8ea8fb1f056110e5282df3aa37e14fb5f44c6f885528b6072c0243c1efc4"),
    "fi": ("71766986e9bef80118d60b989bdbd3ed965a845db6986847cbfd791fa00990b3",
           "4e534e96878729bd2566233d7499c991463052d91d34738dfe84d79f110255cd"),
    "fr": ("dd471f3a0a594d212b30495f8b1d9759451aea399b44e02de6ca9c5550930106",
           "823e8f6fd297064d67efe37991cd3953414dc040c290f249b0895925f03509ad"),
    "hi": ("94bed8e649806246f59edfb6434ea0c59920a44f2f60a56e01d205c6bf58ef60",
           "4cec99e7012ffca7fd129eeea01f37984bb21702706a8398208e8fba1c14e963"),
    "id": ("c5d9d5de2913beeb003ee0ef63e4537c2f632940ed077bfb2e9e8a3b5943096d",
           "6270863499b1be946be0883e8815b52ffb21e56181e9dc67596eaeb61494a61c"),
    "ja": ("1904b9bf0fc52e1b684daa7539b2bcfdd90122e603ffbcf6b5065a0e210525b0",
           "1e2a60ba96b889bd076adea950e7e83a2d083f671955a5ab3e9bdc332b492e5f"),
    "ko": ("a365552cfc997a8915e948a3b5994883f641e7c3f12b6af87bbfaf89729e32a8",
           "88827ccc5b64e531b25f70eef30202d33daa9bfa3ac8cceadf5cdbd5ca5034df"),
    "ru": ("91a7c3b6d21f79a12b5330f0a62811962f9370a0bf539cba8b3fecaa095f0616",
           "f877b43c7f53b76aab25e406e5a607ef1c5adba4ffaa11e1b252a4326735a19b"),
    "sw": ("15cde3f614cb75b3106fb4606a16162140ee157da22c4a57aae756571788b722",
           "a1e6438ac732dabd9a24fd5c8dfc0c64168aea81ff477d8b1986fde5ad193a63"),
    "te": ("3ac8a9a20bdf93ffcc36d554a5fff76ec4435131ae995010814df5881fff07d6",
           "576a7ded402697a7bb521b4b8bb1a27806b927556001450405d3a5b85590a0c9"),
    "th": ("6ef23316d1224d9fef9e3f8bc2fdf527dad1a3bba98657617398c226503f5a46",
           "81097e891775f67a9b98d41309f9c452dc4e09572b0cbf4952d4107ed0fe1407"),
    "yo": ("b24558e43e1965d5cfe7440a5bf3bf66d70529474ff76e64bfa72026129b2d2e",
           "39a219ef0b593f6056e4ad1d65b9c03345730efa5107f0abd4a4a44ef2f6f0d2"),
    "zh": ("5b284a9aabf08bb2d1c88ed7ea276025c9d23846457c5350dc8d391b5e0d0a13",
           "5546474d3dc8139014e6571e9f4041848bb0a314ca6d2d4bac708174d71c59eb"),
}


class MiraclFormatError(ValueError):
    """A topics, qrels or corpus file that cannot be read; the message names the file, the line and the field."""


def check_languages(languages: Sequence[str] | str | None, option: str = "dataset.languages") -> list[str]:
    """The languages asked for (all 18 when None), in the order given; an error names an unknown code."""
    chosen, unknown, repeated = sort_out_languages(languages, LANGUAGES)
    if chosen is None:
        return list(LANGUAGES)
    if not chosen:
        raise BadValue(f"{option}=[]: expected null (all) or some of {list(LANGUAGES)}")
    if unknown:
        raise BadValue(f"{option}: {unknown} not in MIRACL; its languages are {list(LANGUAGES)}")
    if repeated:
        raise BadValue(f"{option}: {repeated} given more than once")
    return chosen


# ------------------------------------------------------------------------------------------ topics and qrels


def topics_filename(language: str, split: str = "dev") -> str:
    return f"topics.miracl-v1.0-{language}-{split}.tsv"


def qrels_filename(language: str, split: str = "dev") -> str:
    return f"qrels.miracl-v1.0-{language}-{split}.tsv"


def read_topics(path: str | Path) -> dict[str, str]:
    """``qid<TAB>query`` lines as qid -> query, in file order."""
    path = Path(path)
    topics: dict[str, str] = {}
    for number, line in _lines(path):
        columns = line.split("\t")
        if len(columns) != 2:
            raise MiraclFormatError(f"{path} line {number}: expected 2 tab-separated columns 'qid<TAB>query', got "
                                    f"{len(columns)} ({line[:80]!r})")
        qid, text = columns[0].strip(), columns[1].strip()
        if not qid or any(c.isspace() for c in qid):
            raise MiraclFormatError(f"{path} line {number}: qid {qid!r} is empty or holds whitespace")
        if not text:
            raise MiraclFormatError(f"{path} line {number}: topic {qid!r} has an empty query")
        if qid in topics:
            raise MiraclFormatError(f"{path} line {number}: topic {qid!r} appears twice")
        topics[qid] = text
    if not topics:
        raise MiraclFormatError(f"{path}: no topics; expected 'qid<TAB>query' lines")
    return topics


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``qid Q0 docid rel`` lines (tabs or spaces) as qid -> docid -> rel; docids must be ``<doc>#<passage>``."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _lines(path):
        columns = line.split()
        if len(columns) != 4:
            raise MiraclFormatError(f"{path} line {number}: expected 4 columns 'qid Q0 docid rel', got "
                                    f"{len(columns)} ({line[:80]!r})")
        qid, _, docid, rel = columns
        if not DOCID.fullmatch(docid):
            raise MiraclFormatError(f"{path} line {number}: docid {docid!r} is not '<doc>#<passage>' (MIRACL "
                                    "passage ids are '<wikipedia id>#<passage number>', e.g. '32589#0')")
        try:
            value = int(rel)
        except ValueError:
            raise MiraclFormatError(f"{path} line {number}: relevance {rel!r} is not an integer") from None
        judged = qrels.setdefault(qid, {})
        if docid in judged and judged[docid] != value:
            raise MiraclFormatError(f"{path} line {number}: {qid} {docid} judged {judged[docid]} and {value}")
        judged[docid] = value
    if not qrels:
        raise MiraclFormatError(f"{path}: no judgments; expected 'qid Q0 docid rel' lines")
    return qrels


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based numbers; a clear error for a file that is not UTF-8 text."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as err:
        raise MiraclFormatError(f"{path}: not UTF-8 text ({err})") from err


def _topics_dir_in(base: Path) -> Path | None:
    if (base / TOPICS_FOLDER).is_dir():
        return base / TOPICS_FOLDER
    if any(base.glob("topics.miracl-v1.0-*.tsv")):
        return base
    return None


def find_topics_dir(root: str | os.PathLike[str] | None, languages: Sequence[str], split: str = "dev") -> Path:
    """The folder with the topics and qrels of `languages` (module docstring: where it is looked up)."""
    needed = [name for x in languages for name in (topics_filename(x, split), qrels_filename(x, split))]
    hint = (f"Set dataset.root to the folder holding {TOPICS_FOLDER}/ (or {TOPICS_FOLDER}/ itself), or export "
            f"{DATA_ENV}; the files are topics/ and qrels/ *.miracl-v1.0-<lang>-{split}.tsv of castorini/anserini-tools")
    if root is not None and str(root) != "":
        base = Path(root).expanduser()
        folder = _topics_dir_in(base) if base.is_dir() else None
        if folder is None:
            raise DataNotFoundError(f"dataset.root={str(root)!r} holds no {TOPICS_FOLDER}/ folder and no MIRACL "
                                    f"topics files. {hint}")
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise DataNotFoundError(f"dataset.root={str(root)!r}: missing {', '.join(missing)} in {folder}. {hint}")
        return folder
    looked = []
    for label, base in ((f"${DATA_ENV}", os.environ.get(DATA_ENV)), ("cache", str(default_cache_dir()))):
        if not base:
            looked.append(f"{label} (not set)")
            continue
        folder = _topics_dir_in(Path(base).expanduser()) if Path(base).expanduser().is_dir() else None
        if folder is None:
            looked.append(f"{label}={base} (no {TOPICS_FOLDER}/)")
            continue
        missing = [n for n in needed if not (folder / n).is_file()]
        if not missing:
            return folder
        looked.append(f"{folder} (missing {', '.join(missing)})")
    raise DataNotFoundError(f"MIRACL topics and qrels not found. Looked at: {'; '.join(looked)}. {hint}")


def _verify(path: Path, expected: str) -> None:
    stat = path.stat()
    actual = cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if actual != expected:
        raise DataChecksumError(f"{path}: sha256 is {actual}, expected {expected} (edited or another version of "
                                f"the MIRACL v1.0 dev file). Set {VERIFY_ENV}=0 to use an edited copy.")


@dataclass
class MiraclLanguage:
    """One language's topics (qid -> query, file order) and judgments (qid -> docid -> rel) of the kept topics."""

    language: str
    topics: dict[str, str]
    qrels: dict[str, dict[str, int]]
    dropped: int = 0  # topics without any relevant judgment (not scored)
    source: dict[str, str] = field(default_factory=dict)

    def judged_docids(self) -> set[str]:
        return {d for judged in self.qrels.values() for d in judged}


def load_language(language: str, root: str | os.PathLike[str] | None = None, split: str = "dev",
                  max_topics: int | None = None, verify: bool | None = None) -> MiraclLanguage:
    """Topics and qrels of one language, checked against each other; `max_topics` keeps the first N topics (file
    order) that have a relevant judgment."""
    check_languages([language])
    if split not in SPLITS:
        raise BadValue(f"dataset.split={split!r}: expected one of {SPLITS}")
    folder = find_topics_dir(root, [language], split)
    topics_path, qrels_path = folder / topics_filename(language, split), folder / qrels_filename(language, split)
    if split == "dev" and verify_enabled(verify):
        _verify(topics_path, DEV_SHA256[language][0])
        _verify(qrels_path, DEV_SHA256[language][1])
    topics, qrels = read_topics(topics_path), read_qrels(qrels_path)
    unknown = sorted(set(qrels) - set(topics))
    if unknown:
        raise MiraclFormatError(f"{qrels_path}: judgments for {len(unknown)} topic(s) missing from {topics_path} "
                                f"(e.g. {unknown[:3]}); are the two files of the same language and split?")
    scored = [q for q in topics if any(rel >= 1 for rel in qrels.get(q, {}).values())]
    dropped = len(topics) - len(scored)
    if max_topics is not None:
        scored = scored[:max_topics]
    return MiraclLanguage(language, {q: topics[q] for q in scored}, {q: dict(qrels[q]) for q in scored}, dropped,
                          {"topics": str(topics_path), "qrels": str(qrels_path)})


# -------------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Passage:
    docid: str
    title: str
    text: str


def passage_text(passage: Passage, how: str = "title_text") -> str:
    """The text a passage is encoded as: ``"<title> <text>"`` (as MIRACL's dense baselines encode it) or the text."""
    if how == "text" or not passage.title:
        return passage.text
    return f"{passage.title} {passage.text}"


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def corpus_shards(folder: str | Path) -> list[Path]:
    """A corpus folder's ``*.jsonl`` / ``*.jsonl.gz`` shards in natural order; any other file is an error (a
    shard in another format would otherwise be skipped silently). Hidden files and ``*.md`` are ignored."""
    folder = Path(folder)
    shards, others = [], []
    for path in sorted(folder.iterdir(), key=_natural_key):
        if path.name.startswith(".") or path.suffix == ".md" or path.is_dir():
            continue
        (shards if path.name.endswith(SHARD_SUFFIXES) else others).append(path)
    if others:
        raise MiraclFormatError(f"corpus folder {folder}: {[p.name for p in others[:5]]} are not JSONL shards; "
                                f"expected only *.jsonl or *.jsonl.gz files of {{docid, title, text}} lines")
    if not shards:
        raise MiraclFormatError(f"corpus folder {folder} holds no *.jsonl or *.jsonl.gz shards")
    return shards


def _shard_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
            yield from handle
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise MiraclFormatError(f"corpus shard {path}: cannot be read as {'gzip ' if path.suffix == '.gz' else ''}"
                                f"JSONL ({err})") from err
    except UnicodeDecodeError as err:
        raise MiraclFormatError(f"corpus shard {path}: not UTF-8 JSONL ({err})") from err


def iter_passages(shards: Iterable[Path]) -> Iterator[Passage]:
    """Every passage of the shards, in order; an error names the shard, line and field of a bad line."""
    for path in shards:
        records = json_objects(_shard_lines(path), lambda number: f"corpus shard {path} line {number}",
                               MiraclFormatError, "a JSON object with docid, title and text")
        for _, where, record in records:
            for name in ("docid", "text"):
                if not isinstance(record.get(name), str) or not record[name].strip():
                    raise MiraclFormatError(f"{where}: field {name!r} is {record.get(name)!r:.60}; expected a "
                                            "non-empty string")
            docid, title = record["docid"], record.get("title") or ""
            if any(c.isspace() for c in docid):
                raise MiraclFormatError(f"{where}: docid {docid!r} holds whitespace")
            if not isinstance(title, str):
                raise MiraclFormatError(f"{where}: field 'title' is {title!r:.60}; expected a string")
            yield Passage(docid, title, record["text"])


def check_corpus_shards(folder: Path) -> list[Path]:
    """The shards of `folder`, with the first passage read: a corpus in the wrong format fails in milliseconds."""
    shards = corpus_shards(folder)
    next(iter_passages(shards[:1]), None)
    return shards


def select_passages(shards: Sequence[Path], judged: set[str], max_others: int | None) -> Iterator[Passage]:
    """The corpus, or with `max_others` its judged passages plus the first `max_others` others (corpus order);
    stops reading once both are complete. A docid seen twice is an error (it would be retrieved twice)."""
    seen: set[str] = set()
    others = 0
    found_judged = 0
    for passage in iter_passages(shards):
        if passage.docid in seen:
            raise MiraclFormatError(f"corpus: docid {passage.docid!r} appears twice")
        is_judged = passage.docid in judged
        if max_others is not None and not is_judged:
            if others >= max_others:
                continue
            others += 1
        seen.add(passage.docid)
        found_judged += is_judged
        yield passage
        if max_others is not None and others >= max_others and found_judged == len(judged):
            return


def _corpus_dir_in(base: Path, language: str) -> Path | None:
    for name in (f"{CORPUS_FOLDER}-v1.0-{language}", language):
        if (base / name).is_dir():
            return base / name
    return None


def download_command(language: str, target: str = "<dir>") -> str:
    return (f"hf download {CORPUS_REPO} --repo-type dataset --include 'miracl-corpus-v1.0-{language}/*' "
            f"--local-dir {target}")


def corpus_dir(language: str, corpus_root: str | os.PathLike[str] | None = None, download: bool | None = None
               ) -> Path:
    """The folder of `language`'s corpus shards (module docstring: the lookup order)."""
    check_languages([language])
    layout = f"miracl-corpus-v1.0-{language}/ (or {language}/) of *.jsonl.gz shards"
    if corpus_root is not None and str(corpus_root) != "":
        base = Path(corpus_root).expanduser()
        folder = _corpus_dir_in(base, language) if base.is_dir() else None
        if folder is None:
            what = "is not a directory" if not base.is_dir() else f"holds no {layout}"
            raise DataNotFoundError(f"dataset.corpus_root={str(corpus_root)!r} {what}. Download the {language} "
                                    f"corpus with `{download_command(language, str(base))}`")
        return folder
    looked = []
    env = os.environ.get(DATA_ENV)
    bases = ([(f"${DATA_ENV}/{CORPUS_FOLDER}", Path(env).expanduser() / CORPUS_FOLDER)] if env else [])
    cache = default_cache_dir() / CORPUS_FOLDER
    bases.append(("cache", cache))
    for label, base in bases:
        folder = _corpus_dir_in(base, language)
        if folder is not None:
            return folder
        looked.append(f"{label} ({base})")
    no_network = offline() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    allowed = (not no_network) if download is None else download
    if allowed:
        try:
            return _download_corpus(language, cache)
        except Exception as err:  # noqa: BLE001 - every hub failure becomes the one actionable error below
            looked.append(f"hub {CORPUS_REPO} ({type(err).__name__}: {' '.join(str(err).split())[:200]})")
    else:
        looked.append("hub download (off: HYBRID_RETRIEVAL_OFFLINE or HF_HUB_OFFLINE is set)")
    raise DataNotFoundError(
        f"MIRACL corpus for {language!r} not found (it is only on the Hugging Face hub, {CORPUS_REPO}"
        f"{_size_hint(language)}). Looked at: {'; '.join(looked)}. "
        f"Download it with `{download_command(language, '<dir>')}` and pass dataset.corpus_root=<dir>, or put it "
        f"at ${DATA_ENV}/{CORPUS_FOLDER}/miracl-corpus-v1.0-{language}/")


# Shards per language on the hub (docs-<i>.jsonl.gz, up to about 100 MB each; from the repository's loading
# script), so the error says what a download costs. de and yo were added later.
CORPUS_SHARDS = {"ar": 5, "bn": 1, "en": 66, "es": 21, "fa": 5, "fi": 4, "fr": 30, "hi": 2, "id": 3, "ja": 14,
                 "ko": 3, "ru": 20, "sw": 1, "te": 2, "th": 2, "zh": 10}


def _size_hint(language: str) -> str:
    count = CORPUS_SHARDS.get(language)
    return f": {count} gzipped shard{'s' if count > 1 else ''} of up to about 100 MB" if count else ""


def _download_corpus(language: str, cache: Path) -> Path:
    """The language's shards from the hub into the cache, laid out as on the hub."""
    from huggingface_hub import snapshot_download

    snapshot_download(CORPUS_REPO, repo_type="dataset", allow_patterns=[f"miracl-corpus-v1.0-{language}/*"],
                      local_dir=str(cache))
    folder = _corpus_dir_in(cache, language)
    if folder is None:
        raise DataNotFoundError(f"the hub download of {CORPUS_REPO} held no miracl-corpus-v1.0-{language}/")
    return folder


def corpus_signature(shards: Sequence[Path]) -> list[list[object]]:
    """Names and sizes of the shards: part of an encoding's config, so a changed corpus is not resumed."""
    return [[p.name, p.stat().st_size] for p in shards]
