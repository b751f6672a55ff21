"""Differentiation and vmap of jax_ddl collectives, with jax.lax as the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_ddl_calls, int_valued, mesh_of
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_ddl

MESH = None


def _mesh():
    global MESH
    if MESH is None:
        MESH = mesh_of((8,), ("i",))
    return MESH


def _loss(psum, check_vma, topology=None):
    kw = {"topology": topology} if psum is jax_ddl.psum else {}

    def body(v, w):
        return (psum(jnp.sin(v) * w, "i", **kw) ** 2).sum()

    return jax.jit(
        jax.shard_map(
            body, mesh=_mesh(), in_specs=(P("i"), P("i")), out_specs=P(), check_vma=check_vma
        )
    )


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("topology", [None, "2x4"])
def test_grad_matches_lax(check_vma, topology):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
    w = int_valued((8, 16), jnp.float32)
    ours = jax.grad(_loss(jax_ddl.psum, check_vma, topology), argnums=(0, 1))(x, w)
    ref = jax.grad(_loss(lax.psum, check_vma), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_transpose_without_vma_runs_through_ddl():
    x = jnp.ones((8, 4), jnp.float32)
    grad_fn = jax.grad(_loss(jax_ddl.psum, check_vma=False))
    assert count_ddl_calls(grad_fn, x, x) == 2  # forward allreduce and its transpose


@pytest.mark.parametrize("check_vma", [True, False])
def test_jvp_and_vjp_match_lax(check_vma):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
    ours, theirs = _loss(jax_ddl.psum, check_vma), _loss(lax.psum, check_vma)
    p1, t1 = jax.jvp(lambda a: ours(a, w), (x,), (t,))
    p2, t2 = jax.jvp(lambda a: theirs(a, w), (x,), (t,))
    np.testing.assert_allclose(p1, p2, rtol=1e-5)
    np.testing.assert_allclose(t1, t2, rtol=1e-5)
    _, vjp1 = jax.vjp(lambda a: ours(a, w), x)
    _, vjp2 = jax.vjp(lambda a: theirs(a, w), x)
    np.testing.assert_allclose(vjp1(jnp.float32(1.5))[0], vjp2(jnp.float32(1.5))[0], rtol=1e-5)


def test_jvp_tangent_goes_through_ddl():
    mesh = _mesh()
    f = jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    x = int_valued((8, 3), jnp.float32)
    jvp_fn = lambda a, b: jax.jvp(f, (a,), (b,))  # noqa: E731
    assert count_ddl_calls(jvp_fn, x, x) == 2
    p, t = jax.jit(jvp_fn)(x, 2 * x)
    np.testing.assert_array_equal(p[0], np.asarray(x).sum(0))
    np.testing.assert_array_equal(t[0], 2 * np.asarray(x).sum(0))


def test_pmean_grad_matches_lax():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 7)), jnp.float32)

    def make(pmean):
        return jax.jit(
            jax.shard_map(
                lambda v: (pmean(v * v, "i") * 3.0).sum(),
                mesh=_mesh(),
                in_specs=P("i"),
                out_specs=P(),
            )
        )

    np.testing.assert_allclose(
        jax.grad(make(jax_ddl.pmean))(x), jax.grad(make(lax.pmean))(x), rtol=1e-6
    )


def test_vmap_over_batch_dimension():
    mesh = _mesh()
    f = jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    g = jax.shard_map(lambda v: lax.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    x = int_valued((3, 8, 5), jnp.float32)
    for axis in (0, 2):
        xs = jnp.moveaxis(x, 0, axis)
        jax_ddl.reset_counters()
        got = jax.block_until_ready(jax.jit(jax.vmap(f, in_axes=axis))(xs))
        assert jax_ddl.counters()["calls"] == 8  # one batched call per device, not lax
        np.testing.assert_array_equal(got, jax.jit(jax.vmap(g, in_axes=axis))(xs))


def test_vmap_inside_shard_map_with_named_vmap_axis():
    mesh = _mesh()

    def make(psum):
        def body(v):  # v: (1, 4, 5) -> reduce over the vmapped 'b' and the mesh axis 'i'
            return jax.vmap(lambda r: psum(r, ("b", "i")), axis_name="b")(v[0])[None]

        return jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=False)
        )

    x = int_valued((8, 4, 5), jnp.float32)
    jax_ddl.reset_counters()
    got = jax.block_until_ready(make(jax_ddl.psum)(x))
    assert jax_ddl.counters()["calls"] == 8  # 'b' reduced locally, 'i' through jax_ddl
    np.testing.assert_array_equal(got, make(lax.psum)(x))


def test_pmax_is_not_differentiable():
    f = jax.shard_map(
        lambda v: jax_ddl.pmax(v, "i").sum(), mesh=_mesh(), in_specs=P("i"), out_specs=P()
    )
    with pytest.raises(TypeError, match="jax_ddl.pmax is not differentiable"):
        jax.grad(f)(jnp.ones((8, 2)))
