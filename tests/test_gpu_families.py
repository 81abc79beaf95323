"""GPU (skipped without CUDA): calibrated parity (see gpu_parity.py) of every family through
vLLM's own classes, and of streaming heads (sink + window); bf16, torch.compile + CUDA graphs,
a round of 48 prompts (decode batches above the fused kernel's 32 sequences for 4 KV heads:
FlashAttention over the pools) and a round of 16 (the fused Triton split-KV decode).

Besides the pass rule (the uneven ConSA model's error no larger than stock vLLM's on the
all-F model), each case serves diagnostic variants (gpu_parity.run_variants) that compare
like with like (without sinks, which stock vLLM lacks): the all-F allocation through the
ConSA kernels against stock all-F (same model), and one layer-shaped allocation through the
ConSA kernels against stock vLLM's own per-layer windows (same model). A first H200 run also
served the uneven allocation with FlashAttention off (the fused Triton kernel for every
batch): its error matched the FlashAttention path's (per-prompt paired ratio 0.998 and 1.012,
benchmarks/results/gpu_parity_h200/), so that variant is no longer run.

Run on the GPU machine, each engine in its own process (several compiled in-process engines
in one process hit a CUDA allocator assert); the cases are independent, so they may run as
parallel pytest processes (``-k``)::

    VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn \
        python -m pytest -q -s tests/test_gpu_families.py

Each case writes its figures, per-token errors included, to ``$CONSA_GPU_REPORT_DIR``
(default: the test's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import TINY, prompts_of  # noqa: E402
from gpu_parity import Variant, round_weights_to, run_variants  # noqa: E402

from consa_vllm.allocation import Allocation  # noqa: E402
from consa_vllm.export import export_model  # noqa: E402

WINDOW = 32
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
LAYER_SHAPED = ["SSSS", "FFFF", "SSSS", "FFFF"]
ROUNDS = [48, 16]
LENGTHS = [40, 77, 130, 300, 9, 520, 64, 700] * 6 + [33, 150, 410, 90, 260, 600, 48, 700] * 2


@pytest.mark.parametrize("family, sink", [("qwen3_moe", 0), ("mixtral", 0), ("qwen3", 0), ("qwen3", 4),
                                          ("qwen3", 16)])
def test_gpu_calibrated_parity(tmp_path, family, sink):
    from consa_vllm.tiny import build_tiny_model

    # Its own copy: the weights are rounded to bf16 in place.
    src = build_tiny_model(tmp_path / "src", family, **{**TINY, "head_dim": 64})
    round_weights_to(src, "bfloat16")

    def consa(name: str, pattern: list[str], granularity: str = "kv_head") -> tuple[Path, Allocation]:
        alloc = Allocation(granularity=granularity, window=WINDOW, pattern=pattern, sink=sink)
        return export_model(src, alloc, tmp_path / name), alloc

    uneven, alloc = consa("consa", PATTERN)
    variants = [Variant("stock_all_f", src), Variant("consa", uneven, alloc)]
    if sink == 0:
        # Sinks change nothing in an all-F model, and stock vLLM has no sinks: the like-for-like
        # variants run once per family, without them.
        variants += [Variant("consa_all_f", *consa("consa_all_f", ["FFFF"] * 4)),
                     Variant("consa_layer_shaped", *consa("consa_layer_shaped", LAYER_SHAPED)),
                     Variant("stock_layer_shaped", *consa("stock_layer_shaped", LAYER_SHAPED, "layer"))]
    report = Path(os.environ.get("CONSA_GPU_REPORT_DIR", tmp_path)) / f"families-{family}-sink{sink}.json"
    pairs = [("consa", "stock_all_f"), ("consa_all_f", "stock_all_f"),
             ("consa_layer_shaped", "stock_layer_shaped"), ("stock_layer_shaped", "stock_all_f")]
    res = run_variants(src, variants, prompts_of(LENGTHS, seed=5), 32, rounds=ROUNDS, report=report,
                       pairs=pairs, dtype="bfloat16")
    stock, got = res["stock_all_f"], res["consa"]
    print(f"{family} sink {sink}: stock all-F {stock}; consa {got}")
    assert got.mean <= stock.mean
    assert got.max <= stock.max
