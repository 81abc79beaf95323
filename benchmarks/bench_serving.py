"""GPU serving benchmark: dense vs layer-wise vs ConSA kv_head-wise, through vLLM.

Qwen3-0.6B attention shape (Llama architecture, 28 layers, 16 query heads, 8 KV heads,
head_dim 128), random weights (``load_format="dummy"``), window 4096. For each model, in
a fresh process:

- throughput: N requests of P prompt tokens + O generated tokens (``ignore_eos``);
- batch 1: a long prompt, time to first token and decode time per token (best of 2);
- engine start-up time (torch.compile + CUDA graphs included).

Usage (on the GPU machine)::

    python benchmarks/bench_serving.py --out results.json               # all models
    python benchmarks/bench_serving.py --models dense,kv0.75 --out r.json
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

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
             torch_dtype="bfloat16", model_type="llama", bos_token_id=0, eos_token_id=1)

# name -> (kind, sparsity); layer-wise models put S in the bottom layers (Qwen
# max_window_layers style), kv_head models put the same number of S heads in every layer.
MODELS = {
    "dense": ("dense", 0.0),
    "layer0.5": ("layer_stock", 0.5),
    "layer0.75": ("layer_stock", 0.75),
    "kv0.5": ("kv_head", 0.5),
    "kv0.75": ("kv_head", 0.75),
}


def make_model_dir(root: Path, name: str, window: int) -> Path:
    """A config-only model directory (weights are dummy)."""
    from consa_vllm.allocation import make_allocation

    kind, rho = MODELS[name]
    cfg = dict(SHAPE, architectures=["LlamaForCausalLM"])
    L, H = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"]
    if kind == "layer_stock":
        alloc = make_allocation("bottom", rho, L, H, window, "layer")
        cfg["layer_types"] = ["sliding_attention" if r[0] == "S" else "full_attention" for r in alloc.pattern]
        cfg["sliding_window"] = window
    elif kind == "kv_head":
        alloc = make_allocation("uniform", rho, L, H, window, "kv_head", seed=0)
        cfg["architectures"] = ["ConsaLlamaForCausalLM"]
        cfg["consa"] = alloc.to_dict()
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
              kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=False, seed=0)
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = SHAPE["vocab_size"]

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
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {list(MODELS)}")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--b1-prompt", type=int, default=32768)
    ap.add_argument("--b1-output", type=int, default=256)
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype for every model (e.g. fp8)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)), flush=True)
        return

    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    import torch

    results = {"device": torch.cuda.get_device_name(0), "vllm": __import__("vllm").__version__,
               "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
               "shape": SHAPE, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = make_model_dir(Path(tmp), name, args.window)
            cmd = [sys.executable, __file__, "--child", str(d), "--out", "-"] + _strip_out(argv if argv is not None else sys.argv[1:])
            print(f"== {name}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                results["models"][name] = {"error": (proc.stderr or proc.stdout)[-3000:]}
                print(proc.stderr[-3000:], flush=True)
            else:
                results["models"][name] = json.loads(line[len("RESULT "):])
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
