"""FSDP2 helpers: shard the model, keep the replicated gates in step, gather and restore full state.

Under ``--fsdp`` every decoder layer, then the rest of the causal LM (embeddings, final norm,
head), is sharded with FSDP2's ``fully_shard``. The gates (``log_alpha``) and the Lagrange
multipliers are tiny and live outside the sharded model, replicated on every rank; their
gradients are averaged here. Checkpoints and ``--save-model`` use full (unsharded) state dicts
from ``torch.distributed.checkpoint.state_dict``, so the files are the same safetensors/JSON
as without FSDP and a run can be resumed with any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard_model(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: one unit per decoder layer, then the causal LM itself as the root unit.

    ``model`` may still be on the CPU: each rank keeps only its shard and FSDP moves that to
    ``device``, so a model that does not fit one GPU can be trained. Works with gloo on CPU too.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm and (tied) head: gathered once per forward


def sync_replicated_grads(net: nn.Module) -> None:
    """Average the gradients of the parameters FSDP does not own (gates and multipliers).

    FSDP reduce-scatters (and averages) the sharded weights' gradients itself; the replicated
    parameters would otherwise keep each rank's local gradient and drift apart.
    """
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in net.parameters() if p.grad is not None and not isinstance(p, DTensor)]
    if grads:  # one collective for all of them: they are tiny
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.AVG)
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # cpu_offload: rank 0 alone receives the gathered tensors (on the CPU); other ranks get {}.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0 (CPU tensors), ``{}`` elsewhere. Collective: every rank calls it.

    Tied parameters (e.g. the embedding and the LM head) come back as one tensor under both
    names, as in a plain ``state_dict()``, so ``save_pretrained`` drops the tied copy as usual.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(model, options=_full_options())
    if sd:
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name in sd and first[id(p)] in sd:
                sd[name] = sd[first[id(p)]]
            first.setdefault(id(p), name)
    return sd


def full_optimizer_state(root: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt``'s state with unsharded tensors and parameter names as keys (rank 0; ``{}`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(root, opt, options=_full_options())


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into the sharded model; every rank passes the same ``sd``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(root: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a state saved by :func:`full_optimizer_state`; each rank keeps its shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(root, opt, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True))
