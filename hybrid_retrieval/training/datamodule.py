"""The LightningDataModule: training datasets, the hybrid batch sampler, collation, and the evaluation sets.

Where a training batch is chosen: :class:`~hybrid_retrieval.training.sampler.HybridBatchSampler` (built here per
rank); how its rows become tokens: :mod:`hybrid_retrieval.training.batches`, with the tokenizer of the model
being trained. Validation yields one :class:`~hybrid_retrieval.evaluation.sets.EvaluationSet` per step: the
module encodes and scores each set whole.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from hybrid_retrieval.data.pairs import ParallelPairs
from hybrid_retrieval.evaluation.sets import EvaluationSet
from hybrid_retrieval.training.batches import PairCollator, PairTexts
from hybrid_retrieval.training.sampler import HybridBatchSampler


class HybridDataModule(pl.LightningDataModule):
    """Owns what training reads.

    Args:
        train_datasets: the training data (one dataset per batch, drawn in proportion to size).
        sampler_factory: ``HybridBatchSampler`` with its options bound (``conf/sampler``); this module fills in
            ``datasets``, ``batch_size``, ``seed``, ``num_replicas`` and ``rank``.
        batch_size: rows per batch on one device.
        seed: the sampler's base seed (the epoch is mixed in by ``set_epoch``).
        evaluation_sets: validated at every check, the first one drives ``train.monitor``.
    """

    def __init__(self, train_datasets: Sequence[ParallelPairs], sampler_factory: Callable[..., HybridBatchSampler],
                 batch_size: int, seed: int, evaluation_sets: Sequence[EvaluationSet]) -> None:
        super().__init__()
        self.train_datasets = list(train_datasets)
        self.sampler_factory = sampler_factory
        self.batch_size = batch_size
        self.seed = seed
        self.evaluation_sets = list(evaluation_sets)
        self.sampler: HybridBatchSampler | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint of before 2026-12

    def build_sampler(self, num_replicas: int = 1, rank: int = 0) -> HybridBatchSampler:
        return self.sampler_factory(datasets=self.train_datasets, batch_size=self.batch_size, seed=self.seed,
                                    num_replicas=num_replicas, rank=rank)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self.sampler = self.build_sampler(trainer.world_size, trainer.global_rank)
        loader = ResumableLoader(PairTexts(self.train_datasets), batch_sampler=self.sampler,
                                 collate_fn=PairCollator(trainer.lightning_module.encoder.tokenize))
        loader.position = self._position
        if self._resume_at is not None:  # a checkpoint that kept the position in the datamodule's state
            loader.load_state_dict({"epoch": self._resume_at[0], "batches_done": self._resume_at[1]})
            self._resume_at = None
        # The module calls set_epoch at the start of every epoch (Lightning itself only sets a DataLoader's sampler,
        # not its batch sampler): batches differ per epoch.
        return loader

    def _position(self) -> dict[str, int]:
        """Where training is in the epoch: the batches the training loop has finished."""
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.evaluation_sets, batch_size=None, collate_fn=_identity)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, EvaluationSet):
            return batch  # texts, not tensors: the encoder moves its own inputs
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checkpoints written before the training loader kept its own position saved it here."""
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"])) if state_dict else None

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def summary(self) -> list[dict[str, Any]]:
        return [data.summary() for data in self.train_datasets]


class ResumableLoader(DataLoader):
    """The training loader, resumable through Lightning's ``state_dict`` / ``load_state_dict`` interface: its state
    is the position in the epoch (saved with the loops in every resumable checkpoint); loading it makes the batch
    sampler skip exactly the batches already trained on, so a run resumed mid-epoch trains on the batches the
    uninterrupted run would have (and Lightning knows the loader resumes)."""

    position: Callable[[], dict[str, int]] | None = None  # set by the datamodule: reads the training loop

    def state_dict(self) -> dict[str, int]:
        return self.position() if self.position is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        # Lightning loads this before it iterates the resumed epoch's loader, without setting the epoch first.
        self.batch_sampler.set_epoch(int(state_dict["epoch"]))
        self.batch_sampler.skip_next(int(state_dict["epoch"]), int(state_dict["batches_done"]))


def _identity(item: Any) -> Any:
    return item
