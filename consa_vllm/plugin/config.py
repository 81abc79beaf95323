"""Reading and checking the allocation of a served ConSA checkpoint.

:class:`ConsaModelConfig` is registered with vLLM's per-architecture config hooks, so
that a malformed or mismatched allocation stops ``vllm serve`` while it builds its
configuration, before any engine process starts or any weight is read.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any

from consa_vllm.allocation import Allocation, AllocationError
from consa_vllm.export import read_exported_allocation
from consa_vllm.plugin.layout import allocation_sink

logger = logging.getLogger("consa_vllm")


def read_allocation(hf_config: Any, model_path: str | os.PathLike | None = None) -> Allocation:
    """The validated allocation stored under ``config.json["consa"]``, checked against the model."""
    source = os.path.join(str(model_path), "config.json") if model_path else "config.json"
    return read_exported_allocation(hf_config, source=source)


def check_serving_config(vllm_config: Any) -> Allocation:
    """Checks that need the whole engine configuration (context length, parallelism)."""
    model_config = vllm_config.model_config
    allocation = read_allocation(model_config.hf_config, model_config.model)
    if allocation.window >= model_config.max_model_len and any("S" in r for r in allocation.pattern):
        logger.warning(
            "ConSA: window %d >= max_model_len %d, so the sliding-window (S) heads see the whole "
            "context and act as full attention; S KV memory is not reduced.",
            allocation.window, model_config.max_model_len)
    guard_router_padding(vllm_config)
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
            logger.warning("%s", note)
    if allocation.granularity == "kv_head":
        check_quantization(model_config, allocation, tp)
    return allocation


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
        logger.info("ConSA: Inductor's matmul shape padding is off for this model: %s", why)
    elif inductor["shape_padding"]:
        logger.warning("ConSA: shape_padding is on in --compilation-config: tokens may be routed to "
                       "the wrong experts: %s", why)


def check_quantization(model_config: Any, allocation: Allocation, tp: int) -> None:
    """Refuse a quantized checkpoint whose tensors cannot follow the load-time head permutation.

    Runs while vLLM builds its config, so a refusal is one line before any weight loads.
    Layer allocations never permute heads (stock vLLM attention) and need no check.
    """
    from consa_vllm.plugin.layout import balance_heads
    from consa_vllm.plugin.permute import check_quantized_permutation

    hf = model_config.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    orders = dict(enumerate(balance_heads(allocation.pattern, tp)))
    check_quantized_permutation(getattr(hf, "quantization_config", None), orders,
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
        logger.error("ConSA: the server cannot start: %s", " ".join(str(e).split()))
        raise
