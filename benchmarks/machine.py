"""What a benchmark's figures belong to, recorded one way in every results JSON: the machine
(the GPU's name, or ``cpu (MODEL, N cores)``), the commit, and a local checkpoint's weights.

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


def git_commit() -> str:
    """This repository's HEAD, with ``+uncommitted consa_vllm`` when the package's sources differ
    from it (prompts cut from them, ``engine_harness.text_prompts``, then differ too)."""
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "consa_vllm"]).returncode != 0
    return head + (" +uncommitted consa_vllm" if dirty else "")


def weights_sha256(model_dir) -> dict[str, str]:
    """sha256 of each safetensors file of a local checkpoint: the path is local, the figures
    belong to these bytes."""
    import hashlib
    from pathlib import Path

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(model_dir).glob("*.safetensors"))}
