"""Tests of InfoNCELoss against plain, hand-written computations."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_retrieval.losses import InfoNCELoss


def reference_loss(q: torch.Tensor, p: torch.Tensor, h: torch.Tensor | None, temperature: float,
                   cosine: bool = True) -> torch.Tensor:
    """Per-row -log softmax written out with loops, query -> passage direction."""
    if cosine:
        q = q / q.norm(dim=-1, keepdim=True)
        p = p / p.norm(dim=-1, keepdim=True)
        h = h / h.norm(dim=-1, keepdim=True) if h is not None else None
    candidates = list(p) + (list(h) if h is not None else [])
    total = torch.zeros((), dtype=q.dtype)
    for i in range(len(q)):
        scores = torch.stack([torch.dot(q[i], c) / temperature for c in candidates])
        total = total - (scores[i] - torch.log(torch.sum(torch.exp(scores))))
    return total / len(q)


def embeddings(batch: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0])
def test_matches_loop_reference(similarity, temperature):
    q, p, h = embeddings()
    if similarity == "dot":  # keep raw dot products in a range where the loss is not saturated
        q, p, h = q / 3, p / 3, h / 3
    loss = InfoNCELoss(temperature=temperature, similarity=similarity)
    cosine = similarity == "cosine"
    torch.testing.assert_close(loss(q, p), reference_loss(q, p, None, temperature, cosine), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss(q, p, h), reference_loss(q, p, h, temperature, cosine), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_hard_negatives", [False, True])
def test_gradients_match_autograd_of_the_plain_formula(with_hard_negatives):
    q, p, h = (t.clone().requires_grad_(True) for t in embeddings(seed=1))
    hard = h if with_hard_negatives else None
    InfoNCELoss(temperature=0.1)(q, p, hard).backward()
    ours = [t.grad.clone() for t in (q, p, h) if t.grad is not None]
    for t in (q, p, h):
        t.grad = None
    reference_loss(q, p, hard, 0.1).backward()
    reference = [t.grad.clone() for t in (q, p, h) if t.grad is not None]
    assert len(ours) == len(reference) == (3 if with_hard_negatives else 2)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_hard_negatives_add_columns_for_every_query():
    q, p, h = embeddings(seed=2)
    loss = InfoNCELoss(temperature=0.2)
    without, with_h = loss(q, p), loss(q, p, h)
    assert with_h > without, "extra negatives can only raise the loss"
    # A hard negative identical to a query's positive scores as high as the positive for that query.
    h2 = h.clone()
    h2[0] = p[0]
    assert loss(q, p, h2) > with_h
    # Each hard negative serves every query: permuting them does not change the loss ...
    torch.testing.assert_close(loss(q, p, h.flip(0)), with_h)
    # ... and (B, k, d) hard negatives equal the same vectors passed flat.
    h3 = torch.stack([h, -h], dim=1)
    torch.testing.assert_close(loss(q, p, h3), reference_loss(q, p, h3.reshape(-1, 8), 0.2))
    # Rows without a hard negative can be left out: any number of them is accepted.
    torch.testing.assert_close(loss(q, p, h[:2]), reference_loss(q, p, h[:2], 0.2))


def test_symmetric_is_the_average_of_both_directions():
    q, p, h = embeddings(seed=3)
    symmetric = InfoNCELoss(temperature=0.1, symmetric=True)
    expected = (reference_loss(q, p, None, 0.1) + reference_loss(p, q, None, 0.1)) / 2
    torch.testing.assert_close(symmetric(q, p), expected)
    # Hard negatives are passages: they enter the query -> passage direction only.
    expected_h = (reference_loss(q, p, h, 0.1) + reference_loss(p, q, None, 0.1)) / 2
    torch.testing.assert_close(symmetric(q, p, h), expected_h)


def test_learnable_temperature_gets_a_gradient_and_is_clamped():
    q, p, _ = embeddings(seed=4)
    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    assert [name for name, _ in loss_fn.named_parameters()] == ["log_temperature"]
    loss = loss_fn(q.float(), p.float())
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad.abs() > 0
    torch.testing.assert_close(loss.double(), reference_loss(q, p, None, 0.07), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-4))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    fixed = InfoNCELoss(temperature=0.05)
    assert list(fixed.parameters()) == [] and fixed.temperature.item() == pytest.approx(0.05)


def test_perfect_alignment_gives_near_zero_loss():
    q = torch.eye(16, dtype=torch.float64) * 3.0
    p = torch.eye(16, dtype=torch.float64)
    assert InfoNCELoss(temperature=0.01)(q, p).item() < 1e-30
    assert InfoNCELoss(temperature=0.01, symmetric=True)(q, p).item() < 1e-30
    # At temperature 1, orthogonal negatives still cost: log(1 + 15 / e).
    assert InfoNCELoss(temperature=1.0)(q, p).item() == pytest.approx(math.log(1 + 15 / math.e))


def test_half_precision_inputs_are_computed_in_float32():
    q, p, h = embeddings(seed=5)
    loss = InfoNCELoss()(q.bfloat16(), p.bfloat16(), h.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_loss(q, p, h, 0.05), rtol=0.05, atol=0.05)


def test_bad_input_is_refused():
    q, p, h = embeddings()
    loss = InfoNCELoss()
    with pytest.raises(ValueError, match="passage_emb"):
        loss(q, p[:-1])
    with pytest.raises(ValueError, match="hard_negative_emb"):
        loss(q, p, h[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="similarity"):
        InfoNCELoss(similarity="l2")
    with pytest.raises(ValueError, match="min_temperature"):
        InfoNCELoss(temperature=0.001, learnable_temperature=True)
