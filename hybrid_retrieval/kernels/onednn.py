"""oneDNN linear layers for fp32 inference on CPU, swapped in for the length of an encoding.

On CPU, ``torch.nn.functional.linear`` in float32 runs the BLAS behind ``torch.matmul`` (MKL in the PyPI wheel);
oneDNN's inner-product primitive, which PyTorch ships too, ran every layer shape of me5_small 7-14 % faster on the
CPUs measured (``benchmarks/bench_encode.py`` prints both rates), and it can apply GELU inside the same kernel
instead of a second pass over the feed-forward activations. :func:`onednn_linears` swaps them in for the duration of
a ``with`` block, joins each self-attention's query, key and value weights into one ``[3 * width, hidden]`` layer
for the packed forward (:func:`fused_qkv`: one product instead of three and a concatenation), reorders every weight
once into oneDNN's blocked layout (about 5 % faster products), and restores the model exactly as it was afterwards.
Results equal the default path's to float rounding (about 1e-7 on unit-length embeddings; the tests check 1e-5).

Only inference changes: the swapped layers fall back to ``torch.nn.functional.linear`` whenever autograd
records, under autocast, for other dtypes and devices, so training and bf16 encoding run as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OneDNNLinear", "attention_scale", "available", "fused_qkv", "onednn_linears", "runs_onednn"]

# The attribute of a self-attention module holding its joined Q/K/V layer while onednn_linears is active: a plain
# attribute (a tuple), not a submodule, so state_dict and parameters() do not see it.
_FUSED_QKV = "_onednn_fused_qkv"
# Each swapped layer's weight reordered once into oneDNN's blocked layout (about 5 % faster products than
# reordering the plain weight on every call); a plain attribute too. It costs a second copy of the linear weights
# for the length of the block.
_PACKED_WEIGHT = "_onednn_packed_weight"
# Rows per product the packed layout is chosen for; the layouts measured did not depend on it (64 to 2,000 rows).
_PACKING_ROWS = 1024


def available() -> bool:
    """Whether this torch build has oneDNN and the fused linear operator used here."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a swapped layer runs oneDNN on `x`: fp32 on CPU, autograd not recording, autocast off."""
    return (
        x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu"
        and weight.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    )


