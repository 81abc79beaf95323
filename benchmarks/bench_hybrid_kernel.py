#!/usr/bin/env python
"""GPU microbenchmark of the fused hybrid (F + S heads) paged attention kernel.

One attention layer at the Qwen3-0.6B shape (16 query heads, 8 KV heads, head_dim 128,
bf16, window 4096), compared with vLLM's stock Triton ``unified_attention``:

  stock_dense   : stock kernel, all 8 KV heads full attention
  stock_all_sliding : stock kernel, all 8 KV heads sliding window
  hybrid_<nF>F<nS>S : our kernel, nF heads through the F pool/table, nS through the S
                  pool/table (S pool holds only the window's blocks; out-of-window table
                  entries point at the null block 0), for 2F6S, 4F4S, 8F0S, 0F8S

Workloads: decode batch 1 and 4 at 32k context, batch 16, 64 and 128 at 16k, a 2048-token
prefill chunk on top of 14k context, and an 8k prompt prefill.  With FlashAttention 3
available (vLLM on Hopper) it also times what vLLM runs per layer: FA3 over a dense layer
(full and all-sliding) and FA3 twice over the F and S pools; ``--pool-layers L`` sizes the
pools for L layers so that a layer reads its heads strided, as when served.

Correctness of the same kernels on the GPU is tested in tests/test_gpu_ops.py (run it
before timing).

Timing: CUDA events around CUDA-graph replays of 10 back-to-back calls (what vLLM decode
sees; no Python launch overhead), median over --reps replays; "warm" = KV may sit in L2
from the previous call, "cold" = an L2-flushing memset before every call, its own time
subtracted.  Eager (no graph) mean time is reported too.

    python benchmarks/bench_hybrid_kernel.py --out benchmarks/results/hybrid_kernel_h100.json

Whole-model decode (``--whole-model``; one H200, about 2 minutes): every attention layer of
a model in one CUDA graph, batch 1, 4 and 16 at 32k context (and 1, 4 at 128k for the
Llama shape), for Qwen3-30B-A3B (48 layers, 4 KV / 32 q heads, 1F3S per layer, W 4096),
Qwen3-0.6B (28 layers, 8 KV / 16 q, W 4096; 56 F heads seeded-random 0..5 per layer vs 2
per layer) and Llama-3.1-8B (32 layers, 8 KV / 32 q, W 256, DuoAttention's 50% pattern):
the fused op with the per-pool segment rule vs the old uniform 128 segments (and F at 512
segments at batch 1), the same uneven allocation through FlashAttention 3 over the two
pools as the engine serves larger batches (ops/flash_pools.py; F and S launches overlapped
on two streams, the default, and one after the other), and a layer-wise allocation at the
same sparsity, through the fused op and as stock vLLM decodes it, one FlashAttention 3 call
per dense or all-sliding layer (FlashAttention variants where vLLM's FlashAttention 3 is
importable); each distinct split checked against the torch op first, every variant:

    python benchmarks/bench_hybrid_kernel.py --whole-model --out benchmarks/results/hybrid_models_h200.json

``--whole-model-shapes MODEL[:ALLOCATION[:CONTEXT[:BATCH]]],...`` runs a subset, e.g.
``llama3.1-8b:duo-0.5:32768`` (one allocation at 32k, batch 1, 4 and 16).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

NUM_Q_HEADS = 16
NUM_KV_HEADS = 8
HEAD_DIM = 128
SPLITS = [(2, 6), (4, 4), (8, 0), (0, 8)]


def log(msg):
    print(msg, flush=True)


def cdiv(a, b):
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------
# Problem construction
# ---------------------------------------------------------------------------------------


class Problem:
    """A batch (list of (context_len, query_len)) with query, dense cache + table (stock),
    and for a split (nF, nS) an F pool/table and a compact S pool/table."""

    def __init__(self, seqs, block_size, window, dtype, device, seed=0, hq=NUM_Q_HEADS,
                 hkv=NUM_KV_HEADS, d=HEAD_DIM, kv_fp8=False):
        self.seqs, self.B, self.W, self.dtype, self.dev = seqs, block_size, window, dtype, device
        self.kv_fp8 = kv_fp8
        self.hq, self.hkv, self.d = hq, hkv, d
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.seq_lens_list = [c + q for c, q in seqs]
        qsl = [0]
        for _, q in seqs:
            qsl.append(qsl[-1] + q)
        self.T = qsl[-1]
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(self.seq_lens_list, dtype=torch.int32, device=device)
        self.max_query_len = max(q for _, q in seqs)
        self.max_seq_len = max(self.seq_lens_list)
        from consa_vllm.plugin.ops import AttnBatch

        self.batch = AttnBatch(self.query_start_loc, self.seq_lens, self.max_query_len, self.max_seq_len)
        self.query = torch.randn(self.T, hq, d, generator=self.gen, device=device, dtype=dtype)
        self.scale = d ** -0.5

    def _rand_cache(self, num_blocks, heads):
        c = torch.empty(num_blocks, 2, self.B, heads, self.d, device=self.dev, dtype=self.dtype)
        c.normal_(generator=self.gen)
        if self.kv_fp8:
            from consa_vllm.plugin.ops.interface import FP8_DTYPE

            c = c.to(FP8_DTYPE)
        return c

    def full_pool(self, heads):
        """Pool with every block of every sequence; block ids shuffled; block 0 = null."""
        need = [cdiv(L, self.B) for L in self.seq_lens_list]
        num_blocks = sum(need) + 1
        cache = self._rand_cache(num_blocks, heads)
        perm = torch.randperm(num_blocks - 1, device=self.dev, generator=self.gen) + 1
        table = torch.zeros(len(self.seqs), max(need), dtype=torch.int32, device=self.dev)
        pos = 0
        for s, n in enumerate(need):
            table[s, :n] = perm[pos:pos + n].to(torch.int32)
            pos += n
        return cache, table

    def sliding_pool(self, heads, sink=0):
        """Pool holding only the blocks a sliding-window manager keeps (the sink blocks and
        the window of the first new token on); other table entries = null block 0."""
        kept = []
        for (ctx, q), L in zip(self.seqs, self.seq_lens_list):
            first, last = max(0, ctx - self.W + 1) // self.B, cdiv(L, self.B)
            kept.append(sorted(set(range(min(cdiv(sink, self.B), last))) | set(range(first, last))))
        num_blocks = sum(len(k) for k in kept) + 1
        cache = self._rand_cache(num_blocks, heads)
        perm = (torch.randperm(num_blocks - 1, device=self.dev, generator=self.gen) + 1).to(torch.int32)
        max_blocks = max(cdiv(L, self.B) for L in self.seq_lens_list)
        table = torch.zeros(len(self.seqs), max_blocks, dtype=torch.int32, device=self.dev)
        pos = 0
        for s, blocks in enumerate(kept):
            table[s, torch.tensor(blocks, dtype=torch.long, device=self.dev)] = perm[pos:pos + len(blocks)]
            pos += len(blocks)
        return cache, table


def pools(p: Problem, nf, ns, fpool, spool, f_off=0, s_off=0, sink=0):
    """The (full, sliding) KVPool pair of one layer with nf F and ns S heads."""
    from consa_vllm.plugin.ops import KVPool

    def fp8(n):  # per-tensor scales, expanded as the backend passes them
        one = torch.ones(1, device=p.dev)
        return dict(k_scale=one.expand(n), v_scale=one.expand(n), q_scale=one.expand(n)) if p.kv_fp8 else {}

    full = KVPool(fpool[0], fpool[1], None, f_off, nf, **fp8(nf)) if nf else None
    sliding = KVPool(spool[0], spool[1], None, s_off, ns, window=p.W, sink=sink, **fp8(ns)) if ns else None
    return full, sliding


# ---------------------------------------------------------------------------------------
# Stock vLLM kernel
# ---------------------------------------------------------------------------------------


class Stock:
    def __init__(self, device, hq, d, unified_attention):
        self.fn = unified_attention
        self.threshold = 128 // NUM_KV_HEADS  # vLLM triton_attn: MIN_LAUNCH_GRID_SIZE_2D // kv
        self.nseg = 16  # NUM_PAR_SOFTMAX_SEGMENTS
        hp = 1 << (d - 1).bit_length()
        self.segm_out = torch.empty(self.threshold, hq, self.nseg, hp, dtype=torch.float32,
                                    device=device)
        self.segm_max = torch.empty(self.threshold, hq, self.nseg, dtype=torch.float32,
                                    device=device)
        self.segm_sum = torch.empty_like(self.segm_max)

    def _ones(self, p):
        key = (len(p.seqs), str(p.dev))
        if getattr(self, "_ones_key", None) != key:
            self._ones_t = torch.ones(len(p.seqs), NUM_KV_HEADS, dtype=torch.float32,
                                      device=p.dev)
            self._ones_key = key
        return self._ones_t

    def __call__(self, p: Problem, cache, table, out, window):
        self.fn(
            q=p.query, k=cache[:, 0], v=cache[:, 1], out=out,
            cu_seqlens_q=p.query_start_loc, max_seqlen_q=p.max_query_len,
            seqused_k=p.seq_lens, max_seqlen_k=p.max_seq_len,
            softmax_scale=p.scale, causal=True,
            window_size=(window - 1, 0) if window else (-1, -1),
            block_table=table, softcap=0, q_descale=None,
            k_descale=self._ones(p), v_descale=self._ones(p),
            seq_threshold_3D=self.threshold, num_par_softmax_segments=self.nseg,
            softmax_segm_output=self.segm_out, softmax_segm_max=self.segm_max,
            softmax_segm_expsum=self.segm_sum,
        )


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device, reps, calls_per_graph=10, flush_mb=256):
        self.reps = reps
        self.k = calls_per_graph
        self.flush_buf = torch.empty(flush_mb * 1024 * 1024 // 4, dtype=torch.float32,
                                     device=device)

    def _graph(self, fn, flush):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                if flush:
                    self.flush_buf.zero_()
                if fn is not None:
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.k):
                if flush:
                    self.flush_buf.zero_()
                if fn is not None:
                    fn()
        return g

    def _time_graph(self, g):
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / self.k)
        times.sort()
        return times[len(times) // 2]

    def measure(self, fn):
        res = {}
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        n = max(5, self.reps // 2)
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        res["eager_ms"] = a.elapsed_time(b) / n
        try:
            res["graph_warm_ms"] = self._time_graph(self._graph(fn, False))
            cold = self._time_graph(self._graph(fn, True))
            flush_only = self._time_graph(self._graph(None, True))
            res["graph_cold_ms"] = max(cold - flush_only, 0.0)
            res["flush_ms"] = flush_only
        except Exception as e:  # graph capture unsupported: keep eager numbers
            res["graph_error"] = repr(e)
        return res


WORKLOADS = {
    "decode_b1_32k": [(32767, 1)],
    "decode_b4_32k": [(32767, 1)] * 4,
    "decode_b16_16k": [(16383, 1)] * 16,
    "decode_b32_16k": [(16383, 1)] * 32,
    "decode_b64_16k": [(16383, 1)] * 64,
    "decode_b96_16k": [(16383, 1)] * 96,
    "decode_b128_16k": [(16383, 1)] * 128,
    "prefill_chunk_2k_at_16k": [(14336, 2048)],
    "prefill_8k": [(0, 8192)],
}


def fa3_varlen():
    """vLLM's FlashAttention 3 varlen function, or None where it is not available."""
    try:
        from consa_vllm.plugin.ops.flash_pools import flash_attn_varlen

        return flash_attn_varlen()
    except Exception:
        return None


