"""MiniMax diffusion fine-tuning objective (Gu et al., "Efficient Dataset
Distillation via Minimax Diffusion", CVPR 2024, Sec. 3.2-3.3).

Besides the denoising loss, each predicted clean sample x0_hat of class c is
pulled towards the real samples of c (representativeness) and pushed away
from earlier predictions of c (diversity). Both sets live in per-class FIFO
memories of flattened, detached vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddist.objectives.diffusion import denoising_loss


class ClassMemory:
    """Per-class first-in-first-out memory of the last `size` vectors (detached)."""

    def __init__(self, num_classes: int, size: int):
        self.size = size
        self.items: list[torch.Tensor | None] = [None] * num_classes

    def push(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append the rows of x (any shape [B, ...], flattened) to the memories of their labels y [B]."""
        flat = x.detach().flatten(1)
        for c in y.unique().tolist():
            old = self.items[c]
            new = flat[y == c] if old is None else torch.cat([old, flat[y == c]])
            self.items[c] = new[-self.size :]

    def get(self, c: int) -> torch.Tensor | None:
        """The stored vectors [M, D] of class c, oldest first; None while empty."""
        return self.items[c]


def minimax_terms(
    x0_hat: torch.Tensor, y: torch.Tensor, real: ClassMemory, gen: ClassMemory
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two MiniMax criteria, averaged over the batch.

        L_pos = mean_i (1 - min_j cos(x0_hat_i, m_j^real))    (representativeness)
        L_neg = mean_i  max_j cos(x0_hat_i, m_j^gen)          (diversity)

    where m^real / m^gen are the memories of sample i's class y_i. A sample
    whose class memory is still empty contributes 0 to that term.
    """
    flat = x0_hat.flatten(1)
    pos = flat.new_zeros(flat.shape[0])
    neg = flat.new_zeros(flat.shape[0])
    for c in y.unique().tolist():
        rows = y == c
        if (memory := real.get(c)) is not None:
            sim = F.cosine_similarity(flat[rows, None], memory[None], dim=-1)  # [b, M]
            pos[rows] = 1 - sim.min(dim=1).values
        if (memory := gen.get(c)) is not None:
            sim = F.cosine_similarity(flat[rows, None], memory[None], dim=-1)
            neg[rows] = sim.max(dim=1).values
    return pos.mean(), neg.mean()


def minimax_loss(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    x0_hat: torch.Tensor,
    y: torch.Tensor,
    real: ClassMemory,
    gen: ClassMemory,
    lambda_pos: float,
    lambda_neg: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_plain + lambda_pos * L_pos + lambda_neg * L_neg (MiniMax eq. 6-8).

    The memories are read, not updated: the caller pushes the real clean
    latents and the detached x0_hat after the step, so a batch is never
    compared with itself.
    """
    plain = denoising_loss(eps_pred, eps)
    pos, neg = minimax_terms(x0_hat, y, real, gen)
    loss = plain + lambda_pos * pos + lambda_neg * neg
    return loss, {"plain": plain.detach(), "pos": pos.detach(), "neg": neg.detach()}
