"""The augmented Lagrangian on expected sparsity, and the target ramp.

    L = L_task + sum_c [ lambda1_c * (s_c - t) + lambda2_c * (s_c - t)^2 ]

with one constraint ``c`` (global) or one per layer (per-layer). The multipliers start at 0
and are updated by gradient *ascent* (``Adam(maximize=True)``, as Sheared-LLaMA and PruLong do):
lambda1 follows the signed violation, lambda2 the squared one, so the gates are pulled to the
target. Adam's normalised steps keep the multipliers from winding up while the saturated gates
(log_alpha ~ 3) start to move, which plain SGD ascent does, overshooting afterwards.
"""

from __future__ import annotations

import torch
from torch import nn


def target_at(step: int, total_steps: int, sparsity: float, warmup: float) -> float:
    """Linear ramp from 0 to ``sparsity`` over the first ``warmup`` fraction of the steps."""
    ramp_steps = warmup * total_steps
    if ramp_steps <= 0:
        return sparsity
    return sparsity * min(1.0, step / ramp_steps)


class Lagrangian(nn.Module):
    """Multipliers ``lambda1``, ``lambda2`` of shape ``[num_constraints]``."""

    def __init__(self, num_constraints: int = 1):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(num_constraints))
        self.lambda2 = nn.Parameter(torch.zeros(num_constraints))

    def forward(self, sparsity: torch.Tensor, target: float) -> torch.Tensor:
        """The penalty for ``sparsity`` (a scalar or ``[num_constraints]``) against ``target``."""
        gap = sparsity.reshape(-1) - target
        return (self.lambda1 * gap + self.lambda2 * gap * gap).sum()

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Gradient ascent on the multipliers."""
        return torch.optim.Adam(self.parameters(), lr=lr, maximize=True)
