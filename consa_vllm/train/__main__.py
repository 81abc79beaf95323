"""``python -m consa_vllm.train``: see ``--help``."""

from __future__ import annotations

import sys

from consa_vllm.allocation import AllocationError

from .config import ConfigError, DataError, TrainingDiverged, parse_args, validate


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        validate(cfg)  # cheap checks first: no torch import for a bad flag
        if cfg.method == "duo":
            from .duo import train_duo as train
        else:
            from .loop import train
        train(cfg)
    except (ConfigError, DataError, AllocationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
