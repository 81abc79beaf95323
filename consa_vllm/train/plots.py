"""PNG figures of a run: the training curves (Agg backend), and the gate probabilities that the
allocation heatmap (the package's one, :func:`consa_vllm.allocation.plot_allocation`) draws beside
the learned pattern.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from consa_vllm.allocation import Allocation


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """Atomic PNG write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process rather than mkstemp's file, which is 0600: savefig creates it with
    # the ordinary mode (0666 less the umask), as for the allocation heatmap.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def gate_probabilities(alloc: Allocation) -> list[list[float]] | None:
    """P(F) per layer and KV head as the trainer recorded it (``training.p_nonzero``), or None.

    None for an allocation the trainer did not learn (``--allocation``: stage 2 alone). Under
    layer granularity there is one gate per layer; its probability is repeated over the
    layer's KV heads, the shape :func:`consa_vllm.allocation.plot_allocation` draws.
    """
    probs = ((alloc.model_extra or {}).get("training") or {}).get("p_nonzero")
    if probs is None:
        return None
    return [list(row) * alloc.num_kv_heads if len(row) == 1 else list(row) for row in probs]


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss (both stages), expected/sampled sparsity against the target, and the multipliers."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["loss"] for r in history], lw=1)
    axes[0].set_title("task loss")
    s1 = [r for r in history if r.get("stage") == 1]
    x1 = [r["step"] for r in s1]
    axes[1].plot(x1, [r["expected_sparsity"] for r in s1], label="expected")
    axes[1].plot(x1, [r["sampled_sparsity"] for r in s1], lw=0.6, alpha=0.6, label="sampled (z=0)")
    axes[1].plot(x1, [r["target"] for r in s1], "--", label="target")
    axes[1].set_title("sparsity")
    axes[1].legend(fontsize=8)
    axes[2].plot(x1, [sum(r["lambda1"]) / len(r["lambda1"]) for r in s1], label="lambda1 (mean)")
    axes[2].plot(x1, [sum(r["lambda2"]) / len(r["lambda2"]) for r in s1], label="lambda2 (mean)")
    axes[2].set_title("multipliers")
    axes[2].legend(fontsize=8)
    for a in axes:
        a.set_xlabel("step")
    _save(fig, path)
    plt.close(fig)
    return path
