"""Training losses for the dual encoder."""

from hybrid_retrieval.losses.distill import InBatchDistillation
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.losses.matryoshka import MatryoshkaLoss

__all__ = ["InBatchDistillation", "InfoNCELoss", "MatryoshkaLoss"]
