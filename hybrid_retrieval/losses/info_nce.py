"""InfoNCE loss with in-batch negatives and optional hard negatives, for training a dual encoder."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.distributed import gather_rows_with_grad, gather_with_grad, rank_and_world

__all__ = ["InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """InfoNCE (multiple-negatives ranking) loss over a batch of (query, positive passage[, hard negative]) rows.

    For a batch of B rows, the scores are ``s[i, j] = sim(q_i, p_j) / temperature`` over the B passages,
    followed, when hard negatives are given, by ``sim(q_i, h_k) / temperature`` over all hard negatives of the
    batch (each hard negative serves every query). The loss is the cross-entropy of each row against its own
    passage (the diagonal), averaged over rows::

        loss = mean_i [ -log( exp(s[i, i]) / sum_j exp(s[i, j]) ) ]

    So every other passage of the batch (and every hard negative) is a negative for query i. With
    ``symmetric=True`` the passage-to-query direction (each passage against the B queries, hard negatives not
    involved) is added and the two directions are averaged.

    Under distributed training with ``gather_across_devices=True`` (the default) the passages, queries and hard
    negatives of every rank are gathered with their gradients (:mod:`hybrid_retrieval.distributed`), so
    each query's negatives are the whole global batch; query i of rank r keeps its own passage as the positive
    (column ``r * B + i``). The loss and, after DDP's gradient averaging, every gradient equal one process holding
    the global batch. With ``False`` each rank's negatives are its own rows only.

    Use it for retrieval training on batches whose rows are not paraphrases or translations of each other
    (otherwise in-batch negatives include false negatives; ``HybridBatchSampler`` guarantees that). The loss of
    the hybrid-batching method is the default: cosine similarity, temperature 0.05, query-to-passage only.

    Args:
        temperature: softmax temperature (0.05 is a scale of 20).
        learnable_temperature: learn the temperature, parametrised as its logarithm and clamped to
            ``[min_temperature, max_temperature]``.
        symmetric: also add the passage-to-query direction, averaged with query-to-passage.
        similarity: "cosine" (embeddings are L2-normalised inside) or "dot" (raw inner product).
        min_temperature, max_temperature: clamp bounds for a learnable temperature; they keep the logits finite.
        gather_across_devices: under DDP, use every rank's rows as negatives (see above).

    Shapes: ``query_emb`` and ``passage_emb`` are (B, d); ``hard_negative_emb`` is None, (m, d) (usually m = B,
    one per row; since every hard negative serves every query, rows without one can simply be left out) or
    (B, k, d). Returns a scalar tensor.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        similarity: Literal["cosine", "dot"] = "cosine",
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        gather_across_devices: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise BadValue(f"InfoNCELoss: temperature must be a positive number, got {temperature!r}")
        if similarity not in ("cosine", "dot"):
            raise BadValue(f"InfoNCELoss: similarity must be 'cosine' or 'dot', got {similarity!r}")
        if not 0 < min_temperature <= max_temperature:
            raise BadValue("InfoNCELoss: need 0 < min_temperature <= max_temperature, got "
                             f"{min_temperature!r} and {max_temperature!r}")
        if learnable_temperature and not min_temperature <= temperature <= max_temperature:
            raise BadValue(f"InfoNCELoss: temperature {temperature} lies outside [min_temperature, max_temperature] "
                             f"= [{min_temperature}, {max_temperature}]")
        self.learnable_temperature = bool(learnable_temperature)
        self.symmetric = bool(symmetric)
        self.similarity = similarity
        self.gather_across_devices = bool(gather_across_devices)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        # A fixed temperature stays a Python float: exact in any precision and untouched by module.to(dtype).
        self._fixed_temperature = float(temperature)
        if self.learnable_temperature:
            # Log-parametrised so that the temperature stays positive and updates are relative.
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature (clamped when learnable), as a 0-d tensor."""
        if not self.learnable_temperature:
            return torch.tensor(self._fixed_temperature)
        return self.log_temperature.clamp(math.log(self.min_temperature), math.log(self.max_temperature)).exp()

    def forward(
        self,
        query_emb: torch.Tensor,
        passage_emb: torch.Tensor,
        hard_negative_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if query_emb.ndim != 2 or passage_emb.shape != query_emb.shape:
            raise BadValue("InfoNCELoss: query_emb and passage_emb must both be (batch, dim), got "
                             f"{tuple(query_emb.shape)} and {tuple(passage_emb.shape)}")
        batch, dim = query_emb.shape
        if batch == 0:
            raise BadValue("InfoNCELoss: empty batch")
        if hard_negative_emb is not None:
            if hard_negative_emb.ndim == 3 and hard_negative_emb.shape[0] == batch and hard_negative_emb.shape[2] == dim:
                hard_negative_emb = hard_negative_emb.reshape(-1, dim)
            elif hard_negative_emb.ndim != 2 or hard_negative_emb.shape[1] != dim:
                raise BadValue(f"InfoNCELoss: hard_negative_emb must be (m, {dim}) or ({batch}, k, {dim}) to match "
                                 f"query_emb {tuple(query_emb.shape)}, got {tuple(hard_negative_emb.shape)}")

        # Half-precision logits at temperature 0.05 lose too much to rounding; compute the loss in float32.
        compute_dtype = torch.promote_types(query_emb.dtype, torch.float32)
        q = query_emb.to(compute_dtype)
        p = passage_emb.to(compute_dtype)
        h = hard_negative_emb.to(compute_dtype) if hard_negative_emb is not None else None
        if self.similarity == "cosine":
            q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
            h = F.normalize(h, dim=-1) if h is not None else None

        t = self.temperature.to(compute_dtype) if self.learnable_temperature else self._fixed_temperature
        rank, world = rank_and_world()
        all_q, all_p, all_h, offset = q, p, h, 0
        if self.gather_across_devices and world > 1:
            # Every rank must take part in each gather, hard negatives included (possibly zero rows here).
            all_p, offset = gather_with_grad(p), rank * batch
            all_q = gather_with_grad(q) if self.symmetric else q
            all_h = gather_rows_with_grad(h if h is not None else p.new_zeros((0, dim)))
            all_h = all_h if all_h.shape[0] else None
        candidates = all_p if all_h is None else torch.cat([all_p, all_h], dim=0)
        logits = q @ candidates.T / t  # (B, W*B + m); row i's positive is column offset + i
        labels = torch.arange(batch, device=logits.device) + offset
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = (loss + F.cross_entropy(p @ all_q.T / t, labels)) / 2
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature.item():.4g}, learnable_temperature={self.learnable_temperature}, "
                f"symmetric={self.symmetric}, similarity={self.similarity!r}")
