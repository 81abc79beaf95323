"""Load-time permutation of each layer's KV heads in checkpoint tensors.

kv_head allocations are served with each layer's F heads first on every tensor-parallel
rank (:mod:`consa_vllm.plugin.layout`). Any permutation of a layer's KV heads, moved
together with their query groups and the matching ``o_proj`` input columns, leaves the
layer's function unchanged, so the plugin reorders the heads in the checkpoint tensors
as they stream into vLLM's own ``load_weights``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

_ATTN_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)\.(weight|bias)$")


def permute_checkpoint_heads(weights: Iterable[tuple[str, torch.Tensor]], orders: dict[int, tuple[int, ...]],
                             num_heads: int, num_kv_heads: int, head_dim: int
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield checkpoint tensors with each layer's KV heads in served order.

    ``orders[l][j]`` is the checkpoint KV head served at position j of layer l (layers not
    in ``orders`` pass unchanged). KV head k's query heads are ``k*G .. k*G+G-1`` (HF's
    ``repeat_kv`` grouping), so the rows of q_proj (query heads), k_proj and v_proj (KV
    heads), their biases, and the input columns of o_proj move together and the layer
    computes the same function. Per-head q/k norms share one weight across heads and need
    no change. Done on the full tensors, before vLLM's loaders take each rank's slice.
    """
    g = num_heads // num_kv_heads
    rows_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in rows_cache:
            kv = torch.tensor(orders[layer], dtype=torch.long)
            q = (kv[:, None] * g + torch.arange(g)).reshape(-1)
            d = torch.arange(head_dim)
            rows_cache[layer] = ((q[:, None] * head_dim + d).reshape(-1), (kv[:, None] * head_dim + d).reshape(-1))
        return rows_cache[layer]

    for name, tensor in weights:
        m = _ATTN_WEIGHT.search(name)
        if m is None or int(m.group(1)) not in orders:
            yield name, tensor
            continue
        layer, proj, kind = int(m.group(1)), m.group(2), m.group(3)
        if proj == "qkv_proj":
            raise ValueError(
                f"checkpoint tensor {name!r}: fused qkv_proj weights are not supported with kv_head "
                "allocations (the plugin permutes KV heads at load time and needs separate q_proj, "
                "k_proj and v_proj tensors, as Hugging Face checkpoints store them)")
        if proj == "o_proj" and kind == "bias":
            yield name, tensor  # indexed by output features, not heads
            continue
        q_rows, kv_rows = rows(layer)
        idx, dim = (kv_rows, 0) if proj in ("k_proj", "v_proj") else (q_rows, 1 if proj == "o_proj" else 0)
        if tensor.dim() <= dim or tensor.shape[dim] != idx.numel():
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; expected "
                             f"{idx.numel()} along dim {dim} ({proj} of {num_heads} query / {num_kv_heads} KV "
                             f"heads of size {head_dim})")
        yield name, tensor.index_select(dim, idx.to(tensor.device))
