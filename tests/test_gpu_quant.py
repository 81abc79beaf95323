"""GPU checks of quantized checkpoints with kv_head allocations (skipped without CUDA).

For each weight format, on one tiny Qwen3 with Qwen3-0.6B's head geometry (head_dim 128,
2 query heads per KV head): calibrated parity as in tests/gpu_parity.py. Stock vLLM serves
the quantized checkpoint (all-F) and the ConSA model its kv_head export with an uneven
allocation, both bf16 with torch.compile and CUDA graphs (no enforce_eager), prompts
longer than the window, one decode batch of 40 (above the fused kernel's 128 // 4 KV heads
= 32 sequences: the FlashAttention pool path) and one of 8 in the same engine. The float32 reference attention (Hugging Face, patched
with the allocation) on the same dequantized weights scores each engine's own tokens by
teacher forcing. The ConSA model passes when its mean and its max |dlogprob| are each no
larger than stock vLLM's own all-F error under the same quantization (the issue's rule, as
in tests/test_gpu_families.py); both are printed and written to ``$CONSA_GPU_REPORT_DIR``.
Each calibrated test has a ``_sharp_attention`` twin: the same formats made by the same
libraries from the model with every attention logit scaled 3x (``gpu_parity.SHARP``).

Checkpoints: the GPU machine has no network and no quantization libraries, so they are
made on a CPU machine (``make quant-env``, then ``.venv/bin/python
tests/make_quant_checkpoints.py DIR``, 42 MB in all) and carried; point
``CONSA_QUANT_CHECKPOINTS`` at DIR. Without it the tests make them with ``.venv-quant``
where that exists. Online ``--quantization fp8`` needs no checkpoint: its reference is the
unquantized model (both engines then carry the same quantization error).

The DeepSeek-style FP8 block format (``quant_method: fp8``, ``weight_scale_inv``) is made on
the GPU itself by transformers' FineGrainedFP8 quantizer, which needs one.

Run on the GPU machine, each engine in its own process (several compiled in-process engines
in one process crash)::

    VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn \
        CONSA_QUANT_CHECKPOINTS=DIR python -m pytest -q -s tests/test_gpu_quant.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import export, prompts_of  # noqa: E402
from gpu_parity import calibrated_parity, prompt_draw  # noqa: E402
from quant_harness import checkpoints, dequantized_copy, shared_root  # noqa: E402

from consa_vllm.allocation import Allocation  # noqa: E402

SCHEMES = ["ct-fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-w4a16", "ct-w4a16-asym",
           "ct-w4a16-gptq-actorder", "awq", "gptq"]
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW = 32
# Three generate calls in each engine: 40 and 4 sequences, then 4 (decode batches above the
# fused kernel's 4 sequences take the FlashAttention pool path, the last the fused split-KV
# decode). Most prompts are longer
# than the window, some many times.
LENGTHS = [40, 77, 130, 300, 600, 9, 33, 64, 250, 500, 45, 90, 150, 200, 350, 420, 700, 31, 128, 256] * 2 + \
          [50, 120, 310, 650, 12, 200, 480, 35]
ROUNDS = [40, 4, 4]
NEW = 16
ENGINE = dict(dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.06, max_model_len=1024,
              max_num_seqs=64, max_num_batched_tokens=1024, rounds=ROUNDS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-quant")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return checkpoints(shared_root(tmp_path_factory), SCHEMES)


@pytest.fixture(scope="module")
def sharp_ckpts(tmp_path_factory):
    """The same formats of the same model with every attention logit scaled 3x before quantizing
    (``gpu_parity.SHARP``: where plain bf16 arithmetic meets the rule)."""
    return checkpoints(shared_root(tmp_path_factory), SCHEMES, model="qwen3-sharp")


def _parity(root, name: str, ckpt, reference_src, quantization: str | None = None) -> None:
    """Stock vLLM on ``ckpt`` and the ConSA export of it, both scored against the reference on
    ``reference_src``: ConSA's mean and max error no larger than stock's."""
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    report = Path(os.environ.get("CONSA_GPU_REPORT_DIR", root)) / f"quant-{name}.json"
    kw = dict(ENGINE, **({"quantization": quantization} if quantization else {}))
    stock, consa = calibrated_parity(reference_src, export(ckpt, root / f"{name}-consa", PATTERN, WINDOW), alloc,
                                     prompts_of(LENGTHS, seed=prompt_draw(11)), NEW, report=report, stock_dir=ckpt, **kw)
    print(f"\nGPU-QUANT {name}: stock all-F {stock}; consa {consa}", file=sys.stderr)
    assert consa.mean <= stock.mean, (name, str(stock), str(consa))
    assert consa.max <= stock.max, (name, str(stock), str(consa))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_quantized_kv_head_calibrated_parity(ckpts, root, scheme):
    ckpt = ckpts[scheme]
    _parity(root, scheme, ckpt, dequantized_copy(ckpt, root / f"{scheme}-dequantized"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_quantized_kv_head_calibrated_parity_sharp_attention(sharp_ckpts, root, scheme):
    ckpt = sharp_ckpts[scheme]
    _parity(root, f"sharp-{scheme}", ckpt, dequantized_copy(ckpt, root / f"sharp-{scheme}-dequantized"))


@pytest.fixture(scope="module")
def native_fp8_block(ckpts, root):
    """``quant_method: fp8`` with 128x128 ``weight_scale_inv``, by transformers on the GPU."""
    import shutil

    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    base = ckpts[SCHEMES[0]].parent / "base"
    out = root / "fp8-block-native"
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=FineGrainedFP8Config(),
                                                 dtype=torch.bfloat16, device_map="cuda")
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and list(cfg["weight_block_size"]) == [128, 128], cfg
    return out


def test_gpu_native_fp8_block_permutation_is_exact(native_fp8_block):
    from quant_harness import dequantize, load

    from consa_vllm.plugin.layout import balance_heads
    from consa_vllm.plugin.permute import PLAIN, permute_checkpoint_heads, quant_format

    tensors, cfg = load(native_fp8_block)
    assert any(n.endswith("self_attn.o_proj.weight_scale_inv") for n in tensors)
    orders = dict(enumerate(balance_heads(PATTERN, 1)))
    moved = dict(permute_checkpoint_heads(tensors.items(), orders, 8, 4, 128, quant=quant_format(cfg)))
    got = dequantize(native_fp8_block, moved, cfg)
    want = dict(permute_checkpoint_heads(dequantize(native_fp8_block, tensors, cfg).items(), orders, 8, 4, 128,
                                         quant=PLAIN))
    for n in want:
        if n.endswith(".weight") and ".self_attn." in n:
            assert torch.equal(got[n], want[n]), n


def test_gpu_native_fp8_block_kv_head_calibrated_parity(native_fp8_block, root):
    ckpt = native_fp8_block
    _parity(root, "fp8-block-native", ckpt, dequantized_copy(ckpt, root / "fp8-native-dequantized"))


def test_gpu_online_fp8_kv_head_calibrated_parity(ckpts, root):
    base = ckpts[SCHEMES[0]].parent / "base"
    _parity(root, "online-fp8", base, base, quantization="fp8")


def test_gpu_online_fp8_kv_head_calibrated_parity_sharp_attention(sharp_ckpts, root):
    base = sharp_ckpts[SCHEMES[0]].parent / "base"
    _parity(root, "sharp-online-fp8", base, base, quantization="fp8")
