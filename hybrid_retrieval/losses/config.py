"""The schemas of the nodes that make a training run's loss: ``loss`` (the InfoNCE files ``conf/loss/info_nce*.yaml``
give exactly ``InfoNCELoss``'s arguments; a loss of another class is a YAML file of its own naming no schema,
docs/extending.md), and, around whatever ``loss`` builds, ``matryoshka`` (``MatryoshkaLoss`` wraps it) and
``distill`` (``InBatchDistillation`` adds its term beside it). Hydra refuses an unknown key or a wrong type while
composing; ``conf/config.yaml`` says what each option does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class InfoNCELossConfig:
    _target_: str = "hybrid_retrieval.losses.info_nce.InfoNCELoss"
    temperature: float = 0.05
    learnable_temperature: bool = False
    symmetric: bool = False
    similarity: str = "cosine"               # cosine | dot
    min_temperature: float = 0.01            # the range a learnable temperature is kept in
    max_temperature: float = 1.0
    gather_across_devices: bool = True


@dataclass
class MatryoshkaConfig:
    dims: Optional[list[int]] = None         # e.g. [384, 256, 128, 64]; null = off
    weights: Optional[list[float]] = None    # one per dimension; null = 1 each


@dataclass
class DistillConfig:
    weight: float = 0.0                      # > 0: the term is added; 0 = off
    temperature: float = 0.05
