"""The CONSA attention backend: one fused attention launch per layer over two KV pools.

vLLM sees two kinds of attention modules (see :mod:`consa_vllm.plugin.attention`):

- two *pool* modules that only own KV memory (one full-attention spec, one
  sliding-window spec), so vLLM's hybrid KV-cache manager allocates their blocks and
  frees out-of-window S blocks;
- one *compute* module per decoder layer, registered as sharing the KV cache of a pool
  (vLLM's cross-layer KV sharing), so that it gets attention metadata and is run through
  vLLM's own ``unified_attention_with_output`` custom op (a piecewise-CUDA-graph
  splitting op) with no extra registration.

The compute module's impl writes the layer's new K/V into both pools and runs one
hybrid attention kernel that reads F heads through the F block table and S heads
through the S block table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from consa_vllm.plugin.ops import AttnBatch, KVPool, select_ops
from consa_vllm.plugin.ops.flash_pools import (
    DEFAULT_FUSED_DECODE_MAX_SEQS,
    decode_fa_splits,
    default_overlap,
    flash_attn_pools,
    flash_attn_varlen,
    flash_full_fused_sliding,
    fused_decode_max_seqs,
    sinks_in_kernel,
    small_decode_split,
)
from consa_vllm.plugin.ops.interface import FP8_DTYPE


# vLLM's names of the FP8 (e4m3) cache; the pools hold it as uint8, the ops read it as FP8.
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def layer_kv_scales(layer, n_full: int, n_sliding: int) -> tuple[tuple, tuple]:
    """A layer's (k, v, q) scales for its F heads and for its S heads: float32 ``[n]`` views.

    vLLM's attention layer keeps ``_k_scale``/``_v_scale``/``_q_scale`` per tensor (one
    value, from the checkpoint or 1.0) or, for checkpoints with per-head scales, one per KV
    head of this rank in checkpoint order. That is the served order (the F heads' scales
    first, then the S heads'): per-head scales are refused wherever the loader moves heads
    (:func:`consa_vllm.plugin.permute.check_quantized_permutation`).
    """
    full, sliding = [], []
    for name in ("_k_scale", "_v_scale", "_q_scale"):
        t = getattr(layer, name)
        if t.numel() == 1:
            one = t.reshape(1)
            full.append(one.expand(n_full))
            sliding.append(one.expand(n_sliding))
        elif t.numel() == n_full + n_sliding:
            full.append(t[:n_full])
            sliding.append(t[n_full:])
        else:
            raise ValueError(f"{getattr(layer, 'layer_name', 'layer')}: {name} has {t.numel()} values; expected 1 "
                             f"or one per KV head ({n_full + n_sliding})")
    return tuple(full), tuple(sliding)


def fused_decode_limits(num_kv_heads: int, capture_sizes: list[int] | None,
                        limit: int | None) -> tuple[int, int]:
    """(split-KV scratch rows, largest decode batch for the fused kernel where FlashAttention 3
    is available), for ``limit`` = :func:`fused_decode_max_seqs`'s value.

    The scratch rows follow vLLM's 3D rule, ``128 // num_kv_heads``, snapped to the closest
    CUDA-graph capture size as in vLLM's Triton backend (one captured graph per batch size
    takes one path): without FlashAttention 3 the fused kernel serves every batch, split-KV
    up to those rows, and fewer rows would also cap batch 1's segments
    (``triton_hybrid.decode_segments``). A limit above the rule raises the rows with it.
    Default (None): the fused kernel up to :data:`DEFAULT_FUSED_DECODE_MAX_SEQS` sequences
    (or the rule, if smaller).
    """
    from consa_vllm.plugin.ops.triton_hybrid import default_seq_threshold_3d

    rule = default_seq_threshold_3d(num_kv_heads)
    if capture_sizes:
        rule = min(capture_sizes, key=lambda x: abs(x - rule))
    if limit is None:
        return rule, min(rule, DEFAULT_FUSED_DECODE_MAX_SEQS)
    return max(rule, limit), limit


@dataclass
class ConsaMetadata:
    """Per KV-cache group: the batch shape plus that group's block table and slots."""

    num_actual_tokens: int
    batch: AttnBatch
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    # Split-KV decode scratch of the fused Triton op (wherever that op serves; only in the
    # metadata that the compute modules receive).
    scratch: Any = None
    # Where FlashAttention 3 is available: decode batches of up to this many sequences run
    # the fused op, larger ones and prefill FlashAttention 3 (fused_decode_limits).
    fused_max_seqs: int = 0


def _serves_compute_layers(vllm_config: VllmConfig, layer_names: list[str]) -> bool:
    """Whether a KV-cache group holds ConSA compute modules (vLLM adds each to the group of
    the pool whose cache it shares), i.e. whether its metadata reaches the attention ops."""
    layers = vllm_config.compilation_config.static_forward_context
    return any(getattr(getattr(layers.get(n), "impl", None), "consa_pools", None) is not None
               for n in layer_names)


