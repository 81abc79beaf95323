"""Export: a checkpoint that the vLLM plugin serves (CPU, tiny random models)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from consa_vllm.allocation import Allocation, AllocationError, make_allocation
from consa_vllm.families import supported_summary
from consa_vllm.export import (
    CONFIG_KEY,
    ExportError,
    export_model,
    exported_config,
    read_exported_allocation,
)

L, H = 4, 2


@pytest.fixture(scope="module")
def qwen3(tiny_model) -> Path:
    return tiny_model("qwen3", num_layers=L, num_kv_heads=H)


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama", num_layers=L, num_kv_heads=H, tokenizer=False)


@pytest.fixture
def alloc() -> Allocation:
    return Allocation(granularity="kv_head", window=16, pattern=["SS", "FS", "SF", "FF"], rule="hand")


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _fake_checkpoint(d: Path, config: dict) -> Path:
    """A config.json plus a placeholder weight file: enough for export (which never loads weights)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


BASE_CFG = {"num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": H, "head_dim": 32,
            "hidden_size": 128, "vocab_size": 512, "intermediate_size": 256}


# ----------------------------------------------------------------------------- the happy path


def test_export_qwen3_loads_with_transformers(qwen3, alloc, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    dst = export_model(qwen3, alloc, tmp_path / "out")
    assert dst == tmp_path / "out"
    # Everything of the source is there; nothing extra, no temp dirs next to DST.
    assert _entries(dst) == _entries(qwen3)
    assert _entries(tmp_path) == ["out"]

    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.model_type == "qwen3"
    assert cfg.architectures == ["ConsaQwen3ForCausalLM"]
    assert cfg.consa["base_architecture"] == "Qwen3ForCausalLM"
    assert cfg.consa["pattern"] == alloc.pattern
    # No global sliding window that vLLM could pick up (docs/DESIGN.md §7, Traps).
    assert cfg.sliding_window is None and cfg.use_sliding_window is False
    assert cfg.layer_types == ["full_attention"] * L
    assert cfg.num_hidden_layers == L and cfg.num_key_value_heads == H

    tok = AutoTokenizer.from_pretrained(dst)
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert ids and tok.decode(ids) == "def f(x):\n    return x"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")

    # Non-weight files are copies, the config is the only file that changed.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert filecmp.cmp(qwen3 / name, dst / name, shallow=False)
        assert not os.path.samefile(qwen3 / name, dst / name)
    src_cfg = json.loads((qwen3 / "config.json").read_text())
    out_cfg = json.loads((dst / "config.json").read_text())
    changed = {k for k in set(src_cfg) | set(out_cfg) if src_cfg.get(k) != out_cfg.get(k)}
    assert changed == {"architectures", CONFIG_KEY}


def test_allocation_round_trip(qwen3, alloc, tmp_path):
    from transformers import AutoConfig

    dst = export_model(qwen3, alloc, tmp_path / "out")
    want = alloc.with_extra(base_architecture="Qwen3ForCausalLM")
    assert read_exported_allocation(dst) == want
    assert read_exported_allocation(dst / "config.json") == want
    assert read_exported_allocation(json.loads((dst / "config.json").read_text())) == want
    assert read_exported_allocation(AutoConfig.from_pretrained(dst)) == want
    assert read_exported_allocation(dst).to_dict()["rule"] == "hand"  # provenance survives


def test_allocation_from_file_and_dict(qwen3, alloc, tmp_path):
    path = alloc.save(tmp_path / "a.json")
    a = read_exported_allocation(export_model(qwen3, path, tmp_path / "o1"))
    b = read_exported_allocation(export_model(qwen3, alloc.to_dict(), tmp_path / "o2"))
    assert a == b and a.pattern == alloc.pattern


def test_weights_hard_linked_by_default(qwen3, alloc, tmp_path):
    dst = export_model(qwen3, alloc, tmp_path / "out")
    assert os.path.samefile(qwen3 / "model.safetensors", dst / "model.safetensors")


def test_weights_copied_with_link_false(qwen3, alloc, tmp_path):
    dst = export_model(qwen3, alloc, tmp_path / "out", link=False)
    assert not os.path.samefile(qwen3 / "model.safetensors", dst / "model.safetensors")
    assert filecmp.cmp(qwen3 / "model.safetensors", dst / "model.safetensors", shallow=False)


def test_link_falls_back_to_copy(qwen3, alloc, tmp_path, monkeypatch):
    import errno

    def no_link(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dst = export_model(qwen3, alloc, tmp_path / "out", link=True)
    assert not os.path.samefile(qwen3 / "model.safetensors", dst / "model.safetensors")
    assert filecmp.cmp(qwen3 / "model.safetensors", dst / "model.safetensors", shallow=False)


def test_exported_weights_load_in_transformers(qwen3, alloc, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    dst = export_model(qwen3, alloc, tmp_path / "out")
    a = AutoModelForCausalLM.from_pretrained(qwen3)
    b = AutoModelForCausalLM.from_pretrained(dst)  # model_type picks the class, not architectures
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_export_llama(llama, tmp_path):
    from transformers import AutoConfig

    a = make_allocation("middle", 0.5, L, H, 32, granularity="layer")
    dst = export_model(llama, a, tmp_path / "out")
    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.architectures == ["ConsaLlamaForCausalLM"]
    assert cfg.consa["base_architecture"] == "LlamaForCausalLM"
    assert getattr(cfg, "sliding_window", None) is None
    assert getattr(cfg, "layer_types", None) is None
    raw = json.loads((dst / "config.json").read_text())
    assert "sliding_window" not in raw and "use_sliding_window" not in raw and "layer_types" not in raw
    assert read_exported_allocation(dst).pattern == a.pattern


def test_vllm_reads_no_global_sliding_window(qwen3, alloc, tmp_path):
    """What vLLM 0.26 itself derives from the exported config (EngineArgs/ModelConfig logic)."""
    vcfg = pytest.importorskip("vllm.transformers_utils.config")
    dst = export_model(qwen3, alloc, tmp_path / "out")
    hf = vcfg.get_config(str(dst), trust_remote_code=False)
    text = hf.get_text_config()
    assert hf.architectures == ["ConsaQwen3ForCausalLM"]
    assert not vcfg.is_interleaved(text)
    assert getattr(text, "sliding_window", None) is None  # -> cache_config.sliding_window stays None


@pytest.mark.parametrize(
    "model_type, arch, extra",
    [
        ("mistral", "MistralForCausalLM", {"sliding_window": 4096}),
        ("mistral", "MistralForCausalLM", {}),  # HF's MistralConfig defaults sliding_window to 4096
        ("qwen2", "Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2}),
    ],
)
def test_source_sliding_window_is_neutralised(tmp_path, alloc, model_type, arch, extra):
    from transformers import AutoConfig

    src = _fake_checkpoint(tmp_path / "src", {**BASE_CFG, "model_type": model_type, "architectures": [arch], **extra})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dst = export_model(src, alloc, tmp_path / "out")
    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.architectures == ["Consa" + arch]
    assert cfg.sliding_window is None
    assert set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    if extra.get("sliding_window"):
        assert cfg.consa["base_sliding_window"] == extra["sliding_window"]
        assert any("sliding-window attention of its own" in str(w.message) for w in caught)


def test_exported_config_is_pure():
    a = Allocation(granularity="layer", window=8, pattern=["S", "F"])
    src = {**BASE_CFG, "num_hidden_layers": 2, "num_key_value_heads": 1, "architectures": ["LlamaForCausalLM"],
           "model_type": "llama"}
    before = json.dumps(src)
    out = exported_config(src, a)
    assert json.dumps(src) == before
    assert out["architectures"] == ["ConsaLlamaForCausalLM"]
    assert out[CONFIG_KEY] == {**a.to_dict(), "base_architecture": "LlamaForCausalLM"}


# ----------------------------------------------------------------------------- re-export, --force


def test_reexport_with_new_allocation(qwen3, alloc, tmp_path):
    first = export_model(qwen3, alloc, tmp_path / "first")
    new = make_allocation("top", 0.5, L, H, 8)
    second = export_model(first, new, tmp_path / "second")
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["architectures"] == ["ConsaQwen3ForCausalLM"]  # not ConsaConsa...
    assert read_exported_allocation(second) == new.with_extra(base_architecture="Qwen3ForCausalLM")
    assert os.path.samefile(qwen3 / "model.safetensors", second / "model.safetensors")


def test_reexport_in_place_with_force(qwen3, alloc, tmp_path):
    dst = export_model(qwen3, alloc, tmp_path / "m")
    new = make_allocation("bottom", 0.25, L, H, 8)
    export_model(dst, new, dst, force=True)
    assert read_exported_allocation(dst).pattern == new.pattern
    assert os.path.samefile(qwen3 / "model.safetensors", dst / "model.safetensors")
    assert _entries(tmp_path) == ["m"]


def test_existing_dst_refused_without_force(qwen3, alloc, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out: already exists; pass --force"):
        export_model(qwen3, alloc, dst)
    assert _entries(dst) == ["keep.txt"]
    # force replaces only an earlier export or model checkpoint (a folder with config.json): nothing else is deleted
    with pytest.raises(ExportError, match=r"out: is a folder with files but no config.json, not an earlier export"):
        export_model(qwen3, alloc, dst, force=True)
    assert _entries(dst) == ["keep.txt"]
    (dst / "config.json").write_text("{}")  # now it reads as an earlier checkpoint
    export_model(qwen3, alloc, dst, force=True)
    assert "keep.txt" not in _entries(dst) and (dst / "config.json").is_file()
    assert _entries(tmp_path) == ["out"]


def test_dst_that_is_a_file_is_refused_even_with_force(qwen3, alloc, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        export_model(qwen3, alloc, tmp_path / "out", force=True)


# ----------------------------------------------------------------------------- refusals before writing


def test_mismatched_allocation_refused_before_anything_is_written(qwen3, tmp_path):
    bad = make_allocation("bottom", 0.5, 6, H, 16).save(tmp_path / "six_layers.json")
    with pytest.raises(AllocationError) as ei:
        export_model(qwen3, bad, tmp_path / "out")
    msg = str(ei.value)
    assert "six_layers.json" in msg and "pattern has 6 layers but the model has 4 (num_hidden_layers)" in msg
    assert str(qwen3 / "config.json") in msg
    assert _entries(tmp_path) == ["six_layers.json"]  # no DST, no temp dir

    bad_heads = make_allocation("bottom", 0.5, L, 4, 16)
    with pytest.raises(AllocationError, match=r"4 KV heads per layer but the model has 2 \(num_key_value_heads\)"):
        export_model(qwen3, bad_heads, tmp_path / "out")
    assert _entries(tmp_path) == ["six_layers.json"]


def test_malformed_allocation_file_refused(qwen3, tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"granularity": "kv_head", "window": 16, "pattern": ["SX", "FF", "FF", "FF"]}))
    with pytest.raises(AllocationError, match=r"a\.json: invalid allocation: field 'pattern'"):
        export_model(qwen3, p, tmp_path / "out")
    with pytest.raises(AllocationError, match="allocation file not found"):
        export_model(qwen3, tmp_path / "missing.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setup, phrase",
    [
        (lambda d: None, "source model directory not found"),
        (lambda d: d.mkdir(), "config.json: not found"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "config.json: not valid JSON"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps(
            {**BASE_CFG, "architectures": ["Qwen3ForCausalLM"]}))), "no weight files"),
        (lambda d: _fake_checkpoint(d, {**BASE_CFG, "architectures": ["GPT2LMHeadModel"]}),
         "field 'architectures' is 'GPT2LMHeadModel', which ConSA cannot serve; supported: "
         + supported_summary()),
        (lambda d: _fake_checkpoint(d, {**BASE_CFG, "architectures": ["A", "B"]}), "must be a list with one name"),
        (lambda d: _fake_checkpoint(d, {**BASE_CFG, "architectures": ["Qwen2ForCausalLM"],
                                        "dual_chunk_attention_config": {"chunk_size": 262144}}),
         "field 'dual_chunk_attention_config' is set, but ConSA attention does not implement dual-chunk attention"),
        (lambda d: (_fake_checkpoint(d, {**BASE_CFG, "architectures": ["LlamaForCausalLM"]}),
                    (d / "model.safetensors.index.json").write_text(json.dumps(
                        {"weight_map": {"x": "model-00002-of-00002.safetensors"}}))),
         "field 'weight_map' names missing shard(s): model-00002-of-00002.safetensors"),
    ],
)
def test_bad_source_refused(tmp_path, alloc, setup, phrase):
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(ExportError) as ei:
        export_model(src, alloc, tmp_path / "out")
    assert phrase in str(ei.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- never half-written


def _fail_on_call(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    return wrapper


def test_failure_mid_copy_leaves_no_dst(qwen3, alloc, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "copy2", _fail_on_call(2, shutil.copy2))
    with pytest.raises(OSError, match="No space left"):
        export_model(qwen3, alloc, tmp_path / "out", link=False)
    assert _entries(tmp_path) == []  # neither DST nor the temp dir


def test_failure_mid_copy_keeps_old_dst(qwen3, alloc, tmp_path, monkeypatch):
    dst = export_model(qwen3, alloc, tmp_path / "out")
    before = (dst / "config.json").read_text()
    monkeypatch.setattr(shutil, "copy2", _fail_on_call(3, shutil.copy2))
    with pytest.raises(OSError, match="No space left"):
        export_model(qwen3, make_allocation("top", 0.5, L, H, 8), dst, force=True, link=False)
    assert (dst / "config.json").read_text() == before
    assert read_exported_allocation(dst).pattern == alloc.pattern
    assert _entries(tmp_path) == ["out"]


def test_failure_during_swap_restores_old_dst(qwen3, alloc, tmp_path, monkeypatch):
    dst = export_model(qwen3, alloc, tmp_path / "out")
    # rename #1 moves the old DST aside, rename #2 (the new dir into place) fails.
    monkeypatch.setattr(os, "rename", _fail_on_call(2, os.rename))
    with pytest.raises(OSError):
        export_model(qwen3, make_allocation("top", 0.5, L, H, 8), dst, force=True)
    assert read_exported_allocation(dst).pattern == alloc.pattern
    assert _entries(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- read_exported_allocation errors


def test_read_exported_allocation_errors_name_config_and_field(qwen3, tmp_path):
    with pytest.raises(AllocationError, match=r"config\.json: field 'consa' is missing: not a ConSA checkpoint"):
        read_exported_allocation(qwen3)
    with pytest.raises(AllocationError, match=r"config\.json: not found"):
        read_exported_allocation(tmp_path / "nowhere")

    cfg = {**BASE_CFG, "architectures": ["ConsaQwen3ForCausalLM"]}
    bad = {**cfg, CONFIG_KEY: {"granularity": "kv_head", "window": 0, "pattern": ["SS"] * L}}
    with pytest.raises(AllocationError, match=r"config\.json \(field 'consa'\): invalid allocation: field 'window'"):
        read_exported_allocation(bad)
    with pytest.raises(AllocationError, match="field 'consa' must be a JSON object"):
        read_exported_allocation({**cfg, CONFIG_KEY: "SSFF"})
    short = {**cfg, CONFIG_KEY: {"granularity": "kv_head", "window": 8, "pattern": ["SS"] * (L - 1)}}
    with pytest.raises(AllocationError,
                       match=r"config\.json \(field 'consa\.pattern'\): pattern has 3 layers but the model has 4"):
        read_exported_allocation(short)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(short))
    with pytest.raises(AllocationError, match=rf"{d / 'config.json'} \(field 'consa\.pattern'\)"):
        read_exported_allocation(d)
