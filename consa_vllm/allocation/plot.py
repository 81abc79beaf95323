"""The layers x KV heads heatmap of an allocation (matplotlib, Agg backend, imported lazily).

Layout: KV heads on the x axis, layers on the y axis with **layer 0 at the bottom** (so the
"bottom" rule puts its S block at the bottom of the picture, as in the paper's figures).
F cells are dark blue, S cells light orange (distinguishable in greyscale and by
colour-blind readers). The right-hand margin gives each layer's F count. With
``probabilities`` (a ``[L][H]`` array of P(F), e.g. from the trainer's gates) a second
panel draws them as a continuous map, with the cells finally chosen as F outlined. The
legend and the title name the window and, when the allocation has one, the sink.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .format import Allocation

F_COLOR = "#1f4e79"  # full attention
S_COLOR = "#f6c28b"  # sliding window
GRID_COLOR = "white"


def _check_probabilities(allocation: Allocation, probabilities) -> list[list[float]]:
    rows = [[float(x) for x in row] for row in (probabilities.tolist() if hasattr(probabilities, "tolist")
                                                 else probabilities)]
    L, H = allocation.num_layers, allocation.num_kv_heads
    if len(rows) != L or any(len(r) != H for r in rows):
        got = f"{len(rows)} x {sorted({len(r) for r in rows})}"
        raise ValueError(f"probabilities must be {L} layers x {H} KV heads (the allocation's shape), got {got}")
    if any(not 0.0 <= x <= 1.0 for r in rows for x in r):
        raise ValueError("probabilities must lie in [0, 1] (they are P(F) per unit)")
    return rows


def plot_allocation(
    allocation: Allocation,
    out_png: str | os.PathLike,
    title: str | None = None,
    probabilities: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Draw ``allocation`` as a heatmap to ``out_png`` (written atomically). Returns the path."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no
    # figure registry to leak into a caller's notebook or GUI session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    probs = _check_probabilities(allocation, probabilities) if probabilities is not None else None
    L, H = allocation.num_layers, allocation.num_kv_heads
    grid = [[1 if c == "F" else 0 for c in row] for row in allocation.pattern]
    f_counts = [row.count("F") for row in allocation.pattern]
    n_cells = L * H

    # Size: cells of about 0.42 x 0.26 inch, within sensible bounds; constrained layout
    # places the labels, the outside legend and the colour bar.
    cell_w = 0.42 if H <= 16 else max(0.12, 6.5 / H)
    cell_h = 0.26 if L <= 48 else max(0.08, 12.5 / L)
    panel_w = max(1.6, H * cell_w)
    n_panels = 2 if probs is not None else 1
    fig_w = max(5.8, 1.6 + n_panels * (panel_w + 1.0) + (1.0 if probs is not None else 0))
    fig_h = max(3.6, L * cell_h + 2.3)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)
    ax = axes[0][0]

    ax.imshow(grid, cmap=ListedColormap([S_COLOR, F_COLOR]), vmin=0, vmax=1, origin="lower",
              aspect="auto", interpolation="nearest")
    _decorate(ax, L, H)
    # F count per layer, as tick labels of a right-hand axis.
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(L), labels=[f"{n}F" for n in f_counts])
    right.tick_params(length=0, labelsize=_tick_size(L))
    for lab, n in zip(right.get_yticklabels(), f_counts):
        lab.set_color(F_COLOR if n else "#a0601a")
        if n == H:
            lab.set_fontweight("bold")
    right.set_ylabel(f"F heads per layer (of {H})", fontsize=8, color="0.3")
    for sp in right.spines.values():
        sp.set_visible(False)

    gran = "per KV head" if allocation.granularity == "kv_head" else "per layer"
    n_s = n_cells - sum(f_counts)
    ax.set_title(f"granularity: {gran}", fontsize=9)

    if probs is not None:
        axp = axes[0][1]
        im = axp.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto",
                        interpolation="nearest")
        _decorate(axp, L, H)
        fx = [h for row in allocation.pattern for h, c in enumerate(row) if c == "F"]
        fy = [i for i, row in enumerate(allocation.pattern) for c in row if c == "F"]
        axp.scatter(fx, fy, s=_dot_size(L, H), c="white", edgecolors="black", linewidths=0.6,
                    zorder=3, label="chosen F")
        axp.set_title("P(F) per unit (dot: chosen F)", fontsize=9)
        cb = fig.colorbar(im, ax=axp, shrink=0.9)
        cb.set_label("P(F): probability of full attention", fontsize=8)
        cb.ax.tick_params(labelsize=7)

    # S heads with sinks are not a plain sliding window: say so wherever the window is named.
    if allocation.sink:
        s_label = f"sink {allocation.sink} + sliding window {allocation.window}"
        s_params = f"window W = {allocation.window}, sink = {allocation.sink} tokens"
    else:
        s_label = f"sliding window (W = {allocation.window})"
        s_params = f"window W = {allocation.window}"
    fig.legend(
        handles=[Patch(facecolor=F_COLOR, label="F  full attention"),
                 Patch(facecolor=S_COLOR, label=f"S  {s_label}")],
        loc="outside lower center", ncol=2, fontsize=8, frameon=False, handlelength=1.2,
    )
    fig.suptitle(
        f"{title or 'ConSA allocation'}\n"
        f"sparsity ρ = {allocation.sparsity:.3f}  ({n_s} of {n_cells} KV heads S)\n"
        f"{L} layers × {H} KV heads, {s_params}",
        fontsize=10,
    )

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=150, format="png", bbox_inches="tight", pad_inches=0.12)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _decorate(ax, L: int, H: int) -> None:
    ax.set_xlabel("KV head", fontsize=9)
    ax.set_ylabel("layer (0 = bottom = first layer)", fontsize=9)
    x_step = 1 if H <= 16 else max(1, H // 8)
    y_step = 1 if L <= 32 else (2 if L <= 64 else max(1, L // 32))
    ax.set_xticks(range(0, H, x_step))
    ax.set_yticks(range(0, L, y_step))
    ax.tick_params(labelsize=_tick_size(L), length=2)
    # White lines between cells.
    ax.set_xticks([x - 0.5 for x in range(1, H)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, L)], minor=True)
    ax.grid(which="minor", color=GRID_COLOR, linewidth=0.8 if L <= 48 else 0.4)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)


def _tick_size(L: int) -> float:
    return 7.5 if L <= 32 else (6 if L <= 64 else 4.5)


def _dot_size(L: int, H: int) -> float:
    return max(4.0, min(28.0, 700.0 / max(L, H)))
