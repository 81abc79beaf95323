"""Rule-based allocations at an exact sparsity: the baselines that ConSA is compared with.

Every rule picks exactly ``round(rho * units)`` S units and refuses a rho that the unit
count cannot hit exactly, so that comparisons are made at equal KV memory.
"""

from __future__ import annotations

import random as _random
from typing import Literal

from .format import FULL, SLIDING, Allocation

Rule = Literal["interleave", "bottom", "top", "middle", "random", "uniform"]
RULES: tuple[str, ...] = ("interleave", "bottom", "top", "middle", "random", "uniform")


def exact_count(rho: float, units: int, what: str = "units") -> int:
    """The number of S units for sparsity ``rho``; raises if ``rho * units`` is not whole."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {rho}")
    k = round(rho * units)
    if abs(k - rho * units) > 1e-6:
        lo, hi = int(rho * units), int(rho * units) + 1
        raise ValueError(
            f"sparsity {rho} cannot be met exactly with {units} {what} "
            f"(it needs {rho * units:g} S {what}); nearest exact values: "
            f"{lo / units:.6g} or {min(hi, units) / units:.6g}"
        )
    return k


def _spread(n_pick: int, n: int) -> list[int]:
    """``n_pick`` evenly spaced indices in ``range(n)``, the last one at ``n - 1``."""
    return [((i + 1) * n) // n_pick - 1 for i in range(n_pick)] if n_pick else []


def _order_for_s(rule: str, n: int, seed: int) -> list[int]:
    """Unit indices (0..n-1) in the order they become S."""
    idx = list(range(n))
    if rule == "bottom":
        return idx
    if rule == "top":
        return idx[::-1]
    if rule == "middle":
        # S grows from both ends inwards, so F is a contiguous block in the middle.
        order, lo, hi = [], 0, n - 1
        while lo <= hi:
            order.append(lo)
            if hi != lo:
                order.append(hi)
            lo, hi = lo + 1, hi - 1
        return order
    if rule == "random":
        rng = _random.Random(seed)
        rng.shuffle(idx)
        return idx
    raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def make_allocation(
    rule: str,
    sparsity: float,
    num_layers: int,
    num_kv_heads: int,
    window: int,
    granularity: Literal["layer", "kv_head"] = "kv_head",
    seed: int = 0,
    sink: int = 0,
) -> Allocation:
    """Build a rule-based allocation whose sparsity is exactly ``sparsity``.

    ``sink``: attention-sink tokens of the S heads (0: a plain sliding window).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if num_layers < 1 or num_kv_heads < 1:
        raise ValueError(f"model shape must be positive, got {num_layers} layers x {num_kv_heads} KV heads")
    grid = [[FULL] * num_kv_heads for _ in range(num_layers)]

    if granularity == "layer":
        if rule == "uniform":
            raise ValueError("rule 'uniform' needs granularity 'kv_head' (it puts the same number "
                             "of F heads in every layer); for layers use 'interleave'")
        k = exact_count(sparsity, num_layers, "layers")
        if rule == "interleave":
            f_layers = set(_spread(num_layers - k, num_layers))
            s_layers = [i for i in range(num_layers) if i not in f_layers]
        else:
            s_layers = _order_for_s(rule, num_layers, seed)[:k]
        for i in s_layers:
            grid[i] = [SLIDING] * num_kv_heads
    else:
        if rule == "uniform":
            k = exact_count(sparsity, num_kv_heads, "KV heads per layer")
            rng = _random.Random(seed)
            for row in grid:
                for h in rng.sample(range(num_kv_heads), k):
                    row[h] = SLIDING
        else:
            n = num_layers * num_kv_heads
            k = exact_count(sparsity, n, "KV heads")
            if rule == "interleave":
                f_units = set(_spread(n - k, n))
                s_units = [u for u in range(n) if u not in f_units]
            else:
                s_units = _order_for_s(rule, n, seed)[:k]
            for u in s_units:
                grid[u // num_kv_heads][u % num_kv_heads] = SLIDING

    extra = {"rule": rule, "target_sparsity": sparsity}
    if rule in ("random", "uniform"):
        extra["seed"] = seed
    # from_dict: a bad argument (window < 1, sink < 0) is an AllocationError naming the field.
    return Allocation.from_dict(dict(granularity=granularity, window=window, sink=sink,
                                     pattern=["".join(r) for r in grid], **extra))
