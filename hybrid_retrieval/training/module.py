"""The LightningModule: one shared encoder trained with a contrastive loss, validated by retrieval.

It owns the encoder, the loss and the optimiser. Data (training batches and evaluation sets) comes from
:class:`~hybrid_retrieval.training.datamodule.HybridDataModule`; validation is one evaluator call per evaluation
set, logged under the names of :mod:`hybrid_retrieval.evaluation.sets`. Checkpoints belong to callbacks
(:mod:`hybrid_retrieval.training.callbacks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from hybrid_retrieval.evaluation.sets import EvaluationSet, evaluate_set, metric_values
from hybrid_retrieval.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from hybrid_retrieval.models.encoder import Encoder, plan_batches
from hybrid_retrieval.training.sparse_rows import RowSparseAdamW, clip_gradients
from hybrid_retrieval.tracking import finite_metrics


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the batch."""


@dataclass
class OptimizerSettings:
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)


@dataclass
class EvaluationSettings:
    batch_size: int = 64
    dtype: torch.dtype | None = None
    num_threads: int = 2
    keep_embeddings: bool = False  # the main set's embeddings stay on its result (run.py save_embeddings)


def optimizer_kernel(parameters: list[torch.nn.Parameter], precision: str = "32-true") -> dict[str, bool]:
    """``fused=True`` where every parameter is a floating tensor on a device with a fused AdamW (CPU, CUDA) and no
    gradient scaler is in play (fp16 mixed precision unscales inside the fused kernel, after Lightning would clip),
    else ``foreach=True``; both compute the same update as the per-parameter loop."""
    devices = {p.device.type for p in parameters}
    if (parameters and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in parameters)
            and not str(precision).startswith("16")):
        return {"fused": True}
    return {"foreach": True}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the schedule down to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def embed_by_length(encoder: Encoder, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The same embeddings as ``encoder(**inputs)``, rows in input order, computed in length-sorted chunks that are
    each padded only to their own longest text (the chunks as in ``Encoder.encode``: :func:`plan_batches`).

    A batch is padded to its longest text, so one long passage makes every row pay for its length; padded tokens
    are masked out, so dropping them changes no embedding (up to float rounding), only the work. The batch itself
    (which rows, hence which negatives) is untouched. Dropout draws its masks per chunk, so a training run is not
    bit-identical to one without this, only equal in distribution."""
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    plan = plan_batches(lengths[order].cpu().numpy(), batch_size=len(order))
    if len(plan) == 1 and int(lengths[order[0]]) == mask.shape[1]:
        return encoder(**inputs)
    pieces = []
    for start, stop in plan:
        rows = order[start:stop]
        width = int(lengths[rows[0]])
        pieces.append(encoder(**{key: value[rows, :width] for key, value in inputs.items()}))
    return torch.cat(pieces)[torch.argsort(order)]


class HybridRetrievalModule(pl.LightningModule):
    """Dual encoder (shared weights) + contrastive loss; validation = retrieval metrics on each evaluation set.

    Args:
        encoder: the model being trained (its tokenizer also tokenizes the training batches).
        loss: ``loss(query_emb, passage_emb, hard_negative_emb | None) -> scalar``.
        optimizer: AdamW settings and the learning-rate schedule.
        model_config: the resolved ``conf/model`` entry, stored in every checkpoint so that a checkpoint alone
            rebuilds its encoder (:func:`hybrid_retrieval.models.checkpoint.load_checkpoint_encoder`).
        freeze_embeddings: keep the vocabulary matrix fixed.
        evaluation: how validation encodes (batch size, dtype, threads).
        grad_cache_chunk: embed the batch in chunks of this many rows with gradient caching
            (:mod:`hybrid_retrieval.losses.cached`): batches larger than memory, same gradients. Training then
            steps the optimiser itself (Lightning's manual optimisation), clipping at ``gradient_clip_val``.
        gradient_checkpointing: recompute the backbone's activations in backward instead of storing them.
        dynamic_padding: embed each side of a batch in length-sorted chunks, each padded to its own longest text
            (:func:`embed_by_length`): less padded work, the same batch.
        sparse_embeddings: a trainable vocabulary matrix gets sparse gradients and the exact row-sparse AdamW of
            :mod:`hybrid_retrieval.training.sparse_rows` (one process; DDP keeps the dense update).
        distill: an :class:`~hybrid_retrieval.losses.distill.InBatchDistillation` term added to the loss, the
            teacher being a frozen copy of ``encoder`` as it is now (before training); None or weight 0 = off.
        merge_ratio: WiSE-FT (:mod:`hybrid_retrieval.models.merge`): every validation, hence the best checkpoint
            and the export, holds ``(1 - merge_ratio) * start + merge_ratio * trained``; training itself goes on
            from the trained weights (resumable checkpoints keep those). None = off.
    """

    def __init__(self, encoder: Encoder, loss: torch.nn.Module, optimizer: OptimizerSettings,
                 model_config: Mapping[str, Any] | None = None, freeze_embeddings: bool = False,
                 evaluation: EvaluationSettings | None = None, grad_cache_chunk: int | None = None,
                 gradient_clip_val: float | None = None, gradient_checkpointing: bool = False,
                 dynamic_padding: bool = False, sparse_embeddings: bool = False,
                 distill: torch.nn.Module | None = None, merge_ratio: float | None = None) -> None:
        super().__init__()
        self.distill = distill if distill is not None and getattr(distill, "weight", 1.0) > 0 else None
        self.merge_ratio = merge_ratio
        self._start: list[Encoder] = []  # a list, not a submodule: kept out of state_dict, checkpoints and optimiser
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights while a merge is swapped in
        if self.distill is not None or merge_ratio is not None:
            import copy

            start = copy.deepcopy(encoder).eval()
            start.requires_grad_(False)
            self._start.append(start)
        self.sparse_embeddings = sparse_embeddings
        self.encoder = encoder
        side = getattr(encoder.tokenizer, "padding_side", "right")
        if dynamic_padding and side != "right":
            from hybrid_retrieval.config_error import ConfigError

            # Chunks are cut by slicing padding off the right; left padding would cut real tokens.
            raise ConfigError(f"train.dynamic_padding=true: this model's tokenizer pads on the {side} "
                              "(padding_side); dynamic padding needs right padding: set train.dynamic_padding=false")
        self.dynamic_padding = dynamic_padding
        self.loss = loss
        self.optimizer_settings = optimizer
        self.model_config = dict(model_config or {})
        self.evaluation = evaluation or EvaluationSettings()
        self.grad_cache_chunk = grad_cache_chunk
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = grad_cache_chunk is None
        if gradient_checkpointing:
            encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()  # loaders hand back encoders in eval mode
        if freeze_embeddings:
            # The 250k-row vocabulary matrix is most of a multilingual encoder's parameters; freezing it keeps
            # CPU steps fast and protects languages absent from the training data.
            for parameter in encoder.backbone.get_input_embeddings().parameters():
                parameter.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        # Lightning sets the epoch only on a DataLoader's sampler, not on a batch sampler: without this every
        # epoch would repeat the first one's batches.
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._embed(self.encoder, inputs)

    def _embed(self, encoder: Encoder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dynamic_padding:
            return embed_by_length(encoder, inputs)
        return encoder(**inputs)

    @property
    def start_encoder(self) -> Encoder | None:
        """The frozen copy of the model before training (distillation teacher, merge start), or None."""
        return self._start[0] if self._start else None

    def on_fit_start(self) -> None:
        if self._start:
            self._start[0].to(self.device)

    def _teacher_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        teacher = self._start[0]
        with torch.no_grad():
            return (self._embed(teacher, batch["query"]), self._embed(teacher, batch["passage"]),
                    self._embed(teacher, batch["hard_negative"]) if "hard_negative" in batch else None)

    def _loss(self, queries: torch.Tensor, passages: torch.Tensor, negatives: torch.Tensor | None,
              teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
        loss = self.loss(queries, passages, negatives)
        if teacher is not None:
            distill = self.distill(queries, passages, negatives, *teacher)
            self._last_distill = distill.detach()
            loss = loss + distill
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        teacher = self._teacher_embeddings(batch) if self.distill is not None else None
        if self.grad_cache_chunk is not None:
            loss = self._cached_step(batch, teacher)
        else:
            queries = self(batch["query"])
            passages = self(batch["passage"])
            negatives = self(batch["hard_negative"]) if "hard_negative" in batch else None
            loss = self._loss(queries, passages, negatives, teacher)
        self._check_finite(loss, batch)
        if teacher is not None:
            self.log("train/distill", self._last_distill.float(), batch_size=batch["query"]["input_ids"].shape[0])
        size = batch["query"]["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/mono_batch", float(batch["monolingual"]), batch_size=size)
        temperature = getattr(self.loss, "temperature", None)
        if isinstance(temperature, torch.Tensor):
            self.log("train/temperature", temperature.detach().float(), batch_size=size)
        return loss

    def _check_finite(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Stop on a NaN or infinite loss before it reaches the weights (every rank stops together)."""
        from hybrid_retrieval.distributed import rank_and_world

        # On the loss's device: NCCL reduces only CUDA tensors.
        bad = (~torch.isfinite(loss.detach()).all()).float().reshape(1)
        if rank_and_world()[1] > 1:
            import torch.distributed as dist

            dist.all_reduce(bad)
        if bad.item():
            languages = sorted(set(batch.get("languages", [])))
            kind = "monolingual" if batch.get("monolingual") else "cross-lingual"
            raise NonFiniteLossError(
                f"train/loss is {loss.detach().float().item()} at step {self.global_step} (epoch {self.current_epoch}), "
                f"on a {kind} batch of {len(batch.get('rows', []))} rows, query languages {languages}; the weights "
                "were not updated and the last finite state is saved in checkpoints/last.ckpt. Lower train.lr, "
                "check the data of this batch (train.log_batches=true lists its rows), or use hardware precision "
                "32-true")

    def _cached_step(self, batch: dict[str, Any], teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
                     ) -> torch.Tensor:
        """One optimiser step with gradient caching; DDP's per-backward reduction is replaced by one average."""
        import contextlib

        from hybrid_retrieval.distributed import rank_and_world
        from hybrid_retrieval.losses.cached import cached_backward

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        wrapped = self.trainer.strategy.model
        # Several backward passes per step: keep DDP from reducing each one, then average once below.
        no_sync = wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()
        groups = {"query": batch["query"], "passage": batch["passage"], "hard_negative": batch.get("hard_negative")}
        with no_sync:
            loss = cached_backward(self.encoder, groups,
                                   lambda e: self._loss(e["query"], e["passage"], e["hard_negative"], teacher),
                                   self.grad_cache_chunk)
        self._check_finite(loss, batch)  # before the optimiser step: the weights stay finite
        _, world = rank_and_world()
        if world > 1:
            import torch.distributed as dist

            for parameter in self.parameters():
                if parameter.requires_grad:
                    if parameter.grad is None:  # every rank must join every reduction
                        parameter.grad = torch.zeros_like(parameter)
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= world
        if self.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, self.gradient_clip_val, "norm")
        optimizer.step()
        scheduler.step()
        return loss

    def validation_step(self, evaluation_set: EvaluationSet, batch_idx: int) -> Any:
        """Evaluate one whole set; the result goes to callbacks (reports, the best checkpoint's results)."""
        settings = self.evaluation
        result = evaluate_set(self.encoder, evaluation_set, batch_size=settings.batch_size, dtype=settings.dtype,
                              num_threads=settings.num_threads)
        if not (settings.keep_embeddings and batch_idx == 0):
            result.query_emb = result.candidate_emb = None  # results are kept by callbacks: keep them small
        # Every rank holds the same gathered embeddings and metrics (evaluate_set); rank 0 logs.
        self.log_dict(finite_metrics(metric_values(result, evaluation_set.key, main=batch_idx == 0)), batch_size=1,
                      rank_zero_only=True)
        # Lightning logs an epoch-end validation at the step before the batch that triggered it; a logged "step"
        # is used as the x-axis instead, so every validation sits at the number of optimiser steps it evaluated.
        self.log("step", float(self.global_step), batch_size=1, rank_zero_only=True)
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "model": self.model_config}
        if self.merge_ratio is not None:
            checkpoint[CHECKPOINT_KEY]["merge"] = {"with": "start", "ratio": self.merge_ratio}
        if not checkpoint.get("optimizer_states"):
            return  # weights only: nothing to resume (the best checkpoint holds the merge, when there is one)
        if self._trained is not None:  # saved mid-validation: training resumes from the trained weights
            state = checkpoint["state_dict"]
            for name, value in self._trained.items():
                state[f"encoder.{name}"] = value.clone()
        from hybrid_retrieval.distributed import rank_and_world

        # Every rank's generators: the ranks' states need not agree (with ddp_cpu they part after the first
        # validation), and rank 0's restored on all would change the other ranks' dropout masks after a resume.
        # Every rank builds the checkpoint (only rank 0 writes it), so the states are gathered here.
        states = _rng_states()
        if rank_and_world()[1] > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restored at the first training batch after resuming: creating the data iterators in between draws from
        # torch's RNG, and the uninterrupted run drew those before the checkpoint. Each rank takes its own states
        # when the checkpoint has one per rank of this world size; else rank 0's (a resume on another number of
        # devices trains on other batches anyway).
        from hybrid_retrieval.distributed import rank_and_world

        rank, world = rank_and_world()
        per_rank = checkpoint.get("rng_states_per_rank") or []
        self._rng_to_restore = per_rank[rank] if len(per_rank) == world else checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        states = getattr(self, "_rng_to_restore", None)
        if states:
            _set_rng_states(states)
            self._rng_to_restore = None

    def _materialise_embeddings(self) -> None:
        """The vocabulary matrix's true values in place (row-sparse AdamW defers the decay of unread rows)."""
        for optimizer in getattr(self.trainer, "optimizers", None) or []:
            if isinstance(optimizer, RowSparseAdamW):
                optimizer.materialise()

    def on_validation_start(self) -> None:
        self._materialise_embeddings()
        self.swap_in_merge()

    def on_validation_end(self) -> None:
        # After the callbacks' on_validation_end (Lightning calls them first): the best checkpoint held the merge.
        self.swap_out_merge()

    def swap_in_merge(self) -> None:
        """With ``merge_ratio``: the encoder holds the WiSE-FT merge until :meth:`swap_out_merge`."""
        if self.merge_ratio is not None and self._trained is None:
            from hybrid_retrieval.models.merge import merge_into

            self._start[0].to(self.device)
            self._trained = merge_into(self.encoder, self._start[0], self.merge_ratio, trainable_only=True)

    def swap_out_merge(self) -> None:
        """The trained weights back in place."""
        if self._trained is not None:
            from hybrid_retrieval.models.merge import restore

            restore(self.encoder, self._trained)
            self._trained = None

    def on_train_end(self) -> None:
        self._materialise_embeddings()

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # manual optimisation hands a LightningOptimizer
        if isinstance(inner, RowSparseAdamW):
            if gradient_clip_val:
                clip_gradients(inner, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        # Lightning refuses to clip for a fused optimizer under mixed precision, for fear of scaled gradients;
        # fused is chosen only without a gradient scaler (optimizer_kernel), so the gradients here are true ones.
        if optimizer.defaults.get("fused") and gradient_clip_val:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        settings = self.optimizer_settings
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            # Biases and LayerNorm weights are not decayed (the usual BERT fine-tuning recipe).
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(parameter)
        # The fused kernel (one pass over all parameters, CPU and GPU) instead of a Python loop per parameter: on
        # CPU the loop cost about a fifth of a me5_small step with trainable embeddings (benchmarks/bench_train.py).
        kernel = optimizer_kernel(decay + no_decay, str(self.trainer.precision))
        embedding = self.encoder.backbone.get_input_embeddings()
        sparse = (self.sparse_embeddings and isinstance(embedding, torch.nn.Embedding)
                  and embedding.weight.requires_grad and self.trainer.world_size == 1)
        if sparse:  # the vocabulary matrix leaves the dense groups for RowSparseAdamW's own (sparse_rows.py)
            decay = [p for p in decay if p is not embedding.weight]
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if sparse:
            # Only the rows training reads are updated (exactly AdamW's result).
            optimizer = RowSparseAdamW(groups, embedding, lr=settings.lr, embedding_weight_decay=settings.weight_decay,
                                       **kernel)
        else:
            optimizer = torch.optim.AdamW(groups, lr=settings.lr, **kernel)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(settings.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, settings.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _rng_states() -> dict[str, Any]:
    """This process's generators (torch, numpy, Python, CUDA) as plain types and tensors: a checkpoint holding
    them loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
