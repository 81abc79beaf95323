"""Pure-torch hybrid paged attention (CPU engine, and the reference for the Triton kernel).

KV pool layout (one tensor per KV-cache group, "pool"):
    cache[num_blocks, 2, block_size, pool_heads, head_dim]   (dim 1: 0 = K, 1 = V)
Dim 0 may be non-contiguous (padded pages); everything here goes through views and
``index_select`` so strides are respected.

A layer owns a contiguous head range ``[head_offset, head_offset + n)`` of its pool.  Full
attention (F) heads live in the F pool and are read through the F block table; sliding
window (S) heads live in the S pool and are read through the S block table.  For S heads
only the blocks that hold keys inside the window of the current query chunk are gathered:
out-of-window block-table entries may be 0 or garbage (vLLM's sliding-window manager
replaces freed blocks with the null block) and are never dereferenced.

Semantics (docs/DESIGN.md §4): a query at absolute position i sees keys
    F heads: 0 .. i
    S heads: max(0, i - W + 1) .. i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries are processed in chunks of this many tokens per sequence: bounds the size of the
# (chunk x keys) mask / score matrices, and makes S heads O(q_len * (chunk + W)).
_Q_CHUNK = 1024


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    head_offset: int,
) -> None:
    """Scatter key/value [T, n, D] into ``cache[slot // B, 0/1, slot % B, head_offset:+n]``.

    ``slot_mapping`` is int64/int32 [T] (it may be longer than T: extra entries are ignored;
    ``key`` may also be longer than ``slot_mapping``: extra rows are ignored).  Slots < 0
    are padding and are skipped.
    """
    n = key.shape[1]
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0 or n == 0:
        return
    block_size = cache.shape[2]
    slots = slot_mapping[:num_tokens].to(torch.int64)
    key = key[:num_tokens]
    value = value[:num_tokens]
    valid = slots >= 0
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        slots = slots[idx]
        key = key[idx]
        value = value[idx]
    blk = slots // block_size
    off = slots % block_size
    # cache[:, 0] is a view [num_blocks, B, H, D]; advanced indices (blk, off) are adjacent
    # so the indexed shape is [T', n, D].  Setitem on a view writes the cache storage.
    k_view = cache[:, 0]
    v_view = cache[:, 1]
    k_view[blk, off, head_offset : head_offset + n] = key.to(cache.dtype)
    v_view[blk, off, head_offset : head_offset + n] = value.to(cache.dtype)


def _gather_kv(
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    head_offset: int,
    n: int,
    lo: int,
    hi: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K, V [n, hi - lo, D] (float32) of positions lo..hi-1, reading only the blocks
    that hold those positions."""
    block_size = cache.shape[2]
    blk_lo = lo // block_size
    blk_hi = (hi + block_size - 1) // block_size
    ids = block_table_row[blk_lo:blk_hi].to(torch.int64)
    heads = cache[:, :, :, head_offset : head_offset + n]  # view, strides kept
    kv = heads.index_select(0, ids)  # [nb, 2, B, n, D]
    nb, _, _, _, d = kv.shape
    kv = kv.permute(1, 3, 0, 2, 4).reshape(2, n, nb * block_size, d)
    start = lo - blk_lo * block_size
    kv = kv[:, :, start : start + (hi - lo)].float()
    return kv[0], kv[1]


def _attend_group(
    query: torch.Tensor,
    output: torch.Tensor,
    q0: int,
    q_len: int,
    ctx: int,
    scale: float,
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    head_offset: int,
    n: int,
    q_head_start: int,
    group: int,
    window: int | None,
) -> None:
    """Attention of one sequence's new tokens for one head group (all F or all S heads)."""
    d = query.shape[2]
    nq = n * group
    for a in range(0, q_len, _Q_CHUNK):
        b = min(q_len, a + _Q_CHUNK)
        qc = b - a
        hi = ctx + b  # exclusive: the last query of the chunk sees itself
        lo = 0 if window is None else max(0, ctx + a - window + 1)
        k, v = _gather_kv(cache, block_table_row, head_offset, n, lo, hi)  # [n, kl, D]
        # q [qc, n*G, D] -> [n, G*qc, D] (row r = g * qc + t)
        q = query[q0 + a : q0 + b, q_head_start : q_head_start + nq].float()
        q = q.reshape(qc, n, group, d).permute(1, 2, 0, 3).reshape(n, group * qc, d)
        qpos = torch.arange(ctx + a, ctx + b, device=query.device)
        kpos = torch.arange(lo, hi, device=query.device)
        diff = qpos[:, None] - kpos[None, :]
        mask = diff >= 0
        if window is not None:
            mask = mask & (diff < window)
        if group > 1:
            mask = mask.repeat(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.reshape(n, group, qc, d).permute(2, 0, 1, 3).reshape(qc, nq, d)
        output[q0 + a : q0 + b, q_head_start : q_head_start + nq] = out.to(output.dtype)


def hybrid_paged_attention(
    query: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    full_cache: torch.Tensor | None,
    full_block_table: torch.Tensor | None,
    full_head_offset: int,
    n_full: int,
    swa_cache: torch.Tensor | None,
    swa_block_table: torch.Tensor | None,
    swa_head_offset: int,
    n_swa: int,
    window: int,
    max_query_len: int,
    max_seq_len: int,
    **_unused,
) -> None:
    """See the package docstring (consa_vllm.plugin.ops) for the contract.

    Loops over sequences (host sync on query_start_loc / seq_lens: fine on CPU), never over
    tokens.  Output rows of tokens beyond query_start_loc[-1] are left untouched.
    """
    n_kv = n_full + n_swa
    if n_kv == 0:
        return
    hq = query.shape[1]
    if hq % n_kv != 0:
        raise ValueError(f"query heads {hq} not a multiple of n_full + n_swa = {n_kv}")
    group = hq // n_kv
    if n_swa > 0 and window < 1:
        raise ValueError(f"window must be >= 1 for sliding-window heads, got {window}")
    if n_full > 0 and (full_cache is None or full_block_table is None):
        raise ValueError("n_full > 0 needs full_cache and full_block_table")
    if n_swa > 0 and (swa_cache is None or swa_block_table is None):
        raise ValueError("n_swa > 0 needs swa_cache and swa_block_table")
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(qsl) - 1
    for s in range(num_seqs):
        q0, q1 = qsl[s], qsl[s + 1]
        q_len = q1 - q0
        if q_len <= 0:
            continue
        ctx = lens[s] - q_len
        if ctx < 0:
            raise ValueError(f"seq {s}: seq_len {lens[s]} < query len {q_len}")
        if n_full > 0:
            _attend_group(query, output, q0, q_len, ctx, scale, full_cache,
                          full_block_table[s], full_head_offset, n_full, 0, group, None)
        if n_swa > 0:
            _attend_group(query, output, q0, q_len, ctx, scale, swa_cache,
                          swa_block_table[s], swa_head_offset, n_swa, n_full * group,
                          group, window)
