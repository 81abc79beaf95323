"""GPU (skipped without CUDA): calibrated parity (see gpu_parity.py) of every family through
vLLM's own classes, and of streaming heads (sink + window); bf16, torch.compile + CUDA graphs,
decode batch 24.

Run on the GPU machine, each engine in its own process (several compiled in-process engines
in one process hit a CUDA allocator assert)::

    VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn \
        python -m pytest -q -s tests/test_gpu_families.py

Each case writes its figures to ``$CONSA_GPU_REPORT_DIR`` (default: the test's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import TINY, prompts_of  # noqa: E402
from gpu_parity import calibrated_parity, round_weights_to  # noqa: E402

from consa_vllm.allocation import Allocation  # noqa: E402
from consa_vllm.export import export_model  # noqa: E402

WINDOW = 32
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
# 24 sequences: decode batches above 16 run the FlashAttention pool path.
LENGTHS = [40, 77, 130, 300, 9, 520, 64, 700] * 3


@pytest.mark.parametrize("family, sink", [("qwen3_moe", 0), ("mixtral", 0), ("qwen3", 0), ("qwen3", 4),
                                          ("qwen3", 16)])
def test_gpu_calibrated_parity(tmp_path, family, sink):
    from consa_vllm.tiny import build_tiny_model

    # Its own copy: the weights are rounded to bf16 in place.
    src = build_tiny_model(tmp_path / "src", family, **{**TINY, "head_dim": 64})
    round_weights_to(src, "bfloat16")
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN, sink=sink)
    dst = export_model(src, alloc, tmp_path / "consa")
    report = Path(os.environ.get("CONSA_GPU_REPORT_DIR", tmp_path)) / f"families-{family}-sink{sink}.json"
    stock, consa = calibrated_parity(src, dst, alloc, prompts_of(LENGTHS, seed=5), 32, report=report,
                                     dtype="bfloat16")
    print(f"{family} sink {sink}: stock all-F {stock}; consa {consa}")
    assert consa.mean <= stock.mean
    assert consa.max <= stock.max
