"""Corpus encoding for collections larger than memory: streamed, length-sorted, sharded, memory-mapped, resumable.

:func:`encode_corpus` reads (id, text) pairs from any iterator (e.g. JSONL shards on disk, one line at a time),
cuts them into chunks of ``shard_size`` texts, sorts each chunk by length (so batches carry little padding) and
writes each chunk's embeddings, in input order, as one shard of a folder:

- ``shard-00000.npy`` (float32, ``(count, dim)``, memory-mapped when read) and ``shard-00000.ids`` (one id a line);
- ``manifest.json``: model, config hash, dim, the shards with their counts and rows, total count, ``complete``.

A shard's files are written under temporary names and renamed, and the manifest (also replaced atomically) lists a
shard only once both are in place: a kill at any moment leaves a folder that the next call resumes from the first
unfinished shard, without re-encoding finished ones (it reads past their passages, checking that their ids are
still the same). The config hash covers everything that changes the embeddings (model and its weights, prefixes,
passage format, the corpus files, ``shard_size``); a folder of another config is refused, never mixed.
:class:`EmbeddingShards` reads a finished folder without loading it into memory. No torch, no Lightning here: the
caller passes an ``encode(texts) -> array`` function.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_retrieval.config_error import BadValue

__all__ = ["CorpusEncodingError", "EmbeddingShards", "config_hash", "encode_corpus", "encoder_fingerprint",
           "open_embeddings", "write_embedding_shards"]

MANIFEST = "manifest.json"
FORMAT = 1
PROGRESS_SLICE = 1024  # texts per encoder call inside a chunk: the progress bar moves at least this often


class CorpusEncodingError(ValueError):
    """An embeddings folder that cannot be used or resumed; the message names the option and folder."""


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-serialisable config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def encoder_fingerprint(encoder: Any) -> str:
    """Hash of an encoder's weights and text settings: two encoders with the same fingerprint embed alike.

    Hashes every parameter and buffer (about 0.5 s for multilingual-E5-small), so embeddings of another checkpoint
    of the same model are never resumed into.
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    settings = {k: getattr(encoder, k, None) for k in ("name", "pooling", "normalize", "prefixes", "max_lengths")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class EmbeddingShards:
    """A folder written by :func:`encode_corpus`: shards read as memory maps, ids on demand."""

    folder: Path
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    @property
    def config_hash(self) -> str:
        return str(self.manifest["config_hash"])

    def array(self, shard: int) -> np.ndarray:
        """Shard `shard`'s embeddings, memory-mapped read-only."""
        return np.load(self.folder / self.manifest["shards"][shard]["file"], mmap_mode="r")

    def shard_ids(self, shard: int) -> list[str]:
        return (self.folder / self.manifest["shards"][shard]["ids"]).read_text(encoding="utf-8").splitlines()

    def ids(self) -> list[str]:
        return [i for s in range(len(self.manifest["shards"])) for i in self.shard_ids(s)]

    def blocks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block of at most `rows` rows) over the whole corpus, read one block at a time."""
        for shard, entry in enumerate(self.manifest["shards"]):
            array = self.array(shard)
            for start in range(0, len(array), rows):
                yield entry["start"] + start, np.ascontiguousarray(array[start:start + rows], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by global index (any order, repeats allowed), read from the memory maps."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        starts = np.array([s["start"] for s in self.manifest["shards"]], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(which):
            mask = which == shard
            local = rows[mask] - starts[shard]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            out[np.flatnonzero(mask)[order]] = self.array(int(shard))[local[order]]
        return out

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` rows drawn without replacement (all rows when `size` >= len), e.g. to train IVF / PQ."""
        if size >= len(self):
            return np.concatenate([block for _, block in self.blocks()]) if len(self) else \
                np.empty((0, self.dim), np.float32)
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size, replace=False))
        return self.take(rows)

    def to_array(self) -> np.ndarray:
        """Everything in memory (small corpora only)."""
        return np.concatenate([block for _, block in self.blocks()]) if len(self) else \
            np.empty((0, self.dim), np.float32)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CorpusEncodingError(f"{path}: not valid JSON ({err}); delete the folder to start over") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusEncodingError(f"{path}: not an embeddings manifest of format {FORMAT}")
    return manifest


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def open_embeddings(folder: str | Path, option: str = "embeddings_dir") -> EmbeddingShards:
    """A complete folder written by :func:`encode_corpus`."""
    folder = Path(folder).expanduser()
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise CorpusEncodingError(f"{option}={str(folder)!r} holds no {MANIFEST}: not written by encode_corpus")
    if not manifest.get("complete"):
        raise CorpusEncodingError(f"{option}={str(folder)!r}: the encoding is not finished ({manifest['count']} "
                                  "passages so far); run it again to resume")
    return EmbeddingShards(folder, manifest)


