"""Row-sparse training of the vocabulary matrix with AdamW's arithmetic, exactly (``train.sparse_embeddings``).

A multilingual encoder's vocabulary matrix (250k rows: 82 % of me5_small's parameters) has a few hundred rows in a
batch. Dense training pays for all of it every step: a zero-filled 250k-row gradient, AdamW reading and writing the
weights, the gradient and both moments, and the gradient norm. Here the embedding returns a sparse gradient and
:class:`RowSparseAdamW` updates only *active* rows: rows that a training forward pass has read. That is the same
update as dense AdamW: a row that never had a gradient has zero moments, so AdamW moves it by weight decay alone,
``p <- p (1 - lr wd)``, the same factor for every such row. The product of those factors is kept as one number
(``pending``) and applied to a row when it becomes active (a forward pre-hook, before the row is read) and to every
inactive row when the matrix is read whole (:meth:`RowSparseAdamW.materialise`: state_dict, validation, the end
of training). Active rows then follow torch's AdamW formula step by step, moments and bias corrections included.

One process only: DDP reduces dense gradients, so distributed runs keep the dense path.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
from torch import nn


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW (torch's, fused where it can be) for the dense parameters, plus the row-sparse update of one
    embedding matrix; one optimiser to Lightning and the learning-rate schedule.

    ``dense_groups`` are AdamW parameter groups; ``embedding`` gets ``embedding_weight_decay``. The embedding is
    switched to sparse gradients and given the pre-hook that activates the rows a training forward pass reads.
    """

    def __init__(self, dense_groups: list[dict[str, Any]], embedding: nn.Embedding, lr: float,
                 embedding_weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 **kernel: bool) -> None:
        inner = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps, **kernel)
        sparse_group = {"params": [embedding.weight], "weight_decay": embedding_weight_decay, "sparse_rows": True}
        super().__init__([*inner.param_groups, sparse_group], dict(inner.defaults))
        self.inner = inner
        self._share_with_inner()
        embedding.sparse = True
        owner = weakref.ref(self)

        def activate_read_rows(module: nn.Module, args: tuple[Any, ...]) -> None:
            # Every training-mode read, with or without a graph (gradient caching embeds without one first);
            # validation (eval mode) reads the matrix materialised.
            optimizer = owner()
            if optimizer is not None and module.training:
                optimizer.activate(args[0].reshape(-1))

        def materialise_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
            optimizer = owner()
            if optimizer is not None:
                optimizer.materialise()

        embedding.register_forward_pre_hook(activate_read_rows)
        embedding.register_state_dict_pre_hook(materialise_before_saving)

    def _share_with_inner(self) -> None:
        # The inner AdamW steps the dense groups: the same group dicts (so the schedule's lr reaches it) and the
        # same state (so one state_dict holds everything).
        self.inner.param_groups = self.param_groups[:-1]
        self.inner.state = self.state

    def state_dict(self) -> dict[str, Any]:
        # Saved with the decay applied, whichever of weights and optimiser is saved first: pending is then 1 in
        # both, and a restart does not apply it twice.
        self.materialise()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        state = self.state.get(self._weight)
        if state:  # Optimizer.load_state_dict casts every tensor to the parameter's dtype: indices back to int
            for key in ("rows", "slot"):
                state[key] = state[key].round().long()
        self._share_with_inner()

    # ------------------------------------------------------------------------------------------- sparse state

    @property
    def _weight(self) -> nn.Parameter:
        return self.param_groups[-1]["params"][0]

    def _sparse_state(self) -> dict[str, Any]:
        weight = self._weight
        state = self.state[weight]
        if not state:
            rows, dim = weight.shape
            state.update({
                "step": torch.tensor(0.0),
                "count": 0,  # active rows; the first `count` entries of `rows`, `exp_avg`, `exp_avg_sq` are theirs
                "rows": torch.empty(0, dtype=torch.long, device=weight.device),
                "slot": torch.full((rows,), -1, dtype=torch.long, device=weight.device),  # row -> its entry, -1 = none
                "exp_avg": torch.zeros(0, dim, dtype=weight.dtype, device=weight.device),
                "exp_avg_sq": torch.zeros(0, dim, dtype=weight.dtype, device=weight.device),
                "pending": 1.0,  # weight decay not yet applied to the inactive rows
            })
        return state

    @torch.no_grad()
    def activate(self, rows: torch.Tensor) -> None:
        """Make these rows active: apply their pending weight decay and give them (zero) moments."""
        state = self._sparse_state()
        rows = torch.unique(rows.to(state["slot"].device))
        new = rows[state["slot"][rows] < 0]
        if not len(new):
            return
        weight, count = self._weight, state["count"]
        if state["pending"] != 1.0:
            weight[new] *= state["pending"]
        needed = count + len(new)
        if needed > len(state["rows"]):  # grow by doubling: a few copies over a whole run
            capacity = max(needed, 2 * len(state["rows"]), 1024)
            for key in ("rows", "exp_avg", "exp_avg_sq"):
                old = state[key]
                grown = old.new_zeros((capacity, *old.shape[1:]))
                grown[:count] = old[:count]
                state[key] = grown
        state["rows"][count:needed] = new
        state["slot"][new] = torch.arange(count, needed, device=new.device)
        state["count"] = needed

    @torch.no_grad()
    def materialise(self) -> None:
        """Apply the pending weight decay to every inactive row: the matrix then holds its true values."""
        state = self._sparse_state()
        if state["pending"] != 1.0:
            factor = torch.where(state["slot"] >= 0, 1.0, state["pending"]).to(self._weight.dtype)
            self._weight.mul_(factor[:, None])
            state["pending"] = 1.0

    def sparse_gradient(self) -> torch.Tensor | None:
        """The embedding's gradient, coalesced (duplicate rows summed) in place; None before a backward pass."""
        grad = self._weight.grad
        if grad is not None and grad.is_sparse and not grad.is_coalesced():
            grad = self._weight.grad = grad.coalesce()
        return grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.inner.step()
        group, weight = self.param_groups[-1], self._weight
        state = self._sparse_state()
        grad = self.sparse_gradient()
        if grad is not None and not grad.is_sparse:
            raise RuntimeError("RowSparseAdamW: the embedding's gradient is dense; was embedding.sparse reset?")
        lr, decay, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = group["betas"]
        if grad is not None:
            self.activate(grad.indices()[0])
        state["step"] += 1
        count = state["count"]
        if count:
            rows = state["rows"][:count]
            exp_avg, exp_avg_sq = state["exp_avg"][:count], state["exp_avg_sq"][:count]
            dense = torch.zeros_like(exp_avg)
            if grad is not None:
                dense[state["slot"][grad.indices()[0]]] = grad.values().to(dense.dtype)
            param = weight[rows]
            # torch.optim.AdamW's single-tensor update, on the active rows
            step = float(state["step"])
            param.mul_(1 - lr * decay)
            exp_avg.lerp_(dense, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(dense, dense, value=1 - beta2)
            step_size = lr / (1 - beta1 ** step)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            weight[rows] = param
        state["pending"] *= 1 - lr * decay
        return loss


def clip_gradients(optimizer: RowSparseAdamW, max_value: float, algorithm: str = "norm") -> None:
    """Gradient clipping over every parameter, the sparse embedding gradient included (``clip_grad_norm_`` and
    ``clip_grad_value_`` take dense gradients only): the same total norm and scale as for the dense gradient."""
    sparse = optimizer.sparse_gradient()
    dense = [p.grad for group in optimizer.param_groups[:-1] for p in group["params"] if p.grad is not None]
    values = [sparse.values()] if sparse is not None else []
    if algorithm == "value":
        for tensor in dense + values:
            tensor.clamp_(-max_value, max_value)
        return
    if not dense + values:
        return
    # The sparse gradient's values hold every nonzero of its dense equivalent once (coalesced), so its norm is that
    # tensor's norm; coefficient as in torch.nn.utils.clip_grad_norm_.
    total = torch.nn.utils.get_total_norm(dense + values)
    torch._foreach_mul_(dense + values, torch.clamp(max_value / (total + 1e-6), max=1.0))
