"""What distributed training shares between ranks: embeddings with their gradients (so in-batch negatives span
the global batch) and evaluation embeddings (so each rank encodes a share of an evaluation set).

Under DDP each rank holds its own rows. :func:`gather_with_grad` concatenates every rank's tensor in rank order;
its backward sums the gradients each rank's loss sends to a copy, so a rank's own rows receive the gradients of
all ranks' losses. DDP then averages parameter gradients over ranks, which makes the update exactly that of one
process holding the whole global batch (the mean of the per-rank losses is its loss).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gathered gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss contributes to every rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank order, differentiable."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    return _AllGather.apply(tensor)


def gather_rows_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors whose number of rows differs per rank (hard negatives)."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if longest == 0:
        return tensor
    padded = tensor
    if tensor.shape[0] < longest:
        padded = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))], dim=0)
    parts = gather_with_grad(padded).split(longest, dim=0)
    return torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0)


def encode_across_ranks(encoder: Any, texts: Sequence[str], kind: str, **options: Any) -> np.ndarray:
    """``encoder.encode(texts, kind, **options)``, the batches split over ranks and gathered once.

    Each rank runs every ``world``-th batch of the single-process plan, so every embedding comes from the same
    batch it would have in one process; all ranks get the full array.
    """
    rank, world = rank_and_world()
    if world == 1:
        return encoder.encode(texts, kind, **options)
    mine = encoder.encode(texts, kind, shard=(rank, world), **options)
    rows = encoder.shard_rows(texts, kind, options.get("batch_size", 64), rank, world,
                              options.get("max_batch_tokens"))
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (rows, mine[rows]))
    out = np.empty_like(mine)
    for share_rows, share in shares:
        out[share_rows] = share
    return out
