"""GPU serving benchmark: dense vs layer-wise vs ConSA kv_head-wise, through vLLM.

Model shapes (``--shape``; random weights, ``load_format="dummy"``):

- ``qwen3-0.6b``: Qwen3-0.6B attention shape as a Llama (28 layers, 16 query / 8 KV
  heads, head_dim 128), the default;
- ``qwen3-30b-a3b``: Qwen3-30B-A3B (Qwen3-MoE: 48 layers, 32 query / 4 KV heads,
  head_dim 128, 128 experts, top-8);
- ``llama3.1-8b``: Llama-3.1-8B (32 layers, 32 query / 8 KV heads, head_dim 128).

Models (``--models``, comma list): ``dense``; ``layerR`` stock vLLM with the bottom R of
the layers sliding (``layer0.75``); ``kvR`` kv_head with the same number of S heads in
every layer; ``kvrandR`` a seeded random (uneven) kv_head allocation; ``allocR`` the
allocation file ``--allocation`` (e.g. an imported DuoAttention pattern; R is only a
label). For each model, in a fresh process:

- throughput: N requests of P prompt tokens + O generated tokens (``ignore_eos``);
- batch 1: a long prompt, time to first token and decode time per token (best of 2);
- engine start-up time (torch.compile + CUDA graphs included) and where it went, parsed
  from vLLM's log (weights, torch.compile, CUDA-graph capture).

Usage (on the GPU machine)::

    python benchmarks/bench_serving.py --out results.json               # all models
    python benchmarks/bench_serving.py --shape qwen3-30b-a3b --models dense,layer0.75,kv0.75 --out r.json
    python benchmarks/bench_serving.py --kv-cache-dtype fp8 --out results_fp8.json   # FP8 KV cache

Writes one JSON with the device name, the settings and one record per model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
}
KINDS = {"dense": "dense", "layer": "layer_stock", "kvrand": "kv_random", "kv": "kv_head", "alloc": "file"}


def parse_model(name: str) -> tuple[str, float]:
    """``kvrand0.75`` -> (``kv_random``, 0.75); ``dense`` -> (``dense``, 0.0)."""
    if name == "dense":
        return "dense", 0.0
    for prefix in ("kvrand", "layer", "alloc", "kv"):  # longest prefixes first
        if name.startswith(prefix):
            try:
                return KINDS[prefix], float(name[len(prefix):])
            except ValueError:
                break
    raise ValueError(f"model {name!r}: expected dense, layerR, kvR, kvrandR or allocR (R a sparsity)")


def make_model_dir(root: Path, name: str, args: argparse.Namespace) -> Path:
    """A config-only model directory (weights are dummy)."""
    from consa_vllm.allocation import Allocation, make_allocation
    from consa_vllm.export import exported_config

    kind, rho = parse_model(name)
    shape = SHAPES[args.shape]
    cfg = dict(shape)
    L, H, window = shape["num_hidden_layers"], shape["num_key_value_heads"], args.window
    if kind == "layer_stock" and shape["model_type"] != "llama":
        # vLLM's Qwen3-MoE has no per-layer windows of its own: the ConSA layer allocation
        # gives the same thing, vLLM's stock Attention with a per-layer sliding window.
        cfg = exported_config(cfg, make_allocation("bottom", rho, L, H, window, "layer"))
    elif kind == "layer_stock":
        alloc = make_allocation("bottom", rho, L, H, window, "layer")
        cfg["layer_types"] = ["sliding_attention" if r[0] == "S" else "full_attention" for r in alloc.pattern]
        cfg["sliding_window"] = window
    elif kind != "dense":
        if kind == "kv_head":
            alloc = make_allocation("uniform", rho, L, H, window, "kv_head", seed=0)
        elif kind == "kv_random":
            alloc = make_allocation("random", rho, L, H, window, "kv_head", seed=0)
        else:
            alloc = Allocation.load(args.allocation)
        if args.sink is not None:
            alloc = alloc.with_extra(sink=args.sink)
        cfg = exported_config(cfg, alloc)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def run_one(model_dir: str, args: argparse.Namespace) -> dict:
    """Measure one model in this process."""
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max(args.prompt + args.output, args.b1_prompt + args.b1_output),
              gpu_memory_utilization=args.gpu_mem, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=False, seed=0, kv_cache_dtype=args.kv_cache_dtype,
              **({"quantization": args.quantization} if args.quantization else {}))
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=rng.integers(100, vocab - 100, length).tolist()) for _ in range(n)]

    rec = {"startup_s": startup}
    kv = llm.llm_engine.vllm_config.cache_config
    rec["num_gpu_blocks"] = kv.num_gpu_blocks
    # warm-up
    llm.generate(prompts(2, 1024), SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    if args.requests:
        ps = prompts(args.requests, args.prompt)
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(max_tokens=args.output, ignore_eos=True, temperature=0), use_tqdm=False)
        el = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rec.update(generate_s=el, output_tokens=n_out, output_tok_per_s=n_out / el)
    if args.b1_prompt:
        best_pf, best_dec = float("inf"), float("inf")
        for _ in range(2):
            p = prompts(1, args.b1_prompt)
            t = time.perf_counter()
            llm.generate(p, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
            pf = time.perf_counter() - t
            p = prompts(1, args.b1_prompt)
            t = time.perf_counter()
            llm.generate(p, SamplingParams(max_tokens=args.b1_output, ignore_eos=True), use_tqdm=False)
            full = time.perf_counter() - t
            best_pf = min(best_pf, pf)
            best_dec = min(best_dec, (full - pf) / (args.b1_output - 1))
        rec.update(b1_prefill_s=best_pf, b1_decode_ms_per_token=best_dec * 1e3)
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    ap.add_argument("--models", default="dense,layer0.5,layer0.75,kv0.5,kv0.75",
                    help="comma list: dense, layerR, kvR, kvrandR, allocR (see above)")
    ap.add_argument("--allocation", help="allocation file for the allocR models")
    ap.add_argument("--sink", type=int, default=None, help="sink tokens for every kv_head model")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (vLLM online quantization)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--b1-prompt", type=int, default=32768)
    ap.add_argument("--b1-output", type=int, default=256)
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)), flush=True)
        return

    names = [m for m in args.models.split(",") if m]
    for m in names:
        try:
            kind, _ = parse_model(m)
        except ValueError as e:
            ap.error(f"--models: {e}")
        if kind == "file" and not args.allocation:
            ap.error(f"--models: {m} needs --allocation FILE")
    import torch

    results = {"device": torch.cuda.get_device_name(0), "vllm": __import__("vllm").__version__,
               "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
               "shape": SHAPES[args.shape], "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = make_model_dir(Path(tmp), name, args)
            cmd = [sys.executable, __file__, "--child", str(d), "--out", "-"] + _strip_out(argv if argv is not None else sys.argv[1:])
            print(f"== {name}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                results["models"][name] = {"error": (proc.stderr or proc.stdout)[-3000:]}
                print(proc.stderr[-3000:], flush=True)
            else:
                results["models"][name] = {**json.loads(line[len("RESULT "):]), **startup_breakdown(proc.stdout + proc.stderr)}
                print(results["models"][name], flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    dense = results["models"].get("dense", {})
    for rec in results["models"].values():
        if "generate_s" in rec and "generate_s" in dense:
            rec["throughput_vs_dense"] = dense["generate_s"] / rec["generate_s"]
        if "b1_decode_ms_per_token" in rec and "b1_decode_ms_per_token" in dense:
            rec["b1_decode_speedup_vs_dense"] = dense["b1_decode_ms_per_token"] / rec["b1_decode_ms_per_token"]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["models"], indent=1))


_STARTUP_LOG = {
    "weights_s": r"Loading weights took ([0-9.]+) seconds",
    "model_load_s": r"Model loading took [0-9.]+ GiB(?: memory)? and ([0-9.]+) seconds",
    "torch_compile_s": r"torch.compile took ([0-9.]+) s in total",
    "cudagraph_capture_s": r"Graph capturing finished in ([0-9.]+) secs",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s",
}


def startup_breakdown(log: str) -> dict:
    """Where engine start-up went, from vLLM's own log lines (absent lines are left out)."""
    import re

    out = {}
    for key, pattern in _STARTUP_LOG.items():
        m = re.findall(pattern, log)
        if m:
            out[key] = float(m[-1])
    return out


def _strip_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out=") or a.startswith("--models"):
            if a == "--models":
                skip = True
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
