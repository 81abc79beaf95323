"""Patch a Hugging Face causal LM so that its attention follows a ConSA allocation or gates.

How: transformers 5.x looks attention up by ``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS``. We register one global function, ``"consa"``, and point the model's
config at it. The function finds the model's :class:`HybridAttentionState` on the attention module
(``module.consa_state``, set by :func:`patch_model`) and runs :func:`hybrid_attention` for
``module.layer_idx``. The same name is registered as a *mask* implementation with HF's ``sdpa_mask``,
so the model keeps building its own causal/padding masks exactly as under ``"sdpa"``; S heads AND
them with a window band.

Native sliding layers (Qwen2/Qwen3 ``layer_types``, Mistral ``sliding_window``): while patched, the
allocation is the only authority. ``layer_types`` is set to all ``"full_attention"`` (or, for
Mistral, ``sliding_window`` to ``None``) on the config, so that the model passes full masks and its
``DynamicCache`` keeps every key (F heads need them); S heads get their window from the allocation.
:meth:`HybridAttentionState.disable` and :func:`unpatch_model` restore the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .kernels import SWA_BACKENDS, hybrid_attention

if TYPE_CHECKING:  # imported lazily at run time: the kernels and benchmark need torch only (bare GPU images)
    from consa_vllm.allocation import Allocation

ATTN_NAME = "consa"


class HybridAttentionState:
    """The switchboard of one patched model: window and sink, allocation or gates, on/off.

    S heads attend to the first ``sink`` tokens and the last ``window`` (``sink=0``: a plain window)
    in both modes.

    Modes, in priority order:
    - disabled: stock model behaviour (its original attention implementation and config);
    - gates ``z`` set: per KV head ``z*FA + (1-z)*SWA`` (training), differentiable w.r.t. ``z``;
    - otherwise binary: F heads of the allocation full causal, S heads sliding window
      (all-F when no allocation is set).
    """

    def __init__(self, model: nn.Module, window: int, allocation: Allocation | None = None,
                 swa_backend: str = "auto", chunk: int = 1024, sink: int | None = None):
        cfg = model.config
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        # Default: the allocation's sink (an allocation file carries it), else none.
        if sink is None:
            sink = allocation.sink if allocation is not None else 0
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sink must be a whole number of tokens >= 0, got {sink!r}")
        if swa_backend not in SWA_BACKENDS:
            raise ValueError(f"swa_backend must be one of {SWA_BACKENDS}, got {swa_backend!r}")
        self.window = int(window)
        self.sink = sink
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.num_q_per_kv = int(cfg.num_attention_heads) // self.num_kv_heads
        self.swa_backend = swa_backend
        self.chunk = int(chunk)
        self.enabled = False
        self.allocation: Allocation | None = None
        self.gates: torch.Tensor | None = None
        self._full_heads: list[list[int]] = [list(range(self.num_kv_heads))] * self.num_layers
        self._config = cfg
        self._saved: dict[str, Any] = {}
        if allocation is not None:
            self.set_allocation(allocation)

    # ------------------------------------------------------------- modes
    def set_allocation(self, allocation: Allocation | None) -> None:
        """Binary mode: F heads full causal, S heads sliding window. ``None`` means all-F."""
        if allocation is None:
            self.allocation = None
            self._full_heads = [list(range(self.num_kv_heads))] * self.num_layers
            return
        from consa_vllm.allocation import Allocation, AllocationError

        if not isinstance(allocation, Allocation):
            raise TypeError(f"expected consa_vllm.allocation.Allocation, got {type(allocation).__name__}")
        allocation.check_model(self.num_layers, self.num_kv_heads)
        if allocation.window != self.window:
            raise AllocationError(
                f"allocation window {allocation.window} differs from the patched window {self.window}; "
                "patch the model with the allocation's window"
            )
        if allocation.sink != self.sink:
            raise AllocationError(
                f"allocation sink {allocation.sink} differs from the patched sink {self.sink}; "
                "patch the model with the allocation's sink"
            )
        self.allocation = allocation
        self._full_heads = [allocation.full_heads(layer) for layer in range(self.num_layers)]

    def set_gates(self, z: torch.Tensor | None) -> None:
        """Soft mode: ``z`` is float ``[num_layers, num_kv_heads]`` (or ``[num_layers]``, one gate per layer).

        ``None`` returns to the allocation (or all-F). ``z`` is used as given at every forward, so
        the caller sets a fresh sample before each step; the graph to ``z`` is kept.
        """
        if z is None:
            self.gates = None
            return
        if not torch.is_tensor(z) or not z.is_floating_point():
            raise TypeError("gates must be a floating-point torch.Tensor")
        if z.dim() == 1 and z.shape[0] == self.num_layers:
            z = z[:, None].expand(self.num_layers, self.num_kv_heads)
        if tuple(z.shape) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"gates must have shape [num_layers, num_kv_heads] = [{self.num_layers}, {self.num_kv_heads}] "
                f"(or [{self.num_layers}] for layer units), got {list(z.shape)}"
            )
        self.gates = z

    def enable(self) -> None:
        """Route the model's attention through ConSA (idempotent)."""
        if self.enabled:
            return
        cfg = self._config
        self._saved = {"_attn_implementation": cfg._attn_implementation}
        for name in ("layer_types", "sliding_window", "use_sliding_window"):
            if hasattr(cfg, name):
                self._saved[name] = getattr(cfg, name)
        if getattr(cfg, "layer_types", None) is not None:
            # Qwen2/Qwen3: keep sliding_window (the model may still build its unused sliding mask).
            cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
        elif getattr(cfg, "sliding_window", None) is not None:
            # Mistral: one global window, no layer_types.
            cfg.sliding_window = None
        cfg._attn_implementation = ATTN_NAME
        self.enabled = True

    def disable(self) -> None:
        """Stock model behaviour: restore the original attention implementation and config (idempotent)."""
        if not self.enabled:
            return
        cfg = self._config
        for name, value in self._saved.items():
            setattr(cfg, name, value)
        self._saved = {}
        self.enabled = False

    # ------------------------------------------------------------- forward
    def full_kv_heads(self, layer: int) -> list[int]:
        """F KV heads of ``layer`` in binary mode."""
        return self._full_heads[layer]

    def attention(self, module: nn.Module, query, key, value, attention_mask, scaling, dropout=0.0):
        """Hybrid attention for ``module.layer_idx``; returns ``[B, Hq, Tq, D]``."""
        layer = module.layer_idx
        if self.gates is not None:
            return hybrid_attention(query, key, value, attention_mask, scaling, self.window,
                                    gates=self.gates[layer], dropout=dropout,
                                    swa_backend=self.swa_backend, chunk=self.chunk, sink=self.sink)
        return hybrid_attention(query, key, value, attention_mask, scaling, self.window,
                                full_kv_heads=self._full_heads[layer], dropout=dropout,
                                swa_backend=self.swa_backend, chunk=self.chunk, sink=self.sink)

    def __repr__(self) -> str:
        mode = "gates" if self.gates is not None else ("allocation" if self.allocation is not None else "all-F")
        return (f"HybridAttentionState(window={self.window}, sink={self.sink}, layers={self.num_layers}, "
                f"kv_heads={self.num_kv_heads}, q_per_kv={self.num_q_per_kv}, mode={mode}, enabled={self.enabled})")


