"""Batch sampler for monolingual, cross-lingual and hybrid batching over parallel training data.

Each batch is a list of ``(dataset_index, query_row, passage_row)`` tuples. Per batch, the sampler draws:

1. the batch kind: monolingual ("X-X-mono") with probability ``mono_ratio`` (alpha), else cross-lingual ("X-Y");
2. one dataset, in proportion to its number of rows (among the datasets able to fill that kind of batch);
3. for a monolingual batch, one language of that dataset (uniformly, or in proportion to its rows).

A monolingual batch holds rows of that one language with ``query_row == passage_row``. In a cross-lingual batch
every query row and its passage row share a parallel group but differ in language. No two rows of a batch share
a parallel group, since a translation of a positive passage would be a false negative.

Rows are taken from shuffled queues (one per dataset and language for monolingual batches, one per dataset for
cross-lingual batches) that are refilled with a fresh permutation when they run dry, so an epoch walks through
the data instead of drawing with replacement. Everything is drawn from one ``numpy.random.Generator`` seeded with
``(seed, epoch)``: every rank draws the same global batch of ``batch_size * num_replicas`` rows and yields its
own slice, so ranks see distinct rows, the same batch kind and language in a step, and the same number of batches.
"""

from __future__ import annotations

import bisect
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.pairs import LanguageCoverage, language_coverage

__all__ = ["BatchInfo", "BatchSampler", "HybridBatchSampler", "PairsLike", "check_batch_sampler"]

log = logging.getLogger(__name__)

BatchKind = Literal["mono", "cross"]
_MAX_REJECTION_ROUNDS = 32


@runtime_checkable
class PairsLike(Protocol):
    """What the sampler needs from a training dataset (``hybrid_retrieval.data.pairs.ParallelPairs`` fits)."""

    groups: np.ndarray  # parallel-group id per row
    languages: np.ndarray  # language index per row, into language_names
    language_names: list[str]


@runtime_checkable
class BatchSampler(Protocol):
    """What training needs from a batch sampler: the contract ``conf/sampler``'s ``_target_`` must meet.

    The config node is instantiated as a partial and called by the datamodule, once per rank, with ``datasets``
    (the training datasets, each :class:`PairsLike`), ``batch_size`` (rows per batch on one device), ``seed``,
    ``num_replicas`` and ``rank``. The sampler then yields each batch of this rank as a list of ``(dataset index,
    query row, passage row)``; no two rows of a batch should share a parallel group (a translation of a positive
    is a false negative for the in-batch loss). :class:`HybridBatchSampler` is the project's; ``docs/extending.md``
    writes another against this protocol (its test trains with it through ``run.py``).
    """

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch: the epoch's batches (they should differ per epoch)."""

    def skip_next(self, epoch: int, batches: int) -> None:
        """A resume: the next iteration of ``epoch`` starts after its first ``batches`` batches."""


def check_batch_sampler(sampler: Any) -> None:
    """Refuse a sampler that does not meet :class:`BatchSampler`, naming what it lacks."""
    missing = [name for name in ("__iter__", "__len__", "set_epoch", "skip_next")
               if not callable(getattr(sampler, name, None))]
    if missing:
        raise BadValue(f"{type(sampler).__module__}.{type(sampler).__qualname__} is not a batch sampler: it lacks "
                         f"{', '.join(missing)} (hybrid_retrieval.training.sampler.BatchSampler says what training "
                         "calls)")


@dataclass(frozen=True)
class BatchInfo:
    """What one (global) batch was drawn as: for logging and inspection."""

    kind: BatchKind
    dataset: int  # index into the sampler's datasets
    language: str | None  # the batch language for monolingual batches, None for cross-lingual ones


def _index_dtype(n: int) -> type:
    """int32 for row and group indices where they fit (half the memory of int64 at 100M rows)."""
    return np.int32 if n < 2**31 else np.int64


