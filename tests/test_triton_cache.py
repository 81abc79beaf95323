"""The shared Triton cache of consa_vllm's kernels (consa_vllm/plugin/ops/triton_cache.py), on CPU.

What a GPU compile does with it runs in tests/test_gpu_ops.py
(``test_kernels_compile_into_the_shared_triton_cache``). Here: the folder's setting, that
Triton's cache setting is switched for the compile and put back after it (also when the
compile fails), that every kernel the ops launch is one of ours, and that the Triton
internals the class overrides still have the shape it was written for, so a Triton
upgrade that changes them fails here rather than silently compiling elsewhere.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from consa_vllm.plugin.ops import triton_cache as tc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shared_cache_dir_settings(monkeypatch, tmp_path):
    """The default is vLLM's own cache root (read through vllm.envs, uncached here: an engine
    of an earlier test turns its cache on); without vLLM, Triton's own setting."""
    from vllm import envs

    envs.disable_envs_cache()
    monkeypatch.delenv(tc.ENV, raising=False)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vroot"))
    assert tc.shared_cache_dir() == str(tmp_path / "vroot" / "consa_triton_cache")
    monkeypatch.delenv("VLLM_CACHE_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.shared_cache_dir() == str(tmp_path / "xdg" / "vllm" / "consa_triton_cache")
    monkeypatch.setenv(tc.ENV, str(tmp_path / "mine"))
    assert tc.shared_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv(tc.ENV, "")
    assert tc.shared_cache_dir() is None
    monkeypatch.delenv(tc.ENV)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    assert tc.shared_cache_dir() is None


@pytest.mark.parametrize("before", [None, "vllm-folder"])
def test_compiling_into_switches_and_restores(monkeypatch, tmp_path, before):
    if before is None:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / before))
    outside = triton.knobs.cache.dir
    shared = str(tmp_path / "shared")
    with pytest.raises(RuntimeError, match="compile failed"):
        with tc.compiling_into(shared):
            assert triton.knobs.cache.dir == shared
            assert os.environ["TRITON_CACHE_DIR"] == shared
            assert os.path.isdir(shared)
            raise RuntimeError("compile failed")
    assert triton.knobs.cache.dir == outside
    assert os.environ.get("TRITON_CACHE_DIR") == (None if before is None else str(tmp_path / before))
    with tc.compiling_into(None):
        assert triton.knobs.cache.dir == outside


def test_unwritable_folder_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    """A folder that cannot be made (here: under a file) leaves Triton's setting alone and
    warns once, naming the folder and the variable; the launch goes on."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "vllm"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = str(blocker / "cache")
    with caplog.at_level("WARNING", logger=tc.__name__):
        for _ in range(2):
            with tc.compiling_into(bad):
                assert triton.knobs.cache.dir == str(tmp_path / "vllm")
    warnings = [r.getMessage() for r in caplog.records if r.name == tc.__name__]
    assert len(warnings) == 1 and bad in warnings[0] and tc.ENV in warnings[0], warnings


def test_do_compile_runs_in_the_shared_folder(monkeypatch, tmp_path):
    """The override compiles and initialises the launcher (built on first use) while the
    folder is switched, and passes the parent's arguments and result through."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "vllm"))
    monkeypatch.setenv(tc.ENV, str(tmp_path / "shared"))
    seen = {}

    class Compiled:
        def _init_handles(self):
            seen["launcher"] = triton.knobs.cache.dir

    def parent(self, key, signature, device, constexprs, options, attrs, warmup):
        seen["compile"] = triton.knobs.cache.dir
        seen["args"] = (key, signature, device, constexprs, options, attrs, warmup)
        return Compiled()

    def f(x):
        pass

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "_do_compile", parent)
    fn = tc.SharedCacheJITFunction(f)
    kernel = fn._do_compile("k", {"x": "i32"}, 0, {}, None, {}, False)
    assert isinstance(kernel, Compiled)
    assert seen == {"compile": str(tmp_path / "shared"), "launcher": str(tmp_path / "shared"),
                    "args": ("k", {"x": "i32"}, 0, {}, None, {}, False)}
    assert triton.knobs.cache.dir == str(tmp_path / "vllm")
    seen.clear()
    fn._do_compile("k", {}, 0, {}, None, {}, True)  # a warm-up compile builds no launcher
    assert set(seen) == {"compile", "args"}


