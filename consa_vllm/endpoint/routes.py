"""The ``consa_endpoint`` vLLM endpoint plugin (entry-point group ``vllm.endpoint_plugins``).

Routes added to vLLM's OpenAI-compatible API server:

- ``GET /v1/consa/allocation``: the served allocation, its sparsity, per-layer F counts, the
  KV estimate at the served ``max_model_len`` (:func:`consa_vllm.allocation.estimate_kv`
  with the engine's real block sizes) and the KV blocks each pool holds now
  (:class:`consa_vllm.endpoint.schema.AllocationInfo`);
- ``GET /v1/consa/metrics``: the metrics below alone, in Prometheus text format.

Prometheus metrics, on vLLM's own ``/metrics`` (the same registry, whenever vLLM uses the
default one, i.e. one API server process) and always on ``/v1/consa/metrics``:

- ``consa_kv_blocks_in_use{pool="full"|"sliding",model_name}``: blocks live requests hold;
- ``consa_kv_block_size_tokens{pool,model_name}``: tokens per block of each pool;
- ``consa_kv_bytes_in_use{pool,model_name}``: the bytes of those blocks in the KV-cache dtype
  (``--kv-cache-dtype fp8``: one byte a value);
- ``consa_kv_blocks_total{model_name}`` / ``consa_kv_blocks_free{model_name}``: the one block
  pool both pools draw from (free includes evictable prefix-cache blocks).

The counts come from the engine-core process through a utility call
(:mod:`consa_vllm.endpoint.engine`), made when a scrape or a request arrives: a small ASGI
middleware refreshes them before ``/metrics`` answers, so a scrape is never stale and no
background task polls the engine. vLLM loads endpoint plugins only when ``VLLM_PLUGINS``
names them: ``VLLM_PLUGINS=consa,consa_endpoint`` (``consa-vllm serve`` sets this by default).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from consa_vllm.endpoint import ALLOCATION_PATH, ENDPOINT_PLUGIN_NAME, METRICS_PATH
from consa_vllm.endpoint.engine import UTILITY_METHOD
from consa_vllm.endpoint.schema import AllocationInfo, KVBlocks, KVEstimateInfo, PoolBlocks

logger = logging.getLogger("consa_vllm.endpoint")

#: Seconds a scrape waits for the engine core's answer (it answers between two steps).
REFRESH_TIMEOUT_S = 10.0
POOLS = ("full", "sliding")


def pool_blocks(snapshot: dict[str, Any]) -> KVBlocks:
    """Aggregate the engine's per-group counts (:func:`.engine.kv_blocks`) into per-pool ones."""
    pools: dict[str, PoolBlocks] = {}
    for g in snapshot["groups"]:
        p = pools.get(g["pool"])
        # Every layer of a group keeps its own page of each block it holds.
        nbytes = g["blocks_in_use"] * g["page_bytes"] * g["num_layers"]
        if p is None:
            pools[g["pool"]] = PoolBlocks(pool=g["pool"], block_size=g["block_size"],
                                          blocks_in_use=g["blocks_in_use"], num_groups=1,
                                          num_layers=g["num_layers"], bytes_in_use=nbytes)
        else:
            # vLLM may split one kind into several equal-size groups (layer allocations);
            # they draw from the same pool with the same page size, so they add up.
            p.blocks_in_use += g["blocks_in_use"]
            p.num_groups += 1
            p.num_layers += g["num_layers"]
            p.bytes_in_use += nbytes
    return KVBlocks(num_blocks=snapshot["num_blocks"], free_blocks=snapshot["free_blocks"],
                    num_requests=snapshot["num_requests"], pools=list(pools.values()))


def kv_dtype(vllm_config: Any) -> str:
    """The KV-cache element type: ``--kv-cache-dtype`` unless it is ``auto``, else the model dtype."""
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype != "auto":
        return cache_dtype
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