class _GroupQueue:
    """A shuffled queue of row indices that hands out runs of rows from pairwise distinct groups.

    Each refill appends one cycle over all the queue's rows, ordered in rounds: every group contributes one of
    its rows (chosen at random) to round 0, another to round 1, and so on, each round in random order. Rows of
    one group therefore sit far apart and a run of rows rarely repeats a group. Rows skipped because their group
    was already taken stay at the front of the queue for the next pop, so every row of a cycle is still yielded.

    Memory: the rows once (sorted by group where a group has several), the buffer, and a mark per group; what a
    cycle needs beyond that is computed when it is drawn and freed after.
    """

    def __init__(self, rows: np.ndarray, row_groups: np.ndarray, n_groups: int, sorted_by_group: bool = False) -> None:
        self.row_groups = row_groups  # dense group id per row of the dataset (indexed by row)
        dtype = _index_dtype(max(len(row_groups), n_groups))
        self.buffer = np.empty(0, dtype=rows.dtype)
        self.pos = 0
        # Scratch space for distinctness checks without sorting: mark[g] holds a position of group g.
        self._mark = np.empty(n_groups, dtype=dtype)
        self._ramp = np.arange(0, dtype=np.int64)
        counts = np.bincount(row_groups[rows], minlength=n_groups) if len(rows) else np.zeros(0, np.int64)
        self.n_distinct = int(np.count_nonzero(counts))
        self._one_per_group = bool(len(rows) == 0 or counts.max() == 1)
        if self._one_per_group or sorted_by_group:
            self.rows = rows
        else:
            # The rows sorted by group (stable): a cycle ranks rows within their group from this order.
            self.rows = rows[np.argsort(row_groups[rows], kind="stable")]

    def pop(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n > self.n_distinct:  # would never terminate; the sampler excludes such queues up front
            raise RuntimeError(f"a queue with {self.n_distinct} distinct groups cannot supply {n} distinct rows")
        while True:
            if len(self.buffer) - self.pos >= n:
                taken = self._pop_distinct(n)
                if taken is not None:
                    return taken
            self.buffer = np.concatenate([self.buffer[self.pos :], self._cycle(rng)])
            self.pos = 0

    def _cycle(self, rng: np.random.Generator) -> np.ndarray:
        if self._one_per_group:
            return rng.permutation(self.rows)
        n = len(self.rows)
        # Each row's rank within its group (rows are sorted by group), in the smallest type that holds it.
        sorted_groups = self.row_groups[self.rows]
        first = np.ones(n, dtype=bool)
        np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=first[1:])
        position = np.arange(n, dtype=_index_dtype(n))
        group_start = np.where(first, position, 0)
        del first
        np.maximum.accumulate(group_start, out=group_start)
        position -= group_start
        del group_start
        rank_in_group = position.astype(np.min_scalar_type(int(position.max())), copy=False)
        del position
        # Shuffle rows within each group (group id plus a fraction in [0, 1) keeps groups apart), so that a
        # row's rank within its group is random; that rank is its round. Then shuffle within rounds the same way.
        # (Each array is freed as soon as it is used: at 30M rows a cycle's arrays are the sampler's peak memory.)
        keys = rng.random(n)
        keys += sorted_groups
        del sorted_groups
        within = np.argsort(keys)
        del keys
        rounds = np.empty(n, dtype=rank_in_group.dtype)
        rounds[within] = rank_in_group
        del within, rank_in_group
        keys = rng.random(n)
        keys += rounds
        del rounds
        order = np.argsort(keys)
        del keys
        return self.rows[order]

    def _first_occurrences(self, window: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions in window whose group does not occur earlier in window."""
        if len(self._ramp) < len(window):
            self._ramp = np.arange(max(len(window), 2 * len(self._ramp)), dtype=np.int64)
        ramp = self._ramp[: len(window)]
        groups = self.row_groups[window]
        # Assigning in reverse order leaves each group's earliest position in mark.
        self._mark[groups[::-1]] = ramp[::-1]
        return self._mark[groups] == ramp

    def _pop_distinct(self, n: int) -> np.ndarray | None:
        avail = len(self.buffer) - self.pos
        width = n
        while True:
            window = self.buffer[self.pos : self.pos + width]
            first = self._first_occurrences(window)
            if width == n and first.all():  # the common case: the next n rows are already distinct
                self.pos += n
                return window.copy()
            chosen = np.flatnonzero(first)
            if len(chosen) >= n:
                chosen = chosen[:n]
                end = int(chosen[-1]) + 1
                keep = np.ones(end, dtype=bool)
                keep[chosen] = False
                skipped = window[:end][keep]
                taken = window[chosen]
                # Put the skipped rows back, in order, directly in front of the unread part of the buffer.
                new_pos = self.pos + end - len(skipped)
                self.buffer[new_pos : self.pos + end] = skipped
                self.pos = new_pos
                return taken
            if width == avail:
                return None
            width = min(2 * width, avail)


class _DatasetIndex:
    """Per-dataset arrays the sampler draws from, validated once.

    Built from the integer columns alone, in a few passes of numpy: group ids that are already dense (0..n-1,
    as every reader numbers them) are used as they are, a memory-mapped column is not copied, and row indices
    are int32 where they fit. Built once per dataset object and shared by every sampler over it.
    """

    def __init__(self, dataset: PairsLike, index: int) -> None:
        self.name = str(getattr(dataset, "name", f"#{index}"))
        label = f"dataset {index} ({self.name!r})"
        for field in ("groups", "languages", "language_names"):
            if not hasattr(dataset, field):
                raise TypeError(f"HybridBatchSampler: {label} has no attribute {field!r}; expected a ParallelPairs-like "
                                "object with int arrays 'groups' and 'languages' and a list 'language_names'")
        groups = np.asarray(dataset.groups)
        languages = np.asarray(dataset.languages)
        self.language_names = list(dataset.language_names)
        if groups.ndim != 1 or languages.ndim != 1 or len(groups) != len(languages):
            raise BadValue(f"HybridBatchSampler: {label}: 'groups' and 'languages' must be 1-D arrays of equal "
                             f"length, got shapes {groups.shape} and {languages.shape}")
        if len(groups) and not (np.issubdtype(groups.dtype, np.integer) and np.issubdtype(languages.dtype, np.integer)):
            raise BadValue(f"HybridBatchSampler: {label}: 'groups' and 'languages' must hold integers, got dtypes "
                             f"{groups.dtype} and {languages.dtype}")
        if len(languages) and (languages.min() < 0 or languages.max() >= len(self.language_names)):
            raise BadValue(f"HybridBatchSampler: {label}: 'languages' must index into language_names "
                             f"(0..{len(self.language_names) - 1}), got values in [{languages.min()}, {languages.max()}]")
        self.n_rows = len(groups)
        dtype = _index_dtype(self.n_rows)
        # Dense group ids make bincount/indexing cheap whatever ids the dataset uses; ids already dense are their
        # own dense ids (np.unique's inverse would equal them).
        if self.n_rows and groups.min() >= 0 and np.bincount(groups).all():
            self.dense_groups = groups
        else:
            _, inverse = np.unique(groups, return_inverse=True)
            self.dense_groups = inverse.astype(dtype).reshape(-1)
        self.languages = languages
        n_groups = self.n_groups = int(self.dense_groups.max()) + 1 if self.n_rows else 0

        # Rows of each group, contiguous: group g's rows are by_group[start[g] : start[g] + count[g]].
        self.by_group = np.argsort(self.dense_groups, kind="stable").astype(dtype)
        self.count = np.bincount(self.dense_groups, minlength=n_groups)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)

        # Per language: its rows, and how many distinct groups they hold; per group: in how many languages. A
        # ParallelPairs computed this once already (its summary reads it too) when its ids are the dense ones.
        coverage = getattr(dataset, "coverage", None) if self.dense_groups is groups else None
        if not isinstance(coverage, LanguageCoverage):
            coverage = language_coverage(self.dense_groups, languages, len(self.language_names), n_groups)
        self.rows_by_language = coverage.rows_by_language
        self.groups_by_language = coverage.groups_per_language
        # Groups present in at least two languages can give cross-lingual rows.
        self._cross_groups = coverage.languages_per_group >= 2
        self.n_cross_groups = int(np.count_nonzero(self._cross_groups))

    @property
    def cross_rows(self) -> np.ndarray:
        """Rows whose group has rows in 2+ languages, sorted by group (rows of a group in increasing order): a
        slice of ``by_group``, or ``by_group`` itself when every group qualifies (parallel data: no copy)."""
        if self.n_cross_groups == self.n_groups:
            return self.by_group
        return self.by_group[self._cross_groups[self.dense_groups[self.by_group]]]

    def _positions(self, queries: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Each query row's position among its group's rows (which by_group holds in increasing order)."""
        return np.array([np.searchsorted(self.by_group[s : s + c], q) for q, s, c in
                         zip(queries.tolist(), start.tolist(), count.tolist())], dtype=np.int64)

    def passages_for(self, queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random row of each query row's group in another language."""
        groups = self.dense_groups[queries]
        start, count = self.start[groups], self.count[groups]
        # Offsetting from the query's own position never lands on the query row itself, so with one row per
        # (group, language) the first draw is always valid.
        step = 1 + (rng.random(len(queries)) * (count - 1)).astype(np.int64)
        passages = self.by_group[start + (self._positions(queries, start, count) + step) % count]
        bad = np.flatnonzero(self.languages[passages] == self.languages[queries])
        for _ in range(_MAX_REJECTION_ROUNDS):
            if len(bad) == 0:
                return passages
            redraw = self.by_group[start[bad] + (rng.random(len(bad)) * count[bad]).astype(np.int64)]
            passages[bad] = redraw
            bad = bad[self.languages[redraw] == self.languages[queries[bad]]]
        for i in bad:  # groups dominated by one language: choose exactly among the other-language rows
            rows = self.by_group[start[i] : start[i] + count[i]]
            passages[i] = rng.choice(rows[self.languages[rows] != self.languages[queries[i]]])
        return passages


_INDEXES: weakref.WeakKeyDictionary[Any, _DatasetIndex] = weakref.WeakKeyDictionary()


def _dataset_index(dataset: PairsLike, index: int) -> _DatasetIndex:
    """The index of a dataset, built once per dataset object (the trial sampler and each rank's share it)."""
    try:
        found = _INDEXES.get(dataset)
    except TypeError:  # not weak-referenceable: build it every time
        return _DatasetIndex(dataset, index)
    if found is None or found.n_rows != len(np.asarray(dataset.groups)):
        found = _INDEXES[dataset] = _DatasetIndex(dataset, index)
    return found


class _Choice:
    """Draws an index in proportion to non-negative weights from one uniform number; zero weights are never drawn."""

    def __init__(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, dtype=float)
        self.indices = np.flatnonzero(weights > 0).tolist()
        cdf = np.cumsum(weights[self.indices])
        cdf /= cdf[-1]
        # The last bound must exceed every u < 1 even after rounding.
        cdf[-1] = math.inf
        # Plain lists and bisect: much cheaper than numpy calls for one scalar per batch.
        self.cdf = cdf.tolist()

    def draw(self, rng: np.random.Generator) -> int:
        return self.indices[bisect.bisect_right(self.cdf, rng.random())]


@dataclass
class SamplerConfig:
    """The ``sampler`` node's schema (``conf/sampler/*.yaml``): the batch sampler and the options bound to it
    (``datasets``, ``batch_size``, ``seed``, ``num_replicas`` and ``rank`` are filled in by the datamodule)."""

    name: str
    mono_ratio: float                   # alpha: the probability that a batch is monolingual
    language_weighting: str = "uniform"  # uniform | size: how a monolingual batch's language is drawn
    _target_: str = "hybrid_retrieval.training.sampler.HybridBatchSampler"
    _partial_: bool = True


class HybridBatchSampler(torch.utils.data.Sampler[list[tuple[int, int, int]]]):
    """Yields batches of ``(dataset_index, query_row, passage_row)``, each monolingual with probability
    ``mono_ratio`` and cross-lingual otherwise (see the module docstring for the exact rules).

    Args:
        datasets: ParallelPairs-like training datasets (``groups``, ``languages``, ``language_names``).
        batch_size: rows per batch on one rank.
        mono_ratio: alpha, the probability that a batch is monolingual; 1 gives X-X-mono, 0 gives X-Y batching.
        seed: base seed; the epoch set by ``set_epoch`` is mixed into it.
        language_weighting: how a monolingual batch's language is drawn: "uniform" over the dataset's usable
            languages, or "size" in proportion to their rows.
        num_replicas: number of distributed ranks; the global batch has ``batch_size * num_replicas`` rows.
        rank: this process's rank; it yields rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each global batch.
        batches_per_epoch: batches per epoch; default ``total rows // (batch_size * num_replicas)``.
        name: a label for logs ("mono", "cross", "hybrid", ...).
    """

    def __init__(
        self,
        datasets: Sequence[PairsLike],
        batch_size: int,
        mono_ratio: float,
        seed: int = 0,
        language_weighting: Literal["uniform", "size"] = "uniform",
        num_replicas: int = 1,
        rank: int = 0,
        batches_per_epoch: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(datasets, PairsLike) or not isinstance(datasets, Sequence) or len(datasets) == 0:
            raise BadValue("HybridBatchSampler: 'datasets' must be a non-empty list of ParallelPairs-like datasets")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise BadValue(f"HybridBatchSampler: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(mono_ratio, (int, float, np.floating)) or not 0.0 <= float(mono_ratio) <= 1.0:
            raise BadValue(f"HybridBatchSampler: mono_ratio (alpha) must be a number in [0, 1], got {mono_ratio!r}")
        if language_weighting not in ("uniform", "size"):
            raise BadValue("HybridBatchSampler: language_weighting must be 'uniform' or 'size', "
                             f"got {language_weighting!r}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise BadValue(f"HybridBatchSampler: num_replicas must be a positive integer, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise BadValue(f"HybridBatchSampler: rank must be an integer in [0, num_replicas={num_replicas}), "
                             f"got {rank!r}")
        if batches_per_epoch is not None and (
            isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, (int, np.integer))
            or batches_per_epoch < 1
        ):
            raise BadValue("HybridBatchSampler: batches_per_epoch must be a positive integer or None, "
                             f"got {batches_per_epoch!r}")

        self.batch_size = int(batch_size)
        self.mono_ratio = float(mono_ratio)
        self.seed = int(seed)
        self.language_weighting = language_weighting
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.name = name if name is not None else f"alpha={self.mono_ratio:g}"
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip when that epoch is next iterated
        self.last_batch_info: BatchInfo | None = None

        self._datasets = [_dataset_index(ds, i) for i, ds in enumerate(datasets)]
        n = self.global_batch_size
        total_rows = sum(d.n_rows for d in self._datasets)

        # Usable (dataset, language) pairs for monolingual batches and datasets for cross-lingual ones: a queue
        # needs at least n distinct groups, or a batch could never be filled without repeating a group.
        self._mono_languages: list[np.ndarray] = []
        self._mono_language_choice: list[_Choice | None] = []
        for d in self._datasets:
            usable = np.array([lang for lang, g in enumerate(d.groups_by_language) if g >= n], dtype=np.int64)
            dropped = [f"{d.language_names[lang]} ({g} groups)" for lang, g in enumerate(d.groups_by_language)
                       if 0 < g < n]
            if dropped and self.mono_ratio > 0:
                log.warning("HybridBatchSampler: dataset %r: languages left out of monolingual batches, fewer "
                            "distinct groups than the global batch of %d rows: %s", d.name, n, ", ".join(dropped))
            weights = (np.ones(len(usable)) if language_weighting == "uniform"
                       else np.array([len(d.rows_by_language[lang]) for lang in usable], dtype=float))
            self._mono_languages.append(usable)
            self._mono_language_choice.append(_Choice(weights) if len(usable) else None)
        mono_sizes = np.array([d.n_rows if len(u) else 0 for d, u in zip(self._datasets, self._mono_languages)], float)
        cross_sizes = np.array([d.n_rows if d.n_cross_groups >= n else 0 for d in self._datasets], float)

        def summary(kind: str) -> str:
            parts = []
            for d in self._datasets:
                if kind == "mono":
                    counts = ", ".join(f"{lang}: {g}" for lang, g in zip(d.language_names, d.groups_by_language) if g)
                    parts.append(f"{d.name!r} (distinct groups per language: {counts or 'none'})")
                else:
                    parts.append(f"{d.name!r} ({d.n_cross_groups} groups with rows in 2+ languages)")
            return "; ".join(parts)

        need = (f"batch_size={self.batch_size} x num_replicas={self.num_replicas} = {n} rows from distinct "
                "parallel groups")
        if self.mono_ratio > 0 and not mono_sizes.any():
            raise BadValue(f"HybridBatchSampler: no dataset language can fill a monolingual batch of {need}: "
                             f"{summary('mono')}. Lower batch_size or add data.")
        if self.mono_ratio < 1 and not cross_sizes.any():
            raise BadValue(f"HybridBatchSampler: no dataset can fill a cross-lingual batch of {need}: "
                             f"{summary('cross')}. Lower batch_size, add parallel data, or set mono_ratio=1.")
        for d, size in zip(self._datasets, cross_sizes):
            if self.mono_ratio < 1 and size == 0:
                log.warning("HybridBatchSampler: dataset %r left out of cross-lingual batches: %d groups with rows in "
                            "2+ languages, fewer than the global batch of %d rows", d.name, d.n_cross_groups, n)
        self._mono_dataset_choice = _Choice(mono_sizes) if mono_sizes.any() else None
        self._cross_dataset_choice = _Choice(cross_sizes) if cross_sizes.any() else None
        self._len = int(batches_per_epoch) if batches_per_epoch is not None else max(total_rows // n, 1)

    @property
    def global_batch_size(self) -> int:
        """Rows drawn per step over all ranks."""
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; it enters the RNG seed so that every epoch has its own batches."""
        self.epoch = int(epoch)

    def skip_next(self, epoch: int, batches: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``batches`` batches (resuming mid-epoch).

        ``len()`` stays the epoch's length: the training loop counts the skipped batches as already done.
        """
        self._skip = (int(epoch), int(batches))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip, self._skip = self._skip[1], None
        for index, (info, queries, passages) in enumerate(self._generate()):
            if index < skip:
                continue  # drawn all the same: the RNG stream must stay the uninterrupted one
            self.last_batch_info = info
            yield list(zip([info.dataset] * self.batch_size, queries[lo:hi].tolist(), passages[lo:hi].tolist()))

    def batch_infos(self) -> list[BatchInfo]:
        """Kind, dataset and language of every batch of the current epoch, without consuming the iterator."""
        return [info for info, _, _ in self._generate()]

    def global_batches(self) -> Iterator[tuple[BatchInfo, np.ndarray, np.ndarray]]:
        """The current epoch's global batches (all ranks' rows): ``(info, query_rows, passage_rows)``."""
        return self._generate()

    def _generate(self) -> Iterator[tuple[BatchInfo, np.ndarray, np.ndarray]]:
        # Every rank runs this identically; only the slice taken afterwards depends on the rank.
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.global_batch_size
        mono_queues: dict[tuple[int, int], _GroupQueue] = {}
        cross_queues: dict[int, _GroupQueue] = {}
        for _ in range(self._len):
            if rng.random() < self.mono_ratio:
                d_idx = self._mono_dataset_choice.draw(rng)
                d = self._datasets[d_idx]
                lang = int(self._mono_languages[d_idx][self._mono_language_choice[d_idx].draw(rng)])
                queue = mono_queues.get((d_idx, lang))
                if queue is None:
                    queue = mono_queues[(d_idx, lang)] = _GroupQueue(d.rows_by_language[lang], d.dense_groups, d.n_groups)
                rows = queue.pop(n, rng)
                yield BatchInfo("mono", d_idx, d.language_names[lang]), rows, rows
            else:
                d_idx = self._cross_dataset_choice.draw(rng)
                d = self._datasets[d_idx]
                queue = cross_queues.get(d_idx)
                if queue is None:
                    queue = cross_queues[d_idx] = _GroupQueue(d.cross_rows, d.dense_groups, d.n_groups,
                                                              sorted_by_group=True)
                queries = queue.pop(n, rng)
                yield BatchInfo("cross", d_idx, None), queries, d.passages_for(queries, rng)
