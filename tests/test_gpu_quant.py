"""GPU checks of quantized checkpoints with kv_head allocations (skipped without CUDA).

For each weight format, on one tiny Qwen3 with Qwen3-0.6B's head geometry (head_dim 128,
2 query heads per KV head): the ConSA model with an uneven allocation, served with
torch.compile and CUDA graphs (no enforce_eager), prompts longer than the window and a
decode batch above 16, against the reference attention (fp32, Hugging Face) on the same
dequantized weights. It passes when its error is no larger than the error of stock vLLM's
own all-F model on the same checkpoint against the dense reference (calibrated parity,
with the small bf16 allowance below); max and mean |dlogprob| are printed for both.

Checkpoints: the GPU machine has no network and no quantization libraries, so they are
made on a CPU machine (``make quant-env``, then ``python tests/make_quant_checkpoints.py
DIR``, about 8 MB in all) and carried; point ``CONSA_QUANT_CHECKPOINTS`` at DIR. Without it
the tests make them with ``.venv-quant`` where that exists. Online ``--quantization fp8``
needs no checkpoint: its reference is the unquantized model (both sides then carry the
same quantization error).

The DeepSeek-style FP8 block format (``quant_method: fp8``, ``weight_scale_inv``) is made on
the GPU itself by transformers' FineGrainedFP8 quantizer, which needs one.

Run: ``CONSA_QUANT_CHECKPOINTS=DIR python -m pytest -q -s tests/test_gpu_quant.py``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import export, prompts_of, reference_generate, run_vllm  # noqa: E402
from quant_harness import checkpoints, dequantized_copy, shared_root  # noqa: E402

from consa_vllm.allocation import Allocation  # noqa: E402

SCHEMES = ["ct-fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-w4a16", "ct-w4a16-asym",
           "ct-w4a16-gptq-actorder", "awq", "gptq"]
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW = 32
# 20 sequences: decode batches above 16 (the FlashAttention decode path); most prompts
# longer than the window, some several times.
LENGTHS = [40, 77, 130, 300, 600, 9, 33, 64, 250, 500, 45, 90, 150, 200, 350, 420, 700, 31, 128, 256]
NEW = 16
ENGINE = dict(dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.3, max_model_len=1024,
              max_num_seqs=32, max_num_batched_tokens=1024)
SLACK, FLOOR = 1.25, 0.02  # ConSA max error <= SLACK * stock max error + FLOOR


def dlogprobs(ref, got) -> list[float]:
    """|dlogprob| over the top-k tokens both report, per position, up to each first token mismatch."""
    out = []
    for ta, tb, la, lb in zip(ref.tokens, got.tokens, ref.top_logprobs, got.top_logprobs):
        for i, (x, y) in enumerate(zip(ta, tb)):
            out += [abs(la[i][t] - lb[i][t]) for t in set(la[i]) & set(lb[i])]
            if x != y:
                break
    return out


def errors(ref, got) -> dict:
    d = dlogprobs(ref, got)
    same = sum(a == b for ra, rb in zip(ref.tokens, got.tokens) for a, b in zip(ra, rb))
    return {"max": max(d), "mean": sum(d) / len(d), "token_agreement": same / sum(len(r) for r in ref.tokens)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-quant")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return checkpoints(shared_root(tmp_path_factory), SCHEMES)


def _compare(root, name: str, ckpt, reference_src, quantization: str | None = None) -> dict:
    prompts = prompts_of(LENGTHS, seed=11)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    ref_dense = reference_generate(reference_src, None, prompts, NEW)
    ref_alloc = reference_generate(reference_src, alloc, prompts, NEW)
    kw = dict(ENGINE, **({"quantization": quantization} if quantization else {}))
    stock = run_vllm(ckpt, prompts, NEW, **kw)
    consa = run_vllm(export(ckpt, root / f"{name}-consa", PATTERN, WINDOW), prompts, NEW, **kw)
    result = {"format": name, "stock_all_f": errors(ref_dense, stock), "consa_kv_head": errors(ref_alloc, consa)}
    print(f"\nGPU-QUANT {json.dumps(result)}", file=sys.stderr)
    out = os.environ.get("CONSA_GPU_QUANT_JSON")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
    assert consa.tokens != stock.tokens, "the allocation is not applied"
    return result


def _assert_parity(result: dict) -> None:
    c, s = result["consa_kv_head"], result["stock_all_f"]
    assert c["max"] <= SLACK * s["max"] + FLOOR, result
    assert c["mean"] <= SLACK * s["mean"] + FLOOR / 10, result


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_quantized_kv_head_calibrated_parity(ckpts, root, scheme):
    ckpt = ckpts[scheme]
    _assert_parity(_compare(root, scheme, ckpt, dequantized_copy(ckpt, root / f"{scheme}-dequantized")))


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
    _assert_parity(_compare(root, "fp8-block-native", ckpt, dequantized_copy(ckpt, root / "fp8-native-dequantized")))


def test_gpu_online_fp8_kv_head_calibrated_parity(ckpts, root):
    base = ckpts[SCHEMES[0]].parent / "base"
    _assert_parity(_compare(root, "online-fp8", base, base, quantization="fp8"))
