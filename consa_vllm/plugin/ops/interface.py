"""What the hybrid attention ops take: one :class:`KVPool` per pool and one :class:`AttnBatch`.

Modelled on vLLM's attention backends, which hand their kernels one metadata dataclass per
batch: here the batch shape is :class:`AttnBatch` (built once per step by the backend's
metadata builder) and each of a layer's two KV pools is a :class:`KVPool` (built per layer
and step by the backend: the cache, the pool's block table and slots, and the layer's
slice of the pool).

No vLLM import here: the ops and their tests run with torch (and Triton) alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The FP8 KV-cache format: vLLM's "fp8" / "fp8_e4m3" on CUDA and CPU.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` as FP8, saturated to the format's range as vLLM's cache writes are
    (``scale`` is float32 and broadcasts against ``x``)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@dataclass(frozen=True)
class AttnBatch:
    """The shape of one batch of sequences (the same for both pools)."""

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative new-token counts
    seq_lens: torch.Tensor  # int32 [num_seqs], context including the new tokens
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.query_start_loc.shape[0] - 1


@dataclass(frozen=True)
class KVPool:
    """One layer's heads in one KV pool (the F pool or the S pool), for one forward call.

    ``cache`` is the pool's whole KV tensor ``[num_blocks, 2, block_size, pool_heads, D]``
    (dim 1: 0 = K, 1 = V; dim 0 may be strided, see ``layout.choose_block_sizes``); the
    layer owns heads ``[head_offset, head_offset + num_heads)`` of it. A query at position
    ``i`` of a head in this pool sees keys ``0 .. i`` when ``window`` is None (F pool),
    else keys ``0 .. sink - 1`` and ``i - window + 1 .. i`` (never a key after ``i``).

    An FP8 cache (``cache.dtype`` is ``torch.float8_e4m3fn``) stores ``K / k_scale`` and
    ``V / v_scale``; the scales are float32 ``[num_heads]`` for this layer's heads of the
    pool (a per-tensor scale is passed expanded, stride 0). ``q_scale`` is the scale
    queries are quantized with by kernels that need FP8 queries with an FP8 cache
    (FlashAttention 3); the other kernels keep the query as it is.
    """

    cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor | None  # int32/int64 [num_tokens]: where write_kv puts new tokens (< 0: skip)
    head_offset: int
    num_heads: int
    window: int | None = None
    sink: int = 0
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.cache.shape[2]

    @property
    def is_fp8(self) -> bool:
        return self.cache.dtype == FP8_DTYPE

    def heads(self) -> torch.Tensor:
        """The layer's slice of the cache: ``[num_blocks, 2, block_size, num_heads, D]`` (a view)."""
        return self.cache[:, :, :, self.head_offset:self.head_offset + self.num_heads]


def check_pool(pool: KVPool, name: str, head_size: int) -> None:
    """Raise ``ValueError`` naming ``name`` if ``pool`` cannot serve heads of ``head_size``."""
    cache = pool.cache
    if cache.dim() != 5 or cache.shape[1] != 2:
        raise ValueError(f"{name}: expected a cache [num_blocks, 2, block_size, heads, D], got {tuple(cache.shape)}")
    if cache.shape[4] != head_size:
        raise ValueError(f"{name}: head_dim {cache.shape[4]} != query head_dim {head_size}")
    if pool.head_offset < 0 or pool.head_offset + pool.num_heads > cache.shape[3]:
        raise ValueError(f"{name}: heads [{pool.head_offset}, {pool.head_offset + pool.num_heads}) outside "
                         f"the pool's {cache.shape[3]} heads")
    if pool.window is not None and pool.window < 1:
        raise ValueError(f"{name}: window must be >= 1, got {pool.window}")
    if pool.sink < 0 or (pool.sink and pool.window is None):
        raise ValueError(f"{name}: sink {pool.sink} needs a window and must be >= 0")
    if pool.is_fp8:
        for kind in ("k_scale", "v_scale"):
            t = getattr(pool, kind)
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != (pool.num_heads,):
                raise ValueError(f"{name}: an FP8 cache needs {kind} as float32 [{pool.num_heads}], got "
                                 f"{None if t is None else (t.dtype, tuple(t.shape))}")
        if pool.k_scale.stride() != pool.v_scale.stride():
            raise ValueError(f"{name}: k_scale and v_scale must both be per-tensor (expanded) or per-head")
