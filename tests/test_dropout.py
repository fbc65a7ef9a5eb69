"""kernels/dropout.py: the fast CPU dropout keeps each element with probability 1 - p, scales by 1 / (1 - p), and
replays its mask wherever torch's RNG state is replayed; attention groups (kernels/unpadded.py) are the cheapest
split of the rows."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from hybrid_retrieval.kernels.dropout import dropout, keep_mask
from hybrid_retrieval.kernels.unpadded import attention_groups, pack


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_001  # odd: the last 64-bit draw is half used
    kept = keep_mask((n,), p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma


def test_elements_are_independent_of_their_neighbours() -> None:
    torch.manual_seed(1)
    mask = keep_mask((1_000_000,), 0.5).double()
    # Two elements come from one 64-bit draw: their correlation (and a lag-2 one) must be that of independent draws.
    for lag in (1, 2):
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(mask.numel())


def test_scaling_zeros_and_identity_cases() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 70)
    y = dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.6 < kept.double().mean().item() < 0.9
    assert dropout(x, 0.25, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = nn.Dropout(0.25).eval()
    assert dropout(x, module) is x
    assert dropout(x.bfloat16(), 0.25).dtype is torch.bfloat16


def test_mask_replays_with_torch_rng_state() -> None:
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    first = dropout(x, 0.1)
    state = torch.get_rng_state()
    second = dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1), first)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1), second)
    assert not torch.equal(first, second)


def test_gradient_is_the_mask_scaled() -> None:
    torch.manual_seed(4)
    x = torch.randn(50, 20, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    expected = (y != 0).float() / 0.7
    assert torch.allclose(x.grad, expected)


def _cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[r] for r in g) ** 2 for g in groups) + overhead * len(groups)


def test_attention_groups_are_the_cheapest_split() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([0, 1, 3, 8, 20, 40, 63, 64]) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 100, 2048])
        groups = attention_groups(lengths, 4, overhead)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
        best = min(
            _cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], overhead)
            for k in range(1, 5) for cuts in itertools.combinations(range(1, len(order)), k - 1))
        assert _cost(lengths, groups, overhead) == best


def test_pack_places_every_real_token_in_its_group() -> None:
    lengths = [40, 28, 34, 37, 54, 23, 14, 47, 29, 25, 21, 64, 64, 0, 31, 32]
    mask = torch.arange(64).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    packing = pack(mask)
    assert len(packing.groups) > 1 and pack(mask, max_groups=1).size == 16 * 64
    assert packing.size == sum(g.count * g.width for g in packing.groups) < 16 * 64
    assert len(set(packing.slots.tolist())) == sum(lengths)  # no two tokens share a slot
    for group in packing.groups:
        assert group.key_mask.shape == (group.count, 1, 1, group.width)
        assert group.key_mask.any(-1).all()  # every row, the empty one included, has a key
    # Each token's slot lies in the block of a group at least as wide as its row.
    for token, slot in zip(packing.batch_index.tolist(), packing.slots.tolist()):
        group = next(g for g in packing.groups if g.offset <= slot < g.offset + g.count * g.width)
        assert group.width >= lengths[token]
