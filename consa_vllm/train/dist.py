"""Running the trainer on several processes: one process, DDP, or FSDP2, behind one object.

:class:`Parallel` is the only place where the three modes differ. The training loop calls its
methods whatever the mode: where to load the model, sharding, the module to call for a stage,
gradient sync across micro-batches, and the state dicts of checkpoints.

Under ``--fsdp`` every decoder layer, then the rest of the causal LM (embeddings, final norm,
head), is sharded with FSDP2's ``fully_shard``. The gates (``log_alpha``) and the Lagrange
multipliers are tiny and live outside the sharded model, replicated on every rank; their
gradients are averaged here. Checkpoints and ``--save-model`` use full (unsharded) state dicts
from ``torch.distributed.checkpoint.state_dict``, so the files are the same safetensors/JSON
as without FSDP and hold no shard layout. A run (FSDP or not; FSDP checkpoints only under FSDP)
can therefore be resumed on another number of processes where ``--grad-accum`` x processes
stays the same: a step then covers the same global micro-batches, data and gate noise
(:func:`consa_vllm.train.config.check_resume_settings` refuses any other change).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from consa_vllm.cli_args import device_problem

from .config import ConfigError


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run, and every step that differs between the modes.

    ``world == 1``: one process. ``world > 1`` without ``fsdp``: DDP (each rank holds the
    whole model). ``fsdp``: FSDP2 (each rank holds a shard; needs ``world > 1``).
    """

    rank: int
    world: int
    device: torch.device
    fsdp: bool

    @classmethod
    def from_env(cls, device: str, fsdp: bool) -> "Parallel":
        """Read torchrun's environment, pick the device and join the process group (NCCL on CUDA, gloo on CPU).

        ``device`` is ``--device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        problem = device_problem(device)  # validate() checked it; a direct caller gets the same message
        if problem:
            raise ConfigError(problem)
        want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if want_cuda:
            dev = torch.device(f"cuda:{local}" if world > 1 or device in ("auto", "cuda") else device)
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        if fsdp and world == 1:
            raise ConfigError("--fsdp shards the model over several processes: run under torchrun --nproc-per-node N")
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
        return cls(rank, world, dev, fsdp)

    @property
    def load_device(self) -> torch.device:
        """Where the model is loaded: the CPU under FSDP (only each rank's shard goes to ``device``)."""
        return torch.device("cpu") if self.fsdp else self.device

    def shard(self, model: nn.Module) -> None:
        """FSDP: shard ``model`` in place (:func:`shard_model`); nothing otherwise."""
        if self.fsdp:
            shard_model(model, self.device, self.world)

    def wrap(self, net: nn.Module) -> nn.Module:
        """The module a stage calls: DDP around ``net`` under DDP, ``net`` itself otherwise.

        Called once per stage: DDP registers the parameters that require gradients when it
        is built, and the stages train different ones.
        """
        if self.world == 1 or self.fsdp:
            return net
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def micro_batch(self, net: nn.Module, wrapped: nn.Module, sync: bool) -> AbstractContextManager:
        """Context of one micro-batch's forward and backward; gradients are reduced across
        ranks only when ``sync`` (the last micro-batch of a step)."""
        if self.fsdp:  # FSDP2: accumulate unsharded grads, reduce-scatter once
            net.model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync else wrapped.no_sync()

    def reduce_replicated_grads(self, net: nn.Module) -> None:
        """FSDP: average the gradients of the replicated gates and multipliers (DDP does it itself)."""
        if self.fsdp:
            sync_replicated_grads(net)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights for a checkpoint: FSDP gathers them (collective; ``{}`` off rank 0)."""
        return full_model_state(model) if self.fsdp else model.state_dict()

    def load_model_state(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`model_state`."""
        if self.fsdp:
            load_full_model_state(model, sd)
        else:
            model.load_state_dict(sd)

    def optimizer_state(self, net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """``opt``'s state for a checkpoint: FSDP gathers it, keyed by parameter name (collective)."""
        return full_optimizer_state(net, opt) if self.fsdp else opt.state_dict()

    def load_optimizer_state(self, net: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Load a state saved by :meth:`optimizer_state`."""
        if self.fsdp:
            load_full_optimizer_state(net, opt, sd)
        else:
            opt.load_state_dict(sd)

    def wait_for_all(self) -> None:
        """Barrier across ranks (nothing with one process).

        The end of a run: a rank that leaves while rank 0 still writes the model and the plots
        tears its process group down under a peer still in it; with gloo that process then
        aborts at exit (seen once in this project's CPU tests), and torchrun kills rank 0 before
        it has written the allocation."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def weights_to_save(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """``--save-model``: FSDP gathers the full weights (collective); otherwise None, and the
        model writes its own."""
        return full_model_state(model) if self.fsdp else None


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
