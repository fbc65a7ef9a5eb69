"""Packed ("unpadded") forward of BERT-family encoders: per-token work runs on the real tokens only.

A padded batch of B texts of up to L tokens runs every linear layer, GELU, LayerNorm, residual add and dropout on
B x L rows, padding included. Here the real tokens are gathered once with the attention mask into a
``[total_real_tokens, hidden]`` matrix (as FlashAttention's ``bert_padding`` utilities and ModernBERT do) and
everything runs on it, except attention: each layer re-pads its queries, keys and values, calls
``torch.nn.functional.scaled_dot_product_attention`` with the key padding mask, and gathers the real rows back.
On CPU the rows are re-padded in up to four groups of similar length (:func:`attention_groups`: the split that
minimises the padded attention work plus a per-call cost), so a batch of short questions and a few long texts
does not pay the longest row's width everywhere. Where the rows come in at most 16 runs of equal length
(``Encoder.encode`` sorts texts by length) and dropout is off, each run attends in place on the packed tokens:
no padding, scatter or gather at all. LayerNorm and dropout are per token, so they are safe on packed
tokens; attention is not, hence the re-pad. Dropout (hidden states and, in training on CPU, the attention
probabilities, whose product then runs outside SDPA) draws its masks with :mod:`hybrid_retrieval.kernels.dropout`.

The forward calls the backbone's own modules (embeddings, ``attention.self.query/key/value``, ``attention.output``'s
and ``output``'s dense / dropout / LayerNorm, ``intermediate``): no parameter is copied, ``state_dict`` and
checkpoints are the padded model's. Within :func:`hybrid_retrieval.kernels.onednn.onednn_linears` (fp32 CPU
inference) Q/K/V run as one joined product. Position ids are the padded path's (BERT's column index; XLM-R's
``padding_idx + cumulative count of non-pad ids``), gathered with the tokens, as are token type ids. Results equal
the padded forward's on the real tokens to float rounding; dropout draws its masks on the packed tokens, so a
training step with dropout is equal in distribution, not bit-identical.

Supported: transformers' ``BertModel``, ``XLMRobertaModel``, ``RobertaModel`` and ``CamembertModel`` as bidirectional
encoders with absolute position embeddings. Anything else (another model type, a compiled or wrapped backbone,
``is_decoder``, cross-attention, relative position embeddings, ``output_attentions`` / ``output_hidden_states``)
has an :func:`unsupported_reason`, and :class:`hybrid_retrieval.models.encoder.Encoder` runs the padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from hybrid_retrieval.kernels.onednn import attention_scale, fused_qkv, runs_onednn
from hybrid_retrieval.kernels.dropout import dropout

__all__ = ["SUPPORTED_MODEL_TYPES", "AttentionGroup", "Packing", "attention_groups", "equal_length_runs", "pack",
           "packed_forward", "position_ids", "unsupported_reason"]

SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "camembert")
# The transformers classes whose module tree (embeddings, encoder.layer[i].attention.self/output, intermediate,
# output) the packed forward walks; a subclass or wrapper (torch.compile, PEFT) may change what forward does.
SUPPORTED_CLASSES = ("BertModel", "XLMRobertaModel", "RobertaModel", "CamembertModel")


# Cost of one more attention call, in the unit of attention_groups' cost (rows x width**2): about what 2,048
# padded attention cells cost in time on the CPUs measured (a call's fixed work against its per-cell work).
GROUP_OVERHEAD = 2048
MAX_GROUPS = 4
# A batch whose rows come as at most this many runs of equal length (Encoder.encode sorts texts by length) runs
# attention on the packed tokens in place, one call per run: no padding, no scatter into a buffer, no gather back.
MAX_EXACT_GROUPS = 16
# Up to this many keys, fp32 attention on CPU is faster as two matmuls and a softmax than as SDPA's blocked kernel
# (head size 32: about 2x at 20-60 keys, 2.5x slower at 128, on the 2-core CPUs measured).
MATMUL_ATTENTION_WIDTH = 64


@dataclass(frozen=True)
class AttentionGroup:
    """Rows whose attention runs in one call: ``count`` rows padded to ``width``, stored from row ``offset`` of
    the ``[Packing.size, ...]`` attention buffer; ``key_mask``: ``[count, 1, 1, width]``, True at real keys, or
    None where every key is real."""

    count: int
    width: int
    offset: int
    key_mask: torch.Tensor | None


@dataclass(frozen=True)
class Packing:
    """Where a padded batch's real tokens are, for gathering them and for re-padding attention inputs.

    ``flat``: index of each real token in the flattened ``[batch * width]`` input, row-major (the packed order);
    ``batch_index``: the row of each real token; ``lengths``: real tokens per row; ``max_len``: the longest row.
    Attention runs per :class:`AttentionGroup` (rows of similar length padded to their group's longest):
    ``slots`` is each real token's row in the attention buffer of ``size`` rows that holds every group's block.
    ``in_place``: the buffer is the packed tokens themselves (every group a run of consecutive rows of one length,
    in row order; ``slots`` is then ``arange(total)``), so attention reads and writes them without copies.
    """

    flat: torch.Tensor
    batch_index: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    batch: int
    max_len: int
    groups: tuple[AttentionGroup, ...]
    size: int
    in_place: bool = False

    @property
    def total(self) -> int:
        return int(self.flat.numel())

    def starts(self) -> torch.Tensor:
        """Packed index of each row's first real token."""
        return torch.cumsum(self.lengths, 0) - self.lengths


def attention_groups(lengths: list[int], max_groups: int = MAX_GROUPS,
                     overhead: int | None = None) -> list[list[int]]:
    """Rows (indices into `lengths`) split into at most `max_groups` groups of similar length, each group's rows
    in increasing length, groups in increasing width: the split of the length-sorted rows minimising the padded
    attention cost ``sum(rows x longest**2) + overhead x groups`` (exact, by dynamic programming over the
    distinct lengths). Ties keep fewer groups. `overhead`: :data:`GROUP_OVERHEAD` by default."""
    overhead = GROUP_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda row: (lengths[row], row))
    if max_groups <= 1 or len(order) <= 1:
        return [order]
    widths = sorted(set(lengths))  # a group ends at a distinct length
    covered = np.searchsorted(np.array([lengths[r] for r in order]), widths, side="right").astype(np.float64)
    m = len(widths)
    squares = np.array(widths, dtype=np.float64) ** 2
    # best[i]: least cost of covering the rows of the first i distinct lengths; back[k][j]: where group k starts.
    best = np.full(m + 1, np.inf)
    best[0] = 0.0
    start = np.concatenate([[0.0], covered])  # rows covered before distinct length i
    backs = []
    costs = []
    for _ in range(max_groups):
        # candidate[i, j] = best[i] + (rows up to length j - rows before i) * width_j**2 + overhead, for i <= j
        candidate = best[:m, None] + (covered[None, :] - start[:m, None]) * squares[None, :] + overhead
        candidate[np.tril_indices(m, -1)] = np.inf
        back = candidate.argmin(axis=0)
        best = np.concatenate([[np.inf], candidate[back, np.arange(m)]])
        backs.append(back)
        costs.append(best[m])
    groups_used = int(np.argmin(costs)) + 1  # argmin takes the first (fewest groups) of equal costs
    bounds = []
    end = m - 1
    for k in range(groups_used - 1, -1, -1):
        begin = int(backs[k][end])
        bounds.append((begin, end))
        end = begin - 1
    cuts = [int(start[b]) for b, _ in reversed(bounds)] + [len(order)]
    return [order[cuts[g]:cuts[g + 1]] for g in range(groups_used)]


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """``(first_row, count)`` of each maximal run of consecutive rows with the same length."""
    runs: list[tuple[int, int]] = []
    for row, length in enumerate(lengths):
        if runs and lengths[runs[-1][0]] == length:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def pack(attention_mask: torch.Tensor, max_groups: int | None = None, max_exact_groups: int | None = None) -> Packing:
    """The :class:`Packing` of a ``[batch, width]`` attention mask (1/True = real token; any pattern of holes).

    Rows that form at most `max_exact_groups` runs of equal length (none empty) attend in place, one group per run
    (:attr:`Packing.in_place`). Otherwise `max_groups` bounds the attention calls per layer
    (:func:`attention_groups`). Defaults: :data:`MAX_EXACT_GROUPS` and :data:`MAX_GROUPS` on CPU, one group on
    other devices, where each call is a kernel launch."""
    mask = attention_mask.bool()
    batch, width = mask.shape
    lengths = mask.sum(dim=1)
    flat = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    batch_index = torch.div(flat, width, rounding_mode="floor")
    host_lengths = lengths.tolist()  # one host sync per forward, as FlashAttention's unpad_input
    max_len = max(host_lengths, default=0)
    cpu = mask.device.type == "cpu"
    if max_groups is None:
        max_groups = MAX_GROUPS if cpu else 1
    if max_exact_groups is None:
        max_exact_groups = MAX_EXACT_GROUPS if cpu else 1
    runs = equal_length_runs(host_lengths)
    if batch and len(runs) <= max_exact_groups and min(host_lengths) > 0:
        groups, offset = [], 0
        for first, count in runs:
            groups.append(AttentionGroup(count=count, width=host_lengths[first], offset=offset, key_mask=None))
            offset += count * host_lengths[first]
        return Packing(flat=flat, batch_index=batch_index, slots=torch.arange(offset, device=mask.device),
                       lengths=lengths, batch=batch, max_len=max_len, groups=tuple(groups), size=offset,
                       in_place=True)
    groups = []
    row_base = [0] * batch
    offset = 0
    for rows in attention_groups(host_lengths, max_groups) if batch else []:
        group_width = max(1, max(host_lengths[r] for r in rows))  # a group of empty rows keeps one padded key
        for position, row in enumerate(rows):
            row_base[row] = offset + position * group_width
        group_lengths = lengths[torch.tensor(rows, device=mask.device)]
        keys = torch.arange(group_width, device=mask.device).unsqueeze(0) < group_lengths.unsqueeze(1)
        # A row without real tokens would give an all-masked softmax (NaN) on its padded queries; they are
        # dropped anyway, but NaN in backward is not worth the risk: let such rows attend to their (zero) padding.
        keys = keys | (group_lengths == 0).unsqueeze(1)
        groups.append(AttentionGroup(count=len(rows), width=group_width, offset=offset,
                                     key_mask=keys[:, None, None, :]))
        offset += len(rows) * group_width
    rank = (torch.cumsum(mask, dim=1) - 1)[mask]
    slots = torch.tensor(row_base, dtype=torch.long, device=mask.device)[batch_index] + rank
    return Packing(flat=flat, batch_index=batch_index, slots=slots, lengths=lengths, batch=batch, max_len=max_len,
                   groups=tuple(groups), size=offset)


