"""``consa-vllm serve MODEL_DIR [vLLM server args...]``: serve an exported ConSA checkpoint.

A thin wrapper around vLLM's OpenAI-compatible API server. It

1. checks the checkpoint first (``MODEL_DIR/config.json`` exists, names a Consa*
   architecture and holds a valid ``consa`` allocation that matches the model's shape),
   and on error prints one line naming the file and the field and exits with status 2,
   before torch, vLLM or any weight is loaded;
2. on a machine without CUDA, defaults ``VLLM_CPU_KVCACHE_SPACE`` when it is unset, and
   when ``VLLM_PLUGINS`` is unset sets it to every installed vLLM plugin plus the
   ``consa_endpoint`` endpoint plugin (``/v1/consa/allocation``, ``consa_kv_*`` metrics),
   which vLLM loads only when ``VLLM_PLUGINS`` names it;
3. replaces itself (``os.execv``) with
   ``python -m vllm.entrypoints.openai.api_server --model MODEL_DIR <args>``, which works
   under both the ``vllm`` and the ``vllm-cpu`` distributions (the ``vllm`` console script
   does not work under ``vllm-cpu``).

The checks are the plugin's own (:func:`consa_vllm.export.read_exported_allocation`, the
same allocation parser and shape check that vLLM's config hook runs in
:mod:`consa_vllm.plugin.config`), so the wrapper and a plain ``vllm serve`` agree.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shlex
import sys
from pathlib import Path

from consa_vllm.cli_args import EXIT_USAGE

PROG = "consa-vllm serve"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: The endpoint plugin (group vllm.endpoint_plugins) that serves /v1/consa/allocation.
ENDPOINT_PLUGIN = "consa_endpoint"
#: vLLM plugin groups that load every installed plugin when VLLM_PLUGINS is unset.
PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.stat_logger_plugins",
                 "vllm.io_processor_plugins")
#: GiB of KV cache for vLLM's CPU backend when the user has not chosen (vLLM's own default
#: is larger than small CI machines can give).
DEFAULT_CPU_KVCACHE_GIB = "4"

HELP = f"""\
usage: {PROG} MODEL_DIR [vLLM server options...]
       {PROG} --model MODEL_DIR [vLLM server options...]

Serve an exported ConSA checkpoint (see `consa-vllm export`) with vLLM's OpenAI-compatible
API server (/v1/completions, /v1/chat/completions, /v1/models, streaming).

What it does:
  1. checks MODEL_DIR/config.json: a Consa* architecture and a valid 'consa' allocation
     matching the model's layers and KV heads. On error it prints one line naming the file
     and the field and exits with status 2, before anything is loaded;
  2. without CUDA (the vllm-cpu build), sets VLLM_CPU_KVCACHE_SPACE={DEFAULT_CPU_KVCACHE_GIB} (GiB) if it
     is unset, and says so;
  3. runs `python -m {API_SERVER_MODULE} --model MODEL_DIR [options...]`
     in its place. Every other option goes to vLLM unchanged (--port, --host,
     --max-model-len, --dtype, --enforce-eager, --tensor-parallel-size, ...); list them with
     `python -m {API_SERVER_MODULE} --help`.

The plugin:
  The `consa` plugin is a vLLM *general plugin* (entry point group vllm.general_plugins).
  vLLM loads installed general plugins automatically in every process; nothing needs to be
  passed. VLLM_PLUGINS is left as you set it: unset loads all installed plugins, and
  VLLM_PLUGINS=consa restricts loading to ours (a VLLM_PLUGINS list without `consa` leaves
  the Consa* architectures unknown to vLLM). vLLM has no --plugin flag, so
  `vllm serve --model DIR --plugin consa` does not exist; the forms below are the working ones.

The endpoint (GET /v1/consa/allocation, GET /v1/consa/metrics, consa_kv_* on /metrics):
  The `consa_endpoint` plugin (entry point group vllm.endpoint_plugins) adds these routes.
  vLLM loads endpoint plugins only when VLLM_PLUGINS names them. If VLLM_PLUGINS is unset,
  this command sets it to every installed vLLM plugin (so nothing that loaded before is
  dropped) plus `consa_endpoint`. If you set VLLM_PLUGINS yourself it is left as it is:
  VLLM_PLUGINS=consa,consa_endpoint enables both. Plain vLLM:
                                  VLLM_PLUGINS=consa,consa_endpoint vllm serve MODEL_DIR

