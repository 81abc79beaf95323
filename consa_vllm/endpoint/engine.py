"""Engine-core side of the ``/v1/consa/*`` endpoint: the KV blocks each pool holds.

The F and S block counts live in the scheduler's KV-cache manager, inside the engine-core
process; the API server is a separate process. vLLM's documented way across is an
engine-core *utility call* (the same channel vLLM's own ``get_supported_tasks`` or
``reset_prefix_cache`` use): the client sends ``(method name, args)`` and the engine core
runs ``getattr(EngineCore, name)(...)`` between two scheduler steps, so the counts are read
consistently, never in the middle of a step. vLLM's endpoint-plugin contract
(``vllm/plugins/endpoint_plugins/interface.py``) says a route that needs engine-side
behaviour pairs with a general plugin that installs it: :func:`install` is called by the
``consa`` general plugin (:func:`consa_vllm.plugin.register`) in every process, and adds
one read-only method to ``EngineCore`` (and a second, ``consa_kv_capacity``, for the serving benchmark).
"""

from __future__ import annotations

from typing import Any

#: Name of the engine-core utility method (``EngineCore.<name>()``).
UTILITY_METHOD = "consa_kv_blocks"

#: Name of the engine-core utility that reports the KV capacity (benchmarks/bench_serving.py).
CAPACITY_METHOD = "consa_kv_capacity"

#: Pool label of each KV-cache spec kind (Prometheus label ``pool``).
FULL, SLIDING, OTHER = "full", "sliding", "other"


def _pool_of(spec: Any) -> str:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    # SlidingWindowSpec is checked first: it must never be counted as full attention.
    if isinstance(spec, SlidingWindowSpec):
        return SLIDING
    if isinstance(spec, FullAttentionSpec):
        return FULL
    return OTHER


def kv_blocks(scheduler: Any) -> dict[str, Any]:
    """KV blocks in use per KV-cache group of ``scheduler`` (a vLLM v1 ``Scheduler``).

    A block is *in use* while some live request references it. Blocks that a finished
    request left behind for prefix caching are free (evictable) and not counted, and a
    block shared by several requests (prefix cache hit) is counted once. Sliding-window
    blocks that fell out of the window were already released by vLLM (replaced by the null
    block), so they are not counted either. Returns only ints, strings and lists, which
    vLLM's msgpack channel carries as they are.
    """
    kvm = scheduler.kv_cache_manager
    groups = scheduler.kv_cache_config.kv_cache_groups
    managers = kvm.coordinator.single_type_managers
    out = []
    for i, (group, manager) in enumerate(zip(groups, managers)):
        ids = {b.block_id for blocks in manager.req_to_blocks.values() for b in blocks if not b.is_null}
        spec = group.kv_cache_spec
        out.append({
            "group": i,
            "pool": _pool_of(spec),
            "spec": type(spec).__name__,
            "block_size": int(spec.block_size),
            "sliding_window": getattr(spec, "sliding_window", None),
            "num_layers": len(group.layer_names),
            "blocks_in_use": len(ids),
            # Bytes of one block of one layer, in the cache dtype (FP8: 1 byte a value).
            "page_bytes": int(spec.page_size_bytes),
        })
    pool = kvm.block_pool
    return {
        # Usable blocks of the one block pool that all groups share (vLLM reserves block 0
        # as the null block).
        "num_blocks": int(pool.num_gpu_blocks) - 1,
        "free_blocks": int(pool.get_num_free_blocks()),
        "num_requests": len(scheduler.requests),
        "groups": out,
    }


def kv_capacity(scheduler: Any, tokens: int) -> dict[str, Any]:
    """:func:`kv_blocks`, plus vLLM's own maximum concurrency for requests of ``tokens`` tokens.

    vLLM logs "Maximum concurrency for <max_model_len> tokens per request" at start-up with
    ``get_max_concurrency_for_kv_cache_config``, which reads the request length from
    ``model_config.max_model_len``; this calls the same function with ``max_model_len`` set to
    ``tokens`` for the call (as vLLM's own ``estimate_max_model_len`` does), between two
    scheduler steps, and restores it. ``request_tokens``: the computed tokens of each live
    request, so that a caller can relate ``blocks_in_use`` to a context length. The scheduler's
    queue at that moment: ``num_running`` and ``num_waiting`` (vLLM's own request counts),
    ``running_past_prompt`` (for each running request, its computed tokens less its prompt's:
    negative while in prefill) and ``num_preempted_requests`` (live requests preempted at
    least once).
    """
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    model_config = scheduler.vllm_config.model_config
    saved = model_config.max_model_len
    model_config.max_model_len = int(tokens)
    try:
        concurrency = get_max_concurrency_for_kv_cache_config(scheduler.vllm_config, scheduler.kv_cache_config)
    finally:
        model_config.max_model_len = saved
    running, waiting = scheduler.get_request_counts()
    return {**kv_blocks(scheduler), "tokens": int(tokens), "max_concurrency": float(concurrency),
            "kv_cache_config_num_blocks": int(scheduler.kv_cache_config.num_blocks),
            "request_tokens": sorted(int(r.num_computed_tokens) for r in scheduler.requests.values()),
            "num_running": int(running), "num_waiting": int(waiting),
            "running_past_prompt": [int(r.num_computed_tokens - r.num_prompt_tokens) for r in scheduler.running],
            "num_preempted_requests": sum(1 for r in scheduler.requests.values() if r.num_preemptions)}


def _engine_core_kv_capacity(self, tokens: int) -> dict[str, Any]:
    """``EngineCore.consa_kv_capacity(tokens)``: see :func:`consa_vllm.endpoint.engine.kv_capacity`."""
    return kv_capacity(self.scheduler, tokens)


def _engine_core_kv_blocks(self) -> dict[str, Any]:
    """``EngineCore.consa_kv_blocks()``: see :func:`consa_vllm.endpoint.engine.kv_blocks`."""
    return kv_blocks(self.scheduler)


def install() -> None:
    """Add the read-only ``EngineCore.consa_kv_blocks`` and ``consa_kv_capacity`` utilities (idempotent, cheap)."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, UTILITY_METHOD, None) is not _engine_core_kv_blocks:
        setattr(EngineCore, UTILITY_METHOD, _engine_core_kv_blocks)
    if getattr(EngineCore, CAPACITY_METHOD, None) is not _engine_core_kv_capacity:
        setattr(EngineCore, CAPACITY_METHOD, _engine_core_kv_capacity)