class ConsaMetadataBuilder(AttentionMetadataBuilder[ConsaMetadata]):
    # Full CUDA graphs for uniform batches (decode, spec-decode verification): the
    # prefill/decode path is chosen on the host from max_query_len, fixed per graph.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.scratch = None
        self.fused_max_seqs = 0
        # One builder per pool; only the compute modules' group needs the scratch
        # (about 16 MiB at the Qwen3-0.6B shape), so it is allocated once.
        serves = _serves_compute_layers(vllm_config, layer_names)
        # Read (and validated) once per engine, on every device, so a bad value fails alike.
        limit = fused_decode_max_seqs() if serves else None
        # The split-KV scratch serves the Triton op: on GPUs, and on CPU where
        # CONSA_ATTN_IMPL=triton runs it (under TRITON_INTERPRET=1, as a test of the GPU path).
        if serves and (device.type == "cuda" or select_ops(device.type).name == "triton"):
            from consa_vllm.plugin.ops.triton_hybrid import DEFAULT_NUM_SEGMENTS, make_hybrid_scratch

            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            threshold, self.fused_max_seqs = fused_decode_limits(
                mc.get_num_kv_heads(pc), vllm_config.compilation_config.cudagraph_capture_sizes, limit)
            # Many segments: a batch-1 decode at long context otherwise runs each F head's
            # whole context in a handful of programs and leaves most SMs idle.  The scratch
            # holds `segments` rows per sequence (fp32 [threshold, Hq, segments, HEAD_PAD]:
            # 16 MiB at the Qwen3-0.6B shape, 32 MiB at Llama-3.1-8B's, 64 MiB at
            # Qwen3-30B-A3B's; CONSA_FUSED_DECODE_MAX_SEQS above the rule scales it with its
            # rows); each launch picks per-pool counts within it
            # (triton_hybrid.decode_segments: up to 256 per F head at batch 1).
            segments = int(os.environ.get("CONSA_DECODE_SEGMENTS", DEFAULT_NUM_SEGMENTS))
            self.scratch = make_hybrid_scratch(threshold, mc.get_num_attention_heads(pc), mc.get_head_size(),
                                               device, num_segments=segments)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ConsaMetadata:
        m = common_attn_metadata
        batch = AttnBatch(query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
                          max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)
        return ConsaMetadata(num_actual_tokens=m.num_actual_tokens, batch=batch,
                             block_table=m.block_table_tensor, slot_mapping=m.slot_mapping, scratch=self.scratch,
                             fused_max_seqs=self.fused_max_seqs)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> ConsaMetadata:
        meta = self.build(0, common_attn_metadata)
        # As vLLM's Triton backend does: capturing with max-length sequences is slow
        # and the captured kernels read the real lengths at replay anyway.
        meta.batch.seq_lens.fill_(1)
        return meta


class ConsaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", *FP8_KV_CACHE_DTYPES]

    @staticmethod
    def get_name() -> str:
        # vLLM maps backend names to an enum; CUSTOM is its slot for out-of-tree backends.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["ConsaAttentionImpl"]:
        return ConsaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[ConsaMetadataBuilder]:
        return ConsaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # Blocks outermost: vLLM may then pad the smaller pool's page and view it by
        # block stride (see layout.choose_block_sizes).
        if include_num_layers_dimension:
            return (1, 0, 2, 3, 4, 5)
        return (0, 1, 2, 3, 4)

    # No head sizes, attention types or sliding-window support declared: vLLM checks those
    # only when it selects a backend itself, and the ConSA modules name this one. The fused
    # Triton kernels and the CPU op take any head size (the kernels pad it to a power of
    # two); FlashAttention 3, where it runs, takes multiples of 8 up to 256 (docs/DESIGN.md
    # §7). Cascade attention stays off through the metadata builder's default.


