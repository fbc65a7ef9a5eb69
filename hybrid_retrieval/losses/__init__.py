"""Training losses for the dual encoder."""

from hybrid_retrieval.losses.distill import InBatchDistillation
from hybrid_retrieval.losses.info_nce import InfoNCELoss

__all__ = ["InBatchDistillation", "InfoNCELoss"]
