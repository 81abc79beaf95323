"""Load-time KV-head permutation of checkpoint tensors, plain and quantized.

kv_head allocations are served with each tensor-parallel rank's F heads first
(:mod:`consa_vllm.plugin.layout`). Any permutation of a layer's KV heads, each moved
together with its query heads and the matching ``o_proj`` input columns, leaves the
layer's function unchanged, so the plugin reorders the checkpoint tensors as they stream
into vLLM's loaders: before tensor-parallel slicing, and before any quantization method
repacks or post-processes the weights (``process_weights_after_loading``).

Quantized formats store more than one tensor per projection (packed integers, scales,
zero points, group indices), each indexing the head axis (output features for
q/k/v_proj, input features for o_proj) at its own granularity: one entry per channel,
per group or block of channels, or per int32 holding several packed channels. A head
permutation is exact only if every such entry covers channels of a single head block
(all channels of one block move together, so one scale or one packed word still
describes them); then the tensor is permuted by whole entries and nothing is
re-quantized. :func:`check_quantized_permutation` checks that with the same index
arithmetic as the loader, before any weight loads, and refuses a format whose groups,
blocks or packed words would straddle the heads being moved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class QuantPermutationError(ValueError):
    """A checkpoint format whose tensors cannot follow the kv_head permutation exactly."""


@dataclass(frozen=True)
class Axis:
    """How one tensor dimension runs along a projection's head axis.

    ``unit`` channels share one index along ``dim`` (1: one index per channel; a group
    or block size; the pack factor of a packed dimension); ``None`` means the whole axis
    is one index (per-tensor or per-row values, which no head permutation changes).
    ``packed``: several channels live in one integer in order, so an index can only move
    whole and only onto a position holding the same channels in the same order.
    """

    dim: int
    unit: int | None = 1
    packed: bool = False


@dataclass(frozen=True)
class TensorLayout:
    """Where a checkpoint tensor indexes output features (``out``) and input features (``inp``)."""

    out: Axis | None = None
    inp: Axis | None = None


@dataclass(frozen=True)
class QuantFormat:
    """The tensors of one checkpoint format, by parameter name (the part after ``q_proj.``)."""

    name: str  # for messages, e.g. "AWQ (4-bit, group 128)"
    tensors: Mapping[str, TensorLayout] = field(default_factory=dict)
    # Names whose values are per tensor (one element) and pass unchanged, e.g. static input
    # scales; a larger one of these is refused at load time.
    scalars: frozenset[str] = frozenset()

    def layout(self, param: str) -> TensorLayout | None:
        return self.tensors.get(param)


_DENSE = TensorLayout(out=Axis(0), inp=Axis(1))  # [N, K] weight
_BIAS = TensorLayout(out=Axis(0))  # [N]; o_proj's bias is along its output, not the heads
_PER_TENSOR = frozenset({"input_scale", "input_zero_point", "output_scale", "output_zero_point",
                         "k_scale", "v_scale", "q_scale", "prob_scale"})

PLAIN = QuantFormat("unquantized", {"weight": _DENSE, "bias": _BIAS}, _PER_TENSOR)

# --quantization values whose weights arrive unquantized and are quantized by vLLM after
# loading (online quantization): the plain permutation applies.
ONLINE_METHODS = frozenset({"fp8", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel",
                            "int8_per_channel_weight_only", "online", "mxfp8", "nvfp4_per_token"})


def _refuse(fmt: str, reason: str) -> QuantPermutationError:
    return QuantPermutationError(f"ConSA kv_head allocation with {fmt}: {reason}")


def _as_dict(quantization_config: Any) -> dict | None:
    if quantization_config is None:
        return None
    if isinstance(quantization_config, Mapping):
        return dict(quantization_config)
    if hasattr(quantization_config, "to_dict"):
        return quantization_config.to_dict()
    raise TypeError(f"quantization_config must be a mapping, got {type(quantization_config).__name__}")


def quant_format(quantization_config: Any = None, method: str | None = None) -> QuantFormat:
    """The :class:`QuantFormat` of a checkpoint, from ``config.json["quantization_config"]``.

    ``method`` is vLLM's ``--quantization`` (``model_config.quantization``); it matters only
    without a checkpoint config (online quantization of an unquantized checkpoint).
    Raises :class:`QuantPermutationError` (one line) for formats the permutation does not
    handle.
    """
    cfg = _as_dict(quantization_config)
    if cfg is None:
        if method is None or method in ONLINE_METHODS:
            return PLAIN
        raise _refuse(f"--quantization {method}", "this quantization method is not supported (supported: "
                      "online fp8, FP8 / W4A16 compressed-tensors, AWQ and GPTQ checkpoints)")
    qm = str(cfg.get("quant_method", "")).lower()
    if qm == "compressed-tensors":
        return _compressed_tensors_format(cfg)
    if qm == "awq":
        return _awq_format(cfg)
    if qm == "gptq":
        return _gptq_format(cfg)
    if qm == "fp8":
        return _fp8_format(cfg)
    raise _refuse(f"quant_method {qm!r} checkpoints", "this format is not supported (supported: online fp8, "
                  "FP8 / W4A16 compressed-tensors, AWQ and GPTQ checkpoints)")


def _group_units(group_size: int | None) -> int | None:
    return None if group_size in (None, -1, 0) else int(group_size)


def _awq_format(cfg: dict) -> QuantFormat:
    bits = cfg.get("w_bit", cfg.get("bits"))
    group = cfg.get("q_group_size", cfg.get("group_size"))
    version = str(cfg.get("version", "gemm")).lower()
    name = f"AWQ ({bits}-bit, group {group})"
    if version != "gemm":
        raise _refuse(name, f"AWQ version {version!r} is not supported (only the GEMM layout)")
    if bits not in (4, 8):
        raise _refuse(name, f"{bits}-bit AWQ is not supported")
    pf, g = 32 // bits, _group_units(group)
    # AutoAWQ GEMM: qweight [K, N/pf] and qzeros [K/G, N/pf] packed along N in AWQ's
    # interleaved order, which is internal to each int32 (moved whole); scales [K/G, N].
    packed_n = Axis(1, pf, packed=True)
    tensors = {"qweight": TensorLayout(out=packed_n, inp=Axis(0)),
               "qzeros": TensorLayout(out=packed_n, inp=Axis(0, g)),
               "scales": TensorLayout(out=Axis(1), inp=Axis(0, g)),
               "weight": _DENSE, "bias": _BIAS}
    return QuantFormat(name, tensors, _PER_TENSOR)


def _gptq_format(cfg: dict) -> QuantFormat:
    bits, group, desc_act = cfg.get("bits"), cfg.get("group_size"), bool(cfg.get("desc_act", False))
    name = f"GPTQ ({bits}-bit, group {group}{', desc_act' if desc_act else ''})"
    if bits not in (2, 4, 8):
        # 3-bit GPTQ packs 32 values across three int32 words: no whole-word moves per head.
        raise _refuse(name, f"{bits}-bit GPTQ is not supported (packed words span channels unevenly)")
    if cfg.get("dynamic"):
        raise _refuse(name, "per-module 'dynamic' overrides are not supported")
    pf, g = 32 // bits, _group_units(group)
    if g is None:
        desc_act = False  # vLLM ignores act order without groups
    # qweight [K/pf, N] packed along K; scales [K/G, N]; qzeros [K/G, N/pf] packed along N;
    # g_idx [K]. With desc_act, channel k uses group g_idx[k]: the groups are then
    # addressed by id, not position, so o_proj's scales stay and g_idx moves with the
    # input channels. Without it vLLM ignores g_idx and groups are positional.
    grouped = None if desc_act else Axis(0, g)
    tensors = {"qweight": TensorLayout(out=Axis(1), inp=Axis(0, pf, packed=True)),
               "qzeros": TensorLayout(out=Axis(1, pf, packed=True), inp=grouped),
               "scales": TensorLayout(out=Axis(1), inp=grouped),
               "g_idx": TensorLayout(inp=Axis(0) if desc_act else None),
               "weight": _DENSE, "bias": _BIAS}
    return QuantFormat(name, tensors, _PER_TENSOR)


def _fp8_format(cfg: dict) -> QuantFormat:
    block = cfg.get("weight_block_size")
    name = f"FP8 checkpoint ({'block ' + 'x'.join(map(str, block)) if block else 'per-tensor'})"
    if block is not None and len(block) != 2:
        raise _refuse(name, f"weight_block_size {block} is not two-dimensional")
    tensors: dict[str, TensorLayout] = {"weight": _DENSE, "bias": _BIAS}
    if block:
        # weight_scale_inv [ceil(N/bn), ceil(K/bk)]: one scale per block of the weight.
        tensors["weight_scale_inv"] = TensorLayout(out=Axis(0, int(block[0])), inp=Axis(1, int(block[1])))
    return QuantFormat(name, tensors, _PER_TENSOR | {"weight_scale"} if not block else _PER_TENSOR)


_CT_SIMPLE_FORMATS = {"float-quantized", "int-quantized", "naive-quantized"}


def is_fp8_weight_scheme(w: dict) -> bool:
    """Whether a compressed-tensors ``weights`` scheme stores 8-bit floats (FP8)."""
    return w.get("type") == "float" and w.get("num_bits") == 8


def _ct_scheme_name(fmt: str, w: dict) -> str:
    bits, strategy = w.get("num_bits"), w.get("strategy")
    detail = strategy
    if strategy == "group":
        detail = f"group {w.get('group_size')}"
    elif strategy == "block":
        detail = "block " + "x".join(map(str, w.get("block_structure") or []))
    kind = "FP8" if is_fp8_weight_scheme(w) else f"W{bits}{'' if w.get('type') != 'float' else ' float'}"
    return f"compressed-tensors {fmt} {kind} ({detail})"


def _compressed_tensors_format(cfg: dict) -> QuantFormat:
    global_fmt = cfg.get("format")
    groups = cfg.get("config_groups") or {}
    if cfg.get("sparsity_config"):
        raise _refuse("compressed-tensors with sparsity_config", "sparse layouts are not supported")
    if cfg.get("transform_config"):
        raise _refuse("compressed-tensors with transform_config",
                      "rotations/transforms across heads are not supported")
    kv = cfg.get("kv_cache_scheme")
    if kv and kv.get("strategy", "tensor") != "tensor":
        # vLLM's own loader takes each rank's natural head range of these scales, which is
        # the served order only where no head moves (this check runs only where one does).
        raise _refuse("compressed-tensors kv_cache_scheme", f"{kv.get('strategy')!r} KV-cache scales (per "
                      "head) would load in checkpoint head order, not the permuted one; use per-tensor "
                      "KV-cache scales")
    formats: dict[tuple, QuantFormat] = {}
    for gname, group in groups.items():
        fmt = group.get("format") or global_fmt
        w = group.get("weights") or {}
        name = _ct_scheme_name(fmt, w)
        a = group.get("input_activations") or {}
        if a and not a.get("dynamic", False) and a.get("strategy", "tensor") != "tensor":
            raise _refuse(name, f"static {a.get('strategy')!r} input scales are not supported")
        if group.get("output_activations"):
            raise _refuse(name, "output activation quantization is not supported")
        key = (fmt, tuple(sorted((k, str(v)) for k, v in w.items() if k not in ("observer", "observer_kwargs"))))
        if key not in formats:
            formats[key] = _ct_group_format(fmt, w, name)
    if not formats:
        raise _refuse("compressed-tensors without config_groups", "no weight scheme to permute")
    if len(formats) > 1:
        raise _refuse("compressed-tensors with " + ", ".join(f.name.removeprefix("compressed-tensors ")
                                                             for f in formats.values()),
                      "mixed weight schemes are not supported")
    return next(iter(formats.values()))


def _ct_group_format(fmt: str, w: dict, name: str) -> QuantFormat:
    strategy = w.get("strategy")
    bits = int(w.get("num_bits") or 0)
    if strategy == "tensor":
        scale = TensorLayout()
    elif strategy == "channel":
        scale = TensorLayout(out=Axis(0))
    elif strategy == "group":
        g = int(w.get("group_size"))
        g_idx = str(w.get("actorder") or "").lower() in ("group", "dynamic")
        # Act-order groups are addressed through weight_g_idx, which moves with the input
        # channels; the scales are indexed by group id and stay.
        scale = TensorLayout(out=Axis(0), inp=None if g_idx else Axis(1, g))
    elif strategy == "block":
        bn, bk = (int(x) for x in w.get("block_structure"))
        scale = TensorLayout(out=Axis(0, bn), inp=Axis(1, bk))
    else:
        raise _refuse(name, f"weight strategy {strategy!r} is not supported")
    if fmt in _CT_SIMPLE_FORMATS:
        tensors = {"weight": _DENSE, "weight_scale": scale, "weight_zero_point": scale, "bias": _BIAS}
    elif fmt == "pack-quantized":
        if bits not in (2, 4, 8) or w.get("type", "int") != "int":
            raise _refuse(name, f"{bits}-bit packing is not supported")
        pf = 32 // bits
        zp = TensorLayout(out=Axis(0, pf, packed=True), inp=scale.inp)  # [N/pf, K/G], packed along N
        tensors = {"weight_packed": TensorLayout(out=Axis(0), inp=Axis(1, pf, packed=True)),
                   "weight_scale": scale, "weight_zero_point": zp, "weight_shape": TensorLayout(),
                   "weight_g_idx": TensorLayout(inp=Axis(0) if scale.inp is None and strategy == "group" else None),
                   "weight": _DENSE, "bias": _BIAS}
    else:
        raise _refuse(name, f"compressed-tensors format {fmt!r} is not supported")
    return QuantFormat(name, tensors, _PER_TENSOR)


# ---------------------------------------------------------------------------------------
# Index arithmetic shared by the check and the loader


def _head_channels(order: Sequence[int], block: int) -> torch.Tensor:
    """Channel permutation moving whole head blocks of ``block`` channels into ``order``."""
    o = torch.as_tensor(list(order), dtype=torch.long)
    return (o[:, None] * block + torch.arange(block)).reshape(-1)


def entry_index(perm: torch.Tensor, axis: Axis) -> torch.Tensor | None:
    """Indices along ``axis.dim`` that apply the channel permutation ``perm`` exactly.

    Returns None when nothing moves (one index for the whole axis). Raises
    :class:`QuantPermutationError` (the caller adds the format) when an index covers
    channels that the permutation sends to different places.
    """
    c, u = perm.numel(), axis.unit
    if u is None or u >= c and not axis.packed:
        return None
    if u == 1:
        return perm
    n = -(-c // u)
    src = perm // u
    if axis.packed:
        if c % u:
            raise QuantPermutationError(f"packs of {u} channels (of {c}, not a whole number of packs)")
        # A packed word keeps its channels in order: position within the word must match.
        if not torch.equal(perm % u, torch.arange(c) % u):
            raise QuantPermutationError(f"packs of {u} channels")
    pad = n * u - c
    if pad:
        src = torch.cat([src, src[-1:].expand(pad)])
    src = src.view(n, u)
    if not torch.equal(src, src[:, :1].expand(n, u)):
        raise QuantPermutationError(f"{'packs' if axis.packed else 'groups'} of {u} channels")
    return src[:, 0].contiguous()


@dataclass(frozen=True)
class _Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _proj_axis(proj: str, layout: TensorLayout) -> Axis | None:
    return layout.inp if proj == "o_proj" else layout.out


def _proj_perm(proj: str, order: Sequence[int], s: _Shape) -> tuple[torch.Tensor, int]:
    """(channel permutation, channels per moved block) of ``proj``'s head axis."""
    if proj in ("k_proj", "v_proj"):
        return _head_channels(order, s.head_dim), s.head_dim
    return _head_channels(order, s.group * s.head_dim), s.group * s.head_dim


