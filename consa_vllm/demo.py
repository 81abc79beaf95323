"""``consa-vllm demo``: the whole ConSA pipeline, end to end, on an embedded default.

Runs on a CPU machine with no network access, in a few minutes:

1. builds a tiny random Qwen3 model and a BPE tokenizer (:mod:`consa_vllm.tiny`);
2. writes a small corpus (standard-library Python files) and trains a kv_head allocation
   with the trainer (``python -m consa_vllm.train``, run in-process, frozen weights);
3. draws the allocation heatmap and prints the pattern and the KV-cache estimate;
4. exports a checkpoint that the vLLM plugin serves (:func:`consa_vllm.export.export_model`);
5. serves it with ``consa-vllm serve`` (vLLM's OpenAI-compatible server) in a subprocess;
6. queries it with the official ``openai`` client (completion, streamed chat, /v1/models);
7. stops the server (always, also on Ctrl-C or an error, unless --keep-server) and prints
   where everything is and how to serve the model again.

The model is random, so its output is gibberish: the demo shows the plumbing, not quality.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from consa_vllm.families import DEFAULT_FAMILY
from consa_vllm.cli_args import EXIT_USAGE, UsageParser, int_in_range
from consa_vllm.server_process import ServerError, ServerProcess, free_port, http_get
from consa_vllm.outputs import Interrupted, output_problem, signal_of, signals_raise

PROG = "consa-vllm demo"

#: The embedded default: model shape, corpus and trainer settings.
MODEL_KW = dict(family=DEFAULT_FAMILY, num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32)
N_CORPUS_FILES = 40
WINDOW = 32
SEQ_LEN = 128
MAX_MODEL_LEN = 512
KV_CONTEXTS = (512, 8192, 131072)
HEALTH_TIMEOUT_S = 600.0


class DemoError(Exception):
    """A step failed: reported as one line (plus the relevant log), exit status 1."""


_steps = int_in_range(1, "optimizer steps")
_port = int_in_range(1, "TCP port", hi=65535)


#: What ``consa-vllm demo --help`` says (plain text: the module docstring is reST).
DESCRIPTION = """\
The whole ConSA pipeline, end to end, on an embedded default. Runs on a CPU machine with
no network access, in a few minutes:

  1. builds a tiny random Qwen3 model and a BPE tokenizer;
  2. writes a small corpus (standard-library Python files) and trains a kv_head allocation
     with the trainer (consa-vllm train, run in-process, frozen weights);
  3. draws the allocation heatmap and prints the pattern and the KV-cache estimate;
  4. exports a checkpoint that the vLLM plugin serves (consa-vllm export);
  5. serves it with consa-vllm serve (vLLM's OpenAI-compatible server) in a subprocess;
  6. queries it with the official openai client (completion, streamed chat, /v1/models);
  7. stops the server (always, also on Ctrl-C, SIGTERM or an error, unless --keep-server)
     and prints where everything is and how to serve the model again.

The model is random, so its output is gibberish: the demo shows the plumbing, not quality.
Running it again with the same --out replaces the earlier results."""


def _demo_sparsity(text: str) -> float:
    """--sparsity: in [0, 1] and reachable exactly with the demo model's KV heads per layer."""
    from .allocation.rules import exact_count
    from .cli import sparsity_arg  # the same [0, 1] check as `consa-vllm make --sparsity`

    value = sparsity_arg(text)
    heads = MODEL_KW["num_kv_heads"]
    try:
        exact_count(value, heads)
    except ValueError:
        reachable = ", ".join(f"{k / heads:g}" for k in range(heads + 1))
        raise argparse.ArgumentTypeError(f"{value:g} is not reachable with the demo model's {heads} KV heads per "
                                         f"layer; use one of {reachable}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``consa-vllm demo``."""
    p = UsageParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION)
    p.add_argument("--out", default="./demo-out", metavar="DIR",
                   help="working directory for the model, data, allocation, logs (default: ./demo-out)")
    p.add_argument("--port", type=_port, default=None, help="server port (default: a free port)")
    p.add_argument("--keep-server", action="store_true",
                   help="leave the server running at the end and print its URL and process group")
    p.add_argument("--steps", type=_steps, default=60, help="trainer optimizer steps (default: 60)")
    p.add_argument("--sparsity", type=_demo_sparsity, default=0.5, metavar="RHO",
                   help="target fraction of sliding-window KV heads: 0, 0.25, 0.5, 0.75 or 1 (the demo model "
                        f"has {MODEL_KW['num_kv_heads']} KV heads per layer; default: 0.5)")
    return p


# ------------------------------------------------------------------ output helpers

_T0 = time.monotonic()


def _header(n: int, title: str) -> None:
    print(f"\n=== [{n}/7] {title}  (t+{time.monotonic() - _T0:.0f}s) " + "=" * max(0, 50 - len(title)), flush=True)


def _info(msg: str) -> None:
    print(f"    {msg}", flush=True)


def _tail(server: ServerProcess, lines: int = 40) -> str:
    """The end of the server log, indented under the error message."""
    return "\n".join("    | " + line for line in server.read_log().splitlines()[-lines:])


# ------------------------------------------------------------------ steps


def step_model(out: Path) -> Path:
    from .tiny import build_tiny_model

    _header(1, f"build a tiny {DEFAULT_FAMILY} model + tokenizer")
    base = out / "base"
    t = time.monotonic()
    build_tiny_model(base, **MODEL_KW)
    _info(f"{base}: {DEFAULT_FAMILY}, {MODEL_KW['num_layers']} layers, {MODEL_KW['num_attention_heads']} query heads, "
          f"{MODEL_KW['num_kv_heads']} KV heads, head_dim {MODEL_KW['head_dim']}, random weights "
          f"({time.monotonic() - t:.1f}s)")
    return base


def step_train(out: Path, base: Path, steps: int, sparsity: float) -> Path:
    from .tiny import stdlib_python_files
    from .train.__main__ import main as train_main

    _header(2, "train an allocation (frozen weights, kv_head gates)")
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    files = stdlib_python_files(N_CORPUS_FILES)
    for f in files:
        shutil.copyfile(f, data / f.name)
    size = sum((data / f.name).stat().st_size for f in files)
    _info(f"corpus: {len(files)} standard-library Python files ({size / 1e6:.1f} MB) copied to {data}")
    alloc_path = out / "allocation.json"
    argv = ["--model", str(base), "--data", str(data), "--target-sparsity", f"{sparsity:g}",
            "--granularity", "kv_head", "--constraint", "per-layer", "--window", str(WINDOW),
            "--seq-len", str(SEQ_LEN), "--steps", str(steps), "--freeze-weights",
            "--out", str(alloc_path), "--log-dir", str(out / "train"), "--device", "cpu",
            "--checkpoint-every", "0", "--force"]  # --force: the demo owns --out; a rerun replaces its run
    _info("consa-vllm train " + shlex.join(argv))
    t = time.monotonic()
    sys.stdout.flush()
    rc = train_main(argv, prog="consa-vllm train")
    if rc > 128:  # stopped by a signal (Ctrl-C, SIGTERM): stop the demo the same way
        raise Interrupted(rc - 128)
    if rc != 0:
        raise DemoError(f"the trainer exited with status {rc} (see the messages above and {out / 'train'})")
    _info(f"trained in {time.monotonic() - t:.1f}s -> {alloc_path}")
    return alloc_path


def step_show(out: Path, base: Path, alloc_path: Path):
    from .allocation import Allocation, ModelShape, estimate_kv, plot_allocation, render_text, summarize
    from .cli import format_bytes

    _header(3, "inspect the allocation")
    alloc = Allocation.load(alloc_path)
    png = plot_allocation(alloc, out / "allocation.png", title="demo: learned allocation")
    s = summarize(alloc)
    print(render_text(alloc))
    _info(f"F KV heads: {s['full_kv_heads']}   S KV heads: {s['sliding_kv_heads']}   sparsity: {s['sparsity']:.3f}")
    shape = ModelShape.from_model_dir(base)
    _info(f"KV cache per sequence (bfloat16; full heads keep every token, S heads the last {alloc.window}):")
    _info(f"  {'context':>9}  {'ConSA':>11}  {'dense':>11}  {'ratio':>6}  {'seqs that fit':>13}")
    for n in KV_CONTEXTS:
        r = estimate_kv(alloc, shape, n)
        _info(f"  {n:>9}  {format_bytes(r.bytes_per_sequence):>11}  {format_bytes(r.dense_bytes_per_sequence):>11}"
              f"  {r.ratio_to_dense:>6.3f}  {r.capacity_gain:>12.2f}x")
    _info(f"heatmap: {png}")
    return alloc, png


def step_export(out: Path, base: Path, alloc) -> Path:
    from .export import export_model

    _header(4, "export a checkpoint for the vLLM plugin")
    dst = export_model(base, alloc, out / "model", force=True)
    import json

    arch = json.loads((dst / "config.json").read_text())["architectures"][0]
    _info(f"{dst}: architecture {arch}, allocation embedded in config.json (field 'consa'); "
          "weights hard-linked")
    return dst


#: ``consa-vllm serve`` options of the demo server: float32, eager (no compile wait on a CPU).
SERVE_ARGS = ("--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager")


class _WaitNote:
    """Progress while the server starts: a spinner on a terminal, a line every 15 s otherwise."""

    SPIN = "|/-\\"

    def __init__(self, base: str):
        self.base, self.tty, self.polls, self.last_note = base, sys.stdout.isatty(), 0, 0.0

    def __call__(self, elapsed: float) -> None:
        if self.tty:
            spin = self.SPIN[self.polls % 4]
            print(f"\r    {spin} waiting for {self.base}/health ... {elapsed:5.0f}s", end="", flush=True)
        elif elapsed - self.last_note >= 15:
            _info(f"waiting for {self.base}/health ... {elapsed:.0f}s")
            self.last_note = elapsed
        self.polls += 1

    def end_line(self) -> None:
        if self.tty and self.polls:
            print("\r" + " " * 70 + "\r", end="", flush=True)


def step_serve(server: ServerProcess) -> None:
    _header(5, "serve it with vLLM (consa-vllm serve)")
    _info(shlex.join([Path(server.cmd[0]).name, *server.cmd[1:]]))
    _info(f"log: {server.log_path}  (vLLM on CPU takes a minute or more to start)")
    server.start()
    note = _WaitNote(server.base)
    try:
        took = server.wait_healthy(HEALTH_TIMEOUT_S, on_wait=note)
    except ServerError as e:
        raise DemoError(f"{e}; last lines of {server.log_path}:\n{_tail(server)}") from None
    finally:
        note.end_line()
    _info(f"healthy at {server.base} after {took:.0f}s")


def step_query(server: ServerProcess, model: Path) -> None:
    import json

    import openai

    _header(6, "query it with the openai client")
    _info("the model has random weights: expect gibberish, the point is the plumbing")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=120, max_retries=0)
    name = str(model)

    prompt = "def fibonacci(n):\n"
    t = time.monotonic()
    r = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
    _info(f"completion ({time.monotonic() - t:.1f}s, {r.usage.completion_tokens} tokens, "
          f"finish: {r.choices[0].finish_reason}):")
    _info(f"  prompt: {prompt!r}")
    _info(f"  output: {r.choices[0].text!r}")

    _info("streamed chat completion:")
    print("      ", end="", flush=True)
    t = time.monotonic()
    n_chunks = 0
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Write a haiku about attention."}],
        max_tokens=24, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n_chunks += 1
            print(repr(chunk.choices[0].delta.content)[1:-1], end="", flush=True)
    print()
    _info(f"  ({n_chunks} streamed chunks in {time.monotonic() - t:.1f}s)")

    with urllib.request.urlopen(server.base + "/v1/models", timeout=10) as resp:
        models = json.load(resp)
    _info("GET /v1/models:")
    for m in models.get("data", []):
        _info(f"  id={m.get('id')}  max_model_len={m.get('max_model_len')}  owned_by={m.get('owned_by')}")


