"""The LightningModule: one shared encoder trained with an in-batch contrastive loss, validated by retrieval.

Training batches come from :class:`~hybrid_retrieval.training.sampler.HybridBatchSampler` (monolingual or
cross-lingual per batch). Validation runs the full evaluation protocol (FAISS-free exact ranks, see
:mod:`hybrid_retrieval.evaluation`) on each configured evaluation split and logs every metric as
``val/<setting>/<metric>`` (first split) and ``val/<split>/<setting>/<group>/<metric>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from hybrid_retrieval.data.lareqa import LareqaSplit
from hybrid_retrieval.data.pairs import ParallelPairs
from hybrid_retrieval.evaluation.evaluator import EvaluationResult, evaluate_encoder
from hybrid_retrieval.models.encoder import Encoder
from hybrid_retrieval.tracking import finite_metrics
from hybrid_retrieval.training.batches import PairCollator, PairTexts


@dataclass
class EvaluationSet:
    """A split to validate on and how its candidates are encoded."""

    name: str
    split: LareqaSplit
    candidate_text: str = "sentence"


@dataclass
class OptimizerSettings:
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)


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


class HybridRetrievalModule(pl.LightningModule):
    """Dual encoder (shared weights) + InfoNCE; validation = retrieval metrics on the evaluation sets."""

    def __init__(self, encoder: Encoder, loss: torch.nn.Module, train_datasets: Sequence[ParallelPairs],
                 sampler_factory: Any, batch_size: int, evaluation_sets: Sequence[EvaluationSet],
                 optimizer: OptimizerSettings, seed: int = 0, use_hard_negatives: bool = True,
                 freeze_embeddings: bool = False, eval_batch_size: int = 64, eval_dtype: torch.dtype | None = None,
                 num_threads: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = loss
        self.train_datasets = list(train_datasets)
        self.sampler_factory = sampler_factory
        self.batch_size = batch_size
        self.evaluation_sets = list(evaluation_sets)
        self.optimizer_settings = optimizer
        self.seed = seed
        self.use_hard_negatives = use_hard_negatives
        self.eval_batch_size = eval_batch_size
        self.eval_dtype = eval_dtype
        self.num_threads = num_threads
        # (global step, logged metrics, results per evaluation set) of every validation, in order.
        self.history: list[tuple[int, dict[str, float], dict[str, EvaluationResult]]] = []
        encoder.train()  # loaders hand back encoders in eval mode
        if freeze_embeddings:
            # The 250k-row vocabulary matrix is most of a multilingual encoder's parameters; freezing it keeps
            # CPU steps fast and protects languages absent from the training data.
            for parameter in encoder.backbone.get_input_embeddings().parameters():
                parameter.requires_grad_(False)

    # ---- data -------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        sampler = self.sampler_factory(datasets=self.train_datasets, batch_size=self.batch_size, seed=self.seed,
                                       num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
        self.train_sampler = sampler
        return DataLoader(PairTexts(self.train_datasets), batch_sampler=sampler,
                          collate_fn=PairCollator(self.encoder.tokenize, self.use_hard_negatives))

    def val_dataloader(self) -> DataLoader:
        # One item per evaluation set: validation_step encodes and scores the whole set at once.
        return DataLoader(list(range(len(self.evaluation_sets))), batch_size=1)

    def on_train_epoch_start(self) -> None:
        self.train_sampler.set_epoch(self.current_epoch)

    # ---- steps ------------------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**inputs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        queries = self(batch["query"])
        passages = self(batch["passage"])
        negatives = self(batch["hard_negative"]) if "hard_negative" in batch else None
        loss = self.loss(queries, passages, negatives)
        size = queries.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/mono_batch", float(batch["monolingual"]), batch_size=size)
        temperature = getattr(self.loss, "temperature", None)
        if isinstance(temperature, torch.Tensor):
            self.log("train/temperature", temperature.detach().float(), batch_size=size)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        evaluation_set = self.evaluation_sets[int(batch[0])]
        was_training = self.encoder.training
        self.encoder.eval()
        result = evaluate_encoder(self.encoder, evaluation_set.split, evaluation_set.candidate_text,
                                  batch_size=self.eval_batch_size, dtype=self.eval_dtype,
                                  num_threads=self.num_threads)
        self.encoder.train(was_training)
        result.query_emb = result.candidate_emb = None  # keep results small: they are kept per validation
        metrics = result.flat(prefix=f"val/{evaluation_set.name}/")
        if batch_idx == 0:
            metrics.update({f"val/{s}/{m}": v for s, values in result.summary.items() for m, v in values.items()})
        metrics[f"time/{evaluation_set.name}/encode_s"] = result.timings["encode_s"]
        metrics[f"time/{evaluation_set.name}/metrics_s"] = result.timings["metrics_s"]
        finite = finite_metrics(metrics)
        # Only rank 0's numbers matter: every rank evaluates the same split with the same weights.
        self.log_dict(finite, batch_size=1, rank_zero_only=True)
        if batch_idx == 0 or not self.history or self.history[-1][0] != self.global_step:
            self.history.append((self.global_step, {}, {}))
        self.history[-1][1].update(finite)
        self.history[-1][2][evaluation_set.name] = result

    # ---- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        settings = self.optimizer_settings
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            # Biases and LayerNorm weights are not decayed (the usual BERT fine-tuning recipe).
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(parameter)
        optimizer = torch.optim.AdamW([
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ], lr=settings.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(settings.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, settings.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
