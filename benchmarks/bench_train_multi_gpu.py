"""Multi-GPU trainer check: 1 process vs torchrun DDP vs torchrun FSDP at the same global batch.

    python benchmarks/bench_train_multi_gpu.py --out $OUT/train_2gpu.json            # 2 GPUs
    python benchmarks/bench_train_multi_gpu.py --device cpu --smoke --out /tmp/m.json  # toy size, CPU/gloo

Builds a small random Qwen3 model (default 8 layers, 16 q / 8 kv heads, head_dim 128, hidden 1024,
tied embeddings, bf16) and a local tokenizer, takes the standard library's Python files as text,
and runs the real trainer CLI (``python -m consa_vllm.train``) three times with the same seed:

  (a) one process, micro-batch 1, grad-accum B
  (b) ``torchrun --nproc-per-node N``, DDP, micro-batch 1, grad-accum B/N
  (c) the same with ``--fsdp``

so all three see the same B sequences per step *and* the same gate noise per sequence (the
noise is a function of the global micro-batch index). It compares the allocations: Hamming
distance (units that differ) and, per top-k row (a layer under per-layer, the model under
global), whether the switched units are at a log_alpha tie: their log_alpha values lie
within --tie-tol of each other in both runs, so run-to-run noise can swap them. It also
records tokens/s (median step after 2 warm-up steps), rank 0's peak GPU memory and the wall
time of each run, and writes one JSON with the devices, the settings and the results. Exit
status 0 even when they differ: the JSON says so (``equal_up_to_ties``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(out: Path, layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int, inter: int,
                vocab: int, dtype: str) -> None:
    """A random Qwen3 model (tied embeddings, as Qwen3-0.6B) and a small BPE tokenizer trained on stdlib files."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from consa_vllm.tiny import build_tokenizer
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).save_pretrained(str(out))
    build_tokenizer(out, vocab_size=vocab)


def compare(ref: dict, other: dict, per_layer: bool, tie_tol: float) -> dict:
    """Hamming distance of two allocation files and whether every difference is at a log_alpha tie.

    Units that changed F<->S are compared by their log_alpha within their top-k row (a layer
    under per-layer, the whole model under global): if, in *both* runs, the switched units of a
    row lie within ``tie_tol`` of each other, the top-k cut fell between near-equal values and
    the difference is a tie, not a different allocation.
    """
    pa, pb = ref["pattern"], other["pattern"]
    la, lb = ref["training"]["log_alpha"], other["training"]["log_alpha"]
    heads = len(pa[0])
    # log_alpha has 1 column under layer granularity: repeat it per head so units line up with patterns
    ua = [[r[h if len(r) > 1 else 0] for h in range(heads)] for r in la]
    ub = [[r[h if len(r) > 1 else 0] for h in range(heads)] for r in lb]
    max_dla = max(abs(x - y) for ra, rb in zip(la, lb) for x, y in zip(ra, rb))
    switched = [(i, h) for i in range(len(pa)) for h in range(heads) if pa[i][h] != pb[i][h]]
    groups: dict = {}
    for i, h in switched:
        groups.setdefault(i if per_layer else "all", []).append((i, h))
    rows = []
    for name, units in groups.items():
        va, vb = [ua[i][h] for i, h in units], [ub[i][h] for i, h in units]
        spread = max(max(va) - min(va), max(vb) - min(vb))
        rows.append({"row": name, "switched_units": [f"layer {i} head {h}" for i, h in units],
                     "log_alpha_ref": va, "log_alpha_other": vb, "spread": spread, "at_tie": spread <= tie_tol})
    return {"hamming": len(switched), "units": len(pa) * heads, "max_abs_log_alpha_diff": max_dla,
            "tie_tolerance": tie_tol, "differing_rows": rows, "equal_up_to_ties": all(r["at_tie"] for r in rows),
            "final_loss_diff": abs(ref["training"]["final"]["loss"] - other["training"]["final"]["loss"])}


