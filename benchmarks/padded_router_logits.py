"""Did Inductor pad an engine's MoE router logits? Read from the engine's generated code.

The GPU tests' ``all_f_privatecache`` variant (``tests/test_gpu_families.py``) packs each
engine's vLLM, Inductor and Triton caches beside its report (``*.caches-ENGINE.tgz``). The
Inductor output there is Python: each call of vLLM's MoE op shows the router logits it is
given. Dense logits are a buffer of their own; padded ones are a view of a wider matmul
output, ``reinterpret_tensor(buf, (s, E), (E_pad, 1), 0)``, whose rows are ``E_pad`` apart.
vLLM 0.26's top-k routing kernel reads rows ``E`` apart, so an engine with padded logits
routes tokens with the wrong logits (docs/DESIGN.md §10, "The Mixtral defect"). CPU only::

    python benchmarks/padded_router_logits.py RUN_DIR/r*/*.caches-*.tgz [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

# The MoE op's second argument (the router logits) when it is a strided view.
_PADDED = re.compile(r"moe_forward\.default\(\s*\w+,\s*reinterpret_tensor\(\w+,\s*\((\w+),\s*(\d+)\),\s*"
                     r"\((\d+),\s*1\)")
_CALL = re.compile(r"moe_forward\.default\(")


def scan_sources(sources: dict[str, str]) -> dict:
    """Calls of vLLM's MoE op in generated code (``{file name: text}``) and, for those given
    padded logits, the logical and physical row widths."""
    calls, padded = 0, []
    for name, text in sorted(sources.items()):
        calls += len(_CALL.findall(text))
        padded += [{"file": name, "experts": int(e), "row_stride": int(s)}
                   for _, e, s in _PADDED.findall(text) if int(s) != int(e)]
    return {"moe_calls": calls, "padded_calls": padded, "padded": bool(padded)}


def scan_caches(path: Path) -> dict:
    """:func:`scan_sources` over the ``.py`` files of a packed cache (``.tgz``) or a folder."""
    sources: dict[str, str] = {}
    if path.is_dir():
        for f in path.rglob("*.py"):
            sources[str(f.relative_to(path))] = f.read_text(errors="replace")
    else:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".py"):
                    sources[m.name] = tar.extractfile(m).read().decode(errors="replace")
    if not sources:
        raise ValueError(f"{path}: no generated Python code in it (not a packed engine cache?)")
    return scan_sources(sources)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", type=Path, help="packed engine caches (*.caches-ENGINE.tgz) or folders")
    ap.add_argument("--json", type=Path, help="also write the findings here")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.caches if not p.exists()]
    if missing:
        ap.error(f"no such file: {', '.join(missing)}")
    found = {}
    for p in args.caches:
        try:
            r = scan_caches(p)
        except (ValueError, tarfile.TarError) as e:
            print(f"padded_router_logits: {e}", file=sys.stderr)
            return 2
        found[str(p)] = r
        what = (f"PADDED: {r['padded_calls'][0]['experts']} experts, rows {r['padded_calls'][0]['row_stride']} apart"
                if r["padded"] else "dense")
        print(f"{p}: {r['moe_calls']} MoE calls, router logits {what}")
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
