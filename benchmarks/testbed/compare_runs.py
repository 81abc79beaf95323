"""Testbed v2 across pretrained models: one table from several runs' reports.

Each run of ``run_v2`` pretrains its own model (the same seed, but GPU kernels are not
deterministic), and runs 3 to 5 ranked ConSA and DuoAttention-style differently at rho 0.75
(benchmarks/results/testbed_v2_h200_run4_partial/README.md). A ranking that holds for one
pretrained model is not a result; this puts the runs side by side:

- held-out retrieval and loss beyond the window of every allocation the runs share, per run and
  averaged over runs;
- for each pair of allocations, the difference in every run with its own paired-bootstrap
  verdict (Holm within the run's comparison group), and how many runs put it each way;
- how much the learned patterns agree between runs (heads with the same F/S verdict).

The runs' own reports carry the per-prompt intervals; over runs only the sign count is given:
three pretrained models are too few to estimate the spread between them.

    python -m benchmarks.testbed.compare_runs RESULTS_DIR [RESULTS_DIR ...] [--mode masks]
        [--rho 0.75] [--sink 0] [--out FILE.md]

RESULTS_DIR is a published run (``results.json`` and ``allocations/`` in it), e.g.
``benchmarks/results/testbed_v2_h200_run3``.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import combinations
from pathlib import Path

from pydantic import ValidationError

from .run_v2 import ResultsV2, Row


def load_run(path: Path) -> ResultsV2:
    """A published run's ``results.json`` (the format ``run_v2`` writes); a clear error if it is not one."""
    f = path / "results.json"
    if not f.is_file():
        raise SystemExit(f"compare_runs: {f}: no such file (give a published testbed v2 run's folder)")
    try:
        return ResultsV2.model_validate_json(f.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise SystemExit(f"compare_runs: {f}: not a testbed v2 report ({where}: {first['msg']})") from None


def _rows(run: ResultsV2, mode: str, rho: float, sink: int) -> dict[str, Row]:
    # dense belongs to every group (with or without sinks), as in run_v2's own comparison groups.
    return {r.name: r for r in run.rows
            if r.mode == mode and (r.base == "dense" or (r.sink == sink and r.rho == rho))}


def _verdict(run: ResultsV2, mode: str, a: str, b: str) -> tuple[float, bool] | None:
    """The run's own difference a - b in retrieval and whether it was significant."""
    for d in run.differences:
        if not d.group.startswith(f"{mode} "):
            continue
        if (d.a, d.b) == (a, b):
            return d.diff, d.significant
        if (d.a, d.b) == (b, a):
            return -d.diff, d.significant
    return None


def agreement(a: list[str], b: list[str]) -> tuple[int, int]:
    """Heads (or layers) with the same F/S verdict in two patterns, and how many there are."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs), len(pairs)


def compare(runs: dict[str, ResultsV2], mode: str = "masks", rho: float = 0.75, sink: int = 0) -> str:
    """The markdown report of the runs (name -> its report) for one comparison group."""
    rows = {name: _rows(run, mode, rho, sink) for name, run in runs.items()}
    # Ties (the rules at 0) in name order: a set's order follows the hash seed.
    shared = sorted(set.intersection(*(set(r) for r in rows.values())),
                    key=lambda n: (-sum(rows[r][n].accuracy for r in rows), n))
    if not shared:
        return f"No allocation in every run for mode {mode}, rho {rho}, sink {sink}.\n"
    names = list(runs)
    n = len(names)
    out = [f"Mode {mode}, rho {rho}, sink {sink}: {n} runs ({', '.join(names)}), each its own pretrained model.", "",
           "Held-out retrieval (the run's 95% interval in its own results.md):", "",
           "| allocation | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (n + 1)]
    for a in shared:
        acc = [rows[r][a].accuracy for r in names]
        out.append(f"| {a} | " + " | ".join(f"{x:.3f}" for x in acc) + f" | {sum(acc) / n:.3f} |")
    out += ["", "Held-out loss beyond the window (nats):", "",
            "| allocation | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (n + 1)]
    for a in sorted(shared, key=lambda x: (sum(rows[r][x].loss_beyond_window for r in names), x)):
        loss = [rows[r][a].loss_beyond_window for r in names]
        out.append(f"| {a} | " + " | ".join(f"{x:.4f}" for x in loss) + f" | {sum(loss) / n:.4f} |")
    out += ["", "Retrieval differences a - b per run (* significant in that run, Holm) and the sign count "
            "(runs with a ahead significantly / ahead n.s. / level / behind n.s. / behind significantly):", "",
            "| a | b | " + " | ".join(names) + " | sign count |", "|---|---|" + "---|" * (n + 1)]
    for a, b in combinations(shared, 2):
        cells, count = [], [0, 0, 0, 0, 0]
        for r in names:
            v = _verdict(runs[r], mode, a, b)
            if v is None:
                cells.append("-")
                continue
            diff, sig = v
            cells.append(f"{diff:+.3f}{'*' if sig else ''}")
            count[0 if diff > 0 and sig else 1 if diff > 0 else 2 if diff == 0 else 4 if sig else 3] += 1
        out.append(f"| {a} | {b} | " + " | ".join(cells) + f" | {'/'.join(map(str, count))} |")
    learned = [a for a in shared if not rows[names[0]][a].base.startswith(("dense", "rule-"))]
    if learned and n > 1:
        out += ["", "Learned patterns: units with the same F/S verdict in two runs:", "",
                "| allocation | " + " | ".join(f"{x} vs {y}" for x, y in combinations(names, 2)) + " |",
                "|---|" + "---|" * (n * (n - 1) // 2)]
        for a in learned:
            cells = []
            for x, y in combinations(names, 2):
                same, total = agreement(rows[x][a].pattern, rows[y][a].pattern)
                cells.append(f"{same} of {total}")
            out.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.testbed.compare_runs",
                                description="Testbed v2 runs (each its own pretrained model) side by side: "
                                            "retrieval, loss beyond W, per-run differences and pattern agreement.")
    p.add_argument("runs", nargs="+", type=Path, help="published run folders (results.json in each)")
    p.add_argument("--mode", default="masks", choices=["masks", "stage2"], help="masks-only or after stage 2")
    p.add_argument("--rho", type=float, default=0.75, help="target sparsity of the group (default 0.75)")
    p.add_argument("--sink", type=int, default=0, help="sink tokens of the group (default 0)")
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs")
    # Columns named by folder, less what every folder name shares at its start.
    prefix = os.path.commonprefix([r.name for r in args.runs])
    runs = {(r.name[len(prefix):] or r.name): load_run(r) for r in args.runs}
    if len(runs) != len(args.runs):
        p.error("two runs have the same folder name")
    text = compare(runs, args.mode, args.rho, args.sink)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
