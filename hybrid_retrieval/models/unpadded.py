"""Packed ("unpadded") forward of BERT-family encoders: per-token work runs on the real tokens only.

A padded batch of B texts of up to L tokens runs every linear layer, GELU, LayerNorm, residual add and dropout on
B x L rows, padding included. Here the real tokens are gathered once with the attention mask into a
``[total_real_tokens, hidden]`` matrix (as FlashAttention's ``bert_padding`` utilities and ModernBERT do) and
everything runs on it, except attention: each layer re-pads its queries, keys and values to
``[batch, heads, longest_real_row, head_dim]``, calls ``torch.nn.functional.scaled_dot_product_attention`` with the
key padding mask, and gathers the real rows back. LayerNorm and dropout are per token, so they are safe on packed
tokens; attention is not, hence the re-pad.

The forward calls the backbone's own modules (embeddings, ``attention.self.query/key/value``,
``attention.output``, ``intermediate``, ``output``): no parameter is copied, ``state_dict`` and checkpoints are the
padded model's, and :func:`hybrid_retrieval.models.cpu_kernels.onednn_linears` (which swaps the ``nn.Linear``
classes and fuses GELU into ``intermediate.dense``) applies unchanged. Position ids are the padded path's (BERT's
column index; XLM-R's ``padding_idx + cumulative count of non-pad ids``), gathered with the tokens, as are token
type ids. Results equal the padded forward's on the real tokens to float rounding; dropout draws its masks on
the packed tokens, so a training step with dropout is equal in distribution, not bit-identical.

Supported: transformers' ``BertModel``, ``XLMRobertaModel``, ``RobertaModel`` and ``CamembertModel`` as bidirectional
encoders with absolute position embeddings. Anything else (another model type, a compiled or wrapped backbone,
``is_decoder``, cross-attention, relative position embeddings, ``output_attentions`` / ``output_hidden_states``)
has an :func:`unsupported_reason`, and :class:`hybrid_retrieval.models.encoder.Encoder` runs the padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["SUPPORTED_MODEL_TYPES", "Packing", "pack", "packed_forward", "position_ids", "unsupported_reason"]

SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "camembert")
# The transformers classes whose module tree (embeddings, encoder.layer[i].attention.self/output, intermediate,
# output) the packed forward walks; a subclass or wrapper (torch.compile, PEFT) may change what forward does.
SUPPORTED_CLASSES = ("BertModel", "XLMRobertaModel", "RobertaModel", "CamembertModel")


@dataclass(frozen=True)
class Packing:
    """Where a padded batch's real tokens are, for gathering them and for re-padding attention inputs.

    ``flat``: index of each real token in the flattened ``[batch * width]`` input, row-major (the packed order);
    ``batch_index``: the row of each real token; ``slots``: its index in the flattened ``[batch * max_len]``
    attention layout (row, then rank among the row's real tokens); ``lengths``: real tokens per row;
    ``max_len``: the longest row (the attention width); ``key_mask``: ``[batch, 1, 1, max_len]``, True where a key
    is a real token.
    """

    flat: torch.Tensor
    batch_index: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    batch: int
    max_len: int
    key_mask: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.flat.numel())

    def starts(self) -> torch.Tensor:
        """Packed index of each row's first real token."""
        return torch.cumsum(self.lengths, 0) - self.lengths


def pack(attention_mask: torch.Tensor) -> Packing:
    """The :class:`Packing` of a ``[batch, width]`` attention mask (1/True = real token; any pattern of holes)."""
    mask = attention_mask.bool()
    batch, width = mask.shape
    lengths = mask.sum(dim=1)
    flat = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    batch_index = torch.div(flat, width, rounding_mode="floor")
    max_len = int(lengths.max()) if batch else 0  # one host sync per forward, as FlashAttention's unpad_input
    rank = (torch.cumsum(mask, dim=1) - 1)[mask]
    slots = batch_index * max_len + rank
    keys = torch.arange(max_len, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    # A row without real tokens would give an all-masked softmax (NaN) on its padded queries; they are dropped
    # anyway, but NaN in backward is not worth the risk: let such rows attend to their (zero) padding.
    keys = keys | (lengths == 0).unsqueeze(1)
    return Packing(flat=flat, batch_index=batch_index, slots=slots, lengths=lengths, batch=batch, max_len=max_len,
                   key_mask=keys[:, None, None, :])


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


def _attention_layer(layer: nn.Module, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One transformer layer on packed tokens: Q/K/V, output and feed-forward packed, attention re-padded."""
    attention = layer.attention.self
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    width = heads * head_dim
    qkv = torch.cat([attention.query(hidden), attention.key(hidden), attention.value(hidden)], dim=-1)
    # One scatter for all three projections; index_copy's backward gathers the real rows' gradients.
    padded = qkv.new_zeros(packing.batch * packing.max_len, 3 * width).index_copy(0, packing.slots, qkv)
    q, k, v = padded.view(packing.batch, packing.max_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=packing.key_mask,
        dropout_p=attention.dropout.p if attention.training else 0.0,
        scale=getattr(attention, "scaling", head_dim ** -0.5),
    )
    context = context.transpose(1, 2).reshape(packing.batch * packing.max_len, width).index_select(0, packing.slots)
    attended = layer.attention.output(context, hidden)  # dense, dropout, LayerNorm(. + residual)
    return layer.output(layer.intermediate(attended), attended)


def packed_forward(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Packing]:
    """Last hidden states of the real tokens, ``[total_real_tokens, hidden]`` in row-major order, and their
    :class:`Packing`. Check :func:`unsupported_reason` first; mask rows may be empty, but not all of them."""
    packing = pack(attention_mask)
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
    hidden = embeddings.dropout(embeddings.LayerNorm(hidden))
    for layer in backbone.encoder.layer:
        # gradient_checkpointing_enable() marks each layer and gives it the checkpoint function (with its kwargs).
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            recompute = getattr(layer, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            hidden = recompute(_attention_layer, layer, hidden, packing)
        else:
            hidden = _attention_layer(layer, hidden, packing)
    return hidden, packing
