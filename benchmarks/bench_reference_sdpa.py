"""Why does the reference attention run uneven kv_head allocations several times slower on a GPU?

Testbed v2's masks-only eval (benchmarks/testbed) took 13 s for dense, 14-21 s for layer-shaped
allocations, 26-36 s for kv_head per-layer and 63-86 s for kv_head global and DuoAttention-style
allocations on one H200 (the same prompts, the same model). The binary mode of the reference
(``consa_vllm.reference.kernels.hybrid_attention``) runs SDPA on each layer's F heads and S heads
apart, so an uneven allocation makes SDPA calls of many head counts, times the eval's prompt
lengths. This script measures whether the time is per distinct shape (a backend that builds a
plan per shape, such as cuDNN's) or per call:

- the testbed's model shape with random weights, bf16, batches of 8 rows;
- ``--lengths`` distinct sequence lengths, each run twice (the first pass pays any per-shape cost);
- allocations: dense, layer-shaped, kv_head per-layer (2 of 8 F in every layer) and uneven
  (the same 24 F heads, 0 to 8 per layer);
- SDPA backends: PyTorch's default choice, then without cuDNN attention.

It also counts the SDPA backend ops (``aten::_scaled_dot_product_cudnn_attention`` and the like) of
one forward of each setting::

    python benchmarks/bench_reference_sdpa.py --out benchmarks/results/reference_sdpa_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

PATTERNS = {
    "dense": ["FFFFFFFF"] * 12,
    "layer": ["FFFFFFFF"] * 3 + ["SSSSSSSS"] * 9,
    "kv_head_per_layer": ["FFSSSSSS"] * 12,
    "kv_head_uneven": ["FFFFFFFF", "SSSSSSSS", "FSSSSSSS", "FFFSSSSS", "SSSSSSSS", "FFSSSSSS",
                       "FFFFSSSS", "SSSSSSSS", "SSSSSSSF", "FSSSSSSS", "FFFSSSSS", "SSSSSSFF"],
}


def attention_ops(model, x) -> dict[str, int]:
    """The SDPA backend ops one forward calls, with their counts (``aten::_scaled_dot_product_*``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(input_ids=x, logits_to_keep=1)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--lengths", type=int, default=8, help="distinct sequence lengths (default 8)")
    p.add_argument("--batch", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--device", default="cuda", help="cuda (default; the figures are for it) or cpu (a smoke check)")
    args = p.parse_args(argv)
    if args.lengths < 1 or args.batch < 1:
        p.error("--lengths and --batch must be >= 1")

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    from consa_vllm.allocation import Allocation
    from consa_vllm.reference import patch_model

    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: needs a CUDA GPU (a speed figure of the GPU path)\n")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to(args.device, torch.bfloat16).eval()
    # Lengths like the eval's: around 2k, 4k and 8k, each a few tokens apart.
    bases = (2048, 4096, 8000)
    lengths = [bases[i % 3] + 7 * (i // 3) + 1 for i in range(args.lengths)]
    settings = {
        "default": None,
        "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    }
    from machine import machine_name  # this folder's helper, on sys.path when run as a script
    device = machine_name(args.device)
    result = {"device": device, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "host": platform.node(), "lengths": lengths,
              "batch": args.batch, "patterns": PATTERNS, "seconds": {}, "sdpa_ops": {}}
    for sname, backends in settings.items():
        for aname, pattern in PATTERNS.items():
            alloc = Allocation(granularity="kv_head", window=512, pattern=pattern)
            patch_model(model, window=512, allocation=alloc)
            passes = []
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                for n in lengths:
                    # A fresh length offset per setting: no setting reuses another's per-shape work.
                    x = torch.randint(0, 8192, (args.batch, n + (0 if sname == "default" else 3)), device=args.device)
                    with torch.no_grad(), (sdpa_kernel(backends) if backends else nullcontext()):
                        model(input_ids=x, logits_to_keep=1)
                sync()
                passes.append(round(time.perf_counter() - t0, 3))
            result["seconds"][f"{sname}/{aname}"] = {"first_pass": passes[0], "second_pass": passes[1]}
            x = torch.randint(0, 8192, (args.batch, lengths[0] + 100), device=args.device)
            with (sdpa_kernel(backends) if backends else nullcontext()):
                result["sdpa_ops"][f"{sname}/{aname}"] = attention_ops(model, x)
            print(f"{sname:9s} {aname:18s} first {passes[0]:7.3f} s, second {passes[1]:7.3f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
