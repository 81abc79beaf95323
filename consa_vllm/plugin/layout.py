"""Where each KV head of a ConSA model lives in vLLM's KV cache (pure Python, no torch).

kv_head allocations are served with two KV *pools*, one per vLLM KV-cache group:

- the F pool, a ``FullAttentionSpec`` whose ``num_kv_heads`` is the number of F heads of
  all layers on this rank;
- the S pool, a ``SlidingWindowSpec`` holding every S head; vLLM's sliding-window
  manager frees its out-of-window blocks, so S memory per sequence is bounded by W.
  With attention sinks (``sink > 0``) it is the plugin's ``SinkSlidingWindowSpec``,
  whose manager also keeps each sequence's first ``sink`` tokens
  (:mod:`consa_vllm.plugin.sink_kv`).

Layer ``l`` owns the contiguous head range ``[full_offset[l], full_offset[l] + n_full[l])``
of the F pool (same for S). Heads are permuted in the checkpoint at load time (see
``ConsaMixin.load_weights`` in :mod:`consa_vllm.plugin.models`) so that each rank's share of
a layer has its F heads first: one fused attention launch then covers the whole layer.

Tensor parallelism. vLLM's sharded loaders give rank ``r`` the contiguous KV heads
``[r*H/tp, (r+1)*H/tp)`` of every layer, and vLLM needs the *same* KV cache specs on
every rank. With more ranks than KV heads (``tp`` a multiple of ``H``, as Qwen3-MoE's 4 KV
heads at ``tp`` 8) vLLM replicates them instead: rank ``r`` holds head ``r // (tp/H)``. This
module balances over the distinct *shards* of a layer's heads (:func:`kv_shards`: ``tp``, or
``H`` when replicated), and every rank of a shard serves the same heads; below, "rank" reads
"shard" there. Any permutation of a layer's KV heads (each with its query group and the
matching ``o_proj`` columns) leaves the layer's function unchanged, so this module
chooses, per layer, which heads each rank gets (:func:`balance_heads`): every rank gets
``H/tp`` heads of each layer and, over all layers, F-head counts that differ by at most
one. Each rank's F heads in a layer also differ by at most one, which balances attention
work per layer. When the F total is not divisible by ``tp``, the ranks with fewer F heads
pad their F pool (and the others their S pool) with one unused head slot, so all pools
have identical sizes; :func:`balance_summary` says what that costs.

Two pools (instead of one module per head or per layer) keep at most two KV-cache groups
whatever the allocation (one when every head is F or every head is S), so vLLM's
page-size rules and prefix caching (full attention plus one other type) always apply. The two page sizes are matched by picking block
sizes (and padding the smaller page by at most a few percent, see :func:`choose_block_sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from consa_vllm.allocation import Allocation


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer on one tensor-parallel rank."""

    layer: int
    kv_heads: tuple[int, ...]  # this rank's KV heads (checkpoint indices) in load order: F first, then S
    n_full: int
    n_sliding: int
    full_offset: int  # first head of this layer in the F pool
    sliding_offset: int  # first head of this layer in the S pool
    # The layer's whole head order over all ranks: served head j is checkpoint head
    # global_order[j]; rank r serves positions [r*H/tp, (r+1)*H/tp). Same on every rank.
    global_order: tuple[int, ...] = ()

    @property
    def is_identity(self) -> bool:
        """Whether the checkpoint's head order is already the served order."""
        return self.global_order == tuple(range(len(self.global_order)))


