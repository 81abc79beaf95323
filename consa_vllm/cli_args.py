"""Argument parsing shared by the ``consa-vllm`` commands: one-line usage errors and checked value types.

Every command reports a bad flag the same way: one line naming the command and the flag,
exit status 2, before any heavy import or work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

EXIT_USAGE = 2


class UsageParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the command and the flag."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_in_range(lo: int, what: str, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of ``what`` in ``[lo, hi]`` (``hi`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ({what}), got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def whole_number(what: str) -> Callable[[str], int]:
    """An argparse type: any whole number of ``what`` (range checks are the caller's), e.g. not '64.5'."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ({what}), got {text!r}") from None

    parse.__name__ = what
    return parse


def unit_interval(meaning: str) -> Callable[[str], float]:
    """An argparse type: a number in [0, 1]; ``meaning`` says what it is in the error message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"must be in [0, 1] ({meaning}), got {value:g}")
        return value

    parse.__name__ = "number in [0, 1]"
    return parse


def path_arg(text: str) -> str:
    """An argparse type: a file or folder path. An empty string (a shell variable left unset)
    is refused: Python reads it as the current folder, which no flag means."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


path_arg.__name__ = "path"


def device_problem(device: str) -> str | None:
    """Why ``--device`` cannot run on this machine (one line naming the flag), or None.

    ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist here. torch is
    imported only for a CUDA device, so a CPU run's checks stay light.
    """
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
        return f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine"
    count = torch.cuda.device_count()
    if device != "cuda" and int(device[5:]) >= count:
        return f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None
