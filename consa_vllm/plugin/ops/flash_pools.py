"""FlashAttention 3 over the two KV pools: the GPU path for prefill and large decode batches.

There the work per launch is large and FlashAttention 3 beats the fused Triton kernel
(benchmarks/results/hybrid_kernel_h100*.json), but FlashAttention takes one block table
and one window per call, so a hybrid layer costs two launches: F heads over the F pool
(causal), S heads over the S pool (sliding window).

Run back to back, the two launches each end in a partly idle wave. At a decode batch B
the F launch has only B x n_full work tiles (FlashAttention packs a KV head's query heads
into one tile), so e.g. 2 F heads at B = 88 give 176 tiles for 132 SMs: a second wave a
third full. ``overlap=True`` (the default) runs the F launch on vLLM's auxiliary stream
concurrently with the S launch, so S tiles fill the F launch's idle SMs, as one fused
launch would. CUDA-graph capture records the two streams as parallel branches.

``CONSA_FA3_OVERLAP=0`` runs the launches one after the other (read once per process), to
measure what the overlap buys. ``CONSA_FUSED_DECODE_MAX_SEQS`` moves the decode batch size
up to which the fused Triton kernel runs instead (:func:`fused_decode_max_seqs`). Over bf16
pools those small decode batches still send the F heads here, one launch beside the fused
kernel's S heads (:func:`flash_full_fused_sliding`, ``CONSA_SMALL_DECODE``): FlashAttention 3
streams a long context faster than the fused kernel does. Forcing
KV splits on the F launch was measured too and changed nothing on the H100
(benchmarks/results/hybrid_kernel_h100_fa3_pools.json), so the split count is left to
FlashAttention.

Sinks (S heads that also see keys ``0 .. sink - 1``): FlashAttention masks are causal or
local bands, and "below ``sink`` and more than a window back" is neither, so with sinks
the S launch runs the window alone and returns its log-sum-exp, and one small Triton
launch (:func:`.triton_hybrid.merge_sinks`) folds in the sink keys each query sees beyond
its window. With sink 0 the S launch is exactly as before: no log-sum-exp, no extra launch.

FP8 caches: FlashAttention 3 takes FP8 queries with them, so the layer's query heads are
quantized with their KV heads' q_scale first, in one Triton launch for both pools (as vLLM's own
attention layer quantizes before its FlashAttention backend, in one fused kernel; the four torch
kernels per pool that did it before move nine times the bytes, 27 per element against 3, which
matters for long prefill chunks), and each launch passes the q/k/v descales; the sink merge
reads the query as it is.
"""

from __future__ import annotations

import functools
import os

import torch

from ..knobs import env_flag
from .interface import AttnBatch, KVPool


def flash_attn_varlen():
    """vLLM's FlashAttention 3 varlen function on Hopper GPUs, else None (use the fused kernel)."""
    if os.environ.get("CONSA_PREFILL_IMPL", "auto") == "fused" or not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func if get_flash_attn_version() == 3 else None


def default_overlap() -> bool:
    """Whether F and S launches run on two streams (``CONSA_FA3_OVERLAP``, default on)."""
    return env_flag("CONSA_FA3_OVERLAP", True)


#: Most KV splits FlashAttention 3 takes (its split-KV scheduler's limit).
MAX_FA3_SPLITS = 256


def decode_fa_splits() -> int:
    """``CONSA_FA3_DECODE_SPLITS`` (default 0: FlashAttention 3's own heuristic): the KV splits
    of the F heads' FlashAttention 3 launch in small decode batches of split layers
    (:func:`flash_full_fused_sliding`). Read once per layer when vLLM builds the model. Under
    CUDA graphs FlashAttention 3 picks its split count on the host when the graph is captured,
    at vLLM's capture length (max_model_len), and keeps it at every replay; this fixes it
    instead, to measure that choice (benchmarks/bench_fused_decode.py ``--fa-splits``). On the
    H100, 32 (stock layer-wise's cap under CUDA graphs) was the best count and only 0.1-0.7%
    faster than FlashAttention's own, so the default stays (docs/DESIGN.md §8)."""
    v = os.environ.get("CONSA_FA3_DECODE_SPLITS", "").strip() or "0"
    try:
        n = int(v)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_FA3_SPLITS:
        raise ValueError(f"CONSA_FA3_DECODE_SPLITS must be a whole number from 0 to {MAX_FA3_SPLITS}, got {v!r}")
    return n


