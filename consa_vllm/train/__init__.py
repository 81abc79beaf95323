"""ConSA trainer: learn an F/S allocation with hard-concrete gates and an augmented Lagrangian.

Run ``python -m consa_vllm.train --help``. Modules: :mod:`.config` (TrainConfig and the CLI),
:mod:`.gates` (gate math), :mod:`.lagrangian`, :mod:`.data`, :mod:`.checkpoint`,
:mod:`.loop` (the training loop), :mod:`.dist` (one process, DDP or FSDP2, behind one object), :mod:`.plots`,
:mod:`.export`, :mod:`.duo` (``--method duo``: DuoAttention-style gates).
"""

from .config import ConfigError, TrainConfig, build_parser, parse_args, validate

__all__ = ["ConfigError", "TrainConfig", "build_parser", "parse_args", "validate", "train"]


def train(cfg: TrainConfig):
    """Validate ``cfg`` and run the trainer; returns the :class:`~consa_vllm.allocation.Allocation`."""
    validate(cfg)
    if cfg.method == "duo":
        from .duo import train_duo
        return train_duo(cfg)
    from .loop import train as _train
    return _train(cfg)
