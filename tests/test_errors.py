"""Bad input raises clear Python errors at trace time; faults at run time fail every rank
within the deadline, naming the missing ranks (driven by the test-only fault switch)."""

import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import int_valued, mesh_of, settled_counter, spmd
from jax.sharding import PartitionSpec as P

import jax_ddl
from jax_ddl import _ddl


def _run(fn, n=8, shape=(8, 16), dtype=jnp.float32, check_vma=True):
    mesh = mesh_of((n,), ("i",))
    return spmd(fn, mesh, P("i"), P() if check_vma else P("i"), check_vma)(jnp.ones(shape, dtype))


def test_unbound_axis_names_the_axis():
    with pytest.raises(NameError, match=r"axis_name 'zz' is not bound.*bound axes: \['i'\]"):
        _run(lambda v: jax_ddl.psum(v, "zz"))


def test_outside_shard_map():
    with pytest.raises(NameError, match="inside jax.shard_map or jax.pmap"):
        jax.jit(lambda v: jax_ddl.psum(v, "i"))(jnp.ones(3))


def test_topology_product_mismatch():
    with pytest.raises(ValueError, match=r"topology='3x3' multiplies to 9.*spans 8 devices"):
        _run(lambda v: jax_ddl.psum(v, "i", topology="3x3"))


@pytest.mark.parametrize("bad", ["2xq", "", "0x8", "x8"])
def test_malformed_topology(bad):
    with pytest.raises(ValueError, match="topology"):
        _run(lambda v: jax_ddl.psum(v, "i", topology=bad))


def test_topology_from_environment(monkeypatch):
    monkeypatch.setenv("JAX_DDL_TOPOLOGY", "2x4")
    np.testing.assert_array_equal(_run(lambda v: jax_ddl.psum(v, "i"))[0], 8 * np.ones(16))
    monkeypatch.setenv("JAX_DDL_TOPOLOGY", "4x4")
    with pytest.raises(ValueError, match="JAX_DDL_TOPOLOGY='4x4' multiplies to 16"):
        _run(lambda v: jax_ddl.psum(v, "i"))


@pytest.mark.parametrize("bad", ["soon", "nan", "inf", "-1", "0", "1e30"])
def test_bad_timeout_setting_is_refused_naming_the_range(bad, monkeypatch):
    monkeypatch.setenv("JAX_DDL_TIMEOUT", bad)
    with pytest.raises(
        ValueError, match=rf"JAX_DDL_TIMEOUT must be a number of seconds.*'none'.*got '{bad}'"
    ):
        _run(lambda v: jax_ddl.psum(v, "i"))


def test_timeout_none_waits_without_limit(monkeypatch):
    """`none` lowers a call with no deadline (-1); it still completes normally."""
    from jax_ddl._src.collectives import timeout_ms

    monkeypatch.setenv("JAX_DDL_TIMEOUT", "none")
    assert timeout_ms() == -1
    text = (
        jax.jit(
            jax.shard_map(
                lambda v: jax_ddl.psum(v, "i"),
                mesh=mesh_of((8,), ("i",)),
                in_specs=P("i"),
                out_specs=P(),
            )
        )
        .lower(jnp.ones((8, 16)))
        .as_text()
    )
    assert "timeout_ms = -1" in text
    np.testing.assert_array_equal(_run(lambda v: jax_ddl.psum(v, "i"))[0], 8 * np.ones(16))
    monkeypatch.setenv("JAX_DDL_TIMEOUT", "2.5")
    assert timeout_ms() == 2500


def test_bad_small_bytes_setting(monkeypatch):
    monkeypatch.setenv("JAX_DDL_SMALL_BYTES", "16k")
    with pytest.raises(ValueError, match="JAX_DDL_SMALL_BYTES must be an integer byte count"):
        _run(lambda v: jax_ddl.psum(v, "i"))