#: Largest decode batch of the fused Triton kernel where FlashAttention 3 is available, by
#: default. Whole-model decode attention on one H200 at 32k (benchmarks/results/
#: hybrid_models_h200_v2.json): at 16 sequences FlashAttention 3 over the two pools (two
#: launches on two streams) is 7-11% faster than the fused kernel for all three shapes
#: measured; at 4 the fused kernel is 15% faster for Qwen3-30B-A3B, even for Qwen3-0.6B and
#: 10% slower for Llama-3.1-8B; at 1 it is 18-30% faster for the Qwen3 shapes.
DEFAULT_FUSED_DECODE_MAX_SEQS = 4


def fused_decode_max_seqs() -> int | None:
    """``CONSA_FUSED_DECODE_MAX_SEQS``: the largest decode batch (sequences) that the fused
    Triton kernel serves on a GPU where FlashAttention 3 is available; larger decode batches
    (and every prefill) run FlashAttention 3 over the two pools.

    None (unset or empty): the default, :data:`DEFAULT_FUSED_DECODE_MAX_SEQS` (the
    backend's ``fused_decode_limits``, measured with ``benchmarks/bench_hybrid_kernel.py
    --whole-model``: ``fa3_pools_*`` against ``hybrid_rule``). ``0``: FlashAttention 3 for
    every batch (faster at batch 1 for the Llama-3.1-8B DuoAttention shape, slower for the
    Qwen3 shapes).
    """
    raw = os.environ.get("CONSA_FUSED_DECODE_MAX_SEQS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError("CONSA_FUSED_DECODE_MAX_SEQS must be a whole number of sequences >= 0 "
                         f"(0 = FlashAttention 3 for every batch; unset = {DEFAULT_FUSED_DECODE_MAX_SEQS}), got {raw!r}")
    return n


def _fp8_args(query_fp8: torch.Tensor, pool: KVPool, num_seqs: int) -> dict:
    """FlashAttention 3 reads an FP8 cache only with FP8 queries: the pool's query heads,
    quantized with its q_scale (:func:`.triton_hybrid.quantize_query_fp8`, once per layer for
    both pools), and the descales as vLLM's FlashAttention backend passes them, expanded to
    (num_seqs, num_kv_heads)."""
    shape = (num_seqs, pool.num_heads)
    return dict(q=query_fp8, q_descale=pool.q_scale.expand(shape), k_descale=pool.k_scale.expand(shape),
                v_descale=pool.v_scale.expand(shape))


def flash_attn_pools(fa, query: torch.Tensor, output: torch.Tensor, batch: AttnBatch, scale: float,
                     full: KVPool | None, sliding: KVPool | None, *, overlap: bool = True) -> None:
    """One hybrid layer through FlashAttention 3 (same contract as ``hybrid_paged_attention``).

    ``fa`` is :func:`flash_attn_varlen`'s function. Query heads ``[0, n_full * G)`` attend
    over the F pool, the rest over the S pool with keys ``i - window + 1 .. i`` plus, with
    sinks, keys ``0 .. sink - 1`` (:func:`.triton_hybrid.merge_sinks`).
    """
    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    g = query.shape[1] // (n_full + n_sliding)
    split = n_full * g
    query_fp8 = None
    if any(p is not None and p.num_heads and p.is_fp8 for p in (full, sliding)):
        from .triton_hybrid import quantize_query_fp8

        query_fp8 = quantize_query_fp8(query, full, sliding)
    calls = []
    for pool, heads in ((full, slice(0, split)), (sliding, slice(split, None))):
        if pool is None or not pool.num_heads:
            continue
        kv = pool.heads()
        window = (-1, -1) if pool.window is None else (pool.window - 1, 0)
        kwargs = dict(
            q=query[:, heads], k=kv[:, 0], v=kv[:, 1], out=output[:, heads],
            cu_seqlens_q=batch.query_start_loc, max_seqlen_q=batch.max_query_len,
            seqused_k=batch.seq_lens, max_seqlen_k=batch.max_seq_len, softmax_scale=scale, causal=True,
            window_size=list(window), block_table=pool.block_table, fa_version=3,
            return_softmax_lse=bool(pool.sink))
        if pool.is_fp8:
            kwargs.update(_fp8_args(query_fp8[:, heads], pool, batch.num_seqs))
        calls.append((pool, heads, kwargs))

    def launch(pool, heads, kwargs) -> None:
        if not pool.sink:
            fa(**kwargs)
            return
        # Sinks: FlashAttention runs the window alone; one small launch adds the sink keys
        # beyond each query's window, merged by log-sum-exp (benchmarks/bench_hybrid_kernel.py
        # times it against sink 0).
        from .triton_hybrid import merge_sinks

        _, lse = fa(**kwargs)
        merge_sinks(query[:, heads], output[:, heads], lse, batch, scale, pool)

    if len(calls) == 2 and overlap:
        # ``fa`` comes from vLLM, so vLLM is importable here. Its aux_stream() is the one side
        # stream vLLM shares among its own overlaps. torch's current stream, not vLLM's
        # cached one: that cache is only set up in vLLM's workers, and this also runs in
        # the kernel benchmark.
        from vllm.utils.torch_utils import aux_stream

        main, side = torch.cuda.current_stream(), aux_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            launch(*calls[0])  # F heads: the long launch starts first
        launch(*calls[1])
        # Tensors made before the fork are used again only after this join, and
        # FlashAttention's own buffers are allocated on the side stream itself, so no
        # record_stream is needed.
        main.wait_stream(side)
        return
    for c in calls:
        launch(*c)


