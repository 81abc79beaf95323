"""What the test modules share.

- ``tiny_model``: a session-wide factory of tiny random Hugging Face models
  (:func:`consa_vllm.tiny.build_tiny_model`). Each shape is built once per session and shared
  by every module that asks for it; tests read these models and never write into them
  (exports and runs go to the tests' own temporary directories).
- The markers. ``engine``: the test starts a real vLLM engine or server (about 90 s each on a
  2-core CPU). ``slow``: a whole pipeline, a multi-process training run or a subprocess that
  imports vLLM (tens of seconds each). ``make test-fast`` runs the rest
  (``-m "not engine and not slow"``), ``make test`` everything. A test module that imports the
  engine or server harness (tests/engine_harness.py, tests/server_harness.py) must mark its
  tests ``engine``; collection stops with a message naming the test otherwise, so that the
  fast run never starts an engine by accident.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest

#: Names whose presence in a test module means it starts engines or servers.
_ENGINE_HELPERS = ("run_vllm", "consa_serve")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_model(family="qwen3", **shape)`` -> directory of a tiny random model (with tokenizer
    unless ``tokenizer=False``), built on first request and reused for the rest of the session."""
    from consa_vllm.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    signature = inspect.signature(build_tiny_model)
    built: dict[str, Path] = {}

    def make(family: str = "qwen3", **kwargs) -> Path:
        # Keyed by every argument, defaults filled in: the same model asked for with or
        # without its default values is built once.
        args = signature.bind(None, family=family, **kwargs)
        args.apply_defaults()
        key = json.dumps({k: v for k, v in args.arguments.items() if k != "out_dir"}, sort_keys=True)
        if key not in built:
            built[key] = build_tiny_model(root / f"{len(built)}-{family}", family=family, **kwargs)
        return built[key]

    return make


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse engine-starting tests that are not marked ``engine`` (see the module docstring)."""
    unmarked = [item.nodeid for item in items
                if item.get_closest_marker("engine") is None
                and any(hasattr(getattr(item, "module", None), name) for name in _ENGINE_HELPERS)]
    if unmarked:
        raise pytest.UsageError("these tests use the vLLM engine or server harness but are not marked "
                                "engine (add `pytestmark = pytest.mark.engine`): " + ", ".join(unmarked))
