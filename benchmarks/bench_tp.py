"""Tensor-parallel serving of a kv_head allocation: TP=2 greedy == TP=1, and throughput.

The allocation is deliberately uneven: F heads sit at the low head indices of each layer
(so vLLM's natural split would put nearly all of them on rank 0) and their total is odd
(so the pools need one padding slot per rank). The plugin balances it across ranks at
load time (consa_vllm/plugin/layout.py); this script checks that it stays exact and
measures what TP buys. Every engine runs in a fresh process.

(a) Greedy equality. A real random-weight checkpoint (Qwen3, 8 layers, 16 query / 8 KV
    heads, head_dim 128; saved with ``consa_vllm.tiny.build_tiny_model``, dummy weights
    would not be loaded through the plugin's permutation) runs a fixed set of prompts,
    longer than the window, greedily at TP=1 and TP=2, in float32 (tokens must be equal)
    and bfloat16 (reported: TP changes the summation order of the all-reduces, so bf16
    near-ties may flip, as they do for stock vLLM).
(b) Throughput. A Qwen3-0.6B-shaped model (28 layers, dummy weights) with the same kind of
    uneven allocation: N requests x (prompt + output) tokens, ``ignore_eos``, at TP=1 and
    TP=2; optionally the dense stock model as a baseline (``--throughput-models consa,dense``).

Usage (on the 2-GPU machine)::

    python benchmarks/bench_tp.py --out tp.json                       # everything (~7 min on H200)
    python benchmarks/bench_tp.py --parts greedy --out tp_greedy.json
    python benchmarks/bench_tp.py --smoke --out /tmp/tp_smoke.json    # CPU, toy sizes (TP=2 needs 2 cores)

Writes one JSON (device, settings, allocation, results), rewritten after every engine.
Exits 1 if the float32 greedy tokens differ between TP sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GREEDY_SHAPE = dict(num_layers=8, num_attention_heads=16, num_kv_heads=8, head_dim=128, hidden_size=1024,
                    intermediate_size=3072, vocab_size=4096, max_position_embeddings=8192)
THROUGHPUT_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
                        torch_dtype="bfloat16", model_type="qwen3", bos_token_id=0, eos_token_id=1,
                        architectures=["Qwen3ForCausalLM"])
# Toy sizes for --smoke on CPU (head_dim 32 is a CPU_ATTN size).
SMOKE_GREEDY_SHAPE = dict(num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32, hidden_size=128,
                          intermediate_size=256, vocab_size=512, max_position_embeddings=2048)
SMOKE_THROUGHPUT_SHAPE = dict(THROUGHPUT_SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512,
                              max_position_embeddings=2048)


def uneven_pattern(num_layers: int, num_kv_heads: int, f_fraction: float = 0.25, seed: int = 0) -> list[str]:
    """A kv_head pattern whose F heads are the lowest head indices of each layer, with an odd F total.

    Per-layer F counts vary (0 .. H) around ``f_fraction * H``; contiguous low-index F heads
    are the worst case for vLLM's natural contiguous TP split.
    """
    rng = random.Random(seed)
    counts = [min(num_kv_heads, max(0, round(rng.gauss(f_fraction * num_kv_heads, num_kv_heads / 4))))
              for _ in range(num_layers)]
    if sum(counts) % 2 == 0:  # odd total: the pools need padding at TP=2
        i = next(i for i, c in enumerate(counts) if c < num_kv_heads)
        counts[i] += 1
    return ["F" * c + "S" * (num_kv_heads - c) for c in counts]


def build_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The real greedy checkpoint (exported with the allocation) and the config-only throughput models."""
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model, exported_config
    from consa_vllm.tiny import build_tiny_model

    g_shape = SMOKE_GREEDY_SHAPE if args.smoke else GREEDY_SHAPE
    t_shape = SMOKE_THROUGHPUT_SHAPE if args.smoke else THROUGHPUT_SHAPE
    dirs = {}
    if "greedy" in args.parts:
        src = build_tiny_model(root / "greedy-src", family="qwen3", seed=0, dtype="float32", tokenizer=False,
                               **g_shape)
        alloc = Allocation(granularity="kv_head", window=args.greedy_window,
                           pattern=uneven_pattern(g_shape["num_layers"], g_shape["num_kv_heads"], seed=1))
        dirs["greedy"] = export_model(src, alloc, root / "greedy-consa")
    if "throughput" in args.parts:
        alloc = Allocation(granularity="kv_head", window=args.window,
                           pattern=uneven_pattern(t_shape["num_hidden_layers"], t_shape["num_key_value_heads"],
                                                  seed=2))
        for name in args.throughput_models:
            cfg = dict(t_shape) if name == "dense" else exported_config(t_shape, alloc)
            d = root / f"throughput-{name}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps(cfg, indent=1))
            dirs[f"throughput-{name}"] = d
    return dirs


