#!/usr/bin/env python
"""GPU microbenchmark of the fused hybrid (F + S heads) paged attention kernel.

One attention layer at the Qwen3-0.6B shape (16 query heads, 8 KV heads, head_dim 128,
bf16, window 4096), compared with vLLM's stock Triton ``unified_attention``:

  stock_dense   : stock kernel, all 8 KV heads full attention
  stock_all_swa : stock kernel, all 8 KV heads sliding window
  hybrid_<nF>F<nS>S : our kernel, nF heads through the F pool/table, nS through the S
                  pool/table (S pool holds only the window's blocks; out-of-window table
                  entries point at the null block 0), for 2F6S, 4F4S, 8F0S, 0F8S

Workloads: decode batch 1 and 4 at 32k context, batch 16, 64 and 128 at 16k, a 2048-token
prefill chunk on top of 14k context, and an 8k prompt prefill.  With FlashAttention 3
available (vLLM on Hopper) it also times what vLLM runs per layer: FA3 over a dense layer
(full and all-sliding) and FA3 twice over the F and S pools; ``--pool-layers L`` sizes the
pools for L layers so that a layer reads its heads strided, as when served.

Before timing it checks correctness on the GPU at smaller sizes: the Triton kernel (2D and
3D paths, every split, bf16 and fp32) vs the torch implementation, Triton write_kv vs torch
write_kv, and hybrid 8F0S / 0F8S vs the stock kernel.  Exits non-zero if a check fails
(use --skip-check-failures to time anyway).

Timing: CUDA events around CUDA-graph replays of 10 back-to-back calls (what vLLM decode
sees; no Python launch overhead), median over --reps replays; "warm" = KV may sit in L2
from the previous call, "cold" = an L2-flushing memset before every call, its own time
subtracted.  Eager (no graph) mean time is reported too.

    python benchmarks/bench_hybrid_kernel.py --out benchmarks/results/hybrid_kernel_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

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
                 hkv=NUM_KV_HEADS, d=HEAD_DIM):
        self.seqs, self.B, self.W, self.dtype, self.dev = seqs, block_size, window, dtype, device
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
        self.query = torch.randn(self.T, hq, d, generator=self.gen, device=device, dtype=dtype)
        self.scale = d ** -0.5

    def _rand_cache(self, num_blocks, heads):
        c = torch.empty(num_blocks, 2, self.B, heads, self.d, device=self.dev, dtype=self.dtype)
        c.normal_(generator=self.gen)
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

    def swa_pool(self, heads):
        """Pool holding only the blocks a sliding-window manager keeps (window of the first
        new token on); earlier table entries = null block 0."""
        firsts, need = [], []
        for (ctx, q), L in zip(self.seqs, self.seq_lens_list):
            first = max(0, ctx - self.W + 1) // self.B
            firsts.append(first)
            need.append(cdiv(L, self.B) - first)
        num_blocks = sum(need) + 1
        cache = self._rand_cache(num_blocks, heads)
        perm = torch.randperm(num_blocks - 1, device=self.dev, generator=self.gen) + 1
        max_blocks = max(cdiv(L, self.B) for L in self.seq_lens_list)
        table = torch.zeros(len(self.seqs), max_blocks, dtype=torch.int32, device=self.dev)
        pos = 0
        for s, (first, n) in enumerate(zip(firsts, need)):
            table[s, first:first + n] = perm[pos:pos + n].to(torch.int32)
            pos += n
        return cache, table


def hybrid_args(p: Problem, nf, ns, fpool, spool, out, f_off=0, s_off=0):
    fc, ft = fpool if nf else (None, None)
    sc, st = spool if ns else (None, None)
    return (p.query, out, p.query_start_loc, p.seq_lens, p.scale,
            fc, ft, f_off, nf, sc, st, s_off, ns, p.W, p.max_query_len, p.max_seq_len)


# ---------------------------------------------------------------------------------------
# Stock vLLM kernel
# ---------------------------------------------------------------------------------------


def load_stock_from_source(src_dir):
    """Load vLLM's triton_unified_attention.py + triton_attention_helpers.py (copied from a
    vLLM 0.26 install into ``src_dir``) without vLLM installed, by stubbing the few vLLM
    modules they import.  For GPU machines that have torch + triton but no vLLM."""
    import enum
    import importlib.util
    import logging
    import types

    import triton
    import triton.language as tl

    files = {n: os.path.join(src_dir, n) for n in
             ("triton_unified_attention.py", "triton_attention_helpers.py")}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"stock kernel sources missing: {missing}")

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__path__ = []  # make it a package so submodules resolve
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class _Platform:
        @staticmethod
        def fp8_dtype():
            return torch.float8_e4m3fn

        @staticmethod
        def is_device_capability_family(cap):
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor >= cap and major == cap // 10

    class KVQuantMode(enum.IntEnum):
        NONE = 0
        FP8_PER_TENSOR = 1
        INT8_PER_TOKEN_HEAD = 2
        FP8_PER_TOKEN_HEAD = 3
        INT4_PER_TOKEN_HEAD = 4
        NVFP4 = 5

    mod("vllm")
    mod("vllm.envs", VLLM_BATCH_INVARIANT=False)
    mod("vllm.logger", init_logger=logging.getLogger)
    mod("vllm.platforms", current_platform=_Platform())
    mod("vllm.triton_utils", tl=tl, triton=triton)
    mod("vllm.v1")
    mod("vllm.v1.kv_cache_interface", KVQuantMode=KVQuantMode)
    mod("vllm.v1.attention")
    mod("vllm.v1.attention.ops")
    out = None
    for short in ("triton_attention_helpers", "triton_unified_attention"):
        name = f"vllm.v1.attention.ops.{short}"
        spec = importlib.util.spec_from_file_location(name, files[short + ".py"])
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
        out = m
    return out.unified_attention


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
# Correctness
# ---------------------------------------------------------------------------------------


def check_correctness(ops, th, stock, device, block_size):
    from consa_vllm.plugin.ops import torch_paged

    results = []
    ok = True
    W = 512
    fa = fa3_varlen()  # the served FlashAttention path is checked in bf16 only
    cases = {
        # mixed batch -> 2D path: prefill chunks with prior context + decodes
        "mixed_2d": [(1500, 300), (0, 700), (3000, 1), (600, 1), (2048, 64)],
        # decode batch <= threshold -> 3D path
        "decode_3d": [(5000, 1), (300, 1), (1023, 1), (4096, 1)],
        # decode batch > threshold -> 2D path
        "decode_2d": [(700 + 97 * i, 1) for i in range(20)],
    }
    for dtype in (torch.bfloat16, torch.float32):
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        for cname, seqs in cases.items():
            p = Problem(seqs, block_size, W, dtype, device, seed=1)
            fpool = p.full_pool(NUM_KV_HEADS)
            spool = p.swa_pool(NUM_KV_HEADS)
            for nf, ns in SPLITS + [(1, 7)]:
                out = torch.full_like(p.query, float("nan"))
                ref = torch.zeros_like(p.query)
                th.hybrid_paged_attention(*hybrid_args(p, nf, ns, fpool, spool, out))
                torch_paged.hybrid_paged_attention(*hybrid_args(p, nf, ns, fpool, spool, ref))
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                good = math.isfinite(err) and err < tol
                ok &= good
                path = "3d" if th.would_use_3d(
                    p.query, p.query_start_loc, p.max_query_len,
                    th._cached_scratch(device, p.hq, p.d,
                                       th.default_seq_threshold_3d(nf + ns)),
                    th.default_seq_threshold_3d(nf + ns)) else "2d"
                results.append(dict(check="triton_vs_torch", case=cname, dtype=str(dtype),
                                    split=f"{nf}F{ns}S", path=path, max_abs_err=err,
                                    tol=tol, ok=good))
                log(f"  check {cname:10s} {str(dtype):15s} {nf}F{ns}S [{path}] "
                    f"max_abs_err={err:.2e} {'ok' if good else 'FAIL'}")
            # the served FA3 path (two launches, overlapped or not, F splits) vs torch
            for nf, ns in ((2, 6), (1, 7), (4, 4)) if fa is not None and dtype == torch.bfloat16 else ():
                ref = torch.zeros_like(p.query)
                torch_paged.hybrid_paged_attention(*hybrid_args(p, nf, ns, fpool, spool, ref))
                for suffix, overlap, f_splits in FA3_POOL_VARIANTS:
                    out = torch.full_like(p.query, float("nan"))
                    fa3_pools(fa, p, nf, ns, fpool, spool, out, overlap=overlap, f_splits=f_splits)()
                    torch.cuda.synchronize()
                    err = (out.float() - ref.float()).abs().max().item()
                    good = math.isfinite(err) and err < tol
                    ok &= good
                    results.append(dict(check="fa3_pools_vs_torch", case=cname, dtype=str(dtype),
                                        split=f"{nf}F{ns}S", variant=suffix or "serial",
                                        max_abs_err=err, tol=tol, ok=good))
                    log(f"  check {cname:10s} fa3_pools{suffix or '_serial'} {nf}F{ns}S "
                        f"max_abs_err={err:.2e} {'ok' if good else 'FAIL'}")
            # stock vs hybrid on identical data (dense pool for both F and S heads)
            if stock is not None:
                dense_c, dense_t = fpool
                for nf, ns, win in ((8, 0, 0), (0, 8, W)):
                    o1 = torch.zeros_like(p.query)
                    o2 = torch.zeros_like(p.query)
                    stock(p, dense_c, dense_t, o1, win)
                    th.hybrid_paged_attention(*hybrid_args(p, nf, ns, fpool, fpool, o2))
                    torch.cuda.synchronize()
                    err = (o1.float() - o2.float()).abs().max().item()
                    good = math.isfinite(err) and err < 2e-2  # stock uses tf32 on fp32
                    ok &= good
                    results.append(dict(check="hybrid_vs_stock", case=cname,
                                        dtype=str(dtype), split=f"{nf}F{ns}S",
                                        max_abs_err=err, tol=2e-2, ok=good))
                    log(f"  check {cname:10s} {str(dtype):15s} {nf}F{ns}S vs stock "
                        f"max_abs_err={err:.2e} {'ok' if good else 'FAIL'}")
            del p, fpool, spool
    # write_kv
    for dtype in (torch.bfloat16, torch.float32):
        c1 = torch.zeros(64, 2, block_size, 12, HEAD_DIM, device=device, dtype=dtype)
        c2 = torch.zeros_like(c1)
        k = torch.randn(300, 4, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn(300, 4, HEAD_DIM, device=device, dtype=dtype)
        slots = torch.randperm(64 * block_size, device=device)[:300]
        slots[::17] = -1
        th.write_kv(k, v, c1, slots, 5)
        torch_paged.write_kv(k, v, c2, slots, 5)
        good = torch.equal(c1, c2)
        ok &= good
        results.append(dict(check="write_kv", dtype=str(dtype), ok=good))
        log(f"  check write_kv {dtype}: {'ok' if good else 'FAIL'}")
    return ok, results


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


def fa3_pools(fa, p: Problem, nf, ns, fpool, spool, out, f_off=0, s_off=0, overlap=False, f_splits=0):
    """The served FA3 path (ops.flash_pools): F heads over the F pool, S heads over the S pool."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fc, ft = fpool if nf else (None, None)
    sc, st = spool if ns else (None, None)

    def run():
        flash_attn_pools(fa, p.query, out, p.query_start_loc, p.seq_lens, p.max_query_len, p.max_seq_len,
                         p.scale, fc, ft, f_off, nf, sc, st, s_off, ns, p.W,
                         overlap=overlap, f_splits=f_splits)
    return run


