"""Fused hybrid paged attention in Triton: ONE launch per layer for all of its heads.

Derived from vLLM 0.26's ``vllm/v1/attention/ops/triton_unified_attention.py``
(Apache-2.0, authors Burkhard Ringlein, Jan van Lunteren, Chih-Chieh Yang, Thomas
Parnell): same q-block grid, online softmax and 2D / 3D (split-KV + reduce) structure,
stripped of the features ConSA does not need (alibi, learned sink logits, softcap,
mm-prefix ...) and extended so that one program reads either pool:

* grid axis 1 (2D) is the layer's KV head ``h`` in ``[0, n_full + n_sliding)``; ``h < n_full``
  reads the F pool through the F block table (causal), otherwise the S pool through the S
  block table (sliding window W);
* every program only iterates over the key range its q-block can see:
  F ``[0, last_q]``, S ``[max(0, first_q - W + 1), last_q]``; loads are masked to that
  range, so out-of-window block-table entries (null block / garbage) are never read;
* attention sinks (S heads that also see keys ``0 .. SINK - 1``, a constexpr): an S
  program first iterates over the sink keys below its window range, then over the window
  (2D: sink tiles of their own; 3D: one range of keys, sinks first, cut into tiles); with
  ``SINK = 0`` that code is not compiled at all;
* FP8 pools (constexpr ``FP8``): K/V tiles convert exactly from FP8 to the query's type,
  the head's k_scale folds into the score scale and its v_scale into the result (one
  scalar load per program, per-tensor scales passed with stride 0); the query is never
  quantized;
* 3D (decode, few sequences): the key range of each F head is split into ``seg_f``
  segments, that of each S head (~W keys) into ``seg_s`` (:func:`decode_segments`, runtime
  ints); grid axis 1 then enumerates (head, segment) pairs, F heads first.  Every segment
  program writes its partial (M, L, acc), empty segments write (-inf, 0, 0), and a reduce
  kernel combines each query head's own segment count.  The reduce needs no knowledge of
  the ranges.  F and S programs share one loop body (:func:`_decode_3d`: the pool picked
  as scalars before it), so the compiler sizes registers for one loop, not two: the
  sink variant no longer costs the F programs occupancy;
* compiled variants: the head split ``n_full`` and the per-layer pool offsets are runtime
  ints (not specialised); only HAS_FULL / HAS_SLIDING are constexpr, so one model compiles
  at most three variants per path (:func:`attention_constexprs`).

CUDA-graph safety: no host syncs; grid sizes and segment counts come from tensor shapes
and the host ints ``num_seqs`` / ``max_query_len``; 3D scratch comes from the caller (``make_hybrid_scratch``, allocated
once before graph capture by the backend's metadata builder).

No vLLM import here (keeps this module importable and testable alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .interface import FP8_DTYPE, FP8_MAX, AttnBatch, KVPool, check_pool
from .triton_cache import jit

LOG2E = 1.4426950408889634
# Triton's CPU interpreter computes tl.dot wrongly on bfloat16/float16 operands (it sees
# raw 16-bit integers); under TRITON_INTERPRET=1 the kernel upcasts Q/K/V to float32 before
# the dots.  Everything else (ranges, masks, softmax, pointer math) is the same code.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# vLLM uses 16 segments and 16-key tiles.  H100 sweep (benchmarks/results/
# hybrid_kernel_h100_sweep.json), decode at 2F6S: 128 segments x 32-key tiles gives batch 1 at
# 32k in 0.034 ms (64 x 16: 0.058 ms; FlashAttention 3, dense: 0.064 ms) and is the best or
# within 3% of the best at batch 4 (32k) and 16 (16k); 512 segments is 3x slower.
DEFAULT_NUM_SEGMENTS = 128
DEFAULT_TILE_3D = 32


def _prefetch_bt_default() -> bool:
    """``CONSA_DECODE_PREFETCH_BT`` (``1``, the default when unset or empty, or ``0``): whether
    the 3D decode loads a tile's block-table entries one tile ahead (docs/DESIGN.md section 8
    has why, and the timings that made it the default)."""
    raw = os.environ.get("CONSA_DECODE_PREFETCH_BT", "").strip() or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"CONSA_DECODE_PREFETCH_BT must be 0 or 1, got {raw!r}")
    return raw == "1"


DEFAULT_PREFETCH_BT = _prefetch_bt_default()
# Per-pool segment counts (decode_segments): an F head splits its whole context, an S head
# only its window (+ sinks), so one count for both left an F head's 32k keys at 8 tiles per
# program in a serial chain while S programs ran <= 1 tile (issue 11).  F heads get up to
# MAX_SEGMENTS_F segments at batch 1, S heads just enough for ~2 tiles each.  256, not more:
# whole-model batch-1 decode on the H200 (benchmarks/results/hybrid_models_h200.json, all
# layers in one CUDA graph) with F at 256 / 512 / 1024 segments (uniform 128 for both pools
# in brackets): Qwen3-30B-A3B 1F3S 32k 0.864 / 1.057 / 1.495 ms (1.014), Qwen3-0.6B uneven
# 32k 0.690 / 0.837 / 1.112 (0.705), Llama-3.1-8B DuoAttention-0.5 32k 1.061 / 1.311 / 1.900
# (1.054) and 128k 2.840 / 3.011 / 3.567 (3.128): 256 is the best or within 1% of it in
# every shape, more segments only add reduce work and programs.
MAX_SEGMENTS_F = 256
MAX_SEGMENTS_S = DEFAULT_NUM_SEGMENTS
S_TILES_PER_SEGMENT = 2
REDUCE_SEG_CHUNK = 128
MIN_LAUNCH_GRID_SIZE_2D = 128  # vLLM's threshold rule: 3D when num_seqs <= 128 // n_kv
# Query rows (query tokens x group) per program of the sink merge. Every program reads its
# head's sink keys again: at 16 rows, an 8k prefill at the 8B shape re-read them 2,048 times
# per S head, and sink 64 added 18-41% to FlashAttention 3 over the pools there (H100, session
# 28, benchmarks/results/hybrid_kernel_sinks_h100_s28.json). One count for every batch keeps
# one compiled variant per model: vLLM warms up only decode batches' attention (its full
# CUDA-graph captures), so a second, prefill-only variant would compile at the first request.
# A decode batch's program fills G of the rows; the masked rows load nothing.
SINK_MERGE_ROWS = 64
_FP8_MAX = tl.constexpr(FP8_MAX)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _cdiv(x, y):
    return (x + y - 1) // y


@triton.jit
def _find_seq_idx(query_start_len_ptr, target_idx, num_seqs, BLOCK_Q: tl.constexpr,
                  USE_Q_BLOCK_MODE: tl.constexpr):
    """Binary search over cumulative query lengths (as in vLLM)."""
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        val = tl.load(query_start_len_ptr + mid)
        mid_val = val // BLOCK_Q + mid if USE_Q_BLOCK_MODE else val
        if mid_val <= target_idx:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _online_softmax_step(S, V, M, L, acc, DOT_IEEE: tl.constexpr):
    """One key tile of the online softmax: ``S`` the tile's masked scores (log2 units,
    -inf where not allowed), ``V`` its values; returns the updated running max ``M``,
    sum ``L`` and unnormalised output ``acc``.  Rows with no allowed key so far keep
    (-inf, 0, 0)."""
    m_new = tl.maximum(M, tl.max(S, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    P = tl.exp2(S - m_safe[:, None])
    alpha = tl.exp2(M - m_safe)
    L = L * alpha + tl.sum(P, axis=1)
    if DOT_IEEE:
        pv = tl.dot(P.to(V.dtype), V, input_precision="ieee")
    else:
        pv = tl.dot(P.to(V.dtype), V)
    acc = acc * alpha[:, None] + pv
    return m_new, L, acc


@triton.jit
def _attn_body(
    output_ptr, query_ptr, cache_ptr, block_table_ptr,
    seq_idx, q_block_local_idx, q_start, q_len, seq_len,
    kv_head_idx, pool_head, scale_idx,
    scale_log2, window, k_scale_ptr, v_scale_ptr, scale_stride,
    block_table_stride: tl.int64,
    q_stride_0: tl.int64, q_stride_1: tl.int64,
    o_stride_0: tl.int64, o_stride_1: tl.int64,
    c_stride_0: tl.int64, c_stride_1: tl.int64, c_stride_2: tl.int64,
    c_stride_3: tl.int64, C_STRIDE_4: tl.constexpr,
    NUM_QUERY_HEADS: tl.constexpr, G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    IS_SLIDING: tl.constexpr, SINK: tl.constexpr,
    DOT_IEEE: tl.constexpr, CAST_F32: tl.constexpr, FP8: tl.constexpr,
):
    """2D: all key tiles of one (q block, KV head) in one program, written normalised."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_t = tl.arange(0, TILE)

    q_pos = q_block_local_idx * BLOCK_Q + offs_m // G  # position among the new tokens
    q_tok = q_start + q_pos
    q_head = kv_head_idx * G + offs_m % G
    row_valid = (q_pos < q_len) & (offs_m < BLOCK_Q * G)
    dim_mask = offs_d < HEAD_SIZE

    Q = tl.load(
        query_ptr + q_tok[:, None].to(tl.int64) * q_stride_0
        + q_head[:, None] * q_stride_1 + offs_d[None, :],
        mask=row_valid[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if CAST_F32:
        Q = Q.to(tl.float32)
    if FP8:
        # The cache holds K / k_scale and V / v_scale: an FP8 value converts exactly to
        # Q's type, k_scale folds into the score scale and v_scale into the result.
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + scale_idx * scale_stride)
        v_scale = tl.load(v_scale_ptr + scale_idx * scale_stride)

    ctx = seq_len - q_len
    q_abs = ctx + q_pos
    qpos_lo = q_block_local_idx * BLOCK_Q
    qpos_hi = tl.minimum(qpos_lo + BLOCK_Q - 1, q_len - 1)
    range_hi = ctx + qpos_hi + 1  # exclusive
    if IS_SLIDING:
        range_lo = tl.maximum(ctx + qpos_lo - window + 1, 0)
    else:
        range_lo = ctx * 0
    num_tiles = _cdiv(range_hi - range_lo, TILE)
    if SINK > 0:
        # Sink keys below the window range of the block's first query come first, as
        # tiles of their own: keys [0, sink_hi), then the window range.
        sink_hi = tl.minimum(range_lo, SINK)
        num_sink_tiles = _cdiv(sink_hi, TILE)
        num_tiles += num_sink_tiles

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    bt_base = block_table_ptr + seq_idx.to(tl.int64) * block_table_stride
    k_base = cache_ptr + pool_head.to(tl.int64) * c_stride_3
    v_base = k_base + c_stride_1

    for j in range(0, num_tiles):
        if SINK > 0:
            in_sink = j < num_sink_tiles
            k_pos = tl.where(in_sink, j * TILE, range_lo + (j - num_sink_tiles) * TILE) + offs_t
            k_valid = k_pos < tl.where(in_sink, sink_hi, range_hi)
        else:
            k_pos = range_lo + j * TILE + offs_t
            k_valid = k_pos < range_hi
        blk = tl.load(bt_base + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot_off = blk * c_stride_0 + (k_pos % BLOCK_SIZE).to(tl.int64) * c_stride_2
        # K : (HEAD_PAD, TILE)
        K = tl.load(
            k_base + slot_off[None, :] + offs_d[:, None] * C_STRIDE_4,
            mask=dim_mask[:, None] & k_valid[None, :],
            other=0.0,
        ).to(Q.dtype)
        # V : (TILE, HEAD_PAD)
        V = tl.load(
            v_base + slot_off[:, None] + offs_d[None, :] * C_STRIDE_4,
            mask=k_valid[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(Q.dtype)

        if DOT_IEEE:
            S = tl.dot(Q, K, input_precision="ieee")
        else:
            S = tl.dot(Q, K)
        S = S * scale_log2

        allowed = (k_pos[None, :] <= q_abs[:, None]) & k_valid[None, :] & row_valid[:, None]
        if IS_SLIDING:
            visible = (q_abs[:, None] - k_pos[None, :]) < window
            if SINK > 0:
                visible = visible | (k_pos[None, :] < SINK)
            allowed = allowed & visible
        S = tl.where(allowed, S, float("-inf"))

        M, L, acc = _online_softmax_step(S, V, M, L, acc, DOT_IEEE)

    if FP8:
        acc = acc * v_scale
    L_safe = tl.where(L == 0.0, 1.0, L)
    out = acc / L_safe[:, None]
    tl.store(
        output_ptr + q_tok[:, None].to(tl.int64) * o_stride_0
        + q_head[:, None] * o_stride_1 + offs_d[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_mask[None, :],
    )


@triton.jit
def _decode_tile_keys(j, offs_t, range_lo, sink_hi, num_keys, is_full,
                      TILE: tl.constexpr, SINK: tl.constexpr,
                      BLOCK_SIZE_F: tl.constexpr, BLOCK_SIZE_S: tl.constexpr):
    """Tile ``j`` of a 3D program's virtual key range: (valid, block-table column, row in block)."""
    v_pos = j * TILE + offs_t
    if SINK > 0:
        k_pos = v_pos + tl.where(v_pos < sink_hi, 0, range_lo - sink_hi)
    else:
        k_pos = v_pos + range_lo
    k_valid = v_pos < num_keys
    if BLOCK_SIZE_F == BLOCK_SIZE_S:
        blk_col = k_pos // BLOCK_SIZE_F
        blk_row = k_pos % BLOCK_SIZE_F
    else:
        blk_col = tl.where(is_full, k_pos // BLOCK_SIZE_F, k_pos // BLOCK_SIZE_S)
        blk_row = tl.where(is_full, k_pos % BLOCK_SIZE_F, k_pos % BLOCK_SIZE_S)
    return k_valid, blk_col, blk_row


@triton.jit
def _decode_3d(
    output_ptr, query_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs,
    full_cache_ptr, full_bt_ptr, full_head_offset, full_bt_stride,
    f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4: tl.constexpr,
    sliding_cache_ptr, sliding_bt_ptr, sliding_head_offset, sliding_bt_stride,
    s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4: tl.constexpr,
    segm_output_ptr, segm_max_ptr, segm_expsum_ptr,
    scale_log2, window,
    full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
    sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
    q_stride_0, q_stride_1,
    n_full, seg_f, seg_s, seg_stride,
    HAS_FULL: tl.constexpr, HAS_SLIDING: tl.constexpr, NUM_QUERY_HEADS: tl.constexpr,
    G: tl.constexpr, SINK: tl.constexpr,
    BLOCK_SIZE_F: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    TILE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_IEEE: tl.constexpr, CAST_F32: tl.constexpr, FP8: tl.constexpr, PREFETCH_BT: tl.constexpr,
):
    """3D (split-KV decode): one program per (q block, (head, segment) pair).

    Decode only (``would_use_3d``: every sequence has at most one new token), so every
    key of a head's range is visible to the block's one query and the loop needs no
    causal / window test.  F and S programs run ONE loop body: the pool's pointers,
    strides, window and sink are picked as scalars before it.  The earlier kernel
    inlined one body per pool (as the 2D path still does) and the compiler sized
    registers and shared memory for both; its sink variant (per-tile sink/window
    selects plus the ``k < SINK`` visibility test) took a mixed layer of the
    Llama-3.1-8B shape from 118 to 141 registers (sm_90, 4 warps: 4 -> 3 programs per
    SM), which slowed the F programs too, whose work grows with the context.  This body
    compiles to 80-111 registers at head_dim 128 in bf16/fp16 (FP8 pools: capped at 128,
    see launch_attention) and one set of K/V buffers (33 -> 21 KB of shared memory), sink
    or not (ptxas -v for sm_90a).  A head's keys are walked as one "virtual" range cut into
    whole tiles: an S head's sink keys ``[0, sink_hi)`` below its window, then its
    window ``[range_lo, range_hi)``; an F head's ``[0, seq_len)``."""
    q_block_global_idx = tl.program_id(0)
    # Grid axis 1 = (head, segment) pairs: the n_full F heads' seg_f segments each,
    # then the S heads' seg_s segments each (per-pool segment counts).
    pid = tl.program_id(1)
    f_programs = n_full * seg_f
    is_full = pid < f_programs
    if not HAS_SLIDING:
        is_full = True
    if not HAS_FULL:
        is_full = False

    seq_idx = _find_seq_idx(query_start_len_ptr, q_block_global_idx, num_seqs, BLOCK_Q, True)
    q_start = tl.load(query_start_len_ptr + seq_idx)
    q_stop = tl.load(query_start_len_ptr + seq_idx + 1)
    q_len = q_stop - q_start
    q_block_local_idx = q_block_global_idx - (q_start // BLOCK_Q + seq_idx)
    if q_block_local_idx * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)

    # The program's pool, as scalars (one loop below for both pools). ``zero`` keeps every
    # yielded value a runtime value: an argument that the JIT specialised to a constant
    # (a stride of 1) would not match its runtime counterpart in the other branch.
    zero = seq_len * 0
    zero64 = zero.to(tl.int64)
    if is_full:
        kv_head_idx = pid // seg_f
        segm_idx = pid % seg_f
        num_segments = seg_f
        pool_idx = kv_head_idx
        cache_ptr = full_cache_ptr
        bt_ptr = full_bt_ptr
        bt_stride = full_bt_stride + zero64
        c_stride_0 = f_stride_0 + zero64
        c_stride_1 = f_stride_1 + zero64
        c_stride_2 = f_stride_2 + zero64
        c_stride_3 = f_stride_3 + zero64
        pool_head = full_head_offset + pool_idx + zero
        k_scale_ptr = full_k_scale_ptr
        v_scale_ptr = full_v_scale_ptr
        scale_stride = full_scale_stride + zero
        win = seq_len + 1  # no window: range_lo = 0
        sink = zero
    else:
        kv_head_idx = n_full + (pid - f_programs) // seg_s
        segm_idx = (pid - f_programs) % seg_s
        num_segments = seg_s
        pool_idx = kv_head_idx - n_full
        cache_ptr = sliding_cache_ptr
        bt_ptr = sliding_bt_ptr
        bt_stride = sliding_bt_stride + zero64
        c_stride_0 = s_stride_0 + zero64
        c_stride_1 = s_stride_1 + zero64
        c_stride_2 = s_stride_2 + zero64
        c_stride_3 = s_stride_3 + zero64
        pool_head = sliding_head_offset + pool_idx + zero
        k_scale_ptr = sliding_k_scale_ptr
        v_scale_ptr = sliding_v_scale_ptr
        scale_stride = sliding_scale_stride + zero
        win = window + zero
        sink = SINK + zero
    if F_STRIDE_4 == S_STRIDE_4:
        c_stride_4 = F_STRIDE_4
    else:
        c_stride_4 = tl.where(is_full, F_STRIDE_4, S_STRIDE_4)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_t = tl.arange(0, TILE)
    q_pos = q_block_local_idx * BLOCK_Q + offs_m // G
    q_tok = q_start + q_pos
    q_head = kv_head_idx * G + offs_m % G
    row_valid = (q_pos < q_len) & (offs_m < BLOCK_Q * G)
    dim_mask = offs_d < HEAD_SIZE
    Q = tl.load(query_ptr + q_tok[:, None].to(tl.int64) * q_stride_0 + q_head[:, None] * q_stride_1
                + offs_d[None, :], mask=row_valid[:, None] & dim_mask[None, :], other=0.0)
    if CAST_F32:
        Q = Q.to(tl.float32)
    if FP8:  # as in _attn_body
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + pool_idx * scale_stride)
        v_scale = tl.load(v_scale_ptr + pool_idx * scale_stride)

    ctx = seq_len - q_len
    qpos_lo = q_block_local_idx * BLOCK_Q
    qpos_hi = tl.minimum(qpos_lo + BLOCK_Q - 1, q_len - 1)
    range_hi = ctx + qpos_hi + 1  # exclusive
    range_lo = tl.maximum(ctx + qpos_lo - win + 1, 0)  # 0 for F heads (win > seq_len)
    # Sink keys below the window range (none for F heads): virtual keys [0, sink_hi) are
    # keys [0, sink_hi), virtual keys [sink_hi, num_keys) the window range.
    sink_hi = tl.minimum(range_lo, sink)
    num_keys = sink_hi + range_hi - range_lo
    num_tiles = _cdiv(num_keys, TILE)
    tiles_per_segment = _cdiv(num_tiles, num_segments)
    t_lo = segm_idx * tiles_per_segment
    t_hi = tl.minimum(t_lo + tiles_per_segment, num_tiles)

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    bt_base = bt_ptr + seq_idx.to(tl.int64) * bt_stride
    k_base = cache_ptr + pool_head.to(tl.int64) * c_stride_3
    v_base = k_base + c_stride_1
    # PREFETCH_BT: the block-table entries of tile j + 1 are loaded while tile j's K/V are
    # in flight, so a tile's K/V gather no longer waits on its own block-table load (two
    # dependent memory latencies per tile become one).
    k_valid, blk_col, blk_row = _decode_tile_keys(t_lo, offs_t, range_lo, sink_hi, num_keys, is_full,
                                                  TILE, SINK, BLOCK_SIZE_F, BLOCK_SIZE_S)
    if PREFETCH_BT:
        blk = tl.load(bt_base + blk_col, mask=k_valid, other=0).to(tl.int64)
    for j in range(t_lo, t_hi):
        if not PREFETCH_BT:
            k_valid, blk_col, blk_row = _decode_tile_keys(j, offs_t, range_lo, sink_hi, num_keys, is_full,
                                                          TILE, SINK, BLOCK_SIZE_F, BLOCK_SIZE_S)
            blk = tl.load(bt_base + blk_col, mask=k_valid, other=0).to(tl.int64)
        slot_off = blk * c_stride_0 + blk_row.to(tl.int64) * c_stride_2
        K = tl.load(k_base + slot_off[None, :] + offs_d[:, None] * c_stride_4,
                    mask=dim_mask[:, None] & k_valid[None, :], other=0.0).to(Q.dtype)
        V = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * c_stride_4,
                    mask=k_valid[:, None] & dim_mask[None, :], other=0.0).to(Q.dtype)
        tile_valid = k_valid
        if PREFETCH_BT:
            k_valid, blk_col, blk_row = _decode_tile_keys(j + 1, offs_t, range_lo, sink_hi, num_keys, is_full,
                                                          TILE, SINK, BLOCK_SIZE_F, BLOCK_SIZE_S)
            blk = tl.load(bt_base + blk_col, mask=k_valid & (j + 1 < t_hi), other=0).to(tl.int64)
        if DOT_IEEE:
            S = tl.dot(Q, K, input_precision="ieee")
        else:
            S = tl.dot(Q, K)
        S = S * scale_log2
        # Decode: every key of the range is visible to the block's one query; rows
        # without a query (Q = 0) are never stored.  (A row mask here costs registers.)
        S = tl.where(tile_valid[None, :], S, float("-inf"))
        M, L, acc = _online_softmax_step(S, V, M, L, acc, DOT_IEEE)

    if FP8:
        acc = acc * v_scale
    # Scratch row of (token, q head, segment); ``seg_stride`` rows per (token, q head).
    segm_off = ((q_tok.to(tl.int64) * NUM_QUERY_HEADS + q_head) * seg_stride + segm_idx)
    tl.store(segm_output_ptr + segm_off[:, None] * HEAD_PAD + offs_d[None, :], acc,
             mask=row_valid[:, None] & dim_mask[None, :])
    tl.store(segm_max_ptr + segm_off, M, mask=row_valid)
    tl.store(segm_expsum_ptr + segm_off, L, mask=row_valid)


# Runtime ints that differ between the layers of one model (head split, pool offsets,
# segment counts) are not specialised: Triton would otherwise compile a variant per value
# class (== 1, divisible by 16), i.e. per layer split.
# Batch-dependent integers are not specialized (== 1, multiple of 16), so that every batch
# size shares the variants compiled at start-up: fewer compiles, none mid-serving.
@jit(do_not_specialize=["num_seqs", "n_full", "full_head_offset", "sliding_head_offset",
                        "seg_f", "seg_s", "seg_stride"])
def _hybrid_attn_kernel(
    output_ptr, query_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs: tl.int32,
    full_cache_ptr, full_bt_ptr, full_head_offset, full_bt_stride: tl.int64,
    f_stride_0: tl.int64, f_stride_1: tl.int64, f_stride_2: tl.int64,
    f_stride_3: tl.int64, F_STRIDE_4: tl.constexpr,
    sliding_cache_ptr, sliding_bt_ptr, sliding_head_offset, sliding_bt_stride: tl.int64,
    s_stride_0: tl.int64, s_stride_1: tl.int64, s_stride_2: tl.int64,
    s_stride_3: tl.int64, S_STRIDE_4: tl.constexpr,
    segm_output_ptr, segm_max_ptr, segm_expsum_ptr,
    scale_log2, window,
    full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
    sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
    q_stride_0: tl.int64, q_stride_1: tl.int64,
    o_stride_0: tl.int64, o_stride_1: tl.int64,
    n_full, seg_f, seg_s, seg_stride,
    HAS_FULL: tl.constexpr, HAS_SLIDING: tl.constexpr, NUM_QUERY_HEADS: tl.constexpr,
    G: tl.constexpr, SINK: tl.constexpr,
    BLOCK_SIZE_F: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    TILE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    IS_3D: tl.constexpr, DOT_IEEE: tl.constexpr,
    CAST_F32: tl.constexpr, FP8: tl.constexpr, PREFETCH_BT: tl.constexpr,
):
    q_block_global_idx = tl.program_id(0)
    if IS_3D:
        _decode_3d(output_ptr, query_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs,
                   full_cache_ptr, full_bt_ptr, full_head_offset, full_bt_stride,
                   f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4,
                   sliding_cache_ptr, sliding_bt_ptr, sliding_head_offset, sliding_bt_stride,
                   s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4,
                   segm_output_ptr, segm_max_ptr, segm_expsum_ptr,
                   scale_log2, window,
                   full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
                   sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
                   q_stride_0, q_stride_1,
                   n_full, seg_f, seg_s, seg_stride,
                   HAS_FULL, HAS_SLIDING, NUM_QUERY_HEADS, G, SINK, BLOCK_SIZE_F, BLOCK_SIZE_S,
                   TILE, HEAD_SIZE, HEAD_PAD, BLOCK_M, BLOCK_Q, DOT_IEEE, CAST_F32, FP8, PREFETCH_BT)
    else:
        _attn_2d(output_ptr, query_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs,
                 full_cache_ptr, full_bt_ptr, full_head_offset, full_bt_stride,
                 f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4,
                 sliding_cache_ptr, sliding_bt_ptr, sliding_head_offset, sliding_bt_stride,
                 s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4,
                 scale_log2, window,
                 full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
                 sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
                 q_stride_0, q_stride_1, o_stride_0, o_stride_1,
                 n_full, q_block_global_idx,
                 HAS_FULL, HAS_SLIDING, NUM_QUERY_HEADS, G, SINK, BLOCK_SIZE_F, BLOCK_SIZE_S,
                 TILE, HEAD_SIZE, HEAD_PAD, BLOCK_M, BLOCK_Q, DOT_IEEE, CAST_F32, FP8)


@triton.jit
def _attn_2d(
    output_ptr, query_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs,
    full_cache_ptr, full_bt_ptr, full_head_offset, full_bt_stride,
    f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4: tl.constexpr,
    sliding_cache_ptr, sliding_bt_ptr, sliding_head_offset, sliding_bt_stride,
    s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4: tl.constexpr,
    scale_log2, window,
    full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
    sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
    q_stride_0, q_stride_1, o_stride_0, o_stride_1,
    n_full, q_block_global_idx,
    HAS_FULL: tl.constexpr, HAS_SLIDING: tl.constexpr, NUM_QUERY_HEADS: tl.constexpr,
    G: tl.constexpr, SINK: tl.constexpr,
    BLOCK_SIZE_F: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    TILE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_IEEE: tl.constexpr, CAST_F32: tl.constexpr, FP8: tl.constexpr,
):
    """2D: one program per (q block, KV head), the head's pool chosen by a branch."""
    kv_head_idx = tl.program_id(1)
    seq_idx = _find_seq_idx(query_start_len_ptr, q_block_global_idx, num_seqs, BLOCK_Q, True)
    q_start = tl.load(query_start_len_ptr + seq_idx)
    q_stop = tl.load(query_start_len_ptr + seq_idx + 1)
    q_len = q_stop - q_start
    q_block_local_idx = q_block_global_idx - (q_start // BLOCK_Q + seq_idx)
    if q_block_local_idx * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)

    is_full = kv_head_idx < n_full
    if not HAS_SLIDING:
        is_full = True
    if not HAS_FULL:
        is_full = False
    if is_full:
        _attn_body(output_ptr, query_ptr, full_cache_ptr, full_bt_ptr,
                   seq_idx, q_block_local_idx, q_start, q_len, seq_len,
                   kv_head_idx, full_head_offset + kv_head_idx, kv_head_idx, scale_log2, window,
                   full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
                   full_bt_stride, q_stride_0, q_stride_1, o_stride_0, o_stride_1,
                   f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4,
                   NUM_QUERY_HEADS, G, BLOCK_SIZE_F, TILE, HEAD_SIZE, HEAD_PAD,
                   BLOCK_M, BLOCK_Q, False, 0, DOT_IEEE, CAST_F32, FP8)
    else:
        _attn_body(output_ptr, query_ptr, sliding_cache_ptr, sliding_bt_ptr,
                   seq_idx, q_block_local_idx, q_start, q_len, seq_len,
                   kv_head_idx, sliding_head_offset + (kv_head_idx - n_full), kv_head_idx - n_full,
                   scale_log2, window,
                   sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
                   sliding_bt_stride, q_stride_0, q_stride_1, o_stride_0, o_stride_1,
                   s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4,
                   NUM_QUERY_HEADS, G, BLOCK_SIZE_S, TILE, HEAD_SIZE, HEAD_PAD,
                   BLOCK_M, BLOCK_Q, True, SINK, DOT_IEEE, CAST_F32, FP8)


@jit(do_not_specialize=["num_seqs", "n_full_q", "seg_f", "seg_s", "seg_stride"])
def _reduce_segments_kernel(
    output_ptr, segm_output_ptr, segm_max_ptr, segm_expsum_ptr,
    query_start_len_ptr, num_seqs: tl.int32,
    o_stride_0: tl.int64, o_stride_1: tl.int64,
    n_full_q, seg_f, seg_s, seg_stride,
    NUM_QUERY_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    SEG_CHUNK: tl.constexpr,
):
    """Combine the partial (M, L, acc) of one (token, q head): query heads below
    ``n_full_q`` (F heads' queries) have ``seg_f`` segments, the others ``seg_s``.
    Two passes over chunks of SEG_CHUNK segments (global max, then weighted sums) keep the
    register tile at [SEG_CHUNK, HEAD_PAD] whatever the segment count."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    num_tokens = tl.load(query_start_len_ptr + num_seqs)
    if tok >= num_tokens:
        return
    num_segments = tl.where(head < n_full_q, seg_f, seg_s)
    offs_c = tl.arange(0, SEG_CHUNK)
    offs_d = tl.arange(0, HEAD_PAD)
    dim_mask = offs_d < HEAD_SIZE
    base = (tok.to(tl.int64) * NUM_QUERY_HEADS + head) * seg_stride
    m_max = tl.max(tl.full([SEG_CHUNK], float("-inf"), dtype=tl.float32), axis=0)
    for c in range(0, num_segments, SEG_CHUNK):
        m = tl.load(segm_max_ptr + base + c + offs_c, mask=c + offs_c < num_segments, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m, axis=0))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.sum(tl.zeros([SEG_CHUNK], dtype=tl.float32), axis=0)
    acc = tl.zeros([HEAD_PAD], dtype=tl.float32)
    for c in range(0, num_segments, SEG_CHUNK):
        seg_mask = c + offs_c < num_segments
        m = tl.load(segm_max_ptr + base + c + offs_c, mask=seg_mask, other=float("-inf"))
        w = tl.exp2(m - m_max)  # 0 for empty segments (M = -inf) and masked lanes
        denom += tl.sum(tl.load(segm_expsum_ptr + base + c + offs_c, mask=seg_mask, other=0.0) * w, axis=0)
        o = tl.load(segm_output_ptr + (base + c + offs_c)[:, None] * HEAD_PAD + offs_d[None, :],
                    mask=seg_mask[:, None] & dim_mask[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    acc = tl.where(denom == 0.0, 0.0, acc / denom)
    tl.store(output_ptr + tok.to(tl.int64) * o_stride_0 + head * o_stride_1 + offs_d,
             acc.to(output_ptr.dtype.element_ty), mask=dim_mask)


# num_seqs and the log-sum-exp's head stride (the batch's token count) vary per batch: were
# they specialized (== 1, multiple of 16), a prefill after warm-up could compile a new
# variant mid-serving (vLLM's JIT monitor flagged it on the H200).
@jit(do_not_specialize=["head_offset", "num_seqs", "lse_stride_h"])
def _sink_merge_kernel(
    output_ptr, query_ptr, lse_ptr, query_start_len_ptr, seq_lens_ptr, num_seqs: tl.int32,
    cache_ptr, bt_ptr, head_offset, bt_stride: tl.int64,
    c_stride_0: tl.int64, c_stride_1: tl.int64, c_stride_2: tl.int64,
    c_stride_3: tl.int64, C_STRIDE_4: tl.constexpr,
    scale_log2, window, k_scale_ptr, v_scale_ptr, scale_stride,
    q_stride_0: tl.int64, q_stride_1: tl.int64,
    o_stride_0: tl.int64, o_stride_1: tl.int64,
    lse_stride_h: tl.int64, lse_stride_t: tl.int64,
    G: tl.constexpr, SINK: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_IEEE: tl.constexpr, CAST_F32: tl.constexpr, FP8: tl.constexpr,
):
    """S heads: fold the sink keys a query sees beyond its window (keys k < SINK with
    k <= i - window) into a window-only result (``output``, normalised, with its natural
    log-sum-exp ``lse``), in place. Same grid as the attention kernel, S heads only."""
    q_block_global_idx = tl.program_id(0)
    kv_head_idx = tl.program_id(1)
    seq_idx = _find_seq_idx(query_start_len_ptr, q_block_global_idx, num_seqs, BLOCK_Q, True)
    q_start = tl.load(query_start_len_ptr + seq_idx)
    q_len = tl.load(query_start_len_ptr + seq_idx + 1) - q_start
    q_block_local_idx = q_block_global_idx - (q_start // BLOCK_Q + seq_idx)
    if q_block_local_idx * BLOCK_Q >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq_idx) - q_len
    qpos_hi = tl.minimum(q_block_local_idx * BLOCK_Q + BLOCK_Q - 1, q_len - 1)
    sink_hi = tl.minimum(ctx + qpos_hi - window + 1, SINK)  # the block's last query sees most
    if sink_hi <= 0:
        return  # every query of the block has its sinks inside its window

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_t = tl.arange(0, TILE)
    q_pos = q_block_local_idx * BLOCK_Q + offs_m // G
    q_tok = q_start + q_pos
    q_head = kv_head_idx * G + offs_m % G
    row_valid = (q_pos < q_len) & (offs_m < BLOCK_Q * G)
    dim_mask = offs_d < HEAD_SIZE
    q_abs = ctx + q_pos
    rows = row_valid[:, None] & dim_mask[None, :]
    Q = tl.load(query_ptr + q_tok[:, None].to(tl.int64) * q_stride_0 + q_head[:, None] * q_stride_1
                + offs_d[None, :], mask=rows, other=0.0)
    if CAST_F32:
        Q = Q.to(tl.float32)
    if FP8:  # as in the attention kernel
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head_idx * scale_stride)
        v_scale = tl.load(v_scale_ptr + kv_head_idx * scale_stride)

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    bt_base = bt_ptr + seq_idx.to(tl.int64) * bt_stride
    k_base = cache_ptr + (head_offset + kv_head_idx).to(tl.int64) * c_stride_3
    v_base = k_base + c_stride_1
    for j in range(0, _cdiv(sink_hi, TILE)):
        k_pos = j * TILE + offs_t
        k_valid = k_pos < sink_hi
        blk = tl.load(bt_base + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot_off = blk * c_stride_0 + (k_pos % BLOCK_SIZE).to(tl.int64) * c_stride_2
        K = tl.load(k_base + slot_off[None, :] + offs_d[:, None] * C_STRIDE_4,
                    mask=dim_mask[:, None] & k_valid[None, :], other=0.0).to(Q.dtype)
        V = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * C_STRIDE_4,
                    mask=k_valid[:, None] & dim_mask[None, :], other=0.0).to(Q.dtype)
        if DOT_IEEE:
            S = tl.dot(Q, K, input_precision="ieee")
        else:
            S = tl.dot(Q, K)
        S = S * scale_log2
        # Only sinks outside the query's window: those inside it are in ``output`` already.
        allowed = k_valid[None, :] & row_valid[:, None] & ((q_abs[:, None] - k_pos[None, :]) >= window)
        S = tl.where(allowed, S, float("-inf"))
        M, L, acc = _online_softmax_step(S, V, M, L, acc, DOT_IEEE)

    if FP8:
        acc = acc * v_scale
    # Merge the two partial softmaxes by their log-sum-exp (natural log, as FlashAttention's).
    has_sinks = row_valid & (L > 0.0)
    L_safe = tl.where(has_sinks, L, 1.0)
    lse_sink = tl.where(has_sinks, (M + tl.log2(L_safe)) * 0.6931471805599453, float("-inf"))
    lse_win = tl.load(lse_ptr + q_head.to(tl.int64) * lse_stride_h + q_tok.to(tl.int64) * lse_stride_t,
                      mask=has_sinks, other=0.0)
    m = tl.maximum(lse_win, lse_sink)
    w_win = tl.exp(lse_win - m)
    w_sink = tl.where(has_sinks, tl.exp(lse_sink - m), 0.0)
    o_ptrs = output_ptr + q_tok[:, None].to(tl.int64) * o_stride_0 + q_head[:, None] * o_stride_1 + offs_d[None, :]
    out_mask = has_sinks[:, None] & dim_mask[None, :]
    o_win = tl.load(o_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    out = (o_win * w_win[:, None] + (acc / L_safe[:, None]) * w_sink[:, None]) / (w_win + w_sink)[:, None]
    tl.store(o_ptrs, out.to(output_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _write_heads(
    t, key_ptr, value_ptr, cache_ptr, slot_ptr,
    k_stride_0: tl.int64, k_stride_1: tl.int64,
    v_stride_0: tl.int64, v_stride_1: tl.int64,
    c_stride_0: tl.int64, c_stride_1: tl.int64, c_stride_2: tl.int64,
    c_stride_3: tl.int64, C_STRIDE_4: tl.constexpr,
    head_offset, k_scale_ptr, v_scale_ptr, scale_stride,
    N, N_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
):
    """Token ``t``: its N heads' K and V into ``cache[slot // B, 0/1, slot % B, head_offset:+N]``
    (FP8: divided by the head's scale and saturated, as vLLM's cache writes)."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, N_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        mask = (offs_h < N)[:, None] & (offs_d < HEAD_SIZE)[None, :]
        k = tl.load(key_ptr + t.to(tl.int64) * k_stride_0 + offs_h[:, None] * k_stride_1
                    + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + t.to(tl.int64) * v_stride_0 + offs_h[:, None] * v_stride_1
                    + offs_d[None, :], mask=mask)
        if FP8:
            k_scale = tl.load(k_scale_ptr + offs_h * scale_stride, mask=offs_h < N, other=1.0)
            v_scale = tl.load(v_scale_ptr + offs_h * scale_stride, mask=offs_h < N, other=1.0)
            # IEEE-rounded division, as torch and vLLM's CUDA cache writes divide: Triton's
            # `/` on float32 is approximate, and one ulp decides the FP8 rounding of values
            # near a tie (the H200 wrote different bytes from torch for bf16/fp16 inputs).
            k = tl.clamp(tl.div_rn(k.to(tl.float32), k_scale[:, None] + tl.zeros_like(k).to(tl.float32)),
                         -_FP8_MAX, _FP8_MAX)
            v = tl.clamp(tl.div_rn(v.to(tl.float32), v_scale[:, None] + tl.zeros_like(v).to(tl.float32)),
                         -_FP8_MAX, _FP8_MAX)
        dst = (cache_ptr + blk * c_stride_0 + off * c_stride_2
               + (head_offset + offs_h)[:, None].to(tl.int64) * c_stride_3
               + offs_d[None, :] * C_STRIDE_4)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + c_stride_1, v.to(cache_ptr.dtype.element_ty), mask=mask)


# As in the attention kernel: head counts and offsets that differ per layer are runtime
# ints, N_PAD (the key's heads, padded) is fixed per model, so the layers share variants.
@jit(do_not_specialize=["head_offset", "N"])
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    k_stride_0: tl.int64, k_stride_1: tl.int64,
    v_stride_0: tl.int64, v_stride_1: tl.int64,
    c_stride_0: tl.int64, c_stride_1: tl.int64, c_stride_2: tl.int64,
    c_stride_3: tl.int64, C_STRIDE_4: tl.constexpr,
    head_offset, k_scale_ptr, v_scale_ptr, scale_stride,
    N, N_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
):
    _write_heads(tl.program_id(0), key_ptr, value_ptr, cache_ptr, slot_ptr,
                 k_stride_0, k_stride_1, v_stride_0, v_stride_1,
                 c_stride_0, c_stride_1, c_stride_2, c_stride_3, C_STRIDE_4,
                 head_offset, k_scale_ptr, v_scale_ptr, scale_stride,
                 N, N_PAD, HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, FP8)


@jit(do_not_specialize=["full_head_offset", "sliding_head_offset", "N_FULL", "N_SLIDING"])
def _write_kv_hybrid_kernel(
    key_ptr, value_ptr,
    k_stride_0: tl.int64, k_stride_1: tl.int64,
    v_stride_0: tl.int64, v_stride_1: tl.int64,
    full_cache_ptr, full_slot_ptr, full_head_offset,
    f_stride_0: tl.int64, f_stride_1: tl.int64, f_stride_2: tl.int64,
    f_stride_3: tl.int64, F_STRIDE_4: tl.constexpr,
    full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
    sliding_cache_ptr, sliding_slot_ptr, sliding_head_offset,
    s_stride_0: tl.int64, s_stride_1: tl.int64, s_stride_2: tl.int64,
    s_stride_3: tl.int64, S_STRIDE_4: tl.constexpr,
    sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
    N_FULL, N_SLIDING, N_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE_F: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, FP8: tl.constexpr,
):
    # Grid axis 1 picks the pool: a layer's K/V reach both pools in one launch.
    t = tl.program_id(0)
    if tl.program_id(1) == 0:
        _write_heads(t, key_ptr, value_ptr, full_cache_ptr, full_slot_ptr,
                     k_stride_0, k_stride_1, v_stride_0, v_stride_1,
                     f_stride_0, f_stride_1, f_stride_2, f_stride_3, F_STRIDE_4,
                     full_head_offset, full_k_scale_ptr, full_v_scale_ptr, full_scale_stride,
                     N_FULL, N_PAD, HEAD_SIZE, HEAD_PAD, BLOCK_SIZE_F, FP8)
    else:
        _write_heads(t, key_ptr + N_FULL * k_stride_1, value_ptr + N_FULL * v_stride_1,
                     sliding_cache_ptr, sliding_slot_ptr,
                     k_stride_0, k_stride_1, v_stride_0, v_stride_1,
                     s_stride_0, s_stride_1, s_stride_2, s_stride_3, S_STRIDE_4,
                     sliding_head_offset, sliding_k_scale_ptr, sliding_v_scale_ptr, sliding_scale_stride,
                     N_SLIDING, N_PAD, HEAD_SIZE, HEAD_PAD, BLOCK_SIZE_S, FP8)


# ---------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------


class HybridScratch(NamedTuple):
    """Scratch of the 3D (split-KV) decode path; one per engine, shared by all layers.

    Its rows bound the decode batch that takes the 3D path (one row per sequence).  The
    kernels index it flat, as ``[T, Hq, seg_stride, HEAD_PAD]`` with ``seg_stride`` chosen
    per launch, so a batch of T tokens may use up to ``capacity // T`` segments per head:
    batch 1 gets many segments from the memory that batch ``max_seqs`` needs for 128.
    """

    segm_output: torch.Tensor  # [max_seqs, Hq, NUM_SEGMENTS, HEAD_PAD] float32
    segm_max: torch.Tensor  # [max_seqs, Hq, NUM_SEGMENTS] float32
    segm_expsum: torch.Tensor  # [max_seqs, Hq, NUM_SEGMENTS] float32

    @property
    def max_seqs(self) -> int:
        return self.segm_output.shape[0]

    @property
    def num_segments(self) -> int:
        return self.segm_output.shape[2]

    @property
    def capacity(self) -> int:
        """Segment rows per query head over all tokens: T * seg_stride must not exceed it."""
        return self.segm_output.shape[0] * self.segm_output.shape[2]


@dataclass(frozen=True)
class LaunchConfig:
    """Kernel launch parameters; None = the served defaults. Only kernel benchmarks set them."""

    tile_size: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    # 3D path: (F segments, S segments) per head instead of decode_segments' rule (None in
    # either place: the rule's); each is capped by the scratch capacity as the rule's are.
    segments: tuple[int | None, int | None] | None = None
    # 3D path: load tile j + 1's block-table entries during tile j (None: DEFAULT_PREFETCH_BT).
    prefetch_bt: bool | None = None


@jit(do_not_specialize=["SPLIT"])
def _quantize_query_kernel(
    q_ptr, out_ptr, q_stride_0: tl.int64, q_stride_1: tl.int64, o_stride_0: tl.int64, o_stride_1: tl.int64,
    full_scale_ptr, full_scale_stride, sliding_scale_ptr, sliding_scale_stride,
    SPLIT, GROUP: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Token ``t``: its query heads divided by their KV head's q_scale, saturated, as FP8.
    Heads below ``SPLIT`` take the F pool's scales, the rest the S pool's."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    in_h = offs_h < H
    mask = in_h[:, None] & (offs_d < HEAD_SIZE)[None, :]
    x = tl.load(q_ptr + t * q_stride_0 + offs_h[:, None] * q_stride_1 + offs_d[None, :], mask=mask)
    is_full = offs_h < SPLIT
    s_full = tl.load(full_scale_ptr + (offs_h // GROUP) * full_scale_stride, mask=in_h & is_full, other=1.0)
    s_sliding = tl.load(sliding_scale_ptr + ((offs_h - SPLIT) // GROUP) * sliding_scale_stride,
                        mask=in_h & (offs_h >= SPLIT), other=1.0)
    scale = tl.where(is_full, s_full, s_sliding)
    # IEEE-rounded division, as in _write_heads (and torch / vLLM's quantization).
    y = tl.clamp(tl.div_rn(x.to(tl.float32), scale[:, None] + tl.zeros_like(x).to(tl.float32)),
                 -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + t * o_stride_0 + offs_h[:, None] * o_stride_1 + offs_d[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_query_fp8(query: torch.Tensor, full: KVPool | None, sliding: KVPool | None) -> torch.Tensor:
    """A layer's query ``[tokens, Hq, D]`` as FP8 for FlashAttention 3 over FP8 pools, in one
    launch: each query head divided by its KV head's ``q_scale`` (heads ``[0, n_full * G)``
    take the F pool's scales, the rest the S pool's) and saturated, the bytes of
    :func:`.interface.quantize_fp8` per pool (four torch kernels and float32 intermediates per
    pool: 27 bytes moved per element against 3)."""
    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    h, d = query.shape[1], query.shape[2]
    g = h // (n_full + n_sliding)
    for pool in (full, sliding):
        if pool is not None and pool.num_heads and (pool.q_scale is None or pool.q_scale.numel() != pool.num_heads):
            raise ValueError(f"an FP8 pool read by FlashAttention needs q_scale as [{pool.num_heads}]")
    out = torch.empty(query.shape, dtype=FP8_DTYPE, device=query.device)
    if query.shape[0] == 0:
        return out
    if query.stride(2) != 1:
        query = query.contiguous()
    fs = full.q_scale if n_full else None
    ss = sliding.q_scale if n_sliding else None
    fs = fs if fs is not None else ss
    ss = ss if ss is not None else fs
    _quantize_query_kernel[(query.shape[0],)](
        query, out, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        fs, fs.stride(0), ss, ss.stride(0), n_full * g, GROUP=g, H=h, H_PAD=triton.next_power_of_2(h),
        HEAD_SIZE=d, HEAD_PAD=triton.next_power_of_2(d),
    )
    return out


def _scale_args(pool: KVPool | None, dummy: torch.Tensor) -> tuple:
    """(k_scale, v_scale, stride) kernel arguments of a pool; ``dummy`` where there are none
    (the kernels read them only for FP8 caches)."""
    if pool is None or not pool.is_fp8:
        return dummy, dummy, 0
    return pool.k_scale, pool.v_scale, pool.k_scale.stride(0)


def default_seq_threshold_3d(num_kv_heads: int) -> int:
    """vLLM's rule: use 3D (split-KV) decode when num_seqs <= 128 // num_kv_heads."""
    return max(1, MIN_LAUNCH_GRID_SIZE_2D // max(1, num_kv_heads))


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def decode_segments(window: int, sink: int, tile: int, num_seqs: int, num_tokens: int, capacity: int,
                    override: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """Per-pool split-KV segment counts of a 3D launch: ``(seg_f, seg_s, seg_stride)``.

    Host ints only (no device reads: CUDA-graph safe; fixed per captured batch size).

    * S heads: the smallest power of 2 that covers the window (+ sink tiles) in about
      ``S_TILES_PER_SEGMENT`` tiles, at most ``MAX_SEGMENTS_S``;
    * F heads: the context is unknown on the host, so as many segments as a batch-1 decode
      at long context wants (``MAX_SEGMENTS_F``, 256), halved per doubling of the batch down
      to ``DEFAULT_NUM_SEGMENTS`` (128 from batch 2 on: more sequences fill the GPU by
      themselves);
    * both capped so that ``num_tokens * seg_stride <= capacity`` (the scratch's rows).
    ``override`` (benchmarks): ``(seg_f, seg_s)`` instead of the rule (None: the rule's),
    capped the same way.
    """
    s_tiles = -(-max(1, window) // tile) + (-(-sink // tile) if sink else 0)
    seg_s = min(triton.next_power_of_2(-(-s_tiles // S_TILES_PER_SEGMENT)), MAX_SEGMENTS_S)
    seg_f = max(DEFAULT_NUM_SEGMENTS, MAX_SEGMENTS_F // _prev_pow2(num_seqs))
    if override is not None:
        seg_f = seg_f if override[0] is None else override[0]
        seg_s = seg_s if override[1] is None else override[1]
    cap = _prev_pow2(max(1, capacity // max(1, num_tokens)))
    seg_f, seg_s = max(1, min(seg_f, cap)), max(1, min(seg_s, cap))
    return seg_f, seg_s, max(seg_f, seg_s)


def make_hybrid_scratch(max_seqs: int, num_q_heads: int, head_size: int, device,
                        num_segments: int = DEFAULT_NUM_SEGMENTS) -> HybridScratch:
    """Allocate 3D scratch for decode batches of up to ``max_seqs`` sequences (typically
    ``default_seq_threshold_3d(n_kv)``, or the CUDA-graph capture size closest to it, as
    vLLM's Triton backend does).  ``num_segments`` must be a power of 2."""
    if num_segments < 1 or num_segments & (num_segments - 1):
        raise ValueError(f"num_segments must be a power of 2, got {num_segments}")
    hp = triton.next_power_of_2(head_size)
    f32 = dict(dtype=torch.float32, device=device)
    return HybridScratch(torch.empty(max_seqs, num_q_heads, num_segments, hp, **f32),
                         torch.empty(max_seqs, num_q_heads, num_segments, **f32),
                         torch.empty(max_seqs, num_q_heads, num_segments, **f32))


def would_use_3d(query: torch.Tensor, batch: AttnBatch, scratch: HybridScratch | None) -> bool:
    """Host-side path choice (shapes and host ints only: no sync): 3D for decode batches
    (every sequence has one new token) that the scratch holds.

    A query of fewer heads than the scratch's (a head slice, as the split small decode
    passes for the S heads) fits too: the kernels index the scratch flat by the launch's
    own head count."""
    if scratch is None:
        return False
    return (batch.max_query_len <= 1 and batch.num_seqs <= scratch.max_seqs
            and query.shape[0] <= scratch.max_seqs
            and query.shape[1] <= scratch.segm_output.shape[1]
            and scratch.segm_output.shape[3] == triton.next_power_of_2(query.shape[2]))


def hybrid_paged_attention(query: torch.Tensor, output: torch.Tensor, batch: AttnBatch, scale: float,
                           full: KVPool | None, sliding: KVPool | None,
                           scratch: HybridScratch | None = None) -> None:
    """All heads of a layer in one launch (2D), or two (3D split-KV attention + reduce).

    Same contract as :func:`consa_vllm.plugin.ops.torch_paged.hybrid_paged_attention`.
    3D runs for decode batches that ``scratch`` holds (:func:`would_use_3d`); without
    ``scratch`` every batch runs 2D.
    """
    launch_attention(query, output, batch, scale, full, sliding, scratch, LaunchConfig())


def launch_attention(query: torch.Tensor, output: torch.Tensor, batch: AttnBatch, scale: float,
                     full: KVPool | None, sliding: KVPool | None, scratch: HybridScratch | None,
                     config: LaunchConfig) -> None:
    """:func:`hybrid_paged_attention` with explicit launch parameters (kernel benchmarks)."""
    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    n_kv = n_full + n_sliding
    if n_kv == 0:
        return
    T, hq, d = query.shape
    if hq % n_kv:
        raise ValueError(f"query heads {hq} not a multiple of n_full + n_sliding = {n_kv}")
    group = hq // n_kv
    if output.shape != query.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != query {tuple(query.shape)}")
    if query.stride(2) != 1 or output.stride(2) != 1:
        raise ValueError("query/output need a contiguous last dim")
    for pool, name in ((full, "full"), (sliding, "sliding")):
        if pool is not None and pool.num_heads:
            check_pool(pool, name, d)
    if n_full and n_sliding and full.is_fp8 != sliding.is_fp8:
        raise ValueError("the F and S pools must both be FP8 or neither")
    if n_full and full.window is not None:
        raise ValueError(f"full: the F pool has no window, got {full.window}")
    if n_sliding and sliding.window is None:
        raise ValueError("sliding: the S pool needs a window")
    # An absent pool is passed as the other one (its branch is compiled out).
    fp = full if n_full else sliding
    sp = sliding if n_sliding else full
    window = sliding.window if n_sliding else 1
    num_seqs = batch.num_seqs
    if num_seqs <= 0 or T == 0:
        return

    head_pad = triton.next_power_of_2(d)
    block_m = 16 if group <= 16 else triton.next_power_of_2(group)
    block_q = block_m // group
    use_3d = would_use_3d(query, batch, scratch)
    if use_3d and n_full and n_sliding and (full.cache.dtype != sliding.cache.dtype
                                            or full.block_table.dtype != sliding.block_table.dtype):
        # The 3D body reads either pool through one pointer (same types needed); vLLM's
        # pools always match, so this is for hand-built pools only.
        use_3d = False
    tile_size = config.tile_size or (DEFAULT_TILE_3D if use_3d else 32)
    total_q_blocks = T // block_q + num_seqs
    sink = sliding.sink if n_sliding else 0
    if use_3d:
        seg_f, seg_s, seg_stride = decode_segments(window if n_sliding else 1, sink, tile_size, num_seqs, T,
                                                   scratch.capacity, config.segments)
        grid = (total_q_blocks, n_full * seg_f + n_sliding * seg_s)
    else:
        seg_f = seg_s = seg_stride = 1
        grid = (total_q_blocks, n_kv)
    launch = {}
    if use_3d and fp.is_fp8 and head_pad <= 128 and config.num_warps is None:
        # FP8 tiles are converted in registers: left alone, ptxas gives the 3D kernel
        # 134-140 registers (sm_90, 4 warps: 3 programs per SM); capped at 128 it has 4 and
        # spills nothing at head_dim <= 128 (checked with ptxas -v for bf16 queries over FP8
        # pools, 0 or 64 sinks, block sizes 16 and 48).
        launch["maxnreg"] = 128
    if config.num_warps is not None:
        launch["num_warps"] = config.num_warps
    if config.num_stages is not None:
        launch["num_stages"] = config.num_stages

    fc, sc = fp.cache, sp.cache
    segm = scratch if use_3d else (output, output, output)
    _hybrid_attn_kernel[grid](
        output, query, batch.query_start_loc, batch.seq_lens, num_seqs,
        fc, fp.block_table, fp.head_offset if n_full else 0, fp.block_table.stride(0),
        fc.stride(0), fc.stride(1), fc.stride(2), fc.stride(3), fc.stride(4),
        sc, sp.block_table, sp.head_offset if n_sliding else 0, sp.block_table.stride(0),
        sc.stride(0), sc.stride(1), sc.stride(2), sc.stride(3), sc.stride(4),
        segm[0], segm[1], segm[2],
        float(scale) * LOG2E, int(window),
        *_scale_args(fp, output), *_scale_args(sp, output),
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        n_full, seg_f, seg_s, seg_stride,
        **attention_constexprs(n_full, n_sliding, hq, sink, fc.shape[2], sc.shape[2], tile_size, d,
                               query.dtype, use_3d, fp.is_fp8, config.prefetch_bt),
        **launch,
    )
    if use_3d:
        _reduce_segments_kernel[(T, hq)](
            output, scratch.segm_output, scratch.segm_max, scratch.segm_expsum,
            batch.query_start_loc, num_seqs,
            output.stride(0), output.stride(1),
            n_full * group, seg_f, seg_s, seg_stride,
            NUM_QUERY_HEADS=hq, HEAD_SIZE=d, HEAD_PAD=head_pad, SEG_CHUNK=REDUCE_SEG_CHUNK,
        )


def attention_constexprs(n_full: int, n_sliding: int, num_q_heads: int, sink: int, block_size_f: int,
                         block_size_s: int, tile_size: int, head_size: int, dtype: torch.dtype, use_3d: bool,
                         fp8: bool, prefetch_bt: bool | None = None) -> dict:
    """The compile-time (constexpr) arguments of the attention kernel for one layer.

    A JIT variant is compiled per distinct value of this dict (the kernel's runtime ints
    that differ between layers are not specialised).  The head split enters only as
    HAS_FULL / HAS_SLIDING, so the layers of an uneven allocation share at most 3 variants
    per path (all-F, all-S, mixed) instead of one per (n_full, n_sliding)."""
    group = num_q_heads // (n_full + n_sliding)
    block_m = 16 if group <= 16 else triton.next_power_of_2(group)
    return dict(
        HAS_FULL=n_full > 0, HAS_SLIDING=n_sliding > 0, NUM_QUERY_HEADS=num_q_heads, G=group, SINK=sink,
        BLOCK_SIZE_F=block_size_f, BLOCK_SIZE_S=block_size_s,
        TILE=tile_size, HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
        BLOCK_M=block_m, BLOCK_Q=block_m // group,
        IS_3D=use_3d, DOT_IEEE=(dtype == torch.float32) or _INTERPRET,
        CAST_F32=_INTERPRET, FP8=fp8,
        PREFETCH_BT=use_3d and (DEFAULT_PREFETCH_BT if prefetch_bt is None else prefetch_bt),
    )


def merge_sinks(query: torch.Tensor, output: torch.Tensor, lse: torch.Tensor, batch: AttnBatch, scale: float,
                sliding: KVPool) -> None:
    """Fold the sink keys of a layer's S heads into a window-only attention result, in place.

    ``query``/``output`` are the S heads' query heads ``[T, n_sliding * G, D]``; ``output``
    holds attention over each query's window alone and ``lse`` its natural log-sum-exp
    ``[n_sliding * G, T]`` (FlashAttention's ``softmax_lse``; ``[T, n_sliding * G]`` works
    too). Afterwards ``output`` is attention over the window plus keys ``0 .. sink - 1``.
    One launch; none when ``sliding.sink`` is 0.
    """
    if not sliding.sink or not sliding.num_heads:
        return
    T, hq, d = query.shape
    check_pool(sliding, "sliding", d)
    if sliding.window is None or hq % sliding.num_heads:
        raise ValueError(f"sliding: {hq} query heads over {sliding.num_heads} S heads with window {sliding.window}")
    if lse.shape[0] == hq and lse.shape[1] >= T:
        lse_stride_h, lse_stride_t = lse.stride(0), lse.stride(1)
    elif lse.shape[1] == hq and lse.shape[0] >= T:
        lse_stride_h, lse_stride_t = lse.stride(1), lse.stride(0)
    else:
        raise ValueError(f"lse of shape {tuple(lse.shape)} does not cover {T} tokens x {hq} heads")
    num_seqs = batch.num_seqs
    if num_seqs <= 0 or T == 0:
        return
    group = hq // sliding.num_heads
    block_m = max(SINK_MERGE_ROWS, triton.next_power_of_2(group))
    block_q = block_m // group
    c = sliding.cache
    _sink_merge_kernel[(T // block_q + num_seqs, sliding.num_heads)](
        output, query, lse, batch.query_start_loc, batch.seq_lens, num_seqs,
        c, sliding.block_table, sliding.head_offset, sliding.block_table.stride(0),
        c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.stride(4),
        float(scale) * LOG2E, int(sliding.window), *_scale_args(sliding, output),
        query.stride(0), query.stride(1), output.stride(0), output.stride(1), lse_stride_h, lse_stride_t,
        G=group, SINK=sliding.sink, BLOCK_SIZE=c.shape[2], TILE=16 if sliding.sink <= 16 else 32,
        HEAD_SIZE=d, HEAD_PAD=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_Q=block_q,
        DOT_IEEE=(query.dtype == torch.float32) or _INTERPRET, CAST_F32=_INTERPRET, FP8=sliding.is_fp8,
    )


def _check_write(key: torch.Tensor, pool: KVPool, name: str) -> None:
    check_pool(pool, name, key.shape[2])
    if key.shape[1] < pool.num_heads:
        raise ValueError(f"{name}: {pool.num_heads} heads to write, the key has {key.shape[1]}")


def write_kv(key: torch.Tensor, value: torch.Tensor, pool: KVPool) -> None:
    """Triton scatter: one program per token writes its n heads' K and V (slot < 0 skipped).

    Uses min(key.shape[0], slot_mapping.shape[0]) tokens and the first ``pool.num_heads``
    heads of ``key``; grid size from shapes only."""
    n, d = pool.num_heads, key.shape[2]
    num_tokens = min(key.shape[0], pool.slot_mapping.shape[0])
    if num_tokens == 0 or n == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    _check_write(key, pool, "pool")
    cache = pool.cache
    _write_kv_kernel[(num_tokens,)](
        key, value, cache, pool.slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4),
        pool.head_offset, *_scale_args(pool, key),
        n, N_PAD=triton.next_power_of_2(key.shape[1]), HEAD_SIZE=d,
        HEAD_PAD=triton.next_power_of_2(d), BLOCK_SIZE=cache.shape[2], FP8=pool.is_fp8,
    )


def write_kv_hybrid(key: torch.Tensor, value: torch.Tensor, full: KVPool | None, sliding: KVPool | None) -> None:
    """One launch writes a layer's K/V: heads ``[0, n_full)`` into the F pool, the rest into
    the S pool, each through its own slot mapping (see :func:`write_kv`)."""
    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    if n_full == 0:
        return write_kv(key, value, sliding)
    if n_sliding == 0:
        return write_kv(key, value, full)
    d = key.shape[2]
    num_tokens = min(key.shape[0], full.slot_mapping.shape[0], sliding.slot_mapping.shape[0])
    if num_tokens == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    _check_write(key, full, "full")
    _check_write(key[:, n_full:], sliding, "sliding")
    if full.is_fp8 != sliding.is_fp8:
        raise ValueError("the F and S pools must both be FP8 or neither")
    fc, sc = full.cache, sliding.cache
    _write_kv_hybrid_kernel[(num_tokens, 2)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        fc, full.slot_mapping, full.head_offset,
        fc.stride(0), fc.stride(1), fc.stride(2), fc.stride(3), fc.stride(4), *_scale_args(full, key),
        sc, sliding.slot_mapping, sliding.head_offset,
        sc.stride(0), sc.stride(1), sc.stride(2), sc.stride(3), sc.stride(4), *_scale_args(sliding, key),
        n_full, n_sliding, N_PAD=triton.next_power_of_2(key.shape[1]),
        HEAD_SIZE=d, HEAD_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE_F=fc.shape[2], BLOCK_SIZE_S=sc.shape[2], FP8=full.is_fp8,
    )


__all__ = [
    "HybridScratch", "LaunchConfig", "attention_constexprs", "decode_segments", "default_seq_threshold_3d",
    "make_hybrid_scratch", "would_use_3d",
    "hybrid_paged_attention", "launch_attention", "merge_sinks", "quantize_query_fp8", "write_kv",
    "write_kv_hybrid",
]
