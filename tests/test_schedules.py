"""Call identity under every schedule XLA may choose.

XLA's CPU executor runs independent calls of one program concurrently and in any order
once the program has more than 8 thunks or buffers over 512 bytes, so these tests use
large buffers and many calls, and check every result against numpy or jax.lax:
independent calls of one shape in one program, more calls than XLA has threads, one
jitted function called several times (one lowering, several instructions), primal and
tangent of a jvp, loop bodies, branches, remat, and random programs mixing all of these.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import int_valued, mesh_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_ddl

N = 8
BIG = 256 * 1024 // 4  # 256 KiB of float32 per device: concurrent execution


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch):
    # A pairing bug shows up as a wrong sum or as a wait that times out: fail fast.
    monkeypatch.setenv("JAX_DDL_TIMEOUT", "60")


def _spmd(fn, out_specs=None):
    return jax.jit(
        jax.shard_map(fn, mesh=mesh_of((N,), ("i",)), in_specs=P("i"), out_specs=out_specs or P())
    )


def _rows(x):
    return np.asarray(x).reshape(N, -1)


def test_six_independent_same_shape_calls_pair_correctly_every_run():
    """Six independent psums of one shape (the program that gave wrong sums in 36 of 40
    runs when every call site of a program shared one id)."""
    x = int_valued((N * BIG,), jnp.float32, seed=1)
    f = _spmd(lambda v: tuple(jax_ddl.psum(v * (k + 1) + k, "i") for k in range(6)))
    xs = _rows(x)
    want = [(xs * (k + 1) + k).sum(0) for k in range(6)]
    for _ in range(40):
        outs = f(x)
        for k, o in enumerate(outs):
            np.testing.assert_array_equal(np.asarray(o), want[k], err_msg=f"call {k}")


def test_more_concurrent_calls_than_xla_has_threads():
    """16 independent calls x 8 devices: more blocked calls than XLA's thread pool has
    threads. Calls run on jax_ddl's own threads, so none waits for a queued peer."""
    x = int_valued((N * BIG // 4,), jnp.float32, seed=2)
    f = _spmd(lambda v: tuple(jax_ddl.psum(v + k, "i") for k in range(16)))
    xs = _rows(x)
    for _ in range(5):
        for k, o in enumerate(f(x)):
            np.testing.assert_array_equal(np.asarray(o), (xs + k).sum(0))


@pytest.mark.parametrize("wait_us", ["0", "1000000"], ids=["always-handed-off", "always-inline"])
def test_calls_handed_to_jax_ddl_threads_or_finished_inline_agree(wait_us):
    """JAX_DDL_INLINE_WAIT_US=0 hands every call to jax_ddl's threads; a long wait
    finishes every call on XLA's thread once its peers are there. Both pair and reduce
    correctly, also with more concurrent calls than XLA has threads."""
    program = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, PartitionSpec as P
        import jax_ddl
        mesh = Mesh(np.array(jax.devices()), ("i",))
        inner = jax.jit(lambda y: jax_ddl.psum(y, "i"))
        calls = lambda v: tuple(jax_ddl.psum(v + k, "i") for k in range(12))
        body = lambda v: calls(v) + (inner(v), inner(2 * v))
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P()))
        x = jnp.arange(8 * 30000.0) % 13
        xs = np.asarray(x).reshape(8, -1)
        want = [(xs + k).sum(0) for k in range(12)] + [xs.sum(0), 2 * xs.sum(0)]
        for _ in range(5):
            for got, exp in zip(f(x), want):
                assert np.array_equal(np.asarray(got), exp)
        print("exact")
        """
    )
    env = {**os.environ, "JAX_DDL_INLINE_WAIT_US": wait_us, "JAX_DDL_TIMEOUT": "60"}
    r = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0 and "exact" in r.stdout, r.stderr[-3000:]


def test_one_jitted_function_called_several_times():
    """jax lowers a jitted function once; XLA inlines each call into its own instruction,
    and the instances, independent of each other, run in any order on each device."""
    inner = jax.jit(lambda y: jax_ddl.psum(y, "i"))
    x = int_valued((N * BIG,), jnp.float32, seed=3)
    f = _spmd(lambda v: tuple(inner(v * (k + 1)) for k in range(8)))
    xs = _rows(x)
    for _ in range(10):
        for k, o in enumerate(f(x)):
            np.testing.assert_array_equal(np.asarray(o), (xs * (k + 1)).sum(0))


def test_jvp_primal_and_tangent_are_separate_calls():
    x = int_valued((N * BIG,), jnp.float32, seed=4)
    t = int_valued((N * BIG,), jnp.float32, seed=5)
    f = jax.jit(
        jax.shard_map(
            lambda a, b: jax.jvp(lambda v: jax_ddl.psum(v, "i"), (a,), (b,)),
            mesh=mesh_of((N,), ("i",)),
            in_specs=(P("i"), P("i")),
            out_specs=(P(), P()),
        )
    )
    for _ in range(10):
        primal, tangent = f(x, t)
        np.testing.assert_array_equal(np.asarray(primal), _rows(x).sum(0))
        np.testing.assert_array_equal(np.asarray(tangent), _rows(t).sum(0))


def test_calls_in_loops_branches_and_remat_beside_independent_calls():
    inner = jax.jit(lambda y: jax_ddl.psum(y, "i"))

    def body(v):
        def step(c, _):  # the carry stays varying, as it came in
            return lax.pcast(jax_ddl.psum(c, "i") % 7 - 3, "i", to="varying"), None

        looped, _ = lax.scan(step, v, None, length=3)
        branch = lax.cond(v[0] > 100, lambda y: inner(y), lambda y: inner(-y), v)
        rematted = jax.checkpoint(lambda y: jax_ddl.psum(y * 2, "i"))(v)
        outside = inner(v + 1)
        return looped, branch, rematted, outside

    x = int_valued((N * BIG // 2,), jnp.float32, seed=6)
    xs = _rows(x)
    want_loop = xs
    for _ in range(3):
        want_loop = np.broadcast_to(want_loop.sum(0) % 7 - 3, xs.shape)
    f = _spmd(body, out_specs=(P("i"), P(), P(), P()))
    for _ in range(5):
        looped, branch, rematted, outside = f(x)
        np.testing.assert_array_equal(_rows(looped), want_loop)
        np.testing.assert_array_equal(np.asarray(branch), -xs.sum(0))
        np.testing.assert_array_equal(np.asarray(rematted), 2 * xs.sum(0))
        np.testing.assert_array_equal(np.asarray(outside), (xs + 1).sum(0))


# ---------------------------------------------------------------------------------------
# Random programs: 2-12 calls, independent or chained, equal or unequal shapes, mixed
# dtypes and ops, some inside scan / cond / remat / jvp or a shared jitted function, each
# run several times. Values stay small integers, so every result is exact in every dtype.
#
# The oracle for programs with loops and branches is an exact numpy model of the
# program: jax.lax itself crashes on some of them (measured on jax 0.10.2: a program with
# a lax.pmax in a scan beside one in a cond segfaults in XLA's in-process all-reduce,
# whose collectives without channel ids share one rendezvous key while independent loops
# and branches run concurrently). Straight-line programs are checked against jax.lax.

DTYPES = (jnp.float32, jnp.bfloat16, jnp.int32, jnp.float64)
SIZES = (17, 4099, 40000)
WRAPS = ("plain", "scan", "cond", "remat", "jvp", "shared")
STRAIGHT = ("plain", "remat", "jvp", "shared")
OPS = ("sum", "max", "min")


def _calls(wraps):
    call = st.tuples(
        st.sampled_from(range(len(DTYPES))),
        st.sampled_from(SIZES),
        st.sampled_from(OPS),
        st.sampled_from(wraps),
        st.booleans(),  # chained on the previous call's result
    )
    return st.lists(call, min_size=2, max_size=12)


def _jvp_applies(op, dtype):
    return op == "sum" and jnp.issubdtype(dtype, jnp.floating)


def _program(calls, impl):
    """The body of a random program, reducing with jax_ddl or jax.lax (`impl`)."""
    reducers = {
        "ddl": {"sum": jax_ddl.psum, "max": jax_ddl.pmax, "min": jax_ddl.pmin},
        "lax": {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin},
    }[impl]
    shared = {op: jax.jit(functools.partial(reducers[op], axis_name="i")) for op in OPS}

    def reduce(y, op, wrap):
        r = functools.partial(reducers[op], axis_name="i")
        if wrap == "scan":
            step = lambda c, _: (lax.pcast(r(c) % 5 - 2, "i", to="varying"), None)
            out, _ = lax.scan(step, y, None, length=2)
            return out
        if wrap == "cond":
            return lax.cond(jnp.sum(y) > 1e9, lambda z: r(z + 1), r, y)
        if wrap == "remat":
            return jax.checkpoint(r)(y)
        if wrap == "jvp" and _jvp_applies(op, y.dtype):
            p, t = jax.jvp(r, (y,), (y % 3,))
            return p + t
        if wrap == "shared":
            return shared[op](y)
        return r(y)

    def body(v):
        outs = []
        prev = None
        for k, (d, size, op, wrap, chained) in enumerate(calls):
            dtype = DTYPES[d]
            y = (v[:size] * (k + 1) % 9 - 4).astype(dtype)
            if chained and prev is not None:  # depends on the previous call's result
                # Through a scalar: jax 0.11's Shardy pass segfaults compiling a scatter
                # (y.at[...].add) of a reduced value here, with jax.lax as with jax_ddl.
                y = y + (jnp.sum(prev.astype(jnp.float32)) % 3).astype(dtype)
            prev = reduce(y, op, wrap)
            outs.append(prev)
        return tuple(outs)

    return body


def _model(calls, x):
    """What the program computes, in numpy (float64; every value is a small integer)."""
    rows = _rows(x).astype(np.float64)
    red = {"sum": np.sum, "max": np.max, "min": np.min}
    outs, prev = [], None
    for k, (d, size, op, wrap, chained) in enumerate(calls):
        y = rows[:, :size] * (k + 1) % 9 - 4
        if chained and prev is not None:
            y += prev.sum(axis=1, keepdims=True) % 3
        reduce = lambda a, op=op: np.broadcast_to(red[op](a, axis=0), a.shape).copy()
        if wrap == "scan":
            for _ in range(2):
                y = reduce(y) % 5 - 2
            prev = y
        elif wrap == "jvp" and _jvp_applies(op, DTYPES[d]):
            prev = reduce(y) + reduce(y % 3)
        else:
            prev = reduce(y)
        outs.append(prev.reshape(-1))
    return outs


def _run_random(calls, impl_ref):
    x = int_valued((N * max(SIZES),), jnp.float32, seed=len(calls))
    specs = tuple(P("i") for _ in calls)
    ddl = _spmd(_program(calls, "ddl"), out_specs=specs)
    if impl_ref == "lax":
        want = [np.asarray(o, np.float64) for o in _spmd(_program(calls, "lax"), specs)(x)]
    else:
        want = _model(calls, x)
    for _ in range(8):
        for k, (got, exp) in enumerate(zip(ddl(x), want)):
            np.testing.assert_array_equal(
                np.asarray(got, np.float64), exp, err_msg=f"call {k}: {calls[k]}"
            )


_random = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_random
@given(calls=_calls(WRAPS))
def test_random_programs_with_loops_and_branches_match_their_model(calls):
    _run_random(calls, "model")


@_random
@given(calls=_calls(STRAIGHT))
def test_random_straight_line_programs_match_lax(calls):
    _run_random(calls, "lax")


def test_independent_work_runs_while_a_call_waits_for_its_peers():
    """XLA runs a device's work that does not depend on a pending jax_ddl call while the
    call waits: rank 7's call is held until a host callback in the independent branch
    releases it. Were that branch ordered after the call (as it was while the call's rank
    operands were temporaries whose memory XLA reused for later work), the hold would run
    out (after 20 s) instead of being released, and nothing could overlap a reduction."""
    from jax_ddl import _ddl

    def body(g, a):
        total = jax_ddl.psum(g, "i")
        h = a  # independent of the call, and long enough (XLA runs programs of at most
        for _ in range(6):  # 8 steps one step after the other)
            h = jnp.tanh(h @ h.T * 1e-2)
        jax.debug.callback(lambda _: _ddl.release_hold(), h)
        return total, h

    f = _spmd(body, out_specs=(P("i"), P("i")))
    g = int_valued((N * BIG,), jnp.float32, seed=3)
    a = jnp.ones((N * 64, 64), jnp.float32)
    jax.block_until_ready(f(g, a))  # compiled, and every device's state made
    before = _ddl.holds()
    _ddl.set_fault("hold", 7, 20000, 1)
    try:
        total, h = f(g, a)
        jax.block_until_ready((total, h))
    finally:
        _ddl.set_fault("none")
    after = _ddl.holds()
    assert after["expired"] == before["expired"], "the independent branch waited for the call"
    assert after["released"] == before["released"] + 1
    for row in _rows(total):
        np.testing.assert_array_equal(row, _rows(g).sum(0))