class ConsaCollector:
    """Prometheus collector that renders the latest :class:`KVBlocks` snapshot."""

    def __init__(self) -> None:
        self.blocks: KVBlocks | None = None
        self.model_name = ""

    def describe(self):
        # Names only, so a registry can check for duplicates without a snapshot.
        return list(self._families(None))

    def collect(self):
        return list(self._families(self.blocks))

    def _families(self, blocks: KVBlocks | None):
        from prometheus_client.core import GaugeMetricFamily

        in_use = GaugeMetricFamily("consa_kv_blocks_in_use",
                                   "KV-cache blocks held by live requests, per ConSA pool "
                                   "(full: F heads, sliding: S heads)", labels=["pool", "model_name"])
        size = GaugeMetricFamily("consa_kv_block_size_tokens", "Tokens per KV-cache block of each ConSA pool",
                                 labels=["pool", "model_name"])
        nbytes = GaugeMetricFamily("consa_kv_bytes_in_use",
                                   "KV-cache bytes of the blocks live requests hold, per ConSA pool, in the "
                                   "KV-cache dtype", labels=["pool", "model_name"])
        total = GaugeMetricFamily("consa_kv_blocks_total",
                                  "Usable blocks of the block pool shared by the full and sliding pools",
                                  labels=["model_name"])
        free = GaugeMetricFamily("consa_kv_blocks_free",
                                 "Free blocks of the shared block pool (evictable prefix-cache blocks included)",
                                 labels=["model_name"])
        if blocks is not None:
            by_pool = {p.pool: p for p in blocks.pools}
            for name in POOLS:  # both pools always present: an all-S model holds 0 F blocks
                p = by_pool.get(name)
                in_use.add_metric([name, self.model_name], p.blocks_in_use if p else 0)
                nbytes.add_metric([name, self.model_name], p.bytes_in_use if p else 0)
                if p:
                    size.add_metric([name, self.model_name], p.block_size)
            total.add_metric([self.model_name], blocks.num_blocks)
            free.add_metric([self.model_name], blocks.free_blocks)
        return in_use, size, nbytes, total, free


#: One collector per process: vLLM builds one app, but a registry refuses a second copy.
_COLLECTOR = ConsaCollector()
_REGISTERED: set[int] = set()


def _register(registry) -> None:
    if id(registry) not in _REGISTERED:
        registry.register(_COLLECTOR)
        _REGISTERED.add(id(registry))


class _RefreshBeforeScrape:
    """Pure ASGI middleware: refresh the block counts before a ``/metrics`` scrape is answered.

    (Pure ASGI rather than ``@app.middleware("http")``: that one wraps every response,
    streaming ones included, and would get in the way of client disconnects.)
    """

    def __init__(self, app, endpoint: "ConsaEndpoint") -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").rstrip("/").endswith("/metrics"):
            await self.endpoint.refresh()
        await self.app(scope, receive, send)


