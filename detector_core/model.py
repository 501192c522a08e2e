"""The paper's classifier head: a small MLP on frozen CLIP features.

"Robust Diffusion Model-Generated Image Detection with CLIP" puts three blocks of
``Linear(d, d) -> BatchNorm1d(d) -> LeakyReLU(0.01) -> Dropout(0.335)`` on top of the
(concatenated) CLIP embedding and ends in ``Linear(d, 1)``: one logit, where a positive
logit means "generated" (label 1). Linear layers use Kaiming-uniform init (fan_in,
relu) as the reference code does. See shared/method.md section 2.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DetectorMLP"]


class DetectorMLP(nn.Module):
    """Three (by default) Linear-BN-LeakyReLU-Dropout blocks and a one-logit head.

    Args:
        in_dim: width of the feature vector (1536 for ViT-L/14 image+text).
        hidden_dim: width of the hidden blocks; the paper keeps it equal to ``in_dim``.
        depth: number of hidden blocks (3 in the paper).
        dropout: dropout probability after each block (0.335 in the paper).
        negative_slope: LeakyReLU slope (0.01 in the paper).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        depth: int = 3,
        dropout: float = 0.335,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"in_dim must be positive, got {in_dim}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.dropout = dropout
        self.negative_slope = negative_slope
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            blocks += [
                nn.Linear(width, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.LeakyReLU(negative_slope),
                nn.Dropout(dropout),
            ]
            width = hidden_dim
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def config(self) -> dict:
        """The constructor arguments, for saving next to the weights."""
        return {
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "depth": self.depth,
            "dropout": self.dropout,
            "negative_slope": self.negative_slope,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map features ``(n, in_dim)`` to logits ``(n,)``."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected features of shape (n, {self.in_dim}), got {tuple(x.shape)}")
        return self.head(self.body(x)).squeeze(-1)
