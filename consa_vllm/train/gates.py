"""Hard-concrete L0 gates (Louizos et al. 2018) as pure functions, after PruLong's ``l0.py``.

One gate per attention unit: ``z = 1`` keeps full attention (F), ``z = 0`` makes the unit
sliding-window (S). ``log_alpha`` has shape ``[num_layers, units_per_layer]`` where
``units_per_layer`` is 1 under layer granularity and ``num_kv_heads`` under kv_head
granularity; :func:`expand` broadcasts it to ``[num_layers, num_kv_heads]``.

Sparsity is the fraction of S units: ``s_hat = 1 - mean(P(z > 0))``.
"""

from __future__ import annotations

import math

import torch

from consa_vllm.allocation.rules import sliding_count

BETA = 2.0 / 3.0  # temperature
GAMMA = -0.1  # stretch: lower end
ZETA = 1.1  # stretch: upper end
EPS = 1e-6  # keeps u away from 0 and 1
# log(-gamma / zeta): P(z > 0) = sigmoid(log_alpha - BETA * LOG_RATIO)
LOG_RATIO = math.log(-GAMMA / ZETA)


def sample_z(log_alpha: torch.Tensor, u: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """A differentiable sample of the gates, in [0, 1] with point masses at 0 and 1.

    ``u`` is the uniform noise (same shape as ``log_alpha``); pass it to make sampling a
    function of the caller's seed, otherwise it is drawn from ``generator``.
    """
    if u is None:
        u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float32).to(log_alpha.device)
    u = u.to(device=log_alpha.device, dtype=log_alpha.dtype).clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) per gate: the probability that the unit keeps (some) full attention."""
    return torch.sigmoid(log_alpha - BETA * LOG_RATIO)


def expected_sparsity(log_alpha: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
    """Expected fraction of S units: a scalar, or one value per layer (``[num_layers]``)."""
    p = prob_nonzero(log_alpha)
    return 1.0 - (p.mean(dim=-1) if per_layer else p.mean())


def expand(z: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[L, 1]`` (layer granularity) or ``[L, H]`` gates to ``[L, H]``."""
    if z.shape[-1] == num_kv_heads:
        return z
    if z.shape[-1] != 1:
        raise ValueError(f"gates have {z.shape[-1]} units per layer; expected 1 or {num_kv_heads}")
    return z.expand(z.shape[0], num_kv_heads)


def binarize_topk(log_alpha: torch.Tensor, sparsity: float, per_layer: bool = False) -> torch.Tensor:
    """Exact top-k binarisation: a bool mask of ``log_alpha``'s shape, True where F.

    The ``round(sparsity * N)`` units with the lowest ``log_alpha`` become S, over all units
    (global) or within each layer (``per_layer``). Ties go to the lower index (stable sort),
    so the result is deterministic.
    """
    la = log_alpha.detach().float().cpu()
    rows = la if per_layer else la.reshape(1, -1)
    keep = torch.ones_like(rows, dtype=torch.bool)
    k = sliding_count(sparsity, rows.shape[1])
    if k:
        order = torch.sort(rows, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, order, False)
    return keep.reshape(la.shape)


def mask_to_pattern(keep: torch.Tensor, num_kv_heads: int) -> list[str]:
    """Bool ``[L, 1 or H]`` mask (True = F) to allocation-file rows of 'F'/'S'."""
    full = expand(keep, num_kv_heads)
    return ["".join("F" if f else "S" for f in row.tolist()) for row in full]