@dataclass(frozen=True)
class PoolLayout:
    """All layers of a model on one tensor-parallel rank."""

    layers: tuple[LayerLayout, ...]
    window: int
    full_pool_heads: int  # pool sizes: identical on every rank (may include unused slots)
    sliding_pool_heads: int
    tp_size: int = 1
    tp_rank: int = 0
    # S heads also see keys 0 .. sink-1 (the attention ops' KVPool.sink; the S pool's
    # SinkSlidingWindowSpec keeps their blocks); 0: plain sliding window.
    sink: int = 0

    @property
    def full_used(self) -> int:
        """F heads this rank actually stores (the rest of the F pool is padding)."""
        return sum(lay.n_full for lay in self.layers)

    @property
    def sliding_used(self) -> int:
        """S heads this rank actually stores (the rest of the S pool is padding)."""
        return sum(lay.n_sliding for lay in self.layers)

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads of each layer on this rank (1 where vLLM replicates them)."""
        return len(self.layers[0].kv_heads) if self.layers else 0

    @classmethod
    def build(cls, allocation: Allocation, tp_size: int = 1, tp_rank: int = 0) -> "PoolLayout":
        """Assign heads to ranks and pools for rank ``tp_rank`` of ``tp_size``.

        Raises ``ValueError`` only when no layout exists: a layer's KV heads can be neither
        split evenly across ``tp_size`` ranks nor replicated evenly over them.
        """
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} of size {tp_size} is not valid")
        orders = balance_heads(allocation.pattern, tp_size)
        shards, per_rank = _shards_of(allocation.pattern, tp_size)
        shard = tp_rank // (tp_size // shards)  # vLLM's replicas of a head are adjacent ranks
        layers, f_off, s_off = [], 0, 0
        for i, (row, order) in enumerate(zip(allocation.pattern, orders)):
            mine = order[shard * per_rank:(shard + 1) * per_rank]
            n_full = sum(row[k] == "F" for k in mine)
            layers.append(LayerLayout(i, mine, n_full, per_rank - n_full, f_off, s_off, order))
            f_off += n_full
            s_off += per_rank - n_full
        full_pool, sliding_pool = pool_sizes(allocation.pattern, tp_size)
        return cls(tuple(layers), allocation.window, full_pool, sliding_pool, tp_size, tp_rank,
                   sink=allocation_sink(allocation))


def uses_pools(allocation: Allocation) -> bool:
    """Whether the fused two-pool attention serves this allocation (else stock modules)."""
    has_full = any("F" in row for row in allocation.pattern)
    # Layer allocations map to stock per-layer windows, except all-S ones (with no
    # full-attention group to unify block sizes against, stock CPU attention crashes) and
    # ones with attention sinks (stock sliding-window layers free the sink blocks).
    return allocation.granularity == "kv_head" or not has_full or allocation_sink(allocation) > 0


def moved_head_orders(allocation: Allocation, tp_size: int) -> dict[int, tuple[int, ...]]:
    """Layer -> served KV-head order, for the layers whose checkpoint head order the loader
    changes at ``tp_size`` (empty: every tensor loads as stored).

    Only kv_head allocations move heads: a layer allocation's rows are all F or all S, so
    :func:`balance_heads` keeps them in place.
    """
    if allocation.granularity != "kv_head":
        return {}
    return {layer: order for layer, order in enumerate(balance_heads(allocation.pattern, tp_size))
            if order != tuple(range(len(order)))}


def allocation_sink(allocation: Allocation) -> int:
    """The allocation's attention sink in tokens (0 when the file has none)."""
    # Read as an optional field: files written before sinks existed have none.
    return getattr(allocation, "sink", 0) or 0


def kv_shards(num_kv_heads: int, tp_size: int) -> int:
    """How many distinct shards of a layer's ``num_kv_heads`` KV heads ``tp_size`` ranks hold.

    ``tp_size`` when it divides the heads (``H/tp`` heads per rank); ``num_kv_heads`` when
    ``tp_size`` is a multiple of it (vLLM's ``QKVParallelLinear`` replicates each head on
    ``tp/H`` adjacent ranks). Raises ``ValueError`` otherwise, as vLLM's loader would.
    """
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if num_kv_heads % tp_size == 0:
        return tp_size
    if tp_size % num_kv_heads == 0:
        return num_kv_heads
    raise ValueError(f"{num_kv_heads} KV heads per layer can be neither split evenly across nor replicated "
                     f"evenly over tensor-parallel size {tp_size}")


def _shards_of(pattern: list[str], tp_size: int) -> tuple[int, int]:
    """(shards, KV heads per shard) of ``pattern``'s layers over ``tp_size`` ranks (:func:`kv_shards`)."""
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
    h = len(pattern[0]) if pattern else 0
    shards = kv_shards(h, tp_size) if h else tp_size
    return shards, h // shards


def _split_counts(pattern: list[str], tp_size: int) -> list[list[int]]:
    """F heads per (layer, rank): each layer's F count split as evenly as possible over the
    ranks, the odd heads handed out round-robin across layers so that rank totals differ
    by at most one (the first rank of each hand-out continues where the last layer stopped).
    """
    counts, cursor = [], 0
    for row in pattern:
        f = row.count("F")
        base, extra = divmod(f, tp_size)
        per = [base] * tp_size
        for j in range(extra):
            per[(cursor + j) % tp_size] += 1
        cursor = (cursor + extra) % tp_size
        counts.append(per)
    return counts


