"""Tests of HybridBatchSampler: batch rules, alpha, determinism, distributed slicing, dataset/language choice."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_retrieval.data.lareqa_pairs import from_lareqa
from hybrid_retrieval.data.pairs import ParallelPairs
from hybrid_retrieval.training.sampler import BatchInfo, HybridBatchSampler

CONF_SAMPLER = Path(__file__).resolve().parents[1] / "conf" / "sampler"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_pairs(name: str, members: list[list[int]], n_languages: int, duplicates: list[tuple[int, int]] = (),
               seed: int = 0) -> ParallelPairs:
    """A ParallelPairs with one row per (group, language) in members[group], plus extra rows for duplicates,
    rows in shuffled order."""
    rows = [(g, lang) for g, langs in enumerate(members) for lang in langs] + list(duplicates)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return ParallelPairs(
        name=name,
        groups=np.array([g for g, _ in rows], dtype=np.int64),
        languages=np.array([lang for _, lang in rows], dtype=np.int64),
        language_names=[f"l{i}" for i in range(n_languages)],
        queries=[f"q{g}-{lang}" for g, lang in rows],
        passages=[f"p{g}-{lang}" for g, lang in rows],
        hard_negatives=None,
    )


def full_pairs(name: str, n_groups: int, n_languages: int) -> ParallelPairs:
    """Every group in every language."""
    return make_pairs(name, [list(range(n_languages))] * n_groups, n_languages)


@st.composite
def datasets_strategy(draw: st.DrawFn) -> list[ParallelPairs]:
    datasets = []
    for d in range(draw(st.integers(1, 3))):
        n_languages = draw(st.integers(1, 4))
        n_groups = draw(st.integers(1, 25))
        masks = draw(st.lists(st.integers(1, 2**n_languages - 1), min_size=n_groups, max_size=n_groups))
        members = [[lang for lang in range(n_languages) if mask >> lang & 1] for mask in masks]
        # A few repeated (group, language) rows: the sampler must still keep groups apart within a batch.
        duplicates = draw(st.lists(st.sampled_from([(g, langs[0]) for g, langs in enumerate(members)]), max_size=3))
        datasets.append(make_pairs(f"set{d}", members, n_languages, duplicates, seed=d))
    return datasets


def feasibility(datasets: list[ParallelPairs], n: int) -> tuple[bool, bool]:
    """(some language of some dataset has >= n distinct groups, some dataset has >= n groups in 2+ languages)."""
    mono = cross = False
    for ds in datasets:
        langs_of_group: dict[int, set[int]] = {}
        for g, lang in zip(ds.groups.tolist(), ds.languages.tolist()):
            langs_of_group.setdefault(g, set()).add(lang)
        for lang in range(len(ds.language_names)):
            mono |= sum(lang in s for s in langs_of_group.values()) >= n
        cross |= sum(len(s) >= 2 for s in langs_of_group.values()) >= n
    return mono, cross


def check_batch(batch: list[tuple[int, int, int]], datasets: list[ParallelPairs], size: int) -> str:
    """Assert the batch rules; return the batch kind."""
    assert len(batch) == size
    d_idx = {d for d, _, _ in batch}
    assert len(d_idx) == 1, "one dataset per batch"
    ds = datasets[d_idx.pop()]
    queries = np.array([q for _, q, _ in batch])
    passages = np.array([p for _, _, p in batch])
    groups = ds.groups[queries]
    assert len(set(groups.tolist())) == size, "no two rows of a batch share a parallel group"
    assert np.array_equal(ds.groups[passages], groups), "query and passage rows share a group"
    if np.array_equal(queries, passages):
        assert len(set(ds.languages[queries].tolist())) == 1, "a monolingual batch is in one language"
        return "mono"
    assert np.all(ds.languages[queries] != ds.languages[passages]), "cross-lingual rows differ in language"
    return "cross"


@FAST
@given(
    datasets=datasets_strategy(),
    batch_size=st.integers(1, 6),
    num_replicas=st.integers(1, 3),
    alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**31),
)
def test_batches_obey_the_rules(datasets, batch_size, num_replicas, alpha, seed):
    n = batch_size * num_replicas
    mono_ok, cross_ok = feasibility(datasets, n)
    if (alpha > 0 and not mono_ok) or (alpha < 1 and not cross_ok):
        with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
            HybridBatchSampler(datasets, batch_size, alpha, seed=seed, num_replicas=num_replicas)
        return
    sampler = HybridBatchSampler(datasets, batch_size, alpha, seed=seed, num_replicas=num_replicas,
                                 batches_per_epoch=30)
    infos = sampler.batch_infos()
    batches = []
    for batch in sampler:
        kind = check_batch(batch, datasets, batch_size)
        info = sampler.last_batch_info
        assert info.kind == kind and info.dataset == batch[0][0]
        if kind == "mono":
            ds = datasets[info.dataset]
            assert ds.language_names[ds.languages[batch[0][1]]] == info.language
        batches.append(batch)
    assert len(batches) == len(sampler) == 30
    assert [b.kind for b in infos] == [check_batch(b, datasets, batch_size) for b in batches]
    if alpha == 1.0:
        assert all(i.kind == "mono" for i in infos)
    if alpha == 0.0:
        assert all(i.kind == "cross" for i in infos)
    # The global batches (all ranks together) obey the rules too: ranks never share a group in a step.
    for info, queries, passages in sampler.global_batches():
        check_batch([(info.dataset, q, p) for q, p in zip(queries.tolist(), passages.tolist())], datasets, n)


@FAST
@given(datasets=datasets_strategy(), batch_size=st.integers(1, 4), seed=st.integers(0, 1000))
def test_len_equals_yielded_count_by_default(datasets, batch_size, seed):
    mono_ok, cross_ok = feasibility(datasets, batch_size)
    alpha = 0.5 if mono_ok and cross_ok else 1.0 if mono_ok else 0.0
    if not (mono_ok or cross_ok):
        return
    sampler = HybridBatchSampler(datasets, batch_size, alpha, seed=seed)
    total_rows = sum(len(ds.groups) for ds in datasets)
    assert len(sampler) == max(total_rows // batch_size, 1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sum(1 for _ in sampler) == len(sampler)


@settings(max_examples=15, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_mono_fraction_matches_alpha(alpha, seed):
    datasets = [full_pairs("a", 40, 3)]
    n_batches = 2000
    sampler = HybridBatchSampler(datasets, 8, alpha, seed=seed, batches_per_epoch=n_batches)
    fraction = sum(info.kind == "mono" for info in sampler.batch_infos()) / n_batches
    # Binomial: 5 standard deviations plus one batch of slack.
    assert abs(fraction - alpha) <= 5 * math.sqrt(alpha * (1 - alpha) / n_batches) + 1 / n_batches


def test_determinism_and_epochs():
    datasets = [full_pairs("a", 30, 4), full_pairs("b", 20, 2)]

    def epoch_batches(seed: int, epoch: int) -> list:
        sampler = HybridBatchSampler(datasets, 5, 0.5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = epoch_batches(0, 0)
    assert first == epoch_batches(0, 0), "same (seed, epoch) gives the same batches"
    assert first != epoch_batches(0, 1), "the epoch enters the seed"
    assert first != epoch_batches(1, 0), "the seed matters"
    sampler = HybridBatchSampler(datasets, 5, 0.5, seed=0)
    sampler.set_epoch(3)
    list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first, "re-selecting an epoch replays it"
    assert list(sampler) == first, "iterating twice in one epoch replays it"


@settings(max_examples=25, deadline=None)
@given(
    datasets=datasets_strategy(),
    batch_size=st.integers(1, 4),
    num_replicas=st.integers(2, 4),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_distributed_ranks_split_the_global_batch(datasets, batch_size, num_replicas, alpha, seed, epoch):
    n = batch_size * num_replicas
    mono_ok, cross_ok = feasibility(datasets, n)
    if not (mono_ok and cross_ok):
        return
    ranks = [HybridBatchSampler(datasets, batch_size, alpha, seed=seed, num_replicas=num_replicas, rank=r)
             for r in range(num_replicas)]
    single = HybridBatchSampler(datasets, n, alpha, seed=seed)
    for s in [*ranks, single]:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in ranks]
    assert len({len(s) for s in ranks}) == 1 and all(len(b) == len(ranks[0]) for b in per_rank)
    assert len(ranks[0]) == len(single)
    for step, global_batch in enumerate(single):
        parts = [per_rank[r][step] for r in range(num_replicas)]
        assert sum(parts, []) == global_batch, "ranks' slices concatenate to the single-process global batch"
        rows = [q for part in parts for _, q, _ in part]
        assert len(set(rows)) == len(rows), "ranks see distinct rows"
        kinds = {check_batch(part, datasets, batch_size) for part in parts}
        assert len(kinds) == 1, "the batch kind is shared across ranks in a step"
        if kinds == {"mono"}:
            ds = datasets[parts[0][0][0]]
            assert len({int(ds.languages[q]) for q in rows}) == 1, "the batch language is shared across ranks"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_dataset_choice_proportional_to_size(alpha):
    datasets = [full_pairs("small", 50, 2), full_pairs("large", 150, 2)]  # 100 vs 300 rows
    n_batches = 4000
    sampler = HybridBatchSampler(datasets, 10, alpha, batches_per_epoch=n_batches)
    counts = Counter(info.dataset for info in sampler.batch_infos())
    assert abs(counts[1] / n_batches - 0.75) <= 5 * math.sqrt(0.75 * 0.25 / n_batches)


def test_datasets_that_cannot_fill_a_batch_are_left_out():
    big = full_pairs("big", 30, 2)
    tiny = full_pairs("tiny", 3, 2)
    sampler = HybridBatchSampler([big, tiny], 10, 0.5, batches_per_epoch=300)
    assert {info.dataset for info in sampler.batch_infos()} == {0}


@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_language_weighting(weighting):
    # l0 in 120 groups, l1 and l2 in 40 each: uniform gives 1/3 each, size gives 0.6 / 0.2 / 0.2.
    members = [[0, 1, 2] if g < 40 else [0] for g in range(120)]
    datasets = [make_pairs("a", members, 3)]
    n_batches = 3000
    sampler = HybridBatchSampler(datasets, 5, 1.0, language_weighting=weighting, batches_per_epoch=n_batches)
    counts = Counter(info.language for info in sampler.batch_infos())
    expected = {"l0": 1 / 3, "l1": 1 / 3, "l2": 1 / 3} if weighting == "uniform" else {"l0": 0.6, "l1": 0.2, "l2": 0.2}
    for lang, p in expected.items():
        assert abs(counts[lang] / n_batches - p) <= 5 * math.sqrt(p * (1 - p) / n_batches)


def test_languages_with_too_few_groups_are_left_out_of_mono_batches():
    members = [[0, 1] if g < 4 else [0] for g in range(40)]  # l1 has 4 groups: too few for a batch of 5
    sampler = HybridBatchSampler([make_pairs("a", members, 2)], 5, 1.0, batches_per_epoch=200)
    assert {info.language for info in sampler.batch_infos()} == {"l0"}


def first_repeat(rows: list[int]) -> int:
    """Index of the first element of rows that occurred before (len(rows) if none)."""
    seen: set[int] = set()
    for i, row in enumerate(rows):
        if row in seen:
            return i
        seen.add(row)
    return len(rows)


def test_mono_batches_walk_through_a_language_before_repeating_it():
    members = [[0, 1, 2] if g < 30 else [0, 2] for g in range(60)]
    ds = make_pairs("a", members, 3)
    for seed in range(5):
        sampler = HybridBatchSampler([ds], 7, 1.0, seed=seed, batches_per_epoch=200)
        drawn: dict[str, list[int]] = {}
        for batch, info in zip(sampler, sampler.batch_infos()):
            drawn.setdefault(info.language, []).extend(q for _, q, _ in batch)
        for lang, rows in drawn.items():
            n_lang = int(np.sum(ds.languages == ds.language_names.index(lang)))
            assert len(rows) > n_lang
            assert first_repeat(rows) >= n_lang, f"{lang}: every row once before any repeats"


@pytest.mark.parametrize("batch_size", [5, 7, 13, 30])
def test_cross_batches_use_every_query_row_before_repeating_one(batch_size):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        members = [sorted(rng.choice(5, size=rng.integers(2, 6), replace=False).tolist()) for _ in range(60)]
        ds = make_pairs("a", members, 5, seed=seed)
        sampler = HybridBatchSampler([ds], batch_size, 0.0, seed=seed, batches_per_epoch=100)
        queries = [q for batch in sampler for _, q, _ in batch]
        # A fresh pass starts only once the rows left cannot fill a batch with distinct groups: fewer than
        # batch_size groups of at most 5 rows each.
        assert first_repeat(queries) >= len(ds.groups) - (batch_size - 1) * 5


def test_validation_errors():
    ds = [full_pairs("a", 20, 2)]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mono_ratio"):
            HybridBatchSampler(ds, 4, bad)
    with pytest.raises(ValueError, match="language_weighting"):
        HybridBatchSampler(ds, 4, 0.5, language_weighting="sizes")
    with pytest.raises(ValueError, match="batch_size"):
        HybridBatchSampler(ds, 0, 0.5)
    with pytest.raises(ValueError, match="rank"):
        HybridBatchSampler(ds, 4, 0.5, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        HybridBatchSampler(ds, 4, 0.5, batches_per_epoch=0)
    with pytest.raises(ValueError, match="datasets"):
        HybridBatchSampler([], 4, 0.5)
    with pytest.raises(ValueError, match=r"batch_size=30 .*'a'"):
        HybridBatchSampler(ds, 30, 0.5)
    only_english = [make_pairs("en_only", [[0]] * 20, 1)]
    with pytest.raises(ValueError, match=r"cross-lingual batch of batch_size=4.*'en_only'"):
        HybridBatchSampler(only_english, 4, 0.5)
    assert len(HybridBatchSampler(only_english, 4, 1.0)) == 5, "mono-only batching needs no parallel rows"


def test_long_epoch_yields_every_batch():
    ds = [full_pairs("a", 2000, 5), full_pairs("b", 1000, 3)]
    sampler = HybridBatchSampler(ds, 100, 0.5, batches_per_epoch=2000)
    assert sum(1 for _ in sampler) == 2000 == len(sampler)


def test_real_mlqa_r_epoch(data_root):
    pairs = from_lareqa("mlqa_r", root=data_root)
    sampler = HybridBatchSampler([pairs], 100, 0.5, seed=7)
    batches = list(sampler)
    assert len(batches) == len(pairs.groups) // 100
    kinds = Counter(check_batch(b, [pairs], 100) for b in batches)
    assert kinds["mono"] > 0 and kinds["cross"] > 0


@pytest.mark.parametrize("name, alpha", [("mono", 1.0), ("cross", 0.0), ("hybrid", 0.5)])
def test_hydra_configs(name, alpha):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_SAMPLER.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sampler={name}"]).sampler
    build = instantiate(cfg)
    sampler = build(datasets=[full_pairs("a", 20, 3)], batch_size=4, seed=1)
    assert isinstance(sampler, HybridBatchSampler)
    assert sampler.mono_ratio == alpha and sampler.name == name and sampler.language_weighting == "uniform"
    assert isinstance(next(iter(sampler.batch_infos())), BatchInfo)

