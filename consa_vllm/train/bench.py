"""Stage-1 throughput of the trainer on a full-size shape (random weights): tokens/s, memory, time to 4M tokens.

    python -m consa_vllm.train.bench --json benchmarks/results/train_stage1_h100.json

Builds a Qwen3-0.6B-shaped model (28 layers, 16/8 heads, head_dim 128, hidden 1024) with random
bf16 weights and a small local tokenizer, reads the standard library's Python files as data, and
times a few stage-1 steps per mode (masks-only and joint) through the real trainer.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sysconfig
import time
from pathlib import Path


def build_model(out: Path, vocab: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from consa_vllm.tiny import build_tokenizer
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1e6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    build_tokenizer(out, vocab_size=vocab)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--work", default="/tmp/consa-bench")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--modes", default="masks,joint")
    args = ap.parse_args()

    import torch

    from consa_vllm.train import TrainConfig, train
    work = Path(args.work)
    model_dir = work / "model"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, vocab=4096)
    setup_s = time.perf_counter() - t0
    data = str(Path(sysconfig.get_paths()["stdlib"]))
    results = []
    for mode in args.modes.split(","):
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(model=str(model_dir), data=[data], seq_len=args.seq_len, window=args.window,
                          steps=args.steps, batch_size=1, freeze_weights=(mode == "masks"), lr=1e-5,
                          target_sparsity=0.5, granularity="kv_head", constraint="per-layer", dtype="bfloat16",
                          out=str(work / f"{mode}.json"), checkpoint_every=0, progress=False,
                          max_tokens=(args.steps + 1) * args.seq_len)
        t = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t
        hist = [json.loads(l) for l in (cfg.log_path / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in hist[2:]]  # skip warm-up steps
        step_s = statistics.median(times)
        tps = args.seq_len / step_s
        results.append({"mode": mode, "step_time_s_median": step_s, "tokens_per_s": tps,
                        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                        "run_wall_s_including_load": wall, "steps": args.steps,
                        "projected_minutes_for_4M_tokens": 4_000_000 / tps / 60})
        print(json.dumps(results[-1]), flush=True)
    out = {"benchmark": "consa_vllm.train stage 1", "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "python": platform.python_version(),
           "shape": "Qwen3-0.6B (28 layers, 16 q / 8 kv heads, head_dim 128, hidden 1024), random bf16 weights",
           "seq_len": args.seq_len, "window": args.window, "batch_size": 1, "granularity": "kv_head",
           "constraint": "per-layer", "model_build_s": setup_s, "results": results,
           "note": "steady-state median step time; one run; gates mix FA and SWA on every head (both computed)"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
