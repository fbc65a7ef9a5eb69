"""FAISS top-k retrieval over embeddings: ranked lists people read, and passage search with saved indexes.

The protocol's metrics need ranks over the full ranking and come from :mod:`hybrid_retrieval.evaluation.ranks`;
:class:`CandidateIndex` answers "what did the model retrieve first" with an exact inner-product index.
:class:`PassageIndex` is the search side (``python -m hybrid_retrieval.search``): an index chosen by config
(``conf/index/``: exact ``flat``, graph ``hnsw``, inverted-file ``ivf``, or any FAISS factory string), always on
inner product, saved and loaded with its passage ids and a manifest; plus TREC run / JSONL writers.

For corpora beyond memory: ``ivfpq`` (IVF lists of product-quantised codes, trained on a sample, optionally
re-scoring its top candidates exactly from the embeddings on disk with ``index.rerank``), ``index.shard_size``
(several indexes over consecutive row ranges, searched together and merged by score), and building straight from
the memory-mapped shards of :mod:`hybrid_retrieval.evaluation.corpus`, block by block.
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

from hybrid_retrieval.config_error import BadValue, MissingPath, positive_int


class CandidateIndex:
    """Exact inner-product index (``faiss.IndexFlatIP``) over candidate embeddings."""

    def __init__(self, candidate_emb: np.ndarray) -> None:
        candidate_emb = np.ascontiguousarray(candidate_emb, dtype=np.float32)
        if candidate_emb.ndim != 2:
            raise BadValue(f"candidate embeddings must be 2-D, got shape {candidate_emb.shape}")
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

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.txt", "manifest.json"
PART_FILE = "index-{:05d}.faiss"  # the parts of a sharded index
MANIFEST_FORMAT = 1
# Keys each index type takes in conf/index/<type>.yaml (besides `type`, `factory` and `shard_size`).
INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    "ivf": {"nlist": None, "nprobe": 16, "train_size": None, "seed": 0},
    # IVF lists of product-quantised codes: m bytes a vector (nbits=8) instead of 4·dim; trained on a sample.
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": 32, "train_size": None, "seed": 0, "rerank": 0},
}
COMMON_KEYS = ("type", "factory", "shard_size")
TRAIN_PER_LIST = 40  # ivfpq's default sample: FAISS asks for at least 39 training points per list
# PQ code books are trained on at most this many points per code word (16,384 for nbits=8, above FAISS's minimum
# of 39): FAISS's k-means in the 8-dimensional sub-spaces costs about 3 s per 1,000 points for 48 sub-quantisers on
# 2 cores, and more points barely move 256 centroids.
PQ_TRAIN_PER_CODE = 64


class IndexConfigError(ValueError):
    """An index config FAISS cannot build for these passages; the message names the option (``index.*``)."""


def default_nlist(count: int) -> int:
    """IVF lists for `count` passages when ``index.nlist`` is null: about 4·√n (FAISS's rule of thumb), at
    least 1, and small enough that every list gets about 39 training points, as FAISS asks."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39 or 1))


def resolve_index_spec(spec: Mapping[str, Any] | None, count: int | None = None, dim: int | None = None
                       ) -> dict[str, Any]:
    """Check an index config (``conf/index/*.yaml``) and fill it in; the FAISS factory string is under ``factory``.

    With `count` (passages) the IVF list count and training sample are resolved and checked against it; with `dim`
    FAISS is asked to build the (empty) index, so a factory string it cannot build fails here, before any encoding.
    ``shard_size`` (any type; null = one index) splits the passages over several indexes of that many passages
    each, searched together. Raises :class:`IndexConfigError` naming the option.
    """
    spec = dict(spec or {"type": "flat"})
    kind = spec.get("type")
    if kind not in INDEX_TYPES:
        raise IndexConfigError(f"index.type={kind!r}: expected one of {INDEX_TYPES} (index=flat|hnsw|ivf|ivfpq)")
    allowed = {*COMMON_KEYS, *INDEX_PARAMS[kind]}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise IndexConfigError(f"index: unknown keys {unknown} for index.type={kind!r}; allowed: {sorted(allowed)}")
    resolved: dict[str, Any] = {"type": kind, **INDEX_PARAMS[kind], **spec}
    nullable = {"nlist", "train_size", "m", "shard_size"}
    for key, value in resolved.items():
        if key in ("type", "factory", "seed", "rerank"):
            continue
        if key in nullable:
            if value is not None and not positive_int(value):
                raise IndexConfigError(f"index.{key}={value!r}: expected null or a positive integer")
        elif not positive_int(value):
            raise IndexConfigError(f"index.{key}={value!r}: expected a positive integer")
    if "seed" in resolved and (isinstance(resolved["seed"], bool) or not isinstance(resolved["seed"], int)):
        raise IndexConfigError(f"index.seed={resolved['seed']!r}: expected an integer")
    if "rerank" in resolved and (isinstance(resolved["rerank"], bool) or not isinstance(resolved["rerank"], int)
                                 or resolved["rerank"] < 0):
        raise IndexConfigError(f"index.rerank={resolved['rerank']!r}: expected 0 (off) or the number of candidates "
                               "to re-score exactly")
    if kind == "ivfpq":
        if resolved["nbits"] > 16:
            raise IndexConfigError(f"index.nbits={resolved['nbits']}: expected at most 16 bits per code")
        if dim is not None and resolved["m"] is None:
            if dim % 8:
                raise IndexConfigError(f"index.m=null picks dim/8 sub-quantisers, but {dim} is not a multiple of "
                                       "8; set index.m to a divisor of the dimension")
            resolved["m"] = dim // 8
        if dim is not None and dim % resolved["m"]:
            raise IndexConfigError(f"index.m={resolved['m']}: must divide the embedding dimension {dim}")
    if kind in ("ivf", "ivfpq") and count is not None:
        if resolved["nlist"] is None:
            resolved["nlist"] = default_nlist(count)
        if kind == "ivfpq" and resolved["train_size"] is None:
            resolved["train_size"] = min(count, max(TRAIN_PER_LIST * resolved["nlist"],
                                                    TRAIN_PER_LIST * 2 ** resolved["nbits"]))
        training = count if resolved["train_size"] is None else min(count, resolved["train_size"])
        if resolved["nlist"] > training:
            raise IndexConfigError(
                f"index.nlist={resolved['nlist']} is larger than the {training} passages the IVF index is "
                f"trained on ({count} passages, index.train_size={resolved['train_size']}): k-means needs at "
                "least one point per list. Lower index.nlist (null picks about 4·√n), or use index=flat")
        if kind == "ivfpq" and 2 ** resolved["nbits"] > training:
            raise IndexConfigError(
                f"index.nbits={resolved['nbits']} needs at least {2 ** resolved['nbits']} training passages (one per "
                f"code word; FAISS asks for 39 each), but {training} are used ({count} passages, "
                f"index.train_size={resolved['train_size']}). Lower index.nbits, or use index=flat")
    factory = resolved.get("factory")
    if factory is None:
        if kind == "flat":
            factory = "Flat"
        elif kind == "hnsw":
            factory = f"HNSW{resolved['M']},Flat"
        elif kind == "ivf" and resolved["nlist"] is not None:
            factory = f"IVF{resolved['nlist']},Flat"
        elif kind == "ivfpq" and resolved["nlist"] is not None and resolved["m"] is not None:
            factory = f"IVF{resolved['nlist']},PQ{resolved['m']}x{resolved['nbits']}"
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


def _check_queries(query_emb: np.ndarray, dim: int, k: Any) -> np.ndarray:
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    if query_emb.ndim != 2 or query_emb.shape[1] != dim:
        raise BadValue(f"query embeddings have shape {query_emb.shape}; the index expects (n, {dim})")
    if not positive_int(k):
        raise BadValue(f"top_k={k!r}: expected a positive integer")
    return query_emb


def _rerank(query_emb: np.ndarray, rows: np.ndarray, vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate rows exactly (inner product with the stored embeddings), keep the top k.
    Order: score descending, then row ascending."""
    flat = rows[rows >= 0]
    unique, inverse = np.unique(flat, return_inverse=True)
    table = vectors.take(unique) if hasattr(vectors, "take") and not isinstance(vectors, np.ndarray) \
        else np.asarray(vectors[unique], dtype=np.float32)
    exact = np.full(rows.shape, -np.inf, dtype=np.float32)
    position = np.full(rows.shape, -1, dtype=np.int64)
    position[rows >= 0] = inverse
    for q in range(len(rows)):
        valid = position[q] >= 0
        exact[q, valid] = table[position[q, valid]] @ query_emb[q]
    return _top_k(exact, rows, k)


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each row of (scores, rows): score descending, ties by row ascending, missing (-1) last."""
    scores = np.where(rows >= 0, scores, -np.inf)
    big = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    order = np.lexsort((big, -scores.astype(np.float64)), axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_rows = np.take_along_axis(rows, order, axis=1)
    top_scores[top_rows < 0] = -np.finfo(np.float32).max  # what FAISS reports for a missing hit
    return top_scores, top_rows


@dataclass
class PassageIndex:
    """A FAISS inner-product index over passage embeddings, with the passages' ids (row i is ``ids[i]``).

    ``vectors`` (the embeddings, in memory or as :class:`~hybrid_retrieval.evaluation.corpus.EmbeddingShards`) are
    needed only by ``index.rerank``: the index's candidates are then re-scored exactly.
    """

    index: faiss.Index
    ids: list[str]
    spec: dict[str, Any]
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (e.g. where passages came from)
    vectors: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` (scores, passage rows) per query, best first; rows are -1 where an approximate index found
        fewer than `k` passages."""
        query_emb = _check_queries(query_emb, self.dim, k)
        k = min(k, len(self))
        if len(query_emb) == 0 or k == 0:
            return np.empty((len(query_emb), k), np.float32), np.empty((len(query_emb), k), np.int64)
        rerank = int(self.spec.get("rerank") or 0)
        if not rerank:
            return self.index.search(query_emb, k)
        if self.vectors is None:
            raise BadValue("index.rerank needs the passage embeddings: build the index from them, or load it "
                             "from a folder whose manifest names its embeddings")
        _, rows = self.index.search(query_emb, min(max(k, rerank), len(self)))
        return _rerank(query_emb, rows, self.vectors, k)


@dataclass
class ShardedIndex:
    """Several FAISS indexes over consecutive row ranges of one corpus (``index.shard_size`` passages each),
    searched together: each part's top k, merged by score (ties: lower row first). Same interface as
    :class:`PassageIndex`; rows are global."""

    parts: list[faiss.Index]
    starts: list[int]
    ids: list[str]
    spec: dict[str, Any]
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    vectors: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(sum(p.ntotal for p in self.parts))

    @property
    def dim(self) -> int:
        return int(self.parts[0].d)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        query_emb = _check_queries(query_emb, self.dim, k)
        k = min(k, len(self))
        if len(query_emb) == 0 or k == 0:
            return np.empty((len(query_emb), k), np.float32), np.empty((len(query_emb), k), np.int64)
        rerank = int(self.spec.get("rerank") or 0)
        if rerank and self.vectors is None:
            raise BadValue("index.rerank needs the passage embeddings: build the index from them, or load it "
                             "from a folder whose manifest names its embeddings")
        wanted = max(k, rerank)
        all_scores, all_rows = [], []
        for part, start in zip(self.parts, self.starts):
            scores, rows = part.search(query_emb, min(wanted, int(part.ntotal)))
            all_scores.append(scores)
            all_rows.append(np.where(rows >= 0, rows + start, -1))
        scores, rows = np.concatenate(all_scores, axis=1), np.concatenate(all_rows, axis=1)
        if rerank:
            _, rows = _top_k(scores, rows, min(wanted, rows.shape[1]))
            return _rerank(query_emb, rows, self.vectors, k)
        return _top_k(scores, rows, k)


def _limit_pq_training(index: faiss.Index) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None:
        pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CODE


class _ArraySource:
    """An in-memory embedding matrix seen like :class:`~hybrid_retrieval.evaluation.corpus.EmbeddingShards`."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = embeddings

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def blocks(self, rows: int = 65536) -> Any:
        for start in range(0, len(self.embeddings), rows):
            yield start, self.embeddings[start:start + rows]

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        if size >= len(self.embeddings):
            return self.embeddings
        rows = np.random.default_rng(seed).choice(len(self.embeddings), size, replace=False)
        return self.embeddings[np.sort(rows)]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.embeddings[rows]


def build_index(embeddings: Any, spec: Mapping[str, Any] | None = None, ids: Sequence[str] | None = None,
                model: str | None = None, extra: Mapping[str, Any] | None = None) -> PassageIndex | ShardedIndex:
    """Build the index `spec` describes (see :func:`resolve_index_spec`) over `embeddings`: an (n, dim) array, or
    :class:`~hybrid_retrieval.evaluation.corpus.EmbeddingShards` (read block by block from its memory maps; ids
    from its files unless given).

    IVF indexes are trained once, on all passages or on ``index.train_size`` of them drawn with ``index.seed``;
    with ``index.shard_size`` every part is a copy of that trained index (same lists and code books), filled with
    its own rows. A single part is a :class:`PassageIndex`, several a :class:`ShardedIndex`.
    """
    if isinstance(embeddings, np.ndarray) or not hasattr(embeddings, "blocks"):
        array = np.ascontiguousarray(embeddings, dtype=np.float32)
        if array.ndim != 2 or len(array) == 0:
            raise BadValue(f"passage embeddings must be a non-empty 2-D array, got shape {array.shape}")
        source: Any = _ArraySource(array)
    else:
        source = embeddings
        if len(source) == 0:
            raise BadValue(f"passage embeddings in {getattr(source, 'folder', '?')} are empty")
        if ids is None:
            ids = source.ids()
        # The manifest then says which embeddings the index belongs to (and where rerank reads them).
        extra = {"embeddings": str(Path(source.folder).resolve()), "embeddings_config_hash": source.config_hash,
                 **(extra or {})}
    count, dim = len(source), source.dim
    ids = [str(i) for i in range(count)] if ids is None else [str(i) for i in ids]
    if len(ids) != count:
        raise BadValue(f"{len(ids)} ids for {count} passage embeddings")
    resolved = resolve_index_spec(spec, count=count, dim=dim)
    template = _new_index(resolved["factory"], dim)
    _limit_pq_training(template)
    if not template.is_trained:
        size = resolved.get("train_size")
        sample = source.sample(count if size is None else min(size, count), resolved.get("seed", 0))
        try:
            template.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as err:
            detail = " ".join(str(err).split())[-300:]
            raise IndexConfigError(f"index.factory={resolved['factory']!r}: training on {len(sample)} passages "
                                   f"failed ({detail})") from err
    shard_size = resolved.get("shard_size") or count
    starts = list(range(0, count, shard_size))
    parts = [template if len(starts) == 1 else faiss.clone_index(template) for _ in starts]
    for part in parts:
        hnsw = _hnsw(part)
        if hnsw is not None and "ef_construction" in resolved:
            hnsw.hnsw.efConstruction = int(resolved["ef_construction"])  # only takes effect before adding
    for first, block in source.blocks():
        block = np.ascontiguousarray(block, dtype=np.float32)
        for p, start in enumerate(starts):  # a block may straddle parts
            lo, hi = max(first, start), min(first + len(block), start + shard_size)
            if lo < hi:
                parts[p].add(block[lo - first:hi - first])
    for part in parts:
        _apply_search_params(part, resolved)
    # Kept only for re-scoring: an in-memory copy held by the index would double its memory.
    vectors = (source.embeddings if isinstance(source, _ArraySource) else source) if resolved.get("rerank") else None
    if len(parts) == 1:
        return PassageIndex(index=parts[0], ids=ids, spec=resolved, model=model, extra=dict(extra or {}),
                            vectors=vectors)
    return ShardedIndex(parts=parts, starts=starts, ids=ids, spec=resolved, model=model, extra=dict(extra or {}),
                        vectors=vectors)


def save_index(index: PassageIndex | ShardedIndex, folder: str | Path) -> Path:
    """Write ``index.faiss`` (or ``index-00000.faiss``... for a sharded index), ``ids.txt`` (one id a line) and
    ``manifest.json`` into `folder` (replaced whole, through a temporary sibling, so a reader never sees a
    half-written index)."""
    folder = Path(folder).expanduser().absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "spec": index.spec, "metric": "inner_product",
                                    "dim": index.dim, "count": len(index), "model": index.model,
                                    "faiss": faiss.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if isinstance(index, ShardedIndex):
            manifest["parts"] = []
            for number, (part, start) in enumerate(zip(index.parts, index.starts)):
                faiss.write_index(part, str(tmp / PART_FILE.format(number)))
                manifest["parts"].append({"file": PART_FILE.format(number), "start": start, "count": part.ntotal})
        else:
            faiss.write_index(index.index, str(tmp / INDEX_FILE))
        (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in index.ids), encoding="utf-8")
        manifest.update(index.extra)
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
    missing = [name for name in (IDS_FILE, MANIFEST_FILE) if not (folder / name).is_file()]
    if folder.is_dir() and not (folder / INDEX_FILE).is_file() and not (folder / PART_FILE.format(0)).is_file():
        missing.insert(0, INDEX_FILE)
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise MissingPath(f"{option}={str(folder)!r} {what}; expected a folder written by save_index "
                                "(<output>/index of an earlier `python -m hybrid_retrieval.search`)")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadValue(f"{folder / MANIFEST_FILE}: not valid JSON ({err})") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise BadValue(f"{folder / MANIFEST_FILE}: format {found!r} is not supported; expected {MANIFEST_FORMAT}")
    return manifest


def load_index(folder: str | Path, option: str = "index_dir", vectors: Any = None) -> PassageIndex | ShardedIndex:
    """An index written by :func:`save_index`, with its search parameters (nprobe, efSearch) restored.

    An index with ``rerank`` needs its embeddings: `vectors`, else the folder its manifest names under
    ``embeddings`` (written by :mod:`hybrid_retrieval.evaluation.corpus`).
    """
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder, option)
    ids = (folder / IDS_FILE).read_text(encoding="utf-8").splitlines()
    spec = dict(manifest["spec"])
    known = {"format", "spec", "metric", "dim", "count", "model", "faiss", "created", "parts"}
    extra = {k: v for k, v in manifest.items() if k not in known}
    if spec.get("rerank") and vectors is None and manifest.get("embeddings"):
        from hybrid_retrieval.evaluation.corpus import open_embeddings

        vectors = open_embeddings(manifest["embeddings"], f"{option} (its manifest's embeddings)")
    if manifest.get("parts"):
        parts = [faiss.read_index(str(folder / entry["file"])) for entry in manifest["parts"]]
        index: PassageIndex | ShardedIndex = ShardedIndex(
            parts=parts, starts=[int(e["start"]) for e in manifest["parts"]], ids=ids, spec=spec,
            model=manifest.get("model"), extra=extra, vectors=vectors)
        dims = {p.d for p in parts}
    else:
        index = PassageIndex(index=faiss.read_index(str(folder / INDEX_FILE)), ids=ids, spec=spec,
                             model=manifest.get("model"), extra=extra, vectors=vectors)
        dims = {index.index.d}
    if len(ids) != len(index) or dims != {manifest.get("dim")}:
        raise BadValue(f"{option}={str(folder)!r} is inconsistent: {len(index)} vectors of dimension "
                         f"{sorted(dims)}, {len(ids)} ids, manifest says {manifest.get('count')} x {manifest.get('dim')}")
    for part in (index.parts if isinstance(index, ShardedIndex) else [index.index]):
        _apply_search_params(part, spec)
    return index


def write_trec_run(path: str | Path, query_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray,
                   passage_ids: Sequence[str], tag: str) -> Path:
    """TREC run file: ``qid Q0 docid rank score tag`` per hit, ranks from 1 in score order."""
    if not tag or any(c.isspace() for c in tag):
        raise BadValue(f"run tag {tag!r}: expected a non-empty string without whitespace")
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