def unsupported_reason(backbone: nn.Module) -> str | None:
    """Why `backbone` cannot run :func:`packed_forward` (a sentence naming its model type), or None if it can."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    kind = type(backbone).__name__
    if kind not in SUPPORTED_CLASSES:
        return (f"backbone {kind} (model_type {model_type!r}) is not one of {', '.join(SUPPORTED_CLASSES)}, "
                "whose module layout the packed forward follows")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return f"model_type {model_type!r} is configured as a decoder (is_decoder / add_cross_attention)"
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        return f"model_type {model_type!r} uses position_embedding_type={position_type!r}; only 'absolute' is packed"
    for option in ("output_attentions", "output_hidden_states"):
        if getattr(config, option, False):
            return f"model_type {model_type!r} has {option}=True, which needs the padded per-layer outputs"
    if getattr(backbone, "encoder", None) is None or getattr(backbone, "embeddings", None) is None:
        return f"model_type {model_type!r}: the backbone has no embeddings/encoder modules"
    return None


def position_ids(backbone: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The ``[batch, width]`` position ids the padded forward uses: RoBERTa-style embeddings (XLM-R, CamemBERT)
    count non-pad ids from ``padding_idx + 1`` (pad positions stay ``padding_idx``); BERT uses the column index."""
    embeddings = backbone.embeddings
    make = getattr(embeddings, "create_position_ids_from_input_ids", None)
    if make is not None and getattr(embeddings, "padding_idx", None) is not None:
        return make(input_ids, embeddings.padding_idx)
    batch, width = input_ids.shape
    return embeddings.position_ids[:, :width].expand(batch, width)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, p: float,
            scale: float) -> torch.Tensor:
    """Attention of ``[rows, heads, width, head_dim]`` queries over keys where `key_mask` is True (None: all),
    dropout `p` on the probabilities. On CPU the product runs here with two matmuls and a softmax when there is
    dropout (in fp32, as SDPA's math path does for bf16 inputs, so that the probabilities' dropout mask comes from
    :func:`hybrid_retrieval.kernels.dropout.dropout`) and for fp32 groups at most :data:`MATMUL_ATTENTION_WIDTH`
    wide, where SDPA's blocked kernel is slower; otherwise ``scaled_dot_product_attention`` (its fused kernels)."""
    cpu = q.device.type == "cpu"
    short = cpu and q.dtype is torch.float32 and q.shape[-2] <= MATMUL_ATTENTION_WIDTH
    if not short and (p == 0.0 or not cpu):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p, scale=scale)
    with torch.autocast("cpu", enabled=False):
        queries = q.float() if scale == 1.0 else q.float() * scale
        scores = torch.matmul(queries, k.float().transpose(-1, -2))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p > 0.0:
            probs = dropout(probs, p)
        return torch.matmul(probs, v.float()).to(q.dtype)