_DIM_NAMES = {"k_proj": "output", "v_proj": "output", "q_proj": "output", "o_proj": "input"}


def _straddle_message(fmt: QuantFormat, proj: str, param: str, block: int, s: _Shape, why: str) -> str:
    heads = (f"KV heads of head_dim {s.head_dim}" if proj in ("k_proj", "v_proj") else
             f"blocks of {block} channels ({s.group} query heads x head_dim {s.head_dim} per KV head)")
    return (f"ConSA kv_head allocation with {fmt.name}: {proj}.{param} {why} along the {_DIM_NAMES[proj]} "
            f"dim straddle the moved {heads}, so the load-time head permutation cannot move whole "
            "entries; use a checkpoint whose group/block size divides the head block, or a layer allocation")


def check_quantized_permutation(quantization_config: Any, orders: Mapping[int, Sequence[int]], *,
                                num_heads: int, num_kv_heads: int, head_dim: int,
                                method: str | None = None) -> None:
    """Refuse, before any weight loads, a checkpoint format the head permutation cannot follow.

    ``quantization_config`` is ``config.json["quantization_config"]`` (a mapping, an object
    with ``to_dict``, a :class:`QuantFormat`, or None); ``method`` is vLLM's
    ``--quantization``; ``orders[l]`` is layer l's served KV-head order (layers whose order
    is the identity may be left out: nothing moves there, so any format works). Runs the
    loader's own index arithmetic on every layer that moves; raises
    :class:`QuantPermutationError` with one line naming the format and the reason.
    """
    moving = {layer: tuple(o) for layer, o in orders.items() if tuple(o) != tuple(range(len(o)))}
    if not moving:
        return
    fmt = quantization_config if isinstance(quantization_config, QuantFormat) else \
        quant_format(quantization_config, method)
    s = _Shape(num_heads, num_kv_heads, head_dim)
    seen: set[tuple] = set()
    for order in moving.values():
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            perm, block = _proj_perm(proj, order, s)
            for param, layout in fmt.tensors.items():
                axis = _proj_axis(proj, layout)
                key = (order, proj, axis)
                if axis is None or key in seen:
                    continue
                seen.add(key)
                try:
                    entry_index(perm, axis)
                except QuantPermutationError as e:
                    raise QuantPermutationError(_straddle_message(fmt, proj, param, block, s, str(e))) from None


