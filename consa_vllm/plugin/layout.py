"""Where each KV head of a ConSA model lives in vLLM's KV cache (pure Python, no torch).

kv_head allocations are served with two KV *pools*, one per vLLM KV-cache group:

- the F pool, a ``FullAttentionSpec`` whose ``num_kv_heads`` is the number of F heads of
  all layers on this rank;
- the S pool, a ``SlidingWindowSpec`` holding every S head; vLLM's sliding-window
  manager frees its out-of-window blocks, so S memory per sequence is bounded by W.

Layer ``l`` owns the contiguous head range ``[full_offset[l], full_offset[l] + n_full[l])``
of the F pool (same for S). Within a layer, heads are permuted at load time so that its
F heads come first: one fused attention launch then covers the whole layer.

Two pools (instead of one module per head or per layer) keep exactly two KV-cache groups
whatever the allocation, so vLLM's page-size rules and prefix caching (full attention
plus one other type) always apply. The two page sizes are matched by picking block
sizes (and padding the smaller page by at most a few percent, see :func:`choose_block_sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from consa_vllm.allocation import Allocation


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer on one tensor-parallel rank."""

    layer: int
    kv_heads: tuple[int, ...]  # this rank's KV heads (global indices) in load order: F first, then S
    n_full: int
    n_sliding: int
    full_offset: int  # first head of this layer in the F pool
    sliding_offset: int  # first head of this layer in the S pool

    @property
    def permutation(self) -> tuple[int, ...]:
        """Rank-local KV head order: position j holds rank-local head ``permutation[j]``."""
        base = min(self.kv_heads) if self.kv_heads else 0
        return tuple(h - base for h in self.kv_heads)

    @property
    def is_identity(self) -> bool:
        return self.permutation == tuple(range(len(self.kv_heads)))


@dataclass(frozen=True)
class PoolLayout:
    """All layers of a model on one tensor-parallel rank."""

    layers: tuple[LayerLayout, ...]
    window: int
    full_pool_heads: int
    sliding_pool_heads: int

    @classmethod
    def build(cls, allocation: Allocation, tp_size: int = 1, tp_rank: int = 0) -> "PoolLayout":
        """Assign heads to pools for rank ``tp_rank`` of ``tp_size`` (KV heads split evenly)."""
        h = allocation.num_kv_heads
        if h % tp_size:
            raise ValueError(f"{h} KV heads cannot be split evenly across tensor-parallel size {tp_size}")
        per_rank = h // tp_size
        lo = tp_rank * per_rank
        layers, f_off, s_off = [], 0, 0
        for i, row in enumerate(allocation.pattern):
            mine = range(lo, lo + per_rank)
            full = [k for k in mine if row[k] == "F"]
            slide = [k for k in mine if row[k] == "S"]
            layers.append(LayerLayout(i, tuple(full + slide), len(full), len(slide), f_off, s_off))
            f_off += len(full)
            s_off += len(slide)
        return cls(tuple(layers), allocation.window, f_off, s_off)


def choose_block_sizes(
    full_heads: int, sliding_heads: int, base_block: int, max_multiple: int = 4
) -> tuple[int, int, int]:
    """Block sizes ``(B_F, B_S)`` and the shared page (in head-token units) for two pools.

    vLLM needs one page size for all KV-cache groups. A page holds ``B * heads`` head-tokens;
    blocks are multiples of ``base_block``. Among multiples up to ``max_multiple`` this
    picks the pair whose larger page wastes the least when the smaller one is padded to it,
    preferring small blocks (small multiples keep the scheduler's LCM block size and the
    S-pool overshoot past the window small).
    """
    if full_heads == 0 or sliding_heads == 0:
        return base_block, base_block, base_block * max(full_heads, sliding_heads)
    best = None
    for mf in range(1, max_multiple + 1):
        for ms in range(1, max_multiple + 1):
            pf, ps = mf * full_heads, ms * sliding_heads
            page = max(pf, ps)
            waste = max(page - pf, page - ps) / page
            key = (round(waste, 4), page)
            if best is None or key < best[0]:
                best = (key, mf * base_block, ms * base_block, page * base_block)
    assert best is not None
    return best[1], best[2], best[3]
