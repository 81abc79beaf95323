"""Tests of consa_vllm.plugin.ops (hybrid full + sliding-window paged attention).

* torch implementation vs an independent dense reference (per-sequence contiguous K/V
  kept by the test, explicit per-head causal / band masks, float64);
* the Triton kernels under TRITON_INTERPRET=1 vs the torch implementation (tiny shapes).
  Interpret mode must be on before the @triton.jit functions are created, so these run
  in a subprocess: ``python tests/test_ops.py interpret <case>``.

Caches are filled with NaN everywhere nothing valid was written (null block 0, unwritten
slots, out-of-window blocks of S heads): an implementation that lets an out-of-range V
into its result gets NaN.  Out-of-window S block-table entries are 0 or ids of blocks
owned by other sequences.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from consa_vllm.plugin.ops import AttnBatch, KVPool, torch_paged  # noqa: E402
from consa_vllm.plugin.ops.interface import FP8_DTYPE, quantize_fp8  # noqa: E402
from consa_vllm.plugin.ops.torch_paged import hybrid_paged_attention as torch_attn  # noqa: E402
from consa_vllm.plugin.ops.torch_paged import write_kv as torch_write_kv  # noqa: E402


# ---------------------------------------------------------------------------------------
# Case construction
# ---------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _make_pool(num_blocks, block_size, heads, d, dtype, padded_page, gen):
    page = 2 * block_size * heads * d
    pad = 3 * d if padded_page else 0
    base = torch.full((num_blocks, page + pad), float("nan"), dtype=dtype)
    cache = base[:, :page].view(num_blocks, 2, block_size, heads, d)
    if padded_page:
        assert not cache.is_contiguous()
    return cache


@dataclass
class Case:
    query: torch.Tensor
    batch: AttnBatch
    scale: float
    full: KVPool | None
    sliding: KVPool | None
    # ground truth kept by the test
    keys: list  # per seq [L, n_full + n_sliding, D] float32
    values: list
    group: int

    @property
    def n_full(self) -> int:
        return self.full.num_heads if self.full is not None else 0

    @property
    def window(self) -> int:
        return self.sliding.window if self.sliding is not None else 0

    @property
    def sink(self) -> int:
        return self.sliding.sink if self.sliding is not None else 0

    def args(self, output):
        return (self.query, output, self.batch, self.scale, self.full, self.sliding)


def make_case(seqs, n_full, n_sliding, group, d, block_f, block_s, window, dtype=torch.float32,
              padded_page=True, extra_heads=(1, 2), seed=0, pad_tokens=0,
              use_write_kv=True, device="cpu", sink=0, kv_fp8=None, boundaries=False) -> Case:
    """seqs: list of (context_len, query_len).  Prior context is written into the caches
    directly by the test; the new tokens through write_kv (torch) with padding slots.
    Built on the CPU, then moved to ``device`` (the ground truth stays on the CPU).
    With ``sink``, the S pool keeps the blocks holding keys 0 .. sink-1 (as the sink KV
    manager does) and frees the blocks between them and the window.
    ``kv_fp8`` ("per_tensor" or "per_head"): FP8 pools with those k/v scales (distinct per
    pool); the ground truth is then the dequantized K/V.
    ``boundaries``: large distinct values in the S heads' V at every query's window edge
    (keys i - W and i - W + 1) and at the sink edge (keys sink - 1 and sink), see
    :func:`_mark_boundaries`."""
    gen = torch.Generator().manual_seed(seed)
    hkv = n_full + n_sliding
    hq = hkv * group
    keys, values = [], []
    for ctx, ql in seqs:
        L = ctx + ql
        keys.append(torch.randn(L, hkv, d, generator=gen))
        values.append(torch.randn(L, hkv, d, generator=gen))
    if boundaries:
        _mark_boundaries(values, seqs, n_full, window, sink)
    cache_dtype, scales = dtype, None
    if kv_fp8:
        cache_dtype = FP8_DTYPE
        if kv_fp8 == "per_head":  # own generator: the rest of the case is the unquantized one's
            sgen = torch.Generator().manual_seed(seed + 1)
            ks, vs = 0.02 + 0.1 * torch.rand(hkv, generator=sgen), 0.02 + 0.1 * torch.rand(hkv, generator=sgen)
        else:  # one value per pool, passed expanded (stride 0) as the backend does
            ks = torch.tensor([0.05] * n_full + [0.08] * n_sliding)
            vs = torch.tensor([0.07] * n_full + [0.03] * n_sliding)
        scales = (ks, vs)
        for truths, sc in ((keys, ks[:, None]), (values, vs[:, None])):
            for t in truths:  # the ground truth: what the cache can hold
                t.copy_(quantize_fp8(t, sc).float() * sc)
    T = sum(ql for _, ql in seqs)
    query = torch.randn(T + pad_tokens, hq, d, generator=gen).to(dtype)
    qsl = [0]
    for _, ql in seqs:
        qsl.append(qsl[-1] + ql)
    seq_lens = [ctx + ql for ctx, ql in seqs]
    num_seqs = len(seqs)

    def build_pool(n, block_size, kv_head_lo, is_sliding):
        if n == 0:
            return None
        head_off = extra_heads[0]
        pool_heads = n + extra_heads[0] + extra_heads[1]
        need = [_cdiv(L, block_size) for L in seq_lens]
        num_blocks = sum(need) + 3
        cache = _make_pool(num_blocks, block_size, pool_heads, d, cache_dtype, padded_page, gen)
        perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # 0 = null
        max_blocks = max(need) + 2
        table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
        # beyond-the-sequence entries: garbage ids of other blocks
        table[:] = torch.randint(0, num_blocks, (num_seqs, max_blocks), generator=gen)
        slot_lists = []
        for s, (ctx, ql) in enumerate(seqs):
            L = ctx + ql
            first_blk = (max(0, ctx - window + 1) // block_size) if is_sliding else 0
            sink_blks = _cdiv(sink, block_size) if is_sliding else 0
            for b in range(need[s]):
                if sink_blks <= b < first_blk:
                    # freed (out-of-window) block: null block or someone else's block
                    table[s, b] = 0 if b % 2 == 0 else perm[(s * 7 + b) % len(perm)]
                else:
                    table[s, b] = perm.pop()
            # prior context in kept blocks (sinks, then first_blk*B .. ctx-1): written directly
            kept = torch.arange(ctx)
            pos = kept[(kept < sink_blks * block_size) | (kept >= first_blk * block_size)]
            blk, off = table[s, pos // block_size].long(), pos % block_size
            for i, truth in ((0, keys[s]), (1, values[s])):
                x = truth[pos, kv_head_lo:kv_head_lo + n]
                if scales is not None:
                    x = quantize_fp8(x, scales[i][kv_head_lo:kv_head_lo + n, None])
                cache[:, i][blk, off, head_off:head_off + n] = x.to(cache_dtype)
            slot_lists.append([int(table[s, p // block_size]) * block_size + p % block_size
                               for p in range(ctx, L)])
        # new tokens via write_kv, with padding slots (-1) interleaved at the end
        k_new = torch.cat([keys[s][seqs[s][0]:, kv_head_lo:kv_head_lo + n]
                           for s in range(num_seqs)]).to(dtype)
        v_new = torch.cat([values[s][seqs[s][0]:, kv_head_lo:kv_head_lo + n]
                           for s in range(num_seqs)]).to(dtype)
        slots = sum(slot_lists, [])
        k_new = torch.cat([k_new, torch.randn(pad_tokens, n, d, generator=gen).to(dtype)])
        v_new = torch.cat([v_new, torch.randn(pad_tokens, n, d, generator=gen).to(dtype)])
        slots = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64)
        fp8 = {}
        if scales is not None:
            per_tensor = kv_fp8 == "per_tensor"
            ks, vs = (t[kv_head_lo:kv_head_lo + n] for t in scales)
            if per_tensor:
                ks, vs = ks[:1].expand(n), vs[:1].expand(n)
            fp8 = dict(k_scale=ks, v_scale=vs, q_scale=ks.clone())
        pool = KVPool(cache, table, slots, head_off, n, window=window if is_sliding else None,
                      sink=sink if is_sliding else 0, **fp8)
        if use_write_kv:
            torch_write_kv(k_new, v_new, pool)
        else:
            assert scales is None
            for t, sl in enumerate(slots.tolist()):
                if sl >= 0:
                    cache[sl // block_size, 0, sl % block_size, head_off:head_off + n] = k_new[t]
                    cache[sl // block_size, 1, sl % block_size, head_off:head_off + n] = v_new[t]
        return _pool_to(pool, device)

    batch = AttnBatch(query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
                      seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      max_query_len=max(ql for _, ql in seqs), max_seq_len=max(seq_lens))
    return Case(query=query.to(device), batch=batch, scale=d ** -0.5,
                full=build_pool(n_full, block_f, 0, False), sliding=build_pool(n_sliding, block_s, n_full, True),
                keys=keys, values=values, group=group)


def _mark_boundaries(values, seqs, n_full, window, sink):
    """Put large values (+-16 .. +-40, exact in bf16/fp16) in the S heads' V at the keys just
    inside and just outside each query's window (i - W + 1, i - W) and the sink edge
    (sink - 1 visible, sink not, when both lie below the window): a kernel that takes one
    key too many or too few there moves its output by about 16 x that key's softmax weight,
    far beyond bf16 rounding (see :func:`boundary_errors`)."""
    for s, (ctx, ql) in enumerate(seqs):
        marks = {}
        for i in range(ctx, ctx + ql):
            marks[i - window] = -1.0  # outside
            marks[i - window + 1] = 1.0  # inside
        if sink:
            marks[sink - 1] = 1.5
            marks[sink] = -1.5
        for p, sign in marks.items():
            if 0 <= p < ctx + ql:
                sign_d = torch.where(torch.arange(values[s].shape[2]) % 2 == 0, 1.0, -1.0)
                values[s][p, n_full:] = sign * (16 + 8 * (p % 4)) * sign_d


def boundary_refs(case: Case) -> tuple:
    """The dense reference of ``case`` and those with the window or the sink off by one
    (W +- 1, sink +- 1): (ref, {name: wrong ref})."""
    s = case.sliding
    wrong = {"window+1": (dataclasses.replace(s, window=s.window + 1), None)}
    if s.window > 1:
        wrong["window-1"] = (dataclasses.replace(s, window=s.window - 1), None)
    if s.sink:
        wrong["sink+1"] = (s, s.sink + 1)
        wrong["sink-1"] = (s, s.sink - 1)
    return dense_reference(case), {name: dense_reference(dataclasses.replace(case, sliding=pool), sink=sink)
                                   for name, (pool, sink) in wrong.items()}


def boundary_errors(case: Case, out: torch.Tensor, refs: tuple | None = None) -> dict:
    """Max abs error of ``out`` against the dense reference, and the max abs difference
    between the reference and each off-by-one reference (:func:`boundary_refs`, computed
    unless given): the kernel passes when its error is far below every off-by-one distance."""
    T = int(case.batch.query_start_loc[-1])
    ref, wrong = refs if refs is not None else boundary_refs(case)
    res = {"err": (out[:T].cpu().double() - ref[:T]).abs().max().item()}
    for name, alt in wrong.items():
        res[name] = (alt[:T] - ref[:T]).abs().max().item()
    return res


def check_boundaries(what: str, case: Case, out: torch.Tensor, min_margin: float = 20.0,
                     refs: tuple | None = None) -> str:
    """Assert ``out`` is exact at the window/sink edges (see :func:`boundary_errors`)."""
    res = boundary_errors(case, out, refs)
    T = int(case.batch.query_start_loc[-1])
    assert not torch.isnan(out[:T]).any(), f"{what}: NaN"
    gaps = {k: v for k, v in res.items() if k != "err"}
    # the test itself: every off-by-one must be visible well above any rounding
    assert min(gaps.values()) > 0.1, f"{what}: boundary marks too weak {gaps}"
    assert res["err"] * min_margin < min(gaps.values()), f"{what}: off-by-one? {res}"
    return f"err={res['err']:.2e} " + " ".join(f"{k}={v:.2f}" for k, v in gaps.items())


def _pool_to(pool: KVPool, device) -> KVPool:
    """The pool on ``device``, its cache keeping its (padded-page) strides."""
    if torch.device(device) == pool.cache.device:
        return pool
    c = pool.cache
    base = (c._base if c._base is not None else c).to(device)
    cache = base.as_strided(c.shape, c.stride(), c.storage_offset())
    moved = {f: (getattr(pool, f).to(device) if getattr(pool, f) is not None else None)
             for f in ("block_table", "slot_mapping", "k_scale", "v_scale", "q_scale")}
    return dataclasses.replace(pool, cache=cache, **moved)


def dense_reference(case: Case, sink: int | None = None, with_lse: bool = False):
    """Independent reference: the test's own contiguous K/V, explicit masks, float64.

    ``sink`` overrides the case's sink (0: the window alone); ``with_lse`` also returns the
    natural log-sum-exp of the scores ``[Hq, T]``, as FlashAttention reports it.
    """
    sink = case.sink if sink is None else sink
    q_all = case.query.cpu().double()
    T, hq, d = q_all.shape
    out = torch.zeros(T, hq, d, dtype=torch.float64)
    lse = torch.full((hq, T), float("-inf"), dtype=torch.float64)
    qsl = case.batch.query_start_loc.tolist()
    hkv = case.keys[0].shape[1]
    for s in range(len(qsl) - 1):
        q0, q1 = qsl[s], qsl[s + 1]
        ql = q1 - q0
        L = int(case.batch.seq_lens[s])
        ctx = L - ql
        k = case.keys[s].to(case.query.dtype).double()  # [L, hkv, D] (cache dtype rounding)
        v = case.values[s].to(case.query.dtype).double()
        q = q_all[q0:q1]  # [ql, hq, D]
        qpos = torch.arange(ctx, L)[:, None]
        kpos = torch.arange(L)[None, :]
        for h in range(hq):
            kh = h // case.group
            scores = q[:, h] @ k[:, kh].T * case.scale  # [ql, L]
            mask = kpos <= qpos
            if kh >= case.n_full:
                mask = mask & ((kpos > qpos - case.window) | (kpos < sink))
            scores = scores.masked_fill(~mask, float("-inf"))
            out[q0:q1, h] = torch.softmax(scores, -1) @ v[:, kh]
            lse[h, q0:q1] = torch.logsumexp(scores, -1)
        assert hkv * case.group == hq
    return (out, lse) if with_lse else out


# A spread of configurations: (seqs, n_full, n_sliding, G, D, B_F, B_S, W)
MIXED = [(0, 13), (21, 1), (9, 6), (40, 1), (3, 1), (30, 17)]
CONFIGS = {
    "mixed_2f2s_g2": (MIXED, 2, 2, 2, 32, 4, 8, 7),
    "mixed_1f3s_g1": (MIXED, 1, 3, 1, 32, 8, 4, 5),
    "nfull0_g2": (MIXED, 0, 3, 2, 32, 8, 4, 6),
    "nsliding0_g1": (MIXED, 3, 0, 1, 32, 4, 8, 6),
    "decode_only_g2": ([(50, 1), (3, 1), (17, 1), (0, 1)], 2, 2, 2, 64, 8, 4, 9),
    "window1": ([(5, 4), (0, 3)], 1, 1, 2, 32, 4, 4, 1),
    "window_large": ([(10, 8), (0, 6)], 1, 2, 1, 32, 4, 8, 1000),
    # non-power-of-2 GQA group and head dim
    "g3_d48": ([(12, 9), (25, 1), (0, 5)], 1, 1, 3, 48, 4, 8, 6),
    # CUDA-graph style padding: zero-length sequences (seq_len 0) in the batch
    "padded_seqs": ([(10, 3), (0, 0), (33, 1), (0, 0)], 1, 2, 2, 32, 8, 4, 5),
    "padded_decode": ([(10, 1), (33, 1), (0, 0), (0, 0)], 2, 1, 2, 32, 8, 4, 5),
}


def _check_write_kv_matches_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    c1 = _make_pool(6, 4, 5, 32, dtype, True, gen)
    c2 = c1.clone()
    c1.zero_()
    c2 = torch.zeros_like(c2)
    k = torch.randn(7, 2, 32, generator=gen).to(dtype)
    v = torch.randn(7, 2, 32, generator=gen).to(dtype)
    slots = torch.tensor([5, -1, 0, 23, 11, -1, 8], dtype=torch.int32)
    torch_write_kv(k, v, KVPool(c1, None, slots, 2, 2))
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            c2[s // 4, 0, s % 4, 2:4] = k[t]
            c2[s // 4, 1, s % 4, 2:4] = v[t]
    return c1, c2


# ---------------------------------------------------------------------------------------
# torch implementation vs dense reference
# ---------------------------------------------------------------------------------------


def test_torch_write_kv():
    for dtype in (torch.float32, torch.bfloat16):
        c1, c2 = _check_write_kv_matches_loop(dtype)
        assert torch.equal(c1, c2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_vs_dense(name):
    seqs, nf, ns, g, d, bf, bs, w = CONFIGS[name]
    case = make_case(seqs, nf, ns, g, d, bf, bs, w, pad_tokens=2)
    out = torch.full_like(case.query, 7.0)
    torch_attn(*case.args(out))
    ref = dense_reference(case)
    T = int(case.batch.query_start_loc[-1])
    err = (out[:T].double() - ref[:T]).abs().max().item()
    assert err < 1e-5, f"{name}: max abs err {err}"
    assert torch.all(out[T:] == 7.0)  # padding rows untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_vs_dense_low_precision(dtype):
    seqs, nf, ns, g, d, bf, bs, w = CONFIGS["mixed_2f2s_g2"]
    case = make_case(seqs, nf, ns, g, d, bf, bs, w, dtype=dtype, padded_page=False)
    out = torch.empty_like(case.query)
    torch_attn(*case.args(out))
    err = (out.double() - dense_reference(case)).abs().max().item()
    assert err < 2e-2, f"{dtype}: max abs err {err}"


def test_torch_query_chunking(monkeypatch):
    """Long prefill split into query chunks (chunk size forced small)."""
    monkeypatch.setattr(torch_paged, "_Q_CHUNK", 5)
    case = make_case([(11, 23), (0, 17), (30, 1)], 2, 2, 2, 32, 4, 8, 6)
    out = torch.empty_like(case.query)
    torch_attn(*case.args(out))
    err = (out.double() - dense_reference(case)).abs().max().item()
    assert err < 1e-5, err


def test_torch_sliding_reads_only_window():
    """Making every block outside the S window unreadable (NaN K and V) and every
    out-of-window table entry an out-of-range id must not change the result."""
    case = make_case([(60, 1), (45, 5)], 1, 2, 2, 32, 4, 4, 6)
    out = torch.empty_like(case.query)
    torch_attn(*case.args(out))
    tbl = case.sliding.block_table
    for s, (ctx, ql) in enumerate([(60, 1), (45, 5)]):
        first = max(0, ctx - case.window + 1) // 4
        tbl[s, :first] = 10 ** 6
    out2 = torch.empty_like(case.query)
    torch_attn(*case.args(out2))
    assert torch.equal(out, out2)
    assert not torch.isnan(out2).any()


# Sinks: windows and prompts much longer than sink + W, prefill from 0 and chunks starting
# mid-sequence (queries whose window still covers the sinks and queries far beyond), decode.
# (seqs, n_full, n_sliding, G, D, B_F, B_S, W)
SINK_CONFIGS = {
    "sink_mixed": ([(0, 70), (90, 25), (200, 1), (150, 1), (33, 40), (5, 3), (17, 1)], 1, 3, 2, 32, 4, 8, 8),
    "sink_decode": ([(200, 1), (15, 1), (60, 1), (3, 1), (121, 1)], 2, 2, 2, 32, 8, 4, 9),
    "sink_all_sliding": ([(0, 50), (120, 9), (64, 1)], 0, 2, 3, 48, 8, 16, 5),
}
SINKS = (1, 4, 16)


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("name", sorted(SINK_CONFIGS))
def test_torch_sinks_vs_dense(name, sink):
    seqs, nf, ns, g, d, bf, bs, w = SINK_CONFIGS[name]
    case = make_case(seqs, nf, ns, g, d, bf, bs, w, pad_tokens=2, sink=sink)
    out = torch.full_like(case.query, 7.0)
    torch_attn(*case.args(out))
    ref = dense_reference(case)
    T = int(case.batch.query_start_loc[-1])
    err = (out[:T].double() - ref[:T]).abs().max().item()
    assert err < 1e-5, f"{name} sink {sink}: max abs err {err}"
    assert torch.all(out[T:] == 7.0)
    # The sinks matter: the same pools read as if there were none give another result.
    no_sink = (dense_reference(case, sink=0)[:T] - ref[:T]).abs().max().item()
    assert no_sink > 1e-2, no_sink


def test_torch_sinks_query_chunking(monkeypatch):
    """Long prefill split into query chunks (chunk size forced small): some chunks' windows
    still reach the sinks, later ones do not."""
    monkeypatch.setattr(torch_paged, "_Q_CHUNK", 7)
    case = make_case([(0, 60), (40, 23), (30, 1)], 1, 2, 2, 32, 4, 8, 6, sink=5)
    out = torch.empty_like(case.query)
    torch_attn(*case.args(out))
    err = (out.double() - dense_reference(case)).abs().max().item()
    assert err < 1e-5, err


def test_torch_sinks_read_only_sink_and_window_blocks():
    """S block-table entries between the sink blocks and the window pointing anywhere (an
    out-of-range id) change nothing: those blocks are never read."""
    seqs = [(100, 1), (80, 6), (57, 20)]
    case = make_case(seqs, 1, 2, 2, 32, 4, 4, 6, sink=6)
    out = torch.empty_like(case.query)
    torch_attn(*case.args(out))
    tbl = case.sliding.block_table
    for s, (ctx, _) in enumerate(seqs):
        tbl[s, 2:max(0, ctx - case.window + 1) // 4] = 10 ** 6  # blocks 0-1 hold the 6 sinks
    out2 = torch.empty_like(case.query)
    torch_attn(*case.args(out2))
    assert torch.equal(out, out2) and not torch.isnan(out2).any()


FP8_CASES = [("mixed_2f2s_g2", 0), ("decode_only_g2", 0), ("nfull0_g2", 0), ("sink_mixed", 4)]


@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
@pytest.mark.parametrize("name,sink", FP8_CASES)
def test_torch_fp8_vs_dense(name, sink, scales):
    """FP8 pools: the op reads what the cache holds (the dequantized K/V) exactly, and the
    quantization is real (against the unquantized K/V the result moves)."""
    seqs, nf, ns, g, d, bf, bs, w = {**CONFIGS, **SINK_CONFIGS}[name]
    case = make_case(seqs, nf, ns, g, d, bf, bs, w, pad_tokens=2, sink=sink, kv_fp8=scales)
    for pool in (case.full, case.sliding):
        assert pool is None or (pool.cache.dtype == FP8_DTYPE and not pool.cache.is_contiguous())
    out = torch.full_like(case.query, 7.0)
    torch_attn(*case.args(out))
    T = int(case.batch.query_start_loc[-1])
    err = (out[:T].double() - dense_reference(case)[:T]).abs().max().item()
    assert err < 1e-5, f"{name} {scales}: max abs err {err}"
    assert torch.all(out[T:] == 7.0)
    exact = make_case(seqs, nf, ns, g, d, bf, bs, w, pad_tokens=2, sink=sink)  # same seed, unquantized
    moved = (out[:T].double() - dense_reference(exact)[:T]).abs().max().item()
    assert 1e-3 < moved < 0.2, moved


def test_torch_write_kv_fp8_saturates_per_head():
    """K / k_scale per head, saturated at +-448 (vLLM's cache writes saturate; a plain cast
    to float8_e4m3fn would give NaN), padding slots skipped."""
    gen = torch.Generator().manual_seed(4)
    cache = _make_pool(6, 4, 5, 32, FP8_DTYPE, True, gen)
    k = torch.randn(7, 2, 32, generator=gen) * 30
    v = torch.randn(7, 2, 32, generator=gen)
    ks, vs = torch.tensor([0.05, 2.0]), torch.tensor([1.0, 0.01])
    slots = torch.tensor([5, -1, 0, 23, 11, -1, 8])
    torch_write_kv(k, v, KVPool(cache, None, slots, 2, 2, k_scale=ks, v_scale=vs))
    for t, sl in enumerate(slots.tolist()):
        if sl < 0:
            continue
        got_k = cache[sl // 4, 0, sl % 4, 2:4].float()
        got_v = cache[sl // 4, 1, sl % 4, 2:4].float()
        want_k = (k[t] / ks[:, None]).clamp(-448, 448).to(FP8_DTYPE).float()
        assert torch.equal(got_k, want_k) and torch.equal(got_v, (v[t] / vs[:, None]).to(FP8_DTYPE).float())
    assert (cache[:, 0, :, 2].float().abs() == 448).any(), "no value saturated: the test lost its point"
    assert torch.isnan(cache[:, :, :, :2].float()).all()  # other heads untouched


def test_fp8_pool_checks():
    """An FP8 pool without per-head scales of the right shape is refused, naming the pool."""
    case = make_case([(10, 3)], 1, 1, 2, 32, 4, 4, 5, kv_fp8="per_head")
    bad = dataclasses.replace(case.sliding, v_scale=None)
    with pytest.raises(ValueError, match="sliding: an FP8 cache needs v_scale as float32"):
        torch_attn(case.query, torch.empty_like(case.query), case.batch, case.scale, case.full, bad)
    bad = dataclasses.replace(case.full, k_scale=case.full.k_scale.expand(3))
    with pytest.raises(ValueError, match=r"full: an FP8 cache needs k_scale as float32 \[1\]"):
        torch_attn(case.query, torch.empty_like(case.query), case.batch, case.scale, bad, case.sliding)


# Exact window / sink edges: (seqs, n_full, n_sliding, G, D, B_F, B_S, W, sink)
BOUNDARY_CONFIGS = {
    "decode": ([(40, 1), (23, 1), (9, 1), (57, 1)], 2, 2, 2, 32, 4, 8, 6, 0),
    "decode_sink": ([(40, 1), (23, 1), (30, 1), (57, 1)], 1, 3, 2, 32, 8, 4, 6, 4),
    "prefill_sink": ([(30, 5), (0, 20), (44, 1)], 1, 2, 2, 32, 4, 8, 7, 3),
    "decode_sink1_w1": ([(12, 1), (7, 1)], 1, 1, 2, 32, 4, 4, 1, 1),
}


def boundary_case(name, dtype=torch.float32, device="cpu") -> Case:
    seqs, nf, ns, g, d, bf, bs, w, sink = BOUNDARY_CONFIGS[name]
    return make_case(seqs, nf, ns, g, d, bf, bs, w, dtype=dtype, pad_tokens=1, sink=sink, seed=4,
                     device=device, boundaries=True)


@pytest.mark.parametrize("name", sorted(BOUNDARY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_window_sink_boundaries(name, dtype):
    case = boundary_case(name, dtype)
    out = torch.zeros_like(case.query)
    torch_attn(*case.args(out))
    print(name, check_boundaries(name, case, out))


def test_boundary_check_catches_off_by_one():
    """The boundary check fails a result computed with the window or the sink one off."""
    case = boundary_case("decode_sink")
    for pool, sink in ((dataclasses.replace(case.sliding, window=case.window + 1), None),
                       (dataclasses.replace(case.sliding, window=case.window - 1), None), (case.sliding, 5)):
        wrong = dense_reference(dataclasses.replace(case, sliding=pool), sink=sink).float()
        with pytest.raises(AssertionError, match="off-by-one"):
            check_boundaries("wrong", case, wrong)


# ---------------------------------------------------------------------------------------
# Triton kernels under TRITON_INTERPRET=1 (subprocess) vs torch implementation
# ---------------------------------------------------------------------------------------

# (config name, dtype, path) ; path: "2d" or "3d" (3d only for decode-only batches)
INTERPRET_CASES = [
    ("mixed_2f2s_g2", "float32", "2d"),
    ("mixed_1f3s_g1", "float32", "2d"),
    ("nfull0_g2", "float32", "2d"),
    ("nsliding0_g1", "float32", "2d"),
    ("window1", "float32", "2d"),
    ("mixed_2f2s_g2", "bfloat16", "2d"),
    ("decode_only_g2", "float32", "3d"),
    ("decode_only_g2", "float16", "3d"),
    ("decode_only_nf0", "float32", "3d"),
    ("decode_only_ns0", "float32", "3d"),
    ("g3_d48", "float32", "2d"),
    ("padded_seqs", "float32", "2d"),
    ("padded_decode", "float32", "3d"),
    ("decode_only_g2", "bfloat16", "2d"),  # decode batch through the 2D path
    # sinks (config@sink)
    ("sink_mixed@1", "float32", "2d"),
    ("sink_mixed@16", "float32", "2d"),
    ("sink_mixed@4", "bfloat16", "2d"),
    ("sink_all_sliding@4", "float32", "2d"),
    ("sink_decode@4", "float32", "3d"),
    ("sink_decode@16", "float32", "3d"),
    ("sink_decode@1", "float16", "3d"),
    # the S heads alone on their head slice (the split small decode)
    ("decode_only_g2", "bfloat16", "3d_slice"),
    ("sink_decode@4", "float32", "3d_slice"),
    # FlashAttention's window-only result plus the sink merge (path "merge")
    ("sink_mixed@4", "float32", "merge"),
    ("sink_mixed@16", "bfloat16", "merge"),
    ("sink_all_sliding@1", "float32", "merge"),
    ("sink_decode@16", "float32", "merge"),
    # FP8 pools (4th field: the scales)
    ("mixed_2f2s_g2", "float32", "2d", "per_head"),
    ("mixed_1f3s_g1", "bfloat16", "2d", "per_tensor"),
    ("decode_only_g2", "float32", "3d", "per_tensor"),
    ("decode_only_nf0", "float16", "3d", "per_head"),
    ("sink_decode@16", "float32", "3d", "per_head"),
    ("sink_mixed@4", "float32", "2d", "per_head"),
    ("sink_mixed@4", "float32", "merge", "per_head"),
    # exact window / sink edges (boundary=<BOUNDARY_CONFIGS name>)
    ("boundary=decode", "float32", "2d"),
    ("boundary=decode", "bfloat16", "3d"),
    ("boundary=decode", "float32", "3d_uneven"),
    ("boundary=decode_sink", "bfloat16", "2d"),
    ("boundary=decode_sink", "float32", "3d"),
    ("boundary=decode_sink", "bfloat16", "3d_uneven"),
    ("boundary=decode_sink", "bfloat16", "merge"),
    ("boundary=prefill_sink", "bfloat16", "2d"),
    ("boundary=prefill_sink", "float32", "merge"),
    ("boundary=decode_sink1_w1", "float32", "3d_uneven"),
    # the 3D loop with the block-table prefetch (CONSA_DECODE_PREFETCH_BT=1, the default);
    # the plain 3d cases above run the loop without it (=0)
    ("boundary=decode", "float32", "3d_prefetch"),
    ("boundary=decode_sink", "bfloat16", "3d_prefetch"),
    ("boundary=decode_sink1_w1", "float32", "3d_uneven_prefetch"),
    ("boundary=decode_sink1_w1", "bfloat16", "2d"),
]
CONFIGS["decode_only_nf0"] = ([(50, 1), (3, 1), (17, 1)], 0, 2, 2, 32, 8, 4, 9)
CONFIGS["decode_only_ns0"] = ([(50, 1), (3, 1), (17, 1)], 2, 0, 1, 32, 8, 4, 9)


def _interpret_main(argv):
    """Runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from consa_vllm.plugin.ops import triton_hybrid as th

    torch.set_num_threads(1)
    what = argv[0]
    if what == "write_kv":
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(5)
            c1 = _make_pool(6, 4, 5, 32, dtype, True, gen)
            c1.zero_()
            c2 = torch.zeros_like(c1)
            k = torch.randn(7, 2, 32, generator=gen).to(dtype)
            v = torch.randn(7, 2, 32, generator=gen).to(dtype)
            for sl_dtype in (torch.int32, torch.int64):
                slots = torch.tensor([5, -1, 0, 23, 11, -1, 8], dtype=sl_dtype)
                th.write_kv(k, v, KVPool(c1, None, slots, 2, 2))
                torch_write_kv(k, v, KVPool(c2, None, slots, 2, 2))
                assert torch.equal(c1, c2), "triton write_kv != torch write_kv"
            # one launch for both pools (different block sizes, offsets, slot mappings)
            k = torch.randn(7, 5, 32, generator=gen).to(dtype)
            v = torch.randn(7, 5, 32, generator=gen).to(dtype)
            f1 = _make_pool(6, 4, 5, 32, dtype, True, gen).zero_()
            s1 = _make_pool(9, 8, 6, 32, dtype, False, gen).zero_()
            f2, s2 = torch.zeros_like(f1), torch.zeros_like(s1)
            fslots = torch.tensor([5, -1, 0, 23, 11, -1, 8], dtype=torch.int64)
            sslots = torch.tensor([70, 3, -1, 12, 40, 1, -1], dtype=torch.int32)
            th.write_kv_hybrid(k, v, KVPool(f1, None, fslots, 1, 2), KVPool(s1, None, sslots, 2, 3, window=4))
            torch_write_kv(k[:, :2], v[:, :2], KVPool(f2, None, fslots, 1, 2))
            torch_write_kv(k[:, 2:], v[:, 2:], KVPool(s2, None, sslots, 2, 3))
            assert torch.equal(f1, f2) and torch.equal(s1, s2), "triton write_kv_hybrid != torch write_kv"
            assert f1.abs().sum() > 0 and s1.abs().sum() > 0
        # FP8 pools: per-head and (expanded) per-tensor scales, saturation. The interpreter's
        # float -> FP8 conversion flushes subnormals and mis-rounds values that round up to
        # a power of two (the GPU's does neither: tests/test_gpu_ops.py writes random
        # values), so here K/V lie on the FP8 grid times the scale, or far beyond its range.
        gen = torch.Generator().manual_seed(6)
        fks, fvs = torch.tensor([0.05, 2.0]), torch.tensor([0.3, 0.7])  # F pool: per head
        sks, svs = torch.tensor([0.05]).expand(3), torch.tensor([0.3]).expand(3)  # S pool: per tensor
        scale = torch.stack([torch.cat([fks, sks]), torch.cat([fvs, svs])])[:, None, :, None]
        grid = quantize_fp8(torch.randn(2, 7, 5, 32, generator=gen) * 100, 1.0).float()
        grid = torch.where(grid.abs() < 2 ** -6, 1.0, grid)  # no subnormals
        grid[:, :, :, ::7] = 448 * torch.randint(2, 12, (2, 7, 5, 5), generator=gen) * grid[:, :, :, ::7].sign()
        k, v = grid * scale
        f1 = _make_pool(6, 4, 5, 32, FP8_DTYPE, True, gen)
        s1 = _make_pool(9, 8, 6, 32, FP8_DTYPE, False, gen)
        f2, s2 = f1.clone(), s1.clone()
        fslots = torch.tensor([5, -1, 0, 23, 11, -1, 8], dtype=torch.int64)
        sslots = torch.tensor([70, 3, -1, 12, 40, 1, -1], dtype=torch.int32)
        full = dict(slot_mapping=fslots, head_offset=1, num_heads=2, k_scale=fks, v_scale=fvs)
        sliding = dict(slot_mapping=sslots, head_offset=2, num_heads=3, window=4, k_scale=sks, v_scale=svs)
        th.write_kv_hybrid(k, v, KVPool(f1, None, **full), KVPool(s1, None, **sliding))
        torch_write_kv(k[:, :2], v[:, :2], KVPool(f2, None, **full))
        torch_write_kv(k[:, 2:], v[:, 2:], KVPool(s2, None, **sliding))
        same = lambda a, b: torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # noqa: E731
        assert same(f1, f2) and same(s1, s2), "triton FP8 write != torch FP8 write"
        assert (f1.float().abs() == 448).any(), "nothing saturated"
        print("RESULT write_kv ok")
        return
    if what == "quantize_query":
        _interpret_quantize_query(th)
        return
    name, dtype_name, path, *kv_fp8 = what.split(":")
    dtype = getattr(torch, dtype_name)
    if name.startswith("boundary="):
        _interpret_boundary(th, what, name.partition("=")[2], dtype, path)
        return
    name, _, sink = name.partition("@")
    seqs, nf, ns, g, d, bf, bs, w = {**CONFIGS, **SINK_CONFIGS}[name]
    case = make_case(seqs, nf, ns, g, d, bf, bs, w, dtype=dtype, pad_tokens=1, sink=int(sink or 0),
                     kv_fp8=kv_fp8[0] if kv_fp8 else None)
    if path == "merge":
        _interpret_merge(th, what, case, dtype)
        return
    if path == "3d_slice":
        _interpret_slice_3d(th, what, case, dtype)
        return
    ref = torch.full_like(case.query, 7.0)
    torch_attn(*case.args(ref))
    out = torch.full_like(case.query, 7.0)
    scratch = None  # no split-KV scratch: the 2D path
    if path == "3d":
        rows = max(case.query.shape[0], case.batch.num_seqs)  # padded tokens or sequences
        scratch = th.make_hybrid_scratch(rows, case.query.shape[1], d, torch.device("cpu"), num_segments=4)
    assert th.would_use_3d(case.query, case.batch, scratch) == (path == "3d")
    th.hybrid_paged_attention(*case.args(out), scratch=scratch)
    T = int(case.batch.query_start_loc[-1])
    assert not torch.isnan(out[:T]).any(), "NaN in triton output"
    err = (out[:T].float() - ref[:T].float()).abs().max().item()
    assert torch.all(out[T:] == 7.0), "padding rows written"
    print(f"RESULT {what} max_abs_err={err:.3e}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err < tol, f"{what}: max abs err {err} >= {tol}"


def _interpret_quantize_query(th):
    """quantize_query_fp8 (one launch for both pools' query heads) against the per-pool torch
    quantization it replaced, byte for byte: per-head F scales, a per-tensor (expanded) S
    scale, strided query rows, saturation, and layers with one pool only. Values lie on the
    FP8 grid times their head's scale (see the FP8 write case above for why)."""
    gen = torch.Generator().manual_seed(7)
    g, d, tokens = 2, 32, 9
    for n_full, n_sliding in ((2, 3), (0, 3), (2, 0)):
        h = (n_full + n_sliding) * g
        fqs = torch.tensor([0.05, 2.0])[:n_full]
        sqs = torch.tensor([0.3]).expand(n_sliding)
        head_scale = torch.cat([fqs, sqs]).repeat_interleave(g)
        grid = quantize_fp8(torch.randn(tokens, h, d, generator=gen) * 100, 1.0).float()
        grid = torch.where(grid.abs() < 2 ** -6, 1.0, grid)
        grid[:, :, ::5] = 448 * torch.randint(2, 12, (tokens, h, 7), generator=gen) * grid[:, :, ::5].sign()
        for dtype in (torch.float32, torch.bfloat16):
            wide = torch.zeros(tokens, h + 3, d, dtype=dtype)  # rows strided as in a fused qkv tensor
            wide[:, :h] = (grid * head_scale[None, :, None]).to(dtype)
            query = wide[:, :h]
            pools = [KVPool(torch.empty(0), None, torch.empty(0, dtype=torch.int64), 0, n, q_scale=s)
                     if n else None for n, s in ((n_full, fqs), (n_sliding, sqs))]
            got = th.quantize_query_fp8(query, *pools)
            split = n_full * g
            want = torch.cat([quantize_fp8(query[:, sl].unflatten(1, (n, g)), s[:, None, None]).flatten(1, 2)
                              for sl, n, s in ((slice(0, split), n_full, fqs), (slice(split, None), n_sliding, sqs))
                              if n], dim=1)
            assert got.dtype == FP8_DTYPE and got.shape == query.shape
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (n_full, n_sliding, dtype)
            assert (got.float().abs() == 448).any(), "nothing saturated"
    print("RESULT quantize_query ok")


def _interpret_boundary(th, what, name, dtype, path):
    """Window/sink edge values (:func:`check_boundaries`) through the 2D path, the 3D path
    (per-pool segment counts: the rule's, and uneven explicit ones), or the sink merge."""
    case = boundary_case(name, dtype)
    T = int(case.batch.query_start_loc[-1])
    if path == "merge":
        window_out, lse = dense_reference(case, sink=0, with_lse=True)
        out = window_out.to(dtype)
        split = case.n_full * case.group
        th.merge_sinks(case.query[:, split:], out[:, split:], lse[split:].float(), case.batch, case.scale,
                       case.sliding)
    else:
        out = torch.full_like(case.query, 7.0)
        scratch, config = None, th.LaunchConfig()
        if path.startswith("3d"):
            scratch = th.make_hybrid_scratch(case.query.shape[0], case.query.shape[1], case.query.shape[2],
                                             torch.device("cpu"), num_segments=8)
            if path.startswith("3d_uneven"):
                config = th.LaunchConfig(segments=(8, 2))
            # both 3D loops, whichever one is the served default
            config = dataclasses.replace(config, prefetch_bt=path.endswith("_prefetch"))
        th.launch_attention(*case.args(out), scratch, config)
        assert th.would_use_3d(case.query, case.batch, scratch) == path.startswith("3d")
        assert torch.all(out[T:] == 7.0), "padding rows written"
    print(f"RESULT {what} {check_boundaries(what, case, out)}")


def _interpret_slice_3d(th, what, case, dtype):
    """What the split small decode runs for the S heads: the S pool alone on the query's S
    head slice, with the engine's scratch sized for every head. It must take the split-KV
    path (a 2D launch reads a long window serially, session 28) and leave the F heads alone."""
    ref = torch.full_like(case.query, 7.0)
    torch_attn(*case.args(ref))
    split = case.n_full * case.group
    rows = max(case.query.shape[0], case.batch.num_seqs)
    scratch = th.make_hybrid_scratch(rows, case.query.shape[1], case.query.shape[2], torch.device("cpu"),
                                     num_segments=4)
    query, out = case.query[:, split:], torch.full_like(case.query, 7.0)
    assert th.would_use_3d(query, case.batch, scratch), "head slice fell back to the 2D kernel"
    th.hybrid_paged_attention(query, out[:, split:], case.batch, case.scale, None, case.sliding, scratch)
    T = int(case.batch.query_start_loc[-1])
    err = (out[:T, split:].float() - ref[:T, split:].float()).abs().max().item()
    assert torch.all(out[:, :split] == 7.0) and torch.all(out[T:] == 7.0), "F heads or padding rows written"
    print(f"RESULT {what} max_abs_err={err:.3e}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err < tol, f"{what}: max abs err {err} >= {tol}"


def _interpret_merge(th, what, case, dtype):
    """What the FlashAttention path runs with sinks: a window-only result and its LSE (here
    from the dense reference, as FlashAttention would give them), then merge_sinks."""
    window_out, lse = dense_reference(case, sink=0, with_lse=True)
    out = window_out.to(dtype)
    T = int(case.batch.query_start_loc[-1])
    out[T:] = 7.0
    split = case.n_full * case.group
    th.merge_sinks(case.query[:, split:], out[:, split:], lse[split:].float(), case.batch, case.scale, case.sliding)
    ref = dense_reference(case)
    err = (out[:T].double() - ref[:T]).abs().max().item()
    assert torch.all(out[T:] == 7.0), "padding rows written"
    assert torch.equal(out[:T, :split], window_out[:T, :split].to(dtype)), "F heads touched"
    print(f"RESULT {what} max_abs_err={err:.3e}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err < tol, f"{what}: max abs err {err} >= {tol}"


def _run_interpret(arg):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "interpret", arg],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"interpret run {arg} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _triton_available():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _triton_available(), reason="triton not installed")
def test_triton_interpret_write_kv():
    assert "RESULT write_kv ok" in _run_interpret("write_kv")


@pytest.mark.slow
@pytest.mark.skipif(not _triton_available(), reason="triton not installed")
def test_triton_interpret_quantize_query_fp8():
    assert "RESULT quantize_query ok" in _run_interpret("quantize_query")


@pytest.mark.slow
@pytest.mark.skipif(not _triton_available(), reason="triton not installed")
def test_triton_interpret_attention():
    # one subprocess for all cases (startup + import cost paid once)
    out = _run_interpret(",".join(":".join(c) for c in INTERPRET_CASES))
    assert out.count("RESULT") == len(INTERPRET_CASES), out
    print(out)


def use_sm90_compile_driver() -> None:
    """Make Triton's active driver a stand-in that only names the device and its target (an
    H100/H200, sm_90): the JIT then compiles for it on a machine without a GPU (Triton's bundled
    ptxas builds the binaries), and nothing can be launched."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(CompileOnlyDriver())


def _compile_main():
    """Runs in a subprocess: compiles (never runs) the Triton kernels for sm_90 through the
    JIT's own path, with a stand-in driver that only names the device and its target (no
    GPU needed: Triton's bundled ptxas builds the cubin), for the layers of an uneven
    allocation; prints the JIT device-cache sizes and ptxas register / spill figures."""
    import tempfile

    import triton

    use_sm90_compile_driver()
    from consa_vllm.plugin.ops import triton_hybrid as th

    names = ("_hybrid_attn_kernel", "_reduce_segments_kernel", "_write_kv_kernel", "_write_kv_hybrid_kernel")
    kernels = {n: getattr(th, n) for n in names}

    from consa_vllm.plugin.ops.triton_cache import compile_only

    sizes = {}
    for path, batch in (("3d", dict(num_seqs=1, query_len=1)), ("2d", dict(num_seqs=2, query_len=9))):
        before = {n: len(k.device_caches[0][0]) for n, k in kernels.items()}
        # the same launches as attention_variant_keys, now through the real JIT (compiled, not run)
        with compile_only():
            _launch_layers(th, UNEVEN_SPLITS, **batch)
        sizes[path] = {n: len(k.device_caches[0][0]) - before[n] for n, k in kernels.items()}
    print("RESULT compiled " + json_dumps(sizes))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for n in ("_hybrid_attn_kernel", "_reduce_segments_kernel"):
        for ck in kernels[n].device_caches[0][0].values():
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ck.asm["ptx"])
            r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            os.unlink(f.name)
            info = " ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                            if "registers" in line or "spill" in line)
            print(f"RESULT ptxas {n} {info}")


def json_dumps(x):
    import json

    return json.dumps(x, sort_keys=True)


def test_flash_pools_knob_and_cpu_fallback(monkeypatch):
    """CONSA_FA3_OVERLAP parses 0/1 and names itself when wrong; without CUDA there is no
    FlashAttention path, so every batch takes the fused op (the torch one on CPU)."""
    from consa_vllm.plugin.ops import flash_pools

    for value, want in (("1", True), ("true", True), ("0", False), ("False", False)):
        monkeypatch.setenv("CONSA_FA3_OVERLAP", value)
        assert flash_pools.default_overlap() is want
    monkeypatch.setenv("CONSA_FA3_OVERLAP", "yes")
    with pytest.raises(ValueError, match="CONSA_FA3_OVERLAP must be 0 or 1, got 'yes'"):
        flash_pools.default_overlap()
    monkeypatch.delenv("CONSA_FA3_OVERLAP")
    assert flash_pools.default_overlap() is True
    # CONSA_FA3_DECODE_SPLITS: 0 (FlashAttention's heuristic) unless a count up to its limit.
    assert flash_pools.decode_fa_splits() == 0
    for value, want in (("0", 0), ("32", 32), (" 256 ", 256)):
        monkeypatch.setenv("CONSA_FA3_DECODE_SPLITS", value)
        assert flash_pools.decode_fa_splits() == want
    for bad in ("-1", "257", "auto", "3.5"):
        monkeypatch.setenv("CONSA_FA3_DECODE_SPLITS", bad)
        with pytest.raises(ValueError, match=f"CONSA_FA3_DECODE_SPLITS must be a whole number from 0 to 256, got '{re.escape(bad)}'"):
            flash_pools.decode_fa_splits()
    monkeypatch.delenv("CONSA_FA3_DECODE_SPLITS")
    if not torch.cuda.is_available():
        assert flash_pools.flash_attn_varlen() is None
    monkeypatch.setenv("CONSA_PREFILL_IMPL", "fused")
    assert flash_pools.flash_attn_varlen() is None


def test_small_decode_knob(monkeypatch):
    """CONSA_SMALL_DECODE: unset or empty = auto (F heads on FlashAttention 3 for layers with at
    least SPLIT_MIN_FULL_HEADS F heads over bf16/fp16 pools, the fused kernel for the others and
    over FP8 pools), fused or split everywhere; anything else names the variable and the value."""
    from consa_vllm.plugin.ops import flash_pools

    many, few = flash_pools.SPLIT_MIN_FULL_HEADS, flash_pools.SPLIT_MIN_FULL_HEADS - 1
    monkeypatch.delenv("CONSA_SMALL_DECODE", raising=False)
    assert flash_pools.small_decode_mode() == "auto"
    assert flash_pools.small_decode_split(kv_fp8=False, n_full=many) is True
    assert flash_pools.small_decode_split(kv_fp8=False, n_full=few) is False
    assert flash_pools.small_decode_split(kv_fp8=True, n_full=many) is False
    # The threshold moved (bench_fused_decode --split-min): the same rule at 2 F heads.
    assert flash_pools.small_decode_split(False, 2, min_full_heads=2) is True
    assert flash_pools.small_decode_split(False, 1, min_full_heads=2) is False
    assert flash_pools.small_decode_split(True, 2, min_full_heads=2) is False
    # Engines built for long contexts split from SPLIT_MIN_FULL_HEADS_LONG F heads (3 < 4), from
    # max_model_len LONG_CONTEXT_TOKENS on; below it, or unknown, the rule above.
    long_len, long_min = flash_pools.LONG_CONTEXT_TOKENS, flash_pools.SPLIT_MIN_FULL_HEADS_LONG
    assert long_min < many
    assert flash_pools.split_min_full_heads(None) == many
    assert flash_pools.split_min_full_heads(long_len - 1) == many
    assert flash_pools.split_min_full_heads(long_len) == long_min
    assert flash_pools.small_decode_split(False, long_min, max_model_len=long_len) is True
    assert flash_pools.small_decode_split(False, long_min - 1, max_model_len=long_len) is False
    assert flash_pools.small_decode_split(False, long_min, max_model_len=long_len - 1) is (long_min >= many)
    assert flash_pools.small_decode_split(True, many, max_model_len=long_len) is False
    assert flash_pools.small_decode_split(False, 2, min_full_heads=2, max_model_len=long_len) is True
    assert flash_pools.small_decode_split(False, long_min, min_full_heads=many, max_model_len=long_len) is False
    cases = (("", (True, False, False)), ("auto", (True, False, False)), ("fused", (False, False, False)),
             ("Split", (True, True, True)), (" split ", (True, True, True)))
    for value, want in cases:
        monkeypatch.setenv("CONSA_SMALL_DECODE", value)
        got = (flash_pools.small_decode_split(False, many), flash_pools.small_decode_split(False, few),
               flash_pools.small_decode_split(True, many))
        assert got == want, value
    monkeypatch.setenv("CONSA_SMALL_DECODE", "fa3")
    with pytest.raises(ValueError, match="CONSA_SMALL_DECODE must be one of auto, fused, split, got 'fa3'"):
        flash_pools.small_decode_split(False, many)


def test_small_decode_logged_per_model(monkeypatch):
    """The engine logs once which layers' small decode batches split (the backend's per-layer
    rule), where FlashAttention 3 serves a bf16/fp16 model; nothing where it cannot split."""
    from types import SimpleNamespace

    from consa_vllm.allocation import Allocation
    from consa_vllm.plugin import models
    from consa_vllm.plugin.layout import PoolLayout
    from consa_vllm.plugin.ops import flash_pools

    many = flash_pools.SPLIT_MIN_FULL_HEADS
    # Layers with many F heads, fewer, none (all S) and all F.
    pattern = ["F" * many + "S" * 2, "F" * (many - 1) + "S" * 3, "S" * (many + 2), "F" * (many + 2)]
    layout = PoolLayout.build(Allocation(granularity="kv_head", window=16, pattern=pattern), 1, 0)
    lines = []
    monkeypatch.setattr(models, "logger", SimpleNamespace(info=lambda fmt, *a: lines.append(fmt % a)))

    def cfg(dtype=torch.bfloat16, cache="auto", max_len=4096):
        return SimpleNamespace(model_config=SimpleNamespace(dtype=dtype, max_model_len=max_len),
                               cache_config=SimpleNamespace(cache_dtype=cache))

    monkeypatch.delenv("CONSA_SMALL_DECODE", raising=False)
    monkeypatch.setattr(flash_pools, "flash_attn_varlen", lambda: None)
    models._log_small_decode(layout, cfg())
    assert lines == []
    monkeypatch.setattr(flash_pools, "flash_attn_varlen", lambda: object())
    models._log_small_decode(layout, cfg(dtype=torch.float32))
    assert lines == []
    long_len = flash_pools.LONG_CONTEXT_TOKENS
    # An engine built for long contexts also splits the layer with many - 1 F heads.
    for env, cache, max_len, n in (("", "auto", 4096, 2), ("", "fp8", 4096, 0), ("split", "auto", 4096, 3),
                                   ("fused", "auto", 4096, 0), ("", "auto", long_len, 3), ("", "fp8", long_len, 0)):
        monkeypatch.setenv("CONSA_SMALL_DECODE", env)
        models._log_small_decode(layout, cfg(cache=cache, max_len=max_len))
        threshold = flash_pools.split_min_full_heads(max_len)
        assert lines.pop() == (f"ConSA small decode (CONSA_SMALL_DECODE={env or 'auto'}, from {threshold} F heads "
                               f"at max_model_len {max_len}): F heads on FlashAttention 3 beside the fused "
                               f"kernel in {n} of 4 layers, the fused kernel alone in the rest"), (env, cache, max_len)


def test_attention_impl_splits_by_engine_max_model_len(monkeypatch):
    """Each layer's impl takes its small-decode path from the engine's max_model_len, read from
    vLLM's current config as vLLM's own Attention layer reads it: a layer with
    SPLIT_MIN_FULL_HEADS_LONG F heads splits in an engine of LONG_CONTEXT_TOKENS, not in a
    shorter one, and a layer with fewer F heads in neither."""
    from types import SimpleNamespace

    import vllm.config

    from consa_vllm.allocation import Allocation
    from consa_vllm.plugin.backend import ConsaAttentionImpl
    from consa_vllm.plugin.layout import PoolLayout
    from consa_vllm.plugin.ops import flash_pools

    monkeypatch.delenv("CONSA_SMALL_DECODE", raising=False)
    few = flash_pools.SPLIT_MIN_FULL_HEADS_LONG
    pattern = ["F" * few + "S" * (8 - few), "F" * (few - 1) + "S" * (9 - few)]
    layout = PoolLayout.build(Allocation(granularity="kv_head", window=16, pattern=pattern), 1, 0)

    def split_flags(max_len):
        config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_len))
        monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: config)
        return [ConsaAttentionImpl(16, 64, 0.125, 8, consa_pools=("full", "sliding", lay)).split_small_decode
                for lay in layout.layers]

    assert split_flags(flash_pools.LONG_CONTEXT_TOKENS) == [True, False]
    assert split_flags(flash_pools.LONG_CONTEXT_TOKENS - 1) == [few >= flash_pools.SPLIT_MIN_FULL_HEADS, False]


def test_sinks_in_kernel_knob(monkeypatch):
    """CONSA_SINKS_IN_KERNEL: unset, empty or 0 = FlashAttention 3 plus the sink merge launch;
    1 = S heads with sinks through the fused kernel; anything else names itself."""
    from consa_vllm.plugin.ops import flash_pools

    monkeypatch.delenv("CONSA_SINKS_IN_KERNEL", raising=False)
    assert flash_pools.sinks_in_kernel() is False
    for value, want in (("", False), ("0", False), ("1", True), ("True", True), ("false", False)):
        monkeypatch.setenv("CONSA_SINKS_IN_KERNEL", value)
        assert flash_pools.sinks_in_kernel() is want, value
    monkeypatch.setenv("CONSA_SINKS_IN_KERNEL", "on")
    with pytest.raises(ValueError, match="CONSA_SINKS_IN_KERNEL must be 0 or 1, got 'on'"):
        flash_pools.sinks_in_kernel()


def test_decode_prefetch_bt_knob(monkeypatch):
    """CONSA_DECODE_PREFETCH_BT: unset, empty or 1 = the 3D decode loads block-table entries
    one tile ahead, 0 = not; anything else fails with one line naming the variable."""
    from consa_vllm.plugin.ops import triton_hybrid as th

    monkeypatch.delenv("CONSA_DECODE_PREFETCH_BT", raising=False)
    assert th._prefetch_bt_default() is True
    for value, want in (("1", True), (" 0 ", False), ("", True), ("0", False)):
        monkeypatch.setenv("CONSA_DECODE_PREFETCH_BT", value)
        assert th._prefetch_bt_default() is want
    for bad in ("2", "yes", "true"):
        monkeypatch.setenv("CONSA_DECODE_PREFETCH_BT", bad)
        with pytest.raises(ValueError) as e:
            th._prefetch_bt_default()
        msg = str(e.value)
        assert "CONSA_DECODE_PREFETCH_BT" in msg and repr(bad) in msg and "\n" not in msg, msg
    # the flag is compile-time only on the 3D path (the 2D path has one variant either way)
    kw = dict(n_full=1, n_sliding=3, num_q_heads=16, sink=0, block_size_f=48, block_size_s=16, tile_size=32,
              head_size=128, dtype=torch.bfloat16, fp8=False)
    assert th.attention_constexprs(**kw, use_3d=True, prefetch_bt=True)["PREFETCH_BT"] is True
    assert th.attention_constexprs(**kw, use_3d=True, prefetch_bt=False)["PREFETCH_BT"] is False
    assert th.attention_constexprs(**kw, use_3d=False, prefetch_bt=True)["PREFETCH_BT"] is False
    assert th.attention_constexprs(**kw, use_3d=True)["PREFETCH_BT"] is th.DEFAULT_PREFETCH_BT


def test_fused_decode_max_seqs_knob(monkeypatch):
    """CONSA_FUSED_DECODE_MAX_SEQS: unset = 4 sequences (the scratch sized by the
    128 // kv_heads rule, snapped to a capture size), N >= 0 = the largest decode batch of the fused kernel where FlashAttention 3 is
    available (0 = never), the scratch keeping at least the rule's rows; anything else fails
    with one line naming the variable."""
    from consa_vllm.plugin.backend import fused_decode_limits
    from consa_vllm.plugin.ops.flash_pools import fused_decode_max_seqs

    monkeypatch.delenv("CONSA_FUSED_DECODE_MAX_SEQS", raising=False)
    assert fused_decode_max_seqs() is None
    for value, want in (("", None), (" 0 ", 0), ("1", 1), ("64", 64)):
        monkeypatch.setenv("CONSA_FUSED_DECODE_MAX_SEQS", value)
        assert fused_decode_max_seqs() == want
    for bad in ("-1", "4.5", "auto", "1e3"):
        monkeypatch.setenv("CONSA_FUSED_DECODE_MAX_SEQS", bad)
        with pytest.raises(ValueError) as e:
            fused_decode_max_seqs()
        msg = str(e.value)
        assert "CONSA_FUSED_DECODE_MAX_SEQS" in msg and repr(bad) in msg and "\n" not in msg, msg

    capture = [1, 2, 4, 8, 16, 24, 32, 40]
    # scratch rows: 128 // kv_heads, snapped to the closest capture size (8 KV heads: 16);
    # the fused kernel up to 4 sequences, or the rule's rows where fewer (64 KV heads: 2)
    assert fused_decode_limits(8, capture, None) == (16, 4)
    assert fused_decode_limits(4, capture, None) == (32, 4)
    assert fused_decode_limits(3, capture, None) == (40, 4)  # 42 -> 40
    assert fused_decode_limits(3, None, None) == (42, 4)
    assert fused_decode_limits(64, None, None) == (2, 2)
    # a limit moves the boundary; the scratch keeps at least the rule's rows
    assert fused_decode_limits(8, capture, 0) == (16, 0)
    assert fused_decode_limits(8, capture, 4) == (16, 4)
    assert fused_decode_limits(8, capture, 64) == (64, 64)


def test_whole_model_shapes_selection():
    """bench_hybrid_kernel --whole-model-shapes: MODEL[:ALLOCATION[:CONTEXT[:BATCH]]] picks
    runs (omitted / * = all); unknown models, allocations or runs fail with the choices,
    and the script says so before it looks for CUDA."""
    import functools
    import re

    script = os.path.join(ROOT, "benchmarks", "bench_hybrid_kernel.py")
    sys.path.insert(0, os.path.dirname(script))
    try:
        import bench_hybrid_kernel as bench
    finally:
        sys.path.pop(0)
    shapes = bench.parse_shapes("llama3.1-8b:duo-0.5:131072, qwen3-0.6b:*:*:4,qwen3-30b-a3b")
    assert shapes == [("llama3.1-8b", "duo-0.5", 131072, None), ("qwen3-0.6b", None, None, 4),
                      ("qwen3-30b-a3b", None, None, None)]
    sel = functools.partial(bench.shape_selected, shapes)
    assert sel("llama3.1-8b", "duo-0.5", 131072, 4) and not sel("llama3.1-8b", "duo-0.5", 32768, 1)
    assert sel("qwen3-0.6b", "equal", 32768, 4) and not sel("qwen3-0.6b", "random", 32768, 16)
    assert sel("qwen3-30b-a3b", "1F3S", 32768, 16)
    assert bench.shape_selected(None, "qwen3-0.6b", "equal", 32768, 1)
    for bad, what in (("llama", "MODEL in"), ("qwen3-0.6b:1F3S", "allocations are"),
                      ("llama3.1-8b:duo-0.5:131072:16", "runs (context, batch)"),
                      ("qwen3-0.6b:equal:32k", "integers"), ("qwen3-0.6b:equal:32768:1:2", "MODEL in")):
        with pytest.raises(ValueError, match=re.escape(what)):
            bench.parse_shapes(bad)
    r = subprocess.run([sys.executable, script, "--whole-model",
                        "--out", "/dev/null", "--whole-model-shapes", "qwen3-0.6b:1F3S"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "qwen3-0.6b allocations are ['random', 'equal']" in r.stderr, r.stderr


def test_fused_decode_launch_names():
    """bench_fused_decode --launch: tTILE / wWARPS / sSTAGES / p0|p1 in any subset map onto the op's
    LaunchConfig fields; anything else is refused with the expected form."""
    script = os.path.join(ROOT, "benchmarks", "bench_fused_decode.py")
    sys.path.insert(0, os.path.dirname(script))
    try:
        import bench_fused_decode as bench
    finally:
        sys.path.pop(0)
    from consa_vllm.plugin.ops.triton_hybrid import LaunchConfig

    assert bench.parse_launch("t64w8s2") == dict(tile_size=64, num_warps=8, num_stages=2)
    assert bench.parse_launch("s3t16") == dict(num_stages=3, tile_size=16)
    assert LaunchConfig(**bench.parse_launch("w8")).num_warps == 8
    assert bench.parse_launch("p0") == dict(prefetch_bt=False)
    assert LaunchConfig(**bench.parse_launch("s2p1")).prefetch_bt is True
    for bad in ("x1", "t", "t64x", "64", "t64 w8", "p2"):
        with pytest.raises(SystemExit, match="expected parts tTILE, wWARPS, sSTAGES"):
            bench.parse_launch(bad)


def test_fused_decode_split_min_refused_before_work():
    """bench_fused_decode --split-min: a value that is not a whole number of at least 1 is refused
    by name before torch is imported."""
    script = os.path.join(ROOT, "benchmarks", "bench_fused_decode.py")
    for bad, msg in (("2,x", "whole numbers expected, got '2,x'"), ("0", "each value must be at least 1, got '0'")):
        r = subprocess.run([sys.executable, script, "--split-min", bad, "--out", "/dev/null"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"--split-min: {msg}" in r.stderr, r.stderr


def test_fused_decode_fa_splits_refused_before_work():
    """bench_fused_decode --fa-splits: a value that is not a whole number from 1 to FlashAttention
    3's limit (flash_pools.MAX_FA3_SPLITS) is refused by name before any kernel work."""
    script = os.path.join(ROOT, "benchmarks", "bench_fused_decode.py")
    for bad, msg in (("16,x", "whole numbers expected, got '16,x'"),
                     ("0", "each value must be from 1 to 256, got '0'"),
                     ("32,257", "each value must be from 1 to 256, got '32,257'")):
        r = subprocess.run([sys.executable, script, "--fa-splits", bad, "--out", "/dev/null"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"--fa-splits: {msg}" in r.stderr, r.stderr


def test_select_ops_once_per_device(monkeypatch):
    """The backend picks an implementation once per layer: Triton on CUDA, torch elsewhere,
    CONSA_ATTN_IMPL overriding; a bad value names the variable."""
    from consa_vllm.plugin.ops import select_ops

    monkeypatch.delenv("CONSA_ATTN_IMPL", raising=False)
    assert select_ops("cpu").name == "torch"
    assert select_ops("cuda").name == "triton"
    monkeypatch.setenv("CONSA_ATTN_IMPL", "torch")
    assert select_ops("cuda").name == "torch"
    monkeypatch.setenv("CONSA_ATTN_IMPL", "triton")
    assert select_ops("cpu").name == "triton"
    monkeypatch.setenv("CONSA_ATTN_IMPL", "cuda")
    with pytest.raises(ValueError, match="CONSA_ATTN_IMPL must be torch, triton or auto, got 'cuda'"):
        select_ops("cpu")
    # The torch implementation's attention takes (and ignores) the Triton op's scratch.
    monkeypatch.setenv("CONSA_ATTN_IMPL", "auto")
    ops = select_ops("cpu")
    case = make_case([(11, 5), (30, 1)], 2, 2, 2, 32, 4, 8, 6)
    out = torch.empty_like(case.query)
    ops.attention(*case.args(out), None)
    ref = torch.empty_like(case.query)
    torch_attn(*case.args(ref))
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------
# Compiled variants of the attention kernel per model (JIT specialisation keys)
# ---------------------------------------------------------------------------------------


def record_variant_keys(th, names, launches, as_run: bool = False) -> dict[str, set]:
    """The Triton cache keys that ``launches()`` would compile for the kernels ``names`` of
    ``th``: {kernel name: set of keys}. The launches are recorded, not run (no GPU needed):
    each key is computed by the binder the JIT runtime itself uses
    (``create_function_from_signature`` + ``compute_cache_key``) for an H100/H200 target, so
    two launches with the same key share one compiled kernel. ``as_run``: the key exactly as
    ``JITFunction.run`` computes it before its in-memory lookup (its options and the active
    driver's binder: needs :func:`use_sm90_compile_driver`), comparable with the keys of the
    kernels' in-memory caches."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    keys = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel
            self.binder = None if as_run else create_function_from_signature(kernel.signature, kernel.params, backend)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if as_run:
                    kwargs["debug"] = kwargs.get("debug", self.kernel.debug) or knobs.runtime.debug
                    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                    _, key_cache, _, _, binder = self.kernel.device_caches[0]
                    _, spec, options = binder(*args, **kwargs)
                    key = compute_cache_key(key_cache, spec, options)
                else:
                    _, spec, options = self.binder(*args, **kwargs)
                    key = compute_cache_key({}, spec, backend.parse_options(options).__dict__)
                keys.setdefault(self.kernel.__name__, set()).add(key)
            return launch

    saved = {n: getattr(th, n) for n in names}
    for n in names:
        setattr(th, n, Recorder(saved[n]))
    try:
        launches()
    finally:
        for n in names:
            setattr(th, n, saved[n])
    return keys


def attention_variant_keys(th, splits, sink=0, hkv=8, group=2, d=128, num_seqs=1, query_len=1):
    """The Triton cache keys that the layers of one model (``splits``: (n_full, n_sliding) per
    layer, heads packed into one F and one S pool as the plugin allocates them) would compile
    for the attention, reduce and K/V write kernels (:func:`record_variant_keys`)."""
    names = ("_hybrid_attn_kernel", "_reduce_segments_kernel", "_write_kv_kernel", "_write_kv_hybrid_kernel")
    return record_variant_keys(th, names, lambda: _launch_layers(th, splits, sink, hkv, group, d, num_seqs, query_len))


def _launch_layers(th, splits, sink=0, hkv=8, group=2, d=128, num_seqs=1, query_len=1):
    """K/V write and attention of every layer of ``splits`` (bf16, CPU tensors: only the
    kernels' launch arguments matter to the callers, which record or compile them)."""
    n_f_total = sum(nf for nf, _ in splits)
    n_s_total = sum(ns for _, ns in splits)
    T = num_seqs * query_len
    f_cache = torch.zeros(4, 2, 16, max(1, n_f_total), d, dtype=torch.bfloat16)
    s_cache = torch.zeros(4, 2, 32, max(1, n_s_total), d, dtype=torch.bfloat16)
    table = torch.zeros(num_seqs, 4, dtype=torch.int32)
    slots = torch.zeros(T, dtype=torch.int64)
    batch = AttnBatch(query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * query_len,
                      seq_lens=torch.full((num_seqs,), 40, dtype=torch.int32), max_query_len=query_len, max_seq_len=40)
    query = torch.zeros(T, hkv * group, d, dtype=torch.bfloat16)
    scratch = th.make_hybrid_scratch(th.default_seq_threshold_3d(hkv), hkv * group, d, "cpu")
    key = torch.zeros(T, hkv, d, dtype=torch.bfloat16)
    f_off = s_off = 0
    for nf, ns in splits:
        full = KVPool(f_cache, table, slots, f_off, nf) if nf else None
        sliding = KVPool(s_cache, table, slots, s_off, ns, window=16, sink=sink) if ns else None
        th.write_kv_hybrid(key, key, full, sliding)
        th.hybrid_paged_attention(query, torch.empty_like(query), batch, d ** -0.5, full, sliding, scratch)
        f_off, s_off = f_off + nf, s_off + ns


@pytest.mark.slow
@pytest.mark.parametrize("prefetch_bt", ["0", "1"])
def test_kernels_compile_for_sm90_variant_count(prefetch_bt):
    """The real JIT compiles the kernels for sm_90 (no GPU: compile only) without register
    spills in the attention kernel, and its device cache holds 3 attention variants per
    path for the layers of an uneven allocation; with and without the 3D block-table prefetch."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, OMP_NUM_THREADS="1", CONSA_DECODE_PREFETCH_BT=prefetch_bt)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "compile"], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    import json

    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT compiled "))
    sizes = json.loads(line.removeprefix("RESULT compiled "))
    print(proc.stdout)
    assert sizes["3d"]["_hybrid_attn_kernel"] == 3 and sizes["2d"]["_hybrid_attn_kernel"] == 3, sizes
    assert sizes["3d"]["_reduce_segments_kernel"] == 1, sizes
    attn = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ptxas _hybrid_attn_kernel")]
    assert len(attn) == 6 and all("0 bytes spill stores" in x for x in attn), attn


# An uneven Qwen3-0.6B-shaped allocation: 8 KV heads, 0 .. 5 F heads per layer, plus all-F / all-S.
UNEVEN_SPLITS = [(nf, 8 - nf) for nf in (0, 1, 2, 3, 4, 5, 2, 3, 1, 5, 4, 0)] + [(8, 0)]


@pytest.mark.parametrize("path", ["2d", "3d"])
@pytest.mark.parametrize("sink", [0, 4])
def test_attention_kernel_variants_per_model(path, sink):
    """Layers with different F/S splits share compiled kernels: at most 3 variants of the
    attention kernel per path (all-F, all-S, mixed) and one reduce kernel, whatever the
    split, the head offsets in the pools or the segment counts."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from consa_vllm.plugin.ops import triton_hybrid as th

    # Batch sizes share variants too (== 1, multiples of 16 and the rest alike): a new
    # variant mid-serving would be a compile in the middle of a request.
    batches = ([dict(num_seqs=n, query_len=1) for n in (1, 3, 4, 16)] if path == "3d" else
               [dict(num_seqs=n, query_len=q) for n, q in ((2, 9), (1, 16), (17, 3))])
    keys = {}
    for batch in batches:
        for name, got in attention_variant_keys(th, UNEVEN_SPLITS, sink=sink, **batch).items():
            keys.setdefault(name, set()).update(got)
    batch = batches[0]
    counts = {k: len(v) for k, v in keys.items()}
    print(path, sink, counts)
    assert counts["_hybrid_attn_kernel"] == 3, counts
    assert counts.get("_reduce_segments_kernel", 0) == (1 if path == "3d" else 0), counts
    # K/V writes: one variant for mixed layers, one per pool (its block size) for one-pool layers
    assert counts["_write_kv_kernel"] == 2 and counts["_write_kv_hybrid_kernel"] == 1, counts
    # other mixed splits at other pool offsets: no new variant
    again = attention_variant_keys(th, [(1, 7), (3, 5)], sink=sink, **batch)["_hybrid_attn_kernel"]
    assert again <= keys["_hybrid_attn_kernel"]


def test_sink_merge_one_variant_per_model():
    """The sink merge compiles once per model: batches of 1 to 33 sequences and token counts
    that are and are not multiples of 16 share one kernel variant (a new one mid-serving is a
    latency spike, which vLLM's JIT monitor reported on the H200 before num_seqs and the
    log-sum-exp stride were left unspecialized; vLLM's warm-up runs decode batches only)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from consa_vllm.plugin.ops import triton_hybrid as th

    hkv, group, d = 4, 4, 128
    cache = torch.zeros(8, 2, 16, hkv, d, dtype=torch.bfloat16)

    def launches():
        for num_seqs, query_len in ((1, 1), (1, 32768 // 64), (3, 1), (16, 1), (33, 1), (2, 7), (4, 16)):
            T = num_seqs * query_len
            batch = AttnBatch(query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * query_len,
                              seq_lens=torch.full((num_seqs,), 600, dtype=torch.int32),
                              max_query_len=query_len, max_seq_len=600)
            pool = KVPool(cache, torch.zeros(num_seqs, 8, dtype=torch.int32), torch.zeros(T, dtype=torch.int64),
                          0, 2, window=64, sink=16)
            q = torch.zeros(T, 2 * group, d, dtype=torch.bfloat16)
            th.merge_sinks(q, torch.empty_like(q), torch.zeros(2 * group, T), batch, d ** -0.5, pool)

    keys = record_variant_keys(th, ("_sink_merge_kernel",), launches)["_sink_merge_kernel"]
    assert len(keys) == 1, len(keys)


def test_decode_segments_rule():
    """Per-pool split-KV segment counts: S heads ~2 tiles per segment, F heads many at batch
    1 and fewer as the batch grows, all within the scratch's capacity."""
    from consa_vllm.plugin.ops.triton_hybrid import decode_segments

    cap = 16 * 128  # the backend's scratch at 8 KV heads: 16 rows x 128 segments
    # F: 256 at batch 1 (measured best, hybrid_models_h200.json), 128 from batch 2 on
    assert decode_segments(4096, 0, 32, 1, 1, cap) == (256, 64, 256)
    assert decode_segments(4096, 4, 32, 1, 1, cap) == (256, 128, 256)  # + one sink tile
    assert decode_segments(256, 0, 32, 1, 1, cap) == (256, 4, 256)
    assert decode_segments(256, 0, 32, 2, 2, cap) == (128, 4, 128)
    assert decode_segments(4096, 0, 32, 3, 3, cap) == (128, 64, 128)
    assert decode_segments(4096, 0, 32, 4, 4, cap) == (128, 64, 128)
    assert decode_segments(4096, 0, 32, 16, 16, cap) == (128, 64, 128)
    assert decode_segments(1 << 20, 0, 32, 1, 1, cap)[1] == 128  # S capped
    # capped by capacity // tokens (rounded down to a power of 2), overrides too
    for tokens in (1, 3, 7, 16, 40):
        for override in (None, (1024, 8), (64, 64)):
            f, s, stride = decode_segments(512, 0, 32, tokens, tokens, 300, override)
            assert stride == max(f, s) and tokens * stride <= 300 and f & (f - 1) == 0, (tokens, f, s)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "compile":
        _compile_main()
    elif len(sys.argv) >= 3 and sys.argv[1] == "interpret":
        for item in sys.argv[2].split(","):
            _interpret_main([item])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
