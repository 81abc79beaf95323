"""GPU checks of the plugin (skipped without CUDA): the Triton path under torch.compile and CUDA graphs.

Run on the GPU machine: ``python -m pytest -q tests/test_gpu_engine.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from engine_harness import export, max_logprob_gap, prompts_of, reference_generate, run_vllm, tiny_model  # noqa: E402

PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    src = tiny_model(root, "qwen3", head_dim=64)
    return src, export(src, root / "consa", PATTERN, WINDOW)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled+cudagraphs"])
def test_gpu_greedy_parity(model, eager):
    src, dst = model
    from consa_vllm.allocation import Allocation

    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    prompts = prompts_of([40, 77, 130, 300, 9])
    ref = reference_generate(src, alloc, prompts, max_new_tokens=24)
    got = run_vllm(dst, prompts, max_tokens=24, enforce_eager=eager, max_num_batched_tokens=128,
                   gpu_memory_utilization=0.3)
    gap = max_logprob_gap(ref, got)
    print(f"max |dlogprob| = {gap:.2e}")
    assert got.tokens == ref.tokens
    assert gap < 2e-3
