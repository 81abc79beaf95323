"""GPU correctness of the hybrid attention ops (skipped without CUDA).

At served sizes (16 query / 8 KV heads, head_dim 128, window 512, contexts to 5k, F and S
pools with their own block sizes, strided pages, garbage out-of-window block-table
entries): the Triton kernel (2D and 3D paths, every F/S split, bf16 and fp32, sinks 0, 1,
4, 16, 64) and the Triton K/V write against the torch implementation (itself checked
against a dense reference in tests/test_ops.py); with vLLM importable, FlashAttention 3
over the pools (two launches, in sequence and on two streams; with sinks, plus the sink
merge) against the same, and the Triton kernel with all heads F or all heads S against
vLLM's own Triton kernel. FP8 pools (per-tensor and per-head scales): the Triton kernel
and K/V write against torch, the one-launch FP8 query quantization of the FlashAttention path
against torch's per-pool one (bytes), FlashAttention 3 calibrated against its own single-launch
error on the same data.  Exact window / sink edges (large distinct V at keys i - W, i - W + 1,
sink - 1, sink; the result must be far closer to the dense reference than to any
off-by-one one) for the Triton 2D / 3D paths (served and uneven per-pool segment counts)
and FlashAttention 3 over the pools (with the sink merge), bf16; and the compiled-variant
count of the attention kernel over layers with different F/S splits.

Run on the GPU machine: ``python -m pytest -q tests/test_gpu_ops.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from test_ops import boundary_refs, check_boundaries, make_case  # noqa: E402

from consa_vllm.plugin.ops import KVPool  # noqa: E402
from consa_vllm.plugin.ops import torch_paged  # noqa: E402
from consa_vllm.plugin.ops.interface import FP8_DTYPE, quantize_fp8  # noqa: E402

HQ, HKV, D, W = 16, 8, 128, 512
BLOCK_F, BLOCK_S = 16, 32
CASES = {
    # mixed batch -> 2D path: prefill chunks with prior context + decodes
    "mixed_2d": [(1500, 300), (0, 700), (3000, 1), (600, 1), (2048, 64)],
    # decode batch <= threshold -> 3D path
    "decode_3d": [(5000, 1), (300, 1), (1023, 1), (4096, 1)],
    # decode batch > threshold -> 2D path
    "decode_2d": [(700 + 97 * i, 1) for i in range(20)],
}
SPLITS = [(2, 6), (4, 4), (8, 0), (0, 8), (1, 7)]
TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-3}


def _case(name, nf, ns, dtype, sink=0, kv_fp8=None):
    return make_case(CASES[name], nf, ns, HQ // HKV, D, BLOCK_F, BLOCK_S, W, dtype=dtype, extra_heads=(3, 2),
                     seed=1, device="cuda", sink=sink, kv_fp8=kv_fp8)


def _max_err(out, ref, num_tokens):
    return (out[:num_tokens].float() - ref[:num_tokens].float()).abs().max().item()


def _torch_reference(case):
    ref = torch.zeros_like(case.query)
    torch_paged.hybrid_paged_attention(*case.args(ref))
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_vs_torch(name, dtype):
    from consa_vllm.plugin.ops import triton_hybrid as th

    for nf, ns in SPLITS:
        case = _case(name, nf, ns, dtype)
        scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
        out = torch.full_like(case.query, float("nan"))
        th.hybrid_paged_attention(*case.args(out), scratch=scratch)
        ref = _torch_reference(case)
        err = _max_err(out, ref, case.query.shape[0])
        path = "3d" if th.would_use_3d(case.query, case.batch, scratch) else "2d"
        print(f"{name} {dtype} {nf}F{ns}S [{path}] max_abs_err={err:.2e}")
        assert path == name.split("_")[1]
        assert math.isfinite(err) and err < TOL[dtype], (name, dtype, nf, ns, err)


SINKS = (1, 4, 16, 64)


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_sinks_vs_torch(name, sink):
    """S heads with sinks (the S pool keeps the sink blocks, frees those up to the window)."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    for nf, ns in ((2, 6), (0, 8)):
        for dtype in (torch.bfloat16, torch.float32):
            case = _case(name, nf, ns, dtype, sink)
            scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
            out = torch.full_like(case.query, float("nan"))
            th.hybrid_paged_attention(*case.args(out), scratch=scratch)
            err = _max_err(out, _torch_reference(case), case.query.shape[0])
            print(f"{name} sink {sink} {dtype} {nf}F{ns}S max_abs_err={err:.2e}")
            assert math.isfinite(err) and err < TOL[dtype], (name, sink, dtype, nf, ns, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_write_kv_vs_torch(dtype):
    from consa_vllm.plugin.ops import triton_hybrid as th

    gen = torch.Generator(device="cuda").manual_seed(0)
    c1 = torch.zeros(64, 2, BLOCK_F, 12, D, device="cuda", dtype=dtype)
    c2 = torch.zeros_like(c1)
    k = torch.randn(300, 4, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(300, 4, D, device="cuda", dtype=dtype, generator=gen)
    slots = torch.randperm(64 * BLOCK_F, device="cuda", generator=gen)[:300]
    slots[::17] = -1
    th.write_kv(k, v, KVPool(c1, None, slots, 5, 4))
    torch_paged.write_kv(k, v, KVPool(c2, None, slots, 5, 4))
    assert torch.equal(c1, c2) and c1.abs().sum() > 0
    # one launch for both pools vs two torch writes
    f1 = torch.zeros(40, 2, BLOCK_F, 6, D, device="cuda", dtype=dtype)
    s1 = torch.zeros(30, 2, BLOCK_S, 9, D, device="cuda", dtype=dtype)
    f2, s2 = torch.zeros_like(f1), torch.zeros_like(s1)
    k = torch.randn(300, 5, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(300, 5, D, device="cuda", dtype=dtype, generator=gen)
    fslots = torch.randperm(40 * BLOCK_F, device="cuda", generator=gen)[:300]
    sslots = torch.randperm(30 * BLOCK_S, device="cuda", generator=gen)[:300].to(torch.int32)
    fslots[::13] = -1
    th.write_kv_hybrid(k, v, KVPool(f1, None, fslots, 1, 2), KVPool(s1, None, sslots, 4, 3, window=W))
    torch_paged.write_kv_hybrid(k, v, KVPool(f2, None, fslots, 1, 2), KVPool(s2, None, sslots, 4, 3, window=W))
    assert torch.equal(f1, f2) and torch.equal(s1, s2)


@pytest.mark.parametrize("sink", [0, 16])
@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_fp8_vs_torch(name, scales, sink):
    """FP8 pools read by the Triton kernel (2D and 3D) against the torch op on the same cache."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    for nf, ns in ((2, 6), (8, 0), (0, 8)):
        case = _case(name, nf, ns, torch.bfloat16, sink, scales)
        scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
        out = torch.full_like(case.query, float("nan"))
        th.hybrid_paged_attention(*case.args(out), scratch=scratch)
        err = _max_err(out, _torch_reference(case), case.query.shape[0])
        print(f"{name} fp8 {scales} sink {sink} {nf}F{ns}S max_abs_err={err:.2e}")
        assert math.isfinite(err) and err < TOL[torch.bfloat16], (name, scales, sink, nf, ns, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_write_kv_fp8_vs_torch(dtype):
    """Random K/V (subnormals, values rounding up to a power of two, saturation) written as
    FP8 by the Triton kernel and by torch: the same bytes."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    gen = torch.Generator(device="cuda").manual_seed(2)
    k = (torch.randn(300, 5, D, device="cuda", generator=gen) * 40).to(dtype)
    v = torch.randn(300, 5, D, device="cuda", generator=gen).to(dtype)
    fk, fv = torch.tensor([0.05, 1.5], device="cuda"), torch.tensor([0.02, 0.9], device="cuda")
    sk, sv = torch.tensor([0.07], device="cuda").expand(3), torch.tensor([0.01], device="cuda").expand(3)
    caches = [torch.zeros(40, 2, BLOCK_F, 6, D, device="cuda", dtype=torch.uint8).view(FP8_DTYPE),
              torch.zeros(30, 2, BLOCK_S, 9, D, device="cuda", dtype=torch.uint8).view(FP8_DTYPE)]
    twins = [c.clone() for c in caches]
    fslots = torch.randperm(40 * BLOCK_F, device="cuda", generator=gen)[:300]
    sslots = torch.randperm(30 * BLOCK_S, device="cuda", generator=gen)[:300].to(torch.int32)
    fslots[::13] = -1

    def pools(f, s):
        return (KVPool(f, None, fslots, 1, 2, k_scale=fk, v_scale=fv),
                KVPool(s, None, sslots, 4, 3, window=W, k_scale=sk, v_scale=sv))

    th.write_kv_hybrid(k, v, *pools(*caches))
    torch_paged.write_kv_hybrid(k, v, *pools(*twins))
    for a, b in zip(caches, twins):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    written = caches[1].float()
    assert (caches[0].float().abs() == 448).any(), "nothing saturated"
    assert ((written.abs() < 2 ** -6) & (written != 0)).any(), "no subnormal written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [(2, 3), (0, 3), (2, 0)], ids=["2f3s", "0f3s", "2f0s"])
def test_triton_quantize_query_fp8_vs_torch(dtype, split):
    """Random queries (subnormals, saturation, strided rows as in a fused qkv tensor) quantized
    for FlashAttention 3 over FP8 pools in one launch, and per pool by torch as before: the
    same bytes."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    n_full, n_sliding = split
    g = 2
    h = (n_full + n_sliding) * g
    gen = torch.Generator(device="cuda").manual_seed(3)
    wide = (torch.randn(700, h + 4, D, device="cuda", generator=gen) * 60).to(dtype)
    query = wide[:, :h]
    fqs = torch.tensor([0.05, 1.5], device="cuda")[:n_full]
    sqs = torch.tensor([0.3], device="cuda").expand(n_sliding)
    pools = [KVPool(torch.empty(0, device="cuda"), None, None, 0, n, q_scale=s) if n else None
             for n, s in ((n_full, fqs), (n_sliding, sqs))]
    got = th.quantize_query_fp8(query, *pools)
    cut = n_full * g
    want = torch.cat([quantize_fp8(query[:, sl].unflatten(1, (n, g)), s[:, None, None]).flatten(1, 2)
                      for sl, n, s in ((slice(0, cut), n_full, fqs), (slice(cut, None), n_sliding, sqs)) if n], dim=1)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (got.float().abs() == 448).any(), "nothing saturated"
    assert ((got.float().abs() < 2 ** -6) & (got.float() != 0)).any(), "no subnormal"


def _flash_attn():
    from consa_vllm.plugin.ops.flash_pools import flash_attn_varlen

    try:
        fa = flash_attn_varlen()
    except Exception:
        fa = None
    if fa is None:
        pytest.skip("FlashAttention 3 (vLLM on Hopper) not available")
    return fa


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "two-streams"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_pools_vs_torch(name, overlap):
    """The served prefill / large-decode path, bf16 (FlashAttention takes no fp32)."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fa = _flash_attn()
    for nf, ns in ((2, 6), (1, 7), (4, 4)):
        case = _case(name, nf, ns, torch.bfloat16)
        out = torch.full_like(case.query, float("nan"))
        flash_attn_pools(fa, case.query, out, case.batch, case.scale, case.full, case.sliding, overlap=overlap)
        torch.cuda.synchronize()
        err = _max_err(out, _torch_reference(case), case.batch.query_start_loc[-1].item())
        print(f"{name} fa3 overlap={overlap} {nf}F{ns}S max_abs_err={err:.2e}")
        assert math.isfinite(err) and err < TOL[torch.bfloat16], (name, nf, ns, err)


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_pools_sinks_vs_torch(name, sink):
    """FlashAttention over the window plus the sink merge (the served path with sinks)."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fa = _flash_attn()
    for nf, ns in ((2, 6), (0, 8)):
        case = _case(name, nf, ns, torch.bfloat16, sink)
        out = torch.full_like(case.query, float("nan"))
        flash_attn_pools(fa, case.query, out, case.batch, case.scale, case.full, case.sliding)
        torch.cuda.synchronize()
        err = _max_err(out, _torch_reference(case), case.batch.query_start_loc[-1].item())
        print(f"{name} fa3 sink {sink} {nf}F{ns}S max_abs_err={err:.2e}")
        assert math.isfinite(err) and err < TOL[torch.bfloat16], (name, sink, nf, ns, err)


def _as_fp8_query(query, q_scale):
    """``query`` [T, len(q_scale) * G, D] as FlashAttention 3 sees it over FP8 pools: each KV
    head's query heads quantized with its ``q_scale``, then scaled back."""
    n = q_scale.numel()
    s = q_scale[:, None, None]
    q8 = quantize_fp8(query.unflatten(1, (n, query.shape[1] // n)), s).float()
    return (q8 * s).flatten(1, 2).to(query.dtype)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "two-streams"])
@pytest.mark.parametrize("sink", (0, 4, 64))
@pytest.mark.parametrize("name", ["decode_3d", "mixed_2d"])
def test_split_small_decode_vs_torch(name, sink, overlap):
    """F heads through FlashAttention 3, S heads (sinks in the kernel) through the fused
    kernel: on the decode batch the fused kernel serves (``CONSA_SMALL_DECODE=split``, the
    split-KV decode) and on a mixed prefill batch without scratch (``CONSA_SINKS_IN_KERNEL=1``,
    the 2D kernel); all-F and all-S layers take one of the two alone."""
    from consa_vllm.plugin.ops import triton_hybrid as th
    from consa_vllm.plugin.ops.flash_pools import flash_full_fused_sliding

    fa = _flash_attn()
    for nf, ns in ((2, 6), (1, 7), (4, 4), (8, 0), (0, 8)):
        case = _case(name, nf, ns, torch.bfloat16, sink)
        scratch = None
        if name == "decode_3d":
            scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
            assert th.would_use_3d(case.query, case.batch, scratch)
            # the S heads' slice keeps the split-KV decode (a 2D launch reads the window serially)
            assert th.would_use_3d(case.query[:, nf * (HQ // HKV):], case.batch, scratch)
        out = torch.full_like(case.query, float("nan"))
        flash_full_fused_sliding(fa, case.query, out, case.batch, case.scale, case.full, case.sliding, scratch,
                                 overlap=overlap)
        torch.cuda.synchronize()
        err = _max_err(out, _torch_reference(case), case.batch.query_start_loc[-1].item())
        print(f"split {name} sink {sink} {nf}F{ns}S overlap={overlap} max_abs_err={err:.2e}")
        assert math.isfinite(err) and err < TOL[torch.bfloat16], (sink, nf, ns, err)


@pytest.mark.parametrize("sink", [0, 16])
def test_split_small_decode_fp8_calibrated(sink):
    """``CONSA_SMALL_DECODE=split`` over FP8 pools (not the default there): the F heads take
    FP8 queries into FlashAttention 3, the S heads bf16 queries into the fused kernel. The
    reference sees the queries each kernel sees; the bound is FlashAttention 3's own error
    with every head F, as stock vLLM serves an FP8 cache (calibrated, as for the pools)."""
    from consa_vllm.plugin.ops import triton_hybrid as th
    from consa_vllm.plugin.ops.flash_pools import flash_full_fused_sliding

    fa = _flash_attn()
    g = HQ // HKV

    def err_of(nf, ns):
        case = _case("decode_3d", nf, ns, torch.bfloat16, sink, "per_head")
        scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
        out = torch.full_like(case.query, float("nan"))
        flash_full_fused_sliding(fa, case.query, out, case.batch, case.scale, case.full, case.sliding, scratch)
        torch.cuda.synchronize()
        query = case.query.clone()
        if nf:
            query[:, :nf * g] = _as_fp8_query(case.query[:, :nf * g], case.full.q_scale)
        ref = _torch_reference(dataclasses.replace(case, query=query))
        return _max_err(out, ref, case.batch.query_start_loc[-1].item())

    stock = err_of(HKV, 0)
    for nf, ns in ((2, 6), (1, 7), (4, 4), (0, 8)):
        err = err_of(nf, ns)
        print(f"split fp8 sink {sink} {nf}F{ns}S max_abs_err={err:.2e} (all F: {stock:.2e})")
        assert math.isfinite(err) and err <= 1.25 * stock, (sink, nf, ns, err, stock)
    assert stock < 0.1


@pytest.mark.parametrize("sink", [0, 16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_pools_fp8_calibrated(name, sink):
    """FP8 pools through FlashAttention 3 (FP8 queries quantized with q_scale, descales) vs
    the torch op fed the same quantized queries. FlashAttention 3 also rounds the softmax
    probabilities to FP8, so the bound is its own error in stock use on the same data: one
    launch over all 8 heads as F heads, one as S heads (calibrated parity)."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fa = _flash_attn()

    def err_of(nf, ns):
        case = _case(name, nf, ns, torch.bfloat16, sink, "per_head")
        out = torch.full_like(case.query, float("nan"))
        flash_attn_pools(fa, case.query, out, case.batch, case.scale, case.full, case.sliding)
        torch.cuda.synchronize()
        # The reference sees the queries FlashAttention sees (quantized per KV head).
        q_scale = torch.cat([p.q_scale for p in (case.full, case.sliding) if p is not None])
        ref_case = dataclasses.replace(case, query=_as_fp8_query(case.query, q_scale))
        return _max_err(out, _torch_reference(ref_case), case.batch.query_start_loc[-1].item())

    stock = max(err_of(HKV, 0), err_of(0, HKV))
    for nf, ns in ((2, 6), (1, 7), (4, 4)):
        err = err_of(nf, ns)
        print(f"{name} fa3 fp8 sink {sink} {nf}F{ns}S max_abs_err={err:.2e} (single launches: {stock:.2e})")
        assert math.isfinite(err) and err <= 1.25 * stock, (name, sink, nf, ns, err, stock)
    assert stock < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_vs_stock_vllm_kernel(name, dtype):
    """All heads F (or all S) through our kernel against vLLM's unified Triton attention
    on the same pool (vLLM's kernel uses tf32 on fp32, hence one tolerance)."""
    vllm_ops = pytest.importorskip("vllm.v1.attention.ops.triton_unified_attention")
    from consa_vllm.plugin.ops import triton_hybrid as th

    case = _case(name, HKV, 0, dtype)
    pool = case.full
    thr, nseg = 128 // HKV, 16
    segm = (torch.empty(thr, HQ, nseg, D, dtype=torch.float32, device="cuda"),
            torch.empty(thr, HQ, nseg, dtype=torch.float32, device="cuda"),
            torch.empty(thr, HQ, nseg, dtype=torch.float32, device="cuda"))
    ones = torch.ones(case.batch.num_seqs, HKV, dtype=torch.float32, device="cuda")
    kv = pool.heads()
    for window in (None, W):
        stock = torch.zeros_like(case.query)
        vllm_ops.unified_attention(
            q=case.query, k=kv[:, 0], v=kv[:, 1], out=stock, cu_seqlens_q=case.batch.query_start_loc,
            max_seqlen_q=case.batch.max_query_len, seqused_k=case.batch.seq_lens,
            max_seqlen_k=case.batch.max_seq_len, softmax_scale=case.scale, causal=True,
            window_size=(window - 1, 0) if window else (-1, -1), block_table=pool.block_table, softcap=0,
            q_descale=None, k_descale=ones, v_descale=ones, seq_threshold_3D=thr, num_par_softmax_segments=nseg,
            softmax_segm_output=segm[0], softmax_segm_max=segm[1], softmax_segm_expsum=segm[2])
        ours = torch.zeros_like(case.query)
        if window is None:
            th.hybrid_paged_attention(case.query, ours, case.batch, case.scale, pool, None)
        else:
            sliding = KVPool(pool.cache, pool.block_table, None, pool.head_offset, HKV, window=W)
            th.hybrid_paged_attention(case.query, ours, case.batch, case.scale, None, sliding)
        err = _max_err(ours, stock, case.batch.query_start_loc[-1].item())
        print(f"{name} {dtype} window={window} vs stock max_abs_err={err:.2e}")
        assert math.isfinite(err) and err < 2e-2, (name, dtype, window, err)


# ---------------------------------------------------------------------------------------
# Exact window / sink edges (bf16), see tests/test_ops.py::_mark_boundaries
# ---------------------------------------------------------------------------------------

W_EDGE = 64  # small enough that one key more or less moves the output far beyond bf16 noise
EDGE_CASES = {
    "decode_3d": [(2000, 1), (700, 1), (130, 1), (64, 1)],
    "mixed_2d": [(1500, 6), (300, 3), (900, 1), (70, 1), (2000, 1)],
    "decode_2d": [(700 + 97 * i, 1) for i in range(20)],
}
EDGE_MARGIN = 8.0  # kernel error x 8 < every off-by-one distance


def _edge_case(name, nf, ns, sink):
    case = make_case(EDGE_CASES[name], nf, ns, HQ // HKV, D, BLOCK_F, BLOCK_S, W_EDGE, dtype=torch.bfloat16,
                     extra_heads=(3, 2), seed=2, device="cuda", sink=sink, boundaries=True)
    return case, boundary_refs(case)


@pytest.mark.parametrize("sink", [0, 1, 4, 16])
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_triton_window_sink_edges(name, sink):
    """The Triton kernel's 2D and 3D paths take exactly keys i - W + 1 .. i and 0 .. sink - 1;
    3D with the served segment rule, the old uniform 128, and very uneven F/S counts."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")
    for nf, ns in ((2, 6), (0, 8), (1, 7)):
        case, refs = _edge_case(name, nf, ns, sink)
        path = "3d" if th.would_use_3d(case.query, case.batch, scratch) else "2d"
        assert path == name.split("_")[1]
        configs = [th.LaunchConfig()]
        if path == "3d":
            configs += [th.LaunchConfig(segments=(128, 128)), th.LaunchConfig(segments=(512, 2)),
                        th.LaunchConfig(segments=(16, 64))]
        for cfg in configs:
            out = torch.full_like(case.query, float("nan"))
            th.launch_attention(*case.args(out), scratch, cfg)
            torch.cuda.synchronize()
            what = f"{name} sink {sink} {nf}F{ns}S [{path} {cfg.segments}]"
            print(what, check_boundaries(what, case, out, EDGE_MARGIN, refs))


@pytest.mark.parametrize("sink", [0, 1, 4, 16])
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_flash_pools_window_sink_edges(name, sink):
    """FlashAttention 3 over the pools (window (W - 1, 0)), plus the sink merge: the same
    exact edges as the reference."""
    from consa_vllm.plugin.ops.flash_pools import flash_attn_pools

    fa = _flash_attn()
    for nf, ns in ((2, 6), (0, 8)):
        case, refs = _edge_case(name, nf, ns, sink)
        for overlap in (False, True):
            out = torch.full_like(case.query, float("nan"))
            flash_attn_pools(fa, case.query, out, case.batch, case.scale, case.full, case.sliding, overlap=overlap)
            torch.cuda.synchronize()
            what = f"{name} fa3 sink {sink} {nf}F{ns}S overlap={overlap}"
            print(what, check_boundaries(what, case, out, EDGE_MARGIN, refs))


def test_attention_kernel_compiled_variants():
    """Layers with different F/S splits (and pool offsets, segment counts) compile at most
    three attention-kernel variants per path (all-F, all-S, mixed): counted in the JIT's own
    device cache."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    kernel = th._hybrid_attn_kernel
    scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(HKV), HQ, D, "cuda")

    def cache_size():
        dev = torch.cuda.current_device()
        return len(kernel.device_caches[dev][0]) if dev in kernel.device_caches else 0

    before = cache_size()
    for name in ("decode_3d", "mixed_2d"):
        for nf in (0, 1, 2, 3, 5, 8, 4, 6):
            case = make_case(CASES[name], nf, HKV - nf, HQ // HKV, D, BLOCK_F, BLOCK_S, W, dtype=torch.bfloat16,
                             extra_heads=(nf, 2), seed=1, device="cuda")  # pool offsets differ per "layer"
            th.hybrid_paged_attention(*case.args(torch.empty_like(case.query)), scratch=scratch)
    torch.cuda.synchronize()
    new = cache_size() - before
    print(f"compiled variants: {new} new over 16 layers (2 paths x 8 splits)")
    assert new <= 6, new


def test_kernels_compile_into_the_shared_triton_cache(tmp_path):
    """vLLM gives each engine configuration its own TRITON_CACHE_DIR; our kernels compile into
    the shared folder instead (consa_vllm/plugin/ops/triton_cache.py). Three fresh processes
    (benchmarks/bench_triton_cache.py): with the shared folder off our binaries and launchers
    land in vLLM's folder; with it on, in the shared folder and none in vLLM's; a later
    process with a new vLLM folder finds them all there and writes nothing."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "triton_cache.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_triton_cache.py"), "--out", str(out)],
                   cwd=root, check=True)
    runs = json.loads(out.read_text())["runs"]
    print(json.dumps({m: {k: v for k, v in r.items() if "folder" in k or k == "total_first_s"}
                      for m, r in runs.items()}))
    assert runs["vllm_folder"]["vllm_folder"]["ours"] >= 4
    assert runs["vllm_folder"]["vllm_folder"]["launchers"] >= 1
    for mode in ("shared_cold", "shared_warm"):
        assert runs[mode]["vllm_folder"]["ours"] == 0, mode
        assert runs[mode]["vllm_folder"]["launchers"] == 0, mode
    assert runs["shared_cold"]["shared_folder"]["ours"] >= 4
    assert runs["shared_cold"]["shared_folder"]["launchers"] >= 1
    assert runs["shared_warm"]["shared_folder"] == runs["shared_warm"]["shared_folder_before"]