def test_bad_chunk_bytes_setting(monkeypatch):
    for bad, what in (("4M", "integer byte count"), ("-1", ">= 0")):
        monkeypatch.setenv("JAX_DDL_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match=f"JAX_DDL_CHUNK_BYTES must be .*{what}"):
            _run(lambda v: jax_ddl.psum(v, "i"))


def test_positional_axis_rejected():
    with pytest.raises(ValueError, match="positional axis 0"):
        _run(lambda v: jax_ddl.psum(v, ("i", 0)))


def test_bad_op():
    from jax_ddl._src.collectives import allreduce

    with pytest.raises(ValueError, match="op must be one of"):
        _run(lambda v: allreduce(v, "i", op="prod"))


@pytest.mark.parametrize("size", [16, 100_000], ids=["small-path", "large-path"])
def test_missing_rank_times_out_naming_it(size, monkeypatch):
    monkeypatch.setenv("JAX_DDL_TIMEOUT", "3")  # a loaded machine must not make a live rank miss it
    _ddl.set_fault("skip", 3)
    jax_ddl.reset_counters()
    start = time.monotonic()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"Missing ranks \[3\] never arrived"):
        jax.block_until_ready(_run(lambda v: jax_ddl.psum(v, "i"), shape=(8, size)))
    assert time.monotonic() - start < 30
    assert settled_counter("errors", 7) == 7  # every rank that arrived failed
    _ddl.set_fault("none", -1)
    out = _run(lambda v: jax_ddl.psum(v, "i"), shape=(8, size))  # and the engine recovers
    np.testing.assert_array_equal(out[0], 8 * np.ones(size))


@pytest.mark.parametrize("size", [16, 100_000], ids=["small-path", "large-path"])
def test_descriptor_mismatch_fails_every_rank(size):
    _ddl.set_fault("lie", 2)
    jax_ddl.reset_counters()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"ranks disagree.*rank 2 has"):
        jax.block_until_ready(_run(lambda v: jax_ddl.psum(v, "i"), shape=(8, size)))
    assert settled_counter("errors", 8) == 8


def test_fault_switch_validates_kind():
    with pytest.raises(ValueError, match="fault kind"):
        _ddl.set_fault("explode", 0)


@pytest.mark.parametrize("size", [16, 100_000], ids=["small-path", "large-path"])
def test_rank_late_past_the_deadline_then_the_same_executable_is_exact(size, monkeypatch):
    """Rank 7 arrives 1.5 s after the others gave up: they fail naming it, it fails at once
    with their error (the failure is remembered), and the next calls of the same
    executable pair correctly and are exact."""
    monkeypatch.setenv("JAX_DDL_TIMEOUT", "1")
    f = spmd(lambda v, k: jax_ddl.psum(v * k, "i"), mesh_of((8,), ("i",)), (P("i"), P()), P())
    x = int_valued((8, size), jnp.float32, seed=3)
    f(x, 1.0).block_until_ready()  # compiled and warm
    _ddl.set_fault("delay", 7, 2500, 1)
    jax_ddl.reset_counters()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"Missing ranks \[7\] never arrived"):
        f(x, 1.0).block_until_ready()
    assert settled_counter("errors", 8) == 8  # rank 7 failed too, fast, once it arrived
    for k in (2.0, 3.0, 4.0):
        np.testing.assert_array_equal(np.asarray(f(x, k))[0], k * np.asarray(x).sum(0))


def test_a_failing_rank_waits_until_no_peer_writes_into_its_buffers(monkeypatch):
    """The last stage writes into every rank's output. Rank 3 keeps working on its peers'
    buffers for 2.5 s after arriving; the others time out at 1 s but do not return (and
    let XLA free their buffers) until rank 3 has stopped: each waits about 1.5 s more."""
    monkeypatch.setenv("JAX_DDL_TIMEOUT", "1")
    f = spmd(lambda v: jax_ddl.psum(v, "i", topology="2x4"), mesh_of((8,), ("i",)), P("i"), P())
    x = int_valued((8, 100_000), jnp.float32, seed=4)
    f(x).block_until_ready()
    _ddl.set_fault("stall", 3, 2500, 1)
    jax_ddl.reset_counters()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"rank 3|Ranks \[3\]"):
        f(x).block_until_ready()
    assert settled_counter("errors", 8) == 8
    # 7 ranks waited for rank 3 to stop, about 1.5 s each; far above what a quick return
    # (no waiting) would give, far below the bound of the wait.
    assert jax_ddl.counters()["quiesce_s"] > 7 * 0.5
    np.testing.assert_array_equal(np.asarray(f(x))[0], np.asarray(x).sum(0))


