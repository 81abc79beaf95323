"""``consa-vllm import-duo``: DuoAttention's published per-KV-head gates as allocation files.

The expected allocations are computed here independently, with numpy, by DuoAttention's own rule
(``duo_attn/utils.py``: gates clipped to [0, 1], ``threshold = np.quantile(gates, s)``, full where
``gate >= threshold``), its random tie-breaking noise replaced by a strictly increasing one in
(layer, head) order, too small to reorder distinct gates: that is the importer's tie rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from consa_vllm.allocation import Allocation, AllocationError
from consa_vllm.allocation.duo import import_duo
from consa_vllm.cli import main as cli_main

DATA = Path(__file__).resolve().parent / "data" / "duo-attention"
FOLDERS = ["Meta-Llama-3.1-8B-Instruct", "Llama-3-8B-Instruct-Gradient-1048k", "Mistral-7B-Instruct-v0.2",
           "Llama-2-7B-32K-Instruct"]
SHAPES = {"Llama-2-7B-32K-Instruct": (32, 32)}  # the others: 32 layers x 8 KV heads


def duo_quantile_rule(gates: np.ndarray, sparsity: float) -> np.ndarray:
    """DuoAttention's ``sparsify_attention_heads`` on ``gates`` (any shape); True = full attention."""
    g = np.clip(gates, 0.0, 1.0).astype(np.float64)
    distinct = np.unique(g)
    gap = np.diff(distinct).min() if len(distinct) > 1 else 1.0
    # Increasing in flat (layer, head) order: of equal gates, the earlier one is lower, so it streams first.
    noisy = g + np.arange(g.size).reshape(g.shape) * (gap / (4 * g.size))
    threshold = np.quantile(noisy, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return noisy >= threshold


def to_pattern(full: np.ndarray) -> list[str]:
    return ["".join("F" if f else "S" for f in row) for row in full]


def run_import(tmp_path, source, sparsity, constraint="global", extra=()):
    out = tmp_path / f"{Path(source).name}-{sparsity}-{constraint}.json"
    rc = cli_main(["import-duo", str(source), "--sparsity", str(sparsity), "--window", "256", "--sink", "64",
                   "--constraint", constraint, "--out", str(out), *extra])
    assert rc == 0
    return Allocation.load(out)


@pytest.mark.parametrize("folder", FOLDERS)
def test_global_equals_duo_quantile_rule(tmp_path, folder):
    tsv = DATA / folder / "full_attention_heads.tsv"
    gates = np.loadtxt(tsv, delimiter="\t")
    assert gates.shape == SHAPES.get(folder, (32, 8))
    n = gates.size
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        a = run_import(tmp_path, DATA / folder, s)
        assert a.pattern == to_pattern(duo_quantile_rule(gates, s)), (folder, s)
        # independent of the quantile: exactly round(s*n) S heads, and no S gate above an F gate
        assert sum(row.count("S") for row in a.pattern) == round(s * n)
        s_mask = np.array([[c == "S" for c in row] for row in a.pattern])
        clipped = np.clip(gates, 0, 1)
        if 0 < s < 1:
            assert clipped[s_mask].max() <= clipped[~s_mask].min()
        assert (a.granularity, a.window, a.sink, a.sparsity) == ("kv_head", 256, 64, s)
        # provenance: every gate as written, the file, its hash, the settings, DuoAttention's training sizes
        p = a.model_extra["duo_attention"]
        assert np.array_equal(np.array(p["gates"]), gates)
        assert p["file"] == f"{folder}/full_attention_heads.tsv" and p["sparsity"] == s
        assert p["constraint"] == "global" and p["trained_with"] == {"sink_size": 128, "recent_size": 256}
        assert p["sha256"] == hashlib.sha256(tsv.read_bytes()).hexdigest()
        assert a.model_extra["target_sparsity"] == s and a.model_extra["achieved_sparsity"] == a.sparsity


@pytest.mark.parametrize("folder", FOLDERS)
def test_per_layer_equals_duo_quantile_rule_in_each_layer(tmp_path, folder):
    gates = np.loadtxt(DATA / folder / "full_attention_heads.tsv", delimiter="\t")
    for s in (0.25, 0.5, 0.75):
        a = run_import(tmp_path, DATA / folder / "full_attention_heads.tsv", s, "per-layer")  # the TSV itself
        want = [to_pattern(duo_quantile_rule(row[None, :], s))[0] for row in gates]
        assert a.pattern == want, (folder, s)
        assert {row.count("S") for row in a.pattern} == {round(s * gates.shape[1])}
        assert a.model_extra["duo_attention"]["constraint"] == "per-layer"


def test_ties_break_by_gate_then_layer_then_head(tmp_path):
    # Published data: Mistral has 110 gates of exactly 1.0; at 0.75 only 64 heads stay F, so 46 of the
    # 1.0 heads stream: the first 46 in (layer, head) order.
    gates = np.loadtxt(DATA / "Mistral-7B-Instruct-v0.2" / "full_attention_heads.tsv", delimiter="\t")
    a = run_import(tmp_path, DATA / "Mistral-7B-Instruct-v0.2", 0.75)
    ones = [(layer, h) for layer in range(32) for h in range(8) if gates[layer, h] == 1.0]
    s_ones = [(layer, h) for layer, h in ones if a.pattern[layer][h] == "S"]
    assert len(ones) == 110 and s_ones == ones[:46]
    assert all(a.pattern[layer][h] == "S" for layer in range(32) for h in range(8) if gates[layer, h] < 1.0)
    # Synthetic: all gates equal; global goes in (layer, head) order, per-layer by head index.
    tsv = tmp_path / "flat.tsv"
    tsv.write_text("\n".join("\t".join(["0.5"] * 4) for _ in range(4)) + "\n")
    assert run_import(tmp_path, tsv, 0.375).pattern == ["SSSS", "SSFF", "FFFF", "FFFF"]
    assert run_import(tmp_path, tsv, 0.5, "per-layer").pattern == ["SSFF"] * 4
    # Negative published gates clip to 0 (as DuoAttention loads them) and tie there.
    tsv.write_text("-0.004\t0.0\t-0.002\t0.9\n")
    assert run_import(tmp_path, tsv, 0.5).pattern == ["SSFF"]


def test_model_shape_checked(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    conf = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    (model / "config.json").write_text(json.dumps(conf))
    src = DATA / "Meta-Llama-3.1-8B-Instruct"
    a = run_import(tmp_path, src, 0.5, extra=["--model", str(model)])
    assert a.model_extra["model"] == str(model)
    for key, value, phrase in (("num_hidden_layers", 28, "pattern has 32 layers but the model has 28"),
                               ("num_key_value_heads", 4, "pattern has 8 KV heads per layer but the model has 4")):
        (model / "config.json").write_text(json.dumps({**conf, key: value}))
        out = tmp_path / f"bad-{key}.json"
        capsys.readouterr()
        rc = cli_main(["import-duo", str(src), "--sparsity", "0.5", "--window", "256", "--sink", "64",
                       "--model", str(model), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and phrase in err and key in err and str(src) in err, err
        assert not out.exists()


GOOD = "0.1\t0.9\n0.5\t0.2\n"


@pytest.mark.parametrize("content,phrase", [
    ("0.1\t0.9\n0.5\n", "line 2 has 1 gates but line 1 has 2: expected one gate per KV head on every line"),
    ("0.1\tabc\n0.5\t0.2\n", "line 1, column 2: 'abc' is not a number"),
    ("0.1\t\n0.5\t0.2\n", "line 1, column 2: '' is not a number"),
    ("0.1\t1.5\n0.5\t0.2\n", "line 1, column 2: gate 1.5 is outside [0, 1]"),
    ("0.1\t-0.2\n0.5\t0.2\n", "line 1, column 2: gate -0.2 is outside [0, 1]"),
    ("0.1\tnan\n0.5\t0.2\n", "line 1, column 2: gate nan is outside [0, 1]"),
    ("0.1\tinf\n0.5\t0.2\n", "line 1, column 2: gate inf is outside [0, 1]"),
    ("0.1\t0.9\n\n0.5\t0.2\n", "line 2 is empty: expected one line of gates per layer"),
    ("", "empty: expected one line of tab-separated gates per layer"),
    ("\n\n", "empty: expected one line of tab-separated gates per layer"),
])
def test_bad_tsv_is_one_line_naming_the_file(tmp_path, capsys, content, phrase):
    tsv = tmp_path / "gates.tsv"
    tsv.write_text(content)
    out = tmp_path / "a.json"
    rc = cli_main(["import-duo", str(tsv), "--sparsity", "0.5", "--window", "8", "--sink", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"consa-vllm import-duo: error: {tsv}: {phrase}\n", err
    assert not out.exists()


@pytest.mark.parametrize("args,phrase", [
    (["{missing}"], "{missing}: not found (expected a DuoAttention pattern folder or its full_attention_heads.tsv)"),
    (["{empty_dir}"], "{empty_dir}: no full_attention_heads.tsv in this folder"),
    (["{binary}"], "{binary}: not a text file"),
    (["{good}", "--sparsity", "-0.1"], "argument --sparsity: must be in [0, 1]"),
    (["{good}", "--sparsity", "1.1"], "argument --sparsity: must be in [0, 1]"),
    (["{good}", "--sparsity", "half"], "argument --sparsity: expected a number in [0, 1], got 'half'"),
    (["{good}", "--window", "0"], "argument --window: must be >= 1, got 0"),
    (["{good}", "--window", "4k"], "argument --window: expected a whole number (tokens), got '4k'"),
    (["{good}", "--sink", "-1"], "argument --sink: must be >= 0, got -1"),
    (["{good}", "--sink", "2.5"], "argument --sink: expected a whole number (tokens), got '2.5'"),
    (["{good}", "--sink", str(2**31)], "argument --sink: must be <= 2147483647, got 2147483648"),
    (["{good}", "--constraint", "layer"], "argument --constraint: invalid choice: 'layer'"),
    (["{wide}", "--constraint", "per-layer", "--sparsity", "0.3"],
     "--sparsity: sparsity 0.3 cannot be met exactly with 8 KV heads per layer (it needs 2.4 S KV heads per "
     "layer); nearest exact values: 0.25 or 0.375"),
    (["{good}", "--out", "{exists}"], "--out {exists}: already exists; pass --force to overwrite it"),
    (["{good}", "--out", "{empty_dir}"], "--out {empty_dir}: is a directory"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, phrase):
    paths = {"missing": tmp_path / "nope", "empty_dir": tmp_path / "empty", "binary": tmp_path / "bin.tsv",
             "good": tmp_path / "good.tsv", "wide": tmp_path / "wide.tsv", "exists": tmp_path / "exists.json"}
    paths["empty_dir"].mkdir()
    paths["binary"].write_bytes(b"\xff\xfe\x00gates")
    paths["good"].write_text(GOOD)
    paths["wide"].write_text("\t".join(["0.5"] * 8) + "\n")
    paths["exists"].write_text("keep me")
    fill = {k: str(v) for k, v in paths.items()}
    argv = [a.format(**fill) for a in args]
    defaults = {"--sparsity": "0.5", "--window": "8", "--sink": "2", "--out": str(tmp_path / "a.json")}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    try:
        rc = cli_main(["import-duo", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and phrase.format(**fill) in err, err
    assert not (tmp_path / "a.json").exists() and paths["exists"].read_text() == "keep me"


def test_library_refuses_bad_window_and_sink():
    src = DATA / "Meta-Llama-3.1-8B-Instruct"
    with pytest.raises(AllocationError, match="window must be a whole number of tokens in 1..2147483647, got True"):
        import_duo(src, 0.5, True, 64)
    with pytest.raises(AllocationError, match="sink must be a whole number of tokens in 0..2147483647, got 6.4"):
        import_duo(src, 0.5, 256, 6.4)
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\], got nan"):
        import_duo(src, float("nan"), 256, 64)


def test_imported_file_is_the_common_format(tmp_path):
    """The import is an ordinary allocation file: it round-trips and `show` reads it."""
    a = run_import(tmp_path, DATA / "Meta-Llama-3.1-8B-Instruct", 0.5, extra=["--png", str(tmp_path / "a.png")])
    path = tmp_path / "Meta-Llama-3.1-8B-Instruct-0.5-global.json"
    assert Allocation.load(path) == a and path.read_text() == a.to_json()
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["show", str(path)]) == 0
