"""Rule-based allocations at an exact sparsity: the baselines that ConSA is compared with.

Every rule picks exactly ``round(rho * units)`` S units and refuses a rho that the unit
count cannot hit exactly, so that comparisons are made at equal KV memory.

:func:`sliding_count` is the package's one rounding rule from a sparsity to a number of S
units; the trainer's binarisation, ``import-duo`` and ``--method duo`` use it too, and
:func:`nearest_exact` is the one test of whether a sparsity is met exactly (``make``,
``import-duo`` and the trainer's ``--target-sparsity`` check).
"""

from __future__ import annotations

import math
import random as _random
from typing import Literal

from .format import FULL, SLIDING, Allocation

Rule = Literal["interleave", "bottom", "top", "middle", "random", "uniform"]
RULES: tuple[str, ...] = ("interleave", "bottom", "top", "middle", "random", "uniform")
#: How far ``rho * units`` may lie from a whole number and still be met exactly: a float
#: sparsity such as 0.3 never is (0.3 * 10 is 2.9999999999999996).
EXACT_TOLERANCE = 1e-6


def sliding_count(rho: float, units: int) -> int:
    """How many of ``units`` become S at sparsity ``rho``: ``round(rho * units)``, halves up, in 0..units."""
    # 1e-9: a half that the float product misses by a rounding error still rounds up (0.58 * 25 is 14.4999...).
    return min(units, max(0, math.floor(rho * units + 0.5 + 1e-9)))


def nearest_exact(rho: float, units: int) -> tuple[float, float] | None:
    """None when ``rho * units`` is a whole number (within :data:`EXACT_TOLERANCE`); else the
    nearest sparsities below and above ``rho`` that are."""
    need = rho * units
    if abs(sliding_count(rho, units) - need) <= EXACT_TOLERANCE:
        return None
    lo = math.floor(need)
    return lo / units, min(lo + 1, units) / units


def exact_count(rho: float, units: int, what: str = "units") -> int:
    """The number of S units for sparsity ``rho``; raises if ``rho * units`` is not whole."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {rho}")
    near = nearest_exact(rho, units)
    if near is not None:
        raise ValueError(
            f"sparsity {rho} cannot be met exactly with {units} {what} "
            f"(it needs {rho * units:g} S {what}); nearest exact values: "
            f"{near[0]:.6g} or {near[1]:.6g}"
        )
    return sliding_count(rho, units)


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
