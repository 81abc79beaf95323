"""A trained Qwen3-MoE checkpoint, made from a trained dense Qwen3 on any machine, CPU included.

The calibrated parity rule (tests/gpu_parity.py) fails on tiny random models by the random
models' own bf16 sensitivity; on a trained model it holds (benchmarks/results/
checkpoint_parity_testbed_cpu.json). Issue 11's GPU test is on Qwen3-MoE, and training one from
scratch is a lease of its own. Sparse upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling:
Training Mixture-of-Experts from Dense Checkpoints") gives one from the testbed's trained dense
model: every expert of a sparse layer starts as a copy of the dense layer's MLP, the router
starts random, and with normalised top-k weights (``norm_topk_prob``) the upcycled model computes
exactly the dense model's function. Continued pretraining with the usual load-balancing loss then
makes the experts and the routing differ::

    python -m benchmarks.testbed.upcycle_moe --model /tmp/tbmodel/pretrained --out /tmp/tbmoe \\
        --steps 120 --max-minutes 30

Every ``--sparse-step``-th layer becomes a mixture of ``--experts`` experts with top-``--top-k``
routing (``decoder_sparse_step``, as Qwen2/3-MoE configs allow; vLLM's Qwen3-MoE honours it); the
others keep their dense MLP. ``--out`` gets ``upcycled/`` (exactly the dense model),
``continued/`` (after training, bf16: the checkpoint to serve), ``corpus/`` (the text trained on,
unless ``--data`` names other text) and ``log.jsonl``. Reruns resume: training checkpoints every 10 steps, and ``--max-minutes`` stops
cleanly (exit 3: run the same command again).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used (the --help path stays light)
    import torch

#: Dense Qwen3 config fields the MoE config keeps as they are (the attention, embeddings, rotary).
KEPT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
MLP = ("gate_proj", "up_proj", "down_proj")


def moe_layers(num_layers: int, sparse_step: int) -> list[int]:
    """The layers that become mixtures: vLLM's and transformers' rule for ``decoder_sparse_step``."""
    return [i for i in range(num_layers) if (i + 1) % sparse_step == 0]


def upcycle(src: Path, dst: Path, experts: int = 4, top_k: int = 2, sparse_step: int = 2, seed: int = 0,
            router_std: float = 0.02) -> Path:
    """Write to ``dst`` a Qwen3-MoE checkpoint computing ``src``'s (dense Qwen3) function: each
    expert of a sparse layer a copy of the layer's MLP, routers drawn from N(0, ``router_std``)
    with ``seed``. Weights keep ``src``'s dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen3":
        raise ValueError(f"--model {src}: model_type {cfg.get('model_type')!r}; upcycling takes a dense "
                         "Qwen3 checkpoint (model_type 'qwen3')")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    sparse = moe_layers(cfg["num_hidden_layers"], sparse_step)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) > 4 and parts[3] == "mlp" and int(parts[2]) in sparse:
            layer, proj = int(parts[2]), parts[4]
            for e in range(experts):
                out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = t.clone()
            if proj == "gate_proj":
                router = torch.randn(experts, cfg["hidden_size"], generator=gen) * router_std
                out[f"model.layers.{layer}.mlp.gate.weight"] = router.to(t.dtype)
        else:
            out[name] = t
    moe = {k: cfg[k] for k in KEPT if k in cfg}
    moe.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", dtype=cfg.get("dtype", "bfloat16"),
               num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=cfg["intermediate_size"],
               decoder_sparse_step=sparse_step, mlp_only_layers=[], norm_topk_prob=True,
               output_router_logits=False, router_aux_loss_coef=0.001, use_sliding_window=False,
               sliding_window=None, max_window_layers=cfg["num_hidden_layers"], use_cache=False)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(moe, indent=2) + "\n")
    copy_tokenizer(src, dst)
    print(f"upcycled {src} -> {dst}: layers {sparse} with {experts} experts, top-{top_k}", flush=True)
    return dst


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer, generation config and chat template files of ``src`` into ``dst``."""
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config")) or f.suffix == ".jinja":
            shutil.copy2(f, dst / f.name)


def packed_batches(paths: list[str], tokenizer_dir: Path, seq_len: int, batch: int, seed: int):
    """``(batch_fn, sequences)``: ``batch_fn(step) -> (ids, answer_mask)`` over ``paths`` packed as the
    trainer packs its ``--data`` (:func:`~consa_vllm.train.data.load_data`), a pure function of the
    step, no answer tokens."""
    import torch
    from transformers import AutoTokenizer

    from consa_vllm.train.data import load_data

    data = load_data(paths, AutoTokenizer.from_pretrained(tokenizer_dir), seq_len, seed)

    def batch_fn(step: int):
        ids = data.micro_batch(step, 0, 1, batch)
        return ids, torch.zeros_like(ids, dtype=torch.bool)

    return batch_fn, len(data)


def heldout_rows(texts: Path, tokenizer_dir: Path, seq_len: int, sequences: int) -> "torch.Tensor":
    """The first ``sequences`` rows of ``seq_len`` tokens of ``texts`` (a held-out ``{"text": ...}``
    JSON-lines file), packed as the trainer packs its data."""
    from transformers import AutoTokenizer

    from consa_vllm.train.data import load_data

    return load_data([str(texts)], AutoTokenizer.from_pretrained(tokenizer_dir), seq_len, 0,
                     max_tokens=seq_len * sequences).sequences


def heldout_loss(model_dir: Path, rows: "torch.Tensor") -> float:
    """Mean next-token loss (float32) of ``model_dir`` on ``rows`` (:func:`heldout_rows`), by the
    eval's own ``lm_loss`` (the models are dense in attention: no window to report beyond)."""
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.eval.metrics import lm_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return lm_loss(model, rows, window=rows.shape[1])["loss"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.testbed.upcycle_moe",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="trained dense Qwen3 checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    p.add_argument("--experts", type=int, default=4, help="experts per sparse layer")
    p.add_argument("--top-k", type=int, default=2, help="experts routed per token")
    p.add_argument("--sparse-step", type=int, default=2, help="every N-th layer becomes a mixture")
    p.add_argument("--steps", type=int, default=120, help="continued-pretraining steps (0: upcycle only)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--aux-loss", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--data", nargs="+", help="training text, as the trainer's --data (default: the testbed "
                                             "corpus of this interpreter's Python sources, built in --out)")
    p.add_argument("--corpus-mb", type=float, default=24.0, help="size of that default corpus, MB")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this long (exit 3; rerun resumes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for flag, v, low in (("--experts", a.experts, 2), ("--top-k", a.top_k, 1), ("--sparse-step", a.sparse_step, 1),
                         ("--steps", a.steps, 0), ("--seq-len", a.seq_len, 16), ("--batch", a.batch, 1)):
        if v < low:
            p.error(f"{flag} must be at least {low}, got {v}")
    if a.top_k > a.experts:
        p.error(f"--top-k {a.top_k} exceeds --experts {a.experts}")
    if a.lr <= 0 or a.aux_loss < 0 or a.corpus_mb <= 0:
        p.error("--lr and --corpus-mb must be positive, --aux-loss not negative")
    if not (a.model / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there (a local HF checkpoint directory is needed)")

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.testbed.corpus import build_corpus
    from benchmarks.testbed.lm import train_lm

    up = a.out / "upcycled"
    if not (up / "config.json").exists():
        try:
            upcycle(a.model, up, a.experts, a.top_k, a.sparse_step, a.seed)
        except ValueError as e:
            sys.exit(f"upcycle_moe: {e}")
    final = a.out / "continued"
    corpus = a.out / "corpus"
    if a.steps == 0:
        return 0
    if (final / "config.json").exists():
        return summarize(a, up, final, corpus)
    paths = a.data
    if not paths:
        if not (corpus / "manifest.json").exists():
            build_corpus(corpus, int(a.corpus_mb * 1e6))
        paths = [str(corpus / "train.jsonl")]
    try:
        batch_fn, n = packed_batches(paths, up, a.seq_len, a.batch, a.seed)
    except ValueError as e:  # DataError: a missing path or too little text, in one line
        sys.exit(f"upcycle_moe: {e}")
    model = AutoModelForCausalLM.from_pretrained(up, dtype=torch.float32)
    model.config.output_router_logits = a.aux_loss > 0  # the forward then returns the balancing loss
    model.config.router_aux_loss_coef = a.aux_loss
    log_path = a.out / "log.jsonl"
    with open(log_path, "a") as log_file:
        def log(r: dict) -> None:
            log_file.write(json.dumps(r) + "\n")
            log_file.flush()
            print(json.dumps(r), flush=True)

        log({"event": "start", "steps": a.steps, "sequences": n, "seq_len": a.seq_len, "batch": a.batch})
        res = train_lm(model, batch_fn, a.steps, a.lr, warmup=min(10, a.steps), log_every=5, log=log,
                       ckpt_dir=a.out / "ckpt", ckpt_every=10,
                       max_seconds=None if a.max_minutes is None else a.max_minutes * 60)
    if not res["done"]:
        print(f"stopped at step {res['step']} of {a.steps}: run the same command again to continue", flush=True)
        return 3
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(final)
    copy_tokenizer(up, final)
    print(f"continued-trained model: {final} (last loss {res['last_loss']:.4f})", flush=True)
    return summarize(a, up, final, corpus)


def summarize(a: argparse.Namespace, up: Path, final: Path, corpus: Path) -> int:
    """``--out/summary.json``: the settings and, with the default corpus, the held-out loss of the
    upcycled model (the dense model's) and of the continued-trained one."""
    out = a.out / "summary.json"
    if out.exists():
        return 0
    summary = {"model": str(a.model), "experts": a.experts, "top_k": a.top_k, "sparse_step": a.sparse_step,
               "steps": a.steps, "seq_len": a.seq_len, "batch": a.batch, "lr": a.lr, "aux_loss": a.aux_loss,
               "data": a.data or [str(corpus / "train.jsonl")]}
    if not a.data and (corpus / "heldout.jsonl").exists():
        n = 16
        rows = heldout_rows(corpus / "heldout.jsonl", up, a.seq_len, n)
        summary["heldout"] = {"sequences": n, "seq_len": a.seq_len,
                              "loss_upcycled": heldout_loss(up, rows), "loss_continued": heldout_loss(final, rows)}
        print(f"held-out loss: upcycled (= dense) {summary['heldout']['loss_upcycled']:.4f}, continued "
              f"{summary['heldout']['loss_continued']:.4f}", flush=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"{time.time() - t0:.0f} s", flush=True)
    sys.exit(code)