def test_leaves_of_other_dtypes_go_to_lax_with_lax_results():
    """uint8, int8, int16, complex64 and float8 leaves are reduced by jax.lax beside the
    jax_ddl leaves of one tree, with identical results, and counted."""
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 64), jnp.float32, seed=5, low=0, high=4)

    def tree(v, op):
        t = {"u8": v.astype(jnp.uint8), "i8": v.astype(jnp.int8), "i16": v.astype(jnp.int16)}
        t["f8"] = v.astype(jnp.float8_e4m3fn)
        if op == "sum":  # jax.lax has no max of complex numbers
            t["c64"] = v.astype(jnp.complex64)
        return {**t, "f32": v}

    for op, ddl_op, lax_op in [
        ("sum", jax_ddl.psum, jax.lax.psum),
        ("max", jax_ddl.pmax, jax.lax.pmax),
    ]:
        jax_ddl.reset_counters()
        got = jax.block_until_ready(
            spmd(lambda v, f=ddl_op, o=op: f(tree(v, o), "i"), mesh, P("i"), P())(x)
        )
        want = spmd(lambda v, f=lax_op, o=op: f(tree(v, o), "i"), mesh, P("i"), P())(x)
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
        assert jax_ddl.counters()["calls"] == 8  # the float32 leaf, on 8 devices
        assert jax_ddl.counters()["lax_leaves"] >= 4


def test_partially_manual_shard_map_is_rejected_at_trace_time():
    mesh = mesh_of((2, 4), ("a", "b"))
    f = jax.jit(
        jax.shard_map(
            lambda v: jax_ddl.psum(v, "b"),
            mesh=mesh,
            in_specs=P("b"),
            out_specs=P("b"),
            axis_names={"b"},
            check_vma=False,
        )
    )
    with pytest.raises(NotImplementedError, match=r"mesh axes \['a'\] are not manual"):
        f(jnp.ones((8, 3)))


def test_platform_without_handler_is_a_clear_error():
    mesh = mesh_of((8,), ("i",))
    f = jax.jit(
        jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    )
    with pytest.raises(NotImplementedError, match="jax_ddl has an allreduce handler for CPU"):
        f.trace(jnp.ones((8, 4))).lower(lowering_platforms=("rocm",))


def test_cuda_handler_is_built_where_nvcc_is():
    """An install on a machine with nvcc builds and registers the CUDA handler (CI has
    nvcc, so a CUDA compile error fails CI); the program then lowers for CUDA to the same
    custom call, with the same attributes as on CPU but the device table: on CPU each
    device's rank and group are an attribute (the rank operands constants), on CUDA the
    operands carry them."""
    if shutil.which("nvcc") is None:
        assert "cuda" not in jax_ddl.supported_platforms()
        pytest.skip("no nvcc on this machine: the CPU engine alone is built")
    assert jax_ddl.supported_platforms() == ("cpu", "cuda")
    mesh = mesh_of((8,), ("i",))
    f = jax.jit(
        jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    )
    text = {
        p: f.trace(jnp.ones((8, 4))).lower(lowering_platforms=(p,)).as_text()
        for p in ("cpu", "cuda")
    }
    # Attributes but the module number (each lowering is the next module of its name),
    # the device table and the operands' names.
    table = r"device_ranks = dense<([^>]*)> : tensor<\d+xi64>"
    tables = {p: re.findall(table, t) for p, t in text.items()}
    assert tables["cuda"] == [""], tables  # empty: the operands carry rank and group
    assert tables["cpu"] == ["[" + ", ".join(f"{d}, {d}, 0" for d in range(8)) + "]"], tables
    calls = {
        p: [
            re.sub(
                r"\(%[^)]*\)",
                "(...)",
                re.sub(table, "T", re.sub(r"module = \d+", "module = N", line)),
            ).split("@")[1]
            for line in t.splitlines()
            if "custom_call @jax_ddl" in line
        ]
        for p, t in text.items()
    }
    assert calls["cuda"] == calls["cpu"] and len(calls["cuda"]) == 1, calls