def _onednn_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight in oneDNN's blocked layout where :func:`onednn_linears` packed it, else the parameter."""
    return layer.__dict__.get(_PACKED_WEIGHT, layer.weight)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU inference runs oneDNN's inner product; anything else runs ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(self), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class OneDNNGeluLinear(nn.Linear):
    """``gelu(linear(x))`` (exact, erf-based GELU) in one oneDNN kernel for fp32 CPU inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(self), self.bias, "gelu", [None], "none")
        return F.gelu(F.linear(x, self.weight, self.bias))


def _is_exact_gelu(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    # transformers' GELUActivation (BERT, XLM-R, E5's "gelu") calls torch's exact GELU unless built in Python mode.
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def _fusable_intermediates(model: nn.Module) -> list[nn.Module]:
    """BERT-family feed-forward inputs: modules whose forward is ``intermediate_act_fn(dense(x))`` with exact GELU
    (``BertIntermediate``, ``XLMRobertaIntermediate`` and the like)."""
    return [
        m for m in model.modules()
        if type(m).__name__.endswith("Intermediate") and type(getattr(m, "dense", None)) is nn.Linear
        and _is_exact_gelu(getattr(m, "intermediate_act_fn", None))
    ]


def _self_attentions(model: nn.Module) -> list[nn.Module]:
    """BERT-family self-attention modules: plain ``nn.Linear`` query, key and value of one shape."""
    found = []
    for m in model.modules():
        layers = [getattr(m, name, None) for name in ("query", "key", "value")]
        if all(type(layer) is nn.Linear and layer.bias is not None for layer in layers) and len(
                {tuple(layer.weight.shape) for layer in layers}) == 1:
            found.append(m)
    return found


def attention_scale(attention: nn.Module) -> float:
    """The factor a BERT-family self-attention applies to its scores: ``scaling``, else 1/sqrt(head size)."""
    return float(getattr(attention, "scaling", attention.attention_head_size ** -0.5))


def fused_qkv(attention: nn.Module) -> OneDNNLinear | None:
    """The joined query/key/value layer :func:`onednn_linears` gave `attention` (outputs: queries, keys, values
    side by side; the queries already multiplied by :func:`attention_scale`, so attention scores need no
    scaling), or None outside the block."""
    joined = getattr(attention, _FUSED_QKV, None)
    return joined[0] if joined is not None else None


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s ``nn.Linear`` layers run oneDNN for fp32 CPU inference, with the GELU of
    BERT-style feed-forward blocks fused into their first linear layer, weights packed once for oneDNN (read when
    the block opens: changing them inside it changes only what autograd or autocast runs). Parameters, buffers
    and ``state_dict`` are untouched (only the layers' Python classes change); the model is restored on exit,
    also after an error.

    Safe for threads sharing one model: blocks of one model overlap into one swapped state, made by the first to
    open and restored by the last to close (a second swap would take the swapped layers for the originals and
    restore those). A no-op when `enabled` is false or this torch build lacks the operator."""
    if not enabled or not available():
        yield
        return
    with _ACTIVE_LOCK:
        active = _ACTIVE.get(id(model))
        if active is None:
            active = _ACTIVE[id(model)] = [0, _swap_in(model)]
        active[0] += 1
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            active[0] -= 1
            if active[0] == 0:
                del _ACTIVE[id(model)]
                active[1]()


# id(model) -> [open blocks, the function that restores it]: the models onednn_linears holds swapped now.
_ACTIVE: dict[int, list[Any]] = {}
_ACTIVE_LOCK = threading.Lock()


def _swap_in(model: nn.Module) -> Callable[[], None]:
    """Swap `model`'s layers as :func:`onednn_linears` describes; returns the function that restores them."""
    intermediates = _fusable_intermediates(model)
    fused = {id(m.dense) for m in intermediates}
    activations = [(m, m.intermediate_act_fn) for m in intermediates]
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    attentions = _self_attentions(model)

    def restore() -> None:
        for attention in attentions:
            attention.__dict__.pop(_FUSED_QKV, None)
        for block, act in activations:
            block.intermediate_act_fn = act
        for layer in linears:
            layer.__dict__.pop(_PACKED_WEIGHT, None)
            layer.__class__ = nn.Linear

    try:
        for attention in attentions:
            with torch.no_grad():
                parts = [getattr(attention, name) for name in ("query", "key", "value")]
                # skip_init: the parameters are overwritten at once, so no random initialisation is drawn.
                joined = nn.utils.skip_init(OneDNNLinear, parts[0].in_features, 3 * parts[0].out_features,
                                            device=parts[0].weight.device, dtype=parts[0].weight.dtype)
                scale = attention_scale(attention)
                joined.weight.copy_(torch.cat([parts[0].weight * scale, parts[1].weight, parts[2].weight]))
                joined.bias.copy_(torch.cat([parts[0].bias * scale, parts[1].bias, parts[2].bias]))
            object.__setattr__(attention, _FUSED_QKV, (joined.requires_grad_(False),))
        for layer in linears:
            layer.__class__ = OneDNNGeluLinear if id(layer) in fused else OneDNNLinear
        for layer in linears + [fused_qkv(attention) for attention in attentions]:
            if layer.weight.dtype is torch.float32 and layer.weight.device.type == "cpu":
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), _PACKING_ROWS)
                object.__setattr__(layer, _PACKED_WEIGHT, packed)
        for block, _ in activations:
            block.intermediate_act_fn = nn.Identity()
    except BaseException:
        restore()
        raise
    return restore
