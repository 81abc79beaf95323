"""``engine_harness.run_vllm`` queues each round whole, so an engine's batches do not depend on
timing: what makes two runs of one engine, or a stock and a ConSA engine, comparable token by
token in the GPU parity reports (tests/gpu_parity.py records each engine's schedule).

The GPU tests run each engine core in its own process (benchmarks/gpu_checks.sh). Such a core
starts stepping when the first request arrives, so with ``LLM.generate`` its first batch held
whichever prompts had reached it (seen here on a CPU: 1 or 2 of 12, a different count from run
to run, where an in-process core batches as many as the token budget takes). This test runs
that configuration: on a CPU, and on a GPU (benchmarks/gpu_checks.sh's ``schedule`` case) in bf16
with torch.compile and CUDA graphs, where the same batches must also give the same logprobs.
"""

from __future__ import annotations

import pytest

from engine_harness import prompts_of, run_vllm
from engine_probe import EXTENSION

pytestmark = pytest.mark.engine

BUDGET = 512  # max_num_batched_tokens: the first batch is full when it holds 512 prompt tokens


def test_rounds_scheduled_whole_by_a_core_in_its_own_process(tiny_model, monkeypatch):
    import torch
    import vllm.envs as envs

    lengths = [80, 158, 45, 153, 76, 164, 60, 150, 63, 144, 117, 98]
    prompts = prompts_of(lengths, seed=3)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    # In-process engines of this pytest process froze vLLM's environment with "0" in it.
    envs.disable_envs_cache()
    gpu = dict(dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.06) if torch.cuda.is_available() else {}
    gen = run_vllm(tiny_model("qwen3"), prompts + prompts, 4, rounds=[12, 12], record_schedule=True,
                   worker_extension_cls=EXTENSION, max_num_seqs=16, max_num_batched_tokens=BUDGET,
                   enable_prefix_caching=False, **gpu)
    steps = gen.schedule
    # Each round: prefill in arrival order until the budget is spent (the last prompt admitted
    # is chunked), then decodes; the second round is the first one again, prompt for prompt.
    first = steps[0]
    assert sum(n for _, n in first) == BUDGET, first
    admitted = [i for i, _ in first]
    assert admitted == list(range(len(admitted))) and len(admitted) >= 4, first
    assert [n for _, n in first[:-1]] == lengths[:len(admitted) - 1], first
    round_two = next(k for k, step in enumerate(steps) if step[0][0] >= 12)
    assert len(steps) == 2 * round_two
    shifted = [[[i - 12, n] for i, n in step] for step in steps[round_two:]]
    assert shifted == steps[:round_two]
    # The same batches compute the same numbers (prefix caching off: round two recomputes all).
    assert gen.tokens[:12] == gen.tokens[12:]
    assert gen.top_logprobs[:12] == gen.top_logprobs[12:]
