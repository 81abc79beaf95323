"""Pure-torch hybrid paged attention (CPU engine, and the reference for the Triton kernel).

KV pool layout (one tensor per KV-cache group, "pool"):
    cache[num_blocks, 2, block_size, pool_heads, head_dim]   (dim 1: 0 = K, 1 = V)
Dim 0 may be non-contiguous (padded pages); everything here goes through views and
``index_select`` so strides are respected.

A layer owns a contiguous head range of each pool (:class:`~.interface.KVPool`). Full
attention (F) heads live in the F pool and are read through the F block table; sliding
window (S) heads live in the S pool and are read through the S block table. For S heads
only the blocks that hold sink keys or keys inside the window of the current query chunk
are gathered: other block-table entries may be 0 or garbage (the sliding-window manager
replaces freed blocks with the null block) and are never dereferenced.

Semantics (docs/DESIGN.md §4): a query at absolute position i sees keys
    F heads: 0 .. i
    S heads: 0 .. sink - 1 and max(0, i - W + 1) .. i (never a key after i)

FP8 pools (``float8_e4m3fn`` caches) hold ``K / k_scale`` and ``V / v_scale`` per head,
saturated; K and V are dequantized to float32 as they are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import AttnBatch, KVPool, check_pool, quantize_fp8

# Queries are processed in chunks of this many tokens per sequence: bounds the size of the
# (chunk x keys) mask / score matrices, and makes S heads O(q_len * (chunk + W)).
_Q_CHUNK = 1024


def write_kv(key: torch.Tensor, value: torch.Tensor, pool: KVPool) -> None:
    """Scatter key/value [T, n, D] into ``pool.cache[slot // B, 0/1, slot % B, head_offset:+n]``.

    ``pool.slot_mapping`` is int64/int32 [T] (it may be longer than T: extra entries are
    ignored; ``key`` may also be longer than the slot mapping: extra rows are ignored).
    Slots < 0 are padding and are skipped. An FP8 pool stores ``K / k_scale`` and
    ``V / v_scale`` (per head), saturated.
    """
    slot_mapping, cache, n = pool.slot_mapping, pool.cache, pool.num_heads
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0 or n == 0:
        return
    slots = slot_mapping[:num_tokens].to(torch.int64)
    key = key[:num_tokens]
    value = value[:num_tokens]
    valid = slots >= 0
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        slots = slots[idx]
        key = key[idx]
        value = value[idx]
    blk = slots // pool.block_size
    off = slots % pool.block_size
    # cache[:, 0] is a view [num_blocks, B, H, D]; advanced indices (blk, off) are adjacent
    # so the indexed shape is [T', n, D].  Setitem on a view writes the cache storage.
    if pool.is_fp8:
        key = quantize_fp8(key, pool.k_scale[:, None])
        value = quantize_fp8(value, pool.v_scale[:, None])
    lo, hi = pool.head_offset, pool.head_offset + n
    cache[:, 0][blk, off, lo:hi] = key.to(cache.dtype)
    cache[:, 1][blk, off, lo:hi] = value.to(cache.dtype)


def write_kv_hybrid(key: torch.Tensor, value: torch.Tensor, full: KVPool | None, sliding: KVPool | None) -> None:
    """A layer's K/V [T, n_full + n_sliding, D]: the first ``full.num_heads`` heads into the
    F pool, the rest into the S pool."""
    n_full = full.num_heads if full is not None else 0
    if n_full:
        write_kv(key[:, :n_full], value[:, :n_full], full)
    if sliding is not None and sliding.num_heads:
        write_kv(key[:, n_full:], value[:, n_full:], sliding)


def _gather_kv(pool: KVPool, block_table_row: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K, V [n, hi - lo, D] (float32, dequantized) of positions lo..hi-1, reading
    only the blocks that hold those positions."""
    block_size, n = pool.block_size, pool.num_heads
    blk_lo = lo // block_size
    blk_hi = (hi + block_size - 1) // block_size
    ids = block_table_row[blk_lo:blk_hi].to(torch.int64)
    kv = pool.heads().index_select(0, ids)  # [nb, 2, B, n, D]
    nb, _, _, _, d = kv.shape
    kv = kv.permute(1, 3, 0, 2, 4).reshape(2, n, nb * block_size, d)
    start = lo - blk_lo * block_size
    kv = kv[:, :, start : start + (hi - lo)].float()
    if pool.is_fp8:
        return kv[0] * pool.k_scale[:, None, None], kv[1] * pool.v_scale[:, None, None]
    return kv[0], kv[1]


def _attend_group(query: torch.Tensor, output: torch.Tensor, q0: int, q_len: int, ctx: int, scale: float,
                  pool: KVPool, block_table_row: torch.Tensor, q_head_start: int, group: int) -> None:
    """Attention of one sequence's new tokens for the heads of one pool."""
    d = query.shape[2]
    n, window = pool.num_heads, pool.window
    nq = n * group
    for a in range(0, q_len, _Q_CHUNK):
        b = min(q_len, a + _Q_CHUNK)
        qc = b - a
        hi = ctx + b  # exclusive: the last query of the chunk sees itself
        lo = 0 if window is None else max(0, ctx + a - window + 1)
        k, v = _gather_kv(pool, block_table_row, lo, hi)  # [n, kl, D]
        kpos = torch.arange(lo, hi, device=query.device)
        sink_hi = min(pool.sink, lo)  # sink keys below the chunk's window range
        if sink_hi:
            ks, vs = _gather_kv(pool, block_table_row, 0, sink_hi)
            k, v = torch.cat([ks, k], dim=1), torch.cat([vs, v], dim=1)
            kpos = torch.cat([torch.arange(0, sink_hi, device=query.device), kpos])
        # q [qc, n*G, D] -> [n, G*qc, D] (row r = g * qc + t)
        q = query[q0 + a : q0 + b, q_head_start : q_head_start + nq].float()
        q = q.reshape(qc, n, group, d).permute(1, 2, 0, 3).reshape(n, group * qc, d)
        qpos = torch.arange(ctx + a, ctx + b, device=query.device)
        diff = qpos[:, None] - kpos[None, :]
        mask = diff >= 0
        if window is not None:
            mask = mask & ((diff < window) | (kpos[None, :] < pool.sink))
        if group > 1:
            mask = mask.repeat(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.reshape(n, group, qc, d).permute(2, 0, 1, 3).reshape(qc, nq, d)
        output[q0 + a : q0 + b, q_head_start : q_head_start + nq] = out.to(output.dtype)


def hybrid_paged_attention(query: torch.Tensor, output: torch.Tensor, batch: AttnBatch, scale: float,
                           full: KVPool | None, sliding: KVPool | None) -> None:
    """Attention of a layer's query heads ``[T, (n_full + n_sliding) * G, D]`` into ``output``.

    Query head ``h`` belongs to KV head ``h // G``; KV heads ``[0, n_full)`` are the F
    pool's, the rest the S pool's. The K/V of the new tokens must already be in the pools.
    Loops over sequences (host sync on ``batch``'s tensors: fine on CPU), never over
    tokens. Output rows of tokens beyond ``query_start_loc[-1]`` are left untouched.
    """
    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    n_kv = n_full + n_sliding
    if n_kv == 0:
        return
    hq, d = query.shape[1], query.shape[2]
    if hq % n_kv != 0:
        raise ValueError(f"query heads {hq} not a multiple of n_full + n_sliding = {n_kv}")
    group = hq // n_kv
    for pool, name in ((full, "full"), (sliding, "sliding")):
        if pool is not None and pool.num_heads:
            check_pool(pool, name, d)
    if n_full and full.window is not None:
        raise ValueError(f"full: the F pool has no window, got {full.window}")
    if n_sliding and sliding.window is None:
        raise ValueError("sliding: the S pool needs a window")
    qsl = batch.query_start_loc.tolist()
    lens = batch.seq_lens.tolist()
    for s in range(len(qsl) - 1):
        q0, q1 = qsl[s], qsl[s + 1]
        q_len = q1 - q0
        if q_len <= 0:
            continue
        ctx = lens[s] - q_len
        if ctx < 0:
            raise ValueError(f"seq {s}: seq_len {lens[s]} < query len {q_len}")
        if n_full:
            _attend_group(query, output, q0, q_len, ctx, scale, full, full.block_table[s], 0, group)
        if n_sliding:
            _attend_group(query, output, q0, q_len, ctx, scale, sliding, sliding.block_table[s],
                          n_full * group, group)
