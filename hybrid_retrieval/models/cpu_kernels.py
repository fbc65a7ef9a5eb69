"""oneDNN linear layers for fp32 inference on CPU, swapped in for the length of an encoding.

On CPU, ``torch.nn.functional.linear`` in float32 runs the BLAS behind ``torch.matmul`` (MKL in the PyPI wheel);
oneDNN's inner-product primitive, which PyTorch ships too, ran every layer shape of me5_small 7-14 % faster on
the CPUs measured (``benchmarks/bench_encode.py`` prints both rates), and it can apply GELU inside the same
kernel instead of a second pass over the feed-forward activations. :func:`onednn_linears` swaps them in for the
duration of a ``with`` block and restores the model exactly as it was afterwards. Results equal the default
path's to float rounding (about 1e-7 on unit-length embeddings; the tests check 1e-5).

Only inference changes: the swapped layers fall back to ``torch.nn.functional.linear`` whenever autograd
records, under autocast, for other dtypes and devices, so training and bf16 encoding run as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["available", "onednn_linears"]


def available() -> bool:
    """Whether this torch build has oneDNN and the fused linear operator used here."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu"
        and weight.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    )


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU inference runs oneDNN's inner product; anything else runs ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class OneDNNGeluLinear(nn.Linear):
    """``gelu(linear(x))`` (exact, erf-based GELU) in one oneDNN kernel for fp32 CPU inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [None], "none")
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


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s ``nn.Linear`` layers run oneDNN for fp32 CPU inference, with the GELU of
    BERT-style feed-forward blocks fused into their first linear layer. Parameters, buffers and ``state_dict`` are
    untouched (only the layers' Python classes change); the model is restored on exit, also after an error.
    A no-op when `enabled` is false or this torch build lacks the operator."""
    if not enabled or not available():
        yield
        return
    intermediates = _fusable_intermediates(model)
    fused = {id(m.dense) for m in intermediates}
    activations = [(m, m.intermediate_act_fn) for m in intermediates]
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        for layer in linears:
            layer.__class__ = OneDNNGeluLinear if id(layer) in fused else OneDNNLinear
        for block, _ in activations:
            block.intermediate_act_fn = nn.Identity()
        yield
    finally:
        for block, act in activations:
            block.intermediate_act_fn = act
        for layer in linears:
            layer.__class__ = nn.Linear
