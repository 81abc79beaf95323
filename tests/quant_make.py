"""Quantize a tiny Hugging Face model with a real quantization library (a script).

Run by the tests with the quantization environment's interpreter (``.venv-quant``, see
the Makefile: llmcompressor and AutoAWQ pin torch/transformers/compressed-tensors versions
that cannot share the serving venv, so they live in an overlay venv on top of it)::

    .venv-quant/bin/python tests/quant_make.py SRC_DIR OUT_ROOT SCHEME [SCHEME ...]

writes OUT_ROOT/SCHEME for each SCHEME of :data:`SCHEMES` (one process: the libraries'
imports, most of the time here, are paid once). Calibration data are random token ids (seeded): the
tests need real checkpoint layouts and scales, not a good model.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

# scheme -> (library, what it makes)
SCHEMES = {
    "ct-fp8-tensor": ("llmcompressor", "compressed-tensors FP8, per-tensor weight and static input scales"),
    "ct-fp8-channel": ("llmcompressor", "compressed-tensors FP8, per-channel weights, dynamic per-token input"),
    "ct-fp8-block": ("llmcompressor", "compressed-tensors FP8, 128x128 weight blocks, dynamic input groups"),
    "ct-w4a16": ("llmcompressor", "compressed-tensors W4A16 pack-quantized, symmetric, group 128"),
    "ct-w4a16-asym": ("llmcompressor", "compressed-tensors W4A16 pack-quantized, asymmetric (zero points), group 128"),
    "ct-w4a16-gptq-actorder": ("llmcompressor", "compressed-tensors W4A16 by GPTQ with act order (weight_g_idx)"),
    "awq": ("autoawq", "AutoAWQ GEMM checkpoint (quant_method awq), 4-bit, zero point, group 128"),
    "gptq": ("auto-round", "GPTQ checkpoint (quant_method gptq) exported by AutoRound (RTN), 4-bit sym, group 128"),
}

CALIB_SAMPLES, CALIB_LEN = 8, 64


def calibration_ids(vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (CALIB_LEN,), generator=g).tolist() for _ in range(CALIB_SAMPLES)]


def with_llmcompressor(scheme: str, src: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ds = Dataset.from_dict({"input_ids": calibration_ids(model.config.vocab_size)})
    preset = {"ct-fp8-tensor": "FP8", "ct-fp8-channel": "FP8_DYNAMIC", "ct-fp8-block": "FP8_BLOCK",
              "ct-w4a16": "W4A16", "ct-w4a16-asym": "W4A16_ASYM", "ct-w4a16-gptq-actorder": "W4A16"}[scheme]
    if scheme == "ct-w4a16-gptq-actorder":
        # GPTQ's Hessian solves take minutes per layer on a CPU: quantize only the attention
        # projections, the tensors the head permutation moves (the MLPs stay bf16, which
        # vLLM serves as unquantized modules of the same checkpoint).
        recipe = GPTQModifier(targets=[r"re:.*self_attn\.[qkvo]_proj$"], scheme=preset, actorder="group")
    else:
        recipe = QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"])
    # No shuffling: llmcompressor shuffles the calibration samples unseeded by default, and
    # GPTQ's Hessian sums then differ in rounding from run to run (two different checkpoints
    # measured), while the tests compare greedy tokens of this checkpoint.
    oneshot(model=model, recipe=recipe, dataset=ds, num_calibration_samples=CALIB_SAMPLES,
            max_seq_length=CALIB_LEN, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def with_autoawq(scheme: str, src: Path, out: Path) -> None:
    import torch
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    model = AutoAWQForCausalLM.from_pretrained(str(src), torch_dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(src)
    # apply_clip=False skips the weight-clipping grid search, most of AWQ's time on a CPU;
    # the activation-aware scale search and the checkpoint format are unchanged.
    model.quantize(tok, quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                   calib_data=calibration_ids(model.config.vocab_size), max_calib_samples=CALIB_SAMPLES,
                   max_calib_seq_len=CALIB_LEN, n_parallel_calib_samples=CALIB_SAMPLES, apply_clip=False)
    model.save_quantized(str(out))
    tok.save_pretrained(out)


def with_autoround(scheme: str, src: Path, out: Path) -> None:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    data = [torch.tensor([ids]) for ids in calibration_ids(model.config.vocab_size)]
    # iters=0 with disable_opt_rtn: AutoRound's plain RTN mode (its sign-gradient tuning and
    # optimised RTN take minutes per layer on a CPU); the exported GPTQ layout is the same.
    ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=0, disable_opt_rtn=True,
                   nsamples=CALIB_SAMPLES, seqlen=CALIB_LEN, dataset=data)
    tmp = out.with_name(out.name + ".autoround")
    _, folders = ar.quantize_and_save(str(tmp), format="auto_gptq")
    # AutoRound writes into a subfolder named after the model and scheme.
    made = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(made), str(out))
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    src, root, schemes = Path(argv[0]), Path(argv[1]), argv[2:]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown scheme(s) {unknown}; known: {', '.join(SCHEMES)}")
    for scheme in schemes:
        t0 = time.monotonic()
        out = root / scheme
        {"autoawq": with_autoawq, "auto-round": with_autoround}.get(SCHEMES[scheme][0], with_llmcompressor)(
            scheme, src, out)
        cfg = json.loads((out / "config.json").read_text())
        print(json.dumps({"scheme": scheme, "seconds": round(time.monotonic() - t0, 1),
                          "quantization_config": cfg.get("quantization_config")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