def _summary(out: Path, alloc_path: Path | None, png: Path | None, model: Path | None,
             server: ServerProcess | None, kept: bool, rc: int) -> None:
    _header(7, "summary")
    rows = [("allocation", alloc_path), ("heatmap", png), ("training logs", out / "train"),
            ("exported model", model), ("server log", server.log_path if server else None)]
    for label, path in rows:
        if path is not None and Path(path).exists():
            _info(f"{label + ':':16} {path}")
    if model is not None:
        _info("serve it again:")
        _info(f"  consa-vllm serve {shlex.quote(str(model))} --max-model-len {MAX_MODEL_LEN} "
              "--dtype float32 --enforce-eager --port 8000")
        _info(f"  consa-vllm show {shlex.quote(str(model))} --png allocation.png")
    if kept and server is not None and server.proc is not None:
        _info(f"server still running at {server.base}/v1 (process group {server.proc.pid}); "
              f"stop it with: kill -INT -{server.proc.pid}")
    how = "done" if rc == 0 else ("interrupted" if rc > 128 else "FAILED")
    print(f"\n{how} in {time.monotonic() - _T0:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    global _T0
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _T0 = time.monotonic()
    out = Path(args.out).resolve()
    problem = output_problem(out, "contents")
    if problem:
        print(f"{PROG}: error: --out {out}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    port = args.port or free_port()
    if args.port and http_get(f"http://127.0.0.1:{port}/health", timeout=2)[0] != 0:
        print(f"{PROG}: error: --port {port}: something already answers there; pick another port", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}: tiny model -> train allocation -> export -> serve with vLLM -> query; working in {out}")

    alloc_path = png = model = None
    server: ServerProcess | None = None
    kept = False
    rc = 0
    # SIGTERM/SIGHUP stop the demo like Ctrl-C, so the server is stopped then too.
    with signals_raise():
        try:
            base = step_model(out)
            alloc_path = step_train(out, base, args.steps, args.sparsity)
            alloc, png = step_show(out, base, alloc_path)
            model = step_export(out, base, alloc)
            server = ServerProcess(model, port, out / "server.log", args=SERVE_ARGS)
            step_serve(server)
            step_query(server, model)
            kept = args.keep_server
        except KeyboardInterrupt as e:
            name, rc = signal_of(e)
            print(f"\n{PROG}: interrupted by {name}", file=sys.stderr)
        except DemoError as e:
            print(f"\n{PROG}: error: {e}", file=sys.stderr)
            rc = 1
        except Exception as e:  # noqa: BLE001 - report, clean up, and keep the traceback for bugs
            import traceback

            traceback.print_exc()
            print(f"\n{PROG}: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
            if server is not None and server.proc is not None:
                print(f"last lines of {server.log_path}:\n{_tail(server)}", file=sys.stderr)
            rc = 1
        finally:
            if server is not None and not kept:
                if server.proc is not None and server.proc.poll() is None:
                    print("\n    stopping the server ...", flush=True)
                try:
                    server.stop()
                except KeyboardInterrupt:  # a second Ctrl-C: kill the group at once
                    server.kill()
                if server.proc is not None and server.proc.returncode is not None:
                    _info(f"server stopped (exit status {server.proc.returncode})")
    _summary(out, alloc_path, png, model, server, kept, rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