def fa3_pools(fa, p: Problem, full, sliding, out, overlap=False):
    """The served FA3 path (ops.flash_pools): F heads over the F pool, S heads over the S pool."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    def run():
        flash_attn_pools(fa, p.query, out, p.batch, p.scale, full, sliding, overlap=overlap)
    return run


def fa3_full_triton_sliding(fa, p: Problem, full, sliding, out):
    """F heads through FA3 (side stream), S heads through the fused Triton kernel with the
    sinks inside (2D path on a prefill), concurrently: ``flash_pools.flash_full_fused_sliding``,
    which serves small decode batches so (``CONSA_SMALL_DECODE``), on this workload."""
    from consa_vllm.plugin.ops.flash_pools import flash_full_fused_sliding

    def run():
        flash_full_fused_sliding(fa, p.query, out, p.batch, p.scale, full, sliding, None)
    return run


# FA3 two-pool variants timed for every F+S split: (name suffix, overlap). Forcing KV splits
# on the F launch was measured on the H100 and changed nothing (results/
# hybrid_kernel_h100_fa3_pools.json); the served op leaves the split count to FlashAttention.
FA3_POOL_VARIANTS = (("", False), ("_overlap", True))


def _log_row(name, r):
    log(f"  {name:28s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float))
        + (f" [{r['path']}]" if "path" in r else ""))


def run_timing(th, stock, device, block_size, window, reps, workloads, num_segments, sweep=None, pool_layers=1,
               sinks=(0,), kv_fp8=False):
    rows = []
    timer = Timer(device, reps)
    fa = fa3_varlen()
    for wname in workloads:
        seqs = WORKLOADS[wname]
        p = Problem(seqs, block_size, window, torch.bfloat16, device, seed=2, kv_fp8=kv_fp8)
        out = torch.empty_like(p.query)
        log(f"== {wname}: {len(seqs)} seqs, q_len {p.max_query_len}, seq_len {p.max_seq_len}")
        variants = []
        dense = p.full_pool(NUM_KV_HEADS)
        if stock is not None:
            variants.append(("stock_dense", lambda: stock(p, dense[0], dense[1], out, 0)))
            variants.append(("stock_all_sliding", lambda: stock(p, dense[0], dense[1], out, window)))
        if fa is not None:
            # What a stock layer-wise model runs per layer: FA3 over all heads, full or
            # sliding. A layer-wise model at sparsity rho costs (1-rho) fa3_dense + rho
            # fa3_all_sliding per layer, to compare with fa3_pools_<nF>F<nS>S at nS/8 = rho.
            for vname, nf, ns in (("fa3_dense", NUM_KV_HEADS, 0), ("fa3_all_sliding", 0, NUM_KV_HEADS)):
                variants.append((vname, fa3_pools(fa, p, *pools(p, nf, ns, dense, dense), out)))
        for name, fn in variants:
            r = timer.measure(fn)
            rows.append(dict(workload=wname, variant=name, **r))
            _log_row(name, r)
        del dense, variants
        torch.cuda.empty_cache()
        for nf, ns in SPLITS:
            # As served, a pool holds the heads of many layers and a layer reads its slice
            # (strided by the pool's head count): --pool-layers L sizes the pools for L layers.
            fpool = p.full_pool(nf * pool_layers) if nf else None
            thr = th.default_seq_threshold_3d(nf + ns)
            scratch = th.make_hybrid_scratch(thr, p.hq, p.d, device, num_segments)
            for sink in sinks if ns else (0,):
                spool = p.sliding_pool(ns * pool_layers, sink) if ns else None
                full, sliding = pools(p, nf, ns, fpool, spool, nf * (pool_layers // 2), ns * (pool_layers // 2), sink)
                tag = f"{nf}F{ns}S" + (f"_sink{sink}" if sink else "")
                run = functools.partial(th.hybrid_paged_attention, p.query, out, p.batch, p.scale, full, sliding,
                                        scratch)
                run()  # compile before capture
                r = timer.measure(run)
                r["path"] = "3d" if th.would_use_3d(p.query, p.batch, scratch) else "2d"
                rows.append(dict(workload=wname, variant=f"hybrid_{tag}", sink=sink, **r))
                _log_row(f"hybrid_{tag}", r)
                for suffix, overlap in FA3_POOL_VARIANTS if (fa is not None and nf and ns) else ():
                    run = fa3_pools(fa, p, full, sliding, out, overlap)
                    run()
                    r = timer.measure(run)
                    vname = f"fa3_pools_{nf}F{ns}S{suffix}" + (f"_sink{sink}" if sink else "")
                    rows.append(dict(workload=wname, variant=vname, overlap=overlap, sink=sink, **r))
                    _log_row(vname, r)
                if fa is not None and nf and ns and len(sinks) > 1:
                    run = fa3_full_triton_sliding(fa, p, full, sliding, out)
                    run()
                    r = timer.measure(run)
                    rows.append(dict(workload=wname, variant=f"fa3f_tritons_{tag}", sink=sink, **r))
                    _log_row(f"fa3f_tritons_{tag}", r)
                sweep_here = sweep if (nf and ns and not sink and p.max_query_len <= 1) else []
                for segs, tile, warps, *stages in sweep_here or []:
                    scratch2 = th.make_hybrid_scratch(thr, p.hq, p.d, device, segs)
                    cfg = th.LaunchConfig(tile_size=tile, num_warps=warps, num_stages=stages[0] if stages else None)
                    run2 = functools.partial(th.launch_attention, p.query, out, p.batch, p.scale, full, sliding,
                                             scratch2, cfg)
                    run2()
                    r = timer.measure(run2)
                    rows.append(dict(workload=wname, variant=f"hybrid_{tag}", num_segments=segs, tile=tile,
                                     num_warps=warps, num_stages=cfg.num_stages, sweep=True, **r))
                    _log_row(f"hybrid_{tag} segs={segs} tile={tile} warps={warps} stages={cfg.num_stages}", r)
                del spool, full, sliding
                torch.cuda.empty_cache()
            del fpool
            torch.cuda.empty_cache()
        # write_kv of this workload's new tokens into a pool of 8 heads (6 of them, like one
        # layer's S part) -- informational
        from consa_vllm.plugin.ops import KVPool

        c = torch.zeros(cdiv(p.T, block_size) + 1, 2, block_size, 8, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k = torch.randn(p.T, 6, HEAD_DIM, device=device, dtype=torch.bfloat16)
        target = KVPool(c, None, torch.arange(p.T, device=device), 2, 6)
        if kv_fp8:
            from consa_vllm.plugin.ops.interface import FP8_DTYPE

            one = torch.ones(1, device=device).expand(6)
            target = KVPool(c.to(FP8_DTYPE), None, target.slot_mapping, 2, 6, k_scale=one, v_scale=one)
        r = timer.measure(lambda: th.write_kv(k, k, target))
        rows.append(dict(workload=wname, variant="write_kv_6heads", **r))
        _log_row("write_kv_6heads", r)
        del p, out, c, k, target
        torch.cuda.empty_cache()
    # Each FA3 pool variant against what a layer-wise model spends per layer at the same
    # sparsity, (nF/8) fa3_dense + (nS/8) fa3_all_sliding: > 1 means slower than layer-wise.
    for wname in workloads:
        ref = {r["variant"]: r for r in rows if r["workload"] == wname}
        if "fa3_dense" not in ref or "fa3_all_sliding" not in ref:
            continue
        for r in rows:
            if r["workload"] != wname or not r["variant"].startswith("fa3_pools_"):
                continue
            nf, ns = (int(x) for x in r["variant"].split("_")[2].rstrip("S").split("F"))
            for key in ("graph_cold_ms", "graph_warm_ms"):
                if key in r and key in ref["fa3_dense"] and key in ref["fa3_all_sliding"]:
                    equiv = (nf * ref["fa3_dense"][key] + ns * ref["fa3_all_sliding"][key]) / NUM_KV_HEADS
                    r[f"layerwise_equiv_{key}"] = equiv
                    r[f"vs_layerwise_{key[:-3]}"] = r[key] / equiv if equiv > 0 else None
    # Each variant with sinks against the same variant without (> 1: what the sinks cost).
    for r in rows:
        if r.get("sink"):
            base = [b for b in rows if b["workload"] == r["workload"] and not b.get("sink") and not b.get("sweep")
                    and b["variant"] == r["variant"].removesuffix(f"_sink{r['sink']}")]
            for key in ("graph_cold_ms", "graph_warm_ms"):
                if base and key in r and base[0].get(key):
                    r[f"vs_sink0_{key[:-3]}"] = r[key] / base[0][key]
    # speedups vs stock dense (graph cold if available)
    for wname in workloads:
        base = [r for r in rows if r["workload"] == wname and r["variant"] == "stock_dense"]
        if not base:
            continue
        for key in ("graph_cold_ms", "graph_warm_ms", "eager_ms"):
            if key in base[0] and base[0][key] > 0:
                for r in rows:
                    if r["workload"] == wname and key in r and r[key] > 0:
                        r[f"speedup_vs_stock_dense_{key[:-3]}"] = base[0][key] / r[key]
    return rows



# ---------------------------------------------------------------------------------------
# Whole-model decode (--whole-model): every layer of a model, summed in one CUDA graph
# ---------------------------------------------------------------------------------------

ALLOC_DIR = os.path.join(ROOT, "benchmarks", "allocations")
# name: layers, KV heads, query heads, window, allocations, contexts, batches (per context)
MODELS = {
    "qwen3-30b-a3b": dict(layers=48, hkv=4, hq=32, window=4096, allocations=("1F3S",),
                          runs=((32768, (1, 4, 16)),)),
    "qwen3-0.6b": dict(layers=28, hkv=8, hq=16, window=4096, allocations=("random", "equal"),
                       runs=((32768, (1, 4, 16)),)),
    "llama3.1-8b": dict(layers=32, hkv=8, hq=32, window=256, allocations=("duo-0.5",),
                        runs=((32768, (1, 4, 16)), (131072, (1, 4)))),
}


def model_splits(model: str, allocation: str) -> tuple[list, int]:
    """Per-layer (n_full, n_sliding) of an allocation of ``model``, and its sink size.

    "1F3S": one F head per layer; "equal": 2 F of 8 per layer; "random": the same 56 F
    heads spread by a seeded random walk with 0 .. 5 F heads per layer (issue 11's uneven
    case); "duo-0.5": DuoAttention's 50% pattern (benchmarks/allocations)."""
    spec = MODELS[model]
    n, hkv = spec["layers"], spec["hkv"]
    if allocation == "1F3S":
        return [(1, hkv - 1)] * n, 0
    if allocation == "equal":
        return [(2, hkv - 2)] * n, 0
    if allocation == "random":
        import random

        rng = random.Random(11)
        counts = [2] * n
        for _ in range(400):  # move F heads between layers, keeping 0 .. 5 per layer
            i, j = rng.randrange(n), rng.randrange(n)
            if counts[i] > 0 and counts[j] < 5:
                counts[i] -= 1
                counts[j] += 1
        return [(c, hkv - c) for c in counts], 0
    if allocation == "duo-0.5":
        with open(os.path.join(ALLOC_DIR, "duo-llama3.1-8b-0.5.json")) as f:
            alloc = json.load(f)
        assert alloc["window"] == spec["window"] and len(alloc["pattern"]) == n
        return [(row.count("F"), row.count("S")) for row in alloc["pattern"]], int(alloc.get("sink", 0))
    raise ValueError(allocation)


