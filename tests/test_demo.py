"""Argument validation of ``consa-vllm demo`` (the full demo is too slow for CI)."""

from __future__ import annotations

import pytest

from consa_vllm.cli import main as cli_main


@pytest.mark.parametrize("argv, flag", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "half"], "--sparsity"),
    (["--steps", "0"], "--steps"),
    (["--port", "70000"], "--port"),
])
def test_bad_value_is_one_line_and_exit_2(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "consa-vllm demo: error:" in err and flag in err
    assert not (tmp_path / "out").exists()  # nothing was built


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli_main(["demo", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
