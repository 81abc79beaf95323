#!/usr/bin/env python
"""Whole-model decode attention at small batches: the fused split-KV Triton op alone.

Every attention layer of a model (default: the Llama-3.1-8B shape, 32 layers, 32 query /
8 KV heads, head_dim 128, bf16, DuoAttention's 75% pattern, window 256) in one CUDA graph,
at batch 1 (``--batches``), for each context (``--contexts``, default 32k and 128k) and
sink size (``--sinks``, default 0 and 64). The pools are built as the engine serves them:
one F pool with every F head of the model and one S pool with every S head, block sizes
from ``layout.choose_block_sizes`` (F 48 / S 16 at the 75% pattern), shuffled block ids,
the S pool holding only the sink and window blocks (the rest of its table is the null
block). Variants:

  fused           the op as served (``triton_hybrid.launch_attention``, segment rule)
  fused_baseline  the same from another ``triton_hybrid.py`` (``--baseline FILE`` or a git
                  revision such as ``HEAD``): the A/B of a kernel change on the same pools
  fused_segf<N>   the op with N segments per F head (``--seg-f``)
  fused_<launch>  the op with other launch parameters (``--launch t64w8s2``: 64-key tiles,
                  8 warps, 2 pipeline stages; any subset), for a kernel-configuration sweep
  fused_fill<N>   the op with about N F programs per layer (``--fill-programs``): a layer
                  with f F heads splits each into the power of 2 nearest below N / f
                  segments (the rule: 256 at batch 1 whatever f), so layers with few F
                  heads still put enough programs (loads in flight) on the GPU
  fa3_pools       FlashAttention 3 over the two pools, two streams, sinks merged by the
                  Triton merge launch (what ``CONSA_FUSED_DECODE_MAX_SEQS=0`` serves)
  split           F heads through FlashAttention 3, S heads (sinks included) through the
                  fused op, two streams (what ``CONSA_SMALL_DECODE=split`` serves)
  served          each layer as the backend chooses it in an engine whose max_model_len is
                  the row's context (``CONSA_SMALL_DECODE``, default auto: split for layers
                  with at least 4 F heads over bf16 pools, 3 from 128k, else fused)
  served_minN     the same rule with the threshold at N F heads (``--split-min N,...``)
  layerwise_fa3   a layer-wise allocation at the same sparsity (round(F heads / KV heads)
                  dense layers, the rest sliding, no sinks) through FlashAttention 3: what
                  stock vLLM decodes (sink 0 rows only)

Each variant is first checked against the torch op on one layer of every distinct split.
The JSON also holds, per compiled attention kernel, its registers, spills, shared memory and
the resulting programs per SM (4 warps; sm_90: 64K registers, 228 KB shared memory).

    python benchmarks/bench_fused_decode.py --baseline HEAD --out $OUT/fused_decode.json

``--smoke``: a tiny run on the CPU under TRITON_INTERPRET=1 (2 layers, small heads and
contexts, correctness checks, eager timing), to test the script without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OP_PATH = "consa_vllm/plugin/ops/triton_hybrid.py"


def log(msg):
    print(msg, flush=True)


def cdiv(a, b):
    return (a + b - 1) // b


def load_baseline(spec: str):
    """An older ``triton_hybrid.py`` as a module of the ops package (its relative imports
    resolve there): ``spec`` is a file, or a git revision of this repository."""
    path = spec
    if not os.path.isfile(path):
        src = subprocess.run(["git", "show", f"{spec}:{OP_PATH}"], cwd=ROOT, capture_output=True, text=True)
        if src.returncode:
            raise SystemExit(f"--baseline {spec}: neither a file nor a git revision here ({src.stderr.strip()})")
        fd, path = tempfile.mkstemp(suffix="_triton_hybrid_baseline.py")
        with os.fdopen(fd, "w") as f:
            f.write(src.stdout)
    import consa_vllm.plugin.ops  # noqa: F401  (the package the module lives in)

    name = "consa_vllm.plugin.ops._bench_baseline_triton_hybrid"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = mod
    mod_spec.loader.exec_module(mod)
    return mod


class Pools:
    """The two pools of a whole model at one (context, batch, sink), as served."""

    def __init__(self, torch, splits, ctx, batch, window, sink, hq, hkv, d, block_f, block_s, dtype, device, seed=0,
                 fp8=False):
        from bench_hybrid_kernel import pools as layer_pools
        from consa_vllm.plugin.ops import AttnBatch
        from consa_vllm.plugin.ops.interface import FP8_DTYPE

        self.gen = torch.Generator(device=device).manual_seed(seed)
        seq_len = ctx  # the new token included
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.batch = AttnBatch(qsl, torch.full((batch,), seq_len, dtype=torch.int32, device=device), 1, seq_len)
        self.query = torch.randn(batch, hq, d, generator=self.gen, device=device, dtype=dtype)
        self.scale = d ** -0.5
        n_f, n_s = sum(f for f, _ in splits), sum(s for _, s in splits)

        def pool(heads, block, keep):
            need = cdiv(seq_len, block)
            kept = [b for b in range(need) if keep(b, block)]
            nb = batch * len(kept) + 1
            cache = torch.empty(nb, 2, block, heads, d, device=device, dtype=dtype).normal_(generator=self.gen)
            if fp8:
                cache = cache.to(FP8_DTYPE)
            perm = (torch.randperm(nb - 1, device=device, generator=self.gen) + 1).to(torch.int32)
            table = torch.zeros(batch, need, dtype=torch.int32, device=device)  # 0 = null block
            idx = torch.tensor(kept, dtype=torch.long, device=device)
            for s in range(batch):
                table[s, idx] = perm[s * len(kept):(s + 1) * len(kept)]
            return cache, table

        first = max(0, seq_len - 1 - window + 1)
        fpool = pool(n_f, block_f, lambda b, B: True) if n_f else None
        spool = pool(n_s, block_s, lambda b, B: b < cdiv(sink, B) or (b + 1) * B > first) if n_s else None

        # Each layer's (full, sliding) KVPool pair, built by bench_hybrid_kernel's helper,
        # which reads the device, the window and FP8 (scales) from these attributes.
        self.dev, self.W, self.kv_fp8 = device, window, fp8
        self.layers, f_off, s_off = [], 0, 0
        for nf, ns in splits:
            self.layers.append(layer_pools(self, nf, ns, fpool, spool, f_off, s_off, sink))
            f_off, s_off = f_off + nf, s_off + ns


def parse_launch(name: str) -> dict:
    """``t64w8s2p0`` -> LaunchConfig fields (tile_size 64, num_warps 8, num_stages 2, prefetch_bt
    False); any subset, any order."""
    fields = {"t": "tile_size", "w": "num_warps", "s": "num_stages", "p": "prefetch_bt"}
    parts = re.findall(r"([twsp])(\d+)", name)
    if (not parts or "".join(k + v for k, v in parts) != name
            or any(k == "p" and v not in ("0", "1") for k, v in parts)):
        raise SystemExit(f"--launch {name!r}: expected parts tTILE, wWARPS, sSTAGES, p0/p1 (block-table "
                         "prefetch), e.g. t64w8s2")
    return {fields[k]: (v == "1") if k == "p" else int(v) for k, v in parts}


def time_eager(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps


def kernel_stats(mod, device_index=0):
    """Registers, spills and shared memory of every compiled variant of ``mod``'s attention
    kernel, with the programs per SM they allow at 4 warps (sm_90 limits)."""
    out = []
    kernel = getattr(mod, "_hybrid_attn_kernel", None)
    caches = getattr(kernel, "device_caches", {}) if kernel is not None else {}
    if device_index not in caches:
        return out
    for ck in caches[device_index][0].values():
        try:
            ck._init_handles()
        except Exception:
            pass
        regs, spills = getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)
        md = ck.metadata
        warps, shared = getattr(md, "num_warps", 4), getattr(md, "shared", 0)
        row = dict(regs=regs, spills=spills, shared=shared, num_warps=warps, maxnreg=getattr(md, "maxnreg", None))
        try:
            for k, v in ck.src.constants.items():
                name = k if isinstance(k, str) else ck.src.fn.arg_names[k[0]]
                if name in ("HAS_FULL", "HAS_SLIDING", "SINK", "IS_3D", "FP8", "BLOCK_SIZE_F", "BLOCK_SIZE_S"):
                    row[name] = v if isinstance(v, (int, bool)) else str(v)
        except Exception:
            pass
        if regs:
            threads = 32 * warps
            by_regs = 65536 // (cdiv(regs, 8) * 8 * threads)
            by_smem = (228 * 1024) // (shared + 1024)
            row["programs_per_sm"] = min(by_regs, by_smem, 2048 // threads, 32)
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--allocation", default=os.path.join(ROOT, "benchmarks/allocations/duo-llama3.1-8b-0.75.json"),
                    help="kv_head allocation file whose F/S heads the pools hold (default: DuoAttention's "
                         "Llama-3.1-8B 75%% pattern)")
    ap.add_argument("--contexts", default="32768,131072", help="context lengths (tokens), comma list (default: %(default)s)")
    ap.add_argument("--sinks", default="0,64", help="sink sizes (tokens), comma list (default: %(default)s)")
    ap.add_argument("--batches", default="1", help="decode batch sizes, comma list (default: %(default)s)")
    ap.add_argument("--hq", type=int, default=32, help="query heads per layer (default: %(default)s)")
    ap.add_argument("--hkv", type=int, default=8, help="KV heads per layer (default: %(default)s)")
    ap.add_argument("--head-dim", type=int, default=128, help="head size (default: %(default)s)")
    ap.add_argument("--block-size", type=int, default=16, help="base block size (pools: choose_block_sizes)")
    ap.add_argument("--reps", type=int, default=30, help="timed CUDA-graph replays per variant (default: %(default)s)")
    ap.add_argument("--baseline", default="", help="older triton_hybrid.py: a file or a git revision (e.g. HEAD)")
    ap.add_argument("--seg-f", default="", help="extra F segment counts for the fused op, comma list")
    ap.add_argument("--fill-programs", default="", help="extra variants: about N F programs per layer, comma list")
    ap.add_argument("--launch", default="",
                    help="extra launch configurations of the fused op, comma list of tTILE wWARPS sSTAGES "
                         "p0/p1 (block-table prefetch) in any subset, e.g. t64,w8,t64s2,p0 (omitted "
                         "parts: the served defaults)")
    ap.add_argument("--split-min", default="",
                    help="extra variants served_minN: split the layers with at least N F heads (the "
                         "served rule's SPLIT_MIN_FULL_HEADS moved to N), comma list, e.g. 2,3")
    ap.add_argument("--fa-splits", default="",
                    help="extra variants served_nsN (and layerwise_fa3_nsN): the served choice with "
                         "FlashAttention 3's KV splits fixed to N for the F heads (CONSA_FA3_DECODE_SPLITS; "
                         "default: its own heuristic), comma list")
    ap.add_argument("--fp8", action="store_true", help="FP8 pools (per-tensor scales 1.0)")
    ap.add_argument("--no-fa3", action="store_true",
                    help="skip the variants that need FlashAttention 3 (fa3_pools, split, served, layerwise_fa3)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    args = ap.parse_args()
    launches = {name: parse_launch(name) for name in args.launch.split(",") if name}  # refused before any work
    def counts(flag: str, raw: str, high: int | None = None) -> list[int]:
        """A comma list of whole numbers from 1 (to ``high``), or one ``ap.error`` naming ``flag``."""
        try:
            values = [int(n) for n in raw.split(",") if n]
        except ValueError:
            ap.error(f"{flag}: whole numbers expected, got {raw!r}")
        if any(n < 1 or (high is not None and n > high) for n in values):
            bound = "at least 1" if high is None else f"from 1 to {high}"
            ap.error(f"{flag}: each value must be {bound}, got {raw!r}")
        return values

    split_mins = counts("--split-min", args.split_min)
    fa_splits = []
    if args.fa_splits:  # flash_pools imports torch: only when asked for, as before TRITON_INTERPRET is set
        from consa_vllm.plugin.ops.flash_pools import MAX_FA3_SPLITS

        fa_splits = counts("--fa-splits", args.fa_splits, MAX_FA3_SPLITS)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU: use --smoke for the CPU check")
    # This script's folder, imported once TRITON_INTERPRET is set (that module imports torch).
    from bench_hybrid_kernel import _check_layers as check_layers
    from bench_hybrid_kernel import time_graph
    from consa_vllm.plugin.layout import choose_block_sizes
    from consa_vllm.plugin.ops import triton_hybrid as th

    with open(args.allocation) as f:
        alloc = json.load(f)
    splits = [(row.count("F"), row.count("S")) for row in alloc["pattern"]]
    window = int(alloc["window"])
    hq, hkv, d, dtype = args.hq, args.hkv, args.head_dim, torch.bfloat16
    contexts = [int(x) for x in args.contexts.split(",") if x]
    sinks = [int(x) for x in args.sinks.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    reps = args.reps
    device = "cuda"
    if args.smoke:  # 2 layers, small heads and contexts, float32 (the interpreter's dots)
        splits, window, hq, hkv, d, dtype = [(1, 3), (0, 4), (2, 2)], 16, 8, 4, 32, torch.float32
        contexts, sinks, batches, reps, device = [90, 200], [0, 4], [1], 1, "cpu"
    assert all(f + s == hkv for f, s in splits), "allocation does not match --hkv"
    n_f, n_s = sum(f for f, _ in splits), sum(s for _, s in splits)
    block_f, block_s, _ = choose_block_sizes(n_f, n_s, args.block_size)
    mods = {"fused": th}
    if args.baseline:
        mods["fused_baseline"] = load_baseline(args.baseline)
    fa = None
    if not args.no_fa3 and not args.smoke:
        from consa_vllm.plugin.ops.flash_pools import (flash_attn_pools, flash_attn_varlen, flash_full_fused_sliding,
                                                       small_decode_split)

        fa = flash_attn_varlen()
    seg_fs = [int(x) for x in args.seg_f.split(",") if x]
    fills = [int(x) for x in args.fill_programs.split(",") if x]

    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    result = dict(device=machine_name(device),
                  torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                  settings=dict(vars(args), splits=splits, window=window, hq=hq, hkv=hkv, head_dim=d,
                                block_f=block_f, block_s=block_s, f_heads=n_f, s_heads=n_s),
                  notes="ms per decode step over all layers' attention (CUDA-graph replay of 2 steps, median)",
                  rows=[])
    rows = result["rows"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def dump():
        if device == "cuda":
            try:
                result["kernels"] = {name: kernel_stats(mod, torch.cuda.current_device()) for name, mod in mods.items()}
            except Exception as e:  # the timings matter more than the kernel figures
                result["kernels_error"] = repr(e)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for ctx in contexts:
        for bs in batches:
            for sink in sinks:
                p = Pools(torch, splits, ctx, bs, window, sink, hq, hkv, d, block_f, block_s, dtype, device,
                          fp8=args.fp8)
                out = torch.empty_like(p.query)
                scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(hkv), hq, d, device)
                assert th.would_use_3d(p.query, p.batch, scratch)
                runners = {}
                for name, mod in mods.items():
                    sc = mod.make_hybrid_scratch(mod.default_seq_threshold_3d(hkv), hq, d, device)
                    runners[name] = (lambda full, sliding, o, mod=mod, sc=sc:
                                     mod.launch_attention(p.query, o, p.batch, p.scale, full, sliding, sc,
                                                          mod.LaunchConfig()))
                for n in seg_fs:
                    runners[f"fused_segf{n}"] = (lambda full, sliding, o, n=n: th.launch_attention(
                        p.query, o, p.batch, p.scale, full, sliding, scratch, th.LaunchConfig(segments=(n, None))))
                for n in fills:
                    def fill(full, sliding, o, n=n):
                        nf = full.num_heads if full is not None else 1
                        seg = 1 << (max(1, n // nf).bit_length() - 1)
                        th.launch_attention(p.query, o, p.batch, p.scale, full, sliding, scratch,
                                            th.LaunchConfig(segments=(seg, None)))
                    runners[f"fused_fill{n}"] = fill
                for name, cfg in launches.items():
                    runners[f"fused_{name}"] = (lambda full, sliding, o, cfg=cfg: th.launch_attention(
                        p.query, o, p.batch, p.scale, full, sliding, scratch, th.LaunchConfig(**cfg)))
                if fa is not None:
                    runners["fa3_pools"] = (lambda full, sliding, o: flash_attn_pools(
                        fa, p.query, o, p.batch, p.scale, full, sliding, overlap=True))
                    runners["split"] = (lambda full, sliding, o: flash_full_fused_sliding(
                        fa, p.query, o, p.batch, p.scale, full, sliding, scratch, overlap=True))

                    # The backend's per-layer choice, in an engine built for this context.
                    def served(full, sliding, o, min_full=None, ctx=ctx, overlap=True, num_splits=0):
                        nf = full.num_heads if full is not None else 0
                        if small_decode_split(args.fp8, nf, min_full, max_model_len=ctx):
                            flash_full_fused_sliding(fa, p.query, o, p.batch, p.scale, full, sliding, scratch,
                                                     overlap=overlap, num_splits=num_splits)
                        else:
                            th.hybrid_paged_attention(p.query, o, p.batch, p.scale, full, sliding, scratch)
                    runners["served"] = served
                    # The same with the split layers' two launches one after the other
                    # (CONSA_FA3_OVERLAP=0): what the two-stream fork and join cost or buy.
                    runners["served_serial"] = functools.partial(served, overlap=False)
                    for n in fa_splits:
                        runners[f"served_ns{n}"] = functools.partial(served, num_splits=n)
                    for n in split_mins:
                        runners[f"served_min{n}"] = functools.partial(served, min_full=n)
                base = dict(context=ctx, batch=bs, sink=sink)
                # correctness: one layer of every distinct split, each variant vs the torch op
                try:
                    errs = check_layers(p, p.layers, runners, set())
                except AssertionError as e:
                    raise AssertionError(f"ctx={ctx} sink={sink}: {e}") from None
                rows.append(dict(base, variant="check_vs_torch", max_abs_err=errs))
                for name, fn in runners.items():
                    def run(fn=fn):
                        for full, sliding in p.layers:
                            fn(full, sliding, out)
                    ms = time_graph(run, reps) if device == "cuda" else time_eager(run, reps)
                    rows.append(dict(base, variant=name, ms=ms))
                    log(f"ctx={ctx:7d} b={bs} sink={sink:3d} {name:16s} {ms:8.4f} ms")
                if fa is not None and sink == 0:
                    n_dense = round(n_f / hkv)
                    lw = [(hkv, 0)] * n_dense + [(0, hkv)] * (len(splits) - n_dense)
                    del p.layers
                    q = Pools(torch, lw, ctx, bs, window, 0, hq, hkv, d, args.block_size, args.block_size, dtype,
                              device, fp8=args.fp8)

                    # Layer-wise as FlashAttention 3 chooses its splits, and at each --fa-splits count.
                    lw_fas = {"layerwise_fa3": fa}
                    lw_fas.update({f"layerwise_fa3_ns{n}": functools.partial(fa, num_splits=n) for n in fa_splits})
                    for name, f in lw_fas.items():
                        def run_lw(f=f):
                            for full, sliding in q.layers:
                                flash_attn_pools(f, q.query, out, q.batch, q.scale, full, sliding, overlap=True)
                        ms = time_graph(run_lw, reps)
                        rows.append(dict(base, variant=name, ms=ms, dense_layers=n_dense))
                        log(f"ctx={ctx:7d} b={bs} sink={sink:3d} {name:16s} {ms:8.4f} ms")
                    del q
                del p, out, scratch, runners
                dump()
                if device == "cuda":
                    torch.cuda.empty_cache()
    for r in rows:  # ratios within each (context, batch, sink) and against sink 0
        if "ms" not in r:
            continue
        same = {x["variant"]: x["ms"] for x in rows if "ms" in x and all(
            x[k] == r[k] for k in ("context", "batch", "sink"))}
        for ref in ("fused", "fused_baseline", "fa3_pools"):
            if ref in same and r["variant"] != ref:
                r[f"vs_{ref}"] = r["ms"] / same[ref]
        lw = [x["ms"] for x in rows if x.get("variant") == "layerwise_fa3" and x["context"] == r["context"]
              and x["batch"] == r["batch"]]
        if lw and r["variant"] != "layerwise_fa3":
            r["vs_layerwise_fa3"] = r["ms"] / lw[0]
        s0 = [x["ms"] for x in rows if x.get("variant") == r["variant"] and x["sink"] == 0
              and x["context"] == r["context"] and x["batch"] == r["batch"]]
        if s0 and r["sink"]:
            r["vs_sink0"] = r["ms"] / s0[0]
    dump()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
