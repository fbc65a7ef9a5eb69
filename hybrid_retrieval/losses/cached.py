"""Gradient caching (GradCache, Gao et al. 2021): contrastive batches larger than memory, exact gradients.

A contrastive loss couples every row of the batch, so the batch cannot simply be split into accumulation steps
(each step would see only its own negatives). Gradient caching keeps the whole batch in the loss and only the
encoder passes in chunks:

1. embed every chunk without a graph (and remember each chunk's RNG state, so dropout repeats exactly);
2. compute the loss on the full batch of embeddings (leaf tensors), backward: the gradient of the loss with
   respect to every embedding;
3. re-embed each chunk with a graph, replaying its RNG state, and backpropagate the cached embedding gradients
   into the encoder, one chunk at a time.

Peak activation memory is that of one chunk; the parameter gradients equal the plain computation of the same
(chunk-wise) forward passes. Composes with cross-device negatives: the loss in step 2 gathers across ranks.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from hybrid_retrieval.config_error import BadValue

Inputs = Mapping[str, torch.Tensor]


class _RngState:
    """CPU and CUDA random states, captured and restored around a chunk's forward pass."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _chunks(inputs: Inputs, size: int) -> list[dict[str, torch.Tensor]]:
    rows = next(iter(inputs.values())).shape[0]
    return [{k: v[start:start + size] for k, v in inputs.items()} for start in range(0, rows, size)]


def cached_backward(encode: Callable[..., torch.Tensor], groups: Mapping[str, Inputs | None],
                    loss_fn: Callable[[dict[str, torch.Tensor | None]], torch.Tensor], chunk_size: int,
                    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """Run loss and backward over ``groups`` (e.g. query / passage / hard_negative token inputs) in chunks.

    ``encode(**inputs)`` embeds one chunk; ``loss_fn({group: embeddings or None})`` is the loss of the full
    batch; ``backward(tensor)`` backpropagates a scalar (Lightning's ``manual_backward`` under a Trainer).
    Returns the loss (detached). Parameter gradients are accumulated into ``.grad`` as ``loss.backward()`` would.
    """
    if chunk_size < 1:
        raise BadValue(f"train.grad_cache_chunk={chunk_size}: expected a positive integer")
    states: dict[str, list[_RngState]] = {}
    embeddings: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for name, inputs in groups.items():
            if inputs is None:
                embeddings[name] = None
                continue
            parts, states[name] = [], []
            for chunk in _chunks(inputs, chunk_size):
                states[name].append(_RngState())
                parts.append(encode(**chunk))
            embeddings[name] = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_fn(embeddings)
    loss.backward()  # gradients of the loss with respect to the embeddings only (they are the leaves here)
    for name, inputs in groups.items():
        if inputs is None:
            continue
        cached = embeddings[name].grad
        start = 0
        for state, chunk in zip(states[name], _chunks(inputs, chunk_size)):
            state.restore()
            emb = encode(**chunk)
            # d(sum(emb * g))/d(theta) = g^T d(emb)/d(theta): the chunk's share of the loss gradient.
            backward((emb * cached[start:start + emb.shape[0]]).sum())
            start += emb.shape[0]
    return loss.detach()
