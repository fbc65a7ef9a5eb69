"""Weight interpolation with the starting model (WiSE-FT, Wortsman et al. 2022).

``merged = (1 - ratio) * start + ratio * tuned`` for every floating parameter: ratio 1 is the fine-tuned model,
0 the model it started from. Averaging the weights of a fine-tuned model with its start keeps much of the
start's zero-shot quality and much of the fine-tuning's gain, at no training cost; it needs both to share one
architecture (a fine-tuned model and its own start always do).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hybrid_retrieval.config_error import BadValue

__all__ = ["MERGE_WITH", "check_merge", "merge_into", "restore"]

MERGE_WITH = (None, "start")


def check_merge(merge_with: Any, merge_ratio: Any, option: str = "") -> float | None:
    """The ratio to merge at (None: no merge); a clear error naming the options when malformed."""
    if merge_with not in MERGE_WITH:
        raise BadValue(f"{option}merge_with={merge_with!r}: expected null or 'start' (the model training began from)")
    if merge_with is None:
        return None
    if isinstance(merge_ratio, bool) or not isinstance(merge_ratio, (int, float)) or not (
            math.isfinite(merge_ratio) and 0.0 <= merge_ratio <= 1.0):
        raise BadValue(f"{option}merge_ratio={merge_ratio!r}: expected a number in [0, 1] (1 = the fine-tuned "
                         "weights, 0 = the starting model's)")
    return float(merge_ratio)


@torch.no_grad()
def merge_into(model: nn.Module, start: nn.Module, ratio: float, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Replace ``model``'s floating parameters by ``(1 - ratio) * start + ratio * model``, in place.

    Returns the replaced values (for :func:`restore`). ``trainable_only`` skips parameters that do not require
    gradients (frozen ones still equal the start's, so their merge would change nothing).
    """
    reference = dict(start.named_parameters())
    previous: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point() or (trainable_only and not parameter.requires_grad):
            continue
        if name not in reference or reference[name].shape != parameter.shape:
            raise BadValue(f"cannot merge: parameter {name!r} of the model has no counterpart of shape "
                             f"{tuple(parameter.shape)} in the starting model (a different architecture)")
        previous[name] = parameter.detach().clone()
        parameter.copy_(torch.lerp(reference[name].to(parameter.device, parameter.dtype), parameter, ratio))
    return previous


@torch.no_grad()
def restore(model: nn.Module, previous: dict[str, torch.Tensor]) -> None:
    """Put back the values :func:`merge_into` replaced."""
    for name, parameter in model.named_parameters():
        if name in previous:
            parameter.copy_(previous[name])
