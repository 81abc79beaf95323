"""Stage-1 throughput of the trainer on a full-size shape (random weights): tokens/s, memory, time to 4M tokens.

    python benchmarks/bench_train_stage1.py --json benchmarks/results/train_stage1_h100.json   # H100, ~4 min
    python benchmarks/bench_train_stage1.py --device cpu --smoke --json /tmp/train_stage1.json  # toy size, CPU

Builds a Qwen3-0.6B-shaped model (28 layers, 16/8 heads, head_dim 128, hidden 1024, vocab
151936, tied embeddings) with random bf16 weights and a small local tokenizer, reads the
standard library's Python files as data, and times stage-1 steps per mode (masks-only:
gates only, weights frozen; joint: gates + weights) through the real trainer, kv_head
granularity, per-layer constraint, micro-batch 1. Reports the median step time after
2 warm-up steps, tokens/s, peak GPU memory, the wall time of the whole run (model load,
data, steps, binarisation, plots) and the projected time to an allocation from 4M tokens:
start-up + 4M tokens / tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

TOKENS_FOR_ALLOCATION = 4_000_000
FULL = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def build_model(out: Path, shape: dict, dtype: str, tokenizer_vocab: int) -> Path:
    """Save a random Qwen3 model of ``shape`` and a BPE tokenizer (trained on stdlib files) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from consa_vllm.tiny import build_tokenizer
    cfg = Qwen3Config(**shape, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(str(out))
    build_tokenizer(out, vocab_size=tokenizer_vocab)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: build the model once, then one trainer run per mode; write the JSON."""
    ap = argparse.ArgumentParser(prog="bench_train_stage1.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="result file to write")
    ap.add_argument("--work", default="/tmp/consa-bench", help="scratch folder (model, logs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true",
                    help="toy shape (2 layers, head_dim 32), seq 256, 4 steps, float32: checks the bench runs")
    ap.add_argument("--seq-len", type=int, default=8192, help="training sequence length (default: %(default)s)")
    ap.add_argument("--window", type=int, default=1024, help="sliding window of S units (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=12, help="timed stage-1 steps per mode (the first 2 are warm-up)")
    ap.add_argument("--modes", default="masks,joint", help="comma-separated: masks (weights frozen), joint")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= {"masks", "joint"} or not modes:
        ap.error(f"--modes: expected masks and/or joint, got {args.modes!r}")
    if args.steps < 3:
        ap.error(f"--steps must be >= 3 (2 warm-up steps are not timed), got {args.steps}")

    import torch

    from consa_vllm.train import TrainConfig, train
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --device cpu --smoke)")
    cuda = args.device == "cuda"
    shape, dtype = (SMOKE, "float32") if args.smoke else (FULL, "bfloat16" if cuda else "float32")
    if args.smoke:
        args.seq_len, args.window, args.steps = 256, 64, 4
    work = Path(args.work)
    model_dir = work / ("model-smoke" if args.smoke else f"model-0.6b-{dtype}")
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, shape, dtype, tokenizer_vocab=512 if args.smoke else 4096)
    setup_s = time.perf_counter() - t0
    data = str(Path(sysconfig.get_paths()["stdlib"]))
    results = []
    for mode in modes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(model=str(model_dir), data=[data], seq_len=args.seq_len, window=args.window,
                          steps=args.steps, batch_size=1, freeze_weights=(mode == "masks"),
                          lr=0.0 if mode == "masks" else 1e-5, target_sparsity=0.5, granularity="kv_head",
                          constraint="per-layer", dtype=dtype, device=args.device, out=str(work / f"{mode}.json"),
                          log_dir=str(work / f"{mode}.logs"), checkpoint_every=0, progress=False,
                          max_tokens=(args.steps + 1) * args.seq_len)
        t = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t
        hist = [json.loads(l) for l in (cfg.log_path / "metrics.jsonl").read_text().splitlines() if l.strip()]
        step_s = statistics.median(r["step_time_s"] for r in hist[2:])  # skip warm-up steps
        tps = args.seq_len / step_s
        startup = max(0.0, wall - sum(r["step_time_s"] for r in hist))  # load, data, binarise, plots
        minutes = (startup + TOKENS_FOR_ALLOCATION / tps) / 60
        results.append({"mode": mode, "step_time_s_median": step_s, "tokens_per_s": tps,
                        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                        "run_wall_s_including_load": wall, "startup_s": startup, "steps": len(hist),
                        "projected_minutes_for_4M_tokens": TOKENS_FOR_ALLOCATION / tps / 60,
                        "projected_minutes_to_allocation_4M_tokens": minutes,
                        "under_10_minutes": minutes < 10})
        print(json.dumps(results[-1]), flush=True)
    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    out = {"benchmark": "consa_vllm.train stage 1",
           "device": machine_name("cuda" if cuda else "cpu"),
           "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
           "shape": ("toy Qwen3 (2 layers, 4 q / 2 kv heads, head_dim 32, hidden 128)" if args.smoke else
                     "Qwen3-0.6B (28 layers, 16 q / 8 kv heads, head_dim 128, hidden 1024, vocab 151936)")
                    + f", random {dtype} weights",
           "seq_len": args.seq_len, "window": args.window, "batch_size": 1, "granularity": "kv_head",
           "constraint": "per-layer", "model_build_s": setup_s, "results": results,
           "note": "steady-state median step time; one run; gates mix FA and SWA on every head (both computed); "
                   "projected time to an allocation = start-up of the run + 4M tokens at the median rate"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
