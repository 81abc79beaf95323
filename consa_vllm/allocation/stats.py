"""Summary statistics and a text rendering of an allocation."""

from __future__ import annotations

from typing import Any

from .format import Allocation


def summarize(a: Allocation) -> dict[str, Any]:
    """Counts and fractions that people look at first."""
    f_per_layer = [row.count("F") for row in a.pattern]
    all_s = [i for i, n in enumerate(f_per_layer) if n == 0]
    all_f = [i for i, n in enumerate(f_per_layer) if n == a.num_kv_heads]
    return {
        "granularity": a.granularity,
        "window": a.window,
        "num_layers": a.num_layers,
        "num_kv_heads": a.num_kv_heads,
        "num_units": a.num_units,
        "sparsity": a.sparsity,
        "full_kv_heads": sum(f_per_layer),
        "sliding_kv_heads": a.num_layers * a.num_kv_heads - sum(f_per_layer),
        "full_heads_per_layer": f_per_layer,
        "sliding_fraction_per_layer": [1 - n / a.num_kv_heads for n in f_per_layer],
        "all_sliding_layers": all_s,
        "all_full_layers": all_f,
    }


def render_text(a: Allocation) -> str:
    """The pattern as a small table, one layer per line."""
    s = summarize(a)
    width = len(str(a.num_layers - 1))
    lines = [f"granularity={a.granularity} window={a.window} layers={a.num_layers} "
             f"kv_heads={a.num_kv_heads} sparsity={s['sparsity']:.4f} "
             f"(F heads {s['full_kv_heads']}, S heads {s['sliding_kv_heads']})"]
    for i, row in enumerate(a.pattern):
        lines.append(f"  layer {i:>{width}}  {row}  {row.count('F')}F/{row.count('S')}S")
    return "\n".join(lines)