def time_graph(fn, reps, calls=2):
    """Median ms of one ``fn()`` over ``reps`` replays of a CUDA graph of ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


def _layer_pools(p: Problem, splits, sink):
    """One F pool for every F head of the model and one S pool (window blocks only) for
    every S head, as served: layer i reads its head slice (pool offsets)."""
    n_f, n_s = sum(f for f, _ in splits), sum(s for _, s in splits)
    fpool = p.full_pool(n_f) if n_f else None
    spool = p.sliding_pool(n_s, sink) if n_s else None
    layers, f_off, s_off = [], 0, 0
    for nf, ns in splits:
        layers.append(pools(p, nf, ns, fpool, spool, f_off, s_off, sink))
        f_off, s_off = f_off + nf, s_off + ns
    return layers


def _check_layers(p, layers, runners, checked):
    """Each distinct split's first layer through every runner (``name -> fn(full, sliding,
    out)``: the Triton op per config, FlashAttention 3 over the pools) vs the torch op
    (ops/torch_paged.py) on the same pools: max abs error (bf16)."""
    from consa_vllm.plugin.ops import torch_paged

    errs = {}
    for full, sliding in layers:
        key = (full.num_heads if full else 0, sliding.num_heads if sliding else 0)
        if key in checked:
            continue
        checked.add(key)
        ref = torch.zeros_like(p.query)
        torch_paged.hybrid_paged_attention(p.query, ref, p.batch, p.scale, full, sliding)
        for name, fn in runners.items():
            out = torch.full_like(p.query, float("nan"))
            fn(full, sliding, out)
            err = (out.float() - ref.float()).abs().max().item()
            errs[f"{key[0]}F{key[1]}S/{name}"] = err
            if not err < 2e-2:  # NaN fails too
                raise AssertionError(f"{name} {key}: max abs err {err} vs the torch op")
    return errs


def parse_shapes(text: str) -> list[tuple]:
    """``--whole-model-shapes``: a comma list of ``MODEL[:ALLOCATION[:CONTEXT[:BATCH]]]``
    (an omitted or ``*`` field matches all), e.g. ``llama3.1-8b:duo-0.5:32768:1,qwen3-30b-a3b``;
    each field checked against ``MODELS`` so that a typo fails instead of timing nothing."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        fields = [f.strip() for f in item.split(":")] + ["*"] * 3
        model, alloc, ctx, bs = [None if f in ("", "*") else f for f in fields[:4]]
        if len(item.split(":")) > 4 or model is None or model not in MODELS:
            raise ValueError(f"--whole-model-shapes: {item!r} is not MODEL[:ALLOCATION[:CONTEXT[:BATCH]]] "
                             f"with MODEL in {list(MODELS)}")
        spec = MODELS[model]
        if alloc is not None and alloc not in spec["allocations"]:
            raise ValueError(f"--whole-model-shapes: {item!r}: {model} allocations are {list(spec['allocations'])}")
        try:
            ctx = None if ctx is None else int(ctx)
            bs = None if bs is None else int(bs)
        except ValueError:
            raise ValueError(f"--whole-model-shapes: {item!r}: CONTEXT and BATCH are integers") from None
        runs = {(c, b) for c, batches in spec["runs"] for b in batches}
        if not any((ctx is None or c == ctx) and (bs is None or b == bs) for c, b in runs):
            raise ValueError(f"--whole-model-shapes: {item!r}: {model} runs (context, batch) in {sorted(runs)}")
        out.append((model, alloc, ctx, bs))
    return out


