"""The load-time head permutation on real quantized checkpoints, without an engine.

Each checkpoint is made by a real library (tests/quant_make.py: llmcompressor, AutoAWQ,
AutoRound) from one tiny random Qwen3 with Qwen3-0.6B's head geometry. For each format:
permute the checkpoint tensors as the plugin's loader does, dequantize with the format's
own reference code (compressed-tensors' dequantizer and AutoAWQ converter, vLLM's GPTQ
unpacking), and compare with the plain permutation of the dequantized original: they must
be bitwise equal. Then the refusals, on the real formats' configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant_harness import checkpoints, dequantize, load, shared_root

from consa_vllm.plugin.layout import balance_heads
from consa_vllm.plugin.permute import (
    PLAIN,
    QuantPermutationError,
    check_quantized_permutation,
    permute_checkpoint_heads,
    quant_format,
)

SCHEMES = ["ct-fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-w4a16", "ct-w4a16-asym",
           "ct-w4a16-gptq-actorder", "awq", "gptq"]
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 128
ORDERS = {
    "tp1": {l: o for l, o in enumerate(balance_heads(PATTERN, 1))},
    "tp2": {l: o for l, o in enumerate(balance_heads(PATTERN, 2))},
    "reversed": {l: (3, 2, 1, 0) for l in range(4)},
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN = tuple(f".self_attn.{p}." for p in PROJ)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return checkpoints(shared_root(tmp_path_factory), SCHEMES)


def attention_weights(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in w.items() if n.endswith(tuple(f"self_attn.{p}.weight" for p in PROJ))}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("orders", list(ORDERS))
def test_permuted_checkpoint_dequantizes_to_the_permuted_weights(ckpts, scheme, orders):
    d = ckpts[scheme]
    tensors, cfg = load(d)
    fmt = quant_format(cfg)
    order = ORDERS[orders]
    check_quantized_permutation(cfg, order, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)

    permuted = dict(permute_checkpoint_heads(tensors.items(), order, HEADS, KV_HEADS, HEAD_DIM, quant=fmt))
    assert permuted.keys() == tensors.keys()
    got = attention_weights(dequantize(d, permuted, cfg, only=ATTN))
    original = attention_weights(dequantize(d, tensors, cfg, only=ATTN))
    want = dict(permute_checkpoint_heads(original.items(), order, HEADS, KV_HEADS, HEAD_DIM, quant=PLAIN))
    assert got.keys() == want.keys() and len(got) == 4 * 4
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name], want[name]), name
    moving = [l for l, o in order.items() if o != tuple(range(KV_HEADS))]
    assert moving
    # The permutation did something: every projection of a moving layer changed.
    for l in moving:
        for p in PROJ:
            n = f"model.layers.{l}.self_attn.{p}.weight"
            assert not torch.equal(want[n], original[n]), n


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_tensor_of_the_format_is_described(ckpts, scheme):
    """Each attention tensor of the checkpoint is one the format's layout names (or a scalar)."""
    tensors, cfg = load(ckpts[scheme])
    fmt = quant_format(cfg)
    for name, t in tensors.items():
        if ".self_attn." in name and "_proj." in name:
            param = name.rsplit(".", 1)[1]
            assert fmt.layout(param) is not None or (param in fmt.scalars and t.numel() == 1), name


def _shape32(**kw):
    return dict(num_heads=8, num_kv_heads=4, head_dim=32, **kw)


# Served heads (2, 1) come from checkpoint groups 1 and 0 of 128 channels: a straddle. (A swap
# of heads 0 and 1 keeps every 128-channel group whole, and is rightly accepted.)
ORDER = {0: (2, 1, 0, 3)}


@pytest.mark.parametrize("scheme, phrases", [
    # o_proj moves blocks of 2 query heads x 32 = 64 input channels; groups of 128 straddle them.
    ("ct-w4a16", ["compressed-tensors pack-quantized W4 (group 128)", "o_proj.weight_scale",
                  "groups of 128 channels along the input dim", "64 channels"]),
    ("ct-w4a16-asym", ["compressed-tensors pack-quantized W4 (group 128)", "o_proj.weight_scale"]),
    # q_proj moves 64-row blocks (2 query heads); 128x128 weight blocks straddle them.
    ("ct-fp8-block", ["compressed-tensors float-quantized FP8 (block 128x128)", "q_proj.weight_scale",
                      "groups of 128 channels along the output dim",
                      "blocks of 64 channels (2 query heads x head_dim 32 per KV head)"]),
    ("awq", ["AWQ (4-bit, group 128)", "o_proj.qzeros", "groups of 128 channels"]),
    ("gptq", ["GPTQ (4-bit, group 128)", "o_proj.qzeros", "groups of 128 channels"]),
])
def test_straddling_groups_are_refused_in_one_line(ckpts, scheme, phrases):
    _, cfg = load(ckpts[scheme])
    with pytest.raises(QuantPermutationError) as e:
        check_quantized_permutation(cfg, ORDER, **_shape32())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ConSA kv_head allocation with ")
    for p in phrases:
        assert p in msg, (p, msg)
    # Nothing moves (identity orders): any format is served as it is.
    check_quantized_permutation(cfg, {0: (0, 1, 2, 3)}, **_shape32())


@pytest.mark.parametrize("scheme", ["ct-fp8-tensor", "ct-fp8-channel", "ct-w4a16-gptq-actorder"])
def test_formats_without_straddling_entries_accept_small_heads(ckpts, scheme):
    """Per-tensor and per-channel FP8 have no groups along the head axes; act-order groups are
    addressed through g_idx, which moves with the channels, so group 128 works at head_dim 32."""
    _, cfg = load(ckpts[scheme])
    check_quantized_permutation(cfg, ORDER, **_shape32())


def test_packed_words_must_hold_whole_heads():
    """AWQ packs 8 output channels per int32: a head_dim of 4 would split words across heads."""
    cfg = {"quant_method": "awq", "bits": 4, "group_size": -1, "zero_point": True, "version": "gemm"}
    with pytest.raises(QuantPermutationError, match=r"k_proj.qweight packs of 8 channels along the output dim"):
        check_quantized_permutation(cfg, ORDER, num_heads=8, num_kv_heads=4, head_dim=4)
    check_quantized_permutation(cfg, ORDER, num_heads=8, num_kv_heads=4, head_dim=8)


@pytest.mark.parametrize("cfg, method, phrase", [
    (None, "bitsandbytes", "--quantization bitsandbytes: this quantization method is not supported"),
    ({"quant_method": "bitsandbytes"}, None, "quant_method 'bitsandbytes' checkpoints: this format"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"}, None,
     "AWQ version 'gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False}, None, "3-bit GPTQ"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128}}},
      "sparsity_config": {"format": "sparse-24-bitmask"}}, None, "sparse layouts are not supported"),
])
def test_unsupported_formats_are_refused(cfg, method, phrase):
    with pytest.raises(QuantPermutationError, match=phrase):
        check_quantized_permutation(cfg, ORDER, num_heads=8, num_kv_heads=4, head_dim=128, method=method)


def test_online_fp8_is_the_plain_permutation():
    assert quant_format(None, "fp8") is PLAIN
    assert quant_format(None, None) is PLAIN
    check_quantized_permutation(None, ORDER, num_heads=8, num_kv_heads=4, head_dim=32, method="fp8")
