"""The ``consa_endpoint`` plugin's parts that need no engine (seconds, no server).

The routes against a live server are in tests/test_load.py. Here: the plugin is
registered the way vLLM discovers it, the per-pool aggregation and the Prometheus text,
the engine-core utility is installed by the general plugin, and ``build_info`` on real
vLLM configurations (``EngineArgs.create_engine_config``, no engine started).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest

from consa_vllm.endpoint import ENDPOINT_PLUGIN_NAME


def _snapshot(groups):
    return {"num_blocks": 100, "free_blocks": 90, "num_requests": 2, "groups": groups}


def _group(i, pool, bs, used, layers=1, page_bytes=1000):
    spec = {"full": "FullAttentionSpec", "sliding": "SlidingWindowSpec"}[pool]
    return {"group": i, "pool": pool, "spec": spec, "block_size": bs, "sliding_window": 24 if pool == "sliding"
            else None, "num_layers": layers, "blocks_in_use": used, "page_bytes": page_bytes}


def test_entry_point_is_discoverable_and_loads():
    eps = [ep for ep in entry_points(group="vllm.endpoint_plugins") if ep.name == ENDPOINT_PLUGIN_NAME]
    assert len(eps) == 1, "reinstall the package: pip install --no-deps -e ."
    plugin = eps[0].load()()
    assert plugin.name == ENDPOINT_PLUGIN_NAME
    assert plugin.required_tasks == ("generate",)
    pytest.importorskip("vllm")
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(plugin, EndpointPlugin)


def test_pool_blocks_adds_up_groups_of_one_kind():
    from consa_vllm.endpoint.routes import pool_blocks

    # A layer allocation: vLLM may split the sliding layers into several equal groups.
    kv = pool_blocks(_snapshot([_group(0, "full", 32, 5, 2), _group(1, "sliding", 32, 2, 2),
                                _group(2, "sliding", 32, 3, 2)]))
    pools = {p.pool: p for p in kv.pools}
    assert (pools["full"].blocks_in_use, pools["full"].num_groups, pools["full"].num_layers) == (5, 1, 2)
    assert (pools["sliding"].blocks_in_use, pools["sliding"].num_groups, pools["sliding"].num_layers) == (5, 2, 4)
    # each layer keeps its own page of a block: 5 blocks x 1000 bytes x 2 layers
    assert (pools["full"].bytes_in_use, pools["sliding"].bytes_in_use) == (10000, 10000)
    assert (kv.num_blocks, kv.free_blocks, kv.num_requests) == (100, 90, 2)


def test_prometheus_text_reports_both_pools_even_when_one_is_absent():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from consa_vllm.endpoint.routes import ConsaCollector, pool_blocks

    c = ConsaCollector()
    c.model_name = "m"
    reg = CollectorRegistry()
    reg.register(c)
    assert b"consa_kv_blocks_in_use{" not in generate_latest(reg)  # nothing known yet: no numbers
    c.blocks = pool_blocks(_snapshot([_group(0, "sliding", 64, 7, page_bytes=4096)]))  # an all-S model
    samples = {(s.name, s.labels.get("pool")): s.value
               for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert samples == {("consa_kv_blocks_in_use", "full"): 0, ("consa_kv_blocks_in_use", "sliding"): 7,
                       ("consa_kv_block_size_tokens", "sliding"): 64,
                       ("consa_kv_bytes_in_use", "full"): 0, ("consa_kv_bytes_in_use", "sliding"): 7 * 4096,
                       ("consa_kv_blocks_total", None): 100, ("consa_kv_blocks_free", None): 90}


def test_general_plugin_installs_the_engine_core_utility():
    pytest.importorskip("vllm")
    from vllm.v1.engine.core import EngineCore

    from consa_vllm.endpoint.engine import UTILITY_METHOD
    from consa_vllm.plugin import register

    register()
    register()  # idempotent
    assert callable(getattr(EngineCore, UTILITY_METHOD))


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_model):
    """Real vLLM configurations of a ConSA checkpoint and of its dense source."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.engine.arg_utils import EngineArgs

    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    dst = tmp_path_factory.mktemp("endpoint") / "tiny-consa"
    src = tiny_model("qwen3", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32)
    alloc = Allocation(granularity="kv_head", window=16, pattern=["FS", "SS"])
    export_model(src, alloc, dst, force=True)
    mk = lambda d: EngineArgs(model=str(d), max_model_len=256, dtype="float32",  # noqa: E731
                              enforce_eager=True).create_engine_config()
    return {"consa": mk(dst), "dense": mk(src), "alloc": alloc, "dir": dst, "src": src}


def test_build_info_without_engine_block_sizes_counts_tokens(configs):
    from consa_vllm.allocation import ModelShape, estimate_kv
    from consa_vllm.endpoint.routes import build_info

    info = build_info(configs["consa"], None)
    ref = estimate_kv(configs["alloc"], ModelShape.from_model_dir(configs["dir"]), 256, dtype="float32")
    assert info.kv_estimate.bytes_per_sequence == ref.bytes_per_sequence == 2 * 32 * 4 * (256 + 3 * 16)
    assert (info.kv_estimate.block_size_full, info.kv_estimate.block_size_sliding) == (None, None)
    assert (info.sparsity, info.full_heads_per_layer, info.max_model_len) == (0.75, [1, 0], 256)
    assert info.kv_blocks is None and info.target_sparsity is None


def test_build_info_refuses_a_model_without_allocation(configs):
    from consa_vllm.allocation import AllocationError
    from consa_vllm.endpoint.routes import build_info

    with pytest.raises(AllocationError, match=r"config\.json: field 'consa' is missing: not a ConSA checkpoint"):
        build_info(configs["dense"], None)
