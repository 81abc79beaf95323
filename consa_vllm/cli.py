"""The ``consa-vllm`` command line.

Subcommands:

- ``show``   print an allocation (pattern, statistics, KV-cache estimate) and draw it;
- ``make``   build a rule-based allocation at an exact sparsity;
- ``import-duo`` turn DuoAttention's published per-KV-head gates into an allocation;
- ``export`` embed an allocation in a Hugging Face checkpoint that the vLLM plugin serves;
- ``train``, ``serve``, ``demo``, ``eval``: implemented by ``consa_vllm.train.__main__:cli_main``,
  ``consa_vllm.serve:main``, ``consa_vllm.demo:main`` and ``consa_vllm.eval.cli:main``, which receive
  the rest of the command line unparsed.

User errors print one line on stderr and exit with status 2 (no traceback); every output
path is checked before any work. Ctrl-C, SIGTERM and SIGHUP print one line too, and exit
with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import families
from .cli_args import EXIT_USAGE, UsageParser, int_in_range, path_arg, unit_interval, whole_number

PROG = "consa-vllm"

#: Subcommands implemented in other modules: name -> ("module", "function", help).
#: Each target is ``def main(argv: list[str] | None = None) -> int | None`` and receives
#: every argument after the subcommand name, unparsed (its own --help included).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "train": ("consa_vllm.train.__main__", "cli_main",
              "learn an allocation from a Hugging Face model and data (same as python -m consa_vllm.train)"),
    "serve": ("consa_vllm.serve", "main",
              "serve an exported ConSA checkpoint with vLLM (OpenAI-compatible API)"),
    "demo": ("consa_vllm.demo", "main",
             "end-to-end demo on an embedded default: tiny model, train, export, serve, query"),
    "eval": ("consa_vllm.eval.cli", "main",
             "evaluate a ConSA checkpoint (accuracy, long-context retrieval, KV memory)"),
}

DEFAULT_CONTEXTS = (8192, 32768, 131072)


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


# ------------------------------------------------------------------ value types


#: argparse type of a sparsity (``--sparsity``), shared with ``consa-vllm demo``.
sparsity_arg = unit_interval("the fraction of S units")


def _dtype(text: str) -> str:
    from .allocation.memory import DTYPE_BYTES

    if text.removeprefix("torch.") not in DTYPE_BYTES:
        raise argparse.ArgumentTypeError(f"unknown KV dtype {text!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return text


def _check_output(flag: str, path: str | None, kind: str = "file", force: bool | None = None,
                  others: Sequence[tuple[str, str | Path | None]] = ()) -> None:
    """Stop with one line naming ``flag`` unless ``path`` can be written (before any work).

    ``force``: False refuses an existing file (--force not given); ``others``: the command's
    inputs and other outputs, which ``path`` must not be (see :func:`consa_vllm.outputs.output_problem`).
    """
    from .outputs import output_problem

    problem = output_problem(path, kind, force=force, others=others) if path else None
    if problem:
        raise UserError(f"{flag} {path}: {problem}")


def _config_of(model_dir: str | None) -> Path | None:
    """The file a ``--model DIR`` flag makes a command read (an output must not replace it)."""
    return Path(model_dir) / "config.json" if model_dir else None


def _warn_if_full(alloc, model_dir: str | None, command: str) -> None:
    """Print export's warning when the S heads of ``alloc`` would see every position of the model."""
    if not model_dir:
        return
    from .allocation.format import read_json_object
    from .export import covers_every_position

    config = _config_of(model_dir)
    warning = covers_every_position(alloc, read_json_object(config, UserError), str(config))
    if warning:
        print(f"{PROG} {command}: warning: {warning}", file=sys.stderr)


# ------------------------------------------------------------------ commands


def _load_allocation_arg(path: str):
    """An allocation file, or an exported checkpoint directory (its config.json 'consa')."""
    from .allocation import Allocation

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        from .export import read_exported_allocation

        return read_exported_allocation(p), p
    return Allocation.load(p), None