def _chunks(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    chunk: list[tuple[str, str]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_chunk(encode: Callable[[list[str]], np.ndarray], texts: list[str], dim: int,
                  bar: Any) -> np.ndarray:
    """Embeddings of `texts` in their order, computed longest first in slices (each slice of similar length)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), dim), dtype=np.float32)
    for start in range(0, len(texts), PROGRESS_SLICE):
        rows = order[start:start + PROGRESS_SLICE]
        emb = np.asarray(encode([texts[i] for i in rows]), dtype=np.float32)
        if emb.shape != (len(rows), dim):
            raise BadValue(f"encode returned shape {emb.shape} for {len(rows)} texts; expected ({len(rows)}, {dim})")
        out[rows] = emb
        if bar is not None:
            bar.update(len(rows))
    return out


def write_embedding_shards(folder: str | Path, arrays: Iterable[tuple[list[str], np.ndarray]], *, model: str,
                           config: Mapping[str, Any]) -> EmbeddingShards:
    """Write precomputed (ids, embeddings) chunks as a complete folder (benchmarks, imports)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _new_manifest(model, config, None)
    for ids, array in arrays:
        _write_shard(folder, manifest, ids, np.asarray(array, dtype=np.float32))
    manifest["complete"] = True
    _write_json_atomic(folder / MANIFEST, manifest)
    return EmbeddingShards(folder, manifest)


def _new_manifest(model: str, config: Mapping[str, Any], dim: int | None) -> dict[str, Any]:
    return {"format": FORMAT, "model": model, "config_hash": config_hash(config), "config": dict(config),
            "dim": dim, "dtype": "float32", "count": 0, "shards": [], "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _write_shard(folder: Path, manifest: dict[str, Any], ids: list[str], embeddings: np.ndarray) -> None:
    index = len(manifest["shards"])
    name = f"shard-{index:05d}"
    if manifest["dim"] is None:
        manifest["dim"] = int(embeddings.shape[1])
    tmp_npy, tmp_ids = folder / f".{name}.npy.partial", folder / f".{name}.ids.partial"
    array = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=embeddings.shape)
    array[:] = embeddings
    array.flush()
    del array
    tmp_ids.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp_npy, folder / f"{name}.npy")
    os.replace(tmp_ids, folder / f"{name}.ids")
    manifest["shards"].append({"file": f"{name}.npy", "ids": f"{name}.ids", "count": len(ids),
                               "start": manifest["count"]})
    manifest["count"] += len(ids)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json_atomic(folder / MANIFEST, manifest)  # the shard counts only from here on


def encode_corpus(encode: Callable[[list[str]], np.ndarray], passages: Iterable[tuple[str, str]],
                  folder: str | Path, *, model: str, config: Mapping[str, Any], dim: int,
                  shard_size: int = 20000, total: int | None = None, progress: bool = True,
                  option: str = "embeddings_dir") -> EmbeddingShards:
    """Encode (id, text) `passages` into `folder` (module docstring), resuming a partial folder of the same config.

    `encode` maps a list of texts to a float32 array (n, `dim`) in the same order (e.g. ``Encoder.encode`` with
    ``kind="passage"``, or :func:`~hybrid_retrieval.distributed.encode_across_ranks` under DDP). `config` is what
    the embeddings depend on besides the texts (hashed into the manifest, with `shard_size`, which decides the
    chunks). `total`, if known, gives the progress bar (texts and texts/s, on stderr) its length. `option` names
    the folder in errors.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise BadValue(f"shard_size={shard_size!r}: expected a positive integer")
    config = {**config, "shard_size": shard_size}
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for stray in folder.glob(".*.partial"):  # a shard or manifest cut short by a kill
        stray.unlink()
    manifest = _read_manifest(folder)
    wanted = config_hash(config)
    if manifest is None:
        leftovers = sorted(p.name for p in folder.iterdir())
        if leftovers:
            raise CorpusEncodingError(f"{option}={str(folder)!r} is not empty ({leftovers[:4]}) and holds no "
                                      f"{MANIFEST}; expected an empty folder or one written by encode_corpus")
        manifest = _new_manifest(model, config, dim)
        _write_json_atomic(folder / MANIFEST, manifest)
    elif manifest["config_hash"] != wanted:
        raise CorpusEncodingError(
            f"{option}={str(folder)!r} holds embeddings of another config (model {manifest.get('model')!r}, config "
            f"hash {manifest['config_hash']}; this one is {wanted}: another model, checkpoint, passage format, "
            "corpus or shard size). Use another folder, or delete this one to re-encode")
    elif manifest["dim"] != dim:
        raise CorpusEncodingError(f"{option}={str(folder)!r} holds {manifest['dim']}-dimensional embeddings; "
                                  f"the encoder gives {dim}")
    if manifest.get("complete"):
        return EmbeddingShards(folder, manifest)

    finished = len(manifest["shards"])
    state = EmbeddingShards(folder, manifest)
    bar = None
    if progress:
        from hybrid_retrieval.progress import Progress

        bar = Progress(total, f"encode corpus -> {folder.name}", "texts", initial=manifest["count"])
    seen = 0
    try:
        for number, chunk in enumerate(_chunks(passages, shard_size)):
            seen = number + 1
            if number < finished:  # written before a kill: check it holds the same passages, then skip it
                if [pid for pid, _ in chunk] != state.shard_ids(number):
                    raise CorpusEncodingError(
                        f"{option}={str(folder)!r}: shard {number} holds other passages than the corpus gives now "
                        "(the corpus changed since it was written); delete the folder to re-encode")
                continue
            embeddings = _encode_chunk(encode, [text for _, text in chunk], dim, bar)
            _write_shard(folder, manifest, [pid for pid, _ in chunk], embeddings)
    finally:
        if bar is not None:
            bar.close()
    if seen < finished:
        raise CorpusEncodingError(f"{option}={str(folder)!r} holds {finished} shards but the corpus gives only "
                                  f"{seen}; the corpus changed: delete the folder to re-encode")
    manifest["complete"] = True
    _write_json_atomic(folder / MANIFEST, manifest)
    return EmbeddingShards(folder, manifest)


def remove_embeddings(folder: str | Path) -> None:
    """Delete a folder written by :func:`encode_corpus` (only such a folder)."""
    folder = Path(folder)
    if folder.is_dir() and ((folder / MANIFEST).is_file() or not any(folder.iterdir())):
        shutil.rmtree(folder, ignore_errors=True)
