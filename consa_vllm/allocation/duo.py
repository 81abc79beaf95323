"""Import DuoAttention's published per-KV-head patterns as allocation files (``consa-vllm import-duo``).

DuoAttention (Xiao et al., 2024, github.com/mit-han-lab/duo-attention, MIT license) learns one gate
per KV head of a pretrained model and publishes them as ``full_attention_heads.tsv``: one line per
layer, one tab-separated gate per KV head, high = keep full attention (a retrieval head). Its
code (``duo_attn/utils.py``) clips the gates to [0, 1] when it loads them, then turns them into an
allocation at sparsity ``s`` (the share of "streaming" heads) with a quantile rule:
``threshold = np.quantile(gates, s)`` after adding uniform noise in [0, 1e-6) to break ties, and
every head with ``gate >= threshold`` stays full. Its streaming heads attend to sink tokens plus a
recent window: our S heads with ``sink`` (the importer's ``--sink``, ``--window``).

The rule here, deterministic, on the gates clipped to [0, 1] as DuoAttention loads them:

- ``global``: exactly ``round(s * heads)`` heads (halves up) become S, those with the lowest gates.
  Ties are broken by ``(gate, layer, head)``: among equal gates the lower layer, then the lower
  head index, becomes S first. This is the quantile rule with its random tie-break replaced by a
  fixed one; the two pick the same number of heads whenever ``s * heads`` is a whole number (the
  quantile rule picks ``ceil(s * (heads - 1))`` heads, which can differ by one otherwise), and the
  same heads unless two gates closer than the noise (1e-6) straddle the threshold, where
  DuoAttention's choice is random.
- ``per-layer``: the same count in every layer, the ``s * heads_per_layer`` lowest gates of each
  layer (ties by head index). A sparsity that no whole count per layer meets is refused with the
  nearest values that are (rounding per layer would move the sparsity by up to ``1/(2H)``, 6% at
  8 KV heads, and comparisons are made at equal KV memory).

The published files hold gates slightly outside [0, 1] (down to -0.0014 for Llama-2-7B-32K: the
optimizer's overshoot, clipped when DuoAttention loads them), so gates within ``GATE_TOLERANCE``
of [0, 1] are accepted, clipped for the ranking and kept as written in the provenance; anything
further out (a logit, a percentage) is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from .format import FULL, MAX_TOKENS, SLIDING, Allocation, AllocationError, read_json_object
from .rules import exact_count, sliding_count

DUO_TSV = "full_attention_heads.tsv"
#: How far outside [0, 1] a published gate may lie (see the module docstring).
GATE_TOLERANCE = 0.01
Constraint = Literal["global", "per-layer"]


def find_tsv(path: str | os.PathLike) -> Path:
    """The gate file: ``path`` itself, or ``path/full_attention_heads.tsv`` for a pattern folder."""
    p = Path(path)
    if not p.exists():
        raise AllocationError(f"{p}: not found (expected a DuoAttention pattern folder or its {DUO_TSV})")
    if p.is_dir():
        if not (p / DUO_TSV).is_file():
            raise AllocationError(f"{p}: no {DUO_TSV} in this folder (expected a DuoAttention pattern folder)")
        return p / DUO_TSV
    return p


def read_gates(path: str | os.PathLike) -> tuple[list[list[float]], Path]:
    """Parse the gate file named by ``path`` (see :func:`find_tsv`); return ``(gates[layer][head], file)``.

    Every problem is one :class:`AllocationError` naming the file, the line and the column.
    """
    tsv = find_tsv(path)
    try:
        text = tsv.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AllocationError(f"{tsv}: not a text file (expected tab-separated gates)") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a final newline (or several) is not a layer
        lines.pop()
    if not lines:
        raise AllocationError(f"{tsv}: empty: expected one line of tab-separated gates per layer")
    gates: list[list[float]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise AllocationError(f"{tsv}: line {n} is empty: expected one line of gates per layer")
        row = []
        for c, cell in enumerate(line.split("\t"), start=1):
            where = f"{tsv}: line {n}, column {c}"
            try:
                g = float(cell)
            except ValueError:
                raise AllocationError(f"{where}: {cell.strip()!r} is not a number") from None
            # NaN fails both comparisons, so it is refused here too.
            if not -GATE_TOLERANCE <= g <= 1 + GATE_TOLERANCE:
                raise AllocationError(f"{where}: gate {cell.strip()} is outside [0, 1]")
            row.append(g)
        if gates and len(row) != len(gates[0]):
            raise AllocationError(f"{tsv}: line {n} has {len(row)} gates but line 1 has {len(gates[0])}: "
                                  "expected one gate per KV head on every line")
        gates.append(row)
    return gates, tsv


def sliding_heads(gates: list[list[float]], sparsity: float, constraint: Constraint = "global") -> set[tuple[int, int]]:
    """The ``(layer, head)`` units that become S under the rule of the module docstring."""
    if not 0.0 <= sparsity <= 1.0:  # also refuses NaN
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    num_layers, num_heads = len(gates), len(gates[0])
    # Clipped as DuoAttention loads them: its slightly negative gates all rank as 0, ties by position.
    gates = [[min(1.0, max(0.0, g)) for g in row] for row in gates]
    if constraint == "global":
        n = num_layers * num_heads
        k = sliding_count(sparsity, n)
        order = sorted((gates[layer][h], layer, h) for layer in range(num_layers) for h in range(num_heads))
        return {(layer, h) for _, layer, h in order[:k]}
    if constraint == "per-layer":
        k = exact_count(sparsity, num_heads, "KV heads per layer")
        chosen = set()
        for layer, row in enumerate(gates):
            chosen |= {(layer, h) for _, h in sorted((g, h) for h, g in enumerate(row))[:k]}
        return chosen
    raise ValueError(f"constraint must be 'global' or 'per-layer', got {constraint!r}")


def duo_allocation(gates: list[list[float]], sparsity: float, window: int, sink: int,
                   constraint: Constraint = "global") -> Allocation:
    """A kv_head allocation from DuoAttention gates (no provenance; see :func:`import_duo`)."""
    s_units = sliding_heads(gates, sparsity, constraint)
    pattern = ["".join(SLIDING if (layer, h) in s_units else FULL for h in range(len(row)))
               for layer, row in enumerate(gates)]
    # from_dict: a bad window or sink is an AllocationError naming the field.
    return Allocation.from_dict(dict(granularity="kv_head", window=window, sink=sink, pattern=pattern))


def import_duo(path: str | os.PathLike, sparsity: float, window: int, sink: int,
               constraint: Constraint = "global") -> Allocation:
    """Read a DuoAttention pattern (folder or TSV) and return the allocation with its provenance.

    Extra fields: ``target_sparsity``, ``achieved_sparsity`` and ``duo_attention`` (the gate file's
    name and SHA-256, the sparsity, constraint and rule, DuoAttention's training sink/recent sizes
    when its ``config.json`` is beside the file, and every gate as written).
    """
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_TOKENS:
        raise AllocationError(f"window must be a whole number of tokens in 1..{MAX_TOKENS}, got {window!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or not 0 <= sink <= MAX_TOKENS:
        raise AllocationError(f"sink must be a whole number of tokens in 0..{MAX_TOKENS}, got {sink!r}")
    gates, tsv = read_gates(path)
    alloc = duo_allocation(gates, sparsity, window, sink, constraint)
    provenance: dict[str, Any] = {
        "file": f"{tsv.resolve().parent.name}/{tsv.name}",
        "sha256": hashlib.sha256(tsv.read_bytes()).hexdigest(),
        "sparsity": sparsity,
        "constraint": constraint,
        "rule": ("the round(sparsity x heads) heads with the lowest gates (clipped to [0, 1]) are S, "
                 "ties by (gate, layer, head)" if constraint == "global" else
                 "the sparsity x heads_per_layer heads with the lowest gates (clipped to [0, 1]) of each layer "
                 "are S, ties by head"),
    }
    trained = tsv.parent / "config.json"
    if trained.is_file():  # DuoAttention's training config: the sink and window its gates were learned with
        conf = read_json_object(trained, AllocationError, what="DuoAttention's config.json")
        provenance["trained_with"] = {k: conf[k] for k in ("sink_size", "recent_size") if k in conf}
    provenance["gates"] = gates
    return alloc.with_extra(target_sparsity=sparsity, achieved_sparsity=alloc.sparsity, duo_attention=provenance)
