"""What a new vLLM configuration costs the ConSA kernels: first launches with and without the
shared Triton cache (consa_vllm/plugin/ops/triton_cache.py).

vLLM sets ``TRITON_CACHE_DIR`` to a folder of each configuration's compile cache. Each run
below is a fresh process with a fresh such folder, as a new engine configuration gets, and
times the first and the second launch of the kernels a ConSA decode step uses (a mixed
layer: the one-launch K/V write, the fused split-KV decode and its reduce, the sink merge
of the FlashAttention path), at the Llama-3.1-8B head shape (group 4, head_dim 128, F
blocks of 48, S of 16, window 256, 64 sinks), bf16, batch 4:

  vllm_folder   ``CONSA_TRITON_CACHE_DIR=`` (empty): the kernels compile into vLLM's folder,
                as before the shared cache: what every new configuration paid
  shared_cold   a fresh shared folder: the first configuration on a machine
  shared_warm   the same shared folder, a fresh vLLM folder: every later configuration

It also lists which folder each run wrote Triton files to (kernel binaries and the C
launchers), so the JSON shows where the binaries went, not only how long it took.
``tests/test_gpu_ops.py`` runs it and checks the folders.

    python benchmarks/bench_triton_cache.py --out $OUT/triton_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("_hybrid_attn_kernel", "_reduce_segments_kernel", "_sink_merge_kernel", "_write_kv_hybrid_kernel",
           "_write_kv_kernel", "_quantize_query_kernel")


def worker() -> dict:
    """One process: build the pools, then time each op's first and second launch."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch

    from test_ops import make_case

    from consa_vllm.plugin.ops import triton_hybrid as th

    torch.cuda.init()
    case = make_case([(5000, 1), (300, 1), (1023, 1), (4096, 1)], 2, 6, 4, 128, 48, 16, 256,
                     dtype=torch.bfloat16, device="cuda", sink=64)
    out = torch.empty_like(case.query)
    scratch = th.make_hybrid_scratch(4, case.query.shape[1], 128, "cuda")
    T = case.query.shape[0]
    n_f = case.full.num_heads * case.group
    key = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.zeros(case.query.shape[1] - n_f, T, device="cuda", dtype=torch.float32)
    ops = {
        "write_kv_hybrid": lambda: th.write_kv_hybrid(key, key, case.full, case.sliding),
        "decode_3d_and_reduce": lambda: th.hybrid_paged_attention(*case.args(out), scratch),
        "sink_merge": lambda: th.merge_sinks(case.query[:, n_f:], out[:, n_f:], lse, case.batch, case.scale,
                                             case.sliding),
    }
    torch.cuda.synchronize()
    rec = {}
    for name, fn in ops.items():
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rec[name] = {"first_s": times[0], "second_s": times[1]}
    rec["total_first_s"] = sum(r["first_s"] for r in rec.values())
    return rec


def folder_files(path: str) -> dict:
    """Triton files under ``path``: ours (by kernel name), launchers, all."""
    ours, launchers, total = 0, 0, 0
    for _, _, files in os.walk(path):
        for f in files:
            total += 1
            ours += f.split(".")[0] in KERNELS
            launchers += f.startswith("__triton_launcher")
    return {"ours": ours, "launchers": launchers, "files": total}


def run(mode: str, vllm_folder: str, shared: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=vllm_folder, CONSA_TRITON_CACHE_DIR=shared)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    before = folder_files(shared) if shared else None
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{mode}: the worker failed:\n{p.stderr[-4000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["vllm_folder"] = folder_files(vllm_folder)
    if shared:
        rec["shared_folder_before"], rec["shared_folder"] = before, folder_files(shared)
    print(f"[{mode}] first launches {rec['total_first_s']:.2f} s; vLLM folder {rec['vllm_folder']}; "
          f"shared {rec.get('shared_folder')}", flush=True)
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="JSON to write")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return {}
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_cache.py needs a CUDA GPU (the interpreter compiles nothing)")
    with tempfile.TemporaryDirectory() as tmp:
        d = lambda name: os.path.join(tmp, name)  # noqa: E731
        runs = {
            "vllm_folder": run("vllm_folder", d("vllm_a"), ""),
            "shared_cold": run("shared_cold", d("vllm_b"), d("shared")),
            "shared_warm": run("shared_warm", d("vllm_c"), d("shared")),
        }
    res = {"device": torch.cuda.get_device_name(0), "runs": runs,
           "warm_over_vllm_folder": runs["shared_warm"]["total_first_s"] / runs["vllm_folder"]["total_first_s"]}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
