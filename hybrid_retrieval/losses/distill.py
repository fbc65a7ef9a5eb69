"""In-batch KL distillation from a frozen teacher (the starting model), a regulariser beside InfoNCE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_retrieval.config_error import BadValue

__all__ = ["InBatchDistillation"]


class InBatchDistillation(nn.Module):
    """KL divergence between the teacher's and the student's in-batch score distributions.

    For each query i of a batch, both models score the same candidates (the batch's B passages, then its hard
    negatives) by cosine similarity; ``p_t(i) = softmax(s_t[i] / T)`` and ``p_s(i) = softmax(s_s[i] / T)`` at the
    distillation temperature T. The loss is ``weight * mean_i KL(p_t(i) || p_s(i))``: zero when the student ranks
    the batch as the teacher does, whatever the contrastive loss asks beyond that.

    Use it with a frozen copy of the model before training as the teacher (``distill.weight`` > 0, the ``distill`` node of ``conf/config.yaml``): the
    contrastive loss moves the model towards the training task and this term keeps what the starting model ranked
    well, the usual guard against losing zero-shot quality (sentence-transformers' ``DistillKLDivLoss`` with
    in-batch candidates, BGE-M3's self-distillation). Computed in float32 whatever the autocast dtype. Teacher
    scores must carry no graph (the teacher is never trained); the scores are per device (no gathering).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 0.05) -> None:
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise BadValue(f"distill.weight must be a number >= 0, got {weight!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise BadValue(f"distill.temperature must be a positive number, got {temperature!r}")
        self.weight = float(weight)
        self.temperature = float(temperature)

    @staticmethod
    def _scores(query: torch.Tensor, passage: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        q = F.normalize(query.float(), dim=-1)
        candidates = passage.float() if negative is None else torch.cat([passage.float(),
                                                                          negative.float().reshape(-1, q.shape[1])])
        return q @ F.normalize(candidates, dim=-1).T

    def forward(self, student_query: torch.Tensor, student_passage: torch.Tensor,
                student_negative: torch.Tensor | None, teacher_query: torch.Tensor, teacher_passage: torch.Tensor,
                teacher_negative: torch.Tensor | None) -> torch.Tensor:
        if teacher_query.requires_grad or teacher_passage.requires_grad:
            raise BadValue("InBatchDistillation: teacher embeddings must not require gradients (a frozen teacher)")
        student = self._scores(student_query, student_passage, student_negative) / self.temperature
        with torch.no_grad():
            teacher = self._scores(teacher_query, teacher_passage, teacher_negative) / self.temperature
        log_student = F.log_softmax(student, dim=-1)
        log_teacher = F.log_softmax(teacher, dim=-1)
        return self.weight * F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"