#: ``CONSA_SMALL_DECODE`` values (:func:`small_decode_mode`).
SMALL_DECODE_MODES = ("auto", "fused", "split")


#: Under ``CONSA_SMALL_DECODE=auto``, the fewest F heads (on this rank) for which a layer's small
#: decode batches take the split. Its fixed cost (a second stream, FlashAttention 3's split-KV
#: combine, the S heads' own reduce) is repaid only by the F heads' faster reads. H100, batch 1,
#: whole-model attention (docs/DESIGN.md §8, session 28): split against fused, Llama-3.1-8B
#: shape with DuoAttention's 50% pattern (4 F heads per layer on average) 0.99x at 32k and
#: 0.96x at 128k; Qwen3-0.6B shape, random 0.75 (2 on average) 1.13x / 1.06x; Qwen3-30B-A3B
#: shape, 1F3S 1.34x / 1.14x.
SPLIT_MIN_FULL_HEADS = 4

#: Engines built for long contexts (``max_model_len`` at least :data:`LONG_CONTEXT_TOKENS`) split
#: from :data:`SPLIT_MIN_FULL_HEADS_LONG` F heads. The F heads' reads grow with the context and the
#: split's fixed cost does not, so the best threshold falls as the context grows; the choice is
#: captured in the decode CUDA graphs and cannot follow a step's context, so it follows the
#: longest context the engine serves. H100, batch 1, whole-model attention (docs/DESIGN.md §8,
#: session 30), a threshold of 3 against 4 at 128k / 256k: DuoAttention's 50% Llama-3.1-8B pattern
#: -2.6% / -2.4%, its 75% pattern -4.9% / -5.1%, the seeded-random Qwen3-0.6B 0.75 -0.7% / -1.7%;
#: at 32k 0%, +0.3% and +1.6%, which engines built for short contexts keep.
LONG_CONTEXT_TOKENS = 131072
SPLIT_MIN_FULL_HEADS_LONG = 3


def split_min_full_heads(max_model_len: int | None) -> int:
    """The fewest F heads for which ``CONSA_SMALL_DECODE=auto`` splits a layer's small decode
    batches in an engine of this ``max_model_len`` (None: not known, the short-context rule)."""
    if max_model_len is not None and max_model_len >= LONG_CONTEXT_TOKENS:
        return SPLIT_MIN_FULL_HEADS_LONG
    return SPLIT_MIN_FULL_HEADS


def small_decode_mode() -> str:
    """``CONSA_SMALL_DECODE``: how decode batches within the fused kernel's limit
    (:func:`fused_decode_max_seqs`) run where FlashAttention 3 is available (read once per
    layer when vLLM builds the model).

    ``split``: the F heads through FlashAttention 3 over the F pool, on vLLM's auxiliary
    stream, beside the S heads through the fused kernel over the S pool, sinks included
    (:func:`flash_full_fused_sliding`). ``fused``: one fused split-KV Triton launch for both
    pools. ``auto`` (unset or empty): ``split`` for layers with at least
    :data:`SPLIT_MIN_FULL_HEADS` F heads (:data:`SPLIT_MIN_FULL_HEADS_LONG` in engines built for
    long contexts, :func:`split_min_full_heads`) over bf16/fp16 pools, ``fused`` for the others
    and over FP8 pools (docs/DESIGN.md §8).
    """
    v = os.environ.get("CONSA_SMALL_DECODE", "").strip().lower() or "auto"
    if v not in SMALL_DECODE_MODES:
        raise ValueError(f"CONSA_SMALL_DECODE must be one of {', '.join(SMALL_DECODE_MODES)}, got {v!r}")
    return v