def test_triton_internals_have_the_overridden_shape():
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    params = list(inspect.signature(JITFunction._do_compile).parameters)
    assert params == ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"]
    assert callable(getattr(CompiledKernel, "_init_handles", None))
    # compile_only's override of run, and compile_in_parallel's use of Triton's async mode.
    assert list(inspect.signature(JITFunction.run).parameters) == ["self", "args", "grid", "warmup", "kwargs"]
    from triton.runtime._async_compile import AsyncCompileMode, FutureKernel

    assert {"executor", "ignore_errors"} <= set(inspect.signature(AsyncCompileMode).parameters)
    assert hasattr(FutureKernel, "result")
    assert hasattr(triton.knobs.cache, "scope") and hasattr(triton.knobs.runtime, "interpret")


def test_jit_follows_the_interpreter_setting(monkeypatch):
    def f(x):
        pass

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    k = tc.jit(do_not_specialize=["x"])(f)
    assert type(k) is tc.SharedCacheJITFunction and k.do_not_specialize == ["x"]
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert not isinstance(tc.jit(f), tc.SharedCacheJITFunction)


def test_every_launched_kernel_uses_the_shared_cache():
    """Each ``<kernel>[grid](...)`` launch in the ops is a SharedCacheJITFunction (in a fresh
    process without the interpreter, as on a GPU)."""
    src = open(os.path.join(ROOT, "consa_vllm", "plugin", "ops", "triton_hybrid.py")).read()
    launched = sorted(set(re.findall(r"\b(_\w+_kernel)\[", src)))
    assert len(launched) >= 6, launched
    code = ("import sys; from consa_vllm.plugin.ops import triton_hybrid as th, triton_cache as tc; "
            f"bad = [n for n in {launched!r} if type(getattr(th, n)) is not tc.SharedCacheJITFunction]; "
            "sys.exit(f'not shared-cache kernels: {bad}' if bad else 0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compile_only_is_per_thread_and_nests():
    import threading

    seen = {}

    def other():
        seen["other"] = getattr(tc._compile_only, "on", False)

    assert not getattr(tc._compile_only, "on", False)
    with tc.compile_only():
        with tc.compile_only():
            assert tc._compile_only.on
        assert tc._compile_only.on
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert not tc._compile_only.on and seen == {"other": False}


@pytest.mark.slow
def test_compile_in_parallel_compiles_what_the_launches_use():
    """In a fresh process with a stand-in sm_90 driver (no GPU: Triton's bundled ptxas builds
    the binaries), ``compile_in_parallel`` over the launches of an uneven allocation's layers
    (K/V writes, 2D and split-KV attention, the reduce; sink 4) compiles each variant once,
    into the shared folder, launching nothing (there is no GPU to launch on), and its variants
    are exactly those of the real launches: the keys that the JIT's own binder gives each
    launch are all in the kernels' in-memory caches, so no real launch would compile again.
    A second pass compiles nothing."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "parallel"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    import json

    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    print(r)
    assert r["first_pass"] == r["in_memory"] >= 8, r  # 2D + 3D attention x 3 layer classes, reduce, writes
    assert r["cubins"] == r["first_pass"], r
    assert r["missing_keys"] == [] and r["launch_keys"] >= r["first_pass"], r
    assert r["second_pass"] == 0, r


def _parallel_main() -> None:
    """The subprocess of test_compile_in_parallel_compiles_what_the_launches_use."""
    import glob
    import json
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_ops

    test_ops.use_sm90_compile_driver()
    shared = tempfile.mkdtemp(prefix="consa-shared-")
    os.environ[tc.ENV] = shared
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")

    from consa_vllm.plugin.ops import triton_hybrid as th

    splits = test_ops.UNEVEN_SPLITS

    def launches():
        for num_seqs, query_len in ((1, 1), (40, 1), (1, 3)):
            test_ops._launch_layers(th, splits, sink=4, num_seqs=num_seqs, query_len=query_len)

    names = ("_hybrid_attn_kernel", "_reduce_segments_kernel", "_write_kv_kernel", "_write_kv_hybrid_kernel")
    first, _ = tc.compile_in_parallel(launches, threads=2)
    in_memory = {n: set(getattr(th, n).device_caches[0][0]) for n in names}
    wanted = test_ops.record_variant_keys(th, names, launches, as_run=True)
    missing = sorted(f"{n}: {k}" for n in names for k in wanted.get(n, ()) if k not in in_memory[n])
    second, _ = tc.compile_in_parallel(launches, threads=2)
    print("RESULT " + json.dumps({
        "first_pass": first, "second_pass": second, "in_memory": sum(len(v) for v in in_memory.values()),
        "cubins": len(glob.glob(os.path.join(shared, "*", "*.cubin"))),
        "launch_keys": sum(len(v) for v in wanted.values()), "missing_keys": missing}))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "parallel":
        _parallel_main()
