"""Property-based tests: random shapes, dtypes, device counts and topology specs, with
numpy as the oracle on integer-valued data (exact in every supported dtype)."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from helpers import ZERO_SIZE_LEAVES_OK, mesh_of, spmd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from jax.sharding import PartitionSpec as P

import jax_ddl

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int64]


def factorizations(n):
    """Every ordered factorization of n into factors >= 2, plus "n" and a leading 1."""
    out = []

    def rec(rest, prefix):
        if rest == 1:
            out.append(prefix or [1])
            return
        for f in range(2, rest + 1):
            if rest % f == 0:
                rec(rest // f, prefix + [f])

    rec(n, [])
    out.append([1, n])
    return ["x".join(map(str, f)) for f in out]


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@st.composite
def cases(draw):
    ndev = draw(st.sampled_from([1, 2, 3, 4, 8]))
    topology = draw(st.sampled_from(factorizations(ndev)))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24))
    small = draw(st.sampled_from([0, 1 << 20]))
    op = draw(st.sampled_from(["sum", "sum", "max", "min"]))
    seed = draw(st.integers(0, 2**16))
    return ndev, topology, dtype, shape, small, op, seed


@settings(max_examples=40, deadline=None)
@given(cases())
def test_allreduce_matches_numpy(case):
    ndev, topology, dtype, shape, small, op, seed = case
    x = np.random.default_rng(seed).integers(-20, 20, size=(ndev, *shape))
    fn = {"sum": jax_ddl.psum, "max": jax_ddl.pmax, "min": jax_ddl.pmin}[op]
    ref = {"sum": np.sum, "max": np.max, "min": np.min}[op](x, axis=0)
    with env(JAX_DDL_SMALL_BYTES=small):
        f = spmd(
            lambda v: fn(v[0], "i", topology=topology)[None],
            mesh_of((ndev,), ("i",)),
            P("i"),
            P("i"),
            check_vma=False,
        )
        out = np.asarray(f(jnp.asarray(x, dtype)), np.float64)
    for r in range(ndev):
        np.testing.assert_array_equal(out[r], ref)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            array_shapes(
                min_dims=0, max_dims=2, min_side=0 if ZERO_SIZE_LEAVES_OK else 1, max_side=9
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["8", "2x4", "2x2x2"]),
)
def test_pytrees_of_mixed_dtypes(leaves, topology):
    rng = np.random.default_rng(len(leaves))
    tree = [jnp.asarray(rng.integers(-5, 5, size=(8, *s)), d) for d, s in leaves]
    specs = [P("i")] * len(tree)
    f = spmd(
        lambda t: jax_ddl.psum(t, "i", topology=topology),
        mesh_of((8,), ("i",)),
        (specs,),
        [P()] * len(tree),
    )
    out = f(tree)
    for a, x in zip(out, tree):
        assert a.dtype == x.dtype and a.shape == (1, *x.shape[1:])
        np.testing.assert_array_equal(
            np.asarray(a[0], np.float64), np.asarray(x, np.float64).sum(0)
        )
    n_calls = str(jax.make_jaxpr(f)(tree)).count("ddl_allreduce")
    assert n_calls <= len({np.dtype(d) for d, s in leaves if 0 not in s})
