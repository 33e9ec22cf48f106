"""The student's losses under the two evaluation protocols (evaluate stage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T || p_S) with p = softmax(logits / T), averaged over the batch (SRe2L's relabel loss)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean")


def hard_label_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against (CutMix-mixed) one-hot targets."""
    return -(targets * F.log_softmax(student_logits, dim=1)).sum(1).mean()
