"""The family registry (consa_vllm/families.py) is the one place that names a family, and
unsupported families are refused with the supported list (no engine here)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from consa_vllm import families
from consa_vllm.allocation import Allocation
from consa_vllm.export import export_model
from consa_vllm.tiny import build_tiny_model

WINDOW = 24
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]

PACKAGE = Path(__file__).resolve().parents[1] / "consa_vllm"


def _family_tokens() -> dict[str, str]:
    """Every name that identifies a family -> the family."""
    from transformers import AutoConfig

    tokens = {}
    for f in families.FAMILIES:
        config_class = type(AutoConfig.for_model(f.model_type)).__name__
        for t in (f.hf_architecture, f.consa_architecture, f.model_type, config_class,
                  f.vllm_class.split(":")[0], f.vllm_class.split(":")[1], f.hf_attention.split(":")[1]):
            tokens[t] = f.name
    return tokens


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_families_are_named_only_in_the_registry():
    """No module of the package but consa_vllm/families.py names a family in code.

    Code means string literals (outside docstrings), identifiers, attributes and imports.
    """
    tokens = _family_tokens()
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "families.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            found = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found = [t for t in tokens if t == node.value or (len(t) > 8 and t in node.value)]
            elif isinstance(node, ast.Name):
                found = [t for t in tokens if t == node.id]
            elif isinstance(node, ast.Attribute):
                found = [t for t in tokens if t == node.attr]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                found = [t for t in tokens for n in names if t == n or t in n.split(".")]
            hits += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {t}" for t in found]
    assert not hits, "family named outside consa_vllm/families.py:\n" + "\n".join(hits)


def test_unknown_family_refused_with_the_supported_list(tmp_path):
    from consa_vllm.export import ExportError, exported_config
    from consa_vllm.plugin import models  # noqa: F401  (lazy class lookup only; no engine)

    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256}
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    with pytest.raises(ExportError) as e:
        exported_config(cfg, alloc)
    assert "'GPT2LMHeadModel'" in str(e.value)
    for f in families.FAMILIES:
        assert f.hf_architecture in str(e.value)
    with pytest.raises(AttributeError):
        getattr(models, "ConsaGPT2LMHeadModel")


def test_plain_architecture_with_an_allocation_refused_by_vllm(tmp_path):
    """vLLM's own config building (as under ``vllm serve``) refuses a checkpoint whose
    config.json carries an allocation under the plain architecture, before any weight loads."""
    from vllm.engine.arg_utils import EngineArgs

    src = build_tiny_model(tmp_path / "src", "qwen3_moe", num_layers=4, num_attention_heads=8, num_kv_heads=4)
    dst = export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN), tmp_path / "dst")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    # vLLM's pydantic ModelConfig wraps the hook's AllocationError (a ValueError).
    with pytest.raises(ValueError) as e:
        EngineArgs(model=str(dst), max_model_len=512).create_engine_config()
    msg = str(e.value)
    assert str(dst / "config.json") in msg and "'ConsaQwen3MoeForCausalLM'" in msg and "field 'consa'" in msg


@pytest.mark.parametrize("family, experts, dtype, user, padding", [
    ("mixtral", 4, "bfloat16", None, False),  # the GPU tests' model: 4 -> 8 would be padded
    ("mixtral", 4, "float32", None, None),  # float32 aligns to 4: nothing to pad
    ("mixtral", 8, "bfloat16", None, None),  # Mixtral-8x7B's count: aligned
    ("qwen3_moe", 60, "float16", None, False),
    ("qwen3_moe", 128, "bfloat16", None, None),  # Qwen3-30B-A3B's count
    ("qwen3", None, "bfloat16", None, None),  # dense
    ("mixtral", 4, "bfloat16", True, True),  # the user's explicit choice stands, with a warning
])
def test_router_padding_guard(tmp_path, caplog, family, experts, dtype, user, padding):
    """vLLM's own config building (as under ``vllm serve``) turns Inductor's matmul shape
    padding off exactly for MoE models whose expert count Inductor would pad in that dtype
    (docs/DESIGN.md §10: padded router logits are misread by vLLM 0.26's top-k routing
    kernel), and leaves an explicit ``shape_padding`` alone."""
    import logging

    from vllm.engine.arg_utils import EngineArgs

    fam = families.by_name(family)
    extra = {fam.experts_field: experts} if fam.is_moe else {}
    src = build_tiny_model(tmp_path / "src", family, num_layers=2, num_attention_heads=4, num_kv_heads=2, **extra)
    dst = export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=["FS", "SF"]),
                       tmp_path / "dst")
    compilation = {"inductor_compile_config": {"shape_padding": user}} if user is not None else {}
    with caplog.at_level(logging.INFO, logger="consa_vllm"):
        cfg = EngineArgs(model=str(dst), max_model_len=512, dtype=dtype,
                         compilation_config=compilation).create_engine_config()
    assert cfg.compilation_config.inductor_compile_config.get("shape_padding") is padding
    notes = [r for r in caplog.records if "misreads" in r.getMessage()]
    if padding is None:
        assert not notes
    else:
        assert len(notes) == 1 and f"{experts} experts" in notes[0].getMessage()
        assert notes[0].levelno == (logging.WARNING if user else logging.INFO)


@pytest.mark.parametrize("experts, dtype, align", [
    (4, "bfloat16", 8), (4, "torch.bfloat16", 8), (4, "float32", 0), (6, "float32", 4),
    (8, "bfloat16", 0), (60, "float16", 8), (128, "bfloat16", 0), (None, "bfloat16", 0), (0, "float16", 0),
])
def test_router_padding_alignment(experts, dtype, align):
    """The one rule behind the plugin's guard and the stock engines the GPU tests give it by hand:
    the dtype given as a name or as torch prints it."""
    from consa_vllm.plugin.config import router_padding_alignment

    assert router_padding_alignment(experts, dtype) == align
