"""Reading and checking the allocation of a served ConSA checkpoint.

:class:`ConsaModelConfig` is registered with vLLM's per-architecture config hooks, so
that a malformed or mismatched allocation, or a vLLM feature that the plugin cannot serve
with it, stops ``vllm serve`` while it builds its configuration, before any engine process
starts or any weight is read.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cache
from typing import Any

from consa_vllm.allocation import Allocation, AllocationError
from consa_vllm.export import read_exported_allocation
from consa_vllm.plugin.layout import allocation_sink, moved_head_orders, uses_pools


@cache
def _logger():
    # vLLM's plugin loader imports this module: vLLM's logger is imported on first use. Under
    # "vllm" so that vLLM's log handler shows the lines (INFO included), as in the other modules.
    from vllm.logger import init_logger

    return init_logger(f"vllm.{__name__}")


def read_allocation(hf_config: Any, model_path: str | os.PathLike | None = None) -> Allocation:
    """The validated allocation stored under ``config.json["consa"]``, checked against the model."""
    source = os.path.join(str(model_path), "config.json") if model_path else "config.json"
    return read_exported_allocation(hf_config, source=source)


def check_serving_config(vllm_config: Any) -> Allocation:
    """Checks that need the whole engine configuration (context length, parallelism)."""
    model_config = vllm_config.model_config
    allocation = read_allocation(model_config.hf_config, model_config.model)
    if allocation.window >= model_config.max_model_len and any("S" in r for r in allocation.pattern):
        _logger().warning(
            "ConSA: window %d >= max_model_len %d, so the sliding-window (S) heads see the whole "
            "context and act as full attention; S KV memory is not reduced.",
            allocation.window, model_config.max_model_len)
    guard_router_padding(vllm_config)
    check_vllm_features(vllm_config, allocation)
    sink = allocation_sink(allocation)
    if sink and any("S" in r for r in allocation.pattern):
        transfer = vllm_config.kv_transfer_config
        if (transfer is not None and transfer.kv_connector) or vllm_config.cache_config.kv_offloading_size:
            # A connector saves and loads blocks by vLLM's sliding-window rules, which drop
            # the sink blocks (consa_vllm.plugin.sink_kv).
            raise AllocationError(
                f"{model_config.model}: attention sinks (sink {sink}) cannot be served with a KV "
                "connector or KV offloading (--kv-transfer-config / --kv-offloading-size)")
    tp = vllm_config.parallel_config.tensor_parallel_size
    if allocation.granularity == "kv_head" and tp > 1:
        from consa_vllm.plugin.layout import balance_summary, kv_shards

        try:
            kv_shards(allocation.num_kv_heads, tp)
        except ValueError:
            raise AllocationError(
                f"{model_config.model}: {allocation.num_kv_heads} KV heads can be neither split across nor "
                f"replicated over --tensor-parallel-size {tp} (one must divide the other)") from None

        # Any allocation whose heads divide by tp, or tp by them (vLLM replicates heads), is
        # served: the loader balances F heads across ranks (pads pools where totals do not
        # divide). Say so where the user looks.
        note = balance_summary(allocation, tp)
        if note:
            _logger().warning("%s", note)
    if allocation.granularity == "kv_head":
        check_quantization(model_config, allocation, tp)
    if vllm_config.lora_config is not None:
        check_lora(model_config, allocation, tp)
    return allocation


def _config_json(model_config: Any) -> str:
    return os.path.join(str(model_config.model), "config.json")


def check_vllm_features(vllm_config: Any, allocation: Allocation) -> None:
    """Refuse vLLM features that would silently change what the ConSA attention computes or
    keeps: each names the flag or ``config.json`` field at fault."""
    model_config = vllm_config.model_config
    hf = model_config.hf_config
    source = _config_json(model_config)
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        # Each rank builds only its own decoder layers, but the plugin lays out the KV heads
        # (and replaces the attention) of all layers at once.
        raise AllocationError(f"{model_config.model}: ConSA models cannot be served with pipeline parallelism "
                              f"(--pipeline-parallel-size {pp}); use --tensor-parallel-size")
    # The window vLLM gives every attention module built without one of its own: the F
    # pool and the F layers would slide too. The exporter writes none (docs/DESIGN.md §7).
    window = vllm_config.cache_config.sliding_window
    if window is not None:
        raise AllocationError(
            f"{source}: field 'sliding_window' is {window}: vLLM would apply this window to every attention "
            "module, the F heads included; ConSA windows live only under 'consa' (re-export with `consa-vllm "
            "export`, which writes 'sliding_window': null)")
    # vLLM's Llama and Mistral modules also slide by 'sliding_window' where layer_types says so
    # (then cache_config.sliding_window is None), whatever the allocation.
    layer_types = getattr(hf, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    own_window = getattr(hf, "sliding_window", None)
    if sliding and own_window is not None:
        raise AllocationError(
            f"{source}: field 'layer_types' marks layers {sliding} as {layer_types[sliding[0]]!r} with "
            f"'sliding_window' {own_window}, which vLLM's Llama and Mistral classes apply to those layers' F heads "
            "too; ConSA windows live only under 'consa' (re-export with `consa-vllm export`, which writes every "
            "layer as 'full_attention')")
    if getattr(hf, "dual_chunk_attention_config", None):
        # vLLM's Qwen modules hand it to their attention module, which ConSA replaces.
        raise AllocationError(
            f"{source}: field 'dual_chunk_attention_config' is set, but ConSA attention does not implement "
            "dual-chunk attention and would drop it silently; remove the field to serve the model with "
            "ordinary attention")
    if uses_pools(allocation):
        skip = vllm_config.cache_config.kv_cache_dtype_skip_layers
        if skip:
            # The pools' names carry layer index 0, and each pool holds the heads of every
            # layer in one cache dtype.
            raise AllocationError(
                f"{model_config.model}: --kv-cache-dtype-skip-layers {','.join(map(str, skip))} cannot be used "
                "with this allocation: its KV heads live in two KV pools (F and S) shared by all layers, which "
                "have one cache dtype each")
    check_hybrid_kv_cache_manager(vllm_config, allocation)


def check_hybrid_kv_cache_manager(vllm_config: Any, allocation: Allocation) -> None:
    """Refuse to serve an F pool and an S pool without vLLM's hybrid KV-cache manager.

    Without it vLLM turns the S pool's sliding-window spec into full attention (S memory
    then grows with the context; start-up may fail outright where the pools' block sizes
    differ). The config hook sees only an explicit ``--disable-hybrid-kv-cache-manager``:
    vLLM settles the flag after the config hooks (a KV connector without hybrid support
    turns the manager off then), so the model build checks again
    (:func:`consa_vllm.plugin.models.install_consa_attention`).
    """
    has_full = any("F" in row for row in allocation.pattern)
    has_sliding = any("S" in row for row in allocation.pattern)
    if not (uses_pools(allocation) and has_full and has_sliding):
        return  # one pool (one KV-cache spec), or stock modules: vLLM's own rules
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise AllocationError(
            f"{vllm_config.model_config.model}: vLLM's hybrid KV-cache manager is off "
            "(--disable-hybrid-kv-cache-manager, or a KV connector without hybrid support: --kv-transfer-config / "
            "--kv-offloading-size), so vLLM would keep the sliding-window (S) heads' KV cache for the whole "
            "context; serve without that flag or connector")


def check_lora(model_config: Any, allocation: Allocation, tp: int) -> None:
    """Refuse LoRA adapters where the loader reorders KV heads (see :mod:`consa_vllm.plugin.permute`).

    The permutation applies to the checkpoint's base weights only; vLLM loads adapters
    separately, so their q/k/v_proj rows and o_proj columns would stay in checkpoint order.
    """
    moved = moved_head_orders(allocation, tp)
    if moved:
        raise AllocationError(
            f"{model_config.model}: LoRA adapters (--enable-lora) cannot be served with this kv_head allocation: "
            f"the loader reorders the KV heads of {len(moved)} of {allocation.num_layers} layers "
            f"(F heads first on each of {tp} tensor-parallel rank(s)), but vLLM loads adapters in the "
            "checkpoint's head order, so their q/k/v_proj and o_proj weights would apply to the wrong heads; "
            "serve without --enable-lora, or with a layer allocation, or with a kv_head allocation that needs no "
            "reordering (in every layer, each rank's F heads first and F counts balanced across ranks)")


#: Inductor's padding of a matmul's dimensions (``torch._inductor.fx_passes.pad_mm``) aligns
#: them to this many elements per dtype; only these dtypes are padded.
PAD_ALIGNMENT = {"torch.float16": 8, "torch.bfloat16": 8, "torch.float32": 4}


def router_padding_alignment(experts: int | None, dtype: Any) -> int:
    """Inductor's matmul alignment for ``dtype`` (a torch dtype or its name, ``"bfloat16"`` or
    ``"torch.bfloat16"``) when an MoE model with ``experts`` experts (None or 0: not MoE) needs
    the router-padding guard, else 0: the one rule for the plugin and for the stock engines the
    tests compare it with (:func:`guard_router_padding`)."""
    name = str(dtype)
    align = PAD_ALIGNMENT.get(name if name.startswith("torch.") else f"torch.{name}", 0)
    return align if experts and align and experts % align else 0


def guard_router_padding(vllm_config: Any) -> None:
    """Turn off Inductor's matmul shape padding for an MoE model whose expert count is not a
    multiple of Inductor's alignment for the model's dtype, and log that it did.

    Why (docs/DESIGN.md §10, "The Mixtral defect"): when a model computes its router logits
    inside the compiled graph (vLLM 0.26's Mixtral does), Inductor may pad the router matmul's
    expert dimension (4 -> 8 in bf16) and hand the MoE op a view whose rows are 8 apart. vLLM
    0.26's top-k routing kernel assumes rows ``num_experts`` apart, so it routes tokens with
    other tokens' logits. Inductor pads only when timing says the padded matmul is faster, so
    the fault comes and goes with each engine start. Without shape padding the logits stay
    dense. On CPU Inductor never pads matmuls, so the setting costs nothing there. An explicit
    ``shape_padding`` in ``--compilation-config`` is left as the user set it (with a warning
    when it is on).
    """
    from consa_vllm import families

    model_config = vllm_config.model_config
    try:
        family = families.by_architecture(model_config.architecture)
    except families.UnsupportedFamilyError:  # refused elsewhere, with its own message
        return
    experts = getattr(model_config.hf_config, family.experts_field, None) if family.is_moe else None
    align = router_padding_alignment(experts, model_config.dtype)
    if not align:
        return
    why = (f"{experts} experts is not a multiple of {align}, Inductor's {model_config.dtype} alignment, so "
           "Inductor may pad the router logits, which vLLM's top-k routing kernel then misreads "
           "(docs/DESIGN.md §10)")
    inductor = vllm_config.compilation_config.inductor_compile_config
    if "shape_padding" not in inductor:
        inductor["shape_padding"] = False
        _logger().info("ConSA: Inductor's matmul shape padding is off for this model: %s", why)
    elif inductor["shape_padding"]:
        _logger().warning("ConSA: shape_padding is on in --compilation-config: tokens may be routed to "
                       "the wrong experts: %s", why)


def check_quantization(model_config: Any, allocation: Allocation, tp: int) -> None:
    """Refuse a quantized checkpoint whose tensors cannot follow the load-time head permutation.

    Runs while vLLM builds its config, so a refusal is one line before any weight loads.
    Layer allocations never permute heads (stock vLLM attention) and need no check.
    """
    from consa_vllm import families
    from consa_vllm.plugin.permute import check_quantized_permutation

    hf = model_config.hf_config
    head_dim = families.by_architecture(model_config.architecture).head_dim(hf)
    check_quantized_permutation(getattr(hf, "quantization_config", None), moved_head_orders(allocation, tp),
                                num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                                head_dim=head_dim, method=getattr(model_config, "quantization", None))


class StockFamilyConfig:
    """Hook on the plain architectures of the supported families: a ``config.json`` that
    carries an allocation under a plain architecture would be served without it."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        if getattr(model_config.hf_config, "consa", None) is None:
            return
        from consa_vllm import families

        arch = model_config.architecture
        source = os.path.join(str(model_config.model), "config.json")
        raise AllocationError(
            f"{source}: field 'architectures' is {arch!r} but the file carries a ConSA allocation (field "
            f"'consa'): vLLM would serve the model without it; the architecture must be "
            f"{families.by_architecture(arch).consa_architecture!r} (re-export with `consa-vllm export`)")

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        pass


class ConsaModelConfig:
    """vLLM ``VerifyAndUpdateConfig`` hook for the Consa* architectures.

    vLLM reports an error raised here at the end of a long traceback (pydantic wraps it while
    it builds ``ModelConfig``), so the message is also logged as one ERROR line first: the
    first line of the failure says what is wrong.
    """

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        with _logged():
            read_allocation(model_config.hf_config, model_config.model)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        with _logged():
            check_serving_config(vllm_config)


@contextmanager
def _logged():
    try:
        yield
    except AllocationError as e:
        _logger().error("ConSA: the server cannot start: %s", " ".join(str(e).split()))
        raise
