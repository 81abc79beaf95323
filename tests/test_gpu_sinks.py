"""GPU (skipped without CUDA): streaming heads (sink + window), bf16, torch.compile + CUDA graphs,
calibrated parity (see gpu_parity.py), decode batch above 16.

Run on the GPU machine: ``python -m pytest -q -s tests/test_gpu_sinks.py``.
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
LENGTHS = [40, 77, 130, 300, 9, 520, 64, 700] * 3


@pytest.mark.parametrize("sink", [4, 16])
def test_gpu_sinks_calibrated_parity(tmp_path, sink):
    from consa_vllm.tiny import build_tiny_model

    src = build_tiny_model(tmp_path / "src", "qwen3", **{**TINY, "head_dim": 64})
    round_weights_to(src, "bfloat16")
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN, sink=sink)
    dst = export_model(src, alloc, tmp_path / "consa")
    report = Path(os.environ.get("CONSA_GPU_REPORT_DIR", tmp_path)) / f"sinks-{sink}.json"
    stock, consa = calibrated_parity(src, dst, alloc, prompts_of(LENGTHS, seed=6), 32, report=report,
                                     dtype="bfloat16")
    print(f"sink {sink}: stock all-F {stock}; consa {consa}")
    assert consa.mean <= stock.mean
    assert consa.max <= stock.max