def run_child(spec: dict) -> dict:
    """One engine in this process: greedy tokens + top-5 logprobs, or a throughput run."""
    import numpy as np
    from vllm import LLM, SamplingParams, TokensPrompt

    greedy = spec["job"] == "greedy"
    kw = dict(model=spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"],
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"], seed=0,
              skip_tokenizer_init=True, enable_prefix_caching=False, enforce_eager=spec["eager"],
              disable_custom_all_reduce=spec.get("disable_custom_all_reduce", False))
    if not greedy:
        kw["load_format"] = "dummy"
    if spec["gpu_mem"] is not None:
        kw["gpu_memory_utilization"] = spec["gpu_mem"]
    t0 = time.perf_counter()
    llm = LLM(**kw)
    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    rec = {"device": machine_name(), "tp": spec["tp"], "dtype": spec["dtype"], "startup_s": time.perf_counter() - t0,
           "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}
    rng = np.random.default_rng(0)
    vocab = spec["vocab"]

    def prompts(n: int, length: int) -> list:
        return [TokensPrompt(prompt_token_ids=rng.integers(3, vocab - 3, length).tolist()) for _ in range(n)]

    if greedy:
        params = SamplingParams(max_tokens=spec["output"], temperature=0, logprobs=5, ignore_eos=True)
        ps = [TokensPrompt(prompt_token_ids=rng.integers(3, vocab - 3, n).tolist()) for n in spec["lengths"]]
        t = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        rec["generate_s"] = time.perf_counter() - t
        rec["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        rec["top_logprobs"] = [[{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]
                               for o in outs]
        return rec
    llm.generate(prompts(2, min(1024, spec["prompt"])), SamplingParams(max_tokens=16, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    ps = prompts(spec["requests"], spec["prompt"])
    t = time.perf_counter()
    outs = llm.generate(ps, SamplingParams(max_tokens=spec["output"], ignore_eos=True, temperature=0),
                        use_tqdm=False)
    el = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    rec.update(generate_s=el, output_tokens=n_out, output_tok_per_s=n_out / el,
               total_tok_per_s=(n_out + spec["requests"] * spec["prompt"]) / el)
    return rec


def compare_greedy(a: dict, b: dict) -> dict:
    """Token equality, first divergence per prompt, and the largest |logprob difference| before it."""
    gap, divergences = 0.0, []
    for i, (ta, tb, la, lb) in enumerate(zip(a["tokens"], b["tokens"], a["top_logprobs"], b["top_logprobs"])):
        for j, (x, y) in enumerate(zip(ta, tb)):
            common = set(la[j]) & set(lb[j])
            if common:
                gap = max(gap, max(abs(la[j][t] - lb[j][t]) for t in common))
            if x != y:
                # How close was TP=1's choice? A near-tie (tiny margin) flips under reordered sums.
                margin = la[j][str(x)] - la[j].get(str(y), float("-inf"))
                divergences.append({"prompt": i, "position": j, "tp1_margin_logprob": margin})
                break
    return {"tokens_equal": a["tokens"] == b["tokens"], "prompts": len(a["tokens"]),
            "divergences": divergences, "max_logprob_gap_before_divergence": gap}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--parts", default="greedy,throughput", help="comma list from greedy,throughput")
    ap.add_argument("--tp", default="1,2", help="tensor-parallel sizes, comma list (first is the reference)")
    ap.add_argument("--greedy-dtypes", default="float32,bfloat16", help="comma list of dtypes for the greedy check")
    ap.add_argument("--greedy-window", type=int, default=256, help="window of the greedy model (below prompt lengths)")
    ap.add_argument("--greedy-output", type=int, default=64, help="tokens generated per greedy prompt")
    ap.add_argument("--throughput-models", default="consa", help="comma list from consa,dense")
    ap.add_argument("--window", type=int, default=4096, help="window of the throughput model")
    ap.add_argument("--requests", type=int, default=128, help="requests of the throughput part (default: %(default)s)")
    ap.add_argument("--prompt", type=int, default=16384, help="prompt tokens per throughput request (default: %(default)s)")
    ap.add_argument("--output", type=int, default=512, help="output tokens per throughput request (default: %(default)s)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's max_num_seqs (default: %(default)s)")
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="gpu_memory_utilization (ignored on CPU)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--disable-custom-all-reduce", action="store_true",
                    help="vLLM's disable_custom_all_reduce: all-reduce through NCCL only")
    ap.add_argument("--engine-timeout", type=float, default=480.0,
                    help="seconds an engine (start + generation) may take before it is killed and recorded as failed")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: toy shapes, float32, few short requests")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    args.parts = [p for p in args.parts.split(",") if p]
    args.throughput_models = [m for m in args.throughput_models.split(",") if m]
    try:
        tps = [int(t) for t in args.tp.split(",") if t]
    except ValueError:
        ap.error(f"--tp: expected a comma list of integers, got {args.tp!r}")
    dtypes = [d for d in args.greedy_dtypes.split(",") if d]
    for flag, vals, ok in (("--parts", args.parts, {"greedy", "throughput"}),
                           ("--throughput-models", args.throughput_models, {"consa", "dense"}),
                           ("--greedy-dtypes", dtypes, {"float32", "bfloat16", "float16"})):
        bad = [v for v in vals if v not in ok]
        if bad or not vals:
            ap.error(f"{flag}: unknown or empty {bad or vals}; choose from {sorted(ok)}")
    if not tps or any(t < 1 for t in tps):
        ap.error(f"--tp: sizes must be >= 1, got {args.tp!r}")
    cpu = args.smoke
    if args.smoke:
        dtypes = ["float32"]
        args.requests, args.prompt, args.output, args.greedy_output = 4, 96, 8, 8
        args.greedy_window, args.window, args.max_num_seqs, args.eager = 24, 32, 8, True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if max(tps) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's automatic binding wants one NUMA node per CPU worker: split the cores instead.
            cpus, n = sorted(os.sched_getaffinity(0)), max(tps)
            if len(cpus) < n:
                ap.error(f"--tp {args.tp}: --smoke on CPU needs at least {n} cores, this process has {len(cpus)}")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                ",".join(map(str, cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n])) for i in range(n))

    from consa_vllm.export import read_exported_allocation
    from consa_vllm.plugin.layout import balance_summary

    results: dict = {"device": None, "vllm": None, "settings": {k: v for k, v in vars(args).items()
                                                                 if k not in ("child", "out")},
                     "tp_sizes": tps, "greedy": {}, "throughput": {}, "allocations": {}}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    def child(spec: dict, label: str) -> dict:
        print(f"== {label}", flush=True)
        t = time.perf_counter()
        # The engine's whole log goes to a file next to the JSON: when an engine hangs, its
        # last lines (and vLLM's workers', which inherit it) say where.
        log_path = out.with_name(f"{out.stem}.{label.replace(' ', '_').replace('=', '')}.log")
        with open(log_path, "w") as log_f:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", "-", "--child",
                                     json.dumps(spec)], stdout=log_f, stderr=subprocess.STDOUT, text=True,
                                    env=os.environ.copy(), start_new_session=True)
            try:
                proc.wait(timeout=args.engine_timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the engine's worker processes too
                proc.wait()
                timed_out = True
        text = log_path.read_text(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            why = f"no result within --engine-timeout {args.engine_timeout} s" if timed_out else \
                f"exit status {proc.returncode}"
            print(f"{label}: {why}; log tail:\n{text[-4000:]}", flush=True)
            return {"error": why, "log_tail": text[-4000:], "log": log_path.name,
                    "wall_s": time.perf_counter() - t}
        rec = json.loads(line[len("RESULT "):])
        rec["wall_s"] = time.perf_counter() - t
        results["device"] = results["device"] or rec.get("device")
        summary = {k: v for k, v in rec.items() if k not in ("tokens", "top_logprobs")}
        print(summary, flush=True)
        return rec

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_models(Path(tmp), args)
        for name, d in dirs.items():
            cfg = json.loads((d / "config.json").read_text())
            if "consa" in cfg:
                alloc = read_exported_allocation(d)
                results["allocations"][name] = {
                    "pattern": alloc.pattern, "window": alloc.window,
                    "f_heads": sum(r.count("F") for r in alloc.pattern),
                    "balance": {f"tp{t}": balance_summary(alloc, t) for t in tps}}
        import vllm

        results["vllm"] = vllm.__version__
        base = dict(gpu_mem=None if cpu else args.gpu_mem, eager=args.eager, max_num_seqs=args.max_num_seqs,
                    disable_custom_all_reduce=args.disable_custom_all_reduce)
        if "greedy" in args.parts:
            g_shape = SMOKE_GREEDY_SHAPE if args.smoke else GREEDY_SHAPE
            lengths = [37, 300, 700, 1500, 64, 2500, 1000, 450] if not args.smoke else [30, 75, 9, 140]
            for dtype in dtypes:
                recs = {}
                for tp in tps:
                    spec = dict(base, job="greedy", model=str(dirs["greedy"]), tp=tp, dtype=dtype,
                                lengths=lengths, output=args.greedy_output, vocab=g_shape["vocab_size"],
                                max_model_len=max(lengths) + args.greedy_output)
                    recs[f"tp{tp}"] = child(spec, f"greedy {dtype} tp={tp}")
                    # Saved after every engine: a run cut short (time limit) keeps what finished.
                    results["greedy"][dtype] = {k: {x: y for x, y in v.items() if x != "top_logprobs"}
                                                for k, v in recs.items()}
                    save()
                entry = results["greedy"][dtype]
                ref = recs[f"tp{tps[0]}"]
                for tp in tps[1:]:
                    other = recs[f"tp{tp}"]
                    if "error" in ref or "error" in other:
                        entry[f"tp{tp}_vs_tp{tps[0]}"] = {"error": "a run failed"}
                        ok = ok and dtype != "float32"
                        continue
                    cmp = compare_greedy(ref, other)
                    entry[f"tp{tp}_vs_tp{tps[0]}"] = cmp
                    print(f"greedy {dtype}: tp={tp} vs tp={tps[0]}: {cmp}", flush=True)
                    if dtype == "float32" and not cmp["tokens_equal"]:
                        ok = False
                results["greedy"][dtype] = entry
                save()
        if "throughput" in args.parts:
            t_shape = SMOKE_THROUGHPUT_SHAPE if args.smoke else THROUGHPUT_SHAPE
            for name in args.throughput_models:
                entry = results["throughput"][name] = {}
                for tp in tps:
                    spec = dict(base, job="throughput", model=str(dirs[f"throughput-{name}"]), tp=tp,
                                dtype="float32" if cpu else "bfloat16", requests=args.requests,
                                prompt=args.prompt, output=args.output, vocab=t_shape["vocab_size"],
                                max_model_len=args.prompt + args.output)
                    entry[f"tp{tp}"] = child(spec, f"throughput {name} tp={tp}")
                    save()
                first = entry[f"tp{tps[0]}"]
                for tp in tps[1:]:
                    rec = entry[f"tp{tp}"]
                    if "generate_s" in rec and "generate_s" in first:
                        entry[f"tp{tp}_speedup_vs_tp{tps[0]}"] = first["generate_s"] / rec["generate_s"]
                save()
    results["ok"] = ok
    save()
    print(json.dumps({"greedy": {d: {k: v for k, v in e.items() if "_vs_" in k} for d, e in results["greedy"].items()},
                      "throughput": {n: {k: (v.get("output_tok_per_s", v.get("error", "?")[:200])
                                             if isinstance(v, dict) else v) for k, v in e.items()}
                                     for n, e in results["throughput"].items()}}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