class ConsaEndpoint:
    """vLLM ``EndpointPlugin``: ``/v1/consa/allocation``, ``/v1/consa/metrics``, F/S block metrics."""

    name = ENDPOINT_PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client = None
        self.info: AllocationInfo | None = None
        self.error: str | None = "the engine is not ready"
        self._lock: asyncio.Lock | None = None
        self._own_registry = None
        self._last_error: str | None = None

    # ------------------------------------------------------------------ EndpointPlugin API
    def attach_router(self, app) -> None:
        """Add the routes and the scrape-refresh middleware (called once, while vLLM builds the app)."""
        from fastapi import APIRouter
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

        from vllm.v1.metrics.prometheus import get_prometheus_registry

        router = APIRouter()

        @router.get(ALLOCATION_PATH, response_model=AllocationInfo)
        async def consa_allocation():
            """The served ConSA allocation, its sparsity, KV estimate and blocks in use."""
            if self.info is None:
                code, kind = (404, "NotFoundError") if self.engine_client is not None else (503, "ServiceUnavailable")
                return JSONResponse(status_code=code, content={
                    "error": {"message": f"{ALLOCATION_PATH}: {self.error}", "type": kind, "code": code}})
            await self.refresh()
            return self.info.model_copy(update={"kv_blocks": _COLLECTOR.blocks})

        @router.get(METRICS_PATH)
        async def consa_metrics():
            """The consa_* Prometheus metrics alone (refreshed by the middleware)."""
            return Response(generate_latest(self._own_registry), media_type=CONTENT_TYPE_LATEST)

        app.include_router(router)
        app.add_middleware(_RefreshBeforeScrape, endpoint=self)
        self._own_registry = CollectorRegistry(auto_describe=False)
        _register(self._own_registry)
        # vLLM's /metrics serves get_prometheus_registry(): the default REGISTRY with one API
        # server; a fresh multiprocess registry with --api-server-count > 1, which custom
        # collectors cannot join. Then the figures are on /v1/consa/metrics only.
        if get_prometheus_registry() is REGISTRY:
            _register(REGISTRY)
        else:
            logger.warning("ConSA: vLLM serves /metrics from a multiprocess registry; the consa_kv_* "
                           "metrics are on %s only", METRICS_PATH)

    async def init_state(self, engine_client, state, args) -> None:
        """Read the served allocation and the engine's block sizes (called once, engine up)."""
        self.engine_client = engine_client
        self._lock = asyncio.Lock()
        if engine_client is None:
            self.error = "this server has no engine (render-only server)"
            return
        model_config = engine_client.model_config
        _COLLECTOR.model_name = model_config.served_model_name or model_config.model
        await self.refresh()
        try:
            self.info = build_info(engine_client.vllm_config, _COLLECTOR.blocks)
            self.error = None
        except Exception as e:  # not a ConSA checkpoint: the metrics still work
            self.error = " ".join(str(e).split())
            logger.warning("ConSA: %s will answer 404: %s", ALLOCATION_PATH, self.error)

    # ------------------------------------------------------------------ engine access
    async def refresh(self) -> None:
        """Ask the engine core for its block counts; on failure the metrics are left out."""
        if self.engine_client is None or self._lock is None:
            return
        async with self._lock:  # concurrent scrapes share one round trip
            try:
                snapshot = await asyncio.wait_for(
                    self.engine_client.engine_core.call_utility_async(UTILITY_METHOD), REFRESH_TIMEOUT_S)
                _COLLECTOR.blocks = pool_blocks(snapshot)
            except Exception as e:
                # Stale counts would mislead a leak alarm: report none instead.
                _COLLECTOR.blocks = None
                msg = f"{type(e).__name__}: {e}"
                if msg != self._last_error:  # once per distinct failure, not once per scrape
                    logger.warning("ConSA: could not read KV block counts from the engine core (%s); is the "
                                   "'consa' general plugin loaded (VLLM_PLUGINS)?", msg)
                self._last_error = msg
            else:
                self._last_error = None


def build_info(vllm_config: Any, blocks: KVBlocks | None) -> AllocationInfo:
    """The static part of the response: allocation, sparsity, KV estimate at ``max_model_len``.

    Raises :class:`consa_vllm.allocation.AllocationError` when the served model carries no
    (valid) allocation.
    """
    from consa_vllm.allocation import ModelShape, estimate_kv, summarize
    from consa_vllm.export import read_exported_allocation

    model_config = vllm_config.model_config
    alloc = read_exported_allocation(model_config.hf_config, source=f"{model_config.model}/config.json")
    shape = ModelShape.from_config(model_config.hf_config)
    sizes = {p.pool: p.block_size for p in blocks.pools} if blocks is not None else {}
    full_bs = sizes.get("full", sizes.get("sliding"))
    slide_bs = sizes.get("sliding", sizes.get("full"))
    dtype = kv_dtype(vllm_config)
    est = estimate_kv(alloc, shape, model_config.max_model_len, dtype=dtype, block_size=(full_bs, slide_bs))
    s = summarize(alloc)
    extra = alloc.model_extra or {}
    target = extra.get("target_sparsity")
    return AllocationInfo(
        model=_COLLECTOR.model_name or model_config.model,
        max_model_len=model_config.max_model_len,
        allocation=alloc.to_dict(),
        granularity=alloc.granularity,
        window=alloc.window,
        sparsity=alloc.sparsity,
        target_sparsity=float(target) if isinstance(target, (int, float)) else None,
        num_layers=alloc.num_layers,
        num_kv_heads=alloc.num_kv_heads,
        full_heads_per_layer=s["full_heads_per_layer"],
        full_kv_heads=s["full_kv_heads"],
        sliding_kv_heads=s["sliding_kv_heads"],
        kv_estimate=KVEstimateInfo(
            context=est.context, dtype=dtype, block_size_full=full_bs, block_size_sliding=slide_bs,
            bytes_per_sequence=est.bytes_per_sequence, dense_bytes_per_sequence=est.dense_bytes_per_sequence,
            ratio_to_dense=est.ratio_to_dense, capacity_gain=est.capacity_gain),
    )