def cmd_show(args: argparse.Namespace) -> int:
    from .allocation import estimate_kv, render_text, summarize
    from .allocation.stats import describe_sliding

    source = Path(args.allocation)
    _check_output("--png", args.png, force=args.force, others=[
        ("ALLOC", source / "config.json" if source.is_dir() else source), ("--model", _config_of(args.model))])
    alloc, model_dir = _load_allocation_arg(args.allocation)
    model_dir = Path(args.model) if args.model else model_dir
    if args.context and model_dir is None:
        raise UserError("--context needs --model DIR (the estimate needs head_dim and the KV head count), "
                        "or pass an exported checkpoint directory instead of ALLOC.json")
    shape = None
    if model_dir is not None:  # check the shape before printing anything
        shape = _shape(model_dir)
        try:
            alloc.check_model(shape.num_layers, shape.num_kv_heads, source=args.allocation)
        except ValueError as e:
            raise UserError(f"{e} (model: {model_dir / 'config.json'})") from None
    tp = _tensor_parallel(alloc, args.tensor_parallel_size) if args.tensor_parallel_size else None
    s = summarize(alloc)
    if args.json:
        out = {"allocation": alloc.to_dict(), "summary": s}
        if tp is not None:
            out["tensor_parallel"] = tp
    else:
        print(render_text(alloc))
        print()
        print(f"units: {s['num_units']} ({alloc.granularity})   "
              f"F KV heads: {s['full_kv_heads']}   S KV heads: {s['sliding_kv_heads']}   "
              f"sparsity: {s['sparsity']:.4f}")
        print(f"all-S layers: {_ranges(s['all_sliding_layers'])}   all-F layers: {_ranges(s['all_full_layers'])}")
        print(f"S heads: {describe_sliding(alloc)}")
        extra = {k: v for k, v in alloc.to_dict().items()
                 if k not in ("consa_version", "granularity", "window", "sink", "pattern")}
        for k, v in extra.items():
            text = json.dumps(v)
            print(f"{k}: {text if len(text) <= 100 else text[:97] + '...'}")

    if tp is not None and not args.json:
        print()
        if tp["granularity"] == "layer":
            print(f"tensor parallelism ({tp['size']} ranks): {tp['note']}")
        else:
            shared = (f", each KV head replicated on {tp['size'] // tp['kv_shards']} ranks"
                      if tp["kv_shards"] < tp["size"] else "")
            print(f"tensor parallelism ({tp['size']} ranks): {tp['kv_heads_per_rank']} KV head(s) per layer per "
                  f"rank{shared}; every rank's pools: {tp['full_pool_heads']} F + {tp['sliding_pool_heads']} S "
                  "head slots")
            for r in tp["ranks"]:
                print(f"  rank {r['rank']:>3}: {r['full_used']} F + {r['sliding_used']} S heads used")
            print(f"  {tp['note']}")

    if shape is not None:
        contexts = args.context or list(DEFAULT_CONTEXTS)
        rows = [estimate_kv(alloc, shape, n, dtype=args.dtype, block_size=args.block_size) for n in contexts]
        if args.json:
            out["kv_estimate"] = {
                "model": str(model_dir), "dtype": args.dtype, "block_size": args.block_size,
                "head_dim": shape.head_dim,
                "per_context": [{"context": r.context, "bytes_per_sequence": r.bytes_per_sequence,
                                 "dense_bytes_per_sequence": r.dense_bytes_per_sequence,
                                 "ratio_to_dense": r.ratio_to_dense} for r in rows],
            }
        else:
            blk = f", block_size {args.block_size}" if args.block_size else ""
            print()
            print(f"KV cache per sequence ({model_dir}: {shape.num_layers} layers x {shape.num_kv_heads} KV heads "
                  f"x head_dim {shape.head_dim}, {args.dtype}{blk}):")
            print(f"  {'context':>9}  {'ConSA':>11}  {'dense':>11}  {'ratio':>6}  {'seqs that fit':>13}")
            for r in rows:
                print(f"  {r.context:>9}  {format_bytes(r.bytes_per_sequence):>11}"
                      f"  {format_bytes(r.dense_bytes_per_sequence):>11}"
                      f"  {r.ratio_to_dense:>6.3f}  {r.capacity_gain:>12.2f}x")

    if args.json:
        print(json.dumps(out, indent=2))
    if args.png:
        from .allocation.plot import plot_allocation

        png = plot_allocation(alloc, args.png, title=args.title or Path(args.allocation).name)
        print(f"wrote {png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _tensor_parallel(alloc, size: int) -> dict:
    """How the plugin splits ``alloc`` over ``size`` tensor-parallel ranks, as it will at start-up
    (consa_vllm.plugin.layout): per-rank pools, heads used, and its balancing note."""
    if alloc.granularity == "layer":
        return {"size": size, "granularity": "layer",
                "note": "layer allocation: stock vLLM attention per layer, split over ranks as stock vLLM does"}
    from .plugin.layout import PoolLayout, balance_summary, kv_shards

    try:
        shards = kv_shards(alloc.num_kv_heads, size)
    except ValueError as e:
        raise UserError(f"--tensor-parallel-size {size}: {e}") from None
    ranks = [PoolLayout.build(alloc, size, r) for r in range(size)]
    return {"size": size, "granularity": "kv_head", "kv_shards": shards,
            "kv_heads_per_rank": ranks[0].kv_heads_per_rank,
            "full_pool_heads": ranks[0].full_pool_heads, "sliding_pool_heads": ranks[0].sliding_pool_heads,
            "ranks": [{"rank": p.tp_rank, "full_used": p.full_used, "sliding_used": p.sliding_used} for p in ranks],
            "note": balance_summary(alloc, size) or "no KV head moves between ranks and no pool slot is unused"}


def cmd_make(args: argparse.Namespace) -> int:
    from .allocation import make_allocation, render_text

    out = Path(args.out)
    model_config = ("--model", _config_of(args.model))
    _check_output("--out", args.out, force=args.force, others=[model_config])
    # before the JSON is written: both or neither
    _check_output("--png", args.png, force=args.force, others=[("--out", args.out), model_config])
    if args.model:
        if args.layers is not None or args.kv_heads is not None:
            raise UserError("give either --model DIR or --layers L --kv-heads H, not both")
        shape = _shape(args.model)
        layers, kv_heads = shape.num_layers, shape.num_kv_heads
    else:
        if args.layers is None or args.kv_heads is None:
            missing = "--layers" if args.layers is None else "--kv-heads"
            raise UserError(f"{missing} is required without --model DIR (the model shape is needed)")
        layers, kv_heads = args.layers, args.kv_heads
    try:
        alloc = make_allocation(args.rule, args.sparsity, layers, kv_heads, args.window,
                                granularity=args.granularity, seed=args.seed, sink=args.sink)
    except ValueError as e:
        flag = "--rule" if "rule" in str(e) else "--sparsity"
        raise UserError(f"{flag}: {e}") from None
    if args.model:
        _warn_if_full(alloc, args.model, "make")
        alloc = alloc.with_extra(model=str(args.model))
    try:
        alloc.save(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror})") from None
    print(render_text(alloc))
    print(f"wrote {out}")
    if args.png:
        from .allocation.plot import plot_allocation

        title = f"rule '{args.rule}'" + (f" ({Path(args.model).name})" if args.model else "")
        print(f"wrote {plot_allocation(alloc, args.png, title=title)}")
    return 0