Equivalent plain commands (they run the same checks, inside vLLM's config hook):
  GPU (the `vllm` distribution):  vllm serve MODEL_DIR [options...]
                                  VLLM_PLUGINS=consa vllm serve MODEL_DIR [options...]
  CPU (vllm-cpu, whose `vllm` console script fails with PackageNotFoundError):
                                  VLLM_CPU_KVCACHE_SPACE=4 python -m {API_SERVER_MODULE} \\
                                      --model MODEL_DIR [options...]

examples:
  {PROG} ./tiny-consa --port 8000
  {PROG} ./tiny-consa --dtype float32 --max-model-len 512 --enforce-eager   (CPU)
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "./tiny-consa", "prompt": "def main(", "max_tokens": 16}}'
"""


class ServeError(Exception):
    """A problem with the command line or the checkpoint: one line on stderr, exit status 2."""


def split_model_arg(argv: list[str]) -> tuple[str, list[str]]:
    """``(MODEL_DIR, the other arguments)`` from ``MODEL_DIR ...`` or ``... --model MODEL_DIR ...``."""
    rest = list(argv)
    positional = rest.pop(0) if rest and not rest[0].startswith("-") else None
    flagged = None
    for i, a in enumerate(rest):
        if a == "--model":
            if i + 1 >= len(rest):
                raise ServeError("--model: expected MODEL_DIR after it")
            flagged = rest[i + 1]
            del rest[i:i + 2]
            break
        if a.startswith("--model="):
            flagged = a.split("=", 1)[1]
            del rest[i]
            break
    if positional is not None and flagged is not None:
        raise ServeError(f"MODEL_DIR given twice ({positional!r} and --model {flagged!r}); give it once")
    model = positional if positional is not None else flagged
    if not model:
        raise ServeError("missing MODEL_DIR, the exported ConSA checkpoint directory")
    return model, rest


def check_checkpoint(model_dir: str | os.PathLike):
    """Validate an exported checkpoint without torch or vLLM; return its allocation.

    Raises :class:`~consa_vllm.allocation.AllocationError` or
    :class:`~consa_vllm.export.ExportError`, whose one-line messages name
    ``config.json`` and the field.
    """
    from consa_vllm.export import (CONFIG_KEY, ExportError, _read_config, base_architecture,
                                   consa_architecture, read_exported_allocation)
    from consa_vllm.allocation import AllocationError

    path = Path(model_dir)
    cfg_path = path / "config.json"
    if not path.exists():
        raise AllocationError(f"{cfg_path}: not found (the directory {path} does not exist)")
    if not path.is_dir():  # an allocation file, say: a checkpoint is a folder (consa-vllm export writes one)
        raise ExportError(f"{path}: is a file, expected an exported checkpoint directory (`consa-vllm export "
                          "--model SRC --allocation A.json --out DST` writes one)")
    alloc = read_exported_allocation(path)  # 'consa' present, well-formed, matching the shape
    data = _read_config(cfg_path, error=AllocationError)
    base = base_architecture(data, where=str(cfg_path))
    arch = data["architectures"][0]
    if arch != consa_architecture(base):
        raise ExportError(
            f"{cfg_path}: field 'architectures' is {arch!r}, not a ConSA architecture (expected "
            f"{consa_architecture(base)!r}), so vLLM would ignore field '{CONFIG_KEY}'; re-export with "
            "`consa-vllm export --model SRC --allocation A.json --out DST`")
    return alloc, arch


def _plugin_installed() -> bool:
    try:
        eps = metadata.entry_points(group="vllm.general_plugins")
    except Exception:  # pragma: no cover - broken metadata: let vLLM report it
        return True
    return any(ep.name == "consa" for ep in eps)


def default_vllm_plugins() -> str:
    """``VLLM_PLUGINS`` that loads what an unset one loads, plus our endpoint plugin.

    vLLM loads every installed general/platform/stat-logger/IO-processor plugin when
    ``VLLM_PLUGINS`` is unset, but endpoint plugins only when it names them. So the names
    of all installed plugins of those groups are listed (nothing that loaded before is
    dropped), and of the endpoint plugins only ours (others stay opt-in, as vLLM intends).
    """
    names = {"consa", ENDPOINT_PLUGIN}
    for group in PLUGIN_GROUPS:
        try:
            names.update(ep.name for ep in metadata.entry_points(group=group))
        except Exception:  # pragma: no cover - broken metadata of another package
            pass
    return ",".join(sorted(names))


def _has_dist(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def cuda_available() -> bool:
    """Whether vLLM will run on CUDA; cheap for the vllm-cpu build (no torch import)."""
    if _has_dist("vllm-cpu") and not _has_dist("vllm"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def build_command(model_dir: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", API_SERVER_MODULE, "--model", model_dir, *args]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        (sys.stdout if argv else sys.stderr).write(HELP)
        return 0 if argv else EXIT_USAGE
    from consa_vllm.allocation import AllocationError
    from consa_vllm.export import ExportError

    try:
        model_dir, rest = split_model_arg(argv)
        alloc, arch = check_checkpoint(model_dir)
        if not _plugin_installed():
            raise ServeError("the vLLM plugin 'consa' is not installed (no 'consa' entry point in group "
                             "vllm.general_plugins); install this package, e.g. `pip install -e .`")
    except (ServeError, AllocationError, ExportError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE

    note = lambda msg: print(f"{PROG}: {msg}", file=sys.stderr)  # noqa: E731
    plugins = os.environ.get("VLLM_PLUGINS")
    env = dict(os.environ)
    if plugins is not None:
        names = [p.strip() for p in plugins.split(",")]
        if "consa" not in names:
            note(f"warning: VLLM_PLUGINS={plugins!r} does not include 'consa'; vLLM will not know {arch}")
        if ENDPOINT_PLUGIN not in names:
            note(f"VLLM_PLUGINS is set without {ENDPOINT_PLUGIN!r}: /v1/consa/allocation and the consa_kv_* "
                 "metrics are off")
    else:
        env["VLLM_PLUGINS"] = default_vllm_plugins()
        note(f"VLLM_PLUGINS was unset: set to {env['VLLM_PLUGINS']!r} (every installed plugin, as before, "
             f"plus the {ENDPOINT_PLUGIN!r} endpoint: /v1/consa/allocation, consa_kv_* metrics)")
    if "VLLM_CPU_KVCACHE_SPACE" not in env and not cuda_available():
        env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        note(f"no CUDA device: VLLM_CPU_KVCACHE_SPACE was unset, defaulting to {DEFAULT_CPU_KVCACHE_GIB} (GiB)")
    n_full = sum(r.count("F") for r in alloc.pattern)
    n_units = sum(len(r) for r in alloc.pattern)
    note(f"{model_dir}: {arch}, {alloc.num_layers} layers, {alloc.granularity} allocation with "
         f"{n_full}/{n_units} F units, window {alloc.window}")
    cmd = build_command(model_dir, rest)
    note("exec: " + shlex.join([Path(cmd[0]).name, *cmd[1:]]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    sys.exit(main())
