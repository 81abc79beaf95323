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
        "sink": a.sink,
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
    sink = f" sink={a.sink}" if a.sink else ""
    lines = [f"granularity={a.granularity} window={a.window}{sink} layers={a.num_layers} "
             f"kv_heads={a.num_kv_heads} sparsity={s['sparsity']:.4f} "
             f"(F heads {s['full_kv_heads']}, S heads {s['sliding_kv_heads']})"]
    for i, row in enumerate(a.pattern):
        lines.append(f"  layer {i:>{width}}  {row}  {row.count('F')}F/{row.count('S')}S")
    return "\n".join(lines)


def describe_sliding(a: Allocation) -> str:
    """What an S head of ``a`` attends to, in words (for ``consa-vllm show`` and the heatmap)."""
    w = a.window
    recent = f"keys i-{w - 1}..i" if w > 1 else "key i"
    if a.sink:
        first = "key 0" if a.sink == 1 else f"keys 0..{a.sink - 1}"
        return f"sink {a.sink} + window {w}: query i sees {first} and {recent}"
    return f"window {w}, no sink: query i sees {recent}"
