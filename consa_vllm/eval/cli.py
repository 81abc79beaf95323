"""``consa-vllm eval``: held-out loss, long-context retrieval and KV footprint of a model + allocation.

Everything the command line names is checked first (files, shapes, the allocation against
the model); a mistake prints one line naming the flag or file and exits with status 2,
before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from consa_vllm import families
from consa_vllm.cli_args import (EXIT_USAGE, UsageParser, device_problem, int_in_range, path_arg, unit_interval,
                                 whole_number)

#: The command's name in its messages: ``consa-vllm eval`` (the README's), or
#: ``python -m consa_vllm.eval`` when run that way, as the trainer does.
PROG = "consa-vllm eval"


class EvalError(Exception):
    """A bad argument or input file; the message names it."""


class EvalReport(BaseModel):
    """The JSON that ``consa-vllm eval`` writes (extra keys allowed for callers' provenance)."""

    model_config = ConfigDict(extra="allow")

    model: str
    backend: str  # "reference" (HF + consa attention) or "served"
    allocation: dict[str, Any] | None
    window: int
    sink: int = 0  # attention-sink tokens of the S heads (the allocation's; 0 for dense)
    sparsity: float
    loss: dict[str, Any] | None
    retrieval: dict[str, Any] | None
    kv: list[dict[str, Any]]
    seconds: float


_positive = int_in_range(1, "tokens or items")
_depth = unit_interval("0: needle at the start, 1: just before the query")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``consa-vllm eval`` (``prog``: the name its usage and errors give)."""
    from .tasks import PRESETS

    p = UsageParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Evaluate a Hugging Face causal LM with a ConSA allocation (or dense): held-out LM loss, overall and "
        "by how far each token's context reaches beyond the sliding window; passkey and key-value retrieval "
        "accuracy at several context lengths and needle depths; KV-cache bytes per sequence from the "
        "estimator. By default the model runs on the reference hybrid attention (HF transformers); with "
        "--served-url the same prompts go, as token ids, to a vLLM server's completions API. The report is "
        "JSON, on stdout or in --out."),
        epilog="examples:\n"
               f"  {prog} --model ./ckpt --allocation a.json --data heldout/ --contexts 1024 2048\n"
               f"  {prog} --model ./exported      (the allocation embedded in config.json)\n"
               f"  {prog} --model ./ckpt --window 256          (dense, window only sets the buckets)\n"
               f"  {prog} --model ./exported --served-url http://127.0.0.1:8000")
    p.add_argument("--model", required=True, type=path_arg, metavar="DIR",
                   help="Hugging Face model directory (its tokenizer builds the prompts); an exported ConSA "
                        "checkpoint brings its allocation")
    p.add_argument("--allocation", type=path_arg, metavar="A.json",
                   help="allocation file (default: the one embedded in DIR/config.json, else dense)")
    p.add_argument("--window", type=_positive, metavar="W",
                   help="window of a dense evaluation (buckets, beyond-window flags); with an allocation it "
                        "must equal the allocation's window")
    p.add_argument("--data", nargs="+", type=path_arg, metavar="PATH",
                   help="held-out text files/folders (as the trainer reads them): LM loss, and filler for the "
                        "retrieval prompts (default: no loss; the classic passkey filler sentences)")
    p.add_argument("--text-field", default="text", help="key holding the text in jsonl/parquet --data")
    p.add_argument("--tasks", nargs="+", choices=sorted(PRESETS), default=["passkey", "kv"],
                   help="retrieval tasks (passkey: one pass key in filler; kv: Python assignments with "
                        "distractors, queried by an assert) (default: passkey kv)")
    p.add_argument("--contexts", nargs="+", type=_positive, metavar="N",
                   help="retrieval prompt lengths in tokens (default: 2W and 4W, within the model's "
                        "max_position_embeddings)")
    p.add_argument("--depths", nargs="+", type=_depth, default=[0.0, 0.25, 0.5], metavar="D",
                   help="needle depths in [0, 1] (default: 0 0.25 0.5)")
    p.add_argument("--samples", type=_positive, default=20, metavar="K",
                   help="prompts per task x context x depth (default: 20)")
    p.add_argument("--loss-seq-len", type=_positive, metavar="T",
                   help="tokens per loss sequence (default: the largest context)")
    p.add_argument("--loss-sequences", type=_positive, default=16, metavar="N",
                   help="loss sequences read from --data (default: 16)")
    p.add_argument("--kv-contexts", nargs="+", type=_positive, metavar="N",
                   help="context lengths of the KV estimate (default: --contexts)")
    p.add_argument("--seed", type=whole_number("a seed"), default=1234,
                   help="seed of the retrieval prompts (default: 1234)")
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (reference backend; default: auto, a GPU when there is one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model dtype (reference backend; default: float32)")
    p.add_argument("--served-url", metavar="URL",
                   help="evaluate the model served at URL (vLLM OpenAI API) instead of the reference")
    p.add_argument("--served-model", metavar="NAME", help="model name on the server (default: its first model)")
    p.add_argument("--out", type=path_arg, metavar="FILE.json", help="write the report here (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


# ------------------------------------------------------------------ checks (cheap, no torch)


def resolve(args: argparse.Namespace):
    """Check the arguments; return (allocation or None, window, ModelShape). Raises :class:`EvalError`."""
    from consa_vllm.allocation import Allocation, AllocationError, ModelShape

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise EvalError(f"--model {model}: no config.json (expected a Hugging Face model directory)")
    if not any((model / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EvalError(f"--model {model}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        shape = ModelShape.from_model_dir(model)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"--model {model}: {e}") from None
    model_type = json.loads((model / "config.json").read_text()).get("model_type")
    try:  # the family the reference attention patches (after the model loads, else)
        families.by_model_type(model_type, where=str(model / "config.json"))
    except families.UnsupportedFamilyError as e:
        raise EvalError(f"--model {e}") from None
    alloc = None
    if args.allocation:
        try:
            alloc = Allocation.load(args.allocation)
        except OSError as e:
            raise EvalError(f"--allocation {args.allocation}: {e.strerror or e}") from None
        except AllocationError as e:
            raise EvalError(f"--allocation {e}") from None
    else:
        conf = json.loads((model / "config.json").read_text())
        if isinstance(conf, dict) and "consa" in conf:
            from consa_vllm.export import read_exported_allocation

            try:
                alloc = read_exported_allocation(model)
            except Exception as e:
                raise EvalError(f"--model {model / 'config.json'}: {' '.join(str(e).split())}") from None
    if alloc is not None:
        try:
            alloc.check_model(shape.num_layers, shape.num_kv_heads, source=args.allocation or model / "config.json")
        except ValueError as e:
            raise EvalError(f"--allocation {' '.join(str(e).split())} (model: {model / 'config.json'})") from None
        if args.window is not None and args.window != alloc.window:
            raise EvalError(f"--window {args.window} differs from the allocation's window {alloc.window}")
        window = alloc.window
    elif args.window is None:
        raise EvalError("--window is required without an allocation (a dense model has no window of its own)")
    else:
        window = args.window
    max_pos = int(json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 0)
    if args.contexts is None:
        args.contexts = [c for c in (2 * window, 4 * window) if not max_pos or c <= max_pos] or [max_pos]
    for c in args.contexts:
        if max_pos and c > max_pos:
            raise EvalError(f"--contexts {c} exceeds the model's max_position_embeddings {max_pos}")
    if args.loss_seq_len is not None and max_pos and args.loss_seq_len > max_pos:
        raise EvalError(f"--loss-seq-len {args.loss_seq_len} exceeds the model's max_position_embeddings {max_pos}")
    if args.data:
        for d in args.data:
            if not Path(d).exists():
                raise EvalError(f"--data {d}: no such file or directory")
    if args.out:  # checked now: the report must not be lost after the evaluation, nor overwrite an input
        from consa_vllm.outputs import output_problem

        data = [("--data", d) for d in args.data or ()]
        problem = output_problem(args.out, "file", force=args.force, read_folders=data,
                                 others=[("--model", args.model), ("--allocation", args.allocation), *data])
        if problem:
            raise EvalError(f"--out {args.out}: {problem}")
    if args.served_model and not args.served_url:
        raise EvalError("--served-model needs --served-url")
    if args.served_url and not args.served_url.startswith(("http://", "https://")):
        raise EvalError(f"--served-url {args.served_url}: expected an http:// or https:// URL")
    if not args.served_url:  # the reference backend runs on --device: one that exists here
        problem = device_problem(args.device)
        if problem:
            raise EvalError(problem)
    return alloc, window, shape


# ------------------------------------------------------------------ run


def load_reference(model_dir: str | Path, alloc, window: int, device: str = "auto", dtype: str = "float32"):
    """The HF model patched with the reference hybrid attention (all-F when ``alloc`` is None).

    The S heads take the allocation's sink (``patch_model``'s default)."""
    import torch

    from consa_vllm.reference import patch_model
    from consa_vllm.train.loop import load_causal_lm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_dir, dtype, device)  # unreadable weights: one line naming --model
    patch_model(model, window=window, allocation=alloc)
    return model


def read_loss_sequences(paths: Sequence[str], tokenizer, seq_len: int, n: int, text_field: str = "text"):
    """The first ``n`` packed sequences of ``seq_len`` tokens of ``paths`` (the trainer's reader and packer)."""
    from consa_vllm.train.config import DataError
    from consa_vllm.train.data import iter_documents, list_sources, tokenize_and_pack

    seqs = tokenize_and_pack(iter_documents(list_sources(list(paths)), text_field), tokenizer, seq_len,
                             max_tokens=seq_len * n)
    if seqs.shape[0] == 0:
        raise DataError(f"--data {' '.join(paths)}: not enough text for one loss sequence of {seq_len} tokens")
    return seqs


def evaluate(model_dir: str | Path, alloc, window: int, *, data: Sequence[str] | None = None,
             tasks: Sequence[str] = ("passkey", "kv"), contexts: Sequence[int], depths: Sequence[float],
             samples: int = 20, loss_seq_len: int | None = None, loss_sequences: int = 16,
             kv_contexts: Sequence[int] | None = None, seed: int = 1234, batch_size: int = 8,
             device: str = "auto", dtype: str = "float32", text_field: str = "text",
             served_url: str | None = None, served_model: str | None = None, model=None) -> EvalReport:
    """Run every metric and return the report. ``model``: an already patched HF model to reuse."""
    from transformers import AutoTokenizer

    from consa_vllm.allocation import ModelShape, estimate_kv

    from . import metrics
    from .tasks import PRESETS, Filler, make_samples

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.model_max_length = int(1e30)
    shape = ModelShape.from_model_dir(model_dir)
    loss_seqs = None
    filler_texts = None
    if data:
        from consa_vllm.train.data import iter_documents, list_sources

        loss_seqs = read_loss_sequences(data, tokenizer, loss_seq_len or max(contexts), loss_sequences, text_field)
        filler_texts = []
        for doc in iter_documents(list_sources(list(data)), text_field):
            filler_texts.append(doc)
            if sum(map(len, filler_texts)) > 8 * max(contexts) * 8:  # ~8 tokens' worth of chars is plenty
                break
    filler = Filler(tokenizer, filler_texts, min_tokens=max(contexts))
    try:
        prompts = make_samples([PRESETS[t] for t in tasks], tokenizer, filler, contexts, depths, samples, seed,
                               window, sink=alloc.sink if alloc is not None else 0)
    except ValueError as e:  # a context too short for the needle and query
        raise EvalError(f"--contexts: {e}") from None

    if served_url:
        from .vllm_client import ServedModel

        served = ServedModel(served_url, served_model)
        correct = served.score_retrieval(prompts)
        loss = served.lm_loss(loss_seqs, window) if loss_seqs is not None else None
        backend = "served"
    else:
        model = model if model is not None else load_reference(model_dir, alloc, window, device, dtype)
        correct = metrics.score_retrieval(model, prompts, batch_size)
        loss = metrics.lm_loss(model, loss_seqs, window, batch_size) if loss_seqs is not None else None
        backend = "reference"

    kv = []
    if alloc is not None:
        for c in (kv_contexts or contexts):
            e = estimate_kv(alloc, shape, c, dtype="bfloat16")
            kv.append({"context": c, "bytes_per_sequence": e.bytes_per_sequence,
                       "dense_bytes_per_sequence": e.dense_bytes_per_sequence, "ratio_to_dense": e.ratio_to_dense})
    return EvalReport(model=str(model_dir), backend=backend, allocation=alloc.to_dict() if alloc else None,
                      window=window, sink=alloc.sink if alloc else 0, sparsity=alloc.sparsity if alloc else 0.0, loss=loss,
                      retrieval=metrics.summarize_retrieval(prompts, correct), kv=kv, seconds=time.time() - t0)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``consa-vllm eval`` (``python -m consa_vllm.eval`` passes its own ``prog``)."""
    args = build_parser(prog).parse_args(argv)
    from consa_vllm.train.config import ConfigError, DataError  # no torch: config.py is light

    from .vllm_client import ServedModelError  # openai is imported only when a server is used

    try:
        alloc, window, _ = resolve(args)
        report = evaluate(args.model, alloc, window, data=args.data, tasks=args.tasks, contexts=args.contexts,
                          depths=args.depths, samples=args.samples, loss_seq_len=args.loss_seq_len,
                          loss_sequences=args.loss_sequences, kv_contexts=args.kv_contexts, seed=args.seed,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          text_field=args.text_field, served_url=args.served_url, served_model=args.served_model)
    except (EvalError, ServedModelError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ConfigError) as e:  # unreadable --data or weights: the trainer's readers name the file
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    text = report.model_dump_json(indent=2)
    if args.out:
        from consa_vllm.allocation import atomic_write_text

        try:
            atomic_write_text(Path(args.out), text + "\n")
        except OSError as e:  # e.g. the disk filled up during the run: keep the report
            print(text)
            print(f"{prog}: error: --out {args.out}: cannot write it ({e.strerror}); the report is on stdout",
                  file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
