"""The ``consa_endpoint`` vLLM endpoint plugin: ``/v1/consa/allocation`` and F/S KV-block metrics.

- :mod:`consa_vllm.endpoint.routes`: the FastAPI routes and Prometheus collector, loaded
  by vLLM's API server from the ``vllm.endpoint_plugins`` entry point ``consa_endpoint``
  (only when ``VLLM_PLUGINS`` names it; ``consa-vllm serve`` does that by default).
- :mod:`consa_vllm.endpoint.engine`: the engine-core utility that counts the blocks each
  KV pool holds, installed by the ``consa`` general plugin.
- :mod:`consa_vllm.endpoint.schema`: the pydantic models of the JSON responses.

This package imports nothing heavy at module level: the general plugin imports
:mod:`.engine` in every vLLM process.
"""

#: Entry-point name in group ``vllm.endpoint_plugins`` (what ``VLLM_PLUGINS`` must list).
ENDPOINT_PLUGIN_NAME = "consa_endpoint"
#: Route of the allocation JSON.
ALLOCATION_PATH = "/v1/consa/allocation"
#: Route of the consa metrics alone, in Prometheus text format (also on vLLM's /metrics).
METRICS_PATH = "/v1/consa/metrics"
