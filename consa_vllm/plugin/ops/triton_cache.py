"""One Triton cache for consa_vllm's kernels, shared by every engine on a machine.

vLLM points ``TRITON_CACHE_DIR`` at a folder of its per-configuration compile cache
(``vllm/compilation/compiler_interface.py``, ``InductorAdaptor.initialize_cache``: one
folder per hash of the model's configuration), so that Inductor's kernels travel with it.
Every Triton kernel compiled in that process lands there too, ours included: an engine
whose configuration is new (another model, allocation, ``--max-model-len``) compiles the
ConSA kernels again, and builds Triton's C launcher of each with the host compiler, although
the binaries depend only on the kernel source, its compile-time constants and the GPU.
Stock vLLM's attention (FlashAttention 3) is compiled ahead of time and pays nothing.
Measured in vLLM's engine logs (session 26, H100,
``benchmarks/results/b1_llama31_duo50_long_h100_s26.json.logs``): the first CUDA-graph
captures on each path of a ConSA engine take seconds where stock's take milliseconds,
capture 9 s against 5 s, the bulk of the start-up gap to stock.

Kernels made with :func:`jit` compile into :func:`shared_cache_dir` instead: the compile and
the launcher build run with Triton's cache folder switched to it and back. Only a miss of
Triton's in-memory cache reaches that code, so a launch of an already loaded kernel costs
exactly what it did. Triton keys its cache by source, constants, options and target, so
sharing the folder between engines is what Triton does outside vLLM. Inductor's kernels
stay in vLLM's folder.

``CONSA_TRITON_CACHE_DIR`` sets the folder (default: ``consa_triton_cache`` under vLLM's
cache root, ``vllm.envs.VLLM_CACHE_ROOT``, ``~/.cache/vllm`` unless set, so a volume that
keeps vLLM's cache keeps this one); set to an empty value, the kernels compile wherever
Triton's own setting says (vLLM's folder), as before; without vLLM installed too.

vLLM is imported only at a compile, to read its cache root: the kernels' module, which
tests and benchmarks import alone, imports this one.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import triton
from triton.runtime.jit import JITFunction

ENV = "CONSA_TRITON_CACHE_DIR"
logger = logging.getLogger(__name__)


def shared_cache_dir() -> str | None:
    """The folder our kernels compile into; None when ``CONSA_TRITON_CACHE_DIR`` is set empty
    or vLLM is not installed (Triton's own setting then applies). Read at every compile."""
    raw = os.environ.get(ENV)
    if raw is not None:
        return os.path.abspath(os.path.expanduser(raw)) if raw.strip() else None
    try:
        from vllm import envs
    except ImportError:
        # Without vLLM nothing moves Triton's cache per configuration: keep Triton's own.
        return None
    return os.path.join(envs.VLLM_CACHE_ROOT, "consa_triton_cache")


_warned: set[str] = set()


def _usable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        pass
    if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
        return True
    if path not in _warned:
        # A cache that cannot be written must not stop a launch: Triton's own setting
        # (vLLM's folder) still works, only without the sharing.
        _warned.add(path)
        logger.warning("consa_vllm: the Triton cache folder %s (%s) cannot be written; the kernels "
                       "compile into Triton's own cache folder instead", path, ENV)
    return False


@contextmanager
def compiling_into(path: str | None):
    """Triton's cache folder is ``path`` inside the block and what it was after it (its
    knob and ``TRITON_CACHE_DIR`` both); ``None``, or a folder that cannot be made or
    written (warned once): unchanged."""
    if path is None or not _usable(path):
        yield
        return
    with triton.knobs.cache.scope():
        triton.knobs.cache.dir = path
        yield


class SharedCacheJITFunction(JITFunction):
    """A Triton kernel that compiles into :func:`shared_cache_dir`.

    ``_do_compile`` runs only when Triton's in-memory cache has no binary for the launch's
    specialisation; the binary and its launcher (which Triton builds at the first launch, so
    it is built here, while the folder is switched) then come from, or go to, the shared
    folder. A warm-up compile (``warmup=True``: compile, do not launch) builds no launcher.
    """

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        with compiling_into(shared_cache_dir()):
            kernel = super()._do_compile(key, signature, device, constexprs, options, attrs, warmup)
            if kernel is not None and not warmup and hasattr(kernel, "_init_handles"):
                kernel._init_handles()
            return kernel


def jit(fn=None, **kwargs):
    """``triton.jit`` for consa_vllm's kernels: the same options, a :class:`SharedCacheJITFunction`
    on GPUs; under Triton's interpreter (``TRITON_INTERPRET=1``, nothing compiled) exactly
    ``triton.jit``."""

    def decorator(f):
        if triton.knobs.runtime.interpret:
            return triton.jit(f, **kwargs)
        return SharedCacheJITFunction(f, **kwargs)

    return decorator if fn is None else decorator(fn)
