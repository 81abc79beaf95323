"""The plugin's refusals of vLLM features it cannot serve (consa_vllm/plugin/config.py).

Each runs vLLM's own config building (``EngineArgs.create_engine_config``, as under ``vllm
serve``) in this process: no engine starts. The model-build check of the hybrid KV-cache
manager and the F pool's window guard are tested on their functions directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from consa_vllm.allocation import Allocation, AllocationError

pytest.importorskip("vllm")

WINDOW = 24
MOVES = ["SFSS", "SSSS", "FFSS", "FFFF"]  # layer 0's F head moves first at tp=1
IN_ORDER = ["FSSS", "SSSS", "FFSS", "FFFF"]  # every layer already lists its F heads first
LAYER = ["SSSS", "FFFF", "SSSS", "FFFF"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    from engine_harness import TINY

    from consa_vllm.export import export_model

    root = tmp_path_factory.mktemp("plugin-config")
    out = {}
    for family in ("qwen3", "llama"):
        src = tiny_model(family, **TINY)
        for name, pattern, granularity in (("moves", MOVES, "kv_head"), ("in_order", IN_ORDER, "kv_head"),
                                           ("layer", LAYER, "layer"), ("all_s", ["SSSS"] * 4, "kv_head")):
            out[f"{family}-{name}"] = export_model(
                src, Allocation(granularity=granularity, window=WINDOW, pattern=pattern),
                root / f"{family}-{name}", force=True)
    return out


def engine_config(model: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), max_model_len=256, dtype="float32", enforce_eager=True,
                      **kwargs).create_engine_config()


def variant(model: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / model.name
    shutil.copytree(model, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_lora_refused_only_where_heads_move(models):
    with pytest.raises(ValueError, match=r"LoRA adapters \(--enable-lora\) cannot be served with this kv_head "
                                         r"allocation: the loader reorders the KV heads of 1 of 4 layers"):
        engine_config(models["qwen3-moves"], enable_lora=True)
    # Nothing moves: vLLM's LoRA applies to the heads the checkpoint stores.
    assert engine_config(models["qwen3-in_order"], enable_lora=True).lora_config is not None
    assert engine_config(models["qwen3-layer"], enable_lora=True).lora_config is not None


def test_pipeline_parallelism_refused(models):
    for name in ("qwen3-moves", "qwen3-layer"):
        with pytest.raises(ValueError, match=r"ConSA models cannot be served with pipeline parallelism "
                                             r"\(--pipeline-parallel-size 2\); use --tensor-parallel-size"):
            engine_config(models[name], pipeline_parallel_size=2)


def test_global_sliding_window_refused(models, tmp_path):
    """What vLLM gives a module built without a window (cache_config.sliding_window) is checked,
    not the raw field: Qwen3's config ignores a window unless use_sliding_window is on."""
    live = variant(models["qwen3-moves"], tmp_path / "live", lambda c: c.update(sliding_window=16,
                                                                                 use_sliding_window=True))
    with pytest.raises(ValueError, match=r"config.json: field 'sliding_window' is 16: vLLM would apply this "
                                         r"window to every attention module, the F heads included"):
        engine_config(live)
    off = variant(models["qwen3-moves"], tmp_path / "off", lambda c: c.update(sliding_window=16))
    assert engine_config(off).cache_config.sliding_window is None


def test_sliding_layer_types_refused(models, tmp_path):
    types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    sliding = variant(models["llama-layer"], tmp_path / "sliding",
                      lambda c: c.update(layer_types=types, sliding_window=16))
    with pytest.raises(ValueError, match=r"field 'layer_types' marks layers \[1\] as 'sliding_attention' with "
                                         r"'sliding_window' 16"):
        engine_config(sliding)
    # Without a window nothing slides.
    assert engine_config(variant(models["llama-layer"], tmp_path / "no-window",
                                 lambda c: c.update(layer_types=types))) is not None


def test_dual_chunk_attention_refused(models, tmp_path):
    dca = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 2048}
    d = variant(models["qwen3-layer"], tmp_path, lambda c: c.update(dual_chunk_attention_config=dca))
    with pytest.raises(ValueError, match=r"field 'dual_chunk_attention_config' is set, but ConSA attention does "
                                         r"not implement dual-chunk attention"):
        engine_config(d)


