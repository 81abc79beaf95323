"""KV cache of streaming heads (attention sinks + a sliding window) in vLLM.

A streaming S head with sink N and window W: the query at position i sees keys
``0 .. N-1`` and ``i-W+1 .. i``. vLLM's ``SlidingWindowManager`` frees (replaces with the
null block) every block before the window, which would drop the sinks. This module adds a
KV-cache spec and a manager of the plugin's own:

- :class:`SinkSlidingWindowSpec`: vLLM's ``SlidingWindowSpec`` plus ``sink``. Everything
  that treats the S pool as a sliding-window group (page sizes, the attention backend,
  the endpoint's pool label) keeps working; its per-request block bound, which vLLM uses
  both to size the KV cache at start-up and to admit requests, adds the sink blocks.
- :class:`SinkSlidingWindowManager`: vLLM's ``SlidingWindowManager`` that never frees the
  first ``ceil(N / block_size)`` blocks of a request ("sink blocks") while the request
  lives, and frees the other out-of-window blocks as vLLM does. A request then holds at
  most ``ceil(N/B) + ceil(W/B) + 1`` S blocks during decode (a prefill chunk of C tokens
  adds up to ``ceil((C - 1)/B)``), and all of them go back to the block pool when it
  finishes or is preempted (the stock ``free``).

Prefix caching: a hit of length L (a multiple of the cache-hit alignment) needs the sink
blocks inside ``[0, L)`` *and* the ``ceil((W-1)/B)`` window blocks before L cached.
:meth:`SinkSlidingWindowManager.find_longest_cache_hit` takes vLLM's window-only answer
and checks the sink blocks; if one was evicted, the hit shrinks to the cached sink
prefix. Sink blocks are always cached (``reachable_block_mask``), so a repeated prompt
hits as it does with plain sliding windows.

Registration (:func:`register_sink_kv_cache_spec`) uses vLLM's own ``KVCacheSpecRegistry``
(spec class -> manager class), from the ``consa`` general plugin, in every vLLM process;
no vLLM file is patched. KV connectors (external KV loads) are not supported for sink
pools: :mod:`consa_vllm.plugin.config` refuses them before the engine starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class SinkSlidingWindowSpec(SlidingWindowSpec):
    """A sliding-window KV-cache group whose requests also keep their first ``sink`` tokens."""

    sink: int

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 1:
            raise ValueError(f"SinkSlidingWindowSpec needs sink >= 1 (use SlidingWindowSpec for none), "
                             f"got {self.sink!r}")

    @property
    def num_sink_blocks(self) -> int:
        """Blocks holding positions ``0 .. sink-1`` (the last one may hold later tokens too)."""
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """Most blocks one request holds: the sink blocks plus vLLM's sliding-window bound.

        vLLM reads this (through ``max_memory_usage_bytes`` and the manager's admission cap)
        to check at start-up that one ``max_model_len`` request fits, to report the maximum
        concurrency, and to admit requests; an undercount would over-admit and stall
        prefills. A request holds its sink blocks plus the blocks overlapping the window
        and the tokens in flight (vLLM's bound, which counts one block more for a window
        that starts inside a block), and never more blocks than its tokens need.
        """
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(self.num_sink_blocks + window_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        # One KV-cache group may only hold layers that free the same blocks.
        return all(isinstance(spec, SinkSlidingWindowSpec) and spec.sliding_window == self.sliding_window
                   and spec.sink == self.sink for spec in kv_cache_specs.values())


class SinkSlidingWindowManager(SlidingWindowManager):
    """vLLM's sliding-window manager, except that each request's sink blocks stay allocated.

    ``req_to_blocks[r]`` keeps vLLM's layout, one entry per block position: the sink
    blocks ``[0, S)`` (``S = ceil(sink / block_size)``), null blocks for the freed positions
    between the sinks and the window, then the window's blocks. The worker reads the
    sinks and the window through this block table; the nulls are never read.
    """

    def __init__(self, kv_cache_spec: SinkSlidingWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink = kv_cache_spec.sink
        self.num_sink_blocks = cdiv(self.sink, self.block_size)

    def _is_kept(self, position: int, num_skipped_blocks: int) -> bool:
        """Whether block ``position`` holds KV some future query reads (a sink or the window)."""
        return position < self.num_sink_blocks or position >= num_skipped_blocks

    # ----------------------------------------------------------- freeing
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Free the out-of-window blocks after the sink blocks (vLLM frees from block 0)."""
        num_skipped_tokens = self.get_num_skipped_tokens(processed_computed_tokens)
        if num_skipped_tokens <= 0:
            return
        blocks = self.req_to_blocks[request_id]
        # As in vLLM: the skipped range may reach past the blocks allocated so far.
        num_skipped_blocks = min(num_skipped_tokens // self.block_size, len(blocks))
        # Walks backwards and stops at the first null block, so each call only frees the
        # blocks that left the window since the last one.
        self._remove_blocks_in_range(request_id, self.num_sink_blocks, num_skipped_blocks)

    # -------------------------------------------------------- allocation
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[KVCacheBlock], total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False) -> int:
        """vLLM's count with the sink positions counted as needed, not skipped."""
        if request_id in self.num_cached_block:
            # A running request only appends blocks at the end: vLLM's fast path holds.
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap)
        num_required_blocks = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self._max_admission_blocks_per_request is not None:
            num_required_blocks = min(num_required_blocks, self._max_admission_blocks_per_request)
        num_req_blocks = len(self.req_to_blocks.get(request_id, ()))
        num_skipped_blocks = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        have = num_req_blocks + len(new_computed_blocks)
        # Positions [have, required) get a new block unless they fall between the sink
        # blocks and the window (those become null blocks).
        first_window = max(self.num_sink_blocks, num_skipped_blocks)
        num_new_blocks = (max(0, min(num_required_blocks, self.num_sink_blocks) - have)
                          + max(0, num_required_blocks - max(have, first_window)))
        # Kept cache hits that sit in the free queue (ref_cnt 0) leave it when touched, so
        # they use free capacity too (as in vLLM).
        num_evictable = self._get_num_evictable_blocks(
            [b for k, b in enumerate(new_computed_blocks) if self._is_kept(num_req_blocks + k, num_skipped_blocks)])
        return num_new_blocks + num_evictable

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int, num_external_computed_tokens: int) -> None:
        """Take a prefix-cache hit: keep (touch) its sink and window blocks, null the rest."""
        if num_external_computed_tokens:
            raise NotImplementedError("ConSA sink pools do not support KV connectors (external KV loads)")
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0  # first allocation of this request (see vLLM's coordinator)
        # Sliding-window hits are whole blocks (find_longest_cache_hit asserts the alignment).
        assert num_local_computed_tokens % self.block_size == 0
        num_skipped_blocks = self.get_num_skipped_tokens(num_local_computed_tokens) // self.block_size
        kept = [self._is_kept(j, num_skipped_blocks) for j in range(len(new_computed_blocks))]
        touched = [b for b, k in zip(new_computed_blocks, kept) if k and not b.is_null]
        if self.enable_caching:
            self.block_pool.touch(touched)
        else:
            assert not touched, "Computed blocks should be empty when prefix caching is disabled"
        req_blocks.extend(b if k else self._null_block for b, k in zip(new_computed_blocks, kept))
        # Every hit block is already cached: cache_blocks() must not cache them again.
        self.num_cached_block[request_id] = len(req_blocks)

    def allocate_external_computed_blocks(self, request_id: str, num_local_computed_tokens: int,
                                          num_external_computed_tokens: int) -> None:
        if num_external_computed_tokens:
            raise NotImplementedError("ConSA sink pools do not support KV connectors (external KV loads)")

    # ---------------------------------------------------- prefix caching
    @classmethod
    def find_longest_cache_hit(cls, block_hashes: BlockHashList, max_length: int, kv_cache_group_ids: list[int],
                               block_pool: BlockPool, kv_cache_spec: KVCacheSpec, drop_eagle_block: bool,
                               alignment_tokens: int, dcp_world_size: int = 1,
                               pcp_world_size: int = 1) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The longest prefix whose sink blocks and window blocks are all cached.

        vLLM's sliding-window search gives the longest hit whose window blocks are cached
        (nulls before them). Every sink-window hit is such a hit, so if the sink blocks in
        front of that one are cached too it is the answer, with the sinks put in place of
        the nulls. Otherwise no hit can reach past the first missing sink block, and every
        shorter prefix of cached sink blocks is a hit (its blocks are all cached): the
        answer is that prefix, aligned as vLLM aligns a hit that starts at block 0.
        """
        assert isinstance(kv_cache_spec, SinkSlidingWindowSpec)
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size)
        block_size = kv_cache_spec.block_size
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, block_size,
                                      supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
                                      alignment_tokens=alignment_tokens)
        num_hit_blocks = len(computed[0])
        need = min(kv_cache_spec.num_sink_blocks, num_hit_blocks)
        sinks: list[list[KVCacheBlock]] = []  # sinks[j][g]: block j of group g
        for j in range(need):
            if computed[0][j].is_null:
                cached = block_pool.get_cached_block(hashes[j], kv_cache_group_ids)
                if cached is None:
                    break
            else:  # vLLM's search already matched it (a hit that reaches back to block 0)
                cached = [blocks[j] for blocks in computed]
            sinks.append(cached)
        if len(sinks) == need:
            for j, cached in enumerate(sinks):
                for blocks, block in zip(computed, cached):
                    blocks[j] = block
            return computed, hit_length

        # A sink block is missing: the hit is the cached sink prefix.
        per_alignment = alignment_tokens // block_size
        n = len(sinks) // per_alignment * per_alignment
        if drop_eagle_block and n > 0:
            # As vLLM's search: the last matched block is dropped, then the rest realigned.
            n = (n - 1) // per_alignment * per_alignment
        prefix = tuple([sinks[j][g] for j in range(n)] for g in range(len(kv_cache_group_ids)))
        return prefix, n * block_size

    @classmethod
    def reachable_block_mask(cls, start_block: int, end_block: int, alignment_tokens: int | None,
                             kv_cache_spec: KVCacheSpec, use_eagle: bool, retention_interval: int | None = None,
                             reachable_boundaries: Sequence[int] = ()) -> list[bool] | None:
        """vLLM's mask of blocks worth caching, plus the sink blocks (every hit needs them)."""
        assert isinstance(kv_cache_spec, SinkSlidingWindowSpec)
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                                            retention_interval, reachable_boundaries)
        if mask is None:  # every block is cached
            return None
        for i in range(start_block, min(end_block, kv_cache_spec.num_sink_blocks)):
            mask[i - start_block] = True
        return mask


def register_sink_kv_cache_spec() -> None:
    """Map :class:`SinkSlidingWindowSpec` to :class:`SinkSlidingWindowManager` in vLLM (idempotent).

    vLLM registers its built-in specs lazily, on the first registry lookup, and only while
    the registry is still empty; registering ours first would leave the built-ins out.
    An empty check triggers vLLM's own built-in registration first.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    # Its own uniform base type: sink layers never share a KV-cache group with plain
    # sliding-window layers, whose manager would free the sinks.
    KVCacheSpecRegistry.register(SinkSlidingWindowSpec, SinkSlidingWindowManager,
                                 uniform_type_base_spec=SinkSlidingWindowSpec)