def run_trainer(name: str, launcher: list[str], args: list[str], work: Path, env: dict, seq_len: int,
                global_batch: int, timeout: int) -> dict:
    """Run one trainer configuration; return its allocation, throughput and wall time."""
    out = work / f"{name}.json"
    # --force: a rerun in the same --work replaces this configuration's earlier run.
    cmd = [*launcher, "-m", "consa_vllm.train", *args, "--out", str(out), "--log-dir", str(work / f"{name}.logs"),
           "--force"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    hist = [json.loads(l) for l in (work / f"{name}.logs" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [h["step_time_s"] for h in hist[2:]] or [h["step_time_s"] for h in hist]
    step_s = statistics.median(steps)
    alloc = json.loads(out.read_text())
    res = {"name": name, "command": " ".join(cmd), "wall_s_including_startup": round(wall, 2),
           "step_time_s_median": step_s, "tokens_per_s": global_batch * seq_len / step_s,
           "steps": len(hist), "world_size": alloc["training"]["world_size"], "pattern": alloc["pattern"],
           "peak_gpu_mem_gib_rank0": max((h.get("max_mem_gib", 0.0) for h in hist), default=0.0) or None,
           "final": alloc["training"]["final"]}
    print(json.dumps({k: v for k, v in res.items() if k not in ("command", "pattern")}), flush=True)
    return res | {"_alloc": alloc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--work", default="/tmp/consa-train-multi-gpu", help="scratch folder (model, logs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: one process per GPU (NCCL); cpu: gloo, for a toy-size check")
    ap.add_argument("--smoke", action="store_true", help="toy size (2 layers, head_dim 32, seq 128, 6 steps, float32)")
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) for the DDP and FSDP runs")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the model built for the run (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default: %(default)s)")
    ap.add_argument("--window", type=int, default=512, help="sliding window of S units (default: %(default)s)")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (multiple of --nproc)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    ap.add_argument("--target-sparsity", type=float, default=0.5, help="share of S units the trainer aims at (default: %(default)s)")
    ap.add_argument("--constraint", choices=["per-layer", "global"], default="per-layer")
    ap.add_argument("--mode", choices=["joint", "masks"], default="joint",
                    help="joint: gates + weights (FSDP's sharded gradients matter); masks: weights frozen")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, data and gates (default: %(default)s)")
    ap.add_argument("--tie-tol", type=float, default=0.05,
                    help="log_alpha spread below which switched units count as a tie")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per trainer run")
    args = ap.parse_args()
    if args.global_batch % args.nproc:
        ap.error(f"--global-batch {args.global_batch} must be a multiple of --nproc {args.nproc}")

    import torch
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        ap.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} CUDA devices here (use --device cpu?)")
    if args.smoke:
        shape = dict(layers=2, heads=4, kv_heads=2, head_dim=32, hidden=128, inter=256, vocab=512, dtype="float32")
        args.seq_len, args.window, args.steps, args.global_batch = 128, 32, 6, 2 * args.nproc
    else:
        shape = dict(layers=args.layers, heads=16, kv_heads=8, head_dim=128, hidden=1024, inter=3072, vocab=4096,
                     dtype="bfloat16" if args.device == "cuda" else "float32")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / ("model-" + "-".join(str(v) for v in shape.values()))
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        build_model(model, **shape)
    build_s = time.perf_counter() - t0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    B, n = args.global_batch, args.nproc
    common = ["--model", str(model), "--data", sysconfig.get_paths()["stdlib"], "--seq-len", str(args.seq_len),
              "--max-tokens", str((args.steps + 1) * B * args.seq_len), "--window", str(args.window),
              "--steps", str(args.steps), "--batch-size", "1", "--target-sparsity", str(args.target_sparsity),
              "--granularity", "kv_head", "--constraint", args.constraint, "--dtype", shape["dtype"],
              "--device", args.device, "--seed", str(args.seed), "--checkpoint-every", "0", "--no-progress",
              "--lr", "1e-5" if args.mode == "joint" else "0"]
    if args.mode == "masks":
        common.append("--freeze-weights")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    runs = [run_trainer("one_process", [sys.executable], common + ["--grad-accum", str(B)], work, env,
                        args.seq_len, B, args.timeout),
            run_trainer(f"ddp_{n}", torchrun, common + ["--grad-accum", str(B // n)], work, env,
                        args.seq_len, B, args.timeout),
            run_trainer(f"fsdp_{n}", torchrun, common + ["--grad-accum", str(B // n), "--fsdp"], work, env,
                        args.seq_len, B, args.timeout)]
    per_layer = args.constraint == "per-layer"
    comparisons = {r["name"]: compare(runs[0]["_alloc"], r["_alloc"], per_layer, args.tie_tol)
                   for r in runs[1:]}
    for name, c in comparisons.items():
        print(f"{name} vs one_process: hamming {c['hamming']}/{c['units']}, max |d log_alpha| "
              f"{c['max_abs_log_alpha_diff']:.3g}, equal up to ties: {c['equal_up_to_ties']}", flush=True)
    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if args.device == "cuda" else [machine_name("cpu")])
    result = {
        "benchmark": "consa_vllm.train: 1 process vs torchrun DDP vs torchrun FSDP at the same global batch",
        "devices": devices, "torch": torch.__version__, "python": platform.python_version(),
        "settings": {"device": args.device, "nproc": n, "global_batch": B, "micro_batch": 1, "seq_len": args.seq_len,
                     "window": args.window, "steps": args.steps, "mode": args.mode, "seed": args.seed,
                     "target_sparsity": args.target_sparsity, "constraint": args.constraint,
                     "granularity": "kv_head", "smoke": args.smoke, **shape},
        "model_build_s": round(build_s, 2),
        "runs": [{k: v for k, v in r.items() if k != "_alloc"} for r in runs],
        "comparisons_vs_one_process": comparisons,
        "equal_up_to_ties": all(c["equal_up_to_ties"] for c in comparisons.values()),
        "note": "tokens/s: global batch x seq_len / median step time (steps 3+); wall includes start-up and "
                "data tokenisation; one run each",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