def _residual_block(block: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``BertSelfOutput`` / ``BertOutput`` (and their XLM-R twins): ``LayerNorm(dropout(dense(x)) + residual)``.
    (oneDNN's residual add inside the product was 4 % slower in fp32 encoding than this separate add.)"""
    return block.LayerNorm(dropout(block.dense(x), block.dropout) + residual)


def _qkv(attention: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``[tokens, 3 * width]``: queries, keys and values side by side, and the factor still to apply to the
    scores: one product with pre-scaled queries where :func:`~hybrid_retrieval.kernels.onednn.onednn_linears`
    joined the three weights for inference."""
    joined = fused_qkv(attention)
    if joined is not None and runs_onednn(hidden, joined.weight):
        return joined(hidden), 1.0
    qkv = torch.cat([attention.query(hidden), attention.key(hidden), attention.value(hidden)], dim=-1)
    return qkv, attention_scale(attention)


def _attention_layer(layer: nn.Module, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One transformer layer on packed tokens: Q/K/V, output and feed-forward packed, attention re-padded per
    :class:`AttentionGroup`."""
    attention = layer.attention.self
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    width = heads * head_dim
    p = attention.dropout.p if attention.training else 0.0
    qkv, scale = _qkv(attention, hidden)
    # One scatter for all three projections; index_copy's backward gathers the real rows' gradients.
    padded = qkv if packing.in_place else qkv.new_zeros(packing.size, 3 * width).index_copy(0, packing.slots, qkv)
    contexts = []
    for group in packing.groups:
        block = padded[group.offset:group.offset + group.count * group.width]
        q, k, v = block.view(group.count, group.width, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        context = _attend(q, k, v, group.key_mask, p, scale)
        contexts.append(context.transpose(1, 2).reshape(group.count * group.width, width))
    context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
    if not packing.in_place:
        context = context.index_select(0, packing.slots)
    attended = _residual_block(layer.attention.output, context, hidden)
    return _residual_block(layer.output, layer.intermediate(attended), attended)


def packed_forward(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Packing]:
    """Last hidden states of the real tokens, ``[total_real_tokens, hidden]`` in row-major order, and their
    :class:`Packing`. Check :func:`unsupported_reason` first; mask rows may be empty, but not all of them."""
    # With dropout, the attention probabilities' masks are drawn per group: training keeps the buffer's grouping
    # rule alone, so its draws depend on the batch's lengths and not on whether rows happen to come in runs.
    dropout_active = backbone.training and any(
        m.p > 0 for m in backbone.modules() if isinstance(m, nn.Dropout))
    packing = pack(attention_mask, max_exact_groups=0 if dropout_active else None)
    embeddings = backbone.embeddings
    ids = input_ids.reshape(-1).index_select(0, packing.flat)
    positions = position_ids(backbone, input_ids).reshape(-1).index_select(0, packing.flat)
    if token_type_ids is not None:
        types = token_type_ids.reshape(-1).index_select(0, packing.flat)
    else:  # the padded path reads its all-zero token_type_ids buffer
        types = torch.zeros_like(ids)
    # The padded embeddings' order of additions: (words + token types) + positions.
    hidden = embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(types)
    hidden = hidden + embeddings.position_embeddings(positions)
    hidden = dropout(embeddings.LayerNorm(hidden), embeddings.dropout)
    for layer in backbone.encoder.layer:
        # gradient_checkpointing_enable() marks each layer and gives it the checkpoint function (with its kwargs).
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            recompute = getattr(layer, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            hidden = recompute(_attention_layer, layer, hidden, packing)
        else:
            hidden = _attention_layer(layer, hidden, packing)
    return hidden, packing
