"""Dropout whose CPU mask comes from a fast bit generator: the same distribution as ``torch.nn.functional.dropout``.

On CPU, torch draws a dropout mask with ``bernoulli_`` from its Mersenne-Twister generator, one element at a time
on one thread: about 5 ns an element, 15-20 % of a training step of a small encoder (two dropouts per layer on
the hidden states and one on the attention probabilities; ``benchmarks/bench_train.py --profile`` shows it).
:func:`dropout` instead takes one 63-bit seed from torch's default generator and lets numpy's PCG64 fill the mask's
random bits (32 per element, about 0.4 ns each): an element is kept when its 32 random bits, read as a signed
integer, reach ``round(p * 2**32) - 2**31``, so the drop probability is ``p`` rounded to a multiple of 2**-32
(finer than ``torch.rand``'s 2**-24). Kept elements are scaled by ``1 / (1 - p)`` as in torch.

Because the seed is drawn from torch's generator, everything that replays torch's RNG state replays the mask:
``torch.manual_seed`` / Lightning's ``seed_everything``, activation checkpointing's recomputation and the cached
losses' second pass (:mod:`hybrid_retrieval.losses.cached`). Masks differ from torch's own draws, so a run is
equal in distribution, not bit-identical, to one using ``F.dropout``. Other devices (CUDA's generator is fast)
and ``p`` of 0 or 1 run ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["dropout", "keep_mask"]

_SEED_RANGE = 2**63 - 1


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of `shape`, each element True with probability ``1 - p`` (to 2**-32), independently."""
    count = 1
    for size in shape:
        count *= int(size)
    seed = int(torch.randint(_SEED_RANGE, (1,)).item())  # one draw from torch's generator: replayable
    bits = np.random.PCG64(seed).random_raw((count + 1) // 2)  # 64 random bits give two elements
    lanes = torch.from_numpy(bits).view(torch.int32)[:count].view(shape)
    return lanes >= round(p * 2**32) - 2**31


def dropout(x: torch.Tensor, p: float | nn.Dropout, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask of :func:`keep_mask` on CPU. `p` may be an ``nn.Dropout``
    module, whose probability and ``training`` flag are used."""
    if isinstance(p, nn.Dropout):
        p, training = p.p, p.training
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return torch.where(keep_mask(x.shape, p), x * (1.0 / (1.0 - p)), 0.0)