class ConsaAttentionImpl(AttentionImpl[ConsaMetadata]):
    """Runs one layer: write K/V into both pools, then one hybrid attention call."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 consa_pools=None) -> None:
        if alibi_slopes is not None or logits_soft_cap:
            raise NotImplementedError("ConSA attention supports neither ALiBi nor logit soft-capping")
        if kv_cache_dtype not in ConsaAttentionBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(
                f"ConSA attention: --kv-cache-dtype {kv_cache_dtype} is not supported; use one of "
                f"{', '.join(ConsaAttentionBackend.supported_kv_cache_dtypes)} (fp8 = fp8_e4m3)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        # (full pool name, sliding pool name, LayerLayout); None for the pool modules,
        # which vLLM never runs.
        self.consa_pools = consa_pools
        self.ops = None
        self.flash_attn = None
        self.split_small_decode = False
        self.sinks_in_kernel = False
        if consa_pools is not None:
            from vllm.config import get_current_vllm_config
            from vllm.platforms import current_platform

            # Chosen once, when vLLM builds the model (environment knobs: see ops.select_ops),
            # under the engine's config, as vLLM's own Attention layer reads it.
            self.ops = select_ops(current_platform.device_type)
            self.flash_attn = flash_attn_varlen()
            mc = get_current_vllm_config().model_config
            self.split_small_decode = small_decode_split(
                self.kv_fp8, consa_pools[2].n_full, max_model_len=mc.max_model_len if mc is not None else None)
            self.sinks_in_kernel = sinks_in_kernel()
        self.fa_overlap = default_overlap()
        self.fa_decode_splits = decode_fa_splits()
        # Set once consa_vllm.plugin.precompile has run for the engine (at its first step with
        # a KV cache), or where there is nothing to compile ahead. CONSA_PRECOMPILE is read
        # (and a bad value refused) here, as the other knobs, not after the weights load.
        self.precompiled = True
        if consa_pools is not None:
            from consa_vllm.plugin.precompile import precompile_enabled

            self.precompiled = not precompile_enabled()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by ConSA attention")
        if attn_metadata is None:
            # Profiling run: no KV cache yet.
            return output.fill_(0)
        ctx = get_forward_context()
        n = attn_metadata.num_actual_tokens
        if not self.precompiled:
            from consa_vllm.plugin.precompile import precompile_engine

            precompile_engine(ctx, attn_metadata, query, key, value, output)
        full, sliding = self.pools(layer, ctx, n)
        self.ops.write_kv_hybrid(key[:n], value[:n], full, sliding)
        self.attend(query[:n], output[:n], attn_metadata, full, sliding)
        return output

    def pools(self, layer, ctx, n: int) -> tuple[KVPool | None, KVPool | None]:
        """This layer's slice of the F pool and of the S pool in the step of forward context
        ``ctx`` (None where the layer has no head there), with slots for its first ``n``
        tokens."""
        full_name, sliding_name, lay = self.consa_pools
        metas = ctx.attn_metadata
        if isinstance(metas, list):  # speculative decoding passes a list; [0] is the base model
            metas = metas[0]
        layers = ctx.no_compile_layers
        # FP8: vLLM allocates the pools as uint8; the layer (not the shared pools) owns the
        # scales, split with its heads.
        scales = {"full": {}, "sliding": {}}
        if self.kv_fp8:
            for pool, (k, v, q) in zip(scales, layer_kv_scales(layer, lay.n_full, lay.n_sliding)):
                scales[pool] = dict(k_scale=k, v_scale=v, q_scale=q)
        full = sliding = None
        if lay.n_full:
            meta, cache = metas[full_name], layers[full_name].kv_cache
            full = KVPool(cache.view(FP8_DTYPE) if self.kv_fp8 else cache, meta.block_table, meta.slot_mapping[:n],
                          lay.full_offset, lay.n_full, **scales["full"])
        if lay.n_sliding:
            meta, cache = metas[sliding_name], layers[sliding_name].kv_cache
            sliding = KVPool(cache.view(FP8_DTYPE) if self.kv_fp8 else cache, meta.block_table,
                             meta.slot_mapping[:n], lay.sliding_offset, lay.n_sliding, window=layer.consa_window,
                             sink=layer.consa_sink, **scales["sliding"])
        return full, sliding

    def attend(self, query, output, attn_metadata: ConsaMetadata, full: KVPool | None, sliding: KVPool | None,
               flash_attn=None) -> None:
        """Attention of one layer's tokens over its pools (K/V already written), by the path
        that the batch's shape picks. ``flash_attn`` stands in for FlashAttention 3 where
        this layer has it (the precompile's no-op)."""
        fa = self.flash_attn if flash_attn is None or self.flash_attn is None else flash_attn
        batch = attn_metadata.batch
        scratch = attn_metadata.scratch
        small_decode = (scratch is not None and batch.max_query_len <= 1
                        and batch.num_seqs <= attn_metadata.fused_max_seqs)
        if fa is not None and query.dtype in (torch.float16, torch.bfloat16):
            # Small decode batches, where launch count and SM occupancy dominate, keep the fused
            # split-KV launch, by default for the S heads only: the F heads' context-long reads
            # run faster in FlashAttention 3 (CONSA_SMALL_DECODE). Prefill and large decode
            # batches run FlashAttention 3 per pool, much faster there than the fused kernel,
            # or opt in to the S heads' sinks inside the fused kernel (CONSA_SINKS_IN_KERNEL).
            # See ops.flash_pools; CONSA_FUSED_DECODE_MAX_SEQS moves the boundary.
            if small_decode:
                split = self.split_small_decode
            else:
                split = self.sinks_in_kernel and sliding is not None and sliding.sink > 0
            if split:
                flash_full_fused_sliding(fa, query, output, batch, self.scale, full,
                                         sliding, scratch if small_decode else None, overlap=self.fa_overlap,
                                         num_splits=self.fa_decode_splits if small_decode else 0)
                return
            if not small_decode:
                flash_attn_pools(fa, query, output, batch, self.scale, full, sliding, overlap=self.fa_overlap)
                return
        self.ops.attention(query, output, batch, self.scale, full, sliding, scratch)
