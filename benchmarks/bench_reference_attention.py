"""Time and memory of the reference attention kernels at one or more sequence lengths.

    python benchmarks/bench_reference_attention.py 8192 16384 32768 --device cuda [--backward]

prints one JSON line per variant and length.

Each variant runs one layer's attention (Qwen3-1.7B shape by default: 16 query heads, 8 KV heads,
head_dim 128) on random q/k/v, forward only or forward+backward. Peak memory is measured with
``torch.cuda.max_memory_allocated`` on CUDA (the extra bytes above the inputs); on CPU it is not
measurable cheaply and is reported as ``None``.

Measured (one layer, 16 q / 8 KV heads, head_dim 128, 2 F + 6 S KV heads, W=4096, bf16, batch 1,
median of 3; NVIDIA H100 80GB, torch 2.11.0+cu130; ms, and peak extra MiB in brackets)::

    T      pass     dense        binary-sdpa   binary-chunked  gates-sdpa    gates-chunked
    8192   fwd      1.09 (96)    3.41 (296)    4.54 (135)      3.53 (320)    8.13 (167)
    8192   fwd+bwd  3.43 (385)   7.95 (577)    9.05 (512)      9.84 (673)    16.4 (609)
    16384  fwd      2.34 (192)   9.09 (976)    5.51 (263)      12.1 (1024)   6.57 (330)
    16384  fwd+bwd  8.27 (769)   25.7 (1409)   20.1 (1041)     36.0 (1602)   26.5 (1236)
    32768  fwd      7.78 (384)   34.3 (3488)   12.1 (521)      44.9 (3584)   16.4 (670)
    32768  fwd+bwd  29.4 (1538)  98.2 (3842)   45.6 (2096)     141.9 (4228)  70.9 (2504)

(chunked vs sdpa outputs differ by <= 1e-3 in bf16, 4e-7 in float32.) So: the ``auto`` rule
(chunked when ``T > 2*(chunk+W)``) picks the faster one at each length; memory stays O(T*(chunk+W)).
Both SWA paths run SDPA with a mask, i.e. the memory-efficient kernel, not flash: S heads cost
2-4x a dense flash head. A windowed flash kernel (flash-attn ``window_size``) or a compiled
``flex_attention`` block mask would remove that; not done here.

CPU (2 shared cores, float32, 8 q / 4 KV heads, head_dim 64, 1 F + 3 S, W=256, chunk 256, fwd, ms):
T=2048: dense 228, binary-sdpa 479, binary-chunked 448, gates-sdpa 492, gates-chunked 1031;
T=4096: dense 664, binary-sdpa 1901, binary-chunked 426, gates-sdpa 1438, gates-chunked 1043.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from consa_vllm.reference.kernels import hybrid_attention, repeat_kv  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_reference_attention(
    seq_len: int,
    *,
    window: int = 4096,
    num_q_heads: int = 16,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    num_full_kv_heads: int = 2,
    batch: int = 1,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
    dtype: str = "bfloat16",
    backward: bool = False,
    repeats: int = 3,
    chunk: int = 1024,
    variants: tuple[str, ...] = ("dense", "binary-sdpa", "binary-chunked", "gates-sdpa", "gates-chunked"),
) -> list[dict[str, Any]]:
    """Benchmark one layer of attention at ``seq_len``; returns one dict per variant.

    Variants: ``dense`` (stock causal SDPA, the baseline), ``binary-<swa>`` (allocation with
    ``num_full_kv_heads`` F heads, the rest S), ``gates-<swa>`` (soft mixing of all heads, both
    branches), where ``<swa>`` is the SWA backend (``sdpa`` band mask or ``chunked``).
    Fields: variant, seq_len, ms (median), peak_mib (CUDA only), max_abs_diff_vs_first_binary.
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    g = num_q_heads // num_kv_heads
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    q = rand(batch, num_q_heads, seq_len, head_dim)
    k = rand(batch, num_kv_heads, seq_len, head_dim)
    v = rand(batch, num_kv_heads, seq_len, head_dim)
    scaling = head_dim ** -0.5
    full = list(range(num_full_kv_heads))
    z = torch.full((num_kv_heads,), 0.5, device=dev, dtype=torch.float32)

    def run(variant: str) -> torch.Tensor:
        if variant == "dense":
            return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), scale=scaling, is_causal=True)
        mode, swa = variant.split("-")
        if mode == "binary":
            return hybrid_attention(q, k, v, None, scaling, window, full_kv_heads=full, swa_backend=swa, chunk=chunk)
        return hybrid_attention(q, k, v, None, scaling, window, gates=z, swa_backend=swa, chunk=chunk)

    rows, reference = [], None
    for variant in variants:
        for t in (q, k, v, z):
            t.requires_grad_(backward)
            t.grad = None
        times, peak = [], None
        for i in range(repeats + 1):  # first run is warm-up
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            _sync(dev)
            t0 = time.perf_counter()
            out = run(variant)
            if backward:
                out.float().square().mean().backward()
            _sync(dev)
            if i:
                times.append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        out = out.detach()
        diff = None
        if variant.startswith("binary"):
            reference = out if reference is None else reference
            diff = (out.float() - reference.float()).abs().max().item()
        rows.append({"variant": variant, "seq_len": seq_len, "window": window, "backward": backward,
                     "dtype": dtype, "device": str(dev), "ms": 1e3 * sorted(times)[len(times) // 2],
                     "peak_mib": peak, "max_abs_diff_vs_first_binary": diff})
        del out
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python benchmarks/bench_reference_attention.py 8192 16384 [--window W] [--backward] [--device D]``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("seq_len", type=int, nargs="+", help="sequence lengths (tokens), one run each")
    ap.add_argument("--window", type=int, default=4096, help="sliding window of the S heads (tokens)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--dtype", default="bfloat16", help="torch dtype of q/k/v")
    ap.add_argument("--backward", action="store_true", help="time forward+backward, not forward only")
    ap.add_argument("--chunk", type=int, default=1024, help="query chunk of the chunked variants (tokens)")
    args = ap.parse_args(argv)
    for n in args.seq_len:
        for row in benchmark_reference_attention(n, window=args.window, device=args.device, dtype=args.dtype,
                                                 backward=args.backward, chunk=args.chunk):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