def cmd_import_duo(args: argparse.Namespace) -> int:
    from .allocation import render_text
    from .allocation.duo import DUO_TSV, import_duo

    out = Path(args.out)
    source = Path(args.path)
    inputs = [("PATH", source / DUO_TSV if source.is_dir() else source), ("--model", _config_of(args.model))]
    # The checks of make, all before anything is written: both files or neither.
    _check_output("--out", args.out, force=args.force, others=inputs)
    _check_output("--png", args.png, force=args.force, others=[("--out", args.out), *inputs])
    shape = _shape(args.model) if args.model else None
    try:
        alloc = import_duo(args.path, args.sparsity, args.window, args.sink, args.constraint)
    except ValueError as e:  # AllocationError names the file; a sparsity the rule cannot meet names none
        from .allocation import AllocationError

        if isinstance(e, AllocationError):
            raise
        raise UserError(f"--sparsity: {e}") from None
    if shape is not None:
        try:
            alloc.check_model(shape.num_layers, shape.num_kv_heads, source=args.path)
        except ValueError as e:
            raise UserError(f"{e} (model: {Path(args.model) / 'config.json'})") from None
        _warn_if_full(alloc, args.model, "import-duo")
        alloc = alloc.with_extra(model=str(args.model))
    try:
        alloc.save(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror})") from None
    print(render_text(alloc))
    print(f"wrote {out}")
    if args.png:
        from .allocation.plot import plot_allocation

        title = f"DuoAttention {alloc.model_extra['duo_attention']['file']}"
        print(f"wrote {plot_allocation(alloc, args.png, title=title)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .allocation import Allocation
    from .export import (DestinationError, ExportInterrupted, export_model, public_provenance,
                         read_exported_allocation)

    out = Path(args.out)
    _check_output("--out", args.out, "folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A signal can land between a file's open() and its `with` (the copy's temporary file);
        # the file is then closed when collected and the interrupt's cleanup removes it. Python
        # hides such ResourceWarnings by default, and they tell the user nothing.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            dst = export_model(args.model, args.allocation, out, link=not args.copy, force=args.force,
                               keep_paths=args.keep_paths)
        except DestinationError as e:  # its message starts with the path: name the flag too
            raise UserError(f"--out {e}") from None
        except OSError as e:  # name the user's path, never the temporary copy
            state = "it is unchanged" if out.exists() else "nothing was created"
            if e.filename and Path(args.model).resolve() in Path(e.filename).resolve().parents:
                raise UserError(f"--model {args.model}: cannot read {e.filename} ({e.strerror}); {state}") from None
            raise UserError(f"--out {out}: writing the export failed ({e.strerror}); {state}") from None
        except ExportInterrupted as e:
            raise _Interrupted(str(e), e.__cause__) from None
        finally:  # also when it failed: a warning may say what happened before (a restored --out)
            _print_warnings(caught)
    dropped = [] if args.keep_paths else public_provenance(Allocation.load(args.allocation).to_dict())[1]
    alloc = read_exported_allocation(dst)
    base = alloc.to_dict().get("base_architecture", "?")
    how = "copied" if args.copy else "hard-linked (copied where linking is impossible)"
    print(f"wrote {dst}: architecture Consa{base}, {alloc.num_layers} layers x {alloc.num_kv_heads} KV heads, "
          f"sparsity {alloc.sparsity:.4f}, window {alloc.window}; weights {how}")
    if dropped:
        print(f"left out of config.json (machine paths): {', '.join(dropped)}; --keep-paths keeps them")
    return 0


def _print_warnings(caught) -> None:
    for w in caught:
        print(f"{PROG} export: warning: {' '.join(str(w.message).split())}", file=sys.stderr)


class _Interrupted(Exception):
    """A command stopped by a signal: one line, exit status 128 + the signal number."""

    def __init__(self, message: str, cause: BaseException | None):
        from .outputs import signal_of

        name, self.status = signal_of(cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt())
        super().__init__(f"interrupted by {name}; {message}")


def _delegate(name: str, argv: list[str]) -> int:
    # Imported only now: each command's module pulls in what it needs (vLLM, torch) itself.
    module_name, func, _ = DELEGATED[name]
    rc = getattr(importlib.import_module(module_name), func)(argv)
    return int(rc or 0)


# ------------------------------------------------------------------ helpers


def _shape(model_dir):
    from .allocation import ModelShape

    try:
        return ModelShape.from_model_dir(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--model: {e}") from None


def _ranges(xs: Sequence[int]) -> str:
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in list(xs[1:]) + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.50 KiB`` ... ``2.00 TiB`` (shared with ``consa-vllm demo``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from .allocation.format import MAX_KV_HEADS, MAX_LAYERS, MAX_TOKENS
    from .allocation.rules import RULES

    sink = int_in_range(0, "tokens", hi=MAX_TOKENS)

    fmt = argparse.RawDescriptionHelpFormatter
    p = UsageParser(prog=PROG, formatter_class=fmt, description=(
        "ConSA: learned per-KV-head full (F) / sliding-window (S) attention allocations. Train one "
        "(`consa-vllm train`), inspect it, build rule-based baselines, export a checkpoint for the vLLM "
        "plugin, serve and evaluate it."),
        epilog="Run `consa-vllm COMMAND --help` for the options of each command.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageParser)

    # ---- show
    s = sub.add_parser("show", formatter_class=fmt, help="print an allocation's pattern, statistics and KV estimate",
                       description="Print an allocation's pattern and statistics; with --model, the KV-cache "
                                   "bytes per sequence and the ratio to the dense model; with --png, draw the "
                                   "layers x KV heads heatmap.",
                       epilog="examples:\n  consa-vllm show alloc.json --png alloc.png\n"
                              "  consa-vllm show alloc.json --model ./Qwen3-0.6B --context 4096 32768 --dtype bf16\n"
                              "  consa-vllm show ./exported-checkpoint   (reads config.json's 'consa' field)\n"
                              "  consa-vllm show alloc.json --tensor-parallel-size 8")
    s.add_argument("allocation", metavar="ALLOC", type=path_arg,
                   help="allocation JSON file, or an exported ConSA checkpoint directory")
    s.add_argument("--png", metavar="OUT.png", type=path_arg, help="also draw the heatmap to this PNG file")
    s.add_argument("--force", action="store_true", help="overwrite --png if it exists")
    s.add_argument("--title", help="title of the heatmap (default: the file name)")
    s.add_argument("--model", metavar="DIR", type=path_arg,
                   help="Hugging Face model directory whose config.json gives the shape "
                                                  "for the KV estimate (default: ALLOC itself when it is a checkpoint)")
    s.add_argument("--context", metavar="N", nargs="+", type=int_in_range(1, "tokens", hi=MAX_TOKENS),
                   help=f"context lengths for the KV estimate (default: {' '.join(map(str, DEFAULT_CONTEXTS))})")
    from .allocation.memory import DTYPE_BYTES

    s.add_argument("--dtype", type=_dtype, default="bfloat16",
                   help=f"KV cache dtype, one of: {', '.join(DTYPE_BYTES)} (default: bfloat16)")
    s.add_argument("--block-size", metavar="B", type=int_in_range(1, "tokens", hi=MAX_TOKENS),
                   help="count whole paged KV blocks of B tokens, as vLLM allocates them (default: exact tokens)")
    s.add_argument("--tensor-parallel-size", metavar="N", type=int_in_range(1, "ranks"),
                   help="also show how the plugin splits a kv_head allocation over N tensor-parallel ranks: "
                        "KV heads per rank, pool slots, heads moved and unused slots (what `vllm serve "
                        "--tensor-parallel-size N` logs at start)")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    s.set_defaults(func=cmd_show)

    # ---- make
    m = sub.add_parser("make", formatter_class=fmt, help="build a rule-based allocation at an exact sparsity",
                       description="Build a rule-based (baseline) allocation whose sparsity is exactly --sparsity, "
                                   "and write it atomically to --out.\n\nrules:\n"
                                   "  bottom      S in the lowest layers/units (Qwen max_window_layers style)\n"
                                   "  top         S in the highest layers/units\n"
                                   "  middle      F is one contiguous block in the middle\n"
                                   "  interleave  evenly spaced F units (Gemma / gpt-oss style)\n"
                                   "  random      seeded random choice (--seed)\n"
                                   "  uniform     kv_head only: the same number of F heads in every layer (--seed)",
                       epilog="example:\n  consa-vllm make --rule bottom --sparsity 0.75 --granularity kv_head "
                              "--layers 28 --kv-heads 8 --window 4096 --out a.json --png a.png")
    m.add_argument("--rule", required=True, choices=RULES, help="which units become S")
    m.add_argument("--sparsity", required=True, type=sparsity_arg, metavar="RHO",
                   help="fraction of units that are S, in [0, 1]; must be exact for the unit count")
    m.add_argument("--granularity", choices=("kv_head", "layer"), default="kv_head",
                   help="unit: one KV head with its query group, or a whole layer (default: kv_head)")
    m.add_argument("--model", metavar="DIR", type=path_arg, help="take the shape from DIR/config.json")
    m.add_argument("--layers", type=int_in_range(1, "layers", hi=MAX_LAYERS), metavar="L",
                   help="number of layers (without --model)")
    m.add_argument("--kv-heads", type=int_in_range(1, "KV heads", hi=MAX_KV_HEADS), metavar="H",
                   help="KV heads per layer (without --model)")
    m.add_argument("--window", required=True, type=int_in_range(1, "tokens", hi=MAX_TOKENS), metavar="W",
                   help="sliding window in tokens: query i sees keys i-W+1..i")
    m.add_argument("--sink", type=sink, default=0, metavar="N",
                   help="attention-sink tokens: S heads also see keys 0..N-1 (default: 0, a plain window)")
    m.add_argument("--seed", type=whole_number("a seed"), default=0, help="seed for 'random' and 'uniform' (default: 0)")
    m.add_argument("--out", required=True, metavar="A.json", type=path_arg, help="allocation file to write")
    m.add_argument("--force", action="store_true", help="overwrite --out and --png if they exist")
    m.add_argument("--png", metavar="OUT.png", type=path_arg, help="also draw the heatmap")
    m.set_defaults(func=cmd_make)

    # ---- import-duo
    d = sub.add_parser("import-duo", formatter_class=fmt,
                       help="turn DuoAttention's published per-KV-head gates into an allocation",
                       description="Read DuoAttention's full_attention_heads.tsv (one line per layer, one "
                                   "tab-separated gate in [0, 1] per KV head, high = keep full attention) and "
                                   "write a kv_head allocation whose S heads are those with the lowest gates.\n\n"
                                   "  global     exactly round(S x heads) heads are S; ties broken by "
                                   "(gate, layer, head)\n"
                                   "  per-layer  S x heads_per_layer heads in every layer (must be whole); "
                                   "ties by head\n\n"
                                   "DuoAttention's streaming heads attend to sink tokens plus a recent window: "
                                   "give both (its README deploys sink 64, recent 256). The gates, the file "
                                   "name and the settings are kept in the file's 'duo_attention' field.",
                       epilog="example:\n  consa-vllm import-duo duo-attention/Meta-Llama-3.1-8B-Instruct "
                              "--sparsity 0.5 --window 256 --sink 64 --out llama31-duo-0.5.json")
    d.add_argument("path", metavar="PATH", type=path_arg,
                   help="a DuoAttention pattern folder, or its full_attention_heads.tsv")
    d.add_argument("--sparsity", required=True, type=sparsity_arg, metavar="S",
                   help="fraction of KV heads that become S (streaming), in [0, 1]")
    d.add_argument("--window", required=True, type=int_in_range(1, "tokens", hi=MAX_TOKENS), metavar="W",
                   help="recent window of the S heads: query i sees keys i-W+1..i")
    d.add_argument("--sink", required=True, type=sink, metavar="N",
                   help="attention-sink tokens of the S heads: they also see keys 0..N-1")
    d.add_argument("--constraint", choices=("global", "per-layer"), default="global",
                   help="one count over all heads, or the same count in every layer (default: global)")
    d.add_argument("--model", metavar="DIR", type=path_arg, help="check the pattern's shape against DIR/config.json "
                                                  "(num_hidden_layers, num_key_value_heads)")
    d.add_argument("--out", required=True, metavar="A.json", type=path_arg, help="allocation file to write")
    d.add_argument("--force", action="store_true", help="overwrite --out and --png if they exist")
    d.add_argument("--png", metavar="OUT.png", type=path_arg, help="also draw the heatmap")
    d.set_defaults(func=cmd_import_duo)

    # ---- export
    e = sub.add_parser("export", formatter_class=fmt, help="write a checkpoint that the vLLM plugin serves",
                       description="Copy a Hugging Face checkpoint (one of: " + families.supported_summary()
                                   + "; or an already exported ConSA checkpoint) to --out with the allocation embedded in "
                                   "config.json (field 'consa') and the architecture renamed to Consa<Original>. "
                                   "Weights are hard-linked by default, tokenizer files copied. --out is built "
                                   "in a temporary directory and renamed into place, so it is never half-written.",
                       epilog="example:\n  consa-vllm export --model ./tiny --allocation a.json --out ./tiny-consa\n"
                              "  consa-vllm serve ./tiny-consa   # checks it, then runs vLLM's server (CPU and GPU)")
    e.add_argument("--model", required=True, metavar="SRC", type=path_arg, help="source Hugging Face model directory")
    e.add_argument("--allocation", required=True, metavar="A.json", type=path_arg,
                   help="allocation file matching the model's shape")
    e.add_argument("--out", required=True, metavar="DST", type=path_arg, help="directory to create")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--link", action="store_true",
                     help="hard-link the weight files, copying where the filesystem cannot link (default)")
    how.add_argument("--copy", action="store_true", help="copy the weight files")
    e.add_argument("--force", action="store_true",
                   help="replace DST if it exists (the swap is atomic); only an earlier export or model checkpoint "
                        "(a folder with config.json) or an empty folder is replaced")
    e.add_argument("--keep-paths", action="store_true",
                   help="keep the machine paths of the allocation's provenance (the trainer's model, data and "
                        "log folders) in config.json; by default they are left out, as the checkpoint and "
                        "/v1/consa/allocation show them to everyone")
    e.set_defaults(func=cmd_export)

    # ---- commands implemented in other modules
    for name, (module, func, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False,
                           description=f"{help_text}. Arguments are passed to {module}:{func}.")
        d.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Delegated commands get their arguments untouched (their own --help included).
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except _Interrupted as e:
        print(f"{PROG} {argv[0]}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM inside export) anywhere else: nothing to clean up
        from .outputs import signal_of

        name, status = signal_of(e)
        cmd = f" {argv[0]}" if argv and argv[0] in _COMMANDS else ""
        print(f"{PROG}{cmd}: interrupted by {name}", file=sys.stderr)
        return status
    except Exception as e:
        if not _is_user_error(e):
            raise
        cmd = f" {argv[0]}" if argv and argv[0] in _COMMANDS else ""
        print(f"{PROG}{cmd}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


_COMMANDS = ("show", "make", "import-duo", "export", *DELEGATED)


def _is_user_error(e: BaseException) -> bool:
    """Errors caused by the command line or its input files (not bugs): no traceback for these."""
    from .allocation import AllocationError
    from .export import ExportError

    if isinstance(e, (UserError, AllocationError, ExportError)):
        return True
    # Missing/unreadable files named on the command line.
    return isinstance(e, OSError) and e.filename is not None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())

if __name__ == "__main__":
    sys.exit(main())
