"""The machine a benchmark ran on, named one way in every results JSON: the GPU's name, or
``cpu (MODEL, N cores)``.

Scripts in this folder import it as ``machine`` (a script's own folder is on ``sys.path``);
the testbed package as ``benchmarks.machine``.
"""

from __future__ import annotations

import os


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; ``platform.processor()`` is often empty on Linux,
    then the architecture) and its core count, e.g. ``AMD EPYC, 2 cores``."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def machine_name(device: str = "auto") -> str:
    """``device``'s name: a CUDA device's GPU name (``"cuda"``, ``"cuda:1"``, or ``"auto"`` when a
    GPU is there), else ``cpu (`` :func:`cpu_name` ``)``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({cpu_name()})"
