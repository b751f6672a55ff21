"""The benchmark runs, counts wrong elements for real, and writes its JSON."""

import argparse
import io
import json

import numpy as np
import pytest

from jax_ddl._src import bench


def test_parse_size():
    assert bench.parse_size("8") == 8
    assert bench.parse_size("4K") == 4096
    assert bench.parse_size("256M") == 256 << 20
    assert bench.parse_size("1G") == 1 << 30
    assert bench.parse_size("2MiB") == 2 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        bench.parse_size("lots")


def test_sizes_follow_nccl_tests_stepping():
    assert bench.sizes(8, 128, 2) == [8, 16, 32, 64, 128]
    assert bench.sizes(4096, 4 << 20, 4)[-1] == 4 << 20


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["-b", "1M", "-e", "1K"])
    assert "--minbytes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "sideways"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "jax_ddl,nccl"])
    assert "--impls must list some of jax_ddl, ddl-flat, lax.psum, mpi" in capsys.readouterr().err


def test_impls_choose_the_rows():
    args = bench.parse_args("-b 4K -e 4K -n 1 -w 0 --topology 2x4 --impls ddl-flat,jax_ddl".split())
    out = io.StringIO()
    result, wrong = bench.run(args, out=out)
    assert wrong == 0 and [r["impl"] for r in result["rows"]] == ["jax_ddl", "ddl-flat"]
    assert "x_lax" not in result["rows"][0]["oop"] and "x lax oop" not in out.getvalue()
    assert "# topology 2x4 against flat 8" in out.getvalue()
    # In one process there is no MPI row to run.
    with pytest.raises(SystemExit, match="none of --impls mpi applies"):
        bench.run(bench.parse_args("-b 4K -e 4K --impls mpi".split()), out=io.StringIO())


@pytest.mark.parametrize("dtype,op", [("float32", "sum"), ("bfloat16", "max"), ("int64", "min")])
def test_small_run_counts_no_wrong_elements(dtype, op, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_DDL_SMALL_BYTES", "64")  # both engine paths appear in the sizes
    argv = "-b 8 -e 8K -f 32 -n 2 -w 1 --topology 2x4".split() + ["-d", dtype, "-o", op]
    args = bench.parse_args(argv)
    out = io.StringIO()
    result, wrong = bench.run(args, out=out)
    text = out.getvalue()
    assert wrong == 0 and "out of bounds values: 0 OK" in text
    # A 2-dimensional topology brings the flat one beside it.
    assert [r["impl"] for r in result["rows"]] == ["jax_ddl", "ddl-flat", "lax.psum"] * 3
    assert result["settings"]["topology"] == "2x4"
    row = result["rows"][0]
    assert row["oop"]["wrong"] == 0 and row["ip"]["time_us"] > 0
    assert row["oop"]["busbw_GBps"] == pytest.approx(row["oop"]["algbw_GBps"] * 2 * 7 / 8)
    assert "x_lax" in row["oop"] and "x_flat" in row["ip"]
    assert "# topology 2x4 against flat 8" in text
    assert result["bandwidth_Bps"]["start"] > 0


def test_wrong_results_are_counted(monkeypatch):
    """A broken reduction must show up in #wrong: compare against a wrong oracle."""
    args = bench.parse_args(["-b", "64", "-e", "64", "-n", "1", "-w", "0", "--modes", "oop"])
    monkeypatch.setattr(bench.Harness, "expected", lambda self, impl, count, op: np.zeros(count))
    result, wrong = bench.run(args, out=io.StringIO())
    assert wrong == 2 * 8 * 16  # every element of both implementations on all 8 ranks


def test_main_writes_json(tmp_path):
    path = tmp_path / "out.json"
    assert bench.main(["-b", "4K", "-e", "4K", "-n", "1", "-w", "0", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["settings"]["devices"] == 8 and len(data["rows"]) == 2
