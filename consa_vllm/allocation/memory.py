"""KV-cache size of an allocation, in closed form.

Per sequence of context ``N`` tokens, each KV head stores K and V of ``head_dim`` values
per token it keeps: ``N`` tokens for an F head and ``min(N, sink + W)`` for an S head
(its ``sink`` first tokens and its last ``W``).
With ``block_size`` set, tokens are counted in whole paged blocks the way vLLM
allocates them (an S head holds the blocks that overlap its window, plus the blocks
holding its sink tokens). It may be a pair ``(full, sliding)``: the plugin's two KV
pools use different block sizes. At any context an S head then holds at most
``ceil(sink/B) + ceil(W/B) + 1`` blocks: the sink blocks, and a window of ``W`` tokens
that straddles at most ``ceil(W/B) + 1`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .format import Allocation
from .shape import ModelShape

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "fp8": 1, "float8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tokens_kept(context: int, window: int | None, block_size: int | None = None, sink: int = 0) -> int:
    """Tokens one head keeps for a sequence of ``context`` tokens (``window=None``: full).

    An S head (``window`` set) keeps its first ``sink`` tokens and its last ``window``.
    """
    if block_size is None:
        return context if window is None else min(context, sink + window)
    if context == 0:
        return 0
    first = 0 if window is None else max(0, context - window)
    # Whole blocks from the one holding the oldest token still in the window (vLLM frees
    # the blocks before it) to the one holding the newest ...
    window_blocks = (context - 1) // block_size - first // block_size + 1
    # ... plus the blocks holding sink tokens that lie before the window's first block
    # (a sink block that the window also covers is one block, counted once).
    sink_blocks = 0 if window is None else min(_cdiv(min(sink, context), block_size), first // block_size)
    return (window_blocks + sink_blocks) * block_size


@dataclass(frozen=True)
class KVEstimate:
    context: int
    bytes_per_sequence: int
    dense_bytes_per_sequence: int

    @property
    def ratio_to_dense(self) -> float:
        """KV bytes of this allocation divided by those of the dense model (lower is better)."""
        return self.bytes_per_sequence / self.dense_bytes_per_sequence

    @property
    def capacity_gain(self) -> float:
        """How many times more sequences of this length fit in the same KV memory."""
        return self.dense_bytes_per_sequence / self.bytes_per_sequence


def estimate_kv(
    allocation: Allocation,
    shape: ModelShape,
    context: int,
    dtype: str = "bfloat16",
    block_size: int | tuple[int, int] | None = None,
) -> KVEstimate:
    """KV bytes per sequence at ``context`` tokens, and the dense figure for comparison."""
    allocation.check_model(shape.num_layers, shape.num_kv_heads)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    per_token_head = 2 * shape.head_dim * dtype_bytes(dtype)
    n_full = sum(row.count("F") for row in allocation.pattern)
    n_slide = shape.num_layers * shape.num_kv_heads - n_full
    full_bs, slide_bs = block_size if isinstance(block_size, tuple) else (block_size, block_size)
    full_tokens = tokens_kept(context, None, full_bs)
    slide_tokens = tokens_kept(context, allocation.window, slide_bs, sink=allocation.sink)
    total = per_token_head * (n_full * full_tokens + n_slide * slide_tokens)
    dense = per_token_head * shape.num_layers * shape.num_kv_heads * tokens_kept(context, None, full_bs)
    return KVEstimate(context, total, dense)
