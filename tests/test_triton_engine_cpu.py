"""The GPU kernels in a real vLLM engine, on CPU: ``CONSA_ATTN_IMPL=triton`` under
``TRITON_INTERPRET=1`` runs the Triton K/V writes, the 2D attention (prefill) and the 3D
split-KV decode with its scratch, fed by vLLM's own tensors (pools, block tables, slot
mappings, strided q/k/v, prefix caching and chunked prefill).

``tests/test_ops.py`` checks the same kernels against the torch op on hand-made inputs; this
checks their wiring inside an engine, which otherwise only a GPU run would. float32, an
uneven allocation with sinks (mixed, all-S and all-F layers), prompts longer than the
window: greedy tokens equal to the reference attention's, max |dlogprob| < 1e-3.

The engine runs in a subprocess: the interpreter must be chosen before Triton is imported,
and the pytest process may have imported it already. About 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW, SINK = 32, 4
LENGTHS = [9, 40, 70, 130]
NEW = 6


def _run(out: Path) -> None:
    """In the subprocess: export, serve with the Triton op, compare with the reference."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_harness import TINY, logprob_gaps, prompts_of, reference_generate, run_vllm

    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model
    from consa_vllm.plugin.ops import select_ops
    from consa_vllm.tiny import build_tiny_model

    assert os.environ.get("TRITON_INTERPRET") == "1" and select_ops("cpu").name == "triton"
    src = build_tiny_model(out / "src", "qwen3", **{**TINY, "head_dim": 64})
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN, sink=SINK)
    dst = export_model(src, alloc, out / "consa")
    prompts = prompts_of(LENGTHS, seed=5)
    ref = reference_generate(src, alloc, prompts, NEW)
    got = run_vllm(dst, prompts, NEW, max_num_batched_tokens=64, enable_prefix_caching=True)
    gaps = logprob_gaps(ref, got)
    print("RESULT " + json.dumps({"tokens_equal": got.tokens == ref.tokens, "max": gaps["max"]}), flush=True)


def test_triton_kernels_in_a_cpu_engine(tmp_path):
    pytest.importorskip("triton")
    # Few split-KV segments: the interpreter runs every program of the 3D grid in Python.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CONSA_ATTN_IMPL": "triton", "CONSA_DECODE_SEGMENTS": "4"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line.removeprefix("RESULT "))
    print(res)
    assert res["tokens_equal"], res
    assert res["max"] < 1e-3, res


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