# FA3 two-pool variants timed for every F+S split: (name suffix, overlap, F-launch splits).
FA3_POOL_VARIANTS = (("", False, 0), ("_overlap", True, 0), ("_fsplit2", False, 2),
                     ("_fsplit4", False, 4), ("_overlap_fsplit2", True, 2))


def run_timing(th, stock, device, block_size, window, reps, workloads, num_segments=64,
               sweep=None, pool_layers=1):
    rows = []
    timer = Timer(device, reps)
    fa = fa3_varlen()
    for wname in workloads:
        seqs = WORKLOADS[wname]
        p = Problem(seqs, block_size, window, torch.bfloat16, device, seed=2)
        out = torch.empty_like(p.query)
        log(f"== {wname}: {len(seqs)} seqs, q_len {p.max_query_len}, seq_len {p.max_seq_len}")
        variants = []
        dense = p.full_pool(NUM_KV_HEADS)
        if stock is not None:
            variants.append(("stock_dense", lambda: stock(p, dense[0], dense[1], out, 0)))
            variants.append(("stock_all_swa",
                             lambda: stock(p, dense[0], dense[1], out, window)))
        for name, fn in variants:
            r = timer.measure(fn)
            rows.append(dict(workload=wname, variant=name, **r))
            log(f"  {name:16s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()
                                              if isinstance(v, float)))
        if fa is not None:
            # What a stock layer-wise model runs per layer: FA3 over all heads, full or
            # sliding. A layer-wise model at sparsity rho costs (1-rho) fa3_dense + rho
            # fa3_all_swa per layer, to compare with fa3_pools_<nF>F<nS>S at nS/8 = rho.
            for vname, nf, ns in (("fa3_dense", NUM_KV_HEADS, 0), ("fa3_all_swa", 0, NUM_KV_HEADS)):
                r = timer.measure(fa3_pools(fa, p, nf, ns, dense, dense, out))
                rows.append(dict(workload=wname, variant=vname, **r))
                log(f"  {vname:16s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()
                                                  if isinstance(v, float)))
        del dense
        torch.cuda.empty_cache()
        for nf, ns in SPLITS:
            # As served, a pool holds the heads of many layers and a layer reads its slice
            # (strided by the pool's head count): --pool-layers L sizes the pools for L layers.
            fpool = p.full_pool(nf * pool_layers) if nf else None
            spool = p.swa_pool(ns * pool_layers) if ns else None
            f_off, s_off = nf * (pool_layers // 2), ns * (pool_layers // 2)
            args = hybrid_args(p, nf, ns, fpool, spool, out, f_off, s_off)
            name = f"hybrid_{nf}F{ns}S"
            thr = th.default_seq_threshold_3d(nf + ns)
            kw = dict(scratch=th.make_hybrid_scratch(thr, p.hq, p.d, device, num_segments),
                      seq_threshold_3d=thr)
            th.hybrid_paged_attention(*args, **kw)  # compile before capture
            r = timer.measure(lambda: th.hybrid_paged_attention(*args, **kw))
            r["path"] = "3d" if (p.max_query_len <= 1 and len(seqs) <= thr) else "2d"
            rows.append(dict(workload=wname, variant=name, **r))
            log(f"  {name:16s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()
                                              if isinstance(v, float)) + f" [{r['path']}]")
            for suffix, overlap, f_splits in FA3_POOL_VARIANTS if (fa is not None and nf and ns) else ():
                r = timer.measure(fa3_pools(fa, p, nf, ns, fpool, spool, out, f_off, s_off, overlap, f_splits))
                vname = f"fa3_pools_{nf}F{ns}S{suffix}"
                rows.append(dict(workload=wname, variant=vname, overlap=overlap, f_splits=f_splits, **r))
                log(f"  {vname:28s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()
                                                   if isinstance(v, float)))
            for segs, tile, warps, *stages in (sweep or []) if (nf and ns and p.max_query_len <= 1) else []:
                kw2 = dict(scratch=th.make_hybrid_scratch(thr, p.hq, p.d, device, segs),
                           seq_threshold_3d=thr, tile_size=tile, num_warps=warps,
                           num_stages=stages[0] if stages else None)
                th.hybrid_paged_attention(*args, **kw2)
                r = timer.measure(lambda: th.hybrid_paged_attention(*args, **kw2))
                rows.append(dict(workload=wname, variant=name, num_segments=segs, tile=tile,
                                 num_warps=warps, num_stages=stages[0] if stages else None,
                                 sweep=True, **r))
                log(f"  {name} segs={segs} tile={tile} warps={warps} stages={stages} "
                    + " ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)))
            del fpool, spool, args
            torch.cuda.empty_cache()
        # write_kv of this workload's new tokens into an S-sized pool (2 heads, like one
        # layer's F part) -- informational
        c = torch.zeros(cdiv(p.T, block_size) + 1, 2, block_size, 8, HEAD_DIM,
                        device=device, dtype=torch.bfloat16)
        k = torch.randn(p.T, 6, HEAD_DIM, device=device, dtype=torch.bfloat16)
        slots = torch.arange(p.T, device=device)
        r = timer.measure(lambda: th.write_kv(k, k, c, slots, 2))
        rows.append(dict(workload=wname, variant="write_kv_6heads", **r))
        log(f"  write_kv 6 heads  eager_ms={r['eager_ms']:.4f} "
            f"graph_warm_ms={r.get('graph_warm_ms', float('nan')):.4f}")
        del p, out, c, k
        torch.cuda.empty_cache()
    # Each FA3 pool variant against what a layer-wise model spends per layer at the same
    # sparsity, (nF/8) fa3_dense + (nS/8) fa3_all_swa: > 1 means slower than layer-wise.
    for wname in workloads:
        ref = {r["variant"]: r for r in rows if r["workload"] == wname}
        if "fa3_dense" not in ref or "fa3_all_swa" not in ref:
            continue
        for r in rows:
            if r["workload"] != wname or not r["variant"].startswith("fa3_pools_"):
                continue
            nf, ns = (int(x) for x in r["variant"].split("_")[2].rstrip("S").split("F"))
            for key in ("graph_cold_ms", "graph_warm_ms"):
                if key in r and key in ref["fa3_dense"] and key in ref["fa3_all_swa"]:
                    equiv = (nf * ref["fa3_dense"][key] + ns * ref["fa3_all_swa"][key]) / NUM_KV_HEADS
                    r[f"layerwise_equiv_{key}"] = equiv
                    r[f"vs_layerwise_{key[:-3]}"] = r[key] / equiv if equiv > 0 else None
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


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list from {list(WORKLOADS)}")
    ap.add_argument("--skip-check", action="store_true", help="skip correctness checks")
    ap.add_argument("--skip-check-failures", action="store_true",
                    help="time even if a correctness check fails")
    ap.add_argument("--num-segments", type=int, default=64,
                    help="3D split-KV segments of the hybrid kernel (power of 2)")
    ap.add_argument("--sweep", default="",
                    help="extra decode configurations of the hybrid kernel to time, as "
                         "SEGMENTS:TILE:WARPS[:STAGES],... (e.g. 128:16:4,256:32:4:3)")
    ap.add_argument("--pool-layers", type=int, default=1,
                    help="size the F/S pools for this many layers' heads (as served: strided reads)")
    ap.add_argument("--no-stock", action="store_true", help="do not run vLLM's kernel")
    ap.add_argument("--stock-src", default=os.environ.get("CONSA_VLLM_STOCK_SRC"),
                    help="folder holding vLLM 0.26's triton_unified_attention.py and "
                         "triton_attention_helpers.py, used when vllm is not importable")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_hybrid_kernel: CUDA is not available (this is a GPU benchmark)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_hybrid_kernel: unset TRITON_INTERPRET")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        sys.exit(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
    device = torch.device("cuda")
    torch.manual_seed(0)

    import triton

    from consa_vllm.plugin import ops
    from consa_vllm.plugin.ops import triton_hybrid as th

    report = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, python=platform.python_version(),
        shape=dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                   dtype="bfloat16", window=args.window, block_size=args.block_size,
                   hybrid_num_segments=args.num_segments, pool_layers=args.pool_layers),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        notes="ms per call (one layer); graph_* = CUDA-graph replay of 10 calls, median; "
              "cold = L2 flushed before each call (flush time subtracted)",
    )
    stock = None
    if not args.no_stock:
        try:
            try:
                import vllm
                from vllm.v1.attention.ops.triton_unified_attention import unified_attention

                report["vllm"] = vllm.__version__
            except ImportError as e:
                if not args.stock_src:
                    raise RuntimeError(f"vllm not importable ({e!r}) and no --stock-src")
                for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
                    del sys.modules[k]
                unified_attention = load_stock_from_source(args.stock_src)
                report["vllm"] = f"stock kernel source from {args.stock_src}"
            stock = Stock(device, NUM_Q_HEADS, HEAD_DIM, unified_attention)
        except Exception as e:
            report["stock_error"] = repr(e)
            log(f"WARNING: stock vLLM kernel unavailable, timing hybrid only: {e!r}")

    ok = True
    if not args.skip_check:
        log("== correctness (GPU, small sizes)")
        try:
            ok, checks = check_correctness(ops, th, stock, device, args.block_size)
        except Exception:
            traceback.print_exc()
            ok, checks = False, [dict(check="exception", error=traceback.format_exc())]
        report["correctness_ok"] = ok
        report["checks"] = checks
        if not ok and not args.skip_check_failures:
            _write(args.out, report)
            sys.exit("bench_hybrid_kernel: correctness check FAILED (see JSON); "
                     "--skip-check-failures to time anyway")
    report["results"] = run_timing(th, stock, device, args.block_size, args.window,
                                   args.reps, workloads, args.num_segments,
                                   [tuple(int(x) for x in c.split(":")) for c in args.sweep.split(",") if c],
                                   args.pool_layers)
    _write(args.out, report)
    log(f"wrote {args.out}")


def _write(path, report):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
