"""PNG figures of a run: the learned allocation (heatmap) and the training curves. Agg backend."""

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


def plot_allocation(alloc: Allocation, path: Path) -> Path:
    """Left: the binary F/S pattern (layers x KV heads). Right: P(z>0) per unit, if recorded."""
    plt = _pyplot()
    import numpy as np
    full = np.array(alloc.mask(), dtype=float)
    probs = (alloc.model_extra or {}).get("training", {}).get("p_nonzero")
    ncols = 2 if probs is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(2.2 + 1.2 * ncols * max(2, alloc.num_kv_heads) ** 0.7 * 1.5,
                                                1.2 + 0.28 * alloc.num_layers), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(full, cmap="RdYlBu", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_title(f"allocation (blue F, red S)\nsparsity {alloc.sparsity:.3f}, W={alloc.window}")
    if probs is not None:
        p = np.array(probs, dtype=float)
        if p.shape[1] == 1:
            p = np.repeat(p, alloc.num_kv_heads, axis=1)
        im = axes[0, 1].imshow(p, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        axes[0, 1].set_title("P(z>0) (keep full)")
        fig.colorbar(im, ax=axes[0, 1])
    for a in axes[0]:
        a.set_xlabel("KV head")
        a.set_ylabel("layer")
        a.set_xticks(range(alloc.num_kv_heads))
        if alloc.num_layers <= 40:
            a.set_yticks(range(alloc.num_layers))
    _save(fig, path)
    plt.close(fig)
    return path


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