# ---------------------------------------------------------------------------------------
# The loader side

_ATTN_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)\.(\w+)$")
# Mistral's consolidated format (``--load-format mistral``), renamed by vLLM's
# MistralForCausalLM.maybe_remap_mistral after this permutation. Its rotary reordering of
# wq/wk rows stays inside each head, so moving whole heads first gives the same tensors.
_MISTRAL_ATTN_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.attention\.(wq|wk|wv|wo)\.(\w+)$")
_MISTRAL_PROJ = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MISTRAL_PARAM = {"qscale_weight": "weight_scale", "qscale_act": "input_scale"}
# Any other tensor of a layer's attention module; of those, only tensors shared by all
# heads (per-head q/k norms, rotary tables) or single values can load unchanged.
_ATTN_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|attention)\.(.+)$")
_HEAD_SHARED = re.compile(r"(?:q_norm|k_norm|rotary_emb)\.")


def permute_checkpoint_heads(weights: Iterable[tuple[str, torch.Tensor]], orders: dict[int, tuple[int, ...]],
                             num_heads: int, num_kv_heads: int, head_dim: int, *,
                             quant: QuantFormat | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield checkpoint tensors with each layer's KV heads in served order.

    ``orders[l][j]`` is the checkpoint KV head served at position j of layer l (layers not
    in ``orders`` pass unchanged). KV head k's query heads are ``k*G .. k*G+G-1`` (HF's
    ``repeat_kv`` grouping), so the output features of q_proj (query heads), k_proj and
    v_proj (KV heads) and the input features of o_proj move together and the layer
    computes the same function. Per-head q/k norms share one weight across heads and need
    no change. Done on the full checkpoint tensors, before vLLM's loaders take each rank's
    slice or any quantization method repacks them. Hugging Face names
    (``layers.N.self_attn.q_proj.weight``) and Mistral's consolidated names
    (``layers.N.attention.wq.weight``) are both recognised; any other tensor of a permuted
    layer's attention that is neither shared by all heads (q/k norms) nor a single value
    raises, rather than load in checkpoint head order.

    ``quant`` describes the checkpoint's tensors (:func:`quant_format`; None: unquantized
    or online-quantized weights). Every tensor of a projection moves by whole entries
    (packed words, groups, blocks); a tensor the format does not describe, or one whose
    entries straddle the moved heads, raises (:func:`check_quantized_permutation` refuses
    those before loading starts).
    """
    fmt = quant or PLAIN
    s = _Shape(num_heads, num_kv_heads, head_dim)
    cache: dict[tuple[int, str, Axis], torch.Tensor | None] = {}

    def index(layer: int, proj: str, param: str, axis: Axis) -> torch.Tensor | None:
        key = (layer, proj, axis)
        if key not in cache:
            perm, block = _proj_perm(proj, orders[layer], s)
            try:
                cache[key] = entry_index(perm, axis)
            except QuantPermutationError as e:
                raise QuantPermutationError(_straddle_message(fmt, proj, param, block, s, str(e))) from None
        return cache[key]

    for name, tensor in weights:
        m = _ATTN_TENSOR.search(name) or _MISTRAL_ATTN_TENSOR.search(name)
        if m is None:
            other = _ATTN_MODULE.search(name)
            if (other is not None and int(other.group(1)) in orders and tensor.numel() != 1
                    and not _HEAD_SHARED.match(other.group(2))):
                raise ValueError(
                    f"checkpoint tensor {name!r} (shape {tuple(tensor.shape)}) belongs to the attention of layer "
                    f"{other.group(1)}, whose KV heads the kv_head allocation reorders at load time, but the head "
                    "permutation does not know it (it moves q_proj, k_proj, v_proj and o_proj tensors, or "
                    "Mistral's wq, wk, wv and wo), so it would load in the wrong head order")
            yield name, tensor
            continue
        if int(m.group(1)) not in orders:
            yield name, tensor
            continue
        layer = int(m.group(1))
        proj = _MISTRAL_PROJ.get(m.group(2), m.group(2))
        param = _MISTRAL_PARAM.get(m.group(3), m.group(3)) if m.re is _MISTRAL_ATTN_TENSOR else m.group(3)
        if proj == "qkv_proj":
            raise ValueError(
                f"checkpoint tensor {name!r}: fused qkv_proj weights are not supported with kv_head "
                "allocations (the plugin permutes KV heads at load time and needs separate q_proj, "
                "k_proj and v_proj tensors, as Hugging Face checkpoints store them)")
        layout = fmt.layout(param)
        if layout is None:
            if param in fmt.scalars and tensor.numel() == 1:
                yield name, tensor
                continue
            raise QuantPermutationError(
                f"ConSA kv_head allocation with {fmt.name}: checkpoint tensor {name!r} (shape "
                f"{tuple(tensor.shape)}) is not part of this format's known layout, so its heads cannot be permuted")
        axis = _proj_axis(proj, layout)
        if axis is None or tensor.numel() == 1:
            yield name, tensor
            continue
        channels = (num_heads if proj in ("q_proj", "o_proj") else num_kv_heads) * head_dim
        unit = axis.unit if axis.unit is not None else channels
        want = channels // unit if axis.packed else math.ceil(channels / unit)
        if tensor.dim() <= axis.dim or tensor.shape[axis.dim] != want:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; expected {want} along "
                             f"dim {axis.dim} ({proj} of {num_heads} query / {num_kv_heads} KV heads of size "
                             f"{head_dim}, {fmt.name})")
        idx = index(layer, proj, param, axis)
        yield name, tensor if idx is None else tensor.index_select(axis.dim, idx.to(tensor.device))