def shape_selected(shapes, model, allocation, ctx, bs) -> bool:
    """Whether ``parse_shapes``' selection (None: everything) holds this run."""
    return shapes is None or any(m == model and a in (None, allocation) and c in (None, ctx) and b in (None, bs)
                                 for m, a, c, b in shapes)


# FlashAttention 3 over the two pools, as the engine runs a hybrid layer outside the fused
# kernel's decode batches (ops/flash_pools.py, CONSA_FA3_OVERLAP on and off): name, overlap.
WHOLE_MODEL_FA3_POOLS = (("fa3_pools_overlap", True), ("fa3_pools_serial", False))


def _fused_layer(th, p, scratch, cfg, full, sliding, out):
    """One layer through the fused Triton op with launch config ``cfg``."""
    th.launch_attention(p.query, out, p.batch, p.scale, full, sliding, scratch, cfg)


def _fa3_pools_layers(fn, layers, out):
    """Every layer through FlashAttention 3 over its pools (``fn``: flash_attn_pools, bound)."""
    for full, sliding in layers:
        fn(output=out, full=full, sliding=sliding)


def run_models(th, device, reps, models, seg_sweep=(512,), shapes=None):
    """Whole-model decode time (all layers, one CUDA graph) per model, allocation, context
    and batch: the fused Triton op with the per-pool segment rule (``hybrid_rule``), with
    the old uniform 128 segments (``hybrid_uniform128``), with other F segment counts at
    batch 1 (``hybrid_segf<N>``); where vLLM's FlashAttention 3 is importable, the same
    uneven allocation through FlashAttention 3 over the two pools as the engine serves
    batches above the fused kernel's (``fa3_pools_overlap``: F and S launches on two streams,
    the served default; ``fa3_pools_serial``: one after the other), to tell whether small
    decode batches should go there too (``CONSA_FUSED_DECODE_MAX_SEQS``); and a layer-wise
    allocation at the same sparsity (round(F heads / KV heads) dense layers, the rest
    all-sliding) through the fused op (``layerwise_hybrid_rule``) and as stock vLLM decodes
    it (``layerwise_fa3``: one FlashAttention 3 varlen call per layer). ``shapes``:
    :func:`parse_shapes`' selection (None: every run of ``models``)."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fa = fa3_varlen()
    rows = []
    for model in models:
        spec = MODELS[model]
        hkv, hq = spec["hkv"], spec["hq"]
        for allocation in spec["allocations"]:
            splits, sink = model_splits(model, allocation)
            n_f = sum(f for f, _ in splits)
            checked = set()
            for ctx, batches in spec["runs"]:
                for bs in batches:
                    if not shape_selected(shapes, model, allocation, ctx, bs):
                        continue
                    p = Problem([(ctx - 1, 1)] * bs, 16, spec["window"], torch.bfloat16, device, seed=3,
                                hq=hq, hkv=hkv)
                    out = torch.empty_like(p.query)
                    base = dict(model=model, allocation=allocation, context=ctx, batch=bs, layers=len(splits),
                                f_heads=n_f, heads=hkv * len(splits), window=spec["window"], sink=sink)
                    tag = f"{model} {allocation} ctx={ctx} b={bs}"
                    layers = _layer_pools(p, splits, sink)
                    scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(hkv), hq, HEAD_DIM, device)
                    assert th.would_use_3d(p.query, p.batch, scratch), "decode batch beyond the 3D threshold"
                    configs = {"hybrid_rule": th.LaunchConfig(), "hybrid_uniform128": th.LaunchConfig(segments=(128, 128))}
                    if bs == 1:
                        for seg_f in seg_sweep:
                            configs[f"hybrid_segf{seg_f}"] = th.LaunchConfig(segments=(seg_f, None))
                    runners = {name: functools.partial(_fused_layer, th, p, scratch, cfg)
                               for name, cfg in configs.items()}
                    fa3 = {name: functools.partial(flash_attn_pools, fa, p.query, batch=p.batch, scale=p.scale,
                                                   overlap=overlap)
                           for name, overlap in WHOLE_MODEL_FA3_POOLS} if fa is not None else {}
                    for name, fn in fa3.items():
                        runners[name] = lambda full, sliding, o, fn=fn: fn(output=o, full=full, sliding=sliding)
                    if not checked or bs == 1:
                        errs = _check_layers(p, layers, runners, checked)
                        if errs:
                            log(f"  check {tag}: max err {max(errs.values()):.2e} over {len(errs)} layer x variant")
                            rows.append(dict(base, variant="check_vs_torch", max_abs_err=errs))
                    for cname, cfg in configs.items():
                        def run(cfg=cfg):
                            for full, sliding in layers:
                                th.launch_attention(p.query, out, p.batch, p.scale, full, sliding, scratch, cfg)
                        ms = time_graph(run, reps)
                        seg = th.decode_segments(spec["window"], sink, th.DEFAULT_TILE_3D, bs, bs, scratch.capacity,
                                                 cfg.segments)
                        rows.append(dict(base, variant=cname, ms=ms, seg_f=seg[0], seg_s=seg[1]))
                        log(f"  {tag:44s} {cname:20s} {ms:8.4f} ms (seg_f {seg[0]}, seg_s {seg[1]})")
                    for name, overlap in WHOLE_MODEL_FA3_POOLS if fa is not None else ():
                        run = functools.partial(_fa3_pools_layers, fa3[name], layers, out)
                        ms = time_graph(run, reps)
                        rows.append(dict(base, variant=name, ms=ms, overlap=overlap))
                        log(f"  {tag:44s} {name:20s} {ms:8.4f} ms (two FlashAttention 3 launches per mixed layer)")
                    del layers
                    torch.cuda.empty_cache()
                    # Layer-wise at the same sparsity: round(F heads / KV heads) dense layers,
                    # the rest all-sliding; through the fused op (same rule: isolates what the
                    # uneven split costs) and, with vLLM's FlashAttention 3, as stock decodes.
                    n_dense = round(n_f / hkv)
                    lw = [(hkv, 0)] * n_dense + [(0, hkv)] * (len(splits) - n_dense)
                    layers = _layer_pools(p, lw, sink)

                    def run_lw_fused():
                        for full, sliding in layers:
                            th.launch_attention(p.query, out, p.batch, p.scale, full, sliding, scratch, th.LaunchConfig())
                    ms = time_graph(run_lw_fused, reps)
                    rows.append(dict(base, variant="layerwise_hybrid_rule", ms=ms, dense_layers=n_dense))
                    log(f"  {tag:44s} {'layerwise_hybrid_rule':20s} {ms:8.4f} ms ({n_dense} dense layers)")
                    del scratch
                    if fa is not None:

                        def run_lw():
                            for full, sliding in layers:
                                fa3_pools(fa, p, full, sliding, out)()
                        ms = time_graph(run_lw, reps)
                        rows.append(dict(base, variant="layerwise_fa3", ms=ms, dense_layers=n_dense))
                        log(f"  {tag:44s} {'layerwise_fa3':20s} {ms:8.4f} ms ({n_dense} dense layers)")
                    del layers, p, out
                    torch.cuda.empty_cache()
    # ratios within each (model, allocation, context, batch)
    for r in rows:
        if "ms" not in r:
            continue
        same = {x["variant"]: x["ms"] for x in rows if "ms" in x and all(
            x[k] == r[k] for k in ("model", "allocation", "context", "batch"))}
        for ref in ("hybrid_rule", "hybrid_uniform128", "layerwise_hybrid_rule", "layerwise_fa3"):
            if ref in same and r["variant"] != ref:
                r[f"vs_{ref}"] = r["ms"] / same[ref]
    return rows


def main():
    from consa_vllm.plugin.ops.triton_hybrid import DEFAULT_NUM_SEGMENTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {list(WORKLOADS)}")
    ap.add_argument("--num-segments", type=int, default=DEFAULT_NUM_SEGMENTS,
                    help=f"3D split-KV segments of the hybrid kernel (power of 2; served: {DEFAULT_NUM_SEGMENTS})")
    ap.add_argument("--sweep", default="",
                    help="extra decode configurations of the hybrid kernel to time, as "
                         "SEGMENTS:TILE:WARPS[:STAGES],... (e.g. 128:16:4,256:32:4:3)")
    ap.add_argument("--pool-layers", type=int, default=1,
                    help="size the F/S pools for this many layers' heads (as served: strided reads)")
    ap.add_argument("--sinks", default="0",
                    help="sink sizes to time the S heads with, comma list (e.g. 0,64; 0 = no sinks)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="fp8: the F/S pools hold FP8 (scales 1.0); vLLM's kernel is then not run")
    ap.add_argument("--no-stock", action="store_true", help="do not run vLLM's kernel")
    ap.add_argument("--whole-model", action="store_true",
                    help="time whole-model decode (all layers) for --models instead of one layer")
    ap.add_argument("--models", default=",".join(MODELS), help=f"with --whole-model: comma list from {list(MODELS)}")
    ap.add_argument("--whole-model-shapes", default="",
                    help="with --whole-model: only these runs, comma list of MODEL[:ALLOCATION[:CONTEXT[:BATCH]]] "
                         "(omitted or * = all), e.g. llama3.1-8b:duo-0.5:32768:1,qwen3-30b-a3b:*:*:4; "
                         "their models replace --models")
    args = ap.parse_args()
    shapes = None
    if args.whole_model_shapes:  # checked before CUDA: a typo fails at once, anywhere
        try:
            shapes = parse_shapes(args.whole_model_shapes)
        except ValueError as e:
            sys.exit(str(e))

    if not torch.cuda.is_available():
        sys.exit("bench_hybrid_kernel: CUDA is not available (this is a GPU benchmark)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_hybrid_kernel: unset TRITON_INTERPRET")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    sinks = sorted({int(x) for x in args.sinks.split(",") if x.strip()} | {0})
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        sys.exit(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
    device = torch.device("cuda")
    torch.manual_seed(0)

    import triton

    from consa_vllm.plugin.ops import triton_hybrid as th

    from machine import machine_name  # this folder's helper, on sys.path when run as a script

    report = dict(
        device=machine_name("cuda"), torch=torch.__version__,
        triton=triton.__version__, python=platform.python_version(),
        shape=dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                   dtype="bfloat16", window=args.window, block_size=args.block_size,
                   hybrid_num_segments=args.num_segments, pool_layers=args.pool_layers, sinks=sinks,
                   kv_cache_dtype=args.kv_cache_dtype),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        notes="ms per call (one layer); graph_* = CUDA-graph replay of 10 calls, median; "
              "cold = L2 flushed before each call (flush time subtracted)",
    )
    if args.whole_model:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in MODELS]
        if bad:
            sys.exit(f"unknown models {bad}; choose from {list(MODELS)}")
        if shapes is not None:
            models = [m for m in MODELS if any(s[0] == m for s in shapes)]
        report.pop("shape")
        report["models"] = {m: MODELS[m] for m in models}
        report["notes"] = ("ms per decode step over all layers' attention (CUDA-graph replay of 2 steps, median "
                           f"of {args.reps}); vs_* = ms / the reference's ms at the same model, allocation, "
                           "context and batch")
        t0 = time.time()
        report["shapes"] = args.whole_model_shapes or "all"
        report["results"] = run_models(th, device, args.reps, models, shapes=shapes)
        report["wall_s"] = time.time() - t0
        _write(args.out, report)
        log(f"wrote {args.out} ({report['wall_s']:.0f} s)")
        return
    stock = None
    if not args.no_stock and args.kv_cache_dtype == "auto":
        try:
            import vllm
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention

            report["vllm"] = vllm.__version__
            stock = Stock(device, NUM_Q_HEADS, HEAD_DIM, unified_attention)
        except Exception as e:
            report["stock_error"] = repr(e)
            log(f"WARNING: stock vLLM kernel unavailable, timing the hybrid kernel only: {e!r}")
    report["results"] = run_timing(th, stock, device, args.block_size, args.window, args.reps, workloads,
                                   args.num_segments,
                                   [tuple(int(x) for x in c.split(":")) for c in args.sweep.split(",") if c],
                                   args.pool_layers, sinks, args.kv_cache_dtype == "fp8")
    _write(args.out, report)
    log(f"wrote {args.out}")


def _write(path, report):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
