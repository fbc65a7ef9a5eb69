"""Training losses for the dual encoder."""

from hybrid_retrieval.losses.info_nce import InfoNCELoss

__all__ = ["InfoNCELoss"]
