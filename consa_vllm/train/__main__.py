"""``python -m consa_vllm.train`` (also ``consa-vllm train``): see ``--help``."""

from __future__ import annotations

import sys

from consa_vllm.allocation import AllocationError
from consa_vllm.outputs import signal_of, signals_raise

from .config import PROG, ConfigError, DataError, TrainingDiverged, parse_args, validate


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the trainer; errors print one line ``PROG: error: ...`` (status 2, or 1 for a diverged run)."""
    cfg = parse_args(argv, prog)
    try:
        validate(cfg)  # cheap checks first: no torch import for a bad flag
        # SIGTERM/SIGHUP (kill, docker stop, torchrun stopping its workers) end the run like
        # Ctrl-C: temporary folders are removed and the checkpoints stay resumable.
        with signals_raise():
            if cfg.method == "duo":
                from .duo import train_duo as train
            else:
                from .loop import train
            train(cfg)
    except (ConfigError, DataError, AllocationError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        name, status = signal_of(e)
        print(f"{prog}: interrupted by {name}; --resume continues from the last checkpoint", file=sys.stderr)
        return status
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    """``consa-vllm train ...``: the same command under the ``consa-vllm`` name."""
    return main(argv, prog="consa-vllm train")


if __name__ == "__main__":
    sys.exit(main())
