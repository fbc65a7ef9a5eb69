"""The LightningDataModule: training datasets, the hybrid batch sampler, collation, and the evaluation sets.

Where a training batch is chosen: :class:`~hybrid_retrieval.training.sampler.HybridBatchSampler`, or any
:class:`~hybrid_retrieval.training.sampler.BatchSampler` ``conf/sampler`` names (built here per rank); how its rows
become tokens: :mod:`hybrid_retrieval.training.batches`, with the tokenizer of the model being trained. Validation yields one :class:`~hybrid_retrieval.evaluation.sets.EvaluationSet` per step: the
module encodes and scores each set whole.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from hybrid_retrieval.data.pairs import ParallelPairs
from hybrid_retrieval.evaluation.sets import EvaluationSet
from hybrid_retrieval.training.batches import PairCollator, PairTexts
from hybrid_retrieval.training.sampler import BatchSampler


class HybridDataModule(pl.LightningDataModule):
    """Owns what training reads.

    Args:
        train_datasets: the training data (one dataset per batch, drawn in proportion to size).
        sampler_factory: a :class:`BatchSampler` class with its options bound (``conf/sampler``); this module fills in
            ``datasets``, ``batch_size``, ``seed``, ``num_replicas`` and ``rank``.
        batch_size: rows per batch on one device.
        seed: the sampler's base seed (the epoch is mixed in by ``set_epoch``).
        evaluation_sets: validated at every check, the first one drives ``train.monitor``.
        hard_negatives: how many hard negatives of each row enter its batch (``train.hard_negatives``).
        num_workers: DataLoader workers that read and tokenize batches (``train.num_workers``; persistent).
    """

    def __init__(self, train_datasets: Sequence[ParallelPairs], sampler_factory: Callable[..., BatchSampler],
                 batch_size: int, seed: int, evaluation_sets: Sequence[EvaluationSet], hard_negatives: int = 1,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.train_datasets = list(train_datasets)
        self.sampler_factory = sampler_factory
        self.batch_size = batch_size
        self.seed = seed
        self.evaluation_sets = list(evaluation_sets)
        self.hard_negatives = hard_negatives
        self.num_workers = num_workers
        self.sampler: BatchSampler | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) of a resumed run

    def build_sampler(self, num_replicas: int = 1, rank: int = 0) -> BatchSampler:
        return self.sampler_factory(datasets=self.train_datasets, batch_size=self.batch_size, seed=self.seed,
                                    num_replicas=num_replicas, rank=rank)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self.sampler = self.build_sampler(trainer.world_size, trainer.global_rank)
        if self._resume_at is not None:
            # Resuming mid-epoch: Lightning counts the batches already done; the sampler skips exactly those.
            # Lightning iterates the resumed epoch's loader once, without setting the epoch first.
            self.sampler.set_epoch(self._resume_at[0])
            self.sampler.skip_next(*self._resume_at)
        # The module calls set_epoch at the start of every epoch (Lightning itself only sets a DataLoader's sampler,
        # not its batch sampler): batches differ per epoch.
        tokenize = trainer.lightning_module.encoder.tokenize
        workers = {"num_workers": self.num_workers, "persistent_workers": True} if self.num_workers else {}
        if self.num_workers and "TOKENIZERS_PARALLELISM" not in os.environ:
            # The workers are the parallelism; a tokenizer used before the fork would otherwise warn and serialise.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        return TrainLoader(PairTexts(self.train_datasets, self.hard_negatives), batch_sampler=self.sampler,
                           collate_fn=PairCollator(tokenize), **workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.evaluation_sets, batch_size=None, collate_fn=_identity)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, EvaluationSet):
            return batch  # texts, not tensors: the encoder moves its own inputs
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the epoch, saved in resumable checkpoints: the batches already trained on."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"])) if state_dict else None

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def summary(self) -> list[dict[str, Any]]:
        return [data.summary() for data in self.train_datasets]


class TrainLoader(DataLoader):
    """The training DataLoader. A DataLoader draws a base seed from torch's generator each time it starts an
    iterator: every epoch without workers, only the first with persistent workers. A reused iterator draws it
    here instead, so torch's generator, and with it the dropout masks, advances the same with or without
    workers: ``train.num_workers`` changes neither the batches nor the result."""

    def __iter__(self) -> Any:
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()


def _identity(item: Any) -> Any:
    return item
