"""The plugin's compile ahead (consa_vllm/plugin/precompile.py), on CPU: its setting, the batch
shapes it replays, the tensors it launches on, and its FlashAttention stand-in. That its
variants are the real launches' is checked on CPU for the kernels
(tests/test_triton_cache.py, ``test_compile_in_parallel_compiles_what_the_launches_use``) and
on a GPU for a whole engine (tests/test_gpu_engine.py,
``test_gpu_kernels_compile_ahead_of_their_first_launch``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from consa_vllm.plugin import precompile as pc  # noqa: E402


def test_setting(monkeypatch):
    monkeypatch.delenv(pc.ENV, raising=False)
    assert pc.precompile_enabled()
    for v, on in (("0", False), ("false", False), ("1", True), (" TRUE ", True), ("", True)):
        monkeypatch.setenv(pc.ENV, v)
        assert pc.precompile_enabled() is on
    monkeypatch.setenv(pc.ENV, "yes")
    with pytest.raises(ValueError, match=f"{pc.ENV} must be 0 or 1, got 'yes'"):
        pc.precompile_enabled()


def test_like_keeps_strides_and_cuts_where_it_can():
    base = torch.zeros(6, 40, dtype=torch.bfloat16)
    key = base[:, 32:40].view(6, 2, 4)  # a view into a fused projection, as vLLM's key is
    cut = pc.like(key, 3)
    assert cut.data_ptr() == key.data_ptr() and cut.stride() == key.stride() and cut.shape == (3, 2, 4)
    more = pc.like(key, 9)
    assert more.shape == (9, 2, 4) and more.stride() == key.stride() and more.dtype == key.dtype


class _Scratch:
    max_seqs = 8


def test_batch_shapes():
    # With FlashAttention 3: batch 1 (split-KV), one past the fused limit (FlashAttention 3), prefill.
    assert pc.batch_shapes(_Scratch(), 4, True) == [(1, 1), (5, 1), (1, 2)]
    # Without it: one past the scratch's rows (the 2D kernel).
    assert pc.batch_shapes(_Scratch(), 4, False) == [(1, 1), (9, 1), (1, 2)]
    assert pc.batch_shapes(None, 0, False) == [(1, 1), (1, 1), (1, 2)]


def test_no_flash_attn_returns_flash_attentions_shapes():
    q = torch.zeros(5, 6, 8)
    out = torch.zeros(5, 6, 8)
    assert pc.no_flash_attn(q=q, out=out) is out
    o, lse = pc.no_flash_attn(q=q, out=out, return_softmax_lse=True)
    # FlashAttention 3's varlen log-sum-exp: [heads, tokens], float32, tokens contiguous.
    assert o is out and lse.shape == (6, 5) and lse.dtype == torch.float32 and lse.stride() == (5, 1)


@pytest.mark.engine
def test_bad_setting_is_refused_when_the_model_is_built(tmp_path, tiny_model):
    """A bad ``CONSA_PRECOMPILE`` stops a real engine while vLLM builds the model (before any
    weight loads), with the one line naming the variable, not at its first step."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tiny_model("qwen3")
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
            "from engine_harness import export, run_vllm, prompts_of; "
            f"dst = export(Path({str(src)!r}), Path({str(tmp_path / 'consa')!r}), ['FS', 'SS', 'FF', 'SF'], 32); "
            "run_vllm(dst, prompts_of([40]), max_tokens=2)")
    env = dict(os.environ, CONSA_PRECOMPILE="maybe")
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "ValueError: CONSA_PRECOMPILE must be 0 or 1, got 'maybe'" in out, out[-3000:]
    assert "Loading weights took" not in out, out[-3000:]  # vLLM logs it once the weights load
