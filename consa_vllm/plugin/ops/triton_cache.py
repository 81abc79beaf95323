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

A cold folder still costs the first engine of a machine one compile per kernel variant, each
at its first launch, one after another, inside vLLM's CUDA-graph warm-up. :func:`compile_in_parallel`
compiles a known list of launches at once instead: under :func:`compile_only` each launch of
our kernels compiles (Triton's own ``warmup``) and returns, and Triton's ``AsyncCompileMode``
sends each compile to a thread pool (its MLIR passes, LLVM and ptxas leave Python's lock
free, so the compiles overlap); the C launchers are built, and the binaries loaded, in the
same pool. ``consa_vllm.plugin.precompile`` lists a ConSA engine's launches.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

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


_compile_only = threading.local()


@contextmanager
def compile_only():
    """Inside the block, this thread's launches of our kernels (:func:`jit`) compile, if their
    variant is new, and return without running: Triton's ``warmup`` for every launch. Other
    threads launch as usual."""
    before = getattr(_compile_only, "on", False)
    _compile_only.on = True
    try:
        yield
    finally:
        _compile_only.on = before


class SharedCacheJITFunction(JITFunction):
    """A Triton kernel that compiles into :func:`shared_cache_dir`.

    ``_do_compile`` runs only when Triton's in-memory cache has no binary for the launch's
    specialisation; the binary and its launcher (which Triton builds at the first launch, so
    it is built here, while the folder is switched) then come from, or go to, the shared
    folder. A warm-up compile (``warmup=True``: compile, do not launch) builds no launcher.
    """

    def run(self, *args, grid, warmup, **kwargs):
        return super().run(*args, grid=grid, warmup=warmup or getattr(_compile_only, "on", False), **kwargs)

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        # Under AsyncCompileMode the compile itself runs later, in the pool:
        # compile_in_parallel holds the shared folder for the whole of it.
        with compiling_into(shared_cache_dir()):
            kernel = super()._do_compile(key, signature, device, constexprs, options, attrs, warmup)
            if kernel is not None and not warmup and hasattr(kernel, "_init_handles"):
                kernel._init_handles()
            return kernel


def compile_in_parallel(launches: Callable[[], None], threads: int | None = None) -> tuple[int, float]:
    """Compile every variant of our kernels that ``launches()`` would launch, in parallel,
    launching nothing; return (variants compiled, seconds).

    ``launches`` runs on this thread under :func:`compile_only`: each launch of a variant
    not in memory yet sends its compile to a pool of ``threads`` (default: the CPUs, at most
    16) through Triton's ``AsyncCompileMode``, which also merges repeats. Then each new
    binary's launcher is built and the binary loaded on this thread's GPU, in the same pool,
    so the first real launch finds it ready. All of it compiles into :func:`shared_cache_dir`.
    A variant whose compile fails is skipped here and compiles (and raises) at its first
    real launch, as without this."""
    import torch
    from triton.runtime._async_compile import AsyncCompileMode

    threads = threads or max(1, min(16, os.cpu_count() or 1))
    start = time.perf_counter()
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def load(kernel) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        kernel._init_handles()

    with compiling_into(shared_cache_dir()), ThreadPoolExecutor(threads, thread_name_prefix="consa-compile") as pool:
        mode = AsyncCompileMode(pool, ignore_errors=True)
        with mode, compile_only():
            launches()
        kernels = [k.kernel for k in mode.future_kernels.values() if k.kernel is not None]
        if device is not None:
            for f in [pool.submit(load, k) for k in kernels]:
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - the real launch loads it again and raises
                    logger.debug("consa_vllm: loading a precompiled kernel failed (%s); it loads at its launch", e)
    return len(kernels), time.perf_counter() - start


def jit(fn=None, **kwargs):
    """``triton.jit`` for consa_vllm's kernels: the same options, a :class:`SharedCacheJITFunction`
    on GPUs; under Triton's interpreter (``TRITON_INTERPRET=1``, nothing compiled) exactly
    ``triton.jit``."""

    def decorator(f):
        if triton.knobs.runtime.interpret:
            return triton.jit(f, **kwargs)
        return SharedCacheJITFunction(f, **kwargs)

    return decorator if fn is None else decorator(fn)