def consa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The function registered as HF attention implementation ``"consa"``.

    Ignores the ``sliding_window`` kwarg on purpose: the allocation decides (see module docstring).
    """
    state: HybridAttentionState | None = getattr(module, "consa_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} has no consa_state: use consa_vllm.reference.patch_model")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = state.attention(module, query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> None:
    """Register ``"consa"`` with HF's attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, consa_attention_forward)
    # Same masks as "sdpa": None when causal without padding (is_causal), else boolean 4D.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    _registered = True


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules (its family's HF attention class), by layer."""
    from consa_vllm import families

    cls = families.import_object(families.by_model_type(model.config.model_type).hf_attention)
    return sorted((m for m in model.modules() if isinstance(m, cls)), key=lambda m: m.layer_idx)


def patch_model(model: nn.Module, window: int, allocation: Allocation | None = None, *,
                swa_backend: str = "auto", chunk: int = 1024, sink: int | None = None) -> HybridAttentionState:
    """Patch an HF causal LM of a supported family (:mod:`consa_vllm.families`) in place; return its state.

    The state is also stored as ``model.consa_state`` and starts enabled, in binary mode with
    ``allocation`` (all-F when ``None``). ``sink``: attention-sink tokens of the S heads (default:
    the allocation's, 0 without one). Patching an already patched model replaces its state.
    """
    from consa_vllm import families

    try:
        families.by_model_type(getattr(model.config, "model_type", None))
    except families.UnsupportedFamilyError as e:
        raise ValueError(f"patch_model: {e}") from None
    if getattr(model, "consa_state", None) is not None:
        unpatch_model(model)
    register_attention()
    state = HybridAttentionState(model, window, allocation, swa_backend=swa_backend, chunk=chunk, sink=sink)
    mods = _attention_modules(model)
    if len(mods) != state.num_layers:
        raise ValueError(f"found {len(mods)} attention modules with a layer_idx, expected {state.num_layers}")
    for m in mods:
        # A plain attribute (not a submodule): the state is no nn.Module, so it stays out of state_dict.
        m.consa_state = state
    model.consa_state = state
    state.enable()
    return state


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model`: stock attention and config, no ``consa_state`` left behind."""
    state = getattr(model, "consa_state", None)
    if state is None:
        return
    state.disable()
    for m in _attention_modules(model):
        if hasattr(m, "consa_state"):
            del m.consa_state
    del model.consa_state