def balance_heads(pattern: list[str], tp_size: int) -> list[tuple[int, ...]]:
    """Per layer, the served order of its KV heads (checkpoint indices) over all ranks.

    Shard ``s`` (rank ``s``, or with replicated heads the ranks of head ``s``: :func:`kv_shards`)
    serves positions ``[s*H/n, (s+1)*H/n)`` of each order for ``n`` shards, with its F heads
    first. Heads stay on the shard whose natural range holds them as far as the balanced
    counts allow, so at ``tp_size=1``, and wherever each shard's natural range already
    holds its balanced share of a layer, heads are only reordered within a shard.
    """
    shards, per_rank = _shards_of(pattern, tp_size)
    orders = []
    for row, f_counts in zip(pattern, _split_counts(pattern, shards)):
        want = {"F": f_counts, "S": [per_rank - f for f in f_counts]}
        chosen: list[dict[str, list[int]]] = [{"F": [], "S": []} for _ in range(shards)]
        for kind in ("F", "S"):
            spare = []
            for r in range(shards):  # keep heads on their natural shard first
                natural = [k for k in range(r * per_rank, (r + 1) * per_rank) if row[k] == kind]
                chosen[r][kind] = natural[:want[kind][r]]
                spare += natural[want[kind][r]:]
            for r in range(shards):  # then move the surplus to shards that lack heads
                need = want[kind][r] - len(chosen[r][kind])
                chosen[r][kind] += spare[:need]
                spare = spare[need:]
            assert not spare
        orders.append(tuple(k for r in range(shards) for k in sorted(chosen[r]["F"]) + sorted(chosen[r]["S"])))
    return orders


def pool_sizes(pattern: list[str], tp_size: int) -> tuple[int, int]:
    """(F pool heads, S pool heads) on every rank: the largest per-shard totals."""
    shards, per_rank = _shards_of(pattern, tp_size)
    counts = _split_counts(pattern, shards)
    full = [sum(c[r] for c in counts) for r in range(shards)]
    return max(full), max(len(pattern) * per_rank - f for f in full)


def balance_summary(allocation: Allocation, tp_size: int) -> str | None:
    """A one-line note on what serving ``allocation`` at ``tp_size`` moves and pads, or None.

    None when every rank's natural head range already holds the balanced F/S counts of
    every layer and no pool needs padding (nothing worth telling).
    """
    if tp_size == 1:
        return None
    orders = balance_heads(allocation.pattern, tp_size)
    shards, per_rank = _shards_of(allocation.pattern, tp_size)
    moved = sum(sum(order[j] // per_rank != j // per_rank for j in range(len(order))) for order in orders)
    full_pool, sliding_pool = pool_sizes(allocation.pattern, tp_size)
    total = len(allocation.pattern) * per_rank
    pad = full_pool + sliding_pool - total
    if not moved and not pad:
        return None
    where = "ranks" if shards == tp_size else (
        f"the {shards} KV-head shards (vLLM replicates each KV head on {tp_size // shards} ranks)")
    how = (f"by moving {moved} KV heads (with their query heads) to another rank at load time (exact: "
           "heads of a layer are interchangeable)") if moved else "without moving KV heads between ranks"
    msg = (f"ConSA: tensor-parallel size {tp_size}: balanced the kv_head allocation across {where} {how}; "
           f"each rank holds {full_pool} F + {sliding_pool} S pool head slots")
    if pad:
        # The F total does not divide by the shards: ranks with one F head fewer leave an F
        # slot empty, the others an S slot. An F slot costs memory that grows with the
        # context, an S slot only up to the window, so both are stated.
        f_total = sum(row.count("F") for row in allocation.pattern)
        fewer = f"{full_pool - 1} F head" + ("s" if full_pool != 2 else "")
        msg += (f", of which 1 unused per rank (the {f_total} F heads do not divide by {shards}): ranks "
                f"holding {fewer} leave 1 of {full_pool} F slots empty ({1 / full_pool:.1%} "
                f"of F-pool KV memory), the others 1 of {sliding_pool} S slots ({1 / sliding_pool:.1%} "
                "of S-pool KV memory)")
    return msg


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