def test_kv_cache_dtype_skip_layers_refused_with_pools(models):
    with pytest.raises(ValueError, match=r"--kv-cache-dtype-skip-layers 0,sliding_window cannot be used with "
                                         r"this allocation: its KV heads live in two KV pools"):
        engine_config(models["qwen3-moves"], kv_cache_dtype_skip_layers=["0", "sliding_window"])
    # Stock modules (a layer allocation with F layers) handle the option themselves.
    assert engine_config(models["qwen3-layer"], kv_cache_dtype_skip_layers=["0"]) is not None


def test_hybrid_kv_cache_manager_required_for_two_pools(models):
    with pytest.raises(ValueError, match=r"vLLM's hybrid KV-cache manager is off \(--disable-hybrid-kv-cache-"
                                         r"manager, or a KV connector without hybrid support"):
        engine_config(models["qwen3-moves"], disable_hybrid_kv_cache_manager=True)
    # One pool (one KV-cache spec), or stock modules: nothing for vLLM to unify.
    assert engine_config(models["qwen3-all_s"], disable_hybrid_kv_cache_manager=True) is not None
    assert engine_config(models["qwen3-layer"], disable_hybrid_kv_cache_manager=True) is not None


def test_hybrid_kv_cache_manager_checked_again_at_model_build():
    """A KV connector without hybrid support turns the manager off after the config hooks ran:
    the model build sees the final flag."""
    from consa_vllm.plugin.config import check_hybrid_kv_cache_manager

    def config(off):
        return SimpleNamespace(scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=off),
                               model_config=SimpleNamespace(model="m"))

    mixed = Allocation(granularity="kv_head", window=WINDOW, pattern=MOVES)
    with pytest.raises(AllocationError, match=r"^m: vLLM's hybrid KV-cache manager is off"):
        check_hybrid_kv_cache_manager(config(True), mixed)
    check_hybrid_kv_cache_manager(config(False), mixed)
    check_hybrid_kv_cache_manager(config(None), mixed)  # not settled yet (config hook): vLLM's default is on
    for pattern in (["SSSS"] * 4, ["FFFF"] * 4):
        check_hybrid_kv_cache_manager(config(True), Allocation(granularity="kv_head", window=WINDOW,
                                                                pattern=pattern))


def test_f_pool_refuses_a_window(models):
    """The F pool never reports a sliding-window spec, whatever vLLM would hand a module
    built without a window (the config check refuses such configs before this)."""
    from dataclasses import replace

    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from consa_vllm.plugin.attention import ConsaKVPool

    cfg = engine_config(models["qwen3-moves"])
    with set_current_vllm_config(cfg):
        ok = ConsaKVPool(32, 4, None, 16, 64, cfg.cache_config, "consa_kv.0.full")
        bad = ConsaKVPool(32, 4, None, 16, 64, replace(cfg.cache_config, sliding_window=16), "other.0.full")
    assert type(ok.get_kv_cache_spec(cfg)) is FullAttentionSpec
    with pytest.raises(ValueError, match=r"KV pool other.0.full has sliding window 16, expected None"):
        bad.get_kv_cache_spec(cfg)


def test_config_log_lines_go_through_vllms_logger():
    """vLLM's handler (on the "vllm" logger, at INFO) shows only loggers under it: a
    "consa_vllm" logger's INFO lines were dropped."""
    from consa_vllm.plugin import config

    assert config._logger().name == "vllm.consa_vllm.plugin.config"


def test_head_dim_follows_vllms_class():
    """Qwen2's vLLM class ignores a head_dim field; the others use it when set."""
    from consa_vllm import families

    hf = SimpleNamespace(hidden_size=128, num_attention_heads=8, head_dim=32)
    assert families.by_name("qwen2").head_dim(hf) == 16
    assert families.by_name("qwen3").head_dim(hf) == 32
    assert families.by_name("llama").head_dim(SimpleNamespace(hidden_size=128, num_attention_heads=8,
                                                              head_dim=None)) == 16
