"""Matryoshka representation learning (Kusupati et al., 2022): one model usable at several embedding sizes.

:class:`MatryoshkaLoss` wraps a loss over embeddings (``InfoNCELoss``) and sums it, weighted, over truncated
prefixes of the embeddings::

    loss = sum_k  w_k * base(q[:, :d_k], p[:, :d_k], h[..., :d_k])

each prefix shorter than the full embedding re-normalised to unit length (truncating a unit vector leaves a shorter
one, and retrieval at ``d_k`` dimensions scores re-normalised prefixes: ``model.truncate_dim``). The base loss is
one module shared by every size, so a learnable temperature is shared too; a dimension equal to the full size
passes the embeddings through untouched (the loss with ``dims=[full]`` is the base loss exactly).

It works on embeddings only, so it composes with everything that hands embeddings to a loss: hybrid batches,
cross-device negatives (the base loss gathers each prefix across ranks with its gradient) and gradient caching
(:mod:`hybrid_retrieval.losses.cached` differentiates it with respect to the full embeddings).

Use it to train a model whose embeddings are cut to a smaller size at search time (``model.truncate_dim=k``:
smaller indexes, faster search), e.g. ``matryoshka.dims=[384,256,128,64]`` (the ``matryoshka`` node of
``conf/config.yaml``: it wraps whatever ``loss`` builds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_retrieval.config_error import BadValue

__all__ = ["MatryoshkaLoss", "check_matryoshka"]


def check_matryoshka(dims: Any, weights: Any = None, embedding_dim: int | None = None) -> None:
    """Raise ValueError naming ``matryoshka.dims`` / ``matryoshka.weights`` when they are unusable."""
    if dims is None:
        if weights is not None:
            raise BadValue(f"matryoshka.weights={list(weights)} is set but matryoshka.dims is null; set "
                             "matryoshka.dims=[...] too, or matryoshka.weights=null")
        return
    dims = list(dims) if isinstance(dims, Sequence) and not isinstance(dims, str) else dims
    if not isinstance(dims, list) or not dims or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise BadValue(f"matryoshka.dims={dims!r}: expected a non-empty list of positive integers, e.g. "
                         "[384,256,128,64], or null (off)")
    if len(set(dims)) != len(dims):
        raise BadValue(f"matryoshka.dims={dims}: a dimension is listed twice")
    if embedding_dim is not None and max(dims) > embedding_dim:
        raise BadValue(f"matryoshka.dims={dims}: {max(dims)} exceeds the model's {embedding_dim} embedding "
                         f"dimensions; use dimensions <= {embedding_dim}")
    if weights is not None:
        weights = list(weights) if isinstance(weights, Sequence) and not isinstance(weights, str) else weights
        if not isinstance(weights, list) or len(weights) != len(dims) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in weights) or not any(w > 0 for w in weights):
            raise BadValue(f"matryoshka.weights={weights!r}: expected {len(dims)} non-negative numbers (one per "
                             f"dimension of matryoshka.dims={dims}, not all 0), or null (equal weights)")


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` components, re-normalised; the tensor itself when ``dim`` is its full size."""
    if dim >= embeddings.shape[-1]:
        return embeddings
    return F.normalize(embeddings[..., :dim], p=2, dim=-1)


class MatryoshkaLoss(nn.Module):
    """A loss over embeddings, summed (weighted) over truncated, re-normalised prefixes (see the module docstring).

    Args:
        loss: ``loss(query_emb, passage_emb, hard_negative_emb | None, **kwargs) -> scalar`` (``InfoNCELoss``).
        dims: the prefix sizes, e.g. ``[384, 256, 128, 64]``; each at most the embedding size.
        weights: one weight per size; None = 1 each (a sum, as sentence-transformers' ``MatryoshkaLoss``).
    """

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        check_matryoshka(dims, weights)
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.dims)

    @property
    def temperature(self) -> Any:
        """The base loss's temperature (shared by every size); what training logs."""
        return getattr(self.loss, "temperature", None)

    def forward(self, query_emb: torch.Tensor, passage_emb: torch.Tensor,
                hard_negative_emb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        full = query_emb.shape[-1]
        if max(self.dims) > full:
            raise BadValue(f"matryoshka.dims={self.dims}: {max(self.dims)} exceeds the {full} dimensions of "
                             "the embeddings")
        total: torch.Tensor | None = None
        for dim, weight in zip(self.dims, self.weights):
            if weight == 0:
                continue
            negatives = truncate(hard_negative_emb, dim) if hard_negative_emb is not None else None
            term = self.loss(truncate(query_emb, dim), truncate(passage_emb, dim), negatives, **kwargs)
            term = term if weight == 1 else weight * term
            total = term if total is None else total + term
        assert total is not None  # check_matryoshka: some weight is positive
        return total

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights={self.weights}"