def small_decode_split(kv_fp8: bool, n_full: int, min_full_heads: int | None = None, *,
                       max_model_len: int | None = None) -> bool:
    """Whether small decode batches of a layer with ``n_full`` F heads on this rank take
    :func:`flash_full_fused_sliding` (see :func:`small_decode_mode`), its pools FP8
    (``kv_fp8``) or not, in an engine of this ``max_model_len``. ``min_full_heads`` moves
    ``auto``'s threshold (benchmarks; None: :func:`split_min_full_heads`)."""
    mode = small_decode_mode()
    threshold = split_min_full_heads(max_model_len) if min_full_heads is None else min_full_heads
    return mode == "split" or (mode == "auto" and not kv_fp8 and n_full >= threshold)


def sinks_in_kernel() -> bool:
    """``CONSA_SINKS_IN_KERNEL=0|1`` (default 0): whether prefill and large decode batches of a
    layer with sinks run their S heads through the fused Triton kernel, sinks inside, beside
    FlashAttention 3 for the F heads (:func:`flash_full_fused_sliding` without the split-KV
    scratch), instead of FlashAttention 3 over the window plus the sink merge launch. Read
    once per layer when vLLM builds the model; off until measured (docs/DESIGN.md §8)."""
    return env_flag("CONSA_SINKS_IN_KERNEL", default=False)


def flash_full_fused_sliding(fa, query: torch.Tensor, output: torch.Tensor, batch: AttnBatch, scale: float,
                             full: KVPool | None, sliding: KVPool | None, scratch, *,
                             overlap: bool = True, num_splits: int = 0) -> None:
    """One hybrid layer with the F heads on FlashAttention 3 and the S heads, sinks included, on
    the fused Triton kernel (same contract as ``hybrid_paged_attention``): small decode batches
    (:func:`small_decode_mode`; ``scratch`` gives the S heads the split-KV decode), and with
    ``CONSA_SINKS_IN_KERNEL=1`` prefill and large decode batches with sinks (``scratch`` None:
    the 2D kernel, no sink merge launch).

    F heads read the whole context: FlashAttention 3 streams it at about 3.1 TB/s on an
    H100 against 2.5 for the fused Triton kernel (docs/DESIGN.md §8), which kept batch-1
    decoding at long context behind stock layer-wise. S heads read a window (and
    their sinks) only, where the fused kernel needs no sink merge launch. The F launch runs
    on vLLM's auxiliary stream beside the S launch, as in :func:`flash_attn_pools`.
    ``num_splits`` > 0 fixes the F launch's KV splits (:func:`decode_fa_splits`).
    """
    from .triton_hybrid import hybrid_paged_attention

    if num_splits:
        fa = functools.partial(fa, num_splits=num_splits)

    n_full = full.num_heads if full is not None else 0
    n_sliding = sliding.num_heads if sliding is not None else 0
    if not n_sliding:
        flash_attn_pools(fa, query, output, batch, scale, full, None, overlap=False)
        return
    if not n_full:
        hybrid_paged_attention(query, output, batch, scale, None, sliding, scratch)
        return
    split = n_full * (query.shape[1] // (n_full + n_sliding))

    def full_heads() -> None:
        flash_attn_pools(fa, query[:, :split], output[:, :split], batch, scale, full, None, overlap=False)

    def sliding_heads() -> None:
        hybrid_paged_attention(query[:, split:], output[:, split:], batch, scale, None, sliding, scratch)

    if not overlap:
        full_heads()
        sliding_heads()
        return
    from vllm.utils.torch_utils import aux_stream

    # As in flash_attn_pools: the F launch on vLLM's side stream, joined before anything made
    # before the fork is used again.
    main, side = torch.cuda.current_stream(), aux_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        full_heads()
    sliding_heads()
    main.wait_stream(side)
