"""FAISS top-k retrieval over embeddings: ranked lists people read, and passage search with saved indexes.

The protocol's metrics need ranks over the full ranking and come from :mod:`hybrid_retrieval.evaluation.ranks`;
:class:`CandidateIndex` answers "what did the model retrieve first" with an exact inner-product index.
:class:`PassageIndex` is the search side (``python -m hybrid_retrieval.search``): an index chosen by config
(``conf/index/``: exact ``flat``, graph ``hnsw``, inverted-file ``ivf``, or any FAISS factory string), always on
inner product, saved and loaded with its passage ids and a manifest; plus TREC run / JSONL writers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np


class CandidateIndex:
    """Exact inner-product index (``faiss.IndexFlatIP``) over candidate embeddings."""

    def __init__(self, candidate_emb: np.ndarray) -> None:
        candidate_emb = np.ascontiguousarray(candidate_emb, dtype=np.float32)
        if candidate_emb.ndim != 2:
            raise ValueError(f"candidate embeddings must be 2-D, got shape {candidate_emb.shape}")
        self.index = faiss.IndexFlatIP(candidate_emb.shape[1])
        self.index.add(candidate_emb)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, candidate indices) per query, best first."""
        query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
        return self.index.search(query_emb, min(k, len(self)))


def write_rankings(path: str | Path, split: Any, query_emb: np.ndarray, candidate_emb: np.ndarray,
                   k: int = 10) -> Path:
    """One JSON line per query: its text, language and the top-``k`` multilingual candidates (relevant flagged)."""
    scores, ids = CandidateIndex(candidate_emb).search(query_emb, k)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, query in enumerate(split.queries):
            relevant = set(int(c) for c in split.relevant[i])
            hits = [{"candidate": split.candidates[c].id, "language": split.candidates[c].language,
                     "score": round(float(s), 6), "relevant": int(c) in relevant,
                     "text": split.candidates[c].sentence}
                    for s, c in zip(scores[i], ids[i]) if c >= 0]
            out.write(json.dumps({"query": query.id, "language": query.language, "text": query.text,
                                  "top": hits}, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------ passage search

INDEX_TYPES = ("flat", "hnsw", "ivf")
INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.txt", "manifest.json"
MANIFEST_FORMAT = 1
# Keys each index type takes in conf/index/<type>.yaml (besides `type` and `factory`).
INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    "ivf": {"nlist": None, "nprobe": 16, "train_size": None, "seed": 0},
}


class IndexConfigError(ValueError):
    """An index config FAISS cannot build for these passages; the message names the option (``index.*``)."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def default_nlist(count: int) -> int:
    """IVF lists for `count` passages when ``index.nlist`` is null: about 4·√n (FAISS's rule of thumb), at
    least 1, and small enough that every list gets about 39 training points, as FAISS asks."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39 or 1))


def resolve_index_spec(spec: Mapping[str, Any] | None, count: int | None = None, dim: int | None = None
                       ) -> dict[str, Any]:
    """Check an index config (``conf/index/*.yaml``) and fill it in; the FAISS factory string is under ``factory``.

    With `count` (passages) the IVF list count is resolved and checked against it; with `dim` FAISS is asked to
    build the (empty) index, so a factory string it cannot build fails here, before any encoding.
    Raises :class:`IndexConfigError` naming the option.
    """
    spec = dict(spec or {"type": "flat"})
    kind = spec.get("type")
    if kind not in INDEX_TYPES:
        raise IndexConfigError(f"index.type={kind!r}: expected one of {INDEX_TYPES} (index=flat|hnsw|ivf)")
    allowed = {"type", "factory", *INDEX_PARAMS[kind]}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise IndexConfigError(f"index: unknown keys {unknown} for index.type={kind!r}; allowed: {sorted(allowed)}")
    resolved: dict[str, Any] = {"type": kind, **INDEX_PARAMS[kind], **spec}
    for key, value in resolved.items():
        if key in ("type", "factory", "nlist", "train_size", "seed"):
            continue
        if not _positive_int(value):
            raise IndexConfigError(f"index.{key}={value!r}: expected a positive integer")
    if kind == "ivf":
        for key in ("nlist", "train_size"):
            if resolved[key] is not None and not _positive_int(resolved[key]):
                raise IndexConfigError(f"index.{key}={resolved[key]!r}: expected null or a positive integer")
        if not isinstance(resolved["seed"], int):
            raise IndexConfigError(f"index.seed={resolved['seed']!r}: expected an integer")
        if count is not None:
            if resolved["nlist"] is None:
                resolved["nlist"] = default_nlist(count)
            training = count if resolved["train_size"] is None else min(count, resolved["train_size"])
            if resolved["nlist"] > training:
                raise IndexConfigError(
                    f"index.nlist={resolved['nlist']} is larger than the {training} passages the IVF index is "
                    f"trained on ({count} passages, index.train_size={resolved['train_size']}): k-means needs at "
                    "least one point per list. Lower index.nlist (null picks about 4·√n), or use index=flat")
    factory = resolved.get("factory")
    if factory is None:
        if kind == "flat":
            factory = "Flat"
        elif kind == "hnsw":
            factory = f"HNSW{resolved['M']},Flat"
        elif resolved["nlist"] is not None:
            factory = f"IVF{resolved['nlist']},Flat"
    elif not isinstance(factory, str) or not factory.strip():
        raise IndexConfigError(f"index.factory={factory!r}: expected null or a FAISS index_factory string, e.g. "
                               "'IVF256,PQ32'")
    resolved["factory"] = factory
    if dim is not None and factory is not None:
        _new_index(factory, dim)
    return resolved


def _new_index(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[-300:]
        raise IndexConfigError(f"index.factory={factory!r}: FAISS cannot build this index for {dim}-dimensional "
                               f"embeddings with inner product ({detail})") from err


def _apply_search_params(index: faiss.Index, spec: Mapping[str, Any]) -> None:
    params = faiss.ParameterSpace()
    if "nprobe" in spec and faiss.try_extract_index_ivf(index) is not None:
        params.set_index_parameter(index, "nprobe", int(spec["nprobe"]))
    hnsw = _hnsw(index)
    if hnsw is not None and "ef_search" in spec:
        hnsw.hnsw.efSearch = int(spec["ef_search"])


def _hnsw(index: faiss.Index) -> Any:
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


@dataclass
class PassageIndex:
    """A FAISS inner-product index over passage embeddings, with the passages' ids (row i is ``ids[i]``)."""

    index: faiss.Index
    ids: list[str]
    spec: dict[str, Any]
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (e.g. where passages came from)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` (scores, passage rows) per query, best first; rows are -1 where an approximate index found
        fewer than `k` passages."""
        query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
        if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
            raise ValueError(f"query embeddings have shape {query_emb.shape}; the index expects (n, {self.dim})")
        if not _positive_int(k):
            raise ValueError(f"top_k={k!r}: expected a positive integer")
        k = min(k, len(self))
        if len(query_emb) == 0 or k == 0:
            return np.empty((len(query_emb), k), np.float32), np.empty((len(query_emb), k), np.int64)
        return self.index.search(query_emb, k)


def build_index(embeddings: np.ndarray, spec: Mapping[str, Any] | None = None, ids: Sequence[str] | None = None,
                model: str | None = None, extra: Mapping[str, Any] | None = None) -> PassageIndex:
    """Build the index `spec` describes (see :func:`resolve_index_spec`) over `embeddings` (n, dim).

    IVF indexes are trained on all passages, or on ``index.train_size`` of them drawn with ``index.seed``.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"passage embeddings must be a non-empty 2-D array, got shape {embeddings.shape}")
    ids = [str(i) for i in range(len(embeddings))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} passage embeddings")
    resolved = resolve_index_spec(spec, count=len(embeddings))
    index = _new_index(resolved["factory"], embeddings.shape[1])
    hnsw = _hnsw(index)
    if hnsw is not None and "ef_construction" in resolved:
        hnsw.hnsw.efConstruction = int(resolved["ef_construction"])  # only takes effect before adding
    if not index.is_trained:
        sample = embeddings
        size = resolved.get("train_size")
        if size is not None and size < len(embeddings):
            rows = np.random.default_rng(resolved.get("seed", 0)).choice(len(embeddings), size, replace=False)
            sample = embeddings[np.sort(rows)]
        try:
            index.train(sample)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[-300:]
            raise IndexConfigError(f"index.factory={resolved['factory']!r}: training on {len(sample)} passages "
                                   f"failed ({detail})") from err
    index.add(embeddings)
    _apply_search_params(index, resolved)
    return PassageIndex(index=index, ids=ids, spec=resolved, model=model, extra=dict(extra or {}))


def save_index(index: PassageIndex, folder: str | Path) -> Path:
    """Write ``index.faiss``, ``ids.txt`` (one id a line) and ``manifest.json`` into `folder` (replaced whole,
    through a temporary sibling, so a reader never sees a half-written index)."""
    folder = Path(folder).expanduser().absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in index.ids), encoding="utf-8")
        manifest = {"format": MANIFEST_FORMAT, "spec": index.spec, "metric": "inner_product", "dim": index.dim,
                    "count": len(index), "model": index.model, "faiss": faiss.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **index.extra}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from other users
        old = None
        if folder.exists():  # moved aside, not deleted first: a crash in between keeps one whole index
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_manifest(folder: str | Path, option: str = "index_dir") -> dict[str, Any]:
    """The manifest of a saved index (cheap: for checks before loading or encoding anything)."""
    folder = Path(folder).expanduser()
    missing = [name for name in (INDEX_FILE, IDS_FILE, MANIFEST_FILE) if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(f"{option}={str(folder)!r} {what}; expected a folder written by save_index "
                                "(<output>/index of an earlier `python -m hybrid_retrieval.search`)")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / MANIFEST_FILE}: not valid JSON ({err})") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise ValueError(f"{folder / MANIFEST_FILE}: format {found!r} is not supported; expected {MANIFEST_FORMAT}")
    return manifest


def load_index(folder: str | Path, option: str = "index_dir") -> PassageIndex:
    """An index written by :func:`save_index`, with its search parameters (nprobe, efSearch) restored."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder, option)
    index = faiss.read_index(str(folder / INDEX_FILE))
    ids = (folder / IDS_FILE).read_text(encoding="utf-8").splitlines()
    if len(ids) != index.ntotal or index.d != manifest.get("dim"):
        raise ValueError(f"{option}={str(folder)!r} is inconsistent: {index.ntotal} vectors of dimension {index.d}, "
                         f"{len(ids)} ids, manifest says {manifest.get('count')} x {manifest.get('dim')}")
    spec = dict(manifest["spec"])
    _apply_search_params(index, spec)
    known = {"format", "spec", "metric", "dim", "count", "model", "faiss", "created"}
    return PassageIndex(index=index, ids=ids, spec=spec, model=manifest.get("model"),
                        extra={k: v for k, v in manifest.items() if k not in known})


def write_trec_run(path: str | Path, query_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray,
                   passage_ids: Sequence[str], tag: str) -> Path:
    """TREC run file: ``qid Q0 docid rank score tag`` per hit, ranks from 1 in score order."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r}: expected a non-empty string without whitespace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for qid, query_scores, query_rows in zip(query_ids, scores, rows):
            rank = 0
            for score, row in zip(query_scores, query_rows):
                if row < 0:
                    continue
                rank += 1
                out.write(f"{qid} Q0 {passage_ids[row]} {rank} {float(score):.8f} {tag}\n")
    return path


def write_search_results(path: str | Path, query_ids: Sequence[str], query_texts: Sequence[str],
                         scores: np.ndarray, rows: np.ndarray, passage_ids: Sequence[str]) -> Path:
    """One JSON line per query: ``{"id", "text", "hits": [{"id", "score", "rank"}]}``, best hit first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for qid, text, query_scores, query_rows in zip(query_ids, query_texts, scores, rows):
            hits = [{"id": passage_ids[r], "score": round(float(s), 6), "rank": i + 1}
                    for i, (s, r) in enumerate((s, r) for s, r in zip(query_scores, query_rows) if r >= 0)]
            out.write(json.dumps({"id": qid, "text": text, "hits": hits}, ensure_ascii=False) + "\n")
    return path
